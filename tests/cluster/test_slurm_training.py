"""`lseg train` as SLURM runs it: the project's own scripts/slurm/train.sbatch on a one-node cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
TINY_RUN = """\
trainer: {max_epochs: 1, limit_train_batches: 4, limit_val_batches: 1.0}
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
    """The smoke config for 4 steps and 5 validation images, made for comparing 2 ranks with one
    process: no BatchNorm (CPUs have no SyncBatchNorm; per-rank batch statistics differ), crops with
    no padding (every rank then averages its loss over as many pixels as the others, so the mean of
    the ranks' gradients is the one-process gradient), SGD (Adam's first steps amplify rounding)."""
    model = {**load_preset("tiny").to_dict(), "use_bn": False}
    config = folder / "tiny.yaml"
    config.write_text(TINY_RUN + f"model: {{model: {json.dumps(model)}, optimizer: sgd, lr: 0.01}}\n")
    return ["--config", str(REPO_ROOT / "configs" / "smoke.yaml"), "--config", str(config),
            "--trainer.enable_progress_bar", "false"]  # fmt: skip


def test_train_sbatch_runs_two_ddp_tasks_like_one_process_with_the_global_batch(slurm_env, tmp_path):
    """2 tasks of batch 2 train the weights one process trains with batch 4, and validation scores each
    of the 5 images once: val/miou is what `lseg evaluate` reports for the exported model."""
    work = tmp_path / "job"
    (work / "runs" / "slurm").mkdir(parents=True)  # the script's --output folder, opened before it runs
    arguments = [*tiny_config(tmp_path), "--data.batch_size", "2"]
    cpu_job = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--wait"]
    job = subprocess.run(
        ["sbatch", *cpu_job, f"--chdir={work}", str(REPO_ROOT / "scripts" / "slurm" / "train.sbatch"),
         *arguments, "--trainer.default_root_dir", str(work / "run")],
        env={**slurm_env, **lseg_environment()}, capture_output=True, text=True, timeout=JOB_WITHIN_S,
    )  # fmt: skip
    output = "\n".join(path.read_text() for path in (work / "runs" / "slurm").glob("*.out"))
    assert job.returncode == 0, f"{job.stderr}\n{output[-3000:]}"
    assert output.count("lseg train: rank 0 of world size 2") == 1 and "fresh start" in output
    assert "distributed_backend=gloo" in output

    single = subprocess.run(
        [sys.executable, "-m", "lseg.cli.main", "train", *arguments[:-2], "--data.batch_size", "4",
         "--trainer.default_root_dir", str(tmp_path / "single")],
        env={**os.environ, **lseg_environment()}, capture_output=True, text=True, timeout=JOB_WITHIN_S,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = torch.load(work / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    one = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ddp["global_step"] == one["global_step"] == 4
    difference = {
        name: (ddp["state_dict"][name] - value).abs().max().item()
        for name, value in one["state_dict"].items()
    }
    worst = max(difference, key=difference.get)  # gradients summed in another order: 1.6e-8 measured
    assert difference[worst] <= 1e-6, f"{worst}: {difference[worst]}"

    validated = ModelCard.load(work / "run" / "model" / "README.md").data.lseg["results"]["train"]["metrics"]
    model = LSeg.from_pretrained(work / "run" / "model")
    report = evaluate_dataset(model, SyntheticStreetScenes(5, size=(96, 128), seed=1), protocol="single")
    assert validated["miou"] == pytest.approx(report.metrics["miou"], abs=1e-6)
