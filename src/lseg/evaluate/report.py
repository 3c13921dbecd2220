"""Evaluation reports: the metrics.json schema, per-class IoU bar chart, confusion matrix, best/worst
grid, the model card entry and the console tables; `lseg evaluate` only calls these.

Files are written into a hidden staging folder beside the output folder and moved into place only
when all of them are complete, so a failure leaves no half-made report. Charts use matplotlib (the
``train`` extra, Agg backend, imported lazily); the image grid only needs Pillow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lseg.data import IGNORE_INDEX
from lseg.errors import LSegError
from lseg.files import check_output_folder, make_output_folder, write_text_atomic
from lseg.model.card import update_card_metrics
from lseg.model.checkpoint import WEIGHTS_NAME, is_model_folder
from lseg.visualize import palette

if TYPE_CHECKING:
    from lseg.evaluate.runner import EvaluationReport
    from lseg.evaluate.zeroshot import ZeroShotReport

METRICS_FILE = "metrics.json"
IOU_CHART = "per_class_iou.png"
CONFUSION_CHART = "confusion_matrix.png"
EXAMPLES_GRID = "best_worst.png"
SEEN_UNSEEN = ("miou_seen", "miou_unseen", "hiou", "miou_apart")  # generalised zero-shot means


# ----------------------------------------------------------------------------- JSON and provenance
def jsonable(value: Any) -> Any:
    """Plain JSON: NaN / inf -> null, numpy and torch scalars -> numbers, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(payload: dict[str, Any]) -> str:
    return json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_info(checkpoint: str | None, preset: str | None = None) -> dict[str, Any]:
    """Path of the checkpoint and the sha256 of its weights file(s) (a folder: model.safetensors)."""
    if checkpoint is None:
        return {"path": None, "preset": preset, "sha256": {}}
    path = Path(checkpoint)
    files: list[Path] = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".ckpt", ".pt", ".pth"))
    elif path.is_file():
        files = [path]
    else:  # hub repo id: hash the cached weights if present (provenance is best effort for hub ids)
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(checkpoint), WEIGHTS_NAME)
            if isinstance(cached, str):
                files = [Path(cached)]
    return {
        "path": str(path.resolve()) if path.exists() else str(checkpoint),
        "preset": preset,
        "sha256": {f.name: sha256_file(f) for f in files},
    }


def environment(device: str) -> dict[str, Any]:
    import torch

    import lseg

    info = {
        "lseg_version": lseg.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ----------------------------------------------------------------------------- metrics.json
def segmentation_summary(report: EvaluationReport) -> dict[str, Any]:
    """Every number of a dataset evaluation, JSON-ready (NaN kept as float; see `to_json`)."""
    m = report.metrics
    return {
        "metrics": {
            **_pick(m, "pixel_accuracy", "mean_class_accuracy", "miou", "fwiou"),
            "per_class_iou": report.per_class_iou(),
            "per_class_accuracy": dict(zip(report.class_names, m["per_class_accuracy"], strict=True)),
            "classes_scored": int(sum(not math.isnan(v) for v in m["per_class_iou"])),
            **{key: m[key] for key in SEEN_UNSEEN if key in m},
        },
        "class_names": report.class_names,
        **_unseen_summary(report),
        "labels": report.labels,
        "label_space": report.label_space,
        "protocol": asdict(report.protocol),
        "size": report.size,
        "timing": {
            "images": report.images,
            "seconds": report.seconds,
            "model_seconds": report.model_seconds,
            "images_per_second": report.images_per_second,
            "world_size": report.world_size,
        },
        "device": report.device,
        "rank_by": report.rank_by,
        "best": [asdict(e.score) for e in report.best],
        "worst": [asdict(e.score) for e in report.worst],
        "per_image": [asdict(s) for s in report.per_image],
        "confusion_matrix": report.confmat.tolist(),
    }


def _unseen_summary(report: EvaluationReport) -> dict[str, Any]:
    """Which classes were unseen in training, scored apart, and the seen-class calibration."""
    unseen = report.extra.get("unseen")
    if unseen is None:
        return {}
    names = report.class_names
    return {
        "unseen_classes": [names[i] for i in unseen.unseen],
        "apart_classes": [names[i] for i in unseen.apart],
        "seen_bias": bias
        if isinstance(bias := report.extra["seen_bias"], int | float)
        else dict(zip(names, bias)),
    }


def zeroshot_summary(report: ZeroShotReport) -> dict[str, Any]:
    """Every number of a zero-shot fold, JSON-ready: the words asked, metrics and timing."""
    return {
        "labels": {name: report.labels.get(name, name) for name in report.per_class_iou},
        "metrics": {"miou": report.miou, "fb_iou": report.fb_iou, "per_class_iou": report.per_class_iou},
        "timing": {
            "images": report.episodes,
            "seconds": report.seconds,
            "images_per_second": report.images_per_second,
        },
    }


def _pick(choices: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {name: choices[name] for name in names}


def _payload(
    report: EvaluationReport | ZeroShotReport, choices: Mapping[str, Any], dataset: dict, config: dict
) -> dict[str, Any]:
    """metrics.json: provenance, what was scored, the configuration and every number."""
    return {
        **environment(report.device),
        "command": "evaluate",
        "checkpoint": checkpoint_info(choices["checkpoint"], choices["preset"]),
        "dataset": {"name": choices["dataset"], "root": str(Path(choices["data_root"]).resolve()), **dataset},
        "config": config,
        **report.summary(),
    }


def dataset_payload(
    report: EvaluationReport, choices: Mapping[str, Any], split: str | None
) -> dict[str, Any]:
    """metrics.json of a dataset evaluation; `choices` are `lseg evaluate`'s options by name."""
    config = {
        **_pick(choices, "protocol", "size", "prompt_template"),
        "prompt_templates": report.extra["prompt_templates"],
        **_pick(choices, "label_space", "labels_file", "synonyms", "max_images", "batch_size", "rank_by"),
    }
    scored = {"split": split, **(_pick(choices, "sequences") if choices["sequences"] else {})}
    if report.extra.get("unseen") is not None:
        config |= _pick(choices, "unseen", "unseen_file", "seen_bias", "seen_bias_file")
        if Path(choices["unseen_file"] or "").suffix in (".yaml", ".yml"):
            scored["fold"] = choices["fold"]  # the fold of a folds file
    column = report.extra.get("taxonomy_column")
    return {
        **_payload(report, choices, scored, config),
        **({"taxonomy_column": column} if column else {}),
    }


def zeroshot_payload(report: ZeroShotReport, choices: Mapping[str, Any]) -> dict[str, Any]:
    """metrics.json of a zero-shot fold; `choices` are `lseg evaluate`'s options by name."""
    config = {
        "protocol": "single",
        "image_size": report.image_size,
        "prompt_template": choices["prompt_template"],
        "prompt_templates": report.prompt_templates,
        **_pick(choices, "background", "synonyms"),
        "max_episodes": choices["max_images"],
        "batch_size": choices["batch_size"],
    }
    return _payload(report, choices, {"fold": choices["fold"]}, config)


# ----------------------------------------------------------------------------- staging
def write_staged(out: str | Path, writers: Iterable[tuple[str, Callable[[Path], None]]]) -> list[Path]:
    """Run ``writer(path)`` for each ``(name, writer)`` in a hidden folder of our own beside `out` (or its
    nearest existing ancestor), then create `out` if needed and move the files into it one by one, so a
    failed run writes nothing."""
    out = check_output_folder(out)
    anchor = next(folder for folder in (out.parent, *out.parents) if folder.exists())
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=anchor))
    names = []
    try:
        for name, writer in writers:
            writer(staging / name)
            names.append(name)
        make_output_folder(out)
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / name for name in names]


# ----------------------------------------------------------------------------- charts
def require_matplotlib() -> Any:
    """`matplotlib.figure.Figure`, or an LSegError saying how to install matplotlib.

    Charts are drawn on a bare `Figure` (rendered by Agg when saved), never through pyplot: the caller's
    backend, e.g. a notebook's inline one, is left as it was.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LSegError(
            "evaluation charts need matplotlib: pip install 'lseg[train]' (or pip install matplotlib)"
        ) from None
    return Figure


def _save_figure(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def plot_per_class_iou(
    class_names: Sequence[str], ious: Sequence[float], path: Path, title: str = "per-class IoU"
) -> None:
    """Horizontal bars, one per class in class order; classes without a defined IoU are marked n/a."""
    figure = require_matplotlib()
    count = len(class_names)
    height = min(60.0, max(2.5, 0.22 * count + 1.2))
    fig = figure(figsize=(7.5, height))
    ax = fig.subplots()
    values = [0.0 if v is None or math.isnan(v) else 100 * v for v in ious]
    positions = np.arange(count)
    ax.barh(positions, values, color="#4c72b0")
    ax.set_yticks(positions, labels=list(class_names), fontsize=8 if count <= 60 else 6)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    defined = [v for v in ious if v is not None and not math.isnan(v)]
    mean = 100 * sum(defined) / len(defined) if defined else math.nan
    ax.set_title(f"{title} (mIoU {mean:.1f}%)")
    if defined:
        ax.axvline(mean, color="#c44e52", linestyle="--", linewidth=1)
    for y, v in zip(positions, ious, strict=True):
        if v is None or math.isnan(v):
            ax.text(1, y, "n/a (absent)", va="center", fontsize=7, color="grey")
    _save_figure(fig, path)


def plot_confusion(class_names: Sequence[str], confmat: np.ndarray, path: Path) -> None:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) with class names."""
    figure = require_matplotlib()
    confmat = np.asarray(confmat, dtype=np.float64)
    rows = confmat.sum(1, keepdims=True)
    normalised = np.divide(confmat, rows, out=np.zeros_like(confmat), where=rows > 0)
    count = len(class_names)
    side = min(40.0, max(4.5, 0.3 * count + 2))
    fig = figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(normalised, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    font = 8 if count <= 30 else (6 if count <= 80 else 4)
    ticks = np.arange(count)
    ax.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize=font)
    ax.set_yticks(ticks, labels=list(class_names), fontsize=font)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (rows normalised)")
    if count <= 20:  # the cells' shares, row by row
        for t, p in zip(*np.nonzero((rows > 0) & (normalised >= 0.005))):
            share = normalised[t, p]
            colour = "black" if share > 0.5 else "white"
            ax.text(p, t, f"{share:.2f}", ha="center", va="center", fontsize=6, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    _save_figure(fig, path)


# ----------------------------------------------------------------------------- best / worst grid
def _colour_labels(label_map: np.ndarray, colours: np.ndarray) -> np.ndarray:
    out = np.zeros((*label_map.shape, 3), dtype=np.uint8)
    valid = (label_map >= 0) & (label_map < len(colours)) & (label_map != IGNORE_INDEX)
    out[valid] = colours[label_map[valid]]
    return out


def _tile(array: np.ndarray, height: int, nearest: bool) -> Image.Image:
    image = Image.fromarray(array)
    width = max(1, round(array.shape[1] * height / array.shape[0]))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return image.resize((width, height), resample)


def examples_grid(
    best: Sequence[Any],
    worst: Sequence[Any],
    class_names: Sequence[str],
    rank_by: str,
    tile_height: int = 160,
) -> Image.Image:
    """Rows of image | ground truth | prediction: best images first, then the worst; a legend of the
    classes shown below."""
    font = ImageFont.load_default(size=13)
    colours = palette(len(class_names))
    header = 20
    rows = [("best", e) for e in best] + [("worst", e) for e in worst]
    tiles = []
    for kind, example in rows:
        image = _tile(example.image, tile_height, nearest=False)
        truth = _tile(_colour_labels(example.mask, colours), tile_height, nearest=True)
        pred = _tile(_colour_labels(example.prediction, colours), tile_height, nearest=True)
        score = getattr(example.score, rank_by)
        caption = f"{kind}: {rank_by} {100 * score:.1f}%  {Path(example.score.path).name}"
        tiles.append((caption, [image, truth, pred]))
    gap = 4
    width = max([300, *(sum(t.width for t in ims) + gap * 2 for _, ims in tiles)])
    column_header = 18
    shown: set[int] = set()
    for _, example in rows:
        for array in (example.mask, example.prediction):
            shown.update(int(v) for v in np.unique(array) if 0 <= v < len(class_names))
    legend: list[list[tuple[int, int]]] = []  # lines of (class, x) entries (swatch + name) within `width`
    x = width
    for index in sorted(shown):
        entry = 16 + int(font.getlength(class_names[index])) + 12
        if x + entry > width:
            legend.append([])
            x = 2
        legend[-1].append((index, x))
        x += entry
    height = column_header + len(tiles) * (tile_height + header + gap) + 18 * len(legend) + 4
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if tiles:
        x = 0
        for title, tile in zip(("image", "ground truth", "prediction"), tiles[0][1], strict=True):
            draw.text((x + 2, 2), title, fill="black", font=font)
            x += tile.width + gap
    y = column_header
    for caption, images in tiles:
        draw.text((2, y + 3), caption, fill="black", font=font)
        x = 0
        for tile in images:
            canvas.paste(tile, (x, y + header))
            x += tile.width + gap
        y += tile_height + header + gap
    for line in legend:
        for index, x in line:
            draw.rectangle([x, y + 2, x + 12, y + 14], fill=tuple(int(c) for c in colours[index]))
            draw.text((x + 16, y + 1), class_names[index], fill="black", font=font)
        y += 18
    return canvas


# ----------------------------------------------------------------------------- console
def _pct(value: float | None) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"
    )


def print_summary(
    title: str, scalars: dict[str, float], per_class: dict[str, float], console: Any = None
) -> None:
    """Rich tables: the headline metrics, then IoU per class."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    tables = ((title, "metric", "value (%)", scalars), ("per-class IoU (%)", "class", "IoU", per_class))
    for heading, name_column, value_column, values in tables:
        table = Table(title=heading)
        table.add_column(name_column)
        table.add_column(value_column, justify="right")
        for name, value in values.items():
            table.add_row(name, _pct(value))
        console.print(table)


def print_segmentation(report: EvaluationReport, title: str, console: Any = None) -> None:
    """The headline metrics and per-class IoU of a dataset evaluation."""
    names = {"pixel accuracy": "pixel_accuracy", "mean class accuracy": "mean_class_accuracy"}
    names |= {"mIoU": "miou", "fwIoU": "fwiou"}
    names |= {
        "mIoU seen": "miou_seen",
        "mIoU unseen": "miou_unseen",
        "hIoU": "hiou",
        "mIoU apart": "miou_apart",
    }
    scalars = {name: report.metrics[key] for name, key in names.items() if key in report.metrics}
    print_summary(title, scalars, report.per_class_iou(), console)


# ----------------------------------------------------------------------------- report folders
def _publish(choices: Mapping[str, Any], writers: list, payload: dict[str, Any]) -> list[Path]:
    """Write the files and metrics.json into ``choices["out"]`` (staged: all or none), then record the
    scores in the model card of a local model folder ``choices["checkpoint"]``; the paths written."""
    writers = [*writers, (METRICS_FILE, lambda p: write_text_atomic(p, to_json(payload)))]
    paths, checkpoint = write_staged(choices["out"], writers), choices["checkpoint"]
    if checkpoint and is_model_folder(checkpoint):
        paths += filter(None, [update_card_metrics(checkpoint, payload)])
    return paths


def write_dataset_report(
    report: EvaluationReport, choices: Mapping[str, Any], split: str | None
) -> list[Path]:
    """metrics.json (`dataset_payload`), the IoU and confusion charts and the best / worst grid of a
    dataset evaluation, and its model card entry; `choices` are `lseg evaluate`'s options by name."""
    ious = report.metrics["per_class_iou"]
    writers: list[tuple[str, Callable[[Path], None]]] = [
        (IOU_CHART, lambda p: plot_per_class_iou(report.class_names, ious, p)),
        (CONFUSION_CHART, lambda p: plot_confusion(report.class_names, report.confmat.numpy(), p)),
    ]
    if report.best or report.worst:
        grid = examples_grid(report.best, report.worst, report.class_names, report.rank_by)
        writers.append((EXAMPLES_GRID, lambda p: grid.save(p, format="PNG")))
    return _publish(choices, writers, dataset_payload(report, choices, split))


def write_zeroshot_report(report: ZeroShotReport, choices: Mapping[str, Any]) -> list[Path]:
    """metrics.json (`zeroshot_payload`) and the IoU chart of a zero-shot fold, and its model card entry."""
    names, ious = list(report.per_class_iou), list(report.per_class_iou.values())
    title = f"{choices['dataset']} fold {choices['fold']}"
    writers = [(IOU_CHART, lambda p: plot_per_class_iou(names, ious, p, title=title))]
    return _publish(choices, writers, zeroshot_payload(report, choices))
