"""The evaluation entry points that `lseg evaluate` and notebooks call.

`evaluate` scores a model on a segmentation dataset (a `lseg.data` dataset, masks at full size) and
returns an `EvaluationReport`; `evaluate_zeroshot` scores one fold of a zero-shot benchmark and returns
a `ZeroShotReport`. Both take an `LSeg` and the user's choices (words, protocol, size); the report
files are written by `lseg.evaluate.report`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, Subset

from lseg.data import build_dataset, dataset_record
from lseg.device import resolve_device
from lseg.distributed import is_distributed
from lseg.errors import LSegError
from lseg.evaluate.labels import LabelSpace, UnseenClasses, build_label_space, load_synonyms, read_unseen
from lseg.evaluate.runner import (
    EvaluationReport,
    EvaluationSettings,
    dataset_classes,
    embed_labels,
    evaluate_dataset,
)
from lseg.evaluate.zeroshot import ZeroShotReport, ZeroShotSettings, benchmark_classes, score_episodes
from lseg.inference import InferenceProtocol, get_protocol, run_protocol
from lseg.precision import model_precision

if TYPE_CHECKING:
    from lseg.data import ListFileDataset
    from lseg.model import LSeg

Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------- datasets
def default_split(dataset: str) -> str | None:
    """The split evaluated when none is given (its registry record's: val, none for `folder`)."""
    return dataset_record(dataset).default_split


def load_dataset(
    name: str, root: str | Path, split: str | None = None, sequences: list[str] | None = None
) -> ListFileDataset:
    """A registry dataset to evaluate (MSeg ones in their own taxonomy, no transform), every listed
    image and label file checked up front so a missing one fails before any inference.

    `sequences` (camvid, folder) keeps those drives, e.g. a drive held out of training.
    """
    split = default_split(name) if split is None else split
    record = dataset_record(name)
    extra = dict(record.evaluation_options)
    if sequences is not None:
        if not record.has_sequences:
            raise LSegError(f"sequences select drives (camvid, folder); dataset '{name}' has none")
        extra["sequences"] = sequences
    dataset = build_dataset(name, root, split, **extra)
    missing = [
        str(dataset.root / file)
        for pair in dataset.pairs
        for file in pair
        if not (dataset.root / file).is_file()
    ]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise LSegError(f"{len(missing)} dataset file(s) not found: {', '.join(missing[:3])}{more}")
    return dataset


# ----------------------------------------------------------------------------- models
def _model_device(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _asked_templates(model: Any, template: str | None) -> tuple[list[str], list[str] | None]:
    """The prompt templates a run asks its words through (`template`, else the model's own), and those
    to pass to `encode_text` (None: the text encoder's own); checks the model can embed words."""
    encoder = getattr(model, "text_encoder", None)
    if encoder is None or not hasattr(encoder, "encode"):
        raise LSegError("the model has no text encoder to embed the label words")
    if template is None:
        return list(encoder.prompt_templates), None
    return [template], [template]  # the text encoder checks it


# ----------------------------------------------------------------------------- segmentation datasets
def evaluate(
    model: LSeg,
    dataset: Dataset,
    protocol: str | InferenceProtocol = "single",
    labels: Sequence[str] | LabelSpace | None = None,
    *,
    label_space: str = "dataset",
    labels_file: str | Path | None = None,
    synonyms: Mapping[str, str] | str | Path | None = None,
    taxonomy_column: str | None = None,
    prompt_template: str | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> EvaluationReport:
    """Score `model` on `dataset` (e.g. `load_dataset("camvid", root)`) at the masks' resolution.

    The words asked are the dataset's class names unless `labels` (one per class, or a ready
    `LabelSpace`), `labels_file` or `synonyms` (a ``{class: word}`` mapping or file) say otherwise;
    ``label_space="universal"`` asks the 194 MSeg universal classes instead and maps the predictions to
    the dataset's classes through MSeg_master.tsv (column of the dataset's registry name, or
    `taxonomy_column`). `prompt_template` replaces the model's templates for this run; `device`
    defaults to the model's; `options` are the other `EvaluationSettings` (size, crop_size, stride,
    batch_size, num_workers, max_images, rank_by, num_examples, dtype; ``unseen``: class names held
    out of training, or `UnseenClasses`, for seen / unseen mIoU and hIoU; ``seen_bias``: their
    calibration, one number or one per class). Under torch.distributed each rank scores a shard;
    `progress(done, total)` counts images over all ranks.
    """
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    class_names = dataset_classes(dataset)
    if isinstance(labels, LabelSpace):
        if (label_space, labels_file, synonyms, taxonomy_column) != ("dataset", None, None, None):
            raise LSegError("a LabelSpace already says which words to ask; drop the other label options")
        space = labels
    else:
        space = build_label_space(
            class_names,
            dataset=getattr(base, "name", None),
            label_space=label_space,
            labels=labels,
            labels_file=labels_file,
            synonyms=synonyms,
            taxonomy_column=taxonomy_column,
        )
    device = _model_device(model) if device is None else resolve_device(device)
    if not isinstance(unseen := options.get("unseen"), UnseenClasses | None):
        options["unseen"] = read_unseen(class_names, unseen)
    templates, asked = _asked_templates(model, prompt_template)
    settings = EvaluationSettings(protocol=protocol, device=device, prompt_templates=asked, **options)
    report = evaluate_dataset(model, dataset, space, settings, class_names=class_names, progress=progress)
    report.extra["prompt_templates"] = templates
    return report


# ----------------------------------------------------------------------------- zero-shot benchmarks
def evaluate_zeroshot(
    model: LSeg,
    benchmark: str,
    root: str | Path,
    fold: int = 0,
    *,
    synonyms: Mapping[str, str] | str | Path | None = None,
    size: int = 480,
    prompt_template: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> ZeroShotReport:
    """Zero-shot mIoU and FB-IoU of `model` on one fold of pascal-5i, coco-20i or fss-1000.

    Each episode asks ``[background, class word]`` once at `size` x `size` (the paper's single
    protocol); `synonyms` (``{class: word}`` or a synonyms file) replace class names as words; `device`
    defaults to the model's; `options` are the other `ZeroShotSettings` (background, batch_size,
    num_workers, max_episodes, coco_episodes, seed). One process only (not under torchrun). See
    `lseg.evaluate.zeroshot` for the episode rules.
    """
    if is_distributed():
        raise LSegError("zero-shot benchmarks run in one process; run without torchrun")
    words = load_synonyms(synonyms, benchmark_classes(benchmark)) if synonyms is not None else {}
    device = _model_device(model) if device is None else resolve_device(device)
    model = model.to(device).eval()
    processor = model.processor
    settings = ZeroShotSettings(
        image_size=size, mean=processor.mean, std=processor.std, device=device, **options
    )
    spec = get_protocol("single")
    compute = model_precision(model, dtype, device)
    pad_value = processor.pad_value(device, model.dtype)
    templates, asked = _asked_templates(model, prompt_template)

    def predict(images: torch.Tensor, labels: list[str]) -> torch.Tensor:
        text = embed_labels(model, [labels[0], words.get(labels[1], labels[1])], asked)
        return run_protocol(
            lambda x: model(x, text).logits, images.to(model.dtype), spec, pad_value=pad_value, dtype=compute
        )

    embed_labels(model, [settings.background], asked)
    report = score_episodes(predict, benchmark, root, fold, settings, progress=progress)
    labels = {name: words.get(name, name) for name in report.per_class_iou}
    return replace(report, labels=labels, prompt_templates=templates)
