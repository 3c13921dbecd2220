"""`lseg train`: everything after the subcommand goes to LightningCLI (configs + dotted overrides)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train LSeg with a YAML config (Lightning; one CPU to many GPU nodes)",
        description="Train LSeg. All arguments are LightningCLI 'fit' arguments, e.g. "
        "`lseg train --config configs/camvid.yaml --trainer.max_epochs 20`, resume with "
        "`--ckpt_path last`. `lseg train --help` lists every field.",
        add_help=False,
    )
    parser.add_argument("lightning_args", nargs=argparse.REMAINDER)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lseg.errors import LSegError

    try:
        from lseg.train.cli import run_training
    except ImportError as error:
        raise LSegError(
            f"training needs the train extra: pip install 'lseg[train]' ({error.name} missing)"
        ) from error
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        run_training(args.lightning_args)
    except SIGTERMException:
        print(
            "lseg: training stopped by SIGTERM after saving checkpoints/last.ckpt; resume: --ckpt_path last"
        )
        return 143
    return 0
