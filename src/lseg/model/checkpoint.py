"""Weights on disk: our `save_pretrained` format (safetensors + config.json), hub repos, and
Lightning `.ckpt` files (ours, or the original LSeg release). Nothing is ever unpickled beyond
plain tensors and containers (`torch.load(weights_only=True)`).

Every reader returns data (a config and a state dict); `LSeg.from_pretrained` builds the model, so
this module never needs the model class.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import save as serialize

from lseg.errors import LSegError
from lseg.files import check_output_folder, make_output_folder, read_text, write_atomic, write_json_atomic
from lseg.model.config import LSegConfig, json_type_name
from lseg.model.hub import hub_access
from lseg.model.original import convert_state_dict
from lseg.model.weights import hyper_parameters, read_lightning_checkpoint, read_safetensors

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1  # of config.json + model.safetensors; bump when old readers would misread a folder
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
LOCAL_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors", ".json")

Loaded = tuple[LSegConfig, dict[str, torch.Tensor], str]  # config, state dict, source named in errors


def save_model(directory: str | Path, config: LSegConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write our two files into `directory`, each atomically; anything else in it is left alone.

    The weights go first and config.json last, so a folder never pairs a new config with old
    weights. A new folder is made with the user's umask; an existing one keeps its permissions.
    """
    directory = check_output_folder(directory, "model folder")
    created = not directory.exists()
    make_output_folder(directory, "model folder")
    try:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        data = serialize(state, metadata={"format": "pt"})
        del state
        write_atomic(directory / WEIGHTS_NAME, lambda file: file.write(data))
        payload = {"format_version": FORMAT_VERSION, "architecture": "LSeg", **config.to_dict()}
        write_json_atomic(directory / CONFIG_NAME, payload)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if still empty: never deletes anything but our own new folder
        raise
    return directory


def is_model_folder(path: str | Path) -> bool:
    """A local `save_pretrained` folder (config.json and model.safetensors)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


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
    return LSegConfig.from_saved(payload)


def _read_safetensors(weights_path: Path, dtype: torch.dtype | None = None) -> Loaded:
    """A weights file with the config.json beside it, read on the CPU (floating tensors cast to `dtype`
    as they are read)."""
    config_path = weights_path.parent / CONFIG_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise LSegError(f"{weights_path.parent} is not an LSeg model folder: {path.name} is missing")
    config = read_config(config_path)
    try:
        state = read_safetensors(weights_path, dtype)
    except (SafetensorError, OSError) as error:
        raise LSegError(f"cannot read weights {weights_path}: {error}") from error
    return config, state, str(weights_path)


def _read_checkpoint_file(path: Path, dtype: torch.dtype | None) -> Loaded:
    if path.suffix == ".safetensors":
        return _read_safetensors(path, dtype)
    checkpoint = read_lightning_checkpoint(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise LSegError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = hyper_parameters(checkpoint)
    if any(k.startswith("net.") for k in state):
        return (*convert_state_dict(state, hparams, str(path)), str(path))
    model_config = hparams.get("model_config")
    if not isinstance(model_config, dict) or not any(k.startswith("model.") for k in state):
        raise LSegError(f"{path} is neither an lseg training checkpoint nor an original LSeg checkpoint")
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return LSegConfig.from_saved(model_config), weights, str(path)


def _is_repo_id(text: str) -> bool:
    """`owner/name` whose owner is not a local folder (then it is a mistyped local path)."""
    owner, _, name = text.partition("/")
    return bool(REPO_ID.fullmatch(text)) and not Path(owner).is_dir() and not name.endswith(LOCAL_SUFFIXES)


def _download(repo_id: str, revision: str | None, **options: Any) -> Path:
    """config.json and model.safetensors of a hub repo (through the hub cache); the weights' path."""
    options["revision"] = revision
    what = f"model '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        with hub_access(f"{what} from the Hugging Face Hub"):
            hf_hub_download(repo_id, CONFIG_NAME, **options)
            return Path(hf_hub_download(repo_id, WEIGHTS_NAME, **options))
    except LSegError as error:
        raise LSegError(
            f"checkpoint not found: {repo_id} is not a local file or folder, and {error}"
        ) from error


def read_checkpoint(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    dtype: torch.dtype | None = None,
) -> Loaded:
    """Config and state dict of a model folder, a weights or .ckpt file, or a hub repo id.

    The hub options apply to repo ids only; downloads go through the Hugging Face cache. `dtype`: the
    floating tensors of safetensors files are cast to it one by one as they are read (a .ckpt is
    read whole by torch.load; `load_state` casts it).
    """
    path = Path(source)
    if path.is_dir():
        return _read_safetensors(path / WEIGHTS_NAME, dtype)
    if path.is_file():
        return _read_checkpoint_file(path, dtype)
    if _is_repo_id(str(source)):
        weights = _download(
            str(source), revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        return _read_safetensors(weights, dtype)
    raise LSegError(
        f"checkpoint not found: {source} is not a local file or folder (give a model folder, a .ckpt or "
        ".safetensors file, or a Hugging Face Hub repo id owner/name)"
    )
