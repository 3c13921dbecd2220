"""`lseg demo`: the gradio web demo (optional extra: pip install 'lseg[demo]')."""

from __future__ import annotations

import argparse
import sys
import time

from lseg.errors import LSegError


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from lseg.cli.common import add_model_arguments

    parser = subparsers.add_parser(
        "demo",
        help="web demo: upload an image, type labels, see the segmentation",
        description="Serve a gradio web demo of a model (needs the demo extra: pip install 'lseg[demo]'). "
        "It listens on 127.0.0.1 only unless --host says otherwise.",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--share",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="also create a public gradio.live link (default false)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lseg.app.demo import launch, require_gradio
    from lseg.cli.common import check_model_named, load_model_from_args

    require_gradio()  # fail before loading a large model
    if not 0 < args.port < 65536:
        raise LSegError(f"--port must be between 1 and 65535, got {args.port}")
    check_model_named(args)
    started = time.perf_counter()
    model = load_model_from_args(args)
    source = args.checkpoint or f"preset {args.preset}"
    print(f"lseg demo: model {source} loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    launch(model, host=args.host, port=args.port, share=args.share)
    return 0
