"""Label words: reading them ("a, b, c" or a labels file) and checking them, for every entry point.

Library, CLI and demo take labels through `parse_labels` / `validate_labels`, so a label list is refused
with the same one-line message wherever it comes from; dataset class names become the words asked
through `class_words`, so training, evaluation, zero-shot, the model card and the demo ask the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from lseg.errors import LSegError
from lseg.files import read_text

MAX_LABEL_CHARS = 200  # a label is a word or a short phrase; CLIP reads at most 77 tokens anyway


def label_key(label: str) -> str:
    """Labels equal under this key tokenize identically (CLIP lower-cases and collapses whitespace)."""
    return " ".join(label.split()).casefold()


def class_words(names: Iterable[str]) -> list[str]:
    """The words the model is asked for each dataset class name: "traffic_light" -> "traffic light".

    Dataset names join words with underscores (MSeg, ADE20K, FSS-1000); the text encoder must read
    them as the words a user would type. Training, evaluation in the dataset's label space, zero-shot
    benchmarks, the MSeg universal names, the model card's labels and the demo all ask through this one
    function, so a class is never asked with one text in training and another in evaluation.
    """
    return [" ".join(name.replace("_", " ").split()) for name in names]


def validate_labels(labels: str | Iterable[str]) -> list[str]:
    """Labels as a clean list: a string is split on commas; each label is stripped.

    Rejects (one clear line each) an empty list, empty or non-string labels, labels longer than
    MAX_LABEL_CHARS, and duplicates, including labels that differ only in case or spacing: the text
    encoder reads those identically, so pixels would be split between them arbitrarily.
    """
    if isinstance(labels, str):
        labels = labels.split(",") if labels.strip() else []
    elif not isinstance(labels, Iterable) or isinstance(labels, (bytes, Mapping)):
        raise LSegError(
            f"labels must be a comma-separated string or a list of strings, got {labels!r}; "
            "e.g. 'cat, plant, other' or ['cat', 'plant', 'other']"
        )
    labels = list(labels)
    for label in labels:
        if not isinstance(label, str):
            raise LSegError(f"labels must be strings; got {label!r} ({type(label).__name__}) in {labels!r}")
    cleaned = [label.strip() for label in labels]
    if not cleaned:
        raise LSegError("the label list is empty; give at least one label, e.g. 'cat, other'")
    if any(not label for label in cleaned):
        raise LSegError(f"empty label in {labels!r}; remove stray commas or blank lines")
    for label in cleaned:
        if len(label) > MAX_LABEL_CHARS:
            raise LSegError(
                f"label of {len(label)} characters ({label[:40]!r}...) is too long; "
                f"labels may have at most {MAX_LABEL_CHARS} characters"
            )
    groups: dict[str, list[str]] = {}
    for label in cleaned:
        groups.setdefault(label_key(label), []).append(label)
    duplicates = [" / ".join(dict.fromkeys(group)) for group in groups.values() if len(group) > 1]
    if duplicates:
        raise LSegError(
            f"duplicate labels: {', '.join(duplicates)}; each label must appear once "
            "(labels differing only in case or spacing read the same to the text encoder)"
        )
    return cleaned


def parse_labels(text: str | None = None, file: str | Path | None = None) -> list[str] | None:
    """Checked labels from "a, b, c" or a file (one per line, or comma-separated); None if neither given."""
    if text is not None and file is not None:
        raise LSegError("give either labels or a labels file, not both")
    if file is not None:
        content = read_text(file, "labels file")
        lines = content.splitlines()
        parts = [p for line in lines for p in line.split(",")] if "," in content else lines
        return validate_labels([p for p in parts if p.strip()])
    return None if text is None else validate_labels(text)
