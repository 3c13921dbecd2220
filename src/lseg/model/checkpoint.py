"""Weights on disk: our `save_pretrained` format (safetensors + config.json), hub repos, and
Lightning `.ckpt` files (ours, or the original LSeg release). Nothing is ever unpickled beyond
plain tensors and containers (`torch.load(weights_only=True)`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lseg.errors import LSegError
from lseg.model.config import LSegConfig
from lseg.model.hub import hub_access

if TYPE_CHECKING:
    from lseg.model.lseg import LSeg

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def atomic_directory(directory: Path) -> tuple[Path, callable]:
    """A temporary sibling folder and a `commit()` that swaps it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))

    def commit() -> None:
        if directory.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, backup / "old")
            os.replace(staging, directory)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, directory)

    return staging, commit


def save_model(model: LSeg, directory: str | Path) -> Path:
    directory = Path(directory)
    staging, commit = atomic_directory(directory)
    try:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        payload = {"format_version": FORMAT_VERSION, "architecture": "LSeg", **model.config.to_dict()}
        (staging / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        commit()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_config(path: Path) -> LSegConfig:
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LSegError(f"cannot read model config {path}: {error}") from error
    if payload.pop("architecture", "LSeg") != "LSeg":
        raise LSegError(f"{path} is not an LSeg model config")
    payload.pop("format_version", None)
    return LSegConfig.from_dict(payload)


def load_state(model: LSeg, state: dict[str, torch.Tensor], source: str) -> LSeg:
    """Strict load; a mismatch names the missing/unexpected keys and shape conflicts."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{len(keys)} {title} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
        raise LSegError(f"checkpoint {source} does not match the model architecture: {'; '.join(parts)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model


def _load_folder(cls: type[LSeg], folder: Path, map_location: Any) -> LSeg:
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise LSegError(f"{folder} is not an LSeg model folder: {path.name} is missing")
    model = cls(read_config(config_path), load_pretrained=False)
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise LSegError(f"cannot read weights {weights_path}: {error}") from error
    return load_state(model, state, str(weights_path))


def read_lightning_checkpoint(path: Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)`, allowing only argparse.Namespace beyond plain types."""
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated/foreign/unsafe files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LSegError(f"cannot read checkpoint {path}: {first_line}") from error


def hyper_parameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Lightning stores hyper-parameters as a dict, or (Lightning 1.3) an argparse Namespace."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return dict(vars(hparams)) if not isinstance(hparams, dict) else hparams


def _load_checkpoint_file(cls: type[LSeg], path: Path, map_location: Any) -> LSeg:
    if path.suffix == ".safetensors":
        return _load_folder(cls, path.parent, map_location)
    checkpoint = read_lightning_checkpoint(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise LSegError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    if any(k.startswith("net.") for k in state):
        from lseg.model.original import load_original

        return load_original(cls, state, str(path), hyper_parameters(checkpoint))
    hparams = hyper_parameters(checkpoint)
    model_config = hparams.get("model_config")
    if model_config is None or not any(k.startswith("model.") for k in state):
        raise LSegError(f"{path} is neither an lseg training checkpoint nor an original LSeg checkpoint")
    model = cls.from_config(model_config, pretrained=False)
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return load_state(model, weights, str(path))


def load_model(cls: type[LSeg], source: str | Path, map_location: Any = "cpu") -> LSeg:
    path = Path(source)
    if path.is_dir():
        return _load_folder(cls, path, map_location)
    if path.is_file():
        return _load_checkpoint_file(cls, path, map_location)
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or path.suffix in (".ckpt", ".pt", ".pth", ".safetensors")
    if looks_local or text.count("/") != 1:
        raise LSegError(
            f"checkpoint not found: {source} (give a model folder, a .ckpt file or a hub repo id)"
        )
    from huggingface_hub import hf_hub_download

    with hub_access(f"model '{text}' from the Hugging Face Hub"):
        config_path = hf_hub_download(text, CONFIG_NAME)
        hf_hub_download(text, WEIGHTS_NAME)
    return _load_folder(cls, Path(config_path).parent, map_location)
