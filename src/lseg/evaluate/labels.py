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

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lseg.data import DATASETS, IGNORE_INDEX, dataset_columns, label_id_map, universal_names
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


def _synonym_entries(path: Path) -> list[tuple[int, str, str]]:
    """(line, class, word) of a synonyms file: ``ClassName: word`` / ``ClassName<TAB>word`` lines, or
    a YAML file (.yaml, .yml) whose ``words`` mapping is the table (a folds file keeps its words there)."""
    text = read_text(path, "synonyms file")
    if path.suffix in (".yaml", ".yml"):
        words = _read_yaml(path, text).get("words")
        if not isinstance(words, Mapping):
            raise LSegError(f"{path}: a YAML synonyms file needs a 'words' mapping of class name -> word")
        return [(0, str(key), "" if word is None else str(word)) for key, word in words.items()]
    entries = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        separator = "\t" if "\t" in line else ":"
        if separator not in line:
            raise LSegError(
                f"{path}:{lineno}: expected 'ClassName: word' or 'ClassName<TAB>word', got {line!r}"
            )
        key, _, word = line.partition(separator)
        entries.append((lineno, key.strip(), word.strip()))
    return entries


def _read_yaml(path: Path, text: str) -> dict:
    import yaml

    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise LSegError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise LSegError(f"{path}: expected a YAML mapping at the top level")
    return content


class _ClassNames:
    """Finds a dataset class by name: exactly, else ignoring case and ``_``/``-``/space differences."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.names = list(class_names)
        self.loose: dict[str, str] = {}
        for name in self.names:
            self.loose.setdefault(_norm(name), name)

    def find(self, key: str) -> str | None:
        return key if key in self.names else self.loose.get(_norm(key))

    def unknown_error(self, what: str, unknown: Sequence[str]) -> LSegError:
        shown = ", ".join(repr(u) for u in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        return LSegError(
            f"{what} names {len(unknown)} unknown class(es): {shown}; "
            f"known classes are e.g. {', '.join(self.names[:8])}"
        )


def read_synonyms(path: str | Path, class_names: Sequence[str]) -> dict[str, str]:
    """``{class name: word}`` from a synonyms file (`_synonym_entries`).

    Blank lines and lines starting with ``#`` are skipped. Class names match exactly, else ignoring case
    and ``_``/``-``/space differences. Unknown class names, duplicates and empty words raise LSegError.
    """
    path = Path(path)
    classes = _ClassNames(class_names)
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for lineno, key, word in _synonym_entries(path):
        where = f"{path}:{lineno}" if lineno else str(path)
        if not word:
            raise LSegError(f"{where}: no word given for class {key!r}")
        name = classes.find(key)
        if name is None:
            unknown.append(key)
            continue
        if name in mapping:
            raise LSegError(f"{where}: class {name!r} is given twice")
        mapping[name] = word
    if unknown:
        raise classes.unknown_error(f"synonyms file {path}", unknown)
    return mapping


def read_alternatives(path: str | Path, class_names: Sequence[str]) -> dict[str, list[str]]:
    """``{class name: [word, ...]}``: the other words training may ask a class as (label augmentation),
    from the optional ``alternatives`` mapping of a YAML synonyms file (class name -> word or list of
    words; names matched as in `read_synonyms`). Evaluation never asks them. Other files have none."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        return {}
    table = _read_yaml(path, read_text(path, "synonyms file")).get("alternatives") or {}
    if not isinstance(table, Mapping):
        raise LSegError(f"{path}: 'alternatives' must map class names to a word or a list of words")
    classes = _ClassNames(class_names)
    unknown = [str(key) for key in table if classes.find(str(key)) is None]
    if unknown:
        raise classes.unknown_error(f"the alternatives of {path}", unknown)
    found: dict[str, list[str]] = {}
    for key, words in table.items():
        name = classes.find(str(key))
        if name in found:
            raise LSegError(f"{path}: class {name!r} is given twice in 'alternatives'")
        try:
            found[name] = validate_labels([words] if isinstance(words, str) else words)
        except LSegError as error:
            raise LSegError(f"{path}: the alternatives of {key!r}: {error}") from None
    return found


@dataclass(frozen=True)
class UnseenClasses:
    """Class ids held out of training (``unseen``), and ids scored but reported apart (``apart``: too
    few pixels to count in the seen or unseen mean); every other class is seen."""

    unseen: tuple[int, ...]
    apart: tuple[int, ...] = ()


def read_unseen(
    class_names: Sequence[str],
    unseen: Sequence[str] | str | None = None,
    unseen_file: str | Path | None = None,
    fold: int | None = None,
) -> UnseenClasses | None:
    """The unseen classes of a generalised zero-shot run, by class name (matched as in `read_synonyms`).

    `unseen` is a list or "A, B" string; `unseen_file` is a text file (one class per line or
    comma-separated) or a folds YAML file (``folds``: a list of class lists, ``apart``: optional) read
    at `fold`. None when neither is given.
    """
    if unseen is not None and unseen_file is not None:
        raise LSegError("give either unseen classes or an unseen-classes file, not both")
    apart: list[str] = []
    source = "the unseen classes"
    if unseen_file is not None:
        path, source = Path(unseen_file), f"unseen-classes file {unseen_file}"
        text = read_text(path, "unseen-classes file")
        if path.suffix in (".yaml", ".yml"):
            unseen, apart = _fold(path, _read_yaml(path, text), fold)
        else:
            unseen = [
                part for line in text.splitlines() if not line.startswith("#") for part in line.split(",")
            ]
    elif fold is not None and unseen is None:
        raise LSegError("a fold selects unseen classes from a folds file; give the file too")
    if unseen is None:
        return None
    names = [part.strip() for part in (unseen.split(",") if isinstance(unseen, str) else unseen)]
    names = [name for name in names if name]
    classes = _ClassNames(class_names)
    found = [classes.find(name) for name in [*names, *apart]]
    unknown = [name for name, hit in zip([*names, *apart], found, strict=True) if hit is None]
    if unknown:
        raise classes.unknown_error(source, unknown)
    ids = [classes.names.index(name) for name in found]
    held, kept_apart = ids[: len(names)], ids[len(names) :]
    if not held:
        raise LSegError(f"{source} lists no class")
    if len(set(held)) < len(held) or set(held) & set(kept_apart):
        raise LSegError(f"{source} lists a class twice (or as both unseen and apart)")
    if len(held) + len(kept_apart) >= len(class_names):
        raise LSegError(f"{source} leaves no seen class of the {len(class_names)}")
    return UnseenClasses(tuple(held), tuple(kept_apart))


def read_seen_bias(path: str | Path, class_names: Sequence[str], unseen: UnseenClasses) -> tuple[float, ...]:
    """One seen-class offset per class (0 for the unseen ones) from a YAML or JSON file mapping class
    names (matched as in `read_synonyms`) to numbers: a per-class calibration, such as one fitted on a
    held-out split. Seen classes it leaves out get 0; an unseen class cannot be given one."""
    path = Path(path)
    table = _read_yaml(path, read_text(path, "seen-bias file"))
    classes = _ClassNames(class_names)
    unknown = [str(key) for key in table if classes.find(str(key)) is None]
    if unknown:
        raise classes.unknown_error(f"seen-bias file {path}", unknown)
    offsets = [0.0] * len(class_names)
    given: set[int] = set()
    for key, value in table.items():
        index = classes.names.index(classes.find(str(key)))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise LSegError(f"{path}: the seen bias of {key!r} must be a number, got {value!r}")
        if index in given:
            raise LSegError(f"{path}: class {classes.names[index]!r} is given twice")
        if index in unseen.unseen:
            raise LSegError(
                f"{path}: {classes.names[index]!r} is an unseen class; only seen classes take a bias"
            )
        offsets[index] = float(value)
        given.add(index)
    return tuple(offsets)


def _fold(path: Path, content: dict, fold: int | None) -> tuple[list[str], list[str]]:
    folds = content.get("folds")
    if not isinstance(folds, list) or not all(isinstance(f, list) for f in folds) or not folds:
        raise LSegError(f"{path}: a folds file needs 'folds': a list of class-name lists")
    if fold is None or not 0 <= fold < len(folds):
        raise LSegError(f"{path} has folds 0-{len(folds) - 1}; choose one with fold (--fold N), got {fold}")
    apart = content.get("apart") or []
    return [str(name) for name in folds[fold]], [str(name) for name in apart]


def load_synonyms(synonyms: Mapping[str, str] | str | Path, class_names: Sequence[str]) -> dict[str, str]:
    """``{class name: word}`` from a synonyms file (`read_synonyms`) or a mapping keyed by class names."""
    if not isinstance(synonyms, Mapping):
        return read_synonyms(synonyms, class_names)
    unknown = [str(name) for name in synonyms if name not in set(class_names)]
    if unknown:
        raise LSegError(f"synonyms name unknown class(es): {', '.join(map(repr, unknown[:10]))}")
    return {str(name): str(word) for name, word in synonyms.items()}


def apply_synonyms(class_names: Sequence[str], synonyms: Mapping[str, str]) -> list[str]:
    """Text of each class: its synonym if one is given, else its name as words (`class_words`)."""
    return [
        synonyms.get(name, word) for name, word in zip(class_names, class_words(class_names), strict=True)
    ]


def taxonomy_column(dataset: str, column: str | None = None) -> tuple[str, dict[str, str] | None]:
    """MSeg taxonomy column (and name aliases) of a registry dataset, or the column given."""
    if column is not None:
        if column not in dataset_columns():
            raise LSegError(
                f"unknown taxonomy column {column!r}; choose one of {', '.join(dataset_columns())}"
            )
        return column, None
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

    ``labels`` replaces the universal words (one per universal class, in universal-id order; default: the
    universal names as words, ``sidewalk_pavement`` -> ``sidewalk pavement``).
    """
    column, aliases = taxonomy_column(dataset, column)
    universal = universal_names()
    table = label_id_map(universal, column, list(class_names), aliases=aliases, ignore_index=IGNORE_INDEX)
    labels = class_words(universal) if labels is None else list(labels)
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
    named = universal_names() if label_space == "universal" else list(class_names)
    if labels_file is not None:
        labels = read_labels_file(labels_file, named)
    elif synonyms is not None:
        labels = apply_synonyms(named, load_synonyms(synonyms, named))
    if label_space == "universal":
        if dataset is None and taxonomy_column is None:
            raise LSegError("the universal label space needs a registry dataset name or a taxonomy column")
        space = universal_label_space(dataset or "", class_names, labels, taxonomy_column)
    else:
        space = dataset_label_space(class_names, labels)
    validate_labels(space.labels)
    return space
