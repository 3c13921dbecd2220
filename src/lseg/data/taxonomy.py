"""MSeg universal taxonomy (Lambert et al., CVPR 2020): one shared label set for many datasets.

Reads the bundled ``MSeg_master.tsv`` (CC BY 4.0): one row per universal class, with the name each
source dataset uses for it. A cell ``{a, b}`` means several source classes merge into that row.
Universal id = row index (the ``unlabeled`` row excluded), the convention of the MSeg API.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Mapping, Sequence
from importlib import resources

import torch

from lseg.errors import LSegError
from lseg.labels import class_words

# The label id of pixels that count for no class (unlabelled, augmentation and batch padding): the one
# definition for datasets, training and evaluation (import it from lseg.data). It lives here because
# every other lseg.data module imports this one.
IGNORE_INDEX = 255
UNLABELED = "unlabeled"
_NOT_DATASET_COLUMNS = ("Parent Category", "universal", "WordNet 3.1 Synset", "Modification of WordNet Node")


def _resource_text(name: str) -> str:
    return resources.files("lseg").joinpath("resources", name).read_text(encoding="utf-8")


@functools.cache
def _rows() -> tuple[dict[str, str], ...]:
    reader = csv.DictReader(
        io.StringIO(_resource_text("MSeg_master.tsv")), delimiter="\t", quoting=csv.QUOTE_NONE
    )
    return tuple({k.strip(): (v or "").strip() for k, v in row.items()} for row in reader)


def parse_cell(cell: str) -> list[str]:
    """Split a taxonomy cell into source class names: ``{a, b}`` lists several, ``''`` none."""
    cell = cell.strip()
    if cell.startswith("{") and cell.endswith("}"):
        return [part.strip() for part in cell[1:-1].split(",") if part.strip()]
    return [cell] if cell else []


def dataset_columns() -> list[str]:
    """Taxonomy columns that name a dataset's classes (valid ``*_column`` arguments, plus ``universal``)."""
    return [c for c in _rows()[0] if c not in _NOT_DATASET_COLUMNS and not c.startswith("Defn")]


def _check_column(column: str) -> None:
    if column != "universal" and column not in dataset_columns():
        raise LSegError(
            f"unknown taxonomy column {column!r}; choose 'universal' or one of {', '.join(dataset_columns())}"
        )


def universal_names() -> list[str]:
    """The 194 MSeg universal class names; list index = universal class id."""
    return [row["universal"] for row in _rows() if row["universal"] != UNLABELED]


def negative_words(dataset_column: str, exclude_parents: Sequence[str] = ()) -> list[str]:
    """Universal class names (as words: "traffic light") to use as negatives for a dataset.

    Training can add these to each step's label set, words for what no training pixel is labelled
    as, so pixels move towards their class word and away from many others. A universal class is left
    out if it shares a parent category with any class of ``dataset_column`` (for CamVid: every
    vehicle, person, ground, vegetation, structural, roadside and building-parent class), or if its
    parent category is in ``exclude_parents`` (``""`` is MSeg's unnamed group): what a labelled pixel
    may show (CamVid labels windows and walls "Building") must never be pushed away from it.
    """
    _check_column(dataset_column)
    known = {row["Parent Category"] for row in _rows()}
    unknown = [p for p in exclude_parents if p not in known]
    if unknown:
        raise LSegError(f"unknown MSeg parent categories {unknown}; known: {', '.join(sorted(known))}")
    claimed = [row for row in _rows() if parse_cell(row[dataset_column])]
    parents = {row["Parent Category"] for row in claimed if row["Parent Category"]} | set(exclude_parents)
    excluded = {row["universal"] for row in claimed} | {UNLABELED}
    return class_words(
        row["universal"]
        for row in _rows()
        if row["universal"] not in excluded and row["Parent Category"] not in parents
    )


def bundled_names(dataset_column: str) -> list[str]:
    """Class names (index = label id) of a dataset whose names file ships with lseg."""
    try:
        text = _resource_text(f"{dataset_column}_names.txt")
    except FileNotFoundError:
        raise LSegError(
            f"no class-names file bundled for {dataset_column!r}; pass its class names in label-id order"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _targets(source_column: str, target_column: str) -> dict[str, list[str]]:
    """Source class name -> target class names of every row it appears in (in row order, no repeats)."""
    out: dict[str, list[str]] = {}
    for row in _rows():
        targets = parse_cell(row[target_column])
        for name in parse_cell(row[source_column]):
            bucket = out.setdefault(name, [])
            bucket.extend(t for t in targets if t not in bucket)
    return out


def to_universal_id_map(
    dataset_column: str, names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Lookup table dataset label id -> universal id, to train on a dataset in the universal taxonomy.

    ``names`` are the dataset's class names in label-id order (default: the bundled names file of
    ``dataset_column``). Classes that MSeg maps to ``unlabeled`` become ``ignore_index``.
    """
    _check_column(dataset_column)
    names = bundled_names(dataset_column) if names is None else list(names)
    uid = {name: i for i, name in enumerate(universal_names())}
    uid[UNLABELED] = ignore_index
    targets = _targets(dataset_column, "universal")
    table = []
    for name in names:
        found = targets.get(name, [])
        if len(found) != 1:
            why = "is not in" if not found else f"maps to several universal classes ({', '.join(found)}) in"
            raise LSegError(f"class {name!r} {why} taxonomy column {dataset_column!r}")
        table.append(uid[found[0]])
    return torch.tensor(table, dtype=torch.int64)


def map_names(
    source_names: Sequence[str], target_column: str, source_column: str = "universal"
) -> list[str | None]:
    """Name in ``target_column`` of each source class (None: no counterpart), e.g. universal -> camvid-11.

    Used to score a model trained on one taxonomy against a dataset labelled in another.
    """
    _check_column(source_column)
    _check_column(target_column)
    targets = _targets(source_column, target_column)
    out: list[str | None] = []
    for name in source_names:
        if name not in targets:
            raise LSegError(f"class {name!r} is not in taxonomy column {source_column!r}")
        found = targets[name]
        if len(found) > 1:
            raise LSegError(
                f"class {name!r} of {source_column!r} maps to several {target_column!r} classes: "
                f"{', '.join(found)}"
            )
        out.append(found[0] if found else None)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def label_id_map(
    source_names: Sequence[str],
    target_column: str,
    target_names: Sequence[str],
    source_column: str = "universal",
    ignore_index: int = IGNORE_INDEX,
    aliases: Mapping[str, str] | None = None,
) -> torch.Tensor:
    """Lookup table source class id -> index into ``target_names`` (a dataset's own class list).

    Names match ignoring case and ``_``/``-``/space differences; ``aliases`` maps a taxonomy name to
    the dataset's name where they differ (see ``lseg.data.CAMVID_TAXONOMY_ALIASES``). Source classes
    without a counterpart map to ``ignore_index``.
    """
    index = {_norm(n): i for i, n in enumerate(target_names)}
    alias = {_norm(k): _norm(v) for k, v in (aliases or {}).items()}
    table = []
    for mapped in map_names(source_names, target_column, source_column):
        if mapped is None:
            table.append(ignore_index)
            continue
        key = alias.get(_norm(mapped), _norm(mapped))
        if key not in index:
            raise LSegError(
                f"taxonomy class {mapped!r} ({target_column}) is not among the dataset's class names; "
                "pass aliases={taxonomy name: dataset name}"
            )
        table.append(index[key])
    return torch.tensor(table, dtype=torch.int64)
