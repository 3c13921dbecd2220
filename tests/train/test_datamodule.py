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
    dataset, labels = build(spec, None)
    assert labels == ["street", "truck or bus", "Sky"]  # class_words for the class without a synonym
    held_dataset, held_labels = build({**spec, "unseen_file": str(street / "folds.yaml"), "fold": 0}, None)
    assert held_labels == ["street", "Sky"]
    assert held_dataset.class_names == ["Road", "Sky"]
    assert torch.equal(held_dataset[0]["mask"][0], torch.tensor([0, 0, 255, 255, 1, 1]))
    _, by_name = build({**spec, "unseen": ["sky"]}, None)
    assert by_name == ["street", "truck or bus"]


def test_a_spec_that_holds_out_an_unknown_class_fails_before_training(street):
    with pytest.raises(LSegError, match="unknown class"):
        build({"name": "folder", "root": str(street), "split": None, "unseen": ["Lorry"]}, None)
    with pytest.raises(LSegError, match="cannot hold classes out"):
        build({"name": "synthetic", "unseen": ["road"]}, None)
