"""What `lseg train` shows while it runs: a live bar on a terminal, lines in a log (seconds each)."""

from __future__ import annotations

import re
import warnings

import lightning as L
import pytest

from lseg.cli.main import main
from lseg.train import console
from lseg.train.console import LineProgress
from lseg.train.module import LSegModule
from tests.conftest import REPO_ROOT
from tests.train.test_training import data

SMOKE = str(REPO_ROOT / "configs" / "smoke.yaml")
STEP_BUDGET = ["--trainer.max_epochs", "-1", "--trainer.max_steps", "6"]  # 4 steps an epoch: ends in epoch 1
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(autouse=True)
def _work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def train(capsys, *args: str) -> list[str]:
    assert main(["train", "--config", SMOKE, "--trainer.enable_model_summary", "false", *args]) == 0
    return ANSI.sub("", capsys.readouterr().out).splitlines()


def test_a_terminal_bar_counts_steps_out_of_max_steps(capsys, monkeypatch):
    """Budgeted in steps (`max_epochs: -1`), Lightning's bar read "Epoch 1/-2" and counted the epoch's
    batches."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # stdout is a terminal, as far as rich can tell
    shown = "\n".join(train(capsys, *STEP_BUDGET))
    assert "Epoch 1, step" in shown and re.search(r"Epoch 1, step\s+\S+ 6/6 ", shown)
    assert "/-2" not in shown


def test_a_log_gets_progress_lines(capsys, monkeypatch):
    """stdout a file (CI, sbatch): rich's live bar printed nothing until training ended."""
    monkeypatch.setattr(console, "LINE_INTERVAL_S", 0.0)  # a line at every step
    lines = train(capsys, *STEP_BUDGET)
    assert lines[0] == "training for 6 steps, from step 0; a line every 0 s"
    steps = [int(m[1]) for line in lines if (m := re.match(r"step (\d)/6 \(epoch \d\): train/loss ", line))]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [line.split(":")[0] for line in lines if line.startswith("validated")] == [
        "validated at step 4/6 (epoch 0)",
        "validated at step 6/6 (epoch 1)",  # the final weights, scored for the model card
    ]
    assert re.fullmatch(r"training ended at step 6/6 \(epoch 1\) after \d:\d\d:\d\d", lines[-1])


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TenSecondSteps(L.Callback):
    """Every training step takes ten seconds of `clock`."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args) -> None:
        self.clock.now += 10


def test_a_line_comes_every_30_seconds_with_the_time_left(tmp_path, capsys):
    clock = FakeClock()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=-1,
        max_steps=10,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[TenSecondSteps(clock), LineProgress(interval=30, clock=clock)],
    )
    trainer.fit(LSegModule(model="tiny", pretrained=False), datamodule=data())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "training for 10 steps, from step 0; a line every 30 s"
    times = [re.search(r"^step (\d+)/10 \(epoch (\d)\): .*\((.*)\)$", line) for line in lines[1:-1]]
    assert [m.groups() for m in times] == [
        ("3", "0", "0:00:30 elapsed, about 0:01:10 left"),
        ("6", "1", "0:01:00 elapsed, about 0:00:40 left"),
        ("9", "2", "0:01:30 elapsed, about 0:00:10 left"),
    ]
    assert lines[-1] == "training ended at step 10/10 (epoch 2) after 0:01:40"
