"""`lseg train` as SLURM runs it: the project's own scripts/slurm/train.sbatch on a one-node cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from huggingface_hub import ModelCard

from lseg import LSeg
from lseg.data import SyntheticStreetScenes
from lseg.evaluate.runner import evaluate_dataset
from lseg.model import load_preset
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cluster

JOB_WITHIN_S = 180
BATCH_OF_2_ON_2_CPU_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
TINY_RUN = """\
trainer: {max_epochs: 3, limit_train_batches: 4, limit_val_batches: 1.0}
data:
  val: {name: synthetic, options: {num_images: 5, size: [96, 128], seed: 1}}
  scale_range: [1.0, 1.0]
"""


def lseg_environment(**extra: str) -> dict[str, str]:
    """This interpreter's `lseg` first on PATH and this checkout's sources on its path (exported to jobs)."""
    path = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "src"), str(REPO_ROOT), os.environ.get("PYTHONPATH")])
    )
    binaries = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {"PYTHONPATH": path, "PATH": binaries, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def tiny_config(folder: Path) -> list[str]:
    """The smoke config for 3 epochs of 4 steps and 5 validation images, made for comparing 2 ranks with one
    process: no BatchNorm (CPUs have no SyncBatchNorm; per-rank batch statistics differ), crops with
    no padding (every rank then averages its loss over as many pixels as the others, so the mean of
    the ranks' gradients is the one-process gradient), SGD (Adam's first steps amplify rounding)."""
    model = {**load_preset("tiny").to_dict(), "use_bn": False}
    config = folder / "tiny.yaml"
    config.write_text(TINY_RUN + f"model: {{model: {json.dumps(model)}, optimizer: sgd, lr: 0.01}}\n")
    # No monitor: Lightning 2.6 rewrites last.ckpt only when it saves a new best, so with one it may
    # not hold the final weights; without, it is written at every epoch end.
    return ["--config", str(REPO_ROOT / "configs" / "smoke.yaml"), "--config", str(config),
            "--trainer.enable_progress_bar", "false", "--checkpoint.monitor", "null"]  # fmt: skip


def submit(slurm_env: dict[str, str], work: Path, config: list[str]) -> str:
    """`sbatch scripts/slurm/train.sbatch` (unedited; the CPU shape as sbatch options) from `work`,
    training 2 ranks of batch 2 into `work/run`; the job id."""
    (work / "runs" / "slurm").mkdir(parents=True)  # the script's --output folder, opened before it runs
    job = subprocess.run(
        ["sbatch", "--parsable", *BATCH_OF_2_ON_2_CPU_TASKS, f"--chdir={work}",
         str(REPO_ROOT / "scripts" / "slurm" / "train.sbatch"), *config, "--data.batch_size", "2",
         "--trainer.default_root_dir", str(work / "run")],
        env={**slurm_env, **lseg_environment()}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    return job.stdout.strip().split(";")[0]


def job_state(slurm_env: dict[str, str], job: str) -> dict[str, str]:
    shown = subprocess.run(
        ["scontrol", "-o", "show", "job", job], env=slurm_env, capture_output=True, text=True, timeout=30
    )
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def wait_until(slurm_env: dict[str, str], job: str, states: set[str], within_s: float = JOB_WITHIN_S) -> dict:
    """The job's fields once its state is one of `states`; fails after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        fields = job_state(slurm_env, job)
        if fields.get("JobState") in states:
            return fields
        time.sleep(0.5)
    pytest.fail(f"job {job} not {' or '.join(states)} within {within_s} s: {fields}")


def job_output(work: Path) -> str:
    return "\n".join(path.read_text() for path in (work / "runs" / "slurm").glob("*.out"))


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tmp_path_factory) -> Path:
    """The folder of a completed uninterrupted 2-task job (its run in `run/`, its config in `tiny.yaml`)."""
    work = tmp_path_factory.mktemp("uninterrupted")
    job = submit(slurm_env, work, tiny_config(work))
    fields = wait_until(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert fields["JobState"] == "COMPLETED", job_output(work)[-3000:]
    return work


def test_train_sbatch_runs_two_ddp_tasks_like_one_process_with_the_global_batch(uninterrupted, tmp_path):
    """2 tasks of batch 2 train the weights one process trains with batch 4, and validation scores each
    of the 5 images once: val/miou is what `lseg evaluate` reports for the exported model."""
    output = job_output(uninterrupted)
    assert output.count("lseg train: rank 0 of world size 2") == 1 and "fresh start" in output
    assert "distributed_backend=gloo" in output
    single = subprocess.run(
        [sys.executable, "-m", "lseg.cli.main", "train", *tiny_config(tmp_path), "--data.batch_size", "4",
         "--trainer.default_root_dir", str(tmp_path / "single")],
        env={**os.environ, **lseg_environment()}, capture_output=True, text=True, timeout=JOB_WITHIN_S,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = torch.load(uninterrupted / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    one = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ddp["global_step"] == one["global_step"] == 12
    difference = {
        name: (ddp["state_dict"][name] - value).abs().max().item()
        for name, value in one["state_dict"].items()
    }
    worst = max(difference, key=difference.get)  # gradients summed in another order: 1.6e-8 measured
    assert difference[worst] <= 1e-6, f"{worst}: {difference[worst]}"

    validated = ModelCard.load(uninterrupted / "run" / "model" / "README.md").data.lseg["results"]["train"]
    model = LSeg.from_pretrained(uninterrupted / "run" / "model")
    report = evaluate_dataset(model, SyntheticStreetScenes(5, size=(96, 128), seed=1), protocol="single")
    assert validated["metrics"]["miou"] == pytest.approx(report.metrics["miou"], abs=1e-6)


@pytest.mark.parametrize(
    "signal_name", ["USR1", "TERM"], ids=["time limit (SIGUSR1)", "preemption (SIGTERM)"]
)
def test_a_signal_mid_run_then_requeue_resumes_bit_identically(
    slurm_env, uninterrupted, tmp_path, signal_name
):
    """A signal to every task once epoch 0 has ended: SIGUSR1 as `--signal=SIGUSR1@N` sends it before
    the time limit (the job saves last.ckpt and requeues itself), SIGTERM as a preemption sends it
    (the job saves and ends; the preempting scheduler requeues it). The requeued job, without
    --ckpt_path, resumes from last.ckpt and ends with the uninterrupted job's weights, bit for bit."""
    job = submit(slurm_env, tmp_path, tiny_config(tmp_path))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + JOB_WITHIN_S
    while not last.is_file():  # epoch 0's end: 8 steps remain, a few seconds
        assert time.monotonic() < deadline and job_state(slurm_env, job)["JobState"] in {"PENDING", "RUNNING"}
        time.sleep(0.2)
    subprocess.run(["scancel", f"--signal={signal_name}", job], env=slurm_env, check=True, timeout=30)
    if signal_name == "TERM":  # lseg exits 143 after saving, as a process ended by SIGTERM does
        wait_until(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED"})
        subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True, timeout=30)
    pending = wait_until(slurm_env, job, {"PENDING", "COMPLETED", "FAILED"})
    assert pending["JobState"] == "PENDING", job_output(tmp_path)[-3000:]  # requeued, held until BeginTime
    saved = torch.load(last, weights_only=False)["global_step"]
    assert 4 <= saved < 12
    subprocess.run(
        ["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm_env, check=True, timeout=30
    )
    fields = wait_until(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED"})
    output = job_output(tmp_path)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", output[-3000:]
    assert output.count(f"saved {last} at step {saved}") == 1
    assert ("requeueing the job" in output) == (signal_name == "USR1")
    assert f"resuming from {last} (step {saved})" in output
    resumed = torch.load(last, weights_only=False)
    straight = torch.load(uninterrupted / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 12
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


def test_sigterm_to_one_task_saves_once_and_ends_the_job(slurm_env, tmp_path):
    """SIGTERM to rank 1's process alone (an OOM killer's or a node agent's, not SLURM's): both ranks
    save once, at the same step, and the job ends within the bound instead of hanging in mismatched
    collectives until SIGKILL."""
    job = submit(slurm_env, tmp_path, tiny_config(tmp_path))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + JOB_WITHIN_S
    while not last.is_file():  # epoch 0's end
        assert time.monotonic() < deadline and job_state(slurm_env, job)["JobState"] in {"PENDING", "RUNNING"}
        time.sleep(0.2)
    rank_1 = [
        process
        for process in psutil.process_iter(["environ"])
        if (process.info["environ"] or {}).get("SLURM_JOB_ID") == job
        and process.info["environ"].get("SLURM_PROCID") == "1"
        and "lseg" in " ".join(process.cmdline())
    ]
    assert len(rank_1) == 1, rank_1
    rank_1[0].send_signal(signal.SIGTERM)
    wait_until(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED"}, within_s=60)
    output = job_output(tmp_path)
    saved = torch.load(last, weights_only=False)["global_step"]
    assert 4 <= saved < 12 and output.count(f"signal on another rank: saved {last} at step {saved}") == 1, (
        output
    )
