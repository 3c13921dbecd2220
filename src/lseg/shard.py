"""Sharding a long list of images across processes, GPUs and nodes, without a process group.

Every rank (`torchrun`, `srun`, or plain processes with RANK / WORLD_SIZE set) sees the same sorted
input list and takes `take_shard`: items rank, rank + world, ... (disjoint, together complete). Each
image's outputs end with a json sidecar, the completion marker, so any rank can be restarted and skips
what is done. A rank that finishes writes `.lseg-shards/rank-R-of-W.json`; whichever rank finds all W
markers merges the sidecars into one summary (`merge_summary`; `--merge` does the same by hand).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lseg.errors import LSegError
from lseg.features import read_sidecar
from lseg.files import make_output_folder, write_json_atomic

T = TypeVar("T")
MARKERS = ".lseg-shards"


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from RANK / WORLD_SIZE (torchrun) or SLURM_PROCID / SLURM_NTASKS; (0, 1)."""
    env = os.environ if env is None else env
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if world_key in env:
            try:
                rank, world = int(env.get(rank_key, "0")), int(env[world_key])
            except ValueError as error:
                raise LSegError(f"{rank_key}/{world_key} must be integers: {error}") from error
            if world < 1 or not 0 <= rank < world:
                raise LSegError(
                    f"need 0 <= {rank_key} < {world_key}, got {rank_key}={rank} {world_key}={world}"
                )
            return rank, world
    return 0, 1


def shard_device(device: Any, env: Mapping[str, str] | None = None) -> Any:
    """A CUDA device without an index, under torchrun or srun: this process's GPU, cuda:LOCAL_RANK
    (SLURM_LOCALID) modulo the GPUs it sees, so ranks on one node do not share GPU 0."""
    import torch

    env = os.environ if env is None else env
    local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
    if device.type != "cuda" or device.index is not None or local is None:
        return device
    return torch.device("cuda", int(local) % max(1, torch.cuda.device_count()))


def take_shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Items rank, rank + world, ...: disjoint across ranks, complete together, balanced within one."""
    return list(items[rank::world])


def marker_path(out: Path, rank: int, world: int) -> Path:
    return Path(out) / MARKERS / f"rank-{rank}-of-{world}.json"


def start_shard(out: Path, rank: int, world: int) -> None:
    """Remove this rank's marker of an earlier run: the summary waits for this run to finish it."""
    marker_path(out, rank, world).unlink(missing_ok=True)


def finish_shard(out: Path, rank: int, world: int, record: dict[str, Any]) -> bool:
    """Write this rank's marker; True when every rank's marker is there (this rank should merge)."""
    make_output_folder(Path(out) / MARKERS)
    write_json_atomic(marker_path(out, rank, world), record)
    return all(marker_path(out, r, world).is_file() for r in range(world))


def merge_summary(out: Path, names: Sequence[str], summary_name: str, extra: dict[str, Any]) -> Path:
    """Collect the sidecars `NAME.json` of all `names` into `out/summary_name` (atomically).

    Images without a sidecar (failed or not run yet) are listed under "missing".
    """
    out = Path(out)
    records, missing = [], []
    for name in names:
        sidecar = read_sidecar(out / f"{name}.json")
        if sidecar is None:
            missing.append(name)
        else:
            records.append({"name": name, **sidecar})
    markers = sorted((out / MARKERS).glob("rank-*.json")) if (out / MARKERS).is_dir() else []
    summary = {
        **extra,
        "images": len(names),
        "done": len(records),
        "missing": missing,
        "ranks": [json.loads(m.read_text()) for m in markers],
        "records": records,
    }
    return write_json_atomic(out / summary_name, summary)
