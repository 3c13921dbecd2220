"""`lseg quickstart`: the offline, CPU-sized end-to-end demo (train, evaluate, segment with synonyms)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="train a small LSeg on synthetic scenes and segment them with unseen synonyms (offline, CPU)",
        description="Generate synthetic street scenes, train a small LSeg for 300 steps (about 3 minutes) "
        "on the CPU, "
        "evaluate on held-out scenes with the training names and with unseen synonyms (automobile, street, "
        "vegetation, house, person walking), and write overlays, metrics and curves to --out.",
    )
    parser.add_argument("--out", default="quickstart", help="output folder (default: quickstart)")
    parser.add_argument(
        "--steps",
        type=int,
        default=300,
        help="training steps (default 300: about 3 minutes on 2 CPU cores; a step budget, so the result "
        "does not depend on how busy the machine is)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lseg.errors import LSegError

    if args.steps < 1:
        raise LSegError(f"--steps must be at least 1, got {args.steps}")
    try:
        from lseg.train.quickstart import run_quickstart
    except ImportError as error:
        raise LSegError(
            f"quickstart needs the train extra: pip install 'lseg[train]' ({error.name} missing)"
        ) from error
    results = run_quickstart(Path(args.out), steps=args.steps, seed=args.seed)
    table = Table(
        title=f"lseg quickstart ({results['seconds']:.0f} s, text encoder: {results['text_encoder']})"
    )
    for column in ("labels asked", "mIoU", "pixel accuracy"):
        table.add_column(column)
    for title, key in (("training names", "trained_names"), ("unseen synonyms", "synonyms")):
        table.add_row(
            title, f"{100 * results[key]['miou']:.1f} %", f"{100 * results[key]['pixel_accuracy']:.1f} %"
        )
    Console().print(table)
    Console().print(f"wrote {args.out}/: metrics.md, metrics.json, curves.png, overlays/, model/")
    return 0
