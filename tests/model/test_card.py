"""Model cards: Hub metadata written beside the weights, and a user's README.md never clobbered."""

import json

import pytest
from huggingface_hub import ModelCard

from lseg import LSegError
from lseg.model.card import update_card_metrics

EVALUATION = {  # the shape of lseg evaluate's metrics.json, trimmed
    "command": "evaluate",
    "created": "2025-01-02T03:04:05+00:00",
    "dataset": {"name": "camvid", "root": "/data/camvid", "split": "val"},
    "config": {"protocol": "single", "label_space": "dataset"},
    "metrics": {
        "miou": 0.5,
        "pixel_accuracy": 0.75,
        "fwiou": float("nan"),
        "per_class_iou": {"Sky": 0.9},
        "classes_scored": 11,
    },
}
TRAINING = {
    "command": "train",
    "dataset": {"name": "synthetic", "split": "val"},
    "metrics": {"miou": 0.25},
    "training": {"checkpoint": "best", "epoch": 3, "label_sets": {"synthetic": ["road", "sky"]}},
}


def test_card_metadata_describes_the_model_and_its_scores(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(
        tmp_path / "model", metrics=EVALUATION, card_data={"license": "apache-2.0", "tags": ["streets"]}
    )
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "lseg" and data.pipeline_tag == "image-segmentation"
    assert data.license == "apache-2.0"
    assert data.tags == [
        "lseg",
        "semantic-segmentation",
        "open-vocabulary",
        "vit_tiny_patch16_224",
        "streets",
    ]
    info = data.lseg
    assert info["preset"] == "tiny"
    assert info["image_encoder"] == {"type": "vit", "name": "vit_tiny_patch16_224"}
    assert info["text_encoder"] == {"type": "open_clip", "model": "tiny", "pretrained": None}
    assert info["labels"] == tiny_model.config.labels
    [evaluation] = info["results"]["evaluate"]
    assert evaluation["metrics"] == {"miou": 0.5, "pixel_accuracy": 0.75}  # NaN, per-class, counts left out
    assert (evaluation["dataset"], evaluation["split"], evaluation["protocol"]) == ("camvid", "val", "single")
    assert evaluation["label_set"] == "class names"
    scores = {
        (r.dataset_type, r.dataset_split, r.dataset_config, r.metric_type, r.metric_config): r.metric_value
        for r in data.eval_results
    }
    assert scores == {
        ("camvid", "val", "class names", "miou", "single"): 0.5,
        ("camvid", "val", "class names", "pixel_accuracy", "single"): 0.75,
    }
    assert data.model_name == "model"
    assert "| camvid | val | class names | single | 0.5000 | 0.7500 | 2025-01-02 |" in card.text
    assert 'LSeg.from_pretrained("path/to/this/folder")' in card.text


def test_a_users_readme_is_left_alone_with_a_warning(tmp_path, tiny_model):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("# my notes\n")
    with pytest.warns(UserWarning, match="not written by lseg, or was edited since; left as it is"):
        tiny_model.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# my notes\n"
    assert (folder / "model.safetensors").is_file()  # the model itself is saved
    with pytest.warns(UserWarning, match="left as it is"):
        assert update_card_metrics(folder, EVALUATION) is None
    assert (folder / "README.md").read_text() == "# my notes\n"


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: text + "\nMy own paragraph.\n",
        lambda text: text.replace("license: mit", "license: cc-by-4.0"),  # metadata edited, marker kept
    ],
)
def test_an_edited_lseg_card_is_never_rewritten(tmp_path, tiny_model, edit):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    edited = edit((folder / "README.md").read_text())
    (folder / "README.md").write_text(edited)
    with pytest.warns(UserWarning, match="edited since"):
        tiny_model.save_pretrained(folder)
    with pytest.warns(UserWarning, match="edited since"):
        update_card_metrics(folder, EVALUATION)
    assert (folder / "README.md").read_text() == edited


def test_update_card_metrics_rewrites_only_the_card_and_keeps_the_rest(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model", metrics=TRAINING, card_data={"license": "other"})
    (folder / "notes.txt").write_text("mine")
    others = {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.name != "README.md"
    }
    assert update_card_metrics(folder, EVALUATION) == folder / "README.md"
    assert {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.name != "README.md"
    } == (others)
    data = ModelCard.load(folder / "README.md").data
    assert data.license == "other" and data.model_name == "model"
    results = data.lseg["results"]
    assert results["train"]["training"]["label_sets"] == {"synthetic": ["road", "sky"]}
    assert results["evaluate"][0]["metrics"]["miou"] == 0.5
    assert {(r.dataset_type, r.dataset_config, r.metric_type) for r in data.eval_results} == {
        ("synthetic", "validation during training", "miou"),
        ("camvid", "class names", "miou"),
        ("camvid", "class names", "pixel_accuracy"),
    }
    newer = {**EVALUATION, "metrics": {"miou": 0.625}}
    update_card_metrics(folder, newer)  # our own card, rewritten again: the last run of camvid/val wins
    [evaluation] = ModelCard.load(folder / "README.md").data.lseg["results"]["evaluate"]
    assert evaluation["metrics"] == {"miou": 0.625}
    tiny_model.save_pretrained(folder)  # new weights: a fresh card, old scores dropped
    assert ModelCard.load(folder / "README.md").data.lseg["results"] == {}


def test_a_model_folder_without_a_card_gets_one_from_its_config(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    (folder / "README.md").unlink()  # as saved by an lseg without model cards
    update_card_metrics(folder, EVALUATION)
    info = ModelCard.load(folder / "README.md").data.lseg
    assert info["labels"] == tiny_model.config.labels
    assert info["results"]["evaluate"][0]["metrics"]["miou"] == 0.5


def test_update_card_metrics_needs_a_model_folder_and_a_report(tmp_path, tiny_model):
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(LSegError, match="not an lseg model folder"):
        update_card_metrics(tmp_path, EVALUATION)
    folder = tiny_model.save_pretrained(tmp_path / "model")
    with pytest.raises(LSegError, match="'metrics' mapping"):
        update_card_metrics(folder, {"miou": 0.5})


def test_an_unwritable_card_is_a_warning_not_a_failure(tmp_path, tiny_model, monkeypatch):
    import lseg.model.card as card

    def refuse(path, text):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(card, "write_text_atomic", refuse)
    with pytest.warns(UserWarning, match="cannot write model card .*README.md: Permission denied"):
        folder = tiny_model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_a_minilm_text_encoder_is_described_by_its_own_fields(tmp_path):
    """MiniLM has no open_clip model or pretrained tag: neither the card nor config.json may name one."""
    from lseg import LSeg
    from lseg.model import load_preset

    templates = ["{}", "a photo of a {}."]
    minilm = {"type": "minilm", "prompt_templates": templates}
    config = {**load_preset("tiny").to_dict(), "text_encoder": minilm}
    model = LSeg.from_config(config, pretrained=False)
    folder = model.save_pretrained(tmp_path / "model")
    card = ModelCard.load(folder / "README.md")
    assert card.data.lseg["text_encoder"] == {"type": "minilm"}
    assert "| text encoder | minilm |" in card.text
    saved = json.loads((folder / "config.json").read_text())["text_encoder"]
    assert saved == {"type": "minilm", "prompt_templates": templates}
    assert LSeg.from_pretrained(folder).config == model.config


def test_each_dataset_split_and_label_set_keeps_its_own_result(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model", metrics=TRAINING)
    synonyms = {**EVALUATION, "config": {**EVALUATION["config"], "synonyms": "/home/me/camvid_synonyms.txt"}}
    streets = {**EVALUATION, "dataset": {"name": "folder", "root": "/data/streets", "split": None}}
    universal = {
        **EVALUATION,
        "config": {"protocol": "lseg-ms", "label_space": "universal"},
        "taxonomy_column": "camvid-11",
    }
    for report in (EVALUATION, synonyms, streets, universal):
        update_card_metrics(folder, report)
    update_card_metrics(folder, {**synonyms, "metrics": {"miou": 0.125}})  # the same three again
    data = ModelCard.load(folder / "README.md").data
    results = data.lseg["results"]["evaluate"]
    assert [(r["dataset"], r.get("split"), r["label_set"], r["metrics"]["miou"]) for r in results] == [
        ("camvid", "val", "class names", 0.5),
        ("camvid", "val", "synonyms camvid_synonyms.txt", 0.125),
        ("streets", None, "class names", 0.5),
        ("camvid", "val", "MSeg universal classes (camvid-11)", 0.5),
    ]
    entries = data.to_dict()["model-index"][0]["results"]  # one per result, training's first
    assert [(e["dataset"]["name"], e["dataset"].get("config")) for e in entries] == [
        ("synthetic", "validation during training"),
        ("camvid", "class names"),
        ("camvid", "synonyms camvid_synonyms.txt"),
        ("streets", "class names"),
        ("camvid", "MSeg universal classes (camvid-11)"),
    ]
    assert data.lseg["results"]["train"]["training"]["label_sets"] == {"synthetic": ["road", "sky"]}


def test_a_card_of_an_earlier_lseg_with_one_evaluation_keeps_it(tmp_path, tiny_model):
    import lseg.model.card as card

    folder = tiny_model.save_pretrained(tmp_path / "model")
    metadata = {**ModelCard.load(folder / "README.md").data.to_dict(), "model_name": "model"}
    metadata.pop(card.MARKER)
    earlier = {"dataset": "ade20k", "split": "val", "metrics": {"miou": 0.25}}
    metadata["lseg"]["results"] = {"evaluate": earlier}
    card._write(folder / "README.md", metadata)  # what an lseg before lists of evaluations wrote
    update_card_metrics(folder, EVALUATION)
    results = ModelCard.load(folder / "README.md").data.lseg["results"]["evaluate"]
    assert [(r["dataset"], r["metrics"]["miou"]) for r in results] == [("ade20k", 0.25), ("camvid", 0.5)]


def test_training_on_a_folder_dataset_names_it_by_its_root(tmp_path, tiny_model):
    from types import SimpleNamespace

    from lseg.train.callbacks import ExportPretrained
    from lseg.train.datamodule import DatasetSpec

    datamodule = SimpleNamespace(
        val_spec=DatasetSpec(name="folder", root=str(tmp_path / "streets"), split="val"),
        label_sets={"folder": ["road", "sky"]},
        val_key="val:folder",
    )
    report = ExportPretrained()._report(SimpleNamespace(datamodule=datamodule), None)
    folder = tiny_model.save_pretrained(tmp_path / "model", metrics=report)
    train = ModelCard.load(folder / "README.md").data.lseg["results"]["train"]
    assert (train["dataset"], train["split"]) == ("streets", "val")
    assert "Transductive" not in (folder / "README.md").read_text()


def test_a_self_trained_model_card_names_the_held_out_words_it_asked(tmp_path, tiny_model):
    """Transductive self-training asked the unseen classes' words: its card says so, and which."""
    from types import SimpleNamespace

    from lseg.train.callbacks import ExportPretrained

    datamodule = SimpleNamespace(
        label_sets={"folder": ["road"]}, unseen_labels={"folder": ["truck or bus", "sky"]}
    )
    trainer = SimpleNamespace(
        datamodule=datamodule, lightning_module=SimpleNamespace(hparams={"self_training": 1.0})
    )
    report = ExportPretrained()._report(trainer, None)
    assert report["training"]["self_training_labels"] == {"folder": ["truck or bus", "sky"]}
    card = (tiny_model.save_pretrained(tmp_path / "model", metrics=report) / "README.md").read_text()
    transductive = "Transductive: self-training also asked the held-out words folder: truck or bus, sky."
    assert f"Trained on folder: road. {transductive}" in card


def test_a_part_of_a_split_or_another_protocol_never_replaces_the_whole_splits_result(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model", metrics=TRAINING)
    sized = {**EVALUATION, "config": {**EVALUATION["config"], "size": 480}, "timing": {"images": 101}}
    quick = {  # a smoke check: `--max-images 8 --size 240` scored 8 images
        **sized,
        "config": {**sized["config"], "max_images": 8, "size": 240},
        "timing": {"images": 8},
        "metrics": {"miou": 0.125},
    }
    drive = {**sized, "dataset": {**EVALUATION["dataset"], "split": "train", "sequences": ["0006R0"]}}
    multi = {**sized, "config": {**sized["config"], "protocol": "lseg-ms"}, "metrics": {"miou": 0.625}}
    whole = {**sized, "config": {**sized["config"], "max_images": 500}, "metrics": {"miou": 0.25}}  # > 101
    for report in (sized, quick, drive, multi, whole):
        update_card_metrics(folder, report)
    results = ModelCard.load(folder / "README.md").data.lseg["results"]["evaluate"]
    assert [(r["split"], r["protocol"], r["metrics"]["miou"]) for r in results] == [
        ("val", "single at 480", 0.25),  # the whole split again (500 >= its 101 images): replaced
        ("val[:8]", "single at 240", 0.125),
        ("train (0006R0)", "single at 480", 0.5),
        ("val", "lseg-ms at 480", 0.625),
    ]
