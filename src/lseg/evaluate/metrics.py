"""The one scoring core: confusion-matrix metrics of `lseg evaluate`, validation, the quickstart and
zero-shot, synced across ranks by torchmetrics.

Convention (used by every function here): ``confmat[t, p]`` counts pixels of ground-truth class ``t``
predicted as ``p``; pixels whose target equals ``ignore_index`` are not counted. A class absent from
both prediction and ground truth has an undefined IoU (NaN) and is excluded from the means; a class
that is only predicted has IoU 0 and counts. Class accuracy is undefined (NaN) for classes absent from
the ground truth. Frequency-weighted IoU weights each IoU by the class's share of ground-truth pixels.
FB-IoU is the mean IoU of the background class and of all other classes merged into one foreground.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import multiclass_confusion_matrix

from lseg.data import IGNORE_INDEX


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> Tensor:
    """[C, C] int64 confusion matrix (rows = ground truth) of label maps of equal shape.

    torchmetrics counts; the range checks are ours, so a bad label id is an error, not a wrong count.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.reshape(-1), target.reshape(-1)
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target labels must be in [0, {num_classes}) or ignore_index={ignore_index}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predicted labels must be in [0, {num_classes})")
    return multiclass_confusion_matrix(pred, target, num_classes, validate_args=False)


def _nanmean(values: Tensor) -> float:
    valid = values[~values.isnan()]
    return float(valid.mean()) if valid.numel() else math.nan


def class_iou(confmat: Tensor) -> Tensor:
    """Per-class IoU (float64); NaN where the class is absent from both prediction and ground truth."""
    confmat = confmat.double()
    inter = confmat.diagonal()
    union = confmat.sum(0) + confmat.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))


def fb_iou(confmat: Tensor) -> float:
    """FB-IoU of a binary [2, 2] confusion matrix: mean of background and foreground IoU.

    This is the PASCAL-5i / COCO-20i convention (e.g. HSNet): accumulate the matrix over all
    episodes first, then average the two IoUs; a class absent from both sides is excluded.
    """
    if confmat.shape != (2, 2):
        raise ValueError(f"FB-IoU needs a [2, 2] confusion matrix, got {tuple(confmat.shape)}")
    return _nanmean(class_iou(confmat))


def _foreground_background(confmat: Tensor, background: int) -> Tensor:
    """[2, 2] matrix of `background` against every other class merged (background first)."""
    foreground = torch.arange(confmat.shape[0], device=confmat.device) != background
    rows = torch.stack([confmat[background], confmat[foreground].sum(0)])
    return torch.stack([rows[:, background], rows[:, foreground].sum(1)], dim=1)


def metrics_from_confusion(confmat: Tensor, background: int | None = None) -> dict[str, float | list[float]]:
    """Pixel accuracy, mean class accuracy, mIoU, per-class IoU, fwIoU and per-class accuracy of a
    confusion matrix; ``fb_iou`` too when `background` names the background class.

    See the module docstring for the NaN / exclusion convention. Scalars are floats in [0, 1]
    (NaN when nothing was counted), per-class values are lists with one float per class.
    """
    confmat = confmat.double()
    total = confmat.sum()
    gt = confmat.sum(1)
    inter = confmat.diagonal()
    iou = class_iou(confmat)
    accuracy = torch.where(gt > 0, inter / gt.clamp(min=1), torch.full_like(gt, math.nan))
    freq = gt / total if total > 0 else gt
    scores: dict[str, float | list[float]] = {
        "pixel_accuracy": float(inter.sum() / total) if total > 0 else math.nan,
        "mean_class_accuracy": _nanmean(accuracy),
        "miou": _nanmean(iou),
        "per_class_iou": iou.tolist(),
        "fwiou": float((freq * iou.nan_to_num(0.0)).sum()) if total > 0 else math.nan,
        "per_class_accuracy": accuracy.tolist(),
    }
    if background is not None:
        scores["fb_iou"] = fb_iou(_foreground_background(confmat, background))
    return scores


class SegmentationMetrics(MulticlassConfusionMatrix):
    """torchmetrics' confusion matrix (summed across DDP ranks) reporting `metrics_from_confusion`.

    `update` takes label maps [B, H, W] or logits [B, C, H, W] (argmax over C) and targets [B, H, W]
    (pixels equal to `ignore_index` skipped), or, without a target, confusion matrices already
    counted by `confusion_matrix`: a caller that also scores each image counts its pixels once.
    `background` adds FB-IoU with that class as background (zero-shot benchmarks).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = IGNORE_INDEX,
        background: int | None = None,
        **kwargs: object,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(num_classes, ignore_index=ignore_index, validate_args=False, **kwargs)
        self.background = background

    def update(self, pred: Tensor, target: Tensor | None = None) -> None:
        """Add a batch of predictions (labels or logits) against integer targets, or counted matrices."""
        if target is not None:
            labels = pred.argmax(1) if pred.ndim == target.ndim + 1 else pred
            pred = confusion_matrix(labels, target, self.num_classes, self.ignore_index)
        self.confmat += pred.reshape(-1, self.num_classes, self.num_classes).sum(0).to(self.confmat)

    def compute(self) -> dict[str, float | list[float]]:
        """Metrics of everything seen so far (all ranks after sync)."""
        return metrics_from_confusion(self.confmat, self.background)


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b): the hIoU of seen and unseen mIoU (0 when both are 0, NaN when either is NaN)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def seen_unseen_scores(
    per_class_iou: Sequence[float], unseen: Sequence[int], apart: Sequence[int] = ()
) -> dict[str, float]:
    """Generalised zero-shot summary (ZS3Net, SPNet): mIoU over the seen classes, over the `unseen`
    ones and their harmonic mean hIoU; classes `apart` (too few pixels) only get their own mean.

    Every class was asked; means skip classes without a defined IoU, as `miou` does.
    """
    iou = torch.tensor(per_class_iou, dtype=torch.float64)
    held, rare = set(unseen), set(apart)
    seen = [i for i in range(len(iou)) if i not in held | rare]
    scores = {
        "miou_seen": _nanmean(iou[seen]),
        "miou_unseen": _nanmean(iou[sorted(held)]),
    }
    scores["hiou"] = harmonic_mean(scores["miou_seen"], scores["miou_unseen"])
    if rare:
        scores["miou_apart"] = _nanmean(iou[sorted(rare)])
    return scores
