"""`lseg train` as SLURM runs it: the project's own scripts/slurm/train.sbatch on a one-node cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from huggingface_hub import ModelCard

from lseg import LSeg
from lseg.data import SyntheticStreetScenes
from lseg.evaluate.runner import evaluate_dataset
from lseg.model import load_preset
from tests.cluster.jobs import (
    BATCH_OF_2_ON_2_CPU_TASKS,
    JOB_WITHIN_S,
    controller_log,
    job_output,
    job_state,
    lseg_environment,
    sbatch,
    task_process,
    wait_until,
    wait_until_cleaned_up,
)
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.cluster

TINY_RUN = """\
trainer: {max_epochs: 3, limit_train_batches: 4, limit_val_batches: 1.0}
data:
  val: {name: synthetic, options: {num_images: 5, size: [96, 128], seed: 1}}
  scale_range: [1.0, 1.0]
"""


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
    return sbatch(
        slurm_env, work, "train.sbatch", BATCH_OF_2_ON_2_CPU_TASKS,
        [*config, "--data.batch_size", "2", "--trainer.default_root_dir", str(work / "run")],
    )  # fmt: skip


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


class PaceSteps(L.Callback):
    """Makes every training step last a second or more, so that a signal sent from outside lands mid-epoch
    even on a fast machine (the weights do not change: nothing but the pace is touched)."""

    def on_train_batch_end(self, *args) -> None:
        time.sleep(1.0)


def wait_for_a_save(slurm_env: dict[str, str], job: str, last: Path, after_ns: int) -> None:
    """Until `last` is written after `after_ns` (mtime), by the running job: an epoch end."""
    deadline = time.monotonic() + JOB_WITHIN_S
    while not (last.is_file() and last.stat().st_mtime_ns > after_ns):
        state = job_state(slurm_env, job)["JobState"]
        assert time.monotonic() < deadline and state in {"PENDING", "RUNNING"}, state
        time.sleep(0.2)


def preempt(slurm_env: dict[str, str], job: str, how: str, work: Path) -> int:
    """Interrupt the running job as SLURM does, wait until it is requeued and release it; the step saved.

    "USR1": the signal `--signal=SIGUSR1@N` sends every task before the time limit (the job saves
    last.ckpt and requeues itself). "requeue": what preemption with PreemptMode=REQUEUE does,
    `scontrol requeue` of the running job: SIGTERM to every task, SIGKILL after KillWait, pending again.
    """
    command = ["scancel", "--signal=USR1", job] if how == "USR1" else ["scontrol", "requeue", job]
    subprocess.run(command, env=slurm_env, check=True, timeout=30)
    pending = wait_until(slurm_env, job, {"PENDING", "COMPLETED", "FAILED", "CANCELLED"})
    assert pending["JobState"] == "PENDING", job_output(work)[-3000:]  # requeued, held until BeginTime
    wait_until_cleaned_up(slurm_env, job)
    saved = torch.load(work / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    subprocess.run(
        ["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm_env, check=True, timeout=30
    )
    return saved


def assert_completed_like_uninterrupted(
    slurm_env: dict[str, str], job: str, work: Path, uninterrupted: Path, saves: list[int]
) -> None:
    """The requeued job completes, having resumed from each save without --ckpt_path, with the
    uninterrupted job's weights bit for bit."""
    fields = wait_until(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED"})
    output = job_output(work)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == str(len(saves)), (
        f"{fields}\n{output[-3000:]}\n{controller_log(slurm_env, job)[-3000:]}"
    )
    assert "Traceback" not in output, output[-3000:]
    last = work / "run" / "checkpoints" / "last.ckpt"
    for saved in saves:
        assert output.count(f"saved {last} at step {saved}") == 1, output[-3000:]
        assert f"resuming from {last} (step {saved})" in output
    resumed = torch.load(last, weights_only=False)
    straight = torch.load(uninterrupted / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 12
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


def test_two_preemptions_in_one_run_resume_bit_identically(slurm_env, uninterrupted, tmp_path):
    """A time limit in epoch 1 (SIGUSR1: the job saves and requeues itself), then a preemption of the
    requeued job in epoch 2 (SIGTERM: SLURM requeues it): each signal lands mid-epoch, each restart
    resumes from the newest checkpoint without --ckpt_path, and the job ends with the uninterrupted
    job's weights bit for bit."""
    paced = [*tiny_config(tmp_path), "--trainer.callbacks+=tests.cluster.test_slurm_training.PaceSteps"]
    job = submit(slurm_env, tmp_path, paced)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    wait_for_a_save(slurm_env, job, last, after_ns=0)
    first = preempt(slurm_env, job, "USR1", tmp_path)
    wait_for_a_save(slurm_env, job, last, after_ns=last.stat().st_mtime_ns)  # the next epoch's end
    second = preempt(slurm_env, job, "requeue", tmp_path)
    assert 4 <= first < 8 <= second < 12, (first, second)
    assert_completed_like_uninterrupted(slurm_env, job, tmp_path, uninterrupted, [first, second])
    assert job_output(tmp_path).count("requeueing the job") == 1  # after SIGUSR1 only


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
    task_process(job, rank=1).send_signal(signal.SIGTERM)
    wait_until(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED"}, within_s=60)
    output = job_output(tmp_path)
    saved = torch.load(last, weights_only=False)["global_step"]
    assert 4 <= saved < 12 and output.count(f"signal on another rank: saved {last} at step {saved}") == 1, (
        output
    )


def test_torchrun_on_two_nodes_trains_the_weights_of_the_slurm_job(uninterrupted, tmp_path):
    """Multi-node without SLURM: two `torchrun --nnodes 2 --nproc-per-node 1` launchers on this host
    meet by c10d rendezvous on loopback and train the SLURM job's weights (the same 2 ranks of batch 2)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lseg-test",
        "-m", "lseg.cli.main", "train", *tiny_config(tmp_path), "--data.batch_size", "2",
        "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        **lseg_environment(),
    }
    nodes = [
        subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=JOB_WITHIN_S)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)[-3000:]
    joined = "\n".join(outputs)
    assert joined.count("lseg train: rank 0 of world size 2, node") == 1 and "(2 node(s))" in joined, joined
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    slurm = torch.load(uninterrupted / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert trained["global_step"] == slurm["global_step"] == 12
    for name, value in slurm["state_dict"].items():
        assert torch.equal(trained["state_dict"][name], value), name
