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
    "metrics": {"miou": 0.5, "pixel_accuracy": 0.75, "fwiou": float("nan"), "per_class_iou": {"Sky": 0.9}},
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
    evaluation = info["results"]["evaluate"]
    assert evaluation["metrics"] == {"miou": 0.5, "pixel_accuracy": 0.75}  # NaN and per-class left out
    assert (evaluation["dataset"], evaluation["split"], evaluation["protocol"]) == ("camvid", "val", "single")
    scores = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert scores == {("camvid", "val", "miou"): 0.5, ("camvid", "val", "pixel_accuracy"): 0.75}
    assert data.model_name == "model"
    assert "| mIoU | 0.5000 |" in card.text and 'LSeg.from_pretrained("path/to/this/folder")' in card.text


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
    assert results["evaluate"]["metrics"]["miou"] == 0.5
    assert {(r.dataset_type, r.metric_type) for r in data.eval_results} == {
        ("synthetic", "miou"), ("camvid", "miou"), ("camvid", "pixel_accuracy"),
    }  # fmt: skip
    newer = {**EVALUATION, "metrics": {"miou": 0.625}}
    update_card_metrics(folder, newer)  # our own card, rewritten again: the last run wins
    assert ModelCard.load(folder / "README.md").data.lseg["results"]["evaluate"]["metrics"] == {"miou": 0.625}
    tiny_model.save_pretrained(folder)  # new weights: a fresh card, old scores dropped
    assert ModelCard.load(folder / "README.md").data.lseg["results"] == {}


def test_a_model_folder_without_a_card_gets_one_from_its_config(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    (folder / "README.md").unlink()  # as saved by an lseg without model cards
    update_card_metrics(folder, EVALUATION)
    info = ModelCard.load(folder / "README.md").data.lseg
    assert (
        info["labels"] == tiny_model.config.labels and info["results"]["evaluate"]["metrics"]["miou"] == 0.5
    )


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
