"""`lseg segment`: label maps, colour overlays and (optionally) dense features for images."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lseg.cli.common import add_model_arguments, load_model_from_args, parse_labels
from lseg.errors import LSegError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images with any label words",
        description="Segment images with the given labels. Writes NAME.labels.png (index map), "
        "NAME.overlay.png (colour overlay with legend) and, with --save-features, NAME.features.npy.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument("--labels", help='comma-separated labels, e.g. "cat, plant, other"')
    parser.add_argument("--labels-file", help="file with one label per line")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=int, help="resize the long side to this many pixels before inference")
    parser.add_argument("--protocol", default="single", help="inference protocol: single, slide, lseg-ms")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per forward pass (same-size images)"
    )
    parser.add_argument(
        "--save-features", action="store_true", help="also write dense D x H/2 x W/2 features"
    )
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def check_images(paths: list[Path]) -> None:
    """Fail before writing anything if any input is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise LSegError(f"cannot read image {path}: {error}") from error


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from lseg.files import save_array, save_image
    from lseg.images import find_images, load_image
    from lseg.model.text_encoder import validate_labels
    from lseg.visualize import overlay

    if args.size is not None and args.size < 8:
        raise LSegError(f"--size must be at least 8 pixels, got {args.size}")
    if args.batch_size < 1:
        raise LSegError(f"--batch-size must be at least 1, got {args.batch_size}")
    paths = find_images(args.inputs)
    check_images(paths)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise LSegError("several inputs share a file name; outputs would overwrite each other")
    labels = parse_labels(args.labels, args.labels_file)
    model = load_model_from_args(args)
    labels = validate_labels(labels if labels is not None else model.config.labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("segmenting", total=len(paths))
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            started = time.perf_counter()
            results = model.segment(
                [str(p) for p in chunk], labels=labels, size=args.size, protocol=args.protocol
            )
            features = (
                model.encode_image([str(p) for p in chunk], size=args.size) if args.save_features else None
            )
            seconds = (time.perf_counter() - started) / len(chunk)
            for index, (path, result) in enumerate(zip(chunk, results)):
                dtype = np.uint8 if len(labels) <= 256 else np.uint16
                save_image(result.label_map.astype(dtype), out / f"{path.stem}.labels.png")
                save_image(
                    overlay(load_image(path), result.label_map, labels), out / f"{path.stem}.overlay.png"
                )
                if features is not None:
                    array = features[index].to(torch.float16).cpu().numpy()
                    save_array(array, out / f"{path.stem}.features.npy")
                shares = sorted(result.shares().items(), key=lambda kv: -kv[1])[:3]
                top = ", ".join(f"{name} {100 * share:.0f}%" for name, share in shares if share > 0)
                rows.append(
                    (path.name, f"{result.label_map.shape[1]}x{result.label_map.shape[0]}", top, seconds)
                )
            progress.advance(task, len(chunk))
    table = Table(title=f"lseg segment: {len(paths)} image(s) -> {out}")
    for column in ("image", "size", "top labels", "s/image"):
        table.add_column(column)
    for name, size, top, seconds in rows:
        table.add_row(name, size, top, f"{seconds:.2f}")
    Console().print(table)
    return 0
