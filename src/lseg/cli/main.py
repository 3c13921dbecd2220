"""The `lseg` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import re
import sys

from lseg import __version__
from lseg.errors import LSegError

ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
OUT_OF_MEMORY = "out of memory; use a smaller --size or --batch-size, or another --device"
ALLOCATION_FAILURE = re.compile("out of memory|can't allocate memory")  # torch's RuntimeError messages
SUBCOMMANDS = ["quickstart", "segment", "evaluate", "features", "query", "convert", "export", "train", "demo"]


def one_line(message: str) -> str:
    """An error message as one printable line: colour codes dropped, control characters (a hostile
    file name's newlines or escapes among them) shown as spaces."""
    return CONTROL.sub(" ", ANSI_ESCAPE.sub("", message)).strip()


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
        if getattr(args, "max_image_pixels", None) is not None:
            from lseg.images import set_max_image_pixels

            set_max_image_pixels(args.max_image_pixels)
        return args.run(args) or 0
    except LSegError as error:
        print(f"lseg: error: {one_line(str(error))}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as error:  # torch reports allocation failures as RuntimeErrors
        if isinstance(error, RuntimeError) and not ALLOCATION_FAILURE.search(str(error)):
            raise
        print(f"lseg: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
