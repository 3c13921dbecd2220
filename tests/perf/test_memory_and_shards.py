"""Bounded memory on a 12-megapixel photo, and sharded, resumable runs over folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from lseg.shard import shard_from_env, take_shard

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return {**env, **extra}


def test_label_maps_never_hold_more_than_their_budget(monkeypatch):
    import torch

    import lseg.processing as processing
    from lseg import LSegImageProcessor

    largest = []
    original = processing.resize_logits

    def spy(logits, size):
        out = original(logits, size)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(processing, "resize_logits", spy)
    logits = torch.randn(1, 150, 30, 40)
    maps = LSegImageProcessor((0.5,) * 3, (0.5,) * 3).label_maps(
        logits, [(300, 400)], max_elements=300 * 400 * 8
    )
    assert max(largest) <= 300 * 400 * 8 and len(largest) == 19  # 150 labels, 8 at a time
    full = original(logits, (300, 400))[0].argmax(0)
    assert torch.equal(maps[0][0], full)


@pytest.mark.slow
def test_segment_of_a_12_megapixel_photo_with_150_labels_stays_small(tmp_path):
    """Today's scores alone would take 7.2 GB: the label map is computed a few labels at a time."""
    script = textwrap.dedent(
        """
        import resource, sys, numpy as np, torch
        from lseg import LSeg
        from lseg.data import ade20k_names
        torch.manual_seed(0)
        model = LSeg.from_config("tiny").eval()
        image = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
        result = model.segment(image, labels=ade20k_names()[:150], size=96, return_confidence=True)
        assert result.label_map.shape == (3000, 4000) and result.scores is None
        assert result.confidence.shape == (3000, 4000)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), check=True
    )
    peak_mb = float(out.stdout.strip().splitlines()[-1])
    assert peak_mb < 2048, f"peak RSS {peak_mb:.0f} MB"


def test_shards_from_env_are_disjoint_and_complete():
    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "3"}) == (1, 3)
    assert shard_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}) == (2, 4)
    import torch

    from lseg.shard import shard_device

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert shard_device(cpu, {"LOCAL_RANK": "3"}) == cpu and shard_device(cuda, {}) == cuda
    assert shard_device(torch.device("cuda", 1), {"LOCAL_RANK": "3"}).index == 1
    items = list(range(10))
    shards = [take_shard(items, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == items and sum(len(s) for s in shards) == 10


@pytest.mark.parametrize("command", ["features", pytest.param("segment", marks=pytest.mark.slow)])
def test_two_ranks_split_a_folder_resume_and_merge(tmp_path, command):
    from lseg import LSeg

    model = LSeg.from_config("tiny").save_pretrained(tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(7):
        Image.fromarray(rng.integers(0, 255, (24 + index, 32, 3), dtype=np.uint8)).save(
            folder / f"im{index}.png"
        )
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lseg.cli.main", command, str(folder), "--checkpoint", str(model)]
    argv += ["--out", str(out), "--device", "cpu"] + (["--labels", "a, b"] if command == "segment" else [])

    def run_ranks() -> list[subprocess.CompletedProcess]:
        procs = [
            subprocess.Popen(
                argv,
                env=child_env(RANK=str(rank), WORLD_SIZE="2"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(2)
        ]
        return [(p.wait(), p.stderr.read()) for p in procs]

    assert all(code == 0 for code, _ in run_ranks())
    sidecars = {json.loads((out / f"im{i}.json").read_text())["image"] for i in range(7)}
    assert len(sidecars) == 7  # complete
    summary = json.loads((out / f"{command}-summary.json").read_text())
    assert summary["done"] == 7 and not summary["missing"]
    ranks = {r["rank"]: r["images"] for r in summary["ranks"]}
    assert ranks == {0: 4, 1: 3}  # disjoint shards of 7: 4 + 3

    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("im*.json")}
    (out / "im3.json").unlink()  # as if rank 1 was interrupted before finishing im3
    results = run_ranks()
    assert all(code == 0 for code, _ in results)
    assert "skipping 4" in results[0][1] and "skipping 2" in results[1][1]
    for name, mtime in stamp.items():
        if name != "im3.json":
            assert (out / name).stat().st_mtime_ns == mtime  # done images were not recomputed
    assert (out / "im3.json").is_file()
    assert json.loads((out / f"{command}-summary.json").read_text())["done"] == 7


def test_segment_shards_in_process_and_merge_by_hand(tmp_path, monkeypatch, capsys):
    from lseg import LSeg
    from lseg.cli.main import main

    model = LSeg.from_config("tiny").save_pretrained(tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(5):
        Image.fromarray(np.full((20, 24 + index, 3), 40 * index, dtype=np.uint8)).save(
            folder / f"im{index}.png"
        )
    out = tmp_path / "out"
    argv = ["segment", str(folder), "--checkpoint", str(model), "--out", str(out), "--labels", "a, b"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("im*.json")) == ["im1.json", "im3.json"]
    assert not (out / "segment-summary.json").exists()  # rank 0 has not finished
    assert main([*argv, "--merge"]) == 0
    summary = json.loads((out / "segment-summary.json").read_text())
    assert summary["done"] == 2 and summary["missing"] == ["im0", "im2", "im4"]
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 0
    summary = json.loads((out / "segment-summary.json").read_text())  # the last rank merged
    assert summary["done"] == 5 and not summary["missing"]
    assert summary["settings"]["labels"] == ["a", "b"]
