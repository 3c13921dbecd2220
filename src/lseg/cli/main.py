"""The `lseg` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from lseg import __version__
from lseg.errors import LSegError

SUBCOMMANDS = ["quickstart", "segment", "evaluate", "features", "query", "convert", "train", "demo"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="lseg",
        description="Language-driven semantic segmentation: segment any image with any label words.",
    )
    parser.add_argument("--version", action="version", version=f"lseg {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"lseg.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["train"]:  # LightningCLI parses its own arguments (configs, dotted overrides)
        from lseg.cli.train import run as run_train

        args = argparse.Namespace(run=run_train, lightning_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except LSegError as error:
        print(f"lseg: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
