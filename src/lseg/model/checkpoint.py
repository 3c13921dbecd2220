"""Weights on disk: our `save_pretrained` format (safetensors + config.json), hub repos, and
Lightning `.ckpt` files (ours, or the original LSeg release). Nothing is ever unpickled beyond
plain tensors and containers (`torch.load(weights_only=True)`)."""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from lseg.device import resolve_device
from lseg.errors import LSegError
from lseg.files import check_output_folder, make_output_folder, read_text, write_atomic, write_json_atomic
from lseg.model.config import LSegConfig, json_type_name
from lseg.model.hub import hub_access

if TYPE_CHECKING:
    from lseg.model.lseg import LSeg

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1  # of config.json + model.safetensors; bump when old readers would misread a folder
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
LOCAL_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors", ".json")


def save_model(model: LSeg, directory: str | Path) -> Path:
    """Write our two files into `directory`, each atomically; anything else in it is left alone.

    The weights go first and config.json last, so a folder never pairs a new config with old
    weights. A new folder is made with the user's umask; an existing one keeps its permissions.
    """
    directory = check_output_folder(directory, "model folder")
    created = not directory.exists()
    make_output_folder(directory, "model folder")
    try:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        data = serialize(state, metadata={"format": "pt"})
        del state
        write_atomic(directory / WEIGHTS_NAME, lambda file: file.write(data))
        payload = {"format_version": FORMAT_VERSION, "architecture": "LSeg", **model.config.to_dict()}
        write_json_atomic(directory / CONFIG_NAME, payload)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if still empty: never deletes anything but our own new folder
        raise
    return directory


def read_config(path: Path) -> LSegConfig:
    try:
        payload = json.loads(read_text(path, "model config"))
    except json.JSONDecodeError as error:
        raise LSegError(f"cannot read model config {path}: {error}") from error
    if not isinstance(payload, dict):
        raise LSegError(
            f"invalid model config {path}: it must be a JSON object, got {json_type_name(payload)}"
        )
    if payload.pop("architecture", "LSeg") != "LSeg":
        raise LSegError(f"{path} is not an LSeg model config")
    version = payload.pop("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise LSegError(
            f"invalid model config {path}: format_version must be a positive integer, got {version!r}"
        )
    if version > FORMAT_VERSION:
        raise LSegError(
            f"{path} has format_version {version}, newer than this lseg reads ({FORMAT_VERSION}); "
            "upgrade lseg (pip install -U lseg)"
        )
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


def _load_safetensors(cls: type[LSeg], weights_path: Path) -> LSeg:
    """Load a weights file with the config.json beside it (on the CPU; the caller moves the model)."""
    config_path = weights_path.parent / CONFIG_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise LSegError(f"{weights_path.parent} is not an LSeg model folder: {path.name} is missing")
    model = cls(read_config(config_path), load_pretrained=False)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise LSegError(f"cannot read weights {weights_path}: {error}") from error
    return load_state(model, state, str(weights_path))


def read_lightning_checkpoint(path: Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)`, allowing only argparse.Namespace beyond plain types."""
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": we report failures below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's text advises `weights_only=False`, i.e. running the file's code: never pass that on.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = (
            f"refused, it holds a Python object ({found.group(1)}) that could run code when loaded"
            if found
            else "it is not a PyTorch checkpoint of tensors and plain data"
        )
        raise LSegError(
            f"cannot read checkpoint {path}: {reason}; lseg reads only checkpoints written by lseg, "
            "Lightning or the original LSeg release"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # truncated, empty, corrupt zip
        text = str(error).strip()
        detail = text.splitlines()[0] if text else "the file is empty or truncated"
        raise LSegError(f"cannot read checkpoint {path}: {detail}") from error


def hyper_parameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Lightning stores hyper-parameters as a dict, or (Lightning 1.3) an argparse Namespace."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return dict(vars(hparams)) if not isinstance(hparams, dict) else hparams


def _load_checkpoint_file(cls: type[LSeg], path: Path) -> LSeg:
    if path.suffix == ".safetensors":
        return _load_safetensors(cls, path)
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


def _is_repo_id(text: str) -> bool:
    """`owner/name` whose owner is not a local folder (then it is a mistyped local path)."""
    owner, _, name = text.partition("/")
    return bool(REPO_ID.fullmatch(text)) and not Path(owner).is_dir() and not name.endswith(LOCAL_SUFFIXES)


def _load_from_hub(cls: type[LSeg], repo_id: str) -> LSeg:
    from huggingface_hub import hf_hub_download

    try:
        with hub_access(f"model '{repo_id}' from the Hugging Face Hub"):
            hf_hub_download(repo_id, CONFIG_NAME)
            weights_path = hf_hub_download(repo_id, WEIGHTS_NAME)
    except LSegError as error:
        raise LSegError(
            f"checkpoint not found: {repo_id} is not a local file or folder, and {error}"
        ) from error
    return _load_safetensors(cls, Path(weights_path))


def load_model(cls: type[LSeg], source: str | Path, map_location: str | torch.device = "cpu") -> LSeg:
    """A model folder, a weights or .ckpt file, or a hub repo id; the model is returned on `map_location`."""
    device = resolve_device(map_location)
    path = Path(source)
    if path.is_dir():
        model = _load_safetensors(cls, path / WEIGHTS_NAME)
    elif path.is_file():
        model = _load_checkpoint_file(cls, path)
    elif _is_repo_id(str(source)):
        model = _load_from_hub(cls, str(source))
    else:
        raise LSegError(
            f"checkpoint not found: {source} is not a local file or folder (give a model folder, a .ckpt or "
            ".safetensors file, or a Hugging Face Hub repo id owner/name)"
        )
    return model.to(device)
