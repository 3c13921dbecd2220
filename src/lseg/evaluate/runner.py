"""Score a model on a segmentation dataset: confusion matrix at the original label resolution.

Each image goes through the model's processor (`model.processor`: long side resized to ``size``,
normalised with the model's mean/std) and an inference protocol (`lseg.inference`, padding with the
processor's black); the summed logits are resized bilinearly back to the size of the *original* label
mask before the argmax, so every annotated pixel is scored exactly once whatever
the inference resolution. The confusion matrix is a `SegmentationMetrics` (torchmetrics) state:
under ``torch.distributed`` each rank scores its shard (a non-padding `DistributedSampler`) and the
matrices are summed across ranks. Per-image scores (mIoU over the classes present in the image's
ground truth or prediction, and pixel accuracy) are kept to pick the best and worst images.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lseg.errors import LSegError
from lseg.evaluate.labels import IGNORE_INDEX, LabelSpace, dataset_label_space
from lseg.evaluate.metrics import SegmentationMetrics, class_iou, confusion_matrix, metrics_from_confusion
from lseg.inference import InferenceProtocol, resolve_protocol, run_protocol
from lseg.precision import model_precision
from lseg.processing import LSegImageProcessor

RANK_BY = ("miou", "pixel_accuracy")


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
        """Plain-Python numbers (NaN kept as float; see `report.to_json`)."""
        m = self.metrics
        return {
            "metrics": {
                "pixel_accuracy": m["pixel_accuracy"],
                "mean_class_accuracy": m["mean_class_accuracy"],
                "miou": m["miou"],
                "fwiou": m["fwiou"],
                "per_class_iou": self.per_class_iou(),
                "per_class_accuracy": dict(zip(self.class_names, m["per_class_accuracy"], strict=True)),
                "classes_scored": int(sum(not math.isnan(v) for v in m["per_class_iou"])),
            },
            "class_names": self.class_names,
            "labels": self.labels,
            "label_space": self.label_space,
            "protocol": asdict(self.protocol),
            "size": self.size,
            "timing": {
                "images": self.images,
                "seconds": self.seconds,
                "model_seconds": self.model_seconds,
                "images_per_second": self.images_per_second,
                "world_size": self.world_size,
            },
            "device": self.device,
            "rank_by": self.rank_by,
            "best": [asdict(e.score) for e in self.best],
            "worst": [asdict(e.score) for e in self.worst],
            "per_image": [asdict(s) for s in self.per_image],
            "confusion_matrix": self.confmat.tolist(),
        }


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


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def _gather(obj: Any) -> list[Any]:
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _first_line(error: Exception) -> str:
    """DataLoader workers re-raise with the worker traceback in the message; keep the user-facing line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(error)
    last = lines[-1]
    return last.split("LSegError: ", 1)[-1]


def _samples(loader: DataLoader) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except LSegError as error:
            raise LSegError(_first_line(error)) from None
        yield batch


def same_size_groups(batch: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Consecutive samples whose images have one size: one forward pass each, never padded together
    (a ViT's attention would see the other images' padding)."""
    group: list[dict[str, Any]] = []
    for sample in batch:
        if group and tuple(sample["image"].shape) != tuple(group[0]["image"].shape):
            yield group
            group = []
        group.append(sample)
    if group:
        yield group


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
    to_class = space.to_class.to(logits.device)
    keep = torch.nonzero(to_class != IGNORE_INDEX).squeeze(1)
    probs = logits.softmax(1)
    mapped = probs.new_zeros(probs.shape[0], num_classes, *probs.shape[-2:])
    mapped.index_add_(1, to_class[keep], probs[:, keep])
    return mapped.argmax(1)


def image_scores(confmat: Tensor) -> tuple[float, float, int]:
    """(mIoU over classes in GT or prediction, pixel accuracy, annotated pixels) of one image."""
    iou = class_iou(confmat)
    valid = iou[~iou.isnan()]
    total = int(confmat.sum())
    miou = float(valid.mean()) if valid.numel() else math.nan
    accuracy = float(confmat.diagonal().sum()) / total if total else math.nan
    return miou, accuracy, total


def _qualifies(heap: list, k: int, key: tuple[float, int]) -> bool:
    return k > 0 and (len(heap) < k or key > heap[0][0])


def _push(heap: list, k: int, key: tuple[float, int], item: Any) -> None:
    """Keep the k items of largest `key` (keys are unique: they end with the image index)."""
    if not _qualifies(heap, k, key):
        return
    if len(heap) < k:
        heapq.heappush(heap, (key, item))
    else:
        heapq.heapreplace(heap, (key, item))


def _to_numpy_image(image: Tensor) -> np.ndarray:
    return image.as_subclass(Tensor).permute(1, 2, 0).contiguous().numpy().astype(np.uint8)


def evaluate_dataset(
    model: Any,
    dataset: Dataset,
    labels: Sequence[str] | LabelSpace | None = None,
    protocol: str | InferenceProtocol = "single",
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    *,
    class_names: Sequence[str] | None = None,
    size: int | None = None,
    num_workers: int = 0,
    max_images: int | None = None,
    rank_by: str = "miou",
    num_examples: int = 4,
    dtype: str | torch.dtype | None = None,
    window_batch_size: int = 8,
    processor: LSegImageProcessor | None = None,
    ignore_index: int = IGNORE_INDEX,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationReport:
    """Evaluate `model` on a dataset of ``{"image": uint8 3xHxW, "mask": HxW, "path": str}`` samples.

    Args:
        model: an `LSeg` (anything with ``encode_text(labels)``, ``processor`` and
            ``model(pixel_values, label_embeds).logits``).
        dataset: e.g. `lseg.data.build_dataset(...)` *without* a transform (masks stay original size).
        labels: text per dataset class (default: the class names), or a `LabelSpace`
            (e.g. `labels.universal_label_space`) asking other labels and mapping them to the classes.
        protocol: name or `InferenceProtocol`; run at the (resized) image, scored at mask resolution.
        device: where the model runs (the model is moved there).
        batch_size: images per forward pass; consecutive images of one size are batched together.
        class_names: dataset classes (default ``dataset.class_names``).
        size: long side the model sees at scale 1 (None: original size): resizes the image for
            single/slide, replaces the base size of lseg-ms/openscene (`inference.resolve_protocol`).
        max_images: evaluate only the first N images.
        rank_by: per-image score choosing best / worst images: "miou" or "pixel_accuracy".
        num_examples: how many best and how many worst images to keep.
        dtype: precision of the forward passes (`lseg.precision`; default: the model's, bf16 autocast on
            CUDA).
        processor: how images become model input (default ``model.processor``, from its config).
        progress: ``progress(done, total)`` after each batch (this rank's counts).
    """
    if batch_size < 1:
        raise LSegError(f"batch_size must be >= 1, got {batch_size}")
    if rank_by not in RANK_BY:
        raise LSegError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    if size is not None and size < 8:
        raise LSegError(f"size must be at least 8 pixels, got {size}")
    if class_names is None:
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        class_names = getattr(base, "class_names", None)
        if class_names is None:
            raise LSegError("the dataset has no class_names; pass class_names=[...]")
    class_names = list(class_names)
    num_classes = len(class_names)
    space = labels if isinstance(labels, LabelSpace) else dataset_label_space(class_names, labels)
    if isinstance(protocol, str):
        spec, size = resolve_protocol(protocol, size)
    else:
        spec = protocol
    device = torch.device(device)
    compute = model_precision(model, dtype, device)
    processor = processor or model.processor

    if max_images is not None:
        if max_images < 1:
            raise LSegError(f"max_images must be >= 1, got {max_images}")
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    if len(dataset) == 0:
        raise LSegError("the dataset has no images")
    rank, world = _rank_world()
    sampler = ShardSampler(dataset) if world > 1 else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=list,
        pin_memory=device.type == "cuda",
    )

    if hasattr(model, "to"):
        model = model.to(device)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    metric = SegmentationMetrics(num_classes, ignore_index=ignore_index).to(device)
    records: list[ImageScore] = []
    best: list = []  # min-heap of ((score, -index), Example): the k highest
    worst: list = []  # min-heap of ((-score, index), Example): the k lowest
    total = len(sampler) if sampler is not None else len(dataset)
    done = 0
    model_seconds = 0.0
    pred_dtype = torch.uint8 if num_classes <= 256 else torch.int32

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        with torch.no_grad():
            try:
                text = model.encode_text(space.labels)
            except LSegError:
                raise
            except Exception as error:  # a model whose text encoder cannot embed labels
                raise LSegError(f"the model cannot embed the label text: {error}") from error
            text = text.to(device)

            def forward(batch: Tensor) -> Tensor:
                return model(batch, text).logits

            sync()
            started = time.perf_counter()
            position = 0
            indices = sampler.indices if sampler is not None else list(range(len(dataset)))
            for batch in _samples(loader):
                for group in same_size_groups(batch):
                    masks = [s["mask"].as_subclass(Tensor) for s in group]
                    tick = time.perf_counter()
                    resized = mask_logits(
                        forward,
                        group,
                        processor,
                        spec,
                        size,
                        device=device,
                        dtype=compute,
                        model_dtype=getattr(model, "dtype", None),
                        window_batch_size=window_batch_size,
                    )
                    preds = [predict_classes(r[None], space, num_classes)[0] for r in resized]
                    sync()
                    model_seconds += time.perf_counter() - tick
                    for sample, mask, pred in zip(group, masks, preds, strict=True):
                        target = mask.to(device)
                        path = str(sample.get("path", ""))
                        try:
                            confmat = confusion_matrix(pred, target, num_classes, ignore_index)
                        except ValueError as error:  # label ids beyond the class list
                            raise LSegError(f"{path or 'a sample'}: {error}") from None
                        metric.update(pred[None], target[None])
                        confmat = confmat.cpu()
                        miou, accuracy, pixels = image_scores(confmat)
                        score = ImageScore(indices[position], path, miou, accuracy, pixels)
                        position += 1
                        records.append(score)
                        key = miou if rank_by == "miou" else accuracy
                        if math.isnan(key) or num_examples <= 0:
                            continue
                        # ties: best prefers low indices, worst high ones, so the two stay disjoint
                        best_key, worst_key = (key, -score.index), (-key, score.index)
                        if _qualifies(best, num_examples, best_key) or _qualifies(
                            worst, num_examples, worst_key
                        ):
                            example = Example(score, pred.to(pred_dtype).cpu().numpy())
                            _push(best, num_examples, best_key, example)
                            _push(worst, num_examples, worst_key, example)
                done += len(batch)
                if progress is not None:
                    progress(done, total)
            sync()
            seconds = time.perf_counter() - started
            with metric.sync_context():
                confmat = metric.confmat.detach().cpu().clone()
    finally:
        if hasattr(model, "train"):
            model.train(was_training)

    gathered = _gather(
        {
            "records": records,
            "best": [e for _, e in best],
            "worst": [e for _, e in worst],
            "seconds": seconds,
            "model_seconds": model_seconds,
        }
    )
    all_records = sorted((r for g in gathered for r in g["records"]), key=lambda r: r.index)

    def key_of(example: Example) -> float:
        return getattr(example.score, rank_by)

    candidates = {e.score.index: e for g in gathered for e in g["best"] + g["worst"]}.values()
    ordered = sorted(candidates, key=lambda e: (-key_of(e), e.score.index))  # best first
    scored = sum(not math.isnan(getattr(r, rank_by)) for r in all_records)
    n_best = min(num_examples, math.ceil(scored / 2)) if num_examples > 0 else 0
    best_examples = ordered[:n_best]
    worst_examples = list(reversed(ordered[n_best:]))[:num_examples] if num_examples > 0 else []
    if rank == 0:
        for example in {id(e): e for e in best_examples + worst_examples}.values():
            sample = dataset[example.score.index]
            example.image = _to_numpy_image(sample["image"])
            example.mask = sample["mask"].as_subclass(Tensor).numpy()

    metrics = metrics_from_confusion(confmat)
    gt = confmat.sum(1).double()
    metrics["per_class_accuracy"] = torch.where(
        gt > 0, confmat.diagonal().double() / gt.clamp(min=1), torch.full_like(gt, math.nan)
    ).tolist()
    return EvaluationReport(
        class_names=class_names,
        labels=list(space.labels),
        label_space=space.name,
        confmat=confmat,
        metrics=metrics,
        per_image=all_records,
        best=best_examples,
        worst=worst_examples,
        rank_by=rank_by,
        images=len(all_records),
        seconds=max(g["seconds"] for g in gathered),
        model_seconds=max(g["model_seconds"] for g in gathered),
        protocol=spec,
        size=size,
        device=str(device),
        world_size=world,
        extra={"taxonomy_column": space.column} if space.column else {},
    )
