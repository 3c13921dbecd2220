"""benchmarks/training_curves.py: the curves docs/results.md quotes come from the run's own log."""

import json
import subprocess
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "training_curves.py"


def run(log: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(log), str(out)], capture_output=True, text=True)


def test_curves_are_read_from_the_tensorboard_log(tmp_path):
    log = tmp_path / "version_0"
    with SummaryWriter(log) as writer:
        for step in range(0, 30, 10):
            writer.add_scalar("train/loss", 2.0 - step / 20, step)
        writer.add_scalar("val/miou", 0.25, 29)
    out = tmp_path / "curves.png"
    done = run(log, out)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads(out.with_suffix(".json").read_text())
    assert [p["step"] for p in curves["train/loss"]] == [0, 10, 20]
    assert curves["train/loss"][-1]["value"] == 1.0 and curves["val/miou"] == [{"step": 29, "value": 0.25}]
    missing = run(tmp_path, out)
    assert missing.returncode != 0 and "no TensorBoard event file" in missing.stderr
