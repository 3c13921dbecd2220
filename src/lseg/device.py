"""The one owner of turning a user's device choice into a usable torch.device."""

from __future__ import annotations

import torch

from lseg.errors import LSegError


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`, a torch.device; LSegError when unusable."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise LSegError(f"invalid device '{name}' (use auto, cpu, cuda or cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LSegError(f"device '{name}' was requested but CUDA is not available here; use cpu instead")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LSegError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device
