"""`lseg segment`: label maps, colour overlays and (optionally) dense features for images."""

from __future__ import annotations

import argparse
import time

import numpy as np

from lseg.cli.common import add_compile_argument, add_model_arguments, load_model_from_args, raise_failures
from lseg.errors import LSegError
from lseg.labels import parse_labels, validate_labels


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images with any label words",
        description="Segment images with the given labels. Writes NAME.labels.png (index map), "
        "NAME.overlay.png (colour overlay with legend), with --save-features NAME.features.npy, and "
        "NAME.json "
        "(label shares; written last, so a rerun skips images already done). Under torchrun (or with "
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


SUMMARY = "segment-summary.json"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from lseg.features import read_sidecar
    from lseg.files import check_output_folder, make_output_folder, save_array, save_image, write_json_atomic
    from lseg.images import check_model_size, find_images, load_image
    from lseg.inference import resolve_protocol
    from lseg.shard import finish_shard, merge_summary, shard_from_env, start_shard, take_shard
    from lseg.visualize import overlay

    check_model_size(args.size)
    if args.batch_size < 1:
        raise LSegError(f"--batch-size must be at least 1, got {args.batch_size}")
    resolve_protocol(args.protocol, args.size)
    paths = find_images(args.inputs)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise LSegError("several inputs share a file name; outputs would overwrite each other")
    out = check_output_folder(args.out)
    if args.merge:
        summary = merge_summary(out, stems, SUMMARY, {"command": "segment"})
        print(f"lseg segment: merged {summary}")
        return 0
    labels = parse_labels(args.labels, args.labels_file)
    rank, world = shard_from_env()
    console = Console(stderr=True)
    model = None
    if labels is None:
        model = load_model_from_args(args)
        labels = validate_labels(model.config.labels)
    settings = {
        "labels": labels,
        "size": args.size,
        "protocol": args.protocol,
        "dtype": args.dtype,
        "checkpoint": args.checkpoint,
        "preset": args.preset,
        "save_features": args.save_features,
    }
    mine = take_shard(paths, rank, world)
    todo = [
        p
        for p in mine
        if args.overwrite or (read_sidecar(out / f"{p.stem}.json") or {}).get("settings") != settings
    ]
    if world > 1:
        start_shard(out, rank, world)
        console.print(f"rank {rank} of {world}: {len(mine)} image(s) in this shard")
    if len(todo) < len(mine):
        console.print(f"skipping {len(mine) - len(todo)} image(s) already segmented in {out}")
    if todo:
        if model is None:
            model = load_model_from_args(args)
        model.release_text_encoder(labels)  # one label list per run: the text weights are not needed after
    rows, failures = [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("segmenting", total=len(todo))
        for start in range(0, len(todo), args.batch_size):
            chunk, images = [], []
            for path in todo[start : start + args.batch_size]:
                try:
                    images.append(load_image(path))
                    chunk.append(path)
                except LSegError as error:
                    failures.append(str(error))
            if chunk:
                started = time.perf_counter()
                results = model.segment(
                    images, labels=labels, size=args.size, protocol=args.protocol, batch_size=len(chunk)
                )
                features = (
                    model.encode_image(images, size=args.size, protocol=args.protocol)
                    if args.save_features
                    else None
                )
                seconds = (time.perf_counter() - started) / len(chunk)
                make_output_folder(out)
                for index, (path, image, result) in enumerate(zip(chunk, images, results)):
                    dtype = np.uint8 if len(labels) <= 256 else np.uint16
                    save_image(result.label_map.astype(dtype), out / f"{path.stem}.labels.png")
                    save_image(overlay(image, result.label_map, labels), out / f"{path.stem}.overlay.png")
                    if features is not None:
                        array = features[index].half().cpu().numpy()
                        save_array(array, out / f"{path.stem}.features.npy")
                    shares = result.shares()
                    write_json_atomic(  # last: the image is done
                        out / f"{path.stem}.json",
                        {
                            "image": str(path.resolve()),
                            "image_size": list(image.shape[:2]),
                            "shares": {k: round(v, 6) for k, v in shares.items() if v > 0},
                            "seconds": round(seconds, 4),
                            "settings": settings,
                        },
                    )
                    top = sorted(shares.items(), key=lambda kv: -kv[1])[:3]
                    top = ", ".join(f"{name} {100 * share:.0f}%" for name, share in top if share > 0)
                    rows.append((path.name, f"{image.shape[1]}x{image.shape[0]}", top, seconds))
                del images, results, features
            progress.advance(task, args.batch_size)
    if rows:
        table = Table(title=f"lseg segment: {len(rows)} image(s) -> {out}")
        for column in ("image", "size", "top labels", "s/image"):
            table.add_column(column)
        for name, size, top, seconds in rows:
            table.add_row(name, size, top, f"{seconds:.2f}")
        Console().print(table)
    if world > 1 and out.is_dir():
        record = {"rank": rank, "world_size": world, "images": len(mine), "failed": len(failures)}
        if finish_shard(out, rank, world, record):
            merge_summary(out, stems, SUMMARY, {"command": "segment", "settings": settings})
    raise_failures(failures, len(todo))
    return 0
