import math

import pytest
import torch

from lseg.evaluate.metrics import SegmentationMetrics, confusion_matrix, fb_iou, metrics_from_confusion

# Six counted pixels and one ignored (255). Rows = ground truth, columns = prediction.
TARGET = torch.tensor([[0, 0, 0, 1, 1, 2, 255]])
PRED = torch.tensor([[0, 0, 1, 1, 2, 2, 0]])
CONFMAT = torch.tensor([[2, 1, 0], [0, 1, 1], [0, 0, 1]])


def test_confusion_matrix_skips_ignored_pixels():
    assert torch.equal(confusion_matrix(PRED, TARGET, 3, ignore_index=255), CONFMAT)


def test_metrics_match_hand_computation():
    m = metrics_from_confusion(CONFMAT)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # IoU = diag / (row + column - diag): 2/3, 1/(2+2-1), 1/(1+2-1)
    assert m["per_class_iou"] == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert m["miou"] == pytest.approx(0.5)
    # fwIoU weights by ground-truth frequency 3/6, 2/6, 1/6
    assert m["fwiou"] == pytest.approx(3 / 6 * 2 / 3 + 2 / 6 * 1 / 3 + 1 / 6 * 1 / 2)


def test_absent_class_is_nan_and_excluded_but_false_positive_class_counts():
    absent = torch.zeros(4, 4, dtype=torch.long)
    absent[:3, :3] = CONFMAT
    m = metrics_from_confusion(absent)
    assert math.isnan(m["per_class_iou"][3])
    assert m["miou"] == pytest.approx(0.5)
    assert m["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)

    predicted_only = absent.clone()
    predicted_only[0, 3] = 1  # class 3 predicted once, never in the ground truth
    m = metrics_from_confusion(predicted_only)
    assert m["per_class_iou"] == pytest.approx([2 / 4, 1 / 3, 1 / 2, 0.0])
    assert m["miou"] == pytest.approx((2 / 4 + 1 / 3 + 1 / 2 + 0) / 4)
    assert m["mean_class_accuracy"] == pytest.approx((2 / 4 + 1 / 2 + 1) / 3)


def test_empty_confusion_matrix_gives_nan():
    m = metrics_from_confusion(torch.zeros(2, 2, dtype=torch.long))
    assert all(math.isnan(m[k]) for k in ("pixel_accuracy", "mean_class_accuracy", "miou", "fwiou"))


def test_fb_iou_is_mean_of_background_and_foreground_iou():
    confmat = torch.tensor([[3, 1], [2, 4]])
    assert fb_iou(confmat) == pytest.approx((3 / 6 + 4 / 7) / 2)
    assert fb_iou(torch.tensor([[5, 0], [0, 0]])) == pytest.approx(1.0)  # no foreground anywhere
    with pytest.raises(ValueError):
        fb_iou(CONFMAT)


def test_metric_accepts_labels_or_logits():
    from_labels = SegmentationMetrics(num_classes=3)
    from_labels.update(PRED, TARGET)
    from_logits = SegmentationMetrics(num_classes=3)
    from_logits.update(torch.nn.functional.one_hot(PRED.clamp(max=2), 3).permute(0, 2, 1).float(), TARGET)
    assert torch.equal(from_labels.confmat, CONFMAT)
    assert from_logits.compute() == from_labels.compute()


def test_merged_metrics_equal_one_metric_over_all_data():
    torch.manual_seed(0)
    preds = torch.randint(0, 5, (4, 8, 8))
    targets = torch.randint(0, 6, (4, 8, 8))
    targets[targets == 5] = 255
    everything = SegmentationMetrics(num_classes=5)
    everything.update(preds, targets)
    rank0, rank1 = SegmentationMetrics(num_classes=5), SegmentationMetrics(num_classes=5)
    rank0.update(preds[:1], targets[:1])
    rank1.update(preds[1:], targets[1:])
    rank0.merge_state(rank1)  # what DDP sync does with dist_reduce_fx="sum"
    assert torch.equal(rank0.confmat, everything.confmat)
    assert rank0.compute() == everything.compute()


def test_out_of_range_target_is_rejected():
    with pytest.raises(ValueError):
        SegmentationMetrics(num_classes=2).update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))


def test_fb_iou_and_per_class_accuracy_by_hand():
    m = metrics_from_confusion(CONFMAT, background=0)
    # per class: diagonal / ground-truth row: 2/3, 1/2, 1/1
    assert m["per_class_accuracy"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    # classes 1 and 2 merged into foreground: [[2, 1], [0, 3]]; IoU background 2/3, foreground 3/4
    assert m["fb_iou"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert "fb_iou" not in metrics_from_confusion(CONFMAT)  # no background class: no FB-IoU
    two_classes = metrics_from_confusion(torch.tensor([[3, 1], [2, 4]]), background=0)
    assert two_classes["fb_iou"] == fb_iou(torch.tensor([[3, 1], [2, 4]]))


def test_counted_matrices_add_like_the_pixels_they_count():
    """Callers that also score each image pass its confusion matrix: counted once, summed the same."""
    from_pixels, from_counts = SegmentationMetrics(num_classes=3), SegmentationMetrics(num_classes=3)
    from_pixels.update(PRED, TARGET)
    from_counts.update(confusion_matrix(PRED, TARGET, 3))
    from_counts.update(torch.stack([CONFMAT, CONFMAT]))  # a batch of matrices
    from_pixels.update(PRED.expand(2, -1), TARGET.expand(2, -1))
    assert torch.equal(from_counts.confmat, from_pixels.confmat)
    assert from_counts.compute() == from_pixels.compute()
    assert from_counts.confmat.dtype == torch.long


def test_tensors_stay_on_the_inputs_device():
    from lseg.evaluate.metrics import class_iou

    iou = class_iou(torch.zeros(3, 3, dtype=torch.long, device="meta"))
    assert (iou.device.type, iou.dtype) == ("meta", torch.float64)
    merged = metrics_from_confusion(CONFMAT.to(torch.int32), background=0)  # any integer counts
    assert merged == metrics_from_confusion(CONFMAT, background=0)
