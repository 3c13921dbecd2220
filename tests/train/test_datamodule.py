"""Training dataset specs: the words asked (synonyms files as `lseg evaluate` reads them) and classes
held out of training for generalised zero-shot folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lseg.errors import LSegError
from lseg.train.datamodule import build


@pytest.fixture
def street(tmp_path):
    """A folder dataset: 4 x 6 masks of Road | Truck_Bus | Sky columns, names as CamVid writes them."""
    mask = np.repeat(np.array([[0, 0, 1, 1, 2, 2]], np.uint8), 4, axis=0)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    (tmp_path / "names.txt").write_text("Road\nTruck_Bus\nSky\n")
    (tmp_path / "folds.yaml").write_text(
        "folds: [[Truck_Bus], [Sky]]\nwords: {Truck_Bus: truck or bus, Road: street}\n"
    )
    return tmp_path


def test_synonyms_give_the_words_and_unseen_classes_are_neither_asked_nor_targets(street):
    spec = {"name": "folder", "root": str(street), "split": None, "synonyms": str(street / "folds.yaml")}
    dataset, labels, _, unseen_labels = build(spec, None)
    assert labels == ["street", "truck or bus", "Sky"]  # class_words for the class without a synonym
    assert unseen_labels == []
    held_dataset, held_labels, _, unseen_labels = build(
        {**spec, "unseen_file": str(street / "folds.yaml"), "fold": 0}, None
    )
    assert held_labels == ["street", "Sky"]
    assert unseen_labels == ["truck or bus"]  # asked only by transductive self-training
    assert held_dataset.class_names == ["Road", "Sky"]
    assert torch.equal(held_dataset[0]["mask"][0], torch.tensor([0, 0, 255, 255, 1, 1]))
    by_name = build({**spec, "unseen": ["sky", "road"]}, None)
    assert by_name.labels == ["truck or bus"] and by_name.unseen_labels == ["street", "Sky"]  # in class order


def test_a_spec_that_holds_out_an_unknown_class_fails_before_training(street):
    with pytest.raises(LSegError, match="unknown class"):
        build({"name": "folder", "root": str(street), "split": None, "unseen": ["Lorry"]}, None)
    with pytest.raises(LSegError, match="cannot hold classes out"):
        build({"name": "synthetic", "unseen": ["road"]}, None)


def test_alternatives_are_kept_per_class_and_an_unseen_class_takes_its_words_along(street):
    """A shared parent word ("vehicle") of an unseen class is not asked for the seen one either."""
    (street / "words.yaml").write_text(
        "folds: [[Truck_Bus]]\nwords: {Truck_Bus: truck or bus, Road: street}\n"
        "alternatives: {truck_bus: [truck, bus, vehicle], Road: [road, vehicle], Sky: heaven}\n"
    )
    spec = {"name": "folder", "root": str(street), "split": None, "synonyms": str(street / "words.yaml")}
    _, labels, alternatives, _ = build(spec, None)
    assert labels == ["street", "truck or bus", "Sky"]
    assert alternatives == [["road", "vehicle"], ["truck", "bus", "vehicle"], ["heaven"]]
    _, labels, alternatives, _ = build({**spec, "unseen_file": str(street / "words.yaml"), "fold": 0}, None)
    assert labels == ["street", "Sky"] and alternatives == [["road"], ["heaven"]]
    assert build({**spec, "synonyms": None}, None).alternatives == [[], [], []]


@pytest.mark.parametrize(
    ("alternatives", "message"),
    [
        ("{Road: [Sky]}", "alternative 'Sky' of class 'Road' is the word of class 'Sky'"),
        ("{Road: [truck  OR bus]}", "is the word of class 'Truck_Bus'"),
        ("{Lorry: [truck]}", "unknown class"),
        ("{Road: [lane, Lane]}", "duplicate labels"),
        ("{Road: []}", "label list is empty"),
        ("[road]", "must map class names"),
    ],
)
def test_an_alternative_that_could_not_name_one_class_fails_before_training(street, alternatives, message):
    (street / "words.yaml").write_text(f"words: {{Truck_Bus: truck or bus}}\nalternatives: {alternatives}\n")
    spec = {"name": "folder", "root": str(street), "split": None, "synonyms": str(street / "words.yaml")}
    with pytest.raises(LSegError, match=message):
        build(spec, None)


@pytest.mark.parametrize(
    ("spec", "message"), [({"name": "folder", "rot": "x"}, "unknown key"), ({}, "no 'name'")]
)
def test_a_dataset_spec_with_an_unknown_or_missing_key_is_one_line(spec, message):
    from lseg.train.datamodule import LSegDataModule

    with pytest.raises(LSegError, match=message):
        LSegDataModule(train=[spec])
