"""Semantic segmentation metrics from a confusion matrix, DDP-safe through torchmetrics.

Convention (used by every function here): ``confmat[t, p]`` counts pixels of ground-truth class ``t``
predicted as ``p``; pixels whose target equals ``ignore_index`` are not counted. A class absent from
both prediction and ground truth has an undefined IoU (NaN) and is excluded from the means; a class
that is only predicted has IoU 0 and counts. Class accuracy is undefined (NaN) for classes absent from
the ground truth. Frequency-weighted IoU weights each IoU by the class's share of ground-truth pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from lseg.data import IGNORE_INDEX


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> Tensor:
    """[C, C] int64 confusion matrix (rows = ground truth) of label maps of equal shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target labels must be in [0, {num_classes}) or ignore_index={ignore_index}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predicted labels must be in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _nanmean(values: Tensor) -> float:
    valid = values[~values.isnan()]
    return float(valid.mean()) if valid.numel() else math.nan


def class_iou(confmat: Tensor) -> Tensor:
    """Per-class IoU (float64); NaN where the class is absent from both prediction and ground truth."""
    confmat = confmat.double()
    inter = confmat.diagonal()
    union = confmat.sum(0) + confmat.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))


def metrics_from_confusion(confmat: Tensor) -> dict[str, float | list[float]]:
    """Pixel accuracy, mean class accuracy, mIoU, per-class IoU and fwIoU of a confusion matrix.

    See the module docstring for the NaN / exclusion convention. Scalars are floats in [0, 1]
    (NaN when nothing was counted), `per_class_iou` is a list with one float per class.
    """
    confmat = confmat.double()
    total = confmat.sum()
    gt = confmat.sum(1)
    inter = confmat.diagonal()
    iou = class_iou(confmat)
    accuracy = torch.where(gt > 0, inter / gt.clamp(min=1), torch.full_like(gt, math.nan))
    freq = gt / total if total > 0 else gt
    return {
        "pixel_accuracy": float(inter.sum() / total) if total > 0 else math.nan,
        "mean_class_accuracy": _nanmean(accuracy),
        "miou": _nanmean(iou),
        "per_class_iou": iou.tolist(),
        "fwiou": float((freq * iou.nan_to_num(0.0)).sum()) if total > 0 else math.nan,
    }


def fb_iou(confmat: Tensor) -> float:
    """FB-IoU of a binary [2, 2] confusion matrix: mean of background and foreground IoU.

    This is the PASCAL-5i / COCO-20i convention (e.g. HSNet): accumulate the matrix over all
    episodes first, then average the two IoUs; a class absent from both sides is excluded.
    """
    if confmat.shape != (2, 2):
        raise ValueError(f"FB-IoU needs a [2, 2] confusion matrix, got {tuple(confmat.shape)}")
    return _nanmean(class_iou(confmat))


class SegmentationMetrics(Metric):
    """Accumulates a confusion matrix (summed across DDP ranks) and reports `metrics_from_confusion`.

    `update` takes label maps [B, H, W] or logits [B, C, H, W] (argmax over C) and targets [B, H, W];
    target pixels equal to `ignore_index` are skipped.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confmat: Tensor

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of predictions (labels or logits) against integer targets."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(1)
        self.confmat += confusion_matrix(pred, target, self.num_classes, self.ignore_index).to(self.confmat)

    def compute(self) -> dict[str, float | list[float]]:
        """Metrics of everything seen so far (all ranks after sync)."""
        return metrics_from_confusion(self.confmat)
