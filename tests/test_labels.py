"""`lseg.labels`: the one place labels are read and checked (library, CLI and demo)."""

import pytest

from lseg.errors import LSegError
from lseg.labels import parse_labels, validate_labels


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
