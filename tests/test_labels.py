"""`lseg.labels`: the one place labels are read and checked (library, CLI and demo)."""

import pytest

from lseg.errors import LSegError
from lseg.labels import class_words, parse_labels, validate_labels


def test_parse_labels_reads_text_or_a_file_and_checks_them(tmp_path):
    assert parse_labels(" cat , dog") == ["cat", "dog"]
    assert parse_labels() is None
    lines = tmp_path / "lines.txt"
    lines.write_text("cat\n\n road \n", encoding="utf-8")
    assert parse_labels(file=lines) == ["cat", "road"]
    commas = tmp_path / "commas.txt"
    commas.write_text("cat, dog,\nsky\n", encoding="utf-8")
    assert parse_labels(file=commas) == ["cat", "dog", "sky"]
    with pytest.raises(LSegError, match="not both"):
        parse_labels("cat", lines)
    with pytest.raises(LSegError, match="duplicate labels"):
        parse_labels("cat, Cat")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(LSegError, match="empty"):
        parse_labels(file=empty)


def test_validate_labels_is_the_text_encoders_check():
    from lseg.model import text_encoder

    assert text_encoder.validate_labels is validate_labels


def test_class_words_are_what_a_user_would_type():
    assert class_words(["traffic_light", "Column_Pole", "sky", "abe's_flyingfish", "a__b "]) == [
        "traffic light",
        "Column Pole",
        "sky",
        "abe's flyingfish",
        "a b",
    ]


def test_evaluation_asks_dataset_classes_and_universal_classes_as_words():
    """Regression: evaluation in the dataset's label space asked raw names ("traffic_light") where
    training asked words; 38 of the 150 MSeg ADE20K names have underscores."""
    from lseg.data.taxonomy import bundled_names
    from lseg.evaluate.labels import build_label_space

    names = bundled_names("ade20k-150-relabeled")
    labels = build_label_space(names).labels
    assert labels == class_words(names) and not any("_" in label for label in labels)
    assert sum("_" in name for name in names) == 38
    universal = build_label_space(names, dataset="mseg-ade20k", label_space="universal").labels
    assert "sidewalk pavement" in universal and not any("_" in label for label in universal)
