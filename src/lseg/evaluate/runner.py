"""Score a model on a segmentation dataset: confusion matrix at the original label resolution.

Each image goes through the model's processor (`model.processor`: long side resized to ``size``,
normalised with the model's mean/std) and an inference protocol (`lseg.inference`, padding with the
processor's black); the summed logits are resized bilinearly back to the size of the *original* label
mask before the argmax, so every annotated pixel is scored exactly once whatever
the inference resolution. Each image's confusion matrix is counted once, into the running
`SegmentationMetrics` (summed across ranks) and into the image's own scores (mIoU over the classes in
its ground truth or prediction, pixel accuracy), by which an `ExampleTracker` keeps the best and worst
images. Each rank scores its shard (a non-padding `ShardSampler`); `gather_shards` merges them.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lseg.distributed import gather, rank_world
from lseg.errors import LSegError
from lseg.evaluate import report as reports
from lseg.evaluate.labels import IGNORE_INDEX, LabelSpace, UnseenClasses, dataset_label_space
from lseg.evaluate.metrics import (
    SegmentationMetrics,
    confusion_matrix,
    metrics_from_confusion,
    seen_unseen_scores,
)
from lseg.inference import InferenceProtocol, resolve_protocol, run_protocol
from lseg.precision import model_precision
from lseg.predictor import eval_mode, same_size_runs
from lseg.processing import LSegImageProcessor

RANK_BY = ("miou", "pixel_accuracy")


@dataclass(frozen=True)
class EvaluationSettings:
    """How a dataset is scored, in one place: protocol, resolution, precision, batching, examples kept.

    A protocol name resolves with `size`, `crop_size` and `stride` (`inference.resolve_protocol`: `size`
    resizes the image for single/slide, replaces the base size of lseg-ms); `dtype` is the forward
    passes' precision (`lseg.precision`; default: the model's); `rank_by` ("miou" or "pixel_accuracy")
    picks the `num_examples` best and worst images; `max_images` scores the first N. `unseen` (classes
    held out of training) adds seen / unseen mIoU and hIoU; `seen_bias` (one number, or one per class:
    `read_seen_bias`) is subtracted from the logits of the seen classes before the argmax (the
    calibration of generalised zero-shot segmentation);
    `prompt_templates` ask the words through these instead of the text encoder's own.
    """

    protocol: str | InferenceProtocol = "single"
    size: int | None = None
    crop_size: int | None = None
    stride: int | None = None
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype | None = None
    batch_size: int = 1
    window_batch_size: int = 8
    num_workers: int = 0
    max_images: int | None = None
    rank_by: str = "miou"
    num_examples: int = 4
    unseen: UnseenClasses | None = None
    seen_bias: float | tuple[float, ...] = 0.0
    prompt_templates: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LSegError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.rank_by not in RANK_BY:
            raise LSegError(f"rank_by must be one of {', '.join(RANK_BY)}, got {self.rank_by!r}")
        if self.size is not None and self.size < 8:
            raise LSegError(f"size must be at least 8 pixels, got {self.size}")
        if self.max_images is not None and self.max_images < 1:
            raise LSegError(f"max_images must be >= 1, got {self.max_images}")
        if self.calibrated and self.unseen is None:
            raise LSegError("seen_bias calibrates seen against unseen classes; give the unseen classes")

    @property
    def calibrated(self) -> bool:
        """Whether some seen class loses a bias."""
        return any(self.seen_bias) if isinstance(self.seen_bias, Sequence) else bool(self.seen_bias)

    def resolved_protocol(self) -> tuple[InferenceProtocol, int | None]:
        """The protocol and the image size it runs at (a protocol name resolves its own size rule)."""
        if isinstance(spec := self.protocol, str):
            return resolve_protocol(spec, self.size, self.crop_size, self.stride)
        return spec, self.size


@dataclass
class ImageScore:
    """Scores of one image (``index`` into the evaluated dataset)."""

    index: int
    path: str
    miou: float
    pixel_accuracy: float
    pixels: int  # annotated (non-ignored) pixels


@dataclass
class Example:
    """A best or worst image: the picture, its ground truth and the prediction (dataset class ids)."""

    score: ImageScore
    prediction: np.ndarray  # H x W, dataset class ids
    image: np.ndarray | None = None  # H x W x 3 uint8, filled on rank 0
    mask: np.ndarray | None = None  # H x W, dataset class ids / ignore


@dataclass
class EvaluationReport:
    """Everything an evaluation measured; `summary()` is the JSON-ready part."""

    class_names: list[str]
    labels: list[str]
    label_space: str
    confmat: Tensor  # [C, C] int64, rows = ground truth
    metrics: dict[str, Any]
    per_image: list[ImageScore]
    best: list[Example]
    worst: list[Example]
    rank_by: str
    images: int
    seconds: float
    model_seconds: float
    protocol: InferenceProtocol
    size: int | None
    device: str
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan

    def per_class_iou(self) -> dict[str, float]:
        return dict(zip(self.class_names, self.metrics["per_class_iou"], strict=True))

    def summary(self) -> dict[str, Any]:
        """The numbers of metrics.json (`report.segmentation_summary`; NaN kept as float)."""
        return reports.segmentation_summary(self)


class ShardSampler(DistributedSampler):
    """`DistributedSampler` without padding or shuffling: rank r takes indices r, r + W, ...

    The default sampler repeats samples to equalise shards, which would count them twice.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(self.rank, len(dataset), self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _samples(loader: DataLoader) -> Iterator[list[dict[str, Any]]]:
    """The loader's batches. DataLoader workers re-raise an LSegError with the worker traceback in the
    message; keep the user-facing line."""
    try:
        yield from loader
    except LSegError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise LSegError(lines[-1].split("LSegError: ", 1)[-1] if len(lines) > 1 else str(error)) from None


def dataset_classes(dataset: Dataset) -> list[str]:
    """The class names of a dataset (or of the dataset under a `Subset`)."""
    names = getattr(dataset.dataset if isinstance(dataset, Subset) else dataset, "class_names", None)
    if names is None:
        raise LSegError("the dataset has no class_names; pass class_names=[...]")
    return list(names)


def embed_labels(model: Any, labels: Sequence[str], templates: Sequence[str] | None = None) -> Tensor:
    """`model.encode_text(labels, templates)`, where a text encoder that cannot embed them is the user's
    error; without `templates` a model whose `encode_text(labels)` takes none serves too."""
    try:
        return model.encode_text(labels) if templates is None else model.encode_text(labels, templates)
    except LSegError:
        raise
    except Exception as error:
        raise LSegError(f"the model cannot embed the label text: {error}") from error


def image_shape(sample: dict[str, Any]) -> tuple[int, ...]:
    """What `same_size_runs` groups samples by: images of one shape share a forward pass."""
    return tuple(sample["image"].shape)


def mask_logits(
    forward: Callable[[Tensor], Tensor],
    samples: Sequence[dict[str, Any]],
    processor: LSegImageProcessor,
    protocol: InferenceProtocol,
    size: int | None,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    model_dtype: torch.dtype | None = None,
    window_batch_size: int = 8,
) -> list[Tensor]:
    """Float32 N x h x w logits of same-size dataset samples (uint8 3 x H x W images), each at its
    label mask's resolution.

    Images become model input through `processor` (long side `size`, the model's mean/std, as
    `segment` does), `protocol`'s passes are averaged (`run_protocol`), and the logits are resized back
    to each mask. `lseg evaluate` and validation during training both score through this, so the two
    report the same numbers for the same weights. `dtype` is the forward's precision (None: the
    ambient autocast, as under Lightning), `model_dtype` the dtype of the model's input.
    """
    images = torch.stack([sample["image"].as_subclass(Tensor) for sample in samples])
    pixel_values = processor.preprocess(images.to(device, non_blocking=True), size, dtype=model_dtype)
    logits = run_protocol(
        forward,
        pixel_values.pixel_values,
        protocol,
        pad_value=processor.pad_value(device),
        window_batch_size=window_batch_size,
        dtype=dtype,
    )
    return processor.resize_logits(logits, [sample["mask"].shape[-2:] for sample in samples])


def predict_classes(logits: Tensor, space: LabelSpace, num_classes: int) -> Tensor:
    """B x N x H x W logits (one pass's scale: `run_protocol` averages passes) -> B x H x W dataset
    class ids.

    Dataset label space: argmax. Universal label space: softmax over the universal labels, the
    probabilities of the universal classes mapped to each dataset class summed (MSeg's universal ->
    test taxonomy conversion), argmax over the dataset classes; unmapped universal classes drop out.
    """
    if space.to_class is None:
        return logits.argmax(1)
    keep = torch.nonzero(space.to_class != IGNORE_INDEX).squeeze(1)  # on the table's device
    to_class, keep = space.to_class[keep].to(logits.device), keep.to(logits.device)
    probs = logits.softmax(1)
    mapped = probs.new_zeros(probs.shape[0], num_classes, *probs.shape[-2:])
    mapped.index_add_(1, to_class, probs[:, keep])
    return mapped.argmax(1)


def seen_offsets(unseen: UnseenClasses, bias: float | Sequence[float], logits: Tensor) -> Tensor:
    """[N, 1, 1] offsets for N x H x W logits: `bias` (one number, or one per class) for every seen
    class, 0 for the unseen ones."""
    offsets = torch.as_tensor(bias, dtype=logits.dtype, device=logits.device).reshape(-1, 1, 1)
    offsets = offsets.expand(logits.shape[0], 1, 1).clone()
    offsets[list(unseen.unseen)] = 0
    return offsets


class ExampleTracker:
    """This rank's `k` best and `k` worst images by `rank_by`, keeping the predictions of those only.

    Ties: best prefers low indices, worst high ones, so the two stay disjoint. Images without a score
    (no annotated pixel) are never kept.
    """

    def __init__(self, rank_by: str, k: int, num_classes: int) -> None:
        self.rank_by, self.k = rank_by, k
        self.dtype = torch.uint8 if num_classes <= 256 else torch.int32  # of the kept predictions
        self.best: list = []  # min-heap of ((score, -index), Example): the k highest
        self.worst: list = []  # min-heap of ((-score, index), Example): the k lowest

    def offer(self, score: ImageScore, prediction: Tensor) -> None:
        """Keep the image if it is among the best or worst so far (`prediction`: its class ids)."""
        value = getattr(score, self.rank_by)
        if math.isnan(value) or self.k <= 0:
            return
        keys = ((self.best, (value, -score.index)), (self.worst, (-value, score.index)))
        wanted = [(heap, key) for heap, key in keys if len(heap) < self.k or key > heap[0][0]]
        if wanted:  # only then is the prediction copied
            example = Example(score, prediction.to(self.dtype).cpu().numpy())
            for heap, key in wanted:
                (heapq.heappush if len(heap) < self.k else heapq.heapreplace)(heap, (key, example))


@dataclass
class ShardScores:
    """What one rank measured: its running metric, kept examples, per-image scores and timings."""

    metric: SegmentationMetrics
    tracker: ExampleTracker
    records: list[ImageScore] = field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0


def gather_shards(shard: ShardScores) -> tuple[list[ImageScore], list[Example], list[Example], float, float]:
    """All ranks' per-image scores (in index order), the overall best (best first) and worst (worst
    first) examples, and the slowest rank's seconds and model seconds. With fewer than 2k scored
    images, best takes the better half."""
    rank_by, k, kept = shard.tracker.rank_by, shard.tracker.k, shard.tracker.best + shard.tracker.worst
    gathered = gather((shard.records, [e for _, e in kept], shard.seconds, shard.model_seconds))
    all_records = sorted((r for g in gathered for r in g[0]), key=lambda r: r.index)
    unique = {e.score.index: e for g in gathered for e in g[1]}.values()
    ordered = sorted(unique, key=lambda e: (-getattr(e.score, rank_by), e.score.index))  # best first
    scored = sum(not math.isnan(getattr(r, rank_by)) for r in all_records)
    n_best = min(k, math.ceil(scored / 2)) if k > 0 else 0
    worst = list(reversed(ordered[n_best:]))[:k] if k > 0 else []
    seconds, model_seconds = (max(g[i] for g in gathered) for i in (2, 3))
    return all_records, ordered[:n_best], worst, seconds, model_seconds


def shard_loader(dataset: Dataset, settings: EvaluationSettings, device: torch.device) -> DataLoader:
    """This rank's loader over the dataset cut to `max_images` (``loader.dataset``); in the order of
    ``loader.sampler``'s dataset indices."""
    if settings.max_images is not None:
        dataset = Subset(dataset, range(min(settings.max_images, len(dataset))))
    if len(dataset) == 0:
        raise LSegError("the dataset has no images")
    sampler = ShardSampler(dataset) if rank_world()[1] > 1 else None
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        num_workers=settings.num_workers,
        collate_fn=list,
        pin_memory=device.type == "cuda",
    )


def _score_shard(
    model: Any,
    loader: DataLoader,
    space: LabelSpace,
    num_classes: int,
    settings: EvaluationSettings,
    processor: LSegImageProcessor,
    progress: Callable[[int, int], None] | None,
) -> ShardScores:
    """Predict every image of this rank's shard; count its confusion matrix once, into the running
    metric and into its own scores (offered to the shard's `ExampleTracker`)."""
    device = torch.device(settings.device)
    spec, size = settings.resolved_protocol()
    compute = model_precision(model, settings.dtype, device)
    indices = list(loader.sampler)
    shard = ShardScores(
        SegmentationMetrics(num_classes).to(device),
        ExampleTracker(settings.rank_by, settings.num_examples, num_classes),
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    text = embed_labels(model, space.labels, settings.prompt_templates).to(device)
    sync()
    started = time.perf_counter()
    done = 0
    for batch in _samples(loader):
        for group in same_size_runs(batch, key=image_shape):
            tick = time.perf_counter()
            resized = mask_logits(
                lambda pixel_values: model(pixel_values, text).logits,
                group,
                processor,
                spec,
                size,
                device=device,
                dtype=compute,
                model_dtype=getattr(model, "dtype", None),
                window_batch_size=settings.window_batch_size,
            )
            if settings.calibrated:
                resized = [r - seen_offsets(settings.unseen, settings.seen_bias, r) for r in resized]
            preds = [predict_classes(r[None], space, num_classes)[0] for r in resized]
            sync()
            shard.model_seconds += time.perf_counter() - tick
            for sample, pred in zip(group, preds, strict=True):
                path = str(sample.get("path", ""))
                target = sample["mask"].as_subclass(Tensor).to(device)
                try:
                    confmat = confusion_matrix(pred, target, num_classes)
                except ValueError as error:  # label ids beyond the class list
                    raise LSegError(f"{path or 'a sample'}: {error}") from None
                shard.metric.update(confmat)
                own = metrics_from_confusion(confmat := confmat.cpu())
                index, pixels = indices[len(shard.records)], int(confmat.sum())
                score = ImageScore(index, path, own["miou"], own["pixel_accuracy"], pixels)
                shard.records.append(score)
                shard.tracker.offer(score, pred)
        done += len(batch)
        if progress is not None:  # every rank runs at about the same pace
            progress(min(done * rank_world()[1], len(loader.dataset)), len(loader.dataset))
    sync()
    shard.seconds = time.perf_counter() - started
    return shard


def evaluate_dataset(
    model: Any,
    dataset: Dataset,
    labels: Sequence[str] | LabelSpace | None = None,
    settings: EvaluationSettings | None = None,
    *,
    class_names: Sequence[str] | None = None,
    processor: LSegImageProcessor | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> EvaluationReport:
    """Evaluate `model` on a dataset of ``{"image": uint8 3xHxW, "mask": HxW, "path": str}`` samples.

    Args:
        model: an `LSeg` (anything with ``encode_text(labels)``, ``processor`` and
            ``model(pixel_values, label_embeds).logits``); moved to the settings' device.
        dataset: e.g. `lseg.data.build_dataset(...)` *without* a transform (masks stay original size).
        labels: text per dataset class (default: the class names), or a `LabelSpace`
            (e.g. `labels.universal_label_space`) asking other labels and mapping them to the classes.
        settings: how to score (`EvaluationSettings`); `options` are its fields, as a shorthand
            (``evaluate_dataset(model, dataset, protocol="single", size=48)``) or overriding `settings`.
        class_names: dataset classes (default ``dataset.class_names``).
        processor: how images become model input (default ``model.processor``, from its config).
        progress: ``progress(done, total)`` after each batch, counting images over all ranks.
    """
    settings = replace(settings or EvaluationSettings(), **options)
    class_names = list(class_names or dataset_classes(dataset))
    space = labels if isinstance(labels, LabelSpace) else dataset_label_space(class_names, labels)
    if settings.unseen is not None:
        if space.to_class is not None:
            raise LSegError("unseen classes are scored in the dataset's label space, not the universal one")
        if not set(settings.unseen.unseen + settings.unseen.apart) <= set(range(len(class_names))):
            count = len(class_names)
            raise LSegError(f"unseen class ids {settings.unseen} are not ids of the {count} classes")
        if isinstance(settings.seen_bias, Sequence) and len(settings.seen_bias) != len(class_names):
            raise LSegError(f"{len(settings.seen_bias)} seen-class biases for {len(class_names)} classes")
    spec, size = settings.resolved_protocol()
    device = torch.device(settings.device)
    loader = shard_loader(dataset, settings, device)
    if hasattr(model, "to"):
        model = model.to(device)
    mode = eval_mode(model) if isinstance(model, torch.nn.Module) else contextlib.nullcontext()
    with mode, torch.no_grad():
        shard = _score_shard(
            model, loader, space, len(class_names), settings, processor or model.processor, progress
        )
        with shard.metric.sync_context():
            confmat = shard.metric.confmat.detach().cpu().clone()

    metrics = metrics_from_confusion(confmat)
    if (unseen := settings.unseen) is not None:
        metrics |= seen_unseen_scores(metrics["per_class_iou"], unseen.unseen, unseen.apart)
    records, best, worst, seconds, model_seconds = gather_shards(shard)
    rank, world = rank_world()
    if rank == 0:  # only rank 0 draws the grid: it alone loads the pictures
        for example in {id(e): e for e in best + worst}.values():
            sample = loader.dataset[example.score.index]
            example.image = sample["image"].as_subclass(Tensor).permute(1, 2, 0).numpy().astype(np.uint8)
            example.mask = sample["mask"].as_subclass(Tensor).numpy()
    return EvaluationReport(
        class_names=class_names,
        labels=list(space.labels),
        label_space=space.name,
        confmat=confmat,
        metrics=metrics,
        per_image=records,
        best=best,
        worst=worst,
        rank_by=settings.rank_by,
        images=len(records),
        seconds=seconds,
        model_seconds=model_seconds,
        protocol=spec,
        size=size,
        device=str(device),
        world_size=world,
        extra={
            **({"taxonomy_column": space.column} if space.column else {}),
            **({"unseen": settings.unseen, "seen_bias": settings.seen_bias} if settings.unseen else {}),
        },
    )
