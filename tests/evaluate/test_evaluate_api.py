"""`lseg.evaluate.evaluate` / `evaluate_zeroshot`: the library entry points, without the CLI."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
from PIL import Image

from lseg import LSeg, LSegError
from lseg.data import CAMVID_CLASSES
from lseg.evaluate import (
    EvaluationReport,
    LabelSpace,
    ZeroShotReport,
    build_label_space,
    evaluate,
    evaluate_zeroshot,
    load_dataset,
)


@pytest.fixture
def model(model_dir) -> LSeg:
    return LSeg.from_pretrained(model_dir)


def test_evaluate_scores_a_dataset_and_restores_the_prompt_templates(camvid_root, model, oracle):
    before = list(model.text_encoder.prompt_templates)
    seen = []
    report = evaluate(
        model,
        load_dataset("camvid", camvid_root),
        prompt_template="a {}.",
        progress=lambda *a: seen.append(a),
    )
    assert isinstance(report, EvaluationReport) and report.metrics["miou"] == 1.0 and report.images == 3
    assert report.confmat.shape == (11, 11) and list(report.per_class_iou()) == list(CAMVID_CLASSES)
    assert report.extra["prompt_templates"] == ["a {}."] and model.text_encoder.prompt_templates == before
    assert seen[-1] == (3, 3)


def test_a_prompt_template_is_passed_to_the_text_encoder_never_set_on_it(camvid_root, model, monkeypatch):
    encoder = model.text_encoder
    own = list(encoder.prompt_templates)
    calls = []
    original = type(encoder).encode

    def spy(self, labels, templates=None):
        calls.append((list(self.prompt_templates), templates))
        return original(self, labels, templates)

    monkeypatch.setattr(type(encoder), "encode", spy)
    evaluate(model, load_dataset("camvid", camvid_root), prompt_template="a {}.", max_images=1)
    assert calls and all(current == own and list(asked) == ["a {}."] for current, asked in calls)
    with pytest.raises(LSegError, match="must contain '{}' where the label goes"):
        evaluate(model, load_dataset("camvid", camvid_root), prompt_template="no slot", max_images=1)


def test_universal_label_space_takes_the_column_from_the_dataset_name(camvid_root, model, oracle):
    report = evaluate(model, load_dataset("camvid", camvid_root), label_space="universal", max_images=1)
    assert oracle == [194] and report.label_space == "universal" and report.metrics["miou"] == 1.0
    assert report.extra["taxonomy_column"] == "camvid-11"


def test_synonyms_as_a_mapping_change_the_words_asked(camvid_root, model):
    report = evaluate(model, load_dataset("camvid", camvid_root), synonyms={"Sky": "blue sky"}, max_images=1)
    assert report.labels == ["blue sky", *CAMVID_CLASSES[1:]]
    with pytest.raises(LSegError, match="unknown class"):
        evaluate(model, load_dataset("camvid", camvid_root), synonyms={"Skyy": "sky"})


def test_label_choices_are_exclusive(camvid_root, model):
    dataset = load_dataset("camvid", camvid_root)
    with pytest.raises(LSegError, match="at most one"):
        evaluate(model, dataset, labels=list(CAMVID_CLASSES), synonyms={"Sky": "sky"})
    space = LabelSpace("dataset", list(CAMVID_CLASSES))
    with pytest.raises(LSegError, match="LabelSpace"):
        evaluate(model, dataset, labels=space, label_space="universal")
    with pytest.raises(LSegError, match="duplicate labels"):
        build_label_space(["a", "b"], labels=["cat", "Cat"])
    with pytest.raises(LSegError, match="taxonomy column"):
        build_label_space(["a", "b"], taxonomy_column="camvid-11")


def test_load_dataset_lists_missing_files_before_inference(camvid_root):
    (camvid_root / "valannot" / "img1.png").unlink()
    with pytest.raises(LSegError, match="1 dataset file"):
        load_dataset("camvid", camvid_root)


def test_evaluate_zeroshot_asks_synonyms_and_reports_them(tmp_path, model, monkeypatch):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClassAug").mkdir()
    for line in files("lseg").joinpath("resources", "pascal5i_val_fold0.txt").read_text().split()[:2]:
        image_id, label = line.split("__")
        mask = np.zeros((20, 24), np.uint8)
        mask[:, :8] = int(label)
        Image.fromarray(mask).save(voc / "SegmentationClassAug" / f"{image_id}.png")
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    asked = []
    original = LSeg.encode_text
    monkeypatch.setattr(
        LSeg, "encode_text", lambda self, words: asked.append(list(words)) or original(self, words)
    )
    report = evaluate_zeroshot(
        model, "pascal-5i", tmp_path, synonyms={"aeroplane": "airplane"}, size=32, max_episodes=2
    )
    assert isinstance(report, ZeroShotReport) and report.episodes == 2 and report.device == "cpu"
    assert ["others", "airplane"] in asked and report.labels["aeroplane"] == "airplane"
    assert report.summary()["labels"]["bicycle"] == "bicycle" and 0 <= report.fb_iou <= 1
    with pytest.raises(LSegError, match="unknown class"):
        evaluate_zeroshot(model, "pascal-5i", tmp_path, synonyms={"plane": "x"})


def test_a_model_without_text_encoder_is_refused(camvid_root, model):
    model.text_encoder = None
    with pytest.raises(LSegError, match="no text encoder"):
        evaluate(model, load_dataset("camvid", camvid_root))


def test_charts_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """A notebook's inline backend survives drawing the report charts (they once forced Agg)."""
    matplotlib = pytest.importorskip("matplotlib")
    from lseg.evaluate.report import plot_confusion, plot_per_class_iou

    before = matplotlib.get_backend()
    matplotlib.use("svg", force=True)
    try:
        plot_per_class_iou(["a", "b"], [0.25, float("nan")], tmp_path / "iou.png")
        plot_confusion(["a", "b"], np.array([[3, 1], [0, 2]]), tmp_path / "confusion.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before, force=True)
    for name in ("iou.png", "confusion.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 100
