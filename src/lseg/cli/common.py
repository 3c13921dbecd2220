"""Helpers shared by the subcommands: model and device arguments, model loading, failure reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lseg.errors import LSegError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from lseg.images import DEFAULT_MAX_IMAGE_PIXELS
    from lseg.precision import DTYPE_CHOICES

    group = parser.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", help="model folder (save_pretrained), .ckpt file, or hub repo id")
    group.add_argument(
        "--preset",
        help="build a preset instead (tiny, vit_b16, vit_l16, ..., or a config JSON file); pretrained "
        "backbone/text weights are downloaded where the preset asks for them, the LSeg head and decoder "
        "are random",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="precision of the model's passes: auto (default: bfloat16 autocast on CUDA, float32 on CPU), "
        "float32, bfloat16 (CPU: bf16 weights, ~5x faster on CPUs with AVX512-BF16/AMX) or float16",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"refuse image files claiming more pixels than this (default {DEFAULT_MAX_IMAGE_PIXELS:,}, "
        "PIL's decompression-bomb limit; 0 = no limit, for trusted files only)",
    )


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (slow first image per input shape; inputs are padded to multiples "
        "of 128 px so a folder of mixed sizes compiles a few shapes)",
    )


def check_model_named(args: argparse.Namespace) -> None:
    """Fail before any work when neither `--checkpoint` nor `--preset` names a model."""
    if not args.checkpoint and not args.preset:
        raise LSegError("give --checkpoint DIR_OR_ID (a trained model) or --preset NAME")


def named_model(args: argparse.Namespace):
    """The model `--checkpoint` or `--preset` names, on the CPU as stored."""
    from lseg import LSeg

    check_model_named(args)
    return LSeg.from_pretrained(args.checkpoint) if args.checkpoint else LSeg.from_config(args.preset)


def load_model_from_args(args: argparse.Namespace, device: Any = None):
    """The model the arguments name, on `device` (default: `--device`, this shard's GPU), prepared for
    `--dtype` (and `--compile`)."""
    from lseg.device import resolve_device
    from lseg.precision import prepare_for_inference
    from lseg.shard import shard_device

    if device is None:
        device = shard_device(resolve_device(args.device))
    model = prepare_for_inference(named_model(args), getattr(args, "dtype", "auto"), device)
    if getattr(args, "compile", False):
        model.compile_for_inference()
    return model


def folder_inputs(args: argparse.Namespace, files: Any) -> tuple[list[Path], Path] | None:
    """A batch command's images and `--out`, checked before any model loads; None once `--merge`
    has merged the sidecars into the summary (`files`: `lseg.predictor.SegmentFiles`/`FeatureFiles`)."""
    from lseg.files import check_output_folder
    from lseg.images import find_images
    from lseg.predictor import check_names
    from lseg.shard import merge_summary

    paths = find_images(args.inputs)
    names = check_names(paths)
    out = check_output_folder(args.out)
    if not args.merge:
        return paths, out
    if not out.is_dir():
        raise LSegError(f"--out {out} does not exist: --merge collects the sidecars a run wrote there")
    print(
        f"lseg {files.command}: merged {merge_summary(out, names, files.summary, {'command': files.command})}"
    )
    return None


def run_folder(
    predictor: Any, inputs: list[Path], out: Path, files: Any, settings: dict, **options: Any
) -> Any:
    """`predictor.predict_folder` with a progress bar (the image being read) and notes on stderr."""
    from rich.console import Console
    from rich.progress import Progress, TextColumn

    console = Console(stderr=True)
    columns = (*Progress.get_default_columns(), TextColumn("{task.fields[current]}"))
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(files.command, total=None, current="")
        advance = lambda path: progress.update(task, advance=1, current=path.name)  # noqa: E731
        return predictor.predict_folder(
            inputs, out, files, settings, progress=advance, log=console.print, **options
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
