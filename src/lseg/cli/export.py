"""`lseg export`: a model with its labels baked in, as an ONNX graph (ONNX Runtime, no PyTorch)."""

from __future__ import annotations

import argparse

from lseg.errors import LSegError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from lseg.cli.common import add_model_arguments
    from lseg.export import FORMATS

    parser = subparsers.add_parser(
        "export",
        help="export a model with fixed labels to ONNX",
        description="Write an ONNX graph pixel_values (1 x 3 x H x W, normalised and padded with black as "
        "LSegImageProcessor does) -> label_map (1 x H x W int64), the label embeddings baked in. Needs "
        "pip install 'lseg[export]'. See docs/performance.md.",
    )
    parser.add_argument("--labels", help='comma-separated labels, e.g. "cat, plant, other"')
    parser.add_argument("--labels-file", help="file with one label per line")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="onnx (default)")
    parser.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    parser.add_argument("--height", type=int, default=480, help="input height (default 480)")
    parser.add_argument("--width", type=int, default=480, help="input width (default 480)")
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lseg.cli.common import named_model
    from lseg.export import export_onnx, require_onnx
    from lseg.files import check_output_folder, make_output_folder
    from lseg.labels import parse_labels, validate_labels

    require_onnx()  # before loading a large model
    out = Path(args.out)
    if out.is_dir():
        raise LSegError(f"--out {out} is a folder; give a file name such as model.onnx")
    check_output_folder(out.parent)
    labels = parse_labels(args.labels, args.labels_file)
    model = named_model(args)
    labels = validate_labels(labels if labels is not None else model.config.labels)
    make_output_folder(out.parent)
    written = export_onnx(model.eval(), labels, out, args.height, args.width)
    print(f"lseg export: {written} ({len(labels)} labels, input 1 x 3 x {args.height} x {args.width})")
    return 0
