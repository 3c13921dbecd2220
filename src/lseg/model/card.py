"""Model cards: the README.md beside the weights, with Hugging Face Hub metadata.

The metadata says what the Hub needs to list the model (library, task, license, tags), what the model
is (preset, image and text encoders, default labels) and how well it did (training's validation and
the latest `lseg evaluate` run of each dataset, split, label set and protocol), the scores also as the
`model-index` the Hub shows as evaluation results.

A README.md is the user's file unless lseg wrote it and nobody changed it since: the card carries the
sha256 of its own text (`lseg_card`), and lseg rewrites a card only while that still matches. Any other
README.md is left as it is, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from lseg.errors import LSegError
from lseg.files import read_text, write_text_atomic
from lseg.model.checkpoint import CONFIG_NAME, is_model_folder, read_config
from lseg.model.config import LSegConfig, load_preset, preset_names

CARD_NAME = "README.md"
MARKER = "lseg_card"
_UNSIGNED = "sha256:" + "0" * 64
_SIGNATURE = re.compile(rf"^{MARKER}: sha256:([0-9a-f]{{64}})$", re.MULTILINE)
TAGS = ("lseg", "semantic-segmentation", "open-vocabulary")
METRIC_NAMES = {
    "miou": "mIoU",
    "fwiou": "fwIoU",
    "fb_iou": "FB-IoU",
    "miou_seen": "mIoU seen",
    "miou_unseen": "mIoU unseen",
    "hiou": "hIoU",
    "miou_apart": "mIoU apart",
    "pixel_accuracy": "pixel accuracy",
    "mean_class_accuracy": "mean class accuracy",
}
CARD_TEXT_FIELDS = ("type", "model", "pretrained")  # those of them the encoder type has
COMMANDS = ("train", "evaluate")  # whose results a card records
TRAINING_VALIDATION = "validation during training"  # the model-index config of training's scores
PAPER = "https://arxiv.org/abs/2201.03546"


def save_card(
    folder: Path,
    config: LSegConfig,
    metrics: Mapping[str, Any] | None = None,
    card_data: Mapping[str, Any] | None = None,
) -> Path | None:
    """A fresh card for the model just saved in `folder` (results of earlier weights are dropped).

    `metrics` is a report as `lseg evaluate` writes it (metrics.json) or as training exports it;
    `card_data` adds or overrides Hub metadata (license, datasets, base_model, model_name, tags).
    """
    extra = dict(card_data or {})
    metadata = {
        "library_name": "lseg",
        "pipeline_tag": "image-segmentation",
        "license": "mit",
        "model_name": folder.resolve().name,
        **extra,
        "tags": list(dict.fromkeys([*TAGS, config.image_encoder.name, *extra.get("tags", [])])),
        "lseg": _description(config),
    }
    if metrics is not None:
        _record(metadata, metrics)
    return _write(folder / CARD_NAME, metadata)


def update_card_metrics(folder: str | Path, report: Mapping[str, Any]) -> Path | None:
    """Record `report` (metrics.json of `lseg evaluate`) in the card of model folder `folder`.

    Rewrites only README.md: an unedited lseg card keeps everything, an earlier result of the same
    dataset, split, label set and protocol aside (this report replaces it); a folder without a card gets one;
    any other README.md is left alone (a warning says so). Returns the card's path, or None when it
    was left alone.
    """
    folder = Path(folder)
    if not is_model_folder(folder):
        raise LSegError(f"{folder} is not an lseg model folder (config.json and model.safetensors)")
    path = folder / CARD_NAME
    if not path.exists():
        return save_card(folder, read_config(folder / CONFIG_NAME), report)
    if not _is_ours(path):
        return _leave(path)
    data = ModelCard.load(path).data
    metadata = {**data.to_dict(), "model_name": data.model_name}
    for key in ("model-index", MARKER):
        metadata.pop(key, None)
    _record(metadata, report)
    return _write(path, metadata)


def _description(config: LSegConfig) -> dict[str, Any]:
    image, text = config.image_encoder, config.text_encoder
    preset = _preset(config)
    return {
        **({"preset": preset} if preset else {}),
        "image_encoder": {"type": image.type, "name": image.name},
        "text_encoder": {key: value for key, value in text.to_dict().items() if key in CARD_TEXT_FIELDS},
        "labels": list(config.labels),
        "results": {},
    }


def _preset(config: LSegConfig) -> str | None:
    """The bundled preset `config` was built from (its labels aside), if any: a name anyone can build
    (a preset added from a user's file means nothing on another machine)."""
    for name in preset_names(added=False):
        preset = load_preset(name)
        if dataclasses.replace(config, labels=preset.labels) == preset:
            return name
    return None


def _record(metadata: dict[str, Any], report: Mapping[str, Any]) -> None:
    """Store the scalar scores of `report`: training's as its one result, an evaluation's as the result
    of its dataset, split, label set and protocol, in place of an earlier run of the same four."""
    scores = report.get("metrics") if isinstance(report, Mapping) else None
    if not isinstance(scores, Mapping):
        raise LSegError("metrics must be a report with a 'metrics' mapping, as lseg evaluate's metrics.json")
    dataset = report.get("dataset") or {}
    config = report.get("config") or {}
    command = report.get("command") if report.get("command") in COMMANDS else "evaluate"
    record = {
        "dataset": _dataset_name(dataset),
        "split": _scored_split(report),
        "fold": dataset.get("fold"),
        "label_set": _label_set(report) if command == "evaluate" else None,
        "protocol": f"{config['protocol']} at {config['size']}"
        if config.get("size")
        else config.get("protocol"),
        "date": report.get("created"),
        "metrics": {  # scores only: counts (classes_scored) are integers
            key: float(value)
            for key, value in scores.items()
            if isinstance(value, numbers.Real)
            and not isinstance(value, numbers.Integral)
            and math.isfinite(value)
        },
        "training": report.get("training"),
    }
    record = {k: v for k, v in record.items() if v is not None}
    results = metadata["lseg"]["results"]
    if command == "train":
        results["train"] = record
        return
    evaluations = _evaluations(results)
    keys = [_key(earlier) for earlier in evaluations]
    if _key(record) in keys:
        evaluations[keys.index(_key(record))] = record
    else:
        evaluations.append(record)
    results["evaluate"] = evaluations


def _scored_split(report: Mapping[str, Any]) -> str | None:
    """The split, or the part of it that was scored: a ``--sequences`` choice, and ``[:N]`` (the
    slicing of Hugging Face datasets) when ``--max-images`` cut it, so a quick check on a few images
    never stands in for the whole split's result."""
    dataset, config = report.get("dataset") or {}, report.get("config") or {}
    split = dataset.get("split")
    if split is None:
        return None
    if dataset.get("sequences"):
        split += f" ({', '.join(dataset['sequences'])})"
    limit = config.get("max_images")
    if limit is not None and (report.get("timing") or {}).get("images") == limit:
        split += f"[:{limit}]"
    return split


def _dataset_name(dataset: Mapping[str, Any]) -> str | None:
    """What the user evaluated: a registry dataset by its name, a `folder` dataset by its root's name."""
    name, root = dataset.get("name"), dataset.get("root")
    return Path(root).name if name == "folder" and root else name


def _label_set(report: Mapping[str, Any]) -> str:
    """Where an evaluation's words came from: the dataset's class names, a labels or synonyms file,
    or the MSeg universal classes (and the taxonomy column that maps them); zero-shot adds its
    background word."""
    config = report.get("config") or {}
    if config.get("labels_file"):
        words = f"labels file {Path(config['labels_file']).name}"
    elif config.get("synonyms"):
        words = f"synonyms {Path(config['synonyms']).name}"
    elif config.get("label_space") == "universal":
        column = report.get("taxonomy_column")
        words = "MSeg universal classes" + (f" ({column})" if column else "")
    else:
        words = "class names"
    if config.get("unseen") or config.get("unseen_file"):
        held = config.get("unseen") or Path(config["unseen_file"]).name
        if config.get("seen_bias_file"):
            held += f", seen biases {Path(config['seen_bias_file']).name}"
        elif config.get("seen_bias"):
            held += f", seen bias {config['seen_bias']:g}"
        words += f", unseen {held}"
    return words + (f", background '{config['background']}'" if config.get("background") else "")


def _key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(key) for key in ("dataset", "split", "fold", "label_set", "protocol"))


def _evaluations(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The evaluation results of a card; a card of an earlier lseg holds one, not a list."""
    found = results.get("evaluate", [])
    return [dict(found)] if isinstance(found, Mapping) else [dict(record) for record in found]


def _eval_results(results: Mapping[str, Any]) -> list[EvalResult]:
    """The Hub's `model-index`: one entry (dataset, split, config) per result that names its dataset,
    the label set and fold in the config, the protocol in each metric's config."""
    records = [(results["train"], TRAINING_VALIDATION)] if "train" in results else []
    records += [(record, record.get("label_set")) for record in _evaluations(results)]
    return [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=record["dataset"],
            dataset_name=record["dataset"],
            dataset_split=record.get("split"),
            dataset_config=", ".join(
                filter(None, [f"fold{record['fold']}" if "fold" in record else None, config])
            )
            or None,
            metric_type=key,
            metric_name=METRIC_NAMES.get(key, key),
            metric_value=value,
            metric_config=record.get("protocol"),
        )
        for record, config in records
        if record.get("dataset")
        for key, value in record["metrics"].items()
    ]


def _body(metadata: dict[str, Any]) -> str:
    info = metadata["lseg"]
    image, text = info["image_encoder"], info["text_encoder"]
    name = metadata.get("model_name") or "LSeg model"
    source = name if "/" in name else "path/to/this/folder"
    image_details = ", ".join([image["type"], *([f"preset {info['preset']}"] if "preset" in info else [])])
    text_details = " ".join([text["type"], *([text["model"]] if "model" in text else [])])
    text_details += f" ({text['pretrained']})" if text.get("pretrained") else ""
    lines = [
        f"# {name}",
        "",
        f"A language-driven semantic segmentation model ([LSeg]({PAPER})) for the "
        "[lseg](https://pypi.org/project/lseg/) library: it labels every pixel with one of the words it "
        "is given.",
        "",
        "| | |",
        "| --- | --- |",
        f"| image encoder | {image['name']} ({image_details}) |",
        f"| text encoder | {text_details} |",
        f"| default labels | {_cell(', '.join(info['labels']))} |",
        "",
        "## Usage",
        "",
        "```python",
        "from lseg import LSeg",
        "",
        f'model = LSeg.from_pretrained("{source}")',
        'result = model.segment("photo.jpg", labels=["cat", "plant", "other"])',
        "```",
        "",
        f'or `lseg segment photo.jpg --labels "cat, plant, other" --checkpoint {source} --out out/`.',
    ]
    training = info["results"].get("train")
    if training:
        lines += ["", "## Training", "", _training_summary(training)]
        if training["metrics"]:
            lines += ["", "| metric | value |", "| --- | --- |"]
            lines += [f"| {METRIC_NAMES.get(k, k)} | {v:.4f} |" for k, v in training["metrics"].items()]
    evaluations = _evaluations(info["results"])
    if evaluations:
        lines += [
            "",
            "## Evaluation",
            "",
            "`lseg evaluate`, the latest run of each dataset, split, label set and protocol:",
            "",
            *_evaluation_table(evaluations),
        ]
    return "\n".join(lines) + "\n"


def _training_summary(record: dict[str, Any]) -> str:
    where = "/".join(str(record[k]) for k in ("dataset", "split") if k in record) or "an unnamed dataset"
    training = record.get("training") or {}
    sets = "; ".join(
        f"{key}: {_cell(', '.join(labels))}" for key, labels in training.get("label_sets", {}).items()
    )
    chosen = training.get("checkpoint", "exported")
    when = ", ".join(f"{key} {training[key]}" for key in ("epoch", "step") if key in training)
    when = f" ({when})" if when else ""
    trained = f"Trained on {sets}." if sets else "Trained with lseg."
    if asked := "; ".join(
        f"{key}: {_cell(', '.join(words))}" for key, words in training.get("self_training_labels", {}).items()
    ):
        trained += f" Transductive: self-training also asked the held-out words {asked}."
    scored = f" Validation on {where} of the {chosen} checkpoint{when}:" if record["metrics"] else ""
    return trained + scored


def _evaluation_table(records: list[dict[str, Any]]) -> list[str]:
    """One row per evaluation; a column per metric any of them has."""
    keys = list(dict.fromkeys(key for record in records for key in record["metrics"]))
    header = ["dataset", "split", "labels", "protocol", *(METRIC_NAMES.get(k, k) for k in keys), "date"]
    rows = [
        [
            record.get("dataset") or "unnamed",
            str(record.get("split", f"fold {record['fold']}" if "fold" in record else "")),
            record.get("label_set", ""),
            record.get("protocol", ""),
            *(f"{record['metrics'][k]:.4f}" if k in record["metrics"] else "" for k in keys),
            str(record.get("date", ""))[:10],
        ]
        for record in records
    ]
    return [_row(header), _row(["---"] * len(header)), *(_row(map(_cell, row)) for row in rows)]


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _write(path: Path, metadata: dict[str, Any]) -> Path | None:
    """Render, sign and write the card atomically, unless README.md is someone else's."""
    if path.exists() and not _is_ours(path):
        return _leave(path)
    results = _eval_results(metadata["lseg"]["results"])
    data = ModelCardData(**metadata, **{MARKER: _UNSIGNED}, eval_results=results or None)
    text = str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(metadata)}"))
    signed = text.replace(f"{MARKER}: {_UNSIGNED}", f"{MARKER}: sha256:{_digest(text)}", 1)
    try:
        return write_text_atomic(path, signed)
    except OSError as error:  # e.g. a read-only model folder: the card is a by-product, not the result
        warnings.warn(f"cannot write model card {path}: {error.strerror or error}", stacklevel=3)
        return None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_ours(path: Path) -> bool:
    """An lseg card unchanged since lseg wrote it: its signature matches its text."""
    if not path.is_file():
        return False
    try:
        text = read_text(path, "model card")
    except LSegError:
        return False
    found = _SIGNATURE.search(text)
    if found is None:
        return False
    unsigned = text[: found.start()] + f"{MARKER}: {_UNSIGNED}" + text[found.end() :]
    return _digest(unsigned) == found[1]


def _leave(path: Path) -> None:
    warnings.warn(
        f"{path} was not written by lseg, or was edited since; left as it is (the model card was not "
        "updated: move it away to let lseg write one)",
        stacklevel=3,
    )
