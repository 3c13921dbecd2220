"""Helpers shared by the subcommands: labels, devices, model loading."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lseg.errors import LSegError


def parse_labels(text: str | None, file: str | None) -> list[str] | None:
    """Labels from "a, b, c" or a file (one per line, or comma-separated)."""
    if text is not None and file is not None:
        raise LSegError("give either --labels or --labels-file, not both")
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise LSegError(f"labels file not found: {path}")
        text = path.read_text()
        parts = (
            [p for line in text.splitlines() for p in line.split(",")] if "," in text else text.splitlines()
        )
        return [p.strip() for p in parts if p.strip()] or []
    if text is None:
        return None
    return [p.strip() for p in text.split(",")]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise LSegError(f"invalid device '{name}' (use auto, cpu, cuda or cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LSegError(f"device '{name}' was requested but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LSegError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", help="model folder (save_pretrained), .ckpt file, or hub repo id")
    group.add_argument(
        "--preset",
        help="build a preset instead (tiny, vit_b16, vit_l16, ...); pretrained backbone/text weights "
        "are downloaded where the preset asks for them, the LSeg head and decoder are random",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")


def load_model_from_args(args: argparse.Namespace):
    from lseg import LSeg

    device = resolve_device(args.device)
    if args.checkpoint:
        model = LSeg.from_pretrained(args.checkpoint)
    elif args.preset:
        model = LSeg.from_config(args.preset)
    else:
        raise LSegError("give --checkpoint DIR_OR_ID (a trained model) or --preset NAME")
    return model.to(device).eval()
