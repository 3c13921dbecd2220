"""`lseg segment`: label maps, colour overlays and (optionally) dense features for images."""

from __future__ import annotations

import argparse

from lseg.cli.common import add_compile_argument, add_model_arguments, load_model_from_args
from lseg.errors import LSegError
from lseg.labels import parse_labels, validate_labels


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images with any label words",
        description="Segment images with the given labels. Writes NAME.labels.png (index map), "
        "NAME.overlay.png (colour overlay with legend), with --save-features NAME.features.npy, and "
        "NAME.json "
        "(label shares and settings; written last, so a rerun with the same settings skips images already "
        "done, --overwrite redoes them). Under torchrun (or with "
        "RANK/WORLD_SIZE set) each process takes a disjoint shard of the inputs; the last one to finish "
        "writes segment-summary.json (or run again with --merge).",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument("--labels", help='comma-separated labels, e.g. "cat, plant, other"')
    parser.add_argument("--labels-file", help="file with one label per line")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--size", type=int, help="resize the long side to this many pixels (8 to 4096) before inference"
    )
    parser.add_argument("--protocol", default="single", help="inference protocol: single, slide, lseg-ms")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per forward pass (same-size images)"
    )
    parser.add_argument(
        "--save-features",
        action="store_true",
        help="also write dense D x H/2 x W/2 features (with the same --protocol)",
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute images whose outputs exist")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="only merge the NAME.json files of the inputs into segment-summary.json (after sharded runs)",
    )
    add_model_arguments(parser)
    add_compile_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lseg.cli.common import folder_inputs, raise_failures, run_folder
    from lseg.images import check_model_size
    from lseg.inference import resolve_protocol
    from lseg.predictor import LSegPredictor, SegmentFiles

    check_model_size(args.size)
    if args.batch_size < 1:
        raise LSegError(f"--batch-size must be at least 1, got {args.batch_size}")
    resolve_protocol(args.protocol, args.size)
    if (found := folder_inputs(args, SegmentFiles)) is None:
        return 0
    labels = parse_labels(args.labels, args.labels_file)
    model = None
    if labels is None:
        model = load_model_from_args(args)
        labels = validate_labels(model.config.labels)

    def load():  # only when some image is left to do
        loaded = model or load_model_from_args(args)
        loaded.release_text_encoder(labels)  # one label list per run: the text weights are not needed after
        return loaded

    settings = {
        "labels": labels,
        "size": args.size,
        "protocol": args.protocol,
        "dtype": args.dtype,
        "checkpoint": args.checkpoint,
        "preset": args.preset,
        "save_features": args.save_features,
    }
    predictor = LSegPredictor(load, args.protocol, args.size)
    files = SegmentFiles(labels, args.save_features)
    done = run_folder(
        predictor, *found, files, settings, overwrite=args.overwrite, batch_size=args.batch_size
    )
    if done.written:
        table = Table(title=f"lseg segment: {len(done.written)} image(s) -> {found[1]}")
        for column in ("image", "size", "top labels", "s/image"):
            table.add_column(column)
        for item in done.written:
            top = sorted(item.shares.items(), key=lambda kv: -kv[1])[:3]
            top = ", ".join(f"{name} {100 * share:.0f}%" for name, share in top if share > 0)
            height, width = item.image_size
            table.add_row(item.path.name, f"{width}x{height}", top, f"{item.seconds:.2f}")
        Console().print(table)
    raise_failures(done.failures, done.images - done.skipped)
    return 0
