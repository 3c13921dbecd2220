"""Helpers shared by the subcommands: model and device arguments, model loading, failure reports."""

from __future__ import annotations

import argparse
import sys

from lseg.errors import LSegError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", help="model folder (save_pretrained), .ckpt file, or hub repo id")
    group.add_argument(
        "--preset",
        help="build a preset instead (tiny, vit_b16, vit_l16, ...); pretrained backbone/text weights "
        "are downloaded where the preset asks for them, the LSeg head and decoder are random",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    add_image_limit_argument(parser)


def load_model_from_args(args: argparse.Namespace):
    from lseg import LSeg
    from lseg.device import resolve_device

    device = resolve_device(args.device)
    if args.checkpoint:
        model = LSeg.from_pretrained(args.checkpoint)
    elif args.preset:
        model = LSeg.from_config(args.preset)
    else:
        raise LSegError("give --checkpoint DIR_OR_ID (a trained model) or --preset NAME")
    return model.to(device).eval()


def add_image_limit_argument(parser: argparse.ArgumentParser) -> None:
    from lseg.images import DEFAULT_MAX_IMAGE_PIXELS

    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"refuse image files claiming more pixels than this (default {DEFAULT_MAX_IMAGE_PIXELS:,}, "
        "PIL's decompression-bomb limit; 0 = no limit, for trusted files only)",
    )


def raise_failures(failures: list[str], total: int) -> None:
    """The batch commands' rule: every good input is processed, every bad one reported, exit 1 if any.

    One failure is the error line itself; several are listed on stderr before the summary line.
    """
    if not failures:
        return
    if len(failures) == 1:
        raise LSegError(failures[0] if total == 1 else f"1 of {total} inputs failed: {failures[0]}")
    for failure in failures:
        print(f"lseg: failed: {failure}", file=sys.stderr)
    raise LSegError(f"{len(failures)} of {total} inputs failed (listed above); the others were processed")
