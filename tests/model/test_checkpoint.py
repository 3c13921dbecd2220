import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from lseg import LSeg, LSegError


def test_save_and_load_round_trip(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "LSeg" and config["mean"] == [0.5, 0.5, 0.5]
    loaded = LSeg.from_pretrained(folder).eval()
    images = torch.randn(1, 3, 40, 56)
    text = tiny_model.encode_text(["a", "b"])
    assert torch.equal(loaded(images, text).logits, tiny_model(images, text).logits)


def test_failed_save_leaves_the_previous_model_and_no_new_folder(tmp_path, tiny_model, monkeypatch):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import lseg.model.checkpoint as checkpoint

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "serialize", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny_model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary files either
    with pytest.raises(OSError):
        tiny_model.save_pretrained(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no half-made folder
    monkeypatch.undo()
    tiny_model.save_pretrained(folder)  # overwriting an existing model works
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_save_writes_only_its_own_files_and_keeps_the_folder_mode(tmp_path, tiny_model):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub" / "deep.txt").write_text("also mine")
    folder.chmod(0o755)
    tiny_model.save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "sub" / "deep.txt").read_text() == "also mine"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert LSeg.from_pretrained(folder).config == tiny_model.config


def test_new_folder_and_files_follow_the_umask(tmp_path, tiny_model):
    previous = os.umask(0o027)
    try:
        folder = tiny_model.save_pretrained(tmp_path / "a" / "model")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    for name in ("README.md", "config.json", "model.safetensors"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o640


def test_save_into_the_current_folder(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    assert tiny_model.save_pretrained(".") == Path(".")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "config.json", "keep.txt", "model.safetensors"]
    assert LSeg.from_pretrained(".").config == tiny_model.config


def test_save_refuses_an_existing_file(tmp_path, tiny_model):
    report = tmp_path / "report.txt"
    report.write_text("results")
    with pytest.raises(LSegError, match="report.txt exists and is not a folder"):
        tiny_model.save_pretrained(report)
    assert report.read_text() == "results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]


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
    with pytest.raises(LSegError, match="cannot read checkpoint") as error:
        LSeg.from_pretrained(evil)
    assert "could run code" in str(error.value) and "weights_only" not in str(error.value)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n not a checkpoint", b"", b"PK\x03\x04 cut"])
def test_foreign_files_never_repeat_torchs_unsafe_advice(tmp_path, content):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(LSegError, match="cannot read checkpoint") as error:
        LSeg.from_pretrained(path)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, tiny_model):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    folder = tiny_model.save_pretrained(tmp_path / "model")
    with pytest.raises(LSegError, match="CUDA is not available"):
        LSeg.from_pretrained(folder, device="cuda")


def _saved_config(tmp_path, tiny_model) -> tuple[Path, dict]:
    folder = tiny_model.save_pretrained(tmp_path / "model")
    return folder, json.loads((folder / "config.json").read_text())


def test_non_utf8_config_is_a_clear_error(tmp_path, tiny_model):
    folder, _ = _saved_config(tmp_path, tiny_model)
    (folder / "config.json").write_bytes('{"labels": ["caf\u00e9"]}'.encode("latin-1"))
    with pytest.raises(LSegError, match="config.json is not UTF-8"):
        LSeg.from_pretrained(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: [c], "must be a JSON object, got a list"),
        (lambda c: "LSeg", "must be a JSON object, got a str"),
        (lambda c: None, "must be a JSON object, got null"),
        (lambda c: {**c, "features": "abc"}, "features must be a positive integer, got 'abc'"),
        (lambda c: {**c, "features": -5}, "features must be a positive integer, got -5"),
        (lambda c: {**c, "features": True}, "features must be a positive integer, got True"),
        (lambda c: {**c, "image_encoder": 3}, "image_encoder must be an object, got 3"),
        (lambda c: {**c, "text_encoder": []}, "text_encoder must be an object, got"),
        (lambda c: {**c, "mean": [0.5, 0.5]}, "mean must be 3 numbers"),
        (lambda c: {**c, "std": [0.5, 0, 0.5]}, "std must be 3 positive numbers"),
        (lambda c: {**c, "labels": "cat"}, "labels must be a non-empty list of strings"),
        (lambda c: {**c, "logit_scale": "big"}, "logit_scale must be a number in"),
        (lambda c: {**c, "regularizer": "wide"}, "regularizer must be null or one of"),
        (lambda c: {**c, "use_bn": "yes"}, "use_bn must be true or false"),
        (lambda c: {**c, "text_projection": 1}, "text_projection must be true or false"),
        (lambda c: {**c, "image_encoder": {**c["image_encoder"], "hooks": [0, "a"]}}, "image_encoder.hooks"),
        (lambda c: {**c, "image_encoder": {**c["image_encoder"], "kwargs": [1]}}, "image_encoder.kwargs"),
        (
            lambda c: {**c, "image_encoder": {**c["image_encoder"], "pretrained_source": "s3"}},
            "image_encoder.pretrained_source must be one of hub, package",
        ),
        (
            lambda c: {**c, "image_encoder": {**c["image_encoder"], "colour": 1}},
            "unknown.*image_encoder.colour",
        ),
        (
            lambda c: {**c, "text_encoder": {**c["text_encoder"], "prompt_templates": "{}"}},
            "prompt_templates",
        ),
        (lambda c: {**c, "format_version": "one"}, "format_version must be a positive integer"),
    ],
)
def test_wrongly_shaped_config_names_the_field(tmp_path, tiny_model, change, message):
    folder, config = _saved_config(tmp_path, tiny_model)
    (folder / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(LSegError, match=message):
        LSeg.from_pretrained(folder)


def test_unknown_timm_kwargs_are_named(tmp_path, tiny_model):
    folder, config = _saved_config(tmp_path, tiny_model)
    config["image_encoder"]["kwargs"]["colour_depth"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LSegError, match="image_encoder.kwargs.*colour_depth"):
        LSeg.from_pretrained(folder)


def test_newer_format_version_is_refused(tmp_path, tiny_model):
    folder, config = _saved_config(tmp_path, tiny_model)
    assert config["format_version"] == 1
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(LSegError, match="format_version 2.*newer.*upgrade lseg"):
        LSeg.from_pretrained(folder)
    del config["format_version"]  # older folders: version 1
    (folder / "config.json").write_text(json.dumps(config))
    assert LSeg.from_pretrained(folder).config == tiny_model.config


def test_config_round_trips_and_presets_load():
    from lseg.model import LSegConfig, load_preset, preset_names

    for name in preset_names():
        config = load_preset(name)
        assert LSegConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_named_safetensors_file_is_the_one_loaded(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    other = LSeg.from_config("tiny")  # same architecture, other random weights
    other.save_pretrained(tmp_path / "tmp")
    os.replace(tmp_path / "tmp" / "model.safetensors", folder / "other.safetensors")
    loaded = LSeg.from_pretrained(folder / "other.safetensors")
    key = "head.project.weight"
    assert torch.equal(loaded.state_dict()[key], other.state_dict()[key])
    assert not torch.equal(loaded.state_dict()[key], tiny_model.state_dict()[key])


def test_device_is_where_the_model_lives(tmp_path, tiny_model):
    from .test_original import save_lightning, tiny_original

    folder = tiny_model.save_pretrained(tmp_path / "model")
    original = save_lightning(tiny_original(), tmp_path / "orig.ckpt")
    for source in (folder, folder / "model.safetensors", original):
        model = LSeg.from_pretrained(source, device="meta")
        assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}, source
        assert model.device.type == "meta"


def test_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    with pytest.raises(LSegError, match="checkpoint not found: ck/nope is not a local file or folder"):
        LSeg.from_pretrained("ck/nope")


def test_missing_path_that_could_be_a_repo_id_says_both(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LSegError, match="ck/nope is not a local file or folder, and .*Hugging Face Hub"):
        LSeg.from_pretrained("ck/nope")


def test_loaded_models_are_built_without_a_second_copy_of_the_weights(tmp_path, tiny_model):
    """Parameters start on the meta device and the checkpoint's tensors become them: nothing is left on
    meta, every tensor equals the saved one (cast to the model's dtype), frozen parts stay frozen."""
    folder = tiny_model.save_pretrained(tmp_path / "model")
    loaded = LSeg.from_pretrained(folder)
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert all(t.device.type == "cpu" for t in tensors.values())
    saved = tiny_model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(loaded.pad_value, tiny_model.pad_value)
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
    assert all(p.requires_grad for p in loaded.image_encoder.parameters())
    half = LSeg.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_safetensors_are_read_tensor_by_tensor_and_cast_as_read(tmp_path, tiny_model, monkeypatch):
    """`from_pretrained(dtype=...)` casts each tensor as it is read (no float32 copy of all the weights),
    read with pread where safetensors has it (a memory map's pages would stay resident until closed)."""
    import lseg.model.weights as weights

    folder = tiny_model.save_pretrained(tmp_path / "model")
    opened = []
    real_open = weights.safe_open

    def spy_open(path, framework, **options):
        opened.append(options)
        return real_open(path, framework, **options)

    monkeypatch.setattr(weights, "safe_open", spy_open)
    state = weights.read_safetensors(folder / "model.safetensors", torch.bfloat16)
    assert opened[0].get("backend") == "pread"
    assert {v.dtype for v in state.values()} == {torch.bfloat16, torch.int64}
    saved = tiny_model.state_dict()
    assert all(torch.equal(v, saved[k].to(v.dtype)) for k, v in state.items())
    model = LSeg.from_pretrained(folder, dtype="bfloat16")
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16, torch.int64}
    assert all(torch.equal(v, saved[k].to(v.dtype)) for k, v in model.state_dict().items())


def test_safetensors_without_pread_are_read_memory_mapped(tmp_path, tiny_model, monkeypatch):
    import lseg.model.weights as weights

    folder = tiny_model.save_pretrained(tmp_path / "model")
    real_open = weights.safe_open

    def old_open(path, framework, **options):  # safetensors < 0.8 has no `backend`
        if options:
            raise TypeError("safe_open() got an unexpected keyword argument 'backend'")
        return real_open(path, framework)

    monkeypatch.setattr(weights, "safe_open", old_open)
    loaded = LSeg.from_pretrained(folder)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_every_constructor_returns_eval_mode_and_forward_keeps_the_running_statistics(tmp_path, tiny_model):
    """Regression: `from_pretrained` returned a training-mode model, so the README's tensor API ran
    the decoder's BatchNorm on batch statistics and overwrote the running ones."""
    folder = tiny_model.save_pretrained(tmp_path / "model")
    for model in (
        LSeg.from_pretrained(folder),
        LSeg.from_pretrained(folder / "model.safetensors"),
        LSeg.from_config("tiny", pretrained=False),
    ):
        assert not any(module.training for module in model.modules())
    model = LSeg.from_pretrained(folder)
    running = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    assert running, "the tiny decoder has BatchNorm layers"
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    text = model.encode_text(["cat", "dog"])
    logits = model(images, text).logits
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in running.items())
    torch.testing.assert_close(logits, tiny_model(images, text).logits)


def test_the_decoder_memory_check_counts_the_fusion_blocks_weights():
    """The config's refusal of a too wide decoder counts the weights DPTDecoder allocates."""
    from lseg.model.dpt import DPTDecoder, fusion_weight_count

    decoder = DPTDecoder([8, 16, 32, 32], features=24)
    weights = sum(p.numel() for name, p in decoder.fusion.named_parameters() if name.endswith("conv1.weight")
                  or name.endswith("conv2.weight") or name.endswith("out_conv.weight"))  # fmt: skip
    assert fusion_weight_count(24) == weights
