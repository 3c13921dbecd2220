"""Low-level weight handling shared by every checkpoint format: reading Lightning `.ckpt` files
without running their code, strict state loading that names what differs.

Depends on nothing else in lseg.model, so both the original-checkpoint importer and the checkpoint
dispatch (lseg.model.checkpoint) build on it without importing each other.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lseg.errors import LSegError, first_line


def read_lightning_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """`torch.load(weights_only=True)`, allowing only argparse.Namespace beyond plain types.

    `mmap` maps the tensors instead of reading them: for a look at the counters of a large checkpoint.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": we report failures below
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
        detail = first_line(error, "the file is empty or truncated")
        raise LSegError(f"cannot read checkpoint {path}: {detail}") from error


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read one at a time into memory of this process, floating ones
    cast to `dtype` (if given) as they are read: a float32 copy of the weights never exists whole.

    Read with `pread` where safetensors offers it (0.8+): a memory-mapped file's pages stay resident
    until the file is closed, beside the cast copies, and the tensors of a released part of the model
    (`LSeg.release_text_encoder`) would not give their memory back while the others map the file.
    SafetensorError and OSError are the caller's to report.
    """
    try:
        handle = safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8: memory-mapped only
        handle = safe_open(str(path), framework="pt")
    state = {}
    with handle as file:
        for key in file.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensor = file.get_tensor(key)
            state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def hyper_parameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Lightning stores hyper-parameters as a dict, or (Lightning 1.3) an argparse Namespace."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return dict(vars(hparams)) if not isinstance(hparams, dict) else hparams


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Strict load (consuming `state`); a mismatch names the missing/unexpected keys and shape conflicts.

    The model may have been built with its parameters on the meta device (`empty_model`): the loaded
    tensors then *become* its parameters (`assign=True`, cast to the model's dtypes), so the weights are
    in memory once, not twice (a 12 MP `lseg segment` with vit_b16 stays within 2 GB).
    """
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
    for key in list(state):  # in place, so each original tensor is freed as soon as it is cast
        state[key] = state[key].to(expected[key].dtype)
    model.load_state_dict(state, strict=True, assign=True)  # runs load hooks (the text cache is cleared)
    state.clear()
    return model


def empty_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with its parameters on the meta device (no memory, no random init) and its buffers
    real: `load_state` then puts the checkpoint's tensors in place (accelerate's init_empty_weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()
