"""`lseg evaluate` end to end on a tiny fake CamVid (40 x 56 images) with a tiny random model."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from lseg import LSeg
from lseg.cli.main import main
from lseg.data import CAMVID_CLASSES
from tests.evaluate.conftest import UNLABELLED, annotated_pixels, camvid_mask, read_metrics


def evaluate(model_dir: Path, root: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "evaluate", "--checkpoint", str(model_dir), "--dataset", "camvid", "--data-root", str(root),
            "--out", str(out), "--device", "cpu", *extra,
        ]
    )  # fmt: skip


def test_evaluate_writes_every_report(tmp_path, camvid_root, model_dir, capsys):
    out = tmp_path / "report"
    assert evaluate(model_dir, camvid_root, out, "--batch-size", "2", "--examples", "1") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "best_worst.png", "confusion_matrix.png", "metrics.json", "per_class_iou.png",
    ]  # fmt: skip
    for name in ("best_worst.png", "confusion_matrix.png", "per_class_iou.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100
    assert not list(tmp_path.glob(".report*"))  # staging folder moved away
    metrics = read_metrics(out)
    for key in ("lseg_version", "torch_version", "device", "checkpoint", "dataset", "config", "protocol",
                "labels", "timing", "metrics", "per_image", "best", "worst", "confusion_matrix"):  # fmt: skip
        assert key in metrics, key
    m = metrics["metrics"]
    for key in ("pixel_accuracy", "mean_class_accuracy", "miou", "fwiou"):
        assert 0.0 <= m[key] <= 1.0
    assert list(m["per_class_iou"]) == list(CAMVID_CLASSES)
    assert m["per_class_iou"]["Building"] is None  # absent class: excluded, written as null
    weights = (model_dir / "model.safetensors").read_bytes()
    assert metrics["checkpoint"]["sha256"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert metrics["labels"] == list(CAMVID_CLASSES)
    assert metrics["protocol"]["name"] == "single" and metrics["dataset"]["split"] == "val"
    assert metrics["timing"]["images"] == 3 and metrics["timing"]["images_per_second"] > 0
    assert len(metrics["per_image"]) == 3 and len(metrics["best"]) == 1 and len(metrics["worst"]) == 1
    assert np.array(metrics["confusion_matrix"]).sum() == annotated_pixels(camvid_root)
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "Pedestrian" in printed


def test_evaluating_a_model_folder_records_the_scores_in_its_card_only(tmp_path, camvid_root, model_dir):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "README.md"}
    assert evaluate(folder, camvid_root, tmp_path / "report") == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "README.md"} == before
    metrics = read_metrics(tmp_path / "report")
    card = ModelCard.load(folder / "README.md").data
    [evaluation] = card.lseg["results"]["evaluate"]
    assert evaluation["dataset"] == "camvid" and evaluation["split"] == "val"
    assert evaluation["metrics"]["miou"] == pytest.approx(metrics["metrics"]["miou"])
    assert evaluation["date"] == metrics["created"]
    assert ("camvid", "miou") in {(r.dataset_type, r.metric_type) for r in card.eval_results}


def test_the_card_keeps_every_dataset_split_and_label_set_evaluated(tmp_path, camvid_root, model_dir):
    """A second dataset or label set adds its result; re-evaluating one replaces only that one; a check on
    part of a split is a result of its own; a folder dataset is named by its root."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    streets = tmp_path / "streets"  # the fake CamVid as a `folder` dataset, split train
    for sub in ("images/train", "masks/train"):
        (streets / sub).mkdir(parents=True)
    for i in range(2):
        shutil.copy(camvid_root / "val" / f"img{i}.png", streets / "images" / "train" / f"img{i}.png")
        mask = np.where(camvid_mask(i) == UNLABELLED, 255, camvid_mask(i)).astype(np.uint8)
        Image.fromarray(mask).save(streets / "masks" / "train" / f"img{i}.png")
    (streets / "names.txt").write_text("\n".join(CAMVID_CLASSES) + "\n")
    synonyms = tmp_path / "camvid_synonyms.txt"
    synonyms.write_text("Car: automobile\n")
    assert evaluate(folder, camvid_root, tmp_path / "names") == 0
    assert evaluate(folder, camvid_root, tmp_path / "synonyms", "--synonyms", str(synonyms)) == 0
    argv = ["evaluate", "--checkpoint", str(folder), "--dataset", "folder", "--data-root", str(streets),
            "--split", "train", "--out", str(tmp_path / "streets-report"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert evaluate(folder, camvid_root, tmp_path / "again") == 0  # camvid names again: replaces the first
    assert evaluate(folder, camvid_root, tmp_path / "quick", "--max-images", "1") == 0  # 1 of 3 images
    card = ModelCard.load(folder / "README.md")
    results = card.data.lseg["results"]["evaluate"]
    assert [(r["dataset"], r["split"], r["label_set"]) for r in results] == [
        ("camvid", "val", "class names"),
        ("camvid", "val", "synonyms camvid_synonyms.txt"),
        ("streets", "train", "class names"),
        ("camvid", "val[:1]", "class names"),
    ]
    for record, report in zip(results, ["again", "synonyms", "streets-report", "quick"]):
        assert record["metrics"]["miou"] == pytest.approx(read_metrics(tmp_path / report)["metrics"]["miou"])
    model_index = card.data.to_dict()["model-index"][0]["results"]
    assert [(r["dataset"]["name"], r["dataset"]["split"], r["dataset"]["config"]) for r in model_index] == [
        ("camvid", "val", "class names"),
        ("camvid", "val", "synonyms camvid_synonyms.txt"),
        ("streets", "train", "class names"),
        ("camvid", "val[:1]", "class names"),
    ]
    assert "| streets | train | class names | single |" in card.text and "| folder |" not in card.text


def test_evaluate_leaves_a_users_readme_alone(tmp_path, camvid_root, model_dir):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "README.md").write_text("# my model\n")
    with pytest.warns(UserWarning, match="left as it is"):
        assert evaluate(folder, camvid_root, tmp_path / "report") == 0
    assert (folder / "README.md").read_text() == "# my model\n"
    assert (tmp_path / "report" / "metrics.json").is_file()


def test_perfect_predictions_score_one_and_small_size_scores_at_label_resolution(
    tmp_path, camvid_root, model_dir, oracle
):
    out = tmp_path / "perfect"
    assert evaluate(model_dir, camvid_root, out, "--batch-size", "3") == 0
    m = read_metrics(out)["metrics"]
    assert m["miou"] == 1.0 and m["pixel_accuracy"] == 1.0 and m["mean_class_accuracy"] == 1.0
    assert m["fwiou"] == pytest.approx(1.0)
    assert oracle == [len(CAMVID_CLASSES)]  # one batch of three same-size images

    small = tmp_path / "small"
    assert evaluate(model_dir, camvid_root, small, "--size", "16", "--max-images", "2") == 0
    metrics = read_metrics(small)
    confmat = np.array(metrics["confusion_matrix"])
    expected = sum(int((camvid_mask(i) != UNLABELLED).sum()) for i in range(2))
    assert confmat.shape == (11, 11) and confmat.sum() == expected  # 40 x 56 masks, not 16 x 12
    assert [r["pixels"] for r in metrics["per_image"]] == [38 * 56, 38 * 56]
    assert metrics["config"]["size"] == 16 and metrics["timing"]["images"] == 2


def test_universal_label_space_maps_predictions_through_mseg(tmp_path, camvid_root, model_dir, oracle):
    out = tmp_path / "universal"
    assert evaluate(model_dir, camvid_root, out, "--label-space", "universal") == 0
    metrics = read_metrics(out)
    assert oracle == [194, 194, 194]
    assert metrics["metrics"]["miou"] == 1.0
    assert metrics["taxonomy_column"] == "camvid-11" and len(metrics["labels"]) == 194
    assert "sidewalk pavement" in metrics["labels"]  # universal names as words
    assert list(metrics["metrics"]["per_class_iou"]) == list(CAMVID_CLASSES)


def test_synonyms_and_prompt_template_change_the_text_asked(tmp_path, camvid_root, model_dir, monkeypatch):
    asked = []
    original = LSeg.encode_text

    def spy(self, labels, templates=None):
        asked.append(list(labels))
        return original(self, labels, templates)

    monkeypatch.setattr(LSeg, "encode_text", spy)
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("# words asked instead of class names\nSky: blue sky\nsignsymbol\ttraffic sign\n")
    out = tmp_path / "syn"
    args = ("--synonyms", str(synonyms), "--prompt-template", "a photo of a {}.", "--max-images", "1")
    assert evaluate(model_dir, camvid_root, out, *args) == 0
    metrics = read_metrics(out)
    expected = ["blue sky", *CAMVID_CLASSES[1:6], "traffic sign", *CAMVID_CLASSES[7:]]
    assert metrics["labels"] == expected and asked[-1] == expected
    assert metrics["config"]["prompt_templates"] == ["a photo of a {}."]
    assert list(metrics["metrics"]["per_class_iou"])[0] == "Sky"  # reported under the class names

    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(f"the {name}" for name in CAMVID_CLASSES) + "\n")
    out2 = tmp_path / "labels"
    assert evaluate(model_dir, camvid_root, out2, "--labels-file", str(labels_file), "--max-images", "1") == 0
    assert read_metrics(out2)["labels"] == [f"the {name}" for name in CAMVID_CLASSES]


def _one_line_error(capsys, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lseg: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize(
    ("setup", "fragments"),
    [
        ("unknown_synonym", ("unknown class", "'Skyy'")),
        ("missing_root", ("not found", "expected layout", "train/X.png")),
        ("corrupt_image", ("cannot read image", "img1.png")),
        ("bad_label_id", ("[20]", "img0.png", "11 classes")),
        ("labels_count", ("has 2 labels", "11 classes")),
        ("bad_template", ("--prompt-template",)),
        ("missing_listed_file", ("not found", "img2.png")),
        ("universal_folder", ("--taxonomy-column",)),
        ("unknown_sequence", ("no images of sequences ['0006R0']", "it has img0.png, img1.png, img2.png")),
    ],
)
def test_user_errors_exit_1_with_one_line_and_leave_no_output(
    tmp_path, camvid_root, model_dir, capsys, setup, fragments
):
    out = tmp_path / "nested" / "out"
    root = camvid_root
    extra: list[str] = []
    if setup == "unknown_synonym":
        (tmp_path / "syn.txt").write_text("Sky: heaven\nSkyy: typo\n")
        extra = ["--synonyms", str(tmp_path / "syn.txt")]
    elif setup == "missing_root":
        root = tmp_path / "nowhere"
    elif setup == "corrupt_image":
        (camvid_root / "val" / "img1.png").write_bytes(b"not a png")
    elif setup == "bad_label_id":
        mask = camvid_mask(0)
        mask[10, 10] = 20
        Image.fromarray(mask).save(camvid_root / "valannot" / "img0.png")
    elif setup == "labels_count":
        (tmp_path / "labels.txt").write_text("sky\nroad\n")
        extra = ["--labels-file", str(tmp_path / "labels.txt")]
    elif setup == "bad_template":
        extra = ["--prompt-template", "a photo"]
    elif setup == "unknown_sequence":
        extra = ["--sequences", "0006R0"]
    elif setup == "missing_listed_file":
        (camvid_root / "val" / "img2.png").unlink()
    elif setup == "universal_folder":
        folder = tmp_path / "folder"
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        (folder / "names.txt").write_text("a\nb\n")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "images" / "x.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "masks" / "x.png")
        argv = ["evaluate", "--checkpoint", str(model_dir), "--dataset", "folder", "--data-root", str(folder),
                "--out", str(out), "--device", "cpu", "--label-space", "universal"]  # fmt: skip
        assert main(argv) == 1
        _one_line_error(capsys, *fragments)
        assert not (tmp_path / "nested").exists()
        return
    assert evaluate(model_dir, root, out, *extra) == 1
    _one_line_error(capsys, *fragments)
    assert not (tmp_path / "nested").exists()


def test_sequences_score_only_those_drives(tmp_path, camvid_root, model_dir, capsys):
    lines = (camvid_root / "val.txt").read_text().splitlines()
    renamed = []
    for line, drive in zip(lines, ("0001TP", "0006R0", "0006R0")):
        image, label = line.split()
        for path in (image, label):
            (camvid_root / path).rename(camvid_root / path.replace("img", f"{drive}_img"))
        renamed.append(line.replace("img", f"{drive}_img"))
    (camvid_root / "val.txt").write_text("\n".join(renamed) + "\n")
    assert evaluate(model_dir, camvid_root, tmp_path / "held", "--sequences", "0006R0") == 0
    metrics = read_metrics(tmp_path / "held")
    assert [Path(r["path"]).name for r in metrics["per_image"]] == ["0006R0_img1.png", "0006R0_img2.png"]
    assert metrics["dataset"]["sequences"] == ["0006R0"]
    capsys.readouterr()
    assert main(["evaluate", "--preset", "tiny", "--dataset", "ade20k", "--data-root", str(camvid_root),
                 "--out", str(tmp_path / "x"), "--sequences", "0006R0"]) == 1  # fmt: skip
    _one_line_error(capsys, "--sequences selects drives (camvid, folder)")


def test_checkpoint_without_text_encoder_is_rejected(tmp_path, camvid_root, model_dir, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "no_text"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    state = {
        k: v
        for k, v in load_file(str(model_dir / "model.safetensors")).items()
        if not k.startswith("text_encoder.")
    }
    save_file(state, str(broken / "model.safetensors"))
    assert evaluate(broken, camvid_root, tmp_path / "out") == 1
    _one_line_error(capsys, "missing", "text_encoder.")
    assert not (tmp_path / "out").exists()


def test_missing_matplotlib_says_what_to_install(tmp_path, camvid_root, model_dir, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert evaluate(model_dir, camvid_root, tmp_path / "out") == 1
    _one_line_error(capsys, "lseg[train]")
    assert not (tmp_path / "out").exists()


def test_zero_shot_benchmark_routes_to_episodes(tmp_path, model_dir):
    from importlib.resources import files

    voc = tmp_path / "pascal" / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClassAug").mkdir()
    lines = files("lseg").joinpath("resources", "pascal5i_val_fold0.txt").read_text().split()[:2]
    for line in lines:
        image_id, label = line.split("__")
        mask = np.zeros((20, 24), np.uint8)
        mask[:, :8] = int(label)
        Image.fromarray(mask).save(voc / "SegmentationClassAug" / f"{image_id}.png")
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    synonyms = tmp_path / "syn.txt"
    synonyms.write_text("aeroplane: airplane\n")
    out = tmp_path / "zs"
    argv = ["evaluate", "--checkpoint", str(model_dir), "--dataset", "pascal-5i", "--fold", "0",
            "--data-root", str(tmp_path / "pascal"), "--out", str(out), "--device", "cpu", "--size", "32",
            "--max-images", "2", "--synonyms", str(synonyms)]  # fmt: skip
    assert main(argv) == 0
    metrics = read_metrics(out)
    assert metrics["dataset"] == {"name": "pascal-5i", "root": str(tmp_path / "pascal"), "fold": 0}
    assert set(metrics["metrics"]) == {"miou", "fb_iou", "per_class_iou"}
    assert metrics["labels"]["aeroplane"] == "airplane" and metrics["timing"]["images"] == 2
    assert (out / "per_class_iou.png").is_file()
    results = ModelCard.load(model_dir / "README.md").data.lseg["results"]["evaluate"]  # zero-shot too
    [card] = [r for r in results if r["dataset"] == "pascal-5i"]
    assert card["fold"] == 0 and card["label_set"] == "synonyms syn.txt, background 'others'"
    assert card["metrics"]["fb_iou"] == pytest.approx(metrics["metrics"]["fb_iou"])
