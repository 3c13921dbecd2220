"""`lseg features`: dense, normalised per-pixel LSeg embeddings for 3D and retrieval pipelines.

One image at a time (bounded memory for any number of images), one `NAME.npy`/`NAME.pt` array plus a
`NAME.json` sidecar per image, both written atomically, the sidecar last: an image counts as done when
its sidecar records this run's settings (the rule of `lseg segment`, `lseg.predictor`), so an
interrupted run resumes where it stopped. See docs/features.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lseg.cli.common import add_compile_argument, add_model_arguments, check_model_named

FORMATS = ("npy", "pt")
DTYPES = ("float16", "float32")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from lseg.features import GRIDS
    from lseg.inference import PROTOCOLS

    parser = subparsers.add_parser(
        "features",
        help="dense per-pixel embeddings (for OpenScene, VLMaps, retrieval)",
        description="Write one L2-normalised D x h x w feature array per image (NAME.npy or NAME.pt) and "
        "NAME.json with image size, feature size, feature stride, protocol, dtype and checkpoint. "
        "Images are processed one at a time; images whose json records the same settings are skipped "
        "(others are recomputed, all of them with --overwrite), so an interrupted run can simply be "
        "restarted. Under torchrun (or with RANK/WORLD_SIZE set) each process "
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
    add_model_arguments(parser)
    add_compile_argument(parser)
    parser.set_defaults(run=run)


def checkpoint_id(checkpoint: str | None) -> str | None:
    """Local checkpoints as absolute paths (so resume and `lseg query` find them), hub ids as given."""
    if checkpoint is None or not Path(checkpoint).exists():
        return checkpoint
    return str(Path(checkpoint).resolve())


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lseg.cli.common import folder_inputs, load_model_from_args, raise_failures, run_folder
    from lseg.images import check_model_size
    from lseg.predictor import FeatureFiles, LSegPredictor

    check_model_size(args.size)
    check_model_named(args)
    files = FeatureFiles(args.format, args.save_dtype, args.feature_grid)
    if (found := folder_inputs(args, files)) is None:
        return 0
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
    predictor = LSegPredictor(lambda: load_model_from_args(args), args.protocol, args.size)
    done = run_folder(predictor, *found, files, settings, overwrite=args.overwrite)
    if done.skipped == done.images:
        Console(stderr=True).print(f"nothing to do: all {done.images} image(s) are done")
        return 0
    Console().print(
        f"lseg features: {len(done.written)} written, {done.skipped} skipped (already done), "
        f"{len(done.failures)} failed -> {found[1]}"
    )
    raise_failures(done.failures, done.images - done.skipped)
    return 0
