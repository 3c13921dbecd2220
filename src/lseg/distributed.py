"""The one owner of torch.distributed process groups: this process's rank, gathering across ranks,
and the device (and group) of a `torchrun` evaluation. Sharding without a group is `lseg.shard`'s."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from lseg.device import resolve_device


def is_distributed() -> bool:
    """Whether a process group is set up (by `distributed_device`, Lightning or the caller)."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_main_process() -> bool:
    """Whether this process writes reports: rank 0, or the only process."""
    return rank_world()[0] == 0


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects; `[obj]` without a process group)."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def distributed_device(requested: str | torch.device = "auto") -> Iterator[torch.device]:
    """The device of this process; under `torchrun` (WORLD_SIZE > 1) the process group is set up for
    the block (cuda:LOCAL_RANK, nccl; or gloo on CPU) and torn down after it."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if is_distributed():  # the caller owns the group
        if requested == "auto" and torch.cuda.is_available():
            yield torch.device("cuda", local_rank)
        else:
            yield resolve_device(requested)
        return
    device = resolve_device(requested)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()
