import pytest
import torch

from lseg.data import (
    CAMVID_CLASSES,
    CAMVID_TAXONOMY_ALIASES,
    ade20k_names,
    bundled_names,
    label_id_map,
    map_names,
    negative_words,
    parse_cell,
    to_universal_id_map,
    universal_names,
)
from lseg.errors import LSegError


def test_universal_names():
    names = universal_names()
    assert len(names) == 194 == len(set(names))
    assert "unlabeled" not in names and {"car", "person", "sky", "building"} <= set(names)


def test_parse_cell():
    assert parse_cell("{door, screen door}") == ["door", "screen door"]
    assert parse_cell("{house,building,  skyscraper}") == ["house", "building", "skyscraper"]
    assert parse_cell(" car ") == ["car"] and parse_cell("") == []


@pytest.mark.parametrize("column", ["ade20k-150-relabeled", "coco-panoptic-133-relabeled"])
def test_every_relabeled_class_maps_to_a_universal_class(column):
    names = bundled_names(column)
    table = to_universal_id_map(column)
    assert table.dtype == torch.int64 and len(table) == len(names) == {"ade": 141, "coc": 155}[column[:3]]
    assert ((table >= 0) & (table < 194)).all() and len(set(table.tolist())) == len(names)
    universal = universal_names()
    assert universal[int(table[names.index("car")])] == "car"


def test_merged_source_classes_and_unlabeled():
    table = to_universal_id_map("ade20k-150", names=ade20k_names(), ignore_index=255)
    names, universal = ade20k_names(), universal_names()
    assert universal[int(table[names.index("skyscraper")])] == universal[int(table[names.index("house")])]
    assert table[names.index("computer")] == 255  # MSeg maps it to 'unlabeled'


def test_taxonomy_errors():
    with pytest.raises(LSegError, match="unknown taxonomy column 'cityscapes'.*camvid-11"):
        to_universal_id_map("cityscapes", names=["road"])
    with pytest.raises(LSegError, match="no class-names file bundled for 'camvid-11'"):
        to_universal_id_map("camvid-11")
    with pytest.raises(LSegError, match="'Bicyclist' maps to several universal classes"):
        to_universal_id_map("camvid-11", names=["Bicyclist"])
    with pytest.raises(LSegError, match="'zebra crossing' is not in taxonomy column 'universal'"):
        map_names(["zebra crossing"], "camvid-11")


def test_map_names_universal_to_camvid():
    assert map_names(["car", "backpack", "sky"], "camvid-11") == ["Car", None, "Sky"]
    assert map_names(["Column_Pole"], "universal", source_column="camvid-11") == ["pole"]


def test_label_id_map_scores_universal_model_on_camvid():
    table = label_id_map(universal_names(), "camvid-11", CAMVID_CLASSES, aliases=CAMVID_TAXONOMY_ALIASES)
    assert len(table) == 194 and set(table.tolist()) == set(range(11)) | {255}
    assert table[universal_names().index("sidewalk_pavement")] == CAMVID_CLASSES.index("Pavement")
    with pytest.raises(LSegError, match="taxonomy class '(Sidewalk|Column_Pole)'.*aliases"):
        label_id_map(universal_names(), "camvid-11", CAMVID_CLASSES)


def test_negative_words_never_name_what_a_labelled_pixel_may_show():
    words = negative_words("camvid-11")
    assert len(words) == len(set(words)) and "unlabeled" not in words
    # CamVid's own classes map to sky, pole, building, road, person, car, ...: none of them, nor any
    # class sharing their MSeg parent category (bus and truck are vehicles like car), is a negative.
    for word in ("sky", "pole", "building", "road", "sidewalk pavement", "person", "car", "bus", "truck",
                 "vegetation", "traffic light", "bridge", "terrain", "motorcyclist"):  # fmt: skip
        assert word not in words
    assert {"dog", "pizza", "wall", "window", "lamp"} <= set(words)  # no CamVid class in their parents
    fewer = negative_words("camvid-11", exclude_parents=["", "wall", "window"])
    assert {"wall", "window", "lamp", "sky"}.isdisjoint(fewer) and "dog" in fewer
    assert set(fewer) < set(words)
    with pytest.raises(LSegError, match="unknown MSeg parent categories \\['walls'\\]"):
        negative_words("camvid-11", exclude_parents=["walls"])
    with pytest.raises(LSegError, match="unknown taxonomy column"):
        negative_words("kitti")
