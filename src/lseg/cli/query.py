"""`lseg query`: cosine similarity of a text prompt with saved dense features -> heatmaps."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from lseg.errors import LSegError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "query",
        help="heatmaps of a text prompt's similarity with saved features",
        description="Cosine similarity of a text embedding with every pixel of feature maps written by "
        "`lseg features`: writes NAME.TEXT.png (colour heatmap) and, when the sidecar json names an image "
        "that exists, NAME.TEXT.overlay.png; prints max/mean similarity. Without --checkpoint/--preset the "
        "checkpoint recorded in the sidecar json is used.",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="FEATURES", help=".npy/.pt feature files or folders of them"
    )
    parser.add_argument(
        "--text", action="append", required=True, help="text prompt, e.g. chair (repeat for several)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--vmin", type=float, help="similarity shown as the darkest colour (default: map min)"
    )
    parser.add_argument(
        "--vmax", type=float, help="similarity shown as the brightest colour (default: map max)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlay (0.5)")
    parser.add_argument(
        "--save-similarity", action="store_true", help="also write NAME.TEXT.npy (float32 h x w similarities)"
    )
    from lseg.cli.common import add_model_arguments

    add_model_arguments(parser)
    parser.set_defaults(run=run)


# --------------------------------------------------------------------------- names
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "text"


# --------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lseg.cli.common import load_model_from_args, raise_failures
    from lseg.features import colormap, load_features, read_sidecar, resize_map, similarity_maps
    from lseg.files import check_output_folder, make_output_folder, save_array, save_image
    from lseg.images import expand_paths, load_image
    from lseg.visualize import blend

    if not 0 <= args.alpha <= 1:
        raise LSegError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.vmin is not None and args.vmax is not None and args.vmin >= args.vmax:
        raise LSegError(f"--vmin ({args.vmin}) must be below --vmax ({args.vmax})")
    texts = [t.strip() for t in args.text]
    if any(not t for t in texts):
        raise LSegError("--text must not be empty")
    slugs = [slug(t) for t in texts]
    if len(set(slugs)) != len(slugs):
        raise LSegError("two --text prompts give the same file name; make them differ in letters or digits")
    paths = expand_paths(args.inputs, {".npy", ".pt"}, "feature file")  # folders: their .npy/.pt files
    if len({p.stem for p in paths}) != len(paths):
        raise LSegError("several feature files share a name; their heatmaps would overwrite each other")
    sidecars = {p: read_sidecar(p.with_suffix(".json")) or {} for p in paths}
    if not args.checkpoint and not args.preset:
        recorded = {(m.get("checkpoint"), m.get("preset")) for m in sidecars.values()}
        if len(recorded) != 1 or recorded == {(None, None)}:
            raise LSegError(
                "give --checkpoint or --preset (the feature sidecars do not name a single checkpoint)"
            )
        args.checkpoint, args.preset = next(iter(recorded))
    model = load_model_from_args(args)
    embeddings = model.encode_text(texts).float().cpu().numpy()
    out = check_output_folder(args.out)
    failures = []
    table = Table(title=f"lseg query: {len(paths)} feature map(s) x {len(texts)} prompt(s) -> {out}")
    for column in ("features", "text", "max", "mean", "argmax (x, y)"):
        table.add_column(column)
    for path in paths:
        meta = sidecars[path]
        image_size = meta.get("image_size")
        image_path = Path(meta["image"]) if meta.get("image") else None
        try:
            features = load_features(path)
            image = load_image(image_path) if image_path is not None and image_path.is_file() else None
        except LSegError as error:
            failures.append(str(error))
            continue
        make_output_folder(out)
        if image is not None:
            image_size = list(image.shape[:2])
        for text, name, similarity in zip(texts, slugs, similarity_maps(features, embeddings)):
            row, col = np.unravel_index(int(similarity.argmax()), similarity.shape)
            if image_size:
                # Report the argmax in image pixels (feature pixel centre scaled by the stride).
                x = (col + 0.5) * image_size[1] / similarity.shape[1]
                y = (row + 0.5) * image_size[0] / similarity.shape[0]
                where = f"({x:.0f}, {y:.0f}) px"
            else:
                where = f"({col}, {row}) feature px"
            table.add_row(path.name, text, f"{similarity.max():.3f}", f"{similarity.mean():.3f}", where)
            seen = tuple(meta.get("model_size") or image_size or ())  # the size the model saw
            full = resize_map(similarity, tuple(image_size), seen) if image_size else similarity
            heat = colormap(full, args.vmin, args.vmax)
            save_image(heat, out / f"{path.stem}.{name}.png")
            if image is not None:
                save_image(blend(image, heat, args.alpha), out / f"{path.stem}.{name}.overlay.png")
            if args.save_similarity:
                save_array(similarity.astype(np.float32), out / f"{path.stem}.{name}.npy")
        del features
    if table.rows:
        Console().print(table)
    raise_failures(failures, len(paths))
    return 0
