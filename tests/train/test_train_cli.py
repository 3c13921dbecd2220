"""`lseg train --ckpt_path`: checked before the Trainer writes anything, refused in one line."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from lseg.cli.main import main
from tests.conftest import REPO_ROOT

SMOKE = str(REPO_ROOT / "configs" / "smoke.yaml")


class CodeInPickle:
    """Unpickling this runs code (creates the file `pwned`): what a malicious checkpoint does."""

    def __reduce__(self):
        return (exec, ("open('pwned', 'w').close()",))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty current folder: the smoke config's relative runs/smoke would land here."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield folder


def train_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["train", "--config", SMOKE, "--trainer.enable_progress_bar", "false", *args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("form", ["--ckpt_path X", "--ckpt_path=X", "config ckpt_path: X"])
def test_missing_checkpoint_is_one_line_and_writes_nothing(work, tmp_path, capsys, form):
    if form == "--ckpt_path X":
        args = ["--ckpt_path", "missing.ckpt"]
    elif form == "--ckpt_path=X":
        args = ["--ckpt_path=missing.ckpt"]
    else:
        (tmp_path / "resume.yaml").write_text("ckpt_path: missing.ckpt\n")
        args = ["--config", str(tmp_path / "resume.yaml")]
    code, errors = train_cli(capsys, *args)
    assert code == 1
    assert errors == [errors[-1]] and errors[0].startswith("lseg: error: --ckpt_path missing.ckpt")
    assert list(work.iterdir()) == []  # no runs/, no lightning_logs/


def test_checkpoint_with_code_is_refused_without_unsafe_advice(work, capsys):
    torch.save({"state_dict": {}, "payload": CodeInPickle()}, work / "evil.ckpt")
    code, errors = train_cli(capsys, "--ckpt_path", "evil.ckpt")
    assert code == 1
    assert errors == [errors[-1]] and errors[0].startswith("lseg: error: --ckpt_path evil.ckpt")
    assert "weights_only" not in errors[0] and "can still be loaded" not in errors[0]
    assert "\x1b" not in errors[0]
    assert sorted(p.name for p in work.iterdir()) == ["evil.ckpt"]  # nothing ran, nothing written


def test_truncated_checkpoint_is_one_line(work, capsys):
    (work / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    code, errors = train_cli(capsys, "--ckpt_path", "broken.ckpt")
    assert code == 1
    assert errors == [errors[-1]] and errors[0].startswith("lseg: error: --ckpt_path broken.ckpt")
    assert sorted(p.name for p in work.iterdir()) == ["broken.ckpt"]


def test_resume_from_a_checkpoint_path_works(work, capsys, caplog):
    assert train_cli(capsys, "--trainer.default_root_dir", "run")[0] == 0
    last = work / "run" / "checkpoints" / "last.ckpt"
    args = ["--trainer.default_root_dir", "run", "--trainer.max_epochs", "2", f"--ckpt_path={last}"]
    with caplog.at_level(logging.INFO):
        assert train_cli(capsys, *args)[0] == 0
    assert f"Restored all states from the checkpoint at {last}" in caplog.text


def test_cpu_bf16_training_leaves_out_lightnings_notes_and_keeps_other_warnings(tmp_path, monkeypatch):
    """The model-summary note on bf16 and torch's LeafSpec deprecation came with every CPU run; a warning
    meant for the user (bf16 emulated by this CPU) still shows."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lseg.train.module.cpu_has_native_bfloat16", lambda: False)
    args = ["--trainer.precision", "bf16-mixed", "--trainer.enable_model_summary", "true"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--config", SMOKE, "--trainer.enable_progress_bar", "false", *args]) == 0
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "model summary" in m or "LeafSpec" in m or "in eval mode" in m]
    assert [m for m in messages if "neither AVX512-BF16 nor AMX" in m]
