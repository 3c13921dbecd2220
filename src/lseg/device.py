"""The one owner of turning a user's device choice into a usable torch.device."""

from __future__ import annotations

import os

import torch

from lseg.errors import LSegError

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def physical_memory() -> int | None:
    """Bytes of RAM this machine has; None where the OS does not say (`os.sysconf` is POSIX only)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(count: float) -> str:
    """`count` bytes in binary units, e.g. "23.4 GiB"."""
    unit = 0
    while count >= 1024 and unit < len(BYTE_UNITS) - 1:
        count, unit = count / 1024, unit + 1
    return f"{count:.0f} {BYTE_UNITS[unit]}" if unit == 0 else f"{count:.1f} {BYTE_UNITS[unit]}"


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
