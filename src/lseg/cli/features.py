"""`lseg features`: dense, normalised per-pixel LSeg embeddings for 3D and retrieval pipelines.

One image at a time (bounded memory for any number of images), one `NAME.npy`/`NAME.pt` array plus a
`NAME.json` sidecar per image, both written atomically, the sidecar last: an image counts as done when
both files exist, so an interrupted run resumes where it stopped. See docs/features.md.
"""

from __future__ import annotations

import argparse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lseg.errors import LSegError

FORMATS = ("npy", "pt")
DTYPES = ("float16", "float32")
# Sidecar fields that must agree before an existing output is reused on resume.
SETTINGS = ("protocol", "size", "feature_grid", "dtype", "format", "checkpoint", "preset")
# Compared only when the sidecar has it (older sidecars do not).
OPTIONAL_SETTINGS = ("compute_dtype",)
SUMMARY = "features-summary.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from lseg.features import GRIDS
    from lseg.inference import PROTOCOLS

    parser = subparsers.add_parser(
        "features",
        help="dense per-pixel embeddings (for OpenScene, VLMaps, retrieval)",
        description="Write one L2-normalised D x h x w feature array per image (NAME.npy or NAME.pt) and "
        "NAME.json with image size, feature size, feature stride, protocol, dtype and checkpoint. "
        "Images are processed one at a time; images whose array and json both exist are skipped, so an "
        "interrupted run can simply be restarted. Under torchrun (or with RANK/WORLD_SIZE set) each process "
        "takes a disjoint shard of the inputs; the last one to finish writes features-summary.json.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--protocol",
        default="single",
        choices=list(PROTOCOLS),
        help="inference protocol (default single; openscene = OpenScene's 640 px pass with flip)",
    )
    parser.add_argument(
        "--size",
        type=int,
        help="long side (pixels, 8 to 4096) the model sees at scale 1: resizes the input for single/slide, "
        "replaces "
        "the base size of openscene (640, its crop follows, like OpenScene's img_long_side) and "
        "lseg-ms (520)",
    )
    parser.add_argument(
        "--feature-grid",
        default="model",
        choices=GRIDS,
        help="model (default): half the resolution the model saw (stride 2 there); image: half the "
        "original image resolution (stride 2 in original pixels, can be large)",
    )
    parser.add_argument(
        "--save-dtype", default="float16", choices=DTYPES, help="stored dtype (default float16)"
    )
    parser.add_argument("--format", default="npy", choices=FORMATS, help="npy (default) or pt (torch)")
    parser.add_argument(
        "--overwrite", action="store_true", help="recompute every image even if its outputs exist"
    )
    parser.add_argument(
        "--merge", action="store_true", help="only merge the inputs' NAME.json into features-summary.json"
    )
    from lseg.cli.common import add_compile_argument, add_model_arguments

    add_model_arguments(parser)
    add_compile_argument(parser)
    parser.set_defaults(run=run)


# --------------------------------------------------------------------------- names
def checkpoint_id(checkpoint: str | None) -> str | None:
    """Local checkpoints as absolute paths (so resume and `lseg query` find them), hub ids as given."""
    if checkpoint is None or not Path(checkpoint).exists():
        return checkpoint
    return str(Path(checkpoint).resolve())


def output_name(path: Path) -> str:
    return path.stem


# --------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from lseg import __version__
    from lseg.cli.common import load_model_from_args, raise_failures
    from lseg.features import extract_features, read_sidecar, save_features
    from lseg.files import check_output_folder, make_output_folder
    from lseg.images import check_model_size, find_images, load_image
    from lseg.shard import merge_summary, shard_from_env, start_shard, take_shard

    check_model_size(args.size)
    if not args.checkpoint and not args.preset:
        raise LSegError("give --checkpoint DIR_OR_ID (a trained model) or --preset NAME")
    paths = find_images(args.inputs)
    names = [output_name(p) for p in paths]
    seen: set[str] = set()
    for path, name in zip(paths, names):
        if name in seen:
            raise LSegError(
                f"several inputs are named '{name}' ({path}); outputs would overwrite each other "
                "(use one --out per folder)"
            )
        seen.add(name)
    out = check_output_folder(args.out)
    if args.merge:
        print(f"lseg features: merged {merge_summary(out, names, SUMMARY, {'command': 'features'})}")
        return 0
    rank, world = shard_from_env()
    settings = {
        "protocol": args.protocol,
        "size": args.size,
        "feature_grid": args.feature_grid,
        "dtype": args.save_dtype,
        "compute_dtype": args.dtype,
        "format": args.format,
        "checkpoint": checkpoint_id(args.checkpoint),
        "preset": args.preset,
    }

    todo: list[tuple[Path, str]] = []
    skipped = 0
    mine = take_shard(list(zip(paths, names)), rank, world)
    for path, name in mine:
        sidecar = out / f"{name}.json"
        if not args.overwrite and sidecar.is_file() and (out / f"{name}.{args.format}").is_file():
            meta = read_sidecar(sidecar)
            if meta is not None:
                checked = SETTINGS + tuple(k for k in OPTIONAL_SETTINGS if k in meta)
                differing = [k for k in checked if meta.get(k) != settings[k]]
                if differing:
                    key = differing[0]
                    raise LSegError(
                        f"{sidecar} was written with {key}={meta.get(key)!r}, this run uses "
                        f"{settings[key]!r}; use another --out or pass --overwrite"
                    )
                skipped += 1
                continue
        todo.append((path, name))
    console = Console(stderr=True)
    if world > 1:
        start_shard(out, rank, world)
        console.print(f"rank {rank} of {world}: {len(mine)} image(s) in this shard")
    if skipped:
        console.print(f"skipping {skipped} image(s) whose features already exist in {out}")
    if not todo:
        console.print(f"nothing to do: all {len(mine)} image(s) are done")
        _finish(out, rank, world, names, settings, len(mine), 0)
        return 0

    model = load_model_from_args(args)
    dtype = torch.float16 if args.save_dtype == "float16" else torch.float32
    failed: list[str] = []

    def load(path: Path) -> np.ndarray | LSegError:
        try:
            return np.require(load_image(path), requirements="W")  # torch wants writable arrays
        except LSegError as error:
            return error

    # One image decoded ahead and one array being written behind the model: bounded memory.
    with (
        ThreadPoolExecutor(1) as loader,
        ThreadPoolExecutor(1) as writer,
        Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[current]}"),
            console=console,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task("features", total=len(todo), current="")
        pending_image: Future = loader.submit(load, todo[0][0])
        pending_write: Future | None = None
        for index, (path, name) in enumerate(todo):
            image = pending_image.result()
            if index + 1 < len(todo):
                pending_image = loader.submit(load, todo[index + 1][0])
            progress.update(task, current=path.name)
            if isinstance(image, LSegError):
                failed.append(str(image))
                progress.advance(task)
                continue
            features, meta = extract_features(model, image, args.protocol, args.size, args.feature_grid)
            del image
            array = features.to(dtype).cpu().numpy()
            del features
            meta = {
                "image": str(path.resolve()),
                **meta,
                **settings,
                "normalized": True,
                "lseg_version": __version__,
            }
            if pending_write is not None:
                pending_write.result()
            make_output_folder(out)
            pending_write = writer.submit(save_features, array, meta, out, name, args.format)
            progress.advance(task)
        if pending_write is not None:
            pending_write.result()
    done = len(todo) - len(failed)
    Console().print(
        f"lseg features: {done} written, {skipped} skipped (already done), {len(failed)} failed -> {out}"
    )
    _finish(out, rank, world, names, settings, len(mine), len(failed))
    raise_failures(failed, len(todo))
    return 0


def _finish(
    out: Path, rank: int, world: int, names: list[str], settings: dict, mine: int, failed: int
) -> None:
    """Mark this rank done; the rank that finds every rank done merges the summary."""
    from lseg.shard import finish_shard, merge_summary

    if world > 1 and out.is_dir():
        record = {"rank": rank, "world_size": world, "images": mine, "failed": failed}
        if finish_shard(out, rank, world, record):
            merge_summary(out, names, SUMMARY, {"command": "features", "settings": settings})
