"""Which words an evaluation asks the model for, and how its predictions map to the dataset's classes.

Three ways to choose the text of each class (dataset label space):

* the dataset's class names as words (default; `lseg.labels.class_words`: "traffic_light" is asked
  as "traffic light", as in training);
* a labels file: one label per line, line ``i`` = the text for class ``i`` (exactly one line per class);
* a synonyms file: ``ClassName: word`` (or ``ClassName<TAB>word``) lines that replace the text of the
  classes they name; the other classes keep their names.

In the universal label space the model is asked for the 194 MSeg universal classes and its predictions
are mapped to the dataset's classes by name through ``MSeg_master.tsv`` (see `universal_label_space`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lseg.data import IGNORE_INDEX
from lseg.errors import LSegError
from lseg.files import read_text
from lseg.labels import class_words, validate_labels

LABEL_SPACES = ("dataset", "universal")


def read_labels_file(path: str | Path, class_names: Sequence[str]) -> list[str]:
    """One label per non-empty line, line ``i`` for class ``i``; the count must match the classes."""
    path = Path(path)
    labels = [line.strip() for line in read_text(path, "labels file").splitlines() if line.strip()]
    if len(labels) != len(class_names):
        raise LSegError(
            f"labels file {path} has {len(labels)} labels but the evaluation has {len(class_names)} classes; "
            "give one label per line, line i for class i"
        )
    return labels


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def read_synonyms(path: str | Path, class_names: Sequence[str]) -> dict[str, str]:
    """``{class name: word}`` from ``ClassName: word`` or ``ClassName<TAB>word`` lines.

    Blank lines and lines starting with ``#`` are skipped. Class names match exactly, else ignoring case
    and ``_``/``-``/space differences. Unknown class names, duplicates and empty words raise LSegError.
    """
    path = Path(path)
    exact = set(class_names)
    loose: dict[str, str] = {}
    for name in class_names:
        loose.setdefault(_norm(name), name)
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for lineno, raw in enumerate(read_text(path, "synonyms file").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:
            key, _, word = line.partition("\t")
        elif ":" in line:
            key, _, word = line.partition(":")
        else:
            raise LSegError(
                f"{path}:{lineno}: expected 'ClassName: word' or 'ClassName<TAB>word', got {line!r}"
            )
        key, word = key.strip(), word.strip()
        if not word:
            raise LSegError(f"{path}:{lineno}: no word given for class {key!r}")
        name = key if key in exact else loose.get(_norm(key))
        if name is None:
            unknown.append(key)
            continue
        if name in mapping:
            raise LSegError(f"{path}:{lineno}: class {name!r} is given twice")
        mapping[name] = word
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise LSegError(
            f"synonyms file {path} names {len(unknown)} unknown class(es): {shown}; "
            f"known classes are e.g. {', '.join(list(class_names)[:8])}"
        )
    return mapping


def load_synonyms(synonyms: Mapping[str, str] | str | Path, class_names: Sequence[str]) -> dict[str, str]:
    """``{class name: word}`` from a synonyms file (`read_synonyms`) or a mapping keyed by class names."""
    if not isinstance(synonyms, Mapping):
        return read_synonyms(synonyms, class_names)
    unknown = [str(name) for name in synonyms if name not in set(class_names)]
    if unknown:
        raise LSegError(f"synonyms name unknown class(es): {', '.join(map(repr, unknown[:10]))}")
    return {str(name): str(word) for name, word in synonyms.items()}


def apply_synonyms(
    class_names: Sequence[str], synonyms: Mapping[str, str], words: Sequence[str] | None = None
) -> list[str]:
    """Text of each class: its synonym if one is given, else its word (default: its name as words)."""
    words = class_words(class_names) if words is None else words
    return [synonyms.get(name, word) for name, word in zip(class_names, words, strict=True)]


def universal_prompt_names() -> list[str]:
    """MSeg universal class names as words: ``sidewalk_pavement`` -> ``sidewalk pavement``."""
    from lseg.data.taxonomy import universal_names

    return class_words(universal_names())


def taxonomy_column(dataset: str, column: str | None = None) -> tuple[str, dict[str, str] | None]:
    """MSeg taxonomy column (and name aliases) of a registry dataset, or the column given."""
    if column is not None:
        from lseg.data.taxonomy import dataset_columns

        if column not in dataset_columns():
            raise LSegError(
                f"unknown taxonomy column {column!r}; choose one of {', '.join(dataset_columns())}"
            )
        return column, None
    from lseg.data import DATASETS

    record = DATASETS.get(dataset)
    if record is None or record.taxonomy_column is None:
        known = ", ".join(name for name, known in DATASETS.items() if known.taxonomy_column)
        raise LSegError(
            f"--label-space universal needs the dataset's column in MSeg_master.tsv; known for {known} "
            "(for ADE20K use mseg-ade20k); for other datasets pass --taxonomy-column COLUMN"
        )
    return record.taxonomy_column, dict(record.taxonomy_aliases) or None


@dataclass(frozen=True)
class LabelSpace:
    """Labels asked of the model and, when they are not the dataset's classes, where each one goes.

    ``to_class[i]`` is the dataset class of predicted label ``i`` (``IGNORE_INDEX``: none); None means
    label ``i`` is class ``i``.
    """

    name: str
    labels: list[str]
    to_class: torch.Tensor | None = None
    column: str | None = None


def dataset_label_space(class_names: Sequence[str], labels: Sequence[str] | None = None) -> LabelSpace:
    """Labels are the dataset's classes, asked as their words (`class_words`) unless `labels` are given."""
    labels = class_words(class_names) if labels is None else list(labels)
    if len(labels) != len(class_names):
        raise LSegError(f"{len(labels)} labels given for {len(class_names)} classes")
    return LabelSpace("dataset", labels)


def universal_label_space(
    dataset: str,
    class_names: Sequence[str],
    labels: Sequence[str] | None = None,
    column: str | None = None,
) -> LabelSpace:
    """Ask for the universal classes; map each to the dataset class of the same MSeg row.

    ``labels`` replaces the universal words (one per universal class, in universal-id order).
    """
    from lseg.data.taxonomy import label_id_map, universal_names

    column, aliases = taxonomy_column(dataset, column)
    universal = universal_names()
    table = label_id_map(universal, column, list(class_names), aliases=aliases, ignore_index=IGNORE_INDEX)
    labels = universal_prompt_names() if labels is None else list(labels)
    if len(labels) != len(universal):
        raise LSegError(f"{len(labels)} labels given for {len(universal)} universal classes")
    if not bool((table != IGNORE_INDEX).any()):
        raise LSegError(f"no universal class maps to a class of {dataset} through column {column!r}")
    return LabelSpace("universal", labels, table, column)


def build_label_space(
    class_names: Sequence[str],
    *,
    dataset: str | None = None,
    label_space: str = "dataset",
    labels: Sequence[str] | None = None,
    labels_file: str | Path | None = None,
    synonyms: Mapping[str, str] | str | Path | None = None,
    taxonomy_column: str | None = None,
) -> LabelSpace:
    """The words an evaluation asks, from the user's choices; labels are checked (`validate_labels`).

    `labels`, `labels_file` and `synonyms` (at most one) replace the words of the dataset's classes, or
    with ``label_space="universal"`` those of the 194 MSeg universal classes, which are then mapped to
    the classes through the taxonomy column of registry dataset `dataset` (or `taxonomy_column`).
    """
    if label_space not in LABEL_SPACES:
        raise LSegError(f"label_space must be one of {', '.join(LABEL_SPACES)}, got {label_space!r}")
    if sum(choice is not None for choice in (labels, labels_file, synonyms)) > 1:
        raise LSegError("give at most one of labels, a labels file and synonyms")
    if label_space == "dataset" and taxonomy_column:
        raise LSegError("a taxonomy column (--taxonomy-column) only applies to the universal label space")
    if label_space == "universal":
        from lseg.data.taxonomy import universal_names

        named = universal_names()
        default = universal_prompt_names()
    else:
        named = list(class_names)
        default = class_words(named)
    if labels_file is not None:
        labels = read_labels_file(labels_file, named)
    elif synonyms is not None:
        labels = apply_synonyms(named, load_synonyms(synonyms, named), default)
    if label_space == "universal":
        if dataset is None and taxonomy_column is None:
            raise LSegError("the universal label space needs a registry dataset name or a taxonomy column")
        space = universal_label_space(dataset or "", class_names, labels, taxonomy_column)
    else:
        space = dataset_label_space(class_names, labels)
    validate_labels(space.labels)
    return space
