"""`lseg convert`: turn an original LSeg `.ckpt` (or any loadable checkpoint) into a model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lseg.errors import LSegError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an original LSeg .ckpt (or any loadable checkpoint) to a model folder",
        description="Load a checkpoint (an original LSeg release .ckpt such as demo_e200.ckpt, an lseg "
        "training .ckpt, a model folder or a hub repo id) and write it as a save_pretrained folder "
        "(model.safetensors + config.json). Each file is written atomically (weights first, config last) and "
        "needs no pickle to load.",
    )
    parser.add_argument("source", metavar="CHECKPOINT", help=".ckpt file, model folder or hub repo id")
    parser.add_argument("out", metavar="OUT_DIR", help="output model folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="overwrite the model files (model.safetensors, config.json) of an existing model folder "
        "OUT_DIR; other files in it are kept",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip re-reading the written weights and comparing them with the loaded ones",
    )
    parser.set_defaults(run=run)


def check_output(out: Path, overwrite: bool) -> None:
    """Never replace a folder that is not a model folder, nor a model folder without --overwrite."""
    from lseg.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    if not out.exists():
        return
    if not out.is_dir():
        raise LSegError(f"output {out} exists and is not a folder")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if not {CONFIG_NAME, WEIGHTS_NAME} <= entries or entries - {CONFIG_NAME, WEIGHTS_NAME, "README.md"}:
        raise LSegError(f"output {out} is a non-empty folder that is not an lseg model folder; pick another")
    if not overwrite:
        raise LSegError(f"output {out} already holds a model; pass --overwrite to replace it")


def verify_saved(model, out: Path) -> int:
    """Compare the written safetensors with the in-memory state dict; return the tensor count."""
    import torch
    from safetensors.torch import load_file

    from lseg.model.checkpoint import WEIGHTS_NAME

    saved = load_file(str(out / WEIGHTS_NAME))
    state = model.state_dict()
    if set(saved) != set(state):
        raise LSegError(f"verification failed: {out / WEIGHTS_NAME} has different keys than the model")
    for key, value in state.items():
        if not torch.equal(saved[key], value.detach().cpu()):
            raise LSegError(f"verification failed: tensor {key} differs after writing {out}")
    return len(saved)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lseg import LSeg

    out = Path(args.out)
    source = Path(args.source)
    if source.exists() and source.resolve() == out.resolve():
        raise LSegError("CHECKPOINT and OUT_DIR are the same path; write the converted model elsewhere")
    check_output(out, args.overwrite)
    console = Console()
    with console.status(f"loading {args.source}"):
        model = LSeg.from_pretrained(args.source)
    with console.status(f"writing {out}"):
        model.save_pretrained(out)
        count = verify_saved(model, out) if args.verify else None
    config = model.config
    parameters = sum(p.numel() for p in model.state_dict().values())
    size_mb = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    console.print(f"[bold]lseg convert[/bold]: {args.source} -> {out} ({size_mb:.1f} MiB)")
    console.print(
        f"  image encoder {config.image_encoder.type} {config.image_encoder.name}, text encoder "
        f"{config.text_encoder.model}, decoder width {config.features}, embedding dim "
        f"{model.text_encoder.embed_dim}, {parameters / 1e6:.1f}M parameters"
    )
    if count is not None:
        console.print(f"  verified: {count} tensors read back identical")
    console.print(f"  load it with: LSeg.from_pretrained({str(out)!r}) or --checkpoint {out}")
    return 0
