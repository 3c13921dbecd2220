"""`lseg features`: dense, normalised per-pixel LSeg embeddings for 3D and retrieval pipelines.

One image at a time (bounded memory for any number of images), one `NAME.npy`/`NAME.pt` array plus a
`NAME.json` sidecar per image, both written atomically, the sidecar last: an image counts as done when
both files exist, so an interrupted run resumes where it stopped. See docs/features.md.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lseg.errors import LSegError

FORMATS = ("npy", "pt")
DTYPES = ("float16", "float32")
GRIDS = ("model", "image")
# Sidecar fields that must agree before an existing output is reused on resume.
SETTINGS = ("protocol", "size", "feature_grid", "dtype", "format", "checkpoint", "preset")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from lseg.inference import PROTOCOLS

    parser = subparsers.add_parser(
        "features",
        help="dense per-pixel embeddings (for OpenScene, VLMaps, retrieval)",
        description="Write one L2-normalised D x h x w feature array per image (NAME.npy or NAME.pt) and "
        "NAME.json with image size, feature size, feature stride, protocol, dtype and checkpoint. "
        "Images are processed one at a time; images whose array and json both exist are skipped, so an "
        "interrupted run can simply be restarted.",
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
    parser.add_argument("--dtype", default="float16", choices=DTYPES, help="stored dtype (default float16)")
    parser.add_argument("--format", default="npy", choices=FORMATS, help="npy (default) or pt (torch)")
    parser.add_argument(
        "--overwrite", action="store_true", help="recompute every image even if its outputs exist"
    )
    from lseg.cli.common import add_model_arguments

    add_model_arguments(parser)
    parser.set_defaults(run=run)


# --------------------------------------------------------------------------- extraction
def model_input_size(protocol, height: int, width: int) -> tuple[int, int]:
    """Resolution the model sees at scale 1 for an input of this size under `protocol`."""
    from lseg.inference import scaled_size

    if protocol.base_size is None:
        return height, width
    return scaled_size(height, width, protocol.base_size)


def extract_features(
    model, image: np.ndarray, protocol: str = "single", size: int | None = None, feature_grid: str = "model"
) -> tuple[Any, dict[str, Any]]:
    """One image -> (D x h x w float32 tensor normalised over D, geometry metadata).

    `size` is the long side at scale 1: it resizes the input for protocols without a base size
    (single, slide) and replaces the base size of the others (openscene, lseg-ms). `feature_grid`
    "model" returns half the scale-1 resolution (what `LSeg.encode_image` gives for single),
    "image" half the original image resolution.
    """
    import torch
    import torch.nn.functional as F

    from lseg.inference import resolve_protocol, run_protocol

    if feature_grid not in GRIDS:
        raise LSegError(f"unknown feature grid {feature_grid!r}; choose one of: {', '.join(GRIDS)}")
    spec, size = resolve_protocol(protocol, size)
    height, width = image.shape[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            pixel_values = model.preprocess(image, size)
            input_size = tuple(pixel_values.shape[-2:])
            seen = model_input_size(spec, *input_size)
            grid_of = (height, width) if feature_grid == "image" else seen
            target = ((grid_of[0] + 1) // 2, (grid_of[1] + 1) // 2)
            features = run_protocol(
                model.pixel_embeddings, pixel_values, spec, out_size=target, amp=model.device.type == "cuda"
            )
            features = F.normalize(features.float(), dim=1)[0]
    finally:
        model.train(was_training)
    meta = {
        "image_size": [height, width],
        "model_size": list(seen),
        "feature_size": list(target),
        "feature_stride": [height / target[0], width / target[1]],
        "embed_dim": int(features.shape[0]),
        "protocol_params": {
            "base_size": spec.base_size,
            "crop_size": spec.crop_size,
            "stride": spec.stride,
            "scales": list(spec.scales),
            "flip": spec.flip,
        },
    }
    return features, meta


# --------------------------------------------------------------------------- files
def save_features(array: np.ndarray, meta: dict[str, Any], out: Path, name: str, fmt: str) -> None:
    """Array first, then the json sidecar (the completion marker)."""
    from lseg.files import save_array, write_atomic, write_json_atomic

    array_path = out / f"{name}.{fmt}"
    if fmt == "npy":
        save_array(array, array_path)
    else:
        import torch

        write_atomic(array_path, lambda f: torch.save(torch.from_numpy(array), f))
    write_json_atomic(out / f"{name}.json", {**meta, "array": array_path.name})


def load_features(path: str | Path) -> np.ndarray:
    """A D x h x w array from `.npy` (memory-mapped) or `.pt`; LSegError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LSegError(f"feature file not found: {path}")
    try:
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        elif path.suffix == ".pt":
            import torch

            tensor = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise LSegError(f"{path} does not hold a single tensor")
            array = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        else:
            raise LSegError(f"unsupported feature file {path}: expected .npy or .pt")
    except LSegError:
        raise
    except Exception as error:  # numpy/torch raise many types for truncated or foreign files
        raise LSegError(f"cannot read features {path}: {str(error).splitlines()[0]}") from error
    if array.ndim != 3:
        raise LSegError(f"{path} holds shape {tuple(array.shape)}; expected D x h x w features")
    return array


def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


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
    from lseg.files import check_output_folder, make_output_folder
    from lseg.images import check_model_size, find_images, load_image

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
    settings = {
        "protocol": args.protocol,
        "size": args.size,
        "feature_grid": args.feature_grid,
        "dtype": args.dtype,
        "format": args.format,
        "checkpoint": checkpoint_id(args.checkpoint),
        "preset": args.preset,
    }

    todo: list[tuple[Path, str]] = []
    skipped = 0
    for path, name in zip(paths, names):
        sidecar = out / f"{name}.json"
        if not args.overwrite and sidecar.is_file() and (out / f"{name}.{args.format}").is_file():
            meta = read_sidecar(sidecar)
            if meta is not None:
                differing = [k for k in SETTINGS if meta.get(k) != settings[k]]
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
    if skipped:
        console.print(f"skipping {skipped} image(s) whose features already exist in {out}")
    if not todo:
        console.print(f"nothing to do: all {len(paths)} image(s) are done")
        return 0

    model = load_model_from_args(args)
    dtype = torch.float16 if args.dtype == "float16" else torch.float32
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
    raise_failures(failed, len(todo))
    return 0
