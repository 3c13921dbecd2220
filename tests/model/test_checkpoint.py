import json
import time

import pytest
import torch

from lseg import LSeg, LSegError


def test_save_and_load_round_trip(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "LSeg" and config["mean"] == [0.5, 0.5, 0.5]
    loaded = LSeg.from_pretrained(folder).eval()
    images = torch.randn(1, 3, 40, 56)
    assert torch.equal(loaded(images, ["a", "b"]), tiny_model(images, ["a", "b"]))


def test_save_is_atomic_and_overwrites(tmp_path, tiny_model, monkeypatch):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    import lseg.model.checkpoint as checkpoint

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError):
        tiny_model.save_pretrained(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing half-made
    monkeypatch.undo()
    tiny_model.save_pretrained(folder)  # overwriting an existing folder works
    assert (folder / "model.safetensors").is_file()


def test_mismatched_architecture_names_the_keys(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["features"] = 48
    config["regularizer"] = "depthwise"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LSegError, match=r"missing \(head\.regularizer.*shape mismatch \(decoder"):
        LSeg.from_pretrained(folder)


@pytest.mark.parametrize("name", ["does/not/exist", "./missing-folder", "model.ckpt"])
def test_missing_checkpoint_is_a_clear_error(name):
    with pytest.raises(LSegError, match="checkpoint not found"):
        LSeg.from_pretrained(name)


def test_unreachable_hub_repo_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(LSegError, match="cannot load model 'someone/lseg-model'"):
        LSeg.from_pretrained("someone/lseg-model")
    assert time.perf_counter() - started < 15


def test_corrupt_weights_and_foreign_checkpoints(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LSegError, match="cannot read weights"):
        LSeg.from_pretrained(folder)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(LSegError, match="neither an lseg training checkpoint nor an original LSeg"):
        LSeg.from_pretrained(foreign)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(foreign.read_bytes()[:40])
    with pytest.raises(LSegError, match="cannot read checkpoint"):
        LSeg.from_pretrained(truncated)


def test_pickled_code_is_never_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"net.x": torch.zeros(1)}, "extra": Payload()}, evil)
    with pytest.raises(LSegError, match="cannot read checkpoint"):
        LSeg.from_pretrained(evil)
