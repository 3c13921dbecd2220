"""`lseg quickstart --out`: never delete what it did not write; refuse a bad --out before training.

Training and evaluation are replaced by fakes (a tiny random model), so each test takes a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lseg.cli.main import main
from lseg.train import quickstart

OUTPUTS = ["metrics.json", "metrics.md", "curves.png", "model/model.safetensors", "model/config.json"]


class FakeTrainer:
    """Stands in for lightning.Trainer: records that training started, trains nothing."""

    runs: list[dict] = []

    def __init__(self, **options) -> None:
        self.options = options
        self.global_step = 0

    def fit(self, module, datamodule=None) -> None:
        FakeTrainer.runs.append(self.options)


@pytest.fixture
def trained(monkeypatch, tiny_model):
    """Fake training: returns the list of Trainer options of every training run."""
    FakeTrainer.runs = []
    monkeypatch.setattr(quickstart.L, "Trainer", FakeTrainer)
    monkeypatch.setattr(quickstart, "choose_text_encoder", lambda: ({"type": "open_clip"}, "fake"))
    monkeypatch.setattr(quickstart, "LSegModule", lambda **options: SimpleNamespace(model=tiny_model))
    scores = {"miou": 0.5, "pixel_accuracy": 0.75, "per_class_iou": [0.5] * 6}
    monkeypatch.setattr(quickstart, "evaluate", lambda model, scenes, labels: scores)
    return FakeTrainer.runs


def quickstart_cli(out: str | Path, capsys) -> tuple[int, list[str]]:
    code = main(["quickstart", "--out", str(out), "--steps", "2"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_rerun_replaces_only_its_own_files(tmp_path, trained, capsys):
    out = tmp_path / "results"
    assert quickstart_cli(out, capsys) == (0, [])
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["generator"] == quickstart.GENERATOR
    (out / "notes.txt").write_text("mine")
    (out / "overlays" / "my-drawing.png").write_bytes(b"mine")
    (out / "overlays" / "scene0.names.png").write_bytes(b"stale")
    assert quickstart_cli(out, capsys) == (0, [])
    assert len(trained) == 2
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "overlays" / "my-drawing.png").read_bytes() == b"mine"
    assert (out / "overlays" / "scene0.names.png").read_bytes().startswith(b"\x89PNG")  # ours: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no staging folder left beside it
    assert not [p for p in out.rglob(".*")]  # no temporary files left inside


@pytest.mark.parametrize("kind", ["file", "foreign folder", "under a file"])
def test_refuses_a_bad_out_before_training(tmp_path, trained, capsys, kind):
    if kind == "file":
        out = tmp_path / "report.pdf"
        out.write_text("precious")
    elif kind == "foreign folder":
        out = tmp_path / "thesis"
        out.mkdir()
        (out / "chapter1.tex").write_text("precious")
        (out / "metrics.json").write_text('{"written by": "someone else"}')
    else:
        (tmp_path / "report.pdf").write_text("precious")
        out = tmp_path / "report.pdf" / "results"
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    code, errors = quickstart_cli(out, capsys)
    assert code == 1 and len(errors) == 1 and errors[0].startswith("lseg: error: --out")
    assert trained == []  # refused before training started
    after = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    assert after == before


def test_out_dot_in_an_empty_folder(tmp_path, trained, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert quickstart_cli(".", capsys) == (0, [])
    for name in OUTPUTS:
        assert (work / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert quickstart_cli(".", capsys) == (0, [])  # and again: now an earlier quickstart output


def test_trainer_scratch_stays_out_of_the_users_folders(tmp_path, trained, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert quickstart_cli(tmp_path / "results", capsys) == (0, [])
    scratch = Path(trained[0]["default_root_dir"]).resolve()
    assert tmp_path.resolve() not in scratch.parents
    assert not scratch.exists()  # removed after training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_training_is_budgeted_in_steps_not_time(tmp_path, trained, capsys):
    """A step budget gives the same model on a busy and an idle machine; a time budget does not."""
    assert quickstart_cli(tmp_path / "out", capsys) == (0, [])
    assert trained[-1]["max_steps"] == 2 and "max_time" not in trained[-1]


def test_a_log_gets_progress_lines_not_a_bar_drawn_at_the_end(tmp_path, trained, capsys):
    """stdout captured, as in CI or `lseg quickstart > log`: Lightning's bar printed nothing for minutes."""
    from lseg.train.console import LineProgress

    assert quickstart_cli(tmp_path / "out", capsys) == (0, [])
    assert [type(c) for c in trained[-1]["callbacks"] if isinstance(c, LineProgress)] == [LineProgress]


def test_quickstart_scores_are_the_one_scorers(tiny_model):
    """The quickstart's numbers are `SegmentationMetrics` of the model's predictions, keys unchanged."""
    import torch

    from lseg.data import SYNTHETIC_CLASS_NAMES, SyntheticStreetScenes, eval_transform
    from lseg.evaluate.metrics import SegmentationMetrics

    processor = tiny_model.processor
    scenes = SyntheticStreetScenes(2, size=(32, 48), seed=3, transform=eval_transform(processor))
    labels = list(SYNTHETIC_CLASS_NAMES)
    metric = SegmentationMetrics(len(labels))
    text = tiny_model.encode_text(labels)
    with torch.inference_mode():
        for index in range(len(scenes)):
            sample = scenes[index]
            image = sample["image"].as_subclass(torch.Tensor)[None]
            metric.update(tiny_model(image, text).logits, sample["mask"].as_subclass(torch.Tensor)[None])
    expected = metric.compute()
    del expected["per_class_accuracy"]
    assert quickstart.evaluate(tiny_model, scenes, labels) == expected
