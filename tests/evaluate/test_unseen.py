"""Generalised zero-shot scoring: seen / unseen mIoU, hIoU and the seen-class calibration, checked
against numbers computed by hand; the unseen classes read from the command line, a list or a folds file."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from lseg.data import CAMVID_CLASSES
from lseg.errors import LSegError
from lseg.evaluate import evaluate
from lseg.evaluate.labels import UnseenClasses, read_seen_bias, read_synonyms, read_unseen
from lseg.evaluate.metrics import harmonic_mean, seen_unseen_scores
from lseg.evaluate.runner import EvaluationSettings, evaluate_dataset, seen_offsets
from tests.conftest import REPO_ROOT, shared_data_dir
from tests.evaluate.conftest import read_metrics
from tests.evaluate.test_evaluate_cli import _one_line_error
from tests.evaluate.test_evaluate_cli import evaluate as evaluate_cli
from tests.evaluate.test_evaluate_runner import FakeModel

#   ground truth  0 0 1 1 2 2 2 2
#   prediction    0 0 1 0 2 2 1 2
# IoU: class 0 = 2/3 (2 hits, union 3), class 1 = 1/3, class 2 = 3/4.
FOLDS = REPO_ROOT / "configs" / "labels" / "camvid32_folds.yaml"
TRUTH = [0, 0, 1, 1, 2, 2, 2, 2]
PREDICTED = [0, 0, 1, 0, 2, 2, 1, 2]


class OneRow(Dataset):
    """One 1 x 8 image painted with `PREDICTED` (FakeModel decodes it) over the `TRUTH` mask."""

    class_names = ["sky", "road", "car"]

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        image = (torch.tensor(PREDICTED) * 50).to(torch.uint8).expand(3, 1, 8).clone()
        return {"image": image, "mask": torch.tensor([TRUTH]), "path": "row.png"}


def test_seen_unseen_and_harmonic_mean_by_hand():
    report = evaluate_dataset(FakeModel(), OneRow(), unseen=UnseenClasses((2,)), num_examples=0)
    assert report.metrics["per_class_iou"] == pytest.approx([2 / 3, 1 / 3, 3 / 4])
    assert report.metrics["miou_seen"] == pytest.approx(0.5)
    assert report.metrics["miou_unseen"] == pytest.approx(0.75)
    assert report.metrics["hiou"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)  # 0.6
    assert report.metrics["miou"] == pytest.approx((2 / 3 + 1 / 3 + 3 / 4) / 3)  # unchanged
    assert "miou_apart" not in report.metrics


def test_classes_apart_are_neither_seen_nor_unseen():
    scores = seen_unseen_scores([0.2, 0.4, 0.9, math.nan, 0.1], unseen=[2, 3], apart=[4])
    assert scores["miou_seen"] == pytest.approx(0.3)
    assert scores["miou_unseen"] == pytest.approx(0.9)  # the class without pixels is skipped
    assert scores["miou_apart"] == pytest.approx(0.1)
    assert harmonic_mean(0.0, 0.0) == 0.0 and math.isnan(harmonic_mean(0.5, math.nan))


@pytest.mark.parametrize(("bias", "expected"), [(0.0, PREDICTED), (0.5, PREDICTED), (1.5, [2] * 8)])
def test_the_seen_bias_is_subtracted_from_the_seen_logits_only(bias, expected):
    """FakeModel's logits are 1 for the painted class, 0 elsewhere: a bias under 1 changes nothing,
    one over 1 lets the unseen class win every pixel."""
    report = evaluate_dataset(FakeModel(), OneRow(), unseen=UnseenClasses((2,)), seen_bias=bias)
    predicted = torch.tensor(expected)
    confmat = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(TRUTH, predicted.tolist(), strict=True):
        confmat[t, p] += 1
    assert torch.equal(report.confmat, confmat)
    if bias == 1.5:
        assert report.metrics["miou_seen"] == 0.0 and report.metrics["miou_unseen"] == 0.5
        assert report.metrics["hiou"] == 0.0


def test_seen_offsets_follow_the_logits_device_and_dtype():
    logits = torch.empty(3, 4, 5, device="meta", dtype=torch.bfloat16)
    offsets = seen_offsets(UnseenClasses((1,)), 2.0, logits)
    assert (offsets.device.type, offsets.dtype, offsets.shape) == ("meta", torch.bfloat16, (3, 1, 1))
    assert seen_offsets(UnseenClasses((1,)), 2.0, torch.zeros(3, 1, 1)).flatten().tolist() == [2, 0, 2]


def test_a_per_class_seen_bias_moves_only_its_own_class():
    """Sky loses 1.5 and road 0.5 of their logit 1: sky's painted pixels go to the unseen car (sky and
    road end below its 0), road's stay road."""
    report = evaluate_dataset(FakeModel(), OneRow(), unseen=UnseenClasses((2,)), seen_bias=(1.5, 0.5, 0.0))
    confmat = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(TRUTH, [2, 2, 1, 2, 2, 2, 1, 2], strict=True):
        confmat[t, p] += 1
    assert torch.equal(report.confmat, confmat)
    with pytest.raises(LSegError, match="2 seen-class biases for 3 classes"):
        evaluate_dataset(FakeModel(), OneRow(), unseen=UnseenClasses((2,)), seen_bias=(1.0, 0.0))
    logits = torch.empty(3, 4, 5, device="meta", dtype=torch.bfloat16)
    offsets = seen_offsets(UnseenClasses((1,)), (1.0, 2.0, 3.0), logits)
    assert (offsets.device.type, offsets.dtype, offsets.shape) == ("meta", torch.bfloat16, (3, 1, 1))
    assert seen_offsets(UnseenClasses((1,)), (1.0, 2.0, 3.0), torch.zeros(3, 1, 1)).flatten().tolist() == [
        1,
        0,
        3,
    ]


def test_seen_bias_file_gives_named_classes_their_bias_and_the_others_none(tmp_path):
    names = ["Sky", "Road", "Truck_Bus", "Column_Pole"]
    path = tmp_path / "bias.yaml"
    path.write_text("sky: 4.5\ncolumn pole: 6\n")
    assert read_seen_bias(path, names, UnseenClasses((2,))) == (4.5, 0.0, 0.0, 6.0)
    (tmp_path / "bias.json").write_text('{"Road": -1}')
    assert read_seen_bias(tmp_path / "bias.json", names, UnseenClasses((2,))) == (0.0, -1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Skyy: 1\n", "unknown class(es): 'Skyy'"),
        ("Truck_Bus: 1\n", "'Truck_Bus' is an unseen class"),
        ("Sky: high\n", "the seen bias of 'Sky' must be a number, got 'high'"),
        ("Sky: true\n", "must be a number, got True"),
        ("Sky: 1\nsky: 2\n", "class 'Sky' is given twice"),
        ("- Sky\n", "expected a YAML mapping"),
    ],
)
def test_bad_seen_bias_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bias.yaml"
    path.write_text(text)
    with pytest.raises(LSegError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_seen_bias(path, ["Sky", "Road", "Truck_Bus"], UnseenClasses((2,)))


def test_settings_refuse_a_bias_without_unseen_classes_and_ids_beyond_the_classes():
    with pytest.raises(LSegError, match="give the unseen classes"):
        EvaluationSettings(seen_bias=1.0)
    with pytest.raises(LSegError, match="not ids of the 3 classes"):
        evaluate_dataset(FakeModel(), OneRow(), unseen=UnseenClasses((3,)))


def test_unseen_classes_by_name_from_a_list_a_text_file_or_a_folds_file(tmp_path):
    names = ["Sky", "Road", "Truck_Bus", "Column_Pole", "Archway"]
    assert read_unseen(names, "truck bus, road") == UnseenClasses((2, 1))
    assert read_unseen(names, ["Sky"]) == UnseenClasses((0,))
    (tmp_path / "unseen.txt").write_text("# held out\nTruck_Bus\ncolumn pole\n")
    assert read_unseen(names, unseen_file=tmp_path / "unseen.txt") == UnseenClasses((2, 3))
    folds = tmp_path / "folds.yaml"
    folds.write_text("apart: [Archway]\nfolds:\n  - [Road]\n  - [Sky, Truck_Bus]\nwords: {Truck_Bus: bus}\n")
    assert read_unseen(names, unseen_file=folds, fold=1) == UnseenClasses((0, 2), (4,))
    assert read_synonyms(folds, names) == {"Truck_Bus": "bus"}  # one file holds folds and words
    assert read_unseen(names) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unseen": "Sky, Skyy"}, "unknown class(es): 'Skyy'"),
        ({"unseen": "Sky, sky"}, "lists a class twice"),
        ({"unseen": "Sky, Road, Truck_Bus, Column_Pole, Archway"}, "leaves no seen class"),
        ({"unseen": " , "}, "lists no class"),
        ({"unseen_file": "FOLDS", "fold": 2}, "has folds 0-1"),
        ({"unseen_file": "FOLDS"}, "choose one with fold"),
        ({"fold": 0}, "give the file too"),
        ({"unseen": "Sky", "unseen_file": "FOLDS"}, "not both"),
    ],
)
def test_bad_unseen_classes_are_one_line_errors(tmp_path, kwargs, message):
    folds = tmp_path / "folds.yaml"
    folds.write_text("folds: [[Road], [Sky]]\n")
    kwargs = {key: folds if value == "FOLDS" else value for key, value in kwargs.items()}
    with pytest.raises(LSegError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_unseen(["Sky", "Road", "Truck_Bus", "Column_Pole", "Archway"], **kwargs)


def test_library_evaluate_takes_unseen_class_names(camvid_root, model_dir, oracle):
    from lseg import LSeg
    from lseg.evaluate import load_dataset

    report = evaluate(LSeg.from_pretrained(model_dir), load_dataset("camvid", camvid_root), unseen=["Car"])
    assert report.extra["unseen"] == UnseenClasses((CAMVID_CLASSES.index("Car"),))
    assert report.metrics["miou_unseen"] == 1.0 and report.metrics["hiou"] == 1.0  # the oracle


def test_cli_reports_seen_unseen_and_hiou_in_metrics_and_card(
    tmp_path, camvid_root, model_dir, oracle, capsys
):
    folds = tmp_path / "folds.yaml"
    folds.write_text("apart: [Sky]\nfolds:\n  - [Car]\n  - [Road]\n")
    out = tmp_path / "fold1"
    assert evaluate_cli(model_dir, camvid_root, out, "--unseen-file", str(folds), "--fold", "1",
                        "--seen-bias", "0.5") == 0  # fmt: skip
    metrics = read_metrics(out)
    assert metrics["unseen_classes"] == ["Road"] and metrics["apart_classes"] == ["Sky"]
    assert metrics["seen_bias"] == 0.5 and metrics["dataset"]["fold"] == 1
    assert metrics["config"]["unseen_file"] == str(folds)
    scores = metrics["metrics"]
    assert scores["miou_seen"] == scores["miou_unseen"] == scores["hiou"] == scores["miou_apart"] == 1.0
    assert "hIoU" in capsys.readouterr().out
    card = (model_dir / "README.md").read_text()
    assert "hIoU" in card and "unseen folds.yaml" in card
    assert evaluate_cli(model_dir, camvid_root, tmp_path / "fold0", "--unseen", "Car") == 0
    assert read_metrics(tmp_path / "fold0")["unseen_classes"] == ["Car"]
    assert "fold" not in read_metrics(tmp_path / "fold0")["dataset"]
    (tmp_path / "bias.yaml").write_text("sky: 0.5\nRoad: 0.25\n")
    assert evaluate_cli(model_dir, camvid_root, tmp_path / "per_class", "--unseen", "Car",
                        "--seen-bias-file", str(tmp_path / "bias.yaml")) == 0  # fmt: skip
    metrics = read_metrics(tmp_path / "per_class")
    assert metrics["seen_bias"] == {**dict.fromkeys(CAMVID_CLASSES, 0.0), "Sky": 0.5, "Road": 0.25}
    assert metrics["config"]["seen_bias_file"] == str(tmp_path / "bias.yaml")
    assert "seen biases bias.yaml" in (model_dir / "README.md").read_text()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--seen-bias", "1"], "--seen-bias calibrates"),
        (["--seen-bias-file", "bias.yaml"], "--seen-bias-file calibrates"),
        (["--unseen", "Car", "--seen-bias-file", "missing.yaml"], "missing.yaml"),
        (["--unseen", "Lorry"], "unknown class(es): 'Lorry'"),
        (["--unseen", "Car", "--label-space", "universal"], "does not apply to --label-space universal"),
    ],
)
def test_cli_unseen_errors_are_one_line(tmp_path, camvid_root, model_dir, capsys, extra, fragment):
    assert evaluate_cli(model_dir, camvid_root, tmp_path / "out", *extra) == 1
    _one_line_error(capsys, fragment)
    assert not (tmp_path / "out").exists()


def test_camvid32_folds_follow_their_stated_rule():
    """configs/labels/camvid32_folds.yaml: classes with >= 10,000 val pixels, ranked by val pixels,
    rank r unseen in fold r mod 4; classes with fewer (but some) pixels apart; a word for every class."""
    import numpy as np
    import yaml
    from PIL import Image

    root = shared_data_dir() / "camvid32"
    if not root.is_dir():
        pytest.skip(f"{root} not found (the CamVid 31-class labels of ../shared/data)")
    names = (root / "names.txt").read_text().split()
    counts = np.zeros(len(names), np.int64)
    for path in sorted((root / "masks" / "val").glob("*.png")):
        mask = np.asarray(Image.open(path))
        counts += np.bincount(mask[mask != 255].ravel(), minlength=len(names))[: len(names)]
    config = yaml.safe_load(FOLDS.read_text())
    ranked = sorted((i for i in range(len(names)) if counts[i] >= 10_000), key=lambda i: -counts[i])
    assert config["folds"] == [[names[i] for i in ranked[f::4]] for f in range(4)]
    assert config["apart"] == [names[i] for i in range(len(names)) if 0 < counts[i] < 10_000]
    assert sorted(read_synonyms(FOLDS, names)) == sorted(names)


def test_camvid32_mseg_words_ask_the_folds_words_and_each_alternative_could_name_one_class():
    """configs/labels/camvid32_mseg_words.yaml (the MSeg label-augmentation ablation) must train the
    folds file's words; in every fold no unseen class's word is left among the alternatives."""
    import yaml

    from lseg.train.datamodule import build

    root = shared_data_dir() / "camvid32"
    if not root.is_dir():
        pytest.skip(f"{root} not found (the CamVid 31-class labels of ../shared/data)")
    words = REPO_ROOT / "configs" / "labels" / "camvid32_mseg_words.yaml"
    assert yaml.safe_load(words.read_text())["words"] == yaml.safe_load(FOLDS.read_text())["words"]
    spec = {"name": "folder", "root": str(root), "split": "train", "synonyms": str(words)}
    _, labels, alternatives, _ = build(spec, None)
    assert alternatives[labels.index("truck or bus")] == ["truck", "bus", "vehicle"]
    for fold, unseen in enumerate(yaml.safe_load(FOLDS.read_text())["folds"]):
        kept = build({**spec, "unseen_file": str(FOLDS), "fold": fold}, None).alternatives
        asked = {word for others in kept for word in others}
        if "Truck_Bus" in unseen:
            assert not asked & {"truck", "bus", "vehicle"}
        if "Road" in unseen:
            assert "ground" not in asked
