"""Presets: the bundled ones, a user's config JSON by path, and folders of them added like open_clip's."""

import json

import pytest

from lseg import LSeg
from lseg.cli.main import main
from lseg.errors import LSegError
from lseg.model import add_preset, load_preset, preset_names
from lseg.model import config as config_module


@pytest.fixture
def my_config(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "_ADDED_PRESETS", {})  # what add_preset adds stays in the test
    data = {**load_preset("tiny").to_dict(), "features": 24}
    path = tmp_path / "presets" / "my_tiny.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path


def test_a_config_json_path_is_a_preset(my_config, tmp_path, capsys):
    assert load_preset(str(my_config)).features == 24
    assert LSeg.from_config(str(my_config)).config.features == 24
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "nothing.png"), "--preset", str(my_config), "--out", str(out),
                 "--labels", "a, b"])  # fmt: skip
    assert code == 1 and "nothing.png" in capsys.readouterr().err  # the preset loaded; the image is missing


def test_added_presets_are_listed_and_loaded_by_name(my_config):
    assert add_preset(my_config.parent) == ["my_tiny"]
    assert "my_tiny" in preset_names() and "tiny" in preset_names()
    assert load_preset("my_tiny").features == 24


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "is not valid JSON"), ('{"features": "wide"}', "features must be"), (None, "not found")],
)
def test_a_bad_preset_file_is_one_clear_error(my_config, content, message):
    path = my_config.parent / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LSegError, match=message):
        load_preset(str(path))
    with pytest.raises(LSegError):
        add_preset(path)


def test_a_card_names_only_bundled_presets(my_config, tmp_path):
    """A preset added from a user's file means nothing on another machine: the card leaves it out."""
    from huggingface_hub import ModelCard

    add_preset(my_config)
    folder = LSeg.from_config("my_tiny").save_pretrained(tmp_path / "model")
    assert "preset" not in ModelCard.load(folder / "README.md").data.lseg
    tiny = LSeg.from_config("tiny").save_pretrained(tmp_path / "tiny")
    assert ModelCard.load(tiny / "README.md").data.lseg["preset"] == "tiny"
