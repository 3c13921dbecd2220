"""`evaluate_dataset` with a fake model: label spaces, best/worst selection, synonyms, DDP sharding."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from lseg.errors import LSegError
from lseg.evaluate.labels import LabelSpace, apply_synonyms, read_labels_file, read_synonyms
from lseg.evaluate.metrics import SegmentationMetrics, confusion_matrix, metrics_from_confusion
from lseg.evaluate.runner import (
    EvaluationSettings,
    ExampleTracker,
    ImageScore,
    ShardSampler,
    evaluate_dataset,
    predict_classes,
)
from lseg.model.lseg import LSegOutput
from lseg.processing import LSegImageProcessor

CLASSES = ["sky", "road", "car"]


class Painted(Dataset):
    """Images whose red channel holds the class id * 50; image i predicts wrongly its first i columns."""

    class_names = CLASSES

    def __init__(self, count: int = 5, height: int = 6, width: int = 8) -> None:
        self.samples = []
        for i in range(count):
            mask = torch.zeros(height, width, dtype=torch.int64)
            mask[:, width // 3 :] = 1
            mask[: height // 2, 2 * width // 3 :] = 2
            mask[0, 0] = 255
            shown = mask.clamp(max=2).clone()
            shown[:, :i] = (shown[:, :i] + 1) % 3  # i wrong columns
            image = (shown * 50).to(torch.uint8).expand(3, height, width).clone()
            self.samples.append({"image": image, "mask": mask, "path": f"img{i}.png"})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


class FakeModel:
    """Decodes the painted class: perfect where the image is painted right."""

    processor = LSegImageProcessor((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def encode_text(self, labels):
        self.asked.append(list(labels))
        return torch.eye(len(labels))

    def __call__(self, pixel_values, text):
        grey = torch.round((pixel_values[:, 0] * 0.5 + 0.5) * 255 / 50).long().clamp(0, text.shape[0] - 1)
        logits = torch.nn.functional.one_hot(grey, text.shape[0]).permute(0, 3, 1, 2).float()
        return LSegOutput(logits, pixel_embeds=None, label_embeds=text)


def test_best_and_worst_are_disjoint_and_ordered():
    report = evaluate_dataset(FakeModel(), Painted(5), num_examples=2, batch_size=2)
    assert report.images == 5 and [r.index for r in report.per_image] == [0, 1, 2, 3, 4]
    assert report.per_image[0].miou == 1.0 and report.per_image[0].pixels == 47
    assert [e.score.index for e in report.best] == [0, 1]
    assert [e.score.index for e in report.worst] == [4, 3]
    assert report.best[0].image.shape == (6, 8, 3) and report.best[0].mask.shape == (6, 8)
    assert report.metrics["miou"] < 1.0 and report.confmat.sum() == 5 * 47
    few = evaluate_dataset(FakeModel(), Painted(3), num_examples=4, max_images=3)
    assert [e.score.index for e in few.best] == [0, 1] and [e.score.index for e in few.worst] == [2]
    accuracy = evaluate_dataset(FakeModel(), Painted(3), num_examples=1, rank_by="pixel_accuracy")
    assert accuracy.best[0].score.pixel_accuracy == 1.0


def test_labels_replace_the_text_but_not_the_class_names():
    model = FakeModel()
    report = evaluate_dataset(model, Painted(1), ["blue sky", "street", "automobile"])
    assert model.asked == [["blue sky", "street", "automobile"]]
    assert report.per_class_iou() == {"sky": 1.0, "road": 1.0, "car": 1.0}
    with pytest.raises(LSegError, match="2 labels given for 3 classes"):
        evaluate_dataset(model, Painted(1), ["a", "b"])


def test_universal_predictions_sum_probabilities_of_mapped_classes():
    # labels: u0 -> class 0, u1 and u2 -> class 1, u3 -> nothing
    space = LabelSpace("universal", ["u0", "u1", "u2", "u3"], torch.tensor([0, 1, 1, 255]))
    logits = torch.log(torch.tensor([0.3, 0.25, 0.2, 0.25])).view(1, 4, 1, 1)
    assert predict_classes(logits, space, 2).item() == 1  # 0.45 beats 0.3; unmapped u3 drops out
    logits = torch.log(torch.tensor([0.3, 0.1, 0.1, 0.5])).view(1, 4, 1, 1)
    assert predict_classes(logits, space, 2).item() == 0
    assert predict_classes(logits, LabelSpace("dataset", ["a"] * 4), 4).item() == 3


def test_shard_sampler_splits_without_padding():
    dataset = list(range(5))
    shards = [list(ShardSampler(dataset, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]] and len(ShardSampler(dataset, num_replicas=2, rank=1)) == 2


def test_synonym_and_labels_files(tmp_path):
    path = tmp_path / "syn.txt"
    path.write_text("# comment\n\nSky: blue sky\nROAD\tstreet, road\n")
    synonyms = read_synonyms(path, ["Sky", "Road", "Car"])
    assert synonyms == {"Sky": "blue sky", "Road": "street, road"}
    assert apply_synonyms(["Sky", "Road", "Car"], synonyms) == ["blue sky", "street, road", "Car"]
    path.write_text("Sky: a\nSky: b\n")
    with pytest.raises(LSegError, match="given twice"):
        read_synonyms(path, ["Sky"])
    path.write_text("Sky a\n")
    with pytest.raises(LSegError, match="expected 'ClassName: word'"):
        read_synonyms(path, ["Sky"])
    with pytest.raises(LSegError, match="not found"):
        read_synonyms(tmp_path / "missing.txt", ["Sky"])
    labels = tmp_path / "labels.txt"
    labels.write_text("a\n\nb\n")
    assert read_labels_file(labels, ["x", "y"]) == ["a", "b"]


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        report = evaluate_dataset(FakeModel(), Painted(5), num_examples=1)
        result = (
            report.confmat.tolist(),
            [r.index for r in report.per_image],
            report.best[0].score.index,
            report.worst[0].score.index,
            report.best[0].image is not None,
        )
        with open(f"{folder}/rank{rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_matches_single_process(tmp_path):
    single = evaluate_dataset(FakeModel(), Painted(5), num_examples=1)
    # fork: children inherit the imported modules (spawn re-imports torch + lseg: ~10 s on 2 cores)
    context = mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed evaluation did not finish in 120 s")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in (0, 1):
        confmat, indices, best, worst, has_image = results[rank]
        assert confmat == single.confmat.tolist()  # summed across ranks, no sample counted twice
        assert indices == [0, 1, 2, 3, 4]
        assert (best, worst) == (0, 4)
    assert results[0][4] and not results[1][4]  # only rank 0 loads the pictures for the grid
    assert not math.isnan(single.metrics["miou"])


def test_label_ids_beyond_the_classes_name_the_image():
    dataset = Painted(2)
    dataset.samples[1]["mask"][2, 2] = 7
    with pytest.raises(LSegError, match=r"img1.png: target labels must be in \[0, 3\)"):
        evaluate_dataset(FakeModel(), dataset)


def test_reported_metrics_are_the_one_scorers_on_the_same_predictions():
    """The total is `SegmentationMetrics` over the predictions, each image's scores come from its own
    confusion matrix, and per-class accuracy is the scorer's (not computed again elsewhere)."""
    dataset = Painted(4)
    report = evaluate_dataset(FakeModel(), dataset, num_examples=1)
    metric = SegmentationMetrics(3)
    for sample, record in zip(dataset.samples, report.per_image, strict=True):
        pred = sample["image"][0].long() // 50
        metric.update(pred[None], sample["mask"][None])
        own = metrics_from_confusion(confusion_matrix(pred, sample["mask"], 3))
        assert (record.miou, record.pixel_accuracy) == (own["miou"], own["pixel_accuracy"])
    assert report.metrics == metric.compute()
    assert torch.equal(report.confmat, metric.confmat)


def test_settings_are_checked_and_options_override_them():
    with pytest.raises(LSegError, match="rank_by"):
        EvaluationSettings(rank_by="fwiou")
    with pytest.raises(LSegError, match="batch_size"):
        evaluate_dataset(FakeModel(), Painted(1), batch_size=0)
    settings = EvaluationSettings(num_examples=0, max_images=2)
    report = evaluate_dataset(FakeModel(), Painted(3), settings=settings, max_images=1)
    assert report.images == 1 and report.best == report.worst == []


def test_example_tracker_keeps_only_the_extremes():
    tracker = ExampleTracker("miou", 1, num_classes=3)
    for index, miou in enumerate([0.5, 0.9, math.nan, 0.1, 0.5]):
        tracker.offer(ImageScore(index, f"{index}.png", miou, miou, 1), torch.zeros(2, 2, dtype=torch.long))
    assert [e.score.index for _, e in tracker.best + tracker.worst] == [1, 3]
    assert tracker.best[0][1].prediction.dtype == np.uint8


def test_universal_mapping_stays_on_the_logits_device():
    space = LabelSpace("universal", ["u0", "u1", "u2"], torch.tensor([0, 255, 1]))
    pred = predict_classes(torch.zeros(2, 3, 4, 5, device="meta"), space, 2)
    assert (pred.device.type, tuple(pred.shape)) == ("meta", (2, 4, 5))
