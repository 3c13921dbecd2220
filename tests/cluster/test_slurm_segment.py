"""`lseg segment` over a folder as a SLURM job: the project's own scripts/slurm/segment.sbatch, 2 tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lseg import LSeg
from lseg.data import SyntheticStreetScenes
from tests.cluster.jobs import (
    BATCH_OF_2_ON_2_CPU_TASKS,
    JOB_WITHIN_S,
    job_output,
    lseg_environment,
    sbatch,
    task_process,
    wait_until,
    wait_until_cleaned_up,
)

pytestmark = pytest.mark.cluster

IMAGES = 40
# command -> (its options beside the model's, the files of each image with the sidecar last, its summary)
COMMANDS = {
    "segment": (
        ["--labels", "road, sky, car, building", "--save-features", "--batch-size", "1"],
        (".labels.png", ".overlay.png", ".features.npy", ".json"),
        "segment-summary.json",
    ),
    "features": ([], (".npy", ".json"), "features-summary.json"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A tiny model, a folder of 40 street scenes of 480 x 360 and the `lseg segment` options for both."""
    folder = tmp_path_factory.mktemp("segment")
    model = LSeg.from_config("tiny").save_pretrained(folder / "model")
    images = folder / "images"
    images.mkdir()
    scenes = SyntheticStreetScenes(IMAGES, size=(360, 480), seed=3)
    for index in range(IMAGES):
        pixels = scenes[index]["image"].permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(images / f"{index:03d}.png")
    return images, folder, ["--checkpoint", str(model), "--size", "360", "--device", "cpu"]


def sidecar_times(out: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in out.glob("*.json") if path.name[0].isdigit()}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_sharded_job_killed_mid_way_and_resubmitted_does_every_image_once(
    slurm_env, inputs, tmp_path, command
):
    """Task 1 is killed after a few of its images; the resubmitted job (the same script, `LSEG_COMMAND`
    picking the command) skips every image already done (its files untouched), does the rest, and the
    folder then equals a one-process run byte for byte (sidecars but for the seconds they took), with a
    complete summary."""
    images, _, model_options = inputs
    extra, outputs, summary_name = COMMANDS[command]
    options = [*model_options, *extra]
    environment = {**slurm_env, "LSEG_COMMAND": command}
    single = subprocess.run(
        [sys.executable, "-m", "lseg.cli.main", command, str(images), "--out", str(tmp_path / "single"),
         *options],
        env={**os.environ, **lseg_environment()}, capture_output=True, text=True, timeout=JOB_WITHIN_S,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    out = tmp_path / "sharded"
    job = sbatch(
        environment, tmp_path, "segment.sbatch", BATCH_OF_2_ON_2_CPU_TASKS, [str(images), str(out), *options]
    )
    odd = {f"{index:03d}.json" for index in range(1, IMAGES, 2)}  # task 1's shard
    deadline = time.monotonic() + JOB_WITHIN_S
    while len(odd & set(sidecar_times(out))) < 3:
        assert time.monotonic() < deadline, job_output(tmp_path)[-3000:]
        time.sleep(0.05)
    task_process(job, rank=1).kill()
    wait_until(slurm_env, job, {"COMPLETED", "FAILED", "CANCELLED"})
    wait_until_cleaned_up(slurm_env, job)
    before = sidecar_times(out)
    assert 3 <= len(odd & set(before)) < len(odd), "task 1 was not killed mid-way"
    assert not (out / summary_name).exists()

    resubmitted = sbatch(
        environment, tmp_path, "segment.sbatch", BATCH_OF_2_ON_2_CPU_TASKS, [str(images), str(out), *options]
    )
    fields = wait_until(slurm_env, resubmitted, {"COMPLETED", "FAILED", "CANCELLED"})
    assert fields["JobState"] == "COMPLETED", job_output(tmp_path)[-3000:]
    output = job_output(tmp_path)
    even = {f"{index:03d}.json" for index in range(0, IMAGES, 2)}
    for shard in (odd, even):  # task 0 may have been stopped with task 1, or have finished its shard
        done = len(shard & set(before))
        assert not done or f"skipping {done} image(s)" in output, output[-3000:]
    after = sidecar_times(out)
    assert len(after) == IMAGES and all(after[name] == time for name, time in before.items())
    for index in range(IMAGES):
        for suffix in outputs[:-1]:
            name = f"{index:03d}{suffix}"
            assert (out / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
        sidecar = json.loads((out / f"{index:03d}.json").read_text())
        reference = json.loads((tmp_path / "single" / f"{index:03d}.json").read_text())
        assert {**sidecar, "seconds": 0} == {**reference, "seconds": 0}  # (features: no timing)
    made = {path.name for path in out.iterdir()}
    expected = {f"{index:03d}{suffix}" for index in range(IMAGES) for suffix in outputs}
    assert made == expected | {summary_name, ".lseg-shards"}  # nothing half-made is left
    summary = json.loads((out / summary_name).read_text())
    assert summary["images"] == summary["done"] == IMAGES and summary["missing"] == []
    assert [record["name"] for record in summary["records"]] == [f"{index:03d}" for index in range(IMAGES)]
    assert sorted((rank["rank"], rank["images"], rank["failed"]) for rank in summary["ranks"]) == [
        (0, 20, 0), (1, 20, 0)
    ]  # fmt: skip
    assert np.load(out / f"000{outputs[-2]}").dtype == np.float16
