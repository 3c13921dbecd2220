"""Segmentation datasets: every layout reduces to (image, label PNG) pairs read by one loader.

The loader checks what users get wrong (missing files, size mismatch, label ids beyond the class
list) and raises ``LSegError`` naming the file, instead of failing deep inside training.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from lseg.data.taxonomy import IGNORE_INDEX, bundled_names, to_universal_id_map, universal_names
from lseg.errors import LSegError
from lseg.files import read_text
from lseg.images import load_image, open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]
PathLike = str | os.PathLike

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
# SegNet CamVid names that differ from the MSeg taxonomy's ``camvid-11`` column (for taxonomy.label_id_map).
CAMVID_TAXONOMY_ALIASES = {"Column_Pole": "Pole", "Sidewalk": "Pavement"}


@dataclass(frozen=True)
class DatasetRecord:
    """What the library knows of a dataset name, in one place (timm's and mmseg's registries are the
    model): how to build it, its folder layout (in error messages and help), its MSeg_master.tsv
    column (the universal label space; aliases: taxonomy name -> this dataset's class name), the split
    evaluated when none is given, and the options `lseg evaluate` builds it with."""

    name: str
    builder: Callable[..., ListFileDataset]
    layout: str
    taxonomy_column: str | None = None
    taxonomy_aliases: Mapping[str, str] = field(default_factory=dict)
    default_split: str | None = "val"
    evaluation_options: Mapping[str, Any] = field(default_factory=dict)
    has_sequences: bool = False  # the builder takes `sequences` (drive ids: file-name prefixes)


DATASETS: dict[str, DatasetRecord] = {}


def register_dataset(name: str, *, layout: str, **record: Any) -> Callable[[Callable], Callable]:
    """Decorator adding a builder `(root, split, transform=None, **options) -> ListFileDataset` to
    `DATASETS` under `name`; training specs, `build_dataset`, `lseg evaluate --dataset` and the docs'
    lists all read it. `record` holds the other `DatasetRecord` fields."""

    def register(builder: Callable[..., ListFileDataset]) -> Callable[..., ListFileDataset]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = DatasetRecord(name, builder, layout, **record)
        return builder

    return register


def dataset_record(name: str) -> DatasetRecord:
    if name not in DATASETS:
        raise LSegError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def _lookup_table(
    id_map: Mapping[int, int] | Sequence[int] | torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Raw id -> training id table: a dict keeps unlisted ids, a sequence marks ids past its end as -1."""
    if isinstance(id_map, Mapping):
        items = [(int(k), int(v)) for k, v in id_map.items()]
        size = max([65536] + [k + 1 for k, _ in items])
        table = torch.arange(size, dtype=torch.int64)
    else:
        values = id_map.tolist() if isinstance(id_map, torch.Tensor) else list(id_map)
        items = [(i, int(v)) for i, v in enumerate(values)]
        size = max(65536, len(values))
        table = torch.full((size,), -1, dtype=torch.int64)
    if any(k < 0 for k, _ in items):
        raise LSegError(f"id_map has a negative raw label id: {sorted(k for k, _ in items if k < 0)[:5]}")
    for k, v in items:
        table[k] = v
    if 0 <= ignore_index < size:
        table[ignore_index] = ignore_index
    return table


def _read_list_file(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for lineno, line in enumerate(read_text(path, "list file").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise LSegError(f"{path}:{lineno}: expected 'IMAGE LABEL' (two paths), got {line.strip()!r}")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise LSegError(f"list file {path} lists no samples")
    return pairs


def read_names(path: PathLike) -> list[str]:
    """Class names from a text file, one per non-empty line; line index = label id."""
    path = Path(path)
    names = [line.strip() for line in read_text(path, "class-names file").splitlines() if line.strip()]
    if not names:
        raise LSegError(f"class-names file {path} is empty")
    return names


def _load_image(path: Path) -> torch.Tensor:
    """The stored pixels, EXIF orientation ignored: the label was drawn on them."""
    return torch.from_numpy(load_image(path, exif_orientation=False)).permute(2, 0, 1).contiguous()


def _load_label(path: Path) -> torch.Tensor:
    with open_image(path, "label") as img:
        if img.mode not in _LABEL_MODES:
            raise LSegError(
                f"label {path} has mode {img.mode}; expected a one-channel 8- or 16-bit PNG of class ids"
            )
        array = np.array(img)
    return torch.from_numpy(array.astype(np.int64))


class ListFileDataset(Dataset):
    """Image/label-PNG pairs from an ``IMAGE LABEL`` list file (or a list of pairs), relative to ``root``.

    ``id_map`` converts raw label ids to training ids: a dict changes only the ids it lists; a sequence
    or tensor is a full table (raw id = index, ids past its end are unknown). The ignore id is never
    remapped. Ids that are neither a class nor ignore raise, or with ``unknown_ids="ignore"`` become
    ignore with one warning per dataset.
    """

    def __init__(
        self,
        root: PathLike,
        list_file: PathLike | Sequence[tuple[str, str]],
        class_names: Sequence[str],
        ignore_index: int = IGNORE_INDEX,
        transform: Transform | None = None,
        unknown_ids: Literal["error", "ignore"] = "error",
        name: str | None = None,
        id_map: Mapping[int, int] | Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise LSegError(f"dataset root {self.root} not found")
        if unknown_ids not in ("error", "ignore"):
            raise LSegError(f"unknown_ids must be 'error' or 'ignore', got {unknown_ids!r}")
        self.class_names = list(class_names)
        if not self.class_names:
            raise LSegError(f"dataset at {self.root} has no class names")
        if 0 <= ignore_index < len(self.class_names):
            raise LSegError(
                f"ignore_index {ignore_index} collides with class {self.class_names[ignore_index]!r}"
            )
        if isinstance(list_file, (str, os.PathLike)):
            self.pairs = _read_list_file(Path(list_file))
        else:
            self.pairs = [(str(image), str(label)) for image, label in list_file]
            if not self.pairs:
                raise LSegError(f"dataset at {self.root} has no samples")
        self.ignore_index = ignore_index
        self.transform = transform
        self.unknown_ids = unknown_ids
        self.name = name or self.root.name
        self._table = None if id_map is None else _lookup_table(id_map, ignore_index)
        self._source_classes = len(self.class_names)  # class ids in the label files
        self._kept: torch.Tensor | None = None  # label-file class id -> id after `drop_classes` / ignore
        self._warned = False

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        image_path, label_path = (self.root / p for p in self.pairs[index])
        image = _load_image(image_path)
        raw = _load_label(label_path)
        if tuple(image.shape[-2:]) != tuple(raw.shape):
            raise LSegError(
                f"label {label_path} is {raw.shape[1]}x{raw.shape[0]} but image {image_path} is "
                f"{image.shape[2]}x{image.shape[1]}"
            )
        sample = {
            "image": tv_tensors.Image(image),
            "mask": tv_tensors.Mask(self._to_train_ids(raw, label_path)),
            "dataset": self.name,
            "path": str(image_path),
        }
        return self.transform(sample) if self.transform is not None else sample

    def pixel_counts(self) -> torch.Tensor:
        """Labelled pixels per class over every label file (int64, one per class; ignore not counted),
        read without the transform: class frequencies for loss weighting."""
        counts = torch.zeros(len(self.class_names), dtype=torch.int64)
        for _, label in self.pairs:
            path = self.root / label
            mask = self._to_train_ids(_load_label(path), path)
            counts += torch.bincount(mask[mask != self.ignore_index], minlength=len(counts))
        return counts

    def drop_classes(self, dropped: Sequence[int]) -> None:
        """Make classes `dropped` (ids) unlabelled: their pixels become ignore, the remaining classes
        are renumbered in order. Training on seen classes only (zero-shot protocols): an unseen class
        is then never a target and, with its word not asked, never a negative."""
        dropped = set(dropped)
        if not dropped <= set(range(len(self.class_names))) or len(dropped) == len(self.class_names):
            raise LSegError(f"cannot drop classes {sorted(dropped)} of {len(self.class_names)} ({self.name})")
        keep = [i for i in range(len(self.class_names)) if i not in dropped]
        renumber = torch.full((len(self.class_names) + 1,), self.ignore_index, dtype=torch.int64)
        renumber[keep] = torch.arange(len(keep))  # the extra last entry maps ignore to ignore
        kept = torch.arange(self._source_classes) if self._kept is None else self._kept
        self._kept = renumber[kept.masked_fill(kept == self.ignore_index, len(self.class_names))]
        self.class_names = [self.class_names[i] for i in keep]

    def _to_train_ids(self, raw: torch.Tensor, label_path: Path) -> torch.Tensor:
        mask = raw
        if self._table is not None:
            inside = (raw >= 0) & (raw < len(self._table))
            mask = torch.where(inside, self._table[raw.clamp(0, len(self._table) - 1)], -1)
        bad = ((mask < 0) | (mask >= self._source_classes)) & (mask != self.ignore_index)
        if bad.any():
            mask = self._unknown_ids(raw, mask, bad, label_path)
        if self._kept is None:
            return mask
        labelled = mask != self.ignore_index
        return torch.where(labelled, self._kept[mask.clamp(0, self._source_classes - 1)], mask)

    def _unknown_ids(
        self, raw: torch.Tensor, mask: torch.Tensor, bad: torch.Tensor, label_path: Path
    ) -> torch.Tensor:
        ids = raw[bad].unique()[:10].tolist()
        if self.unknown_ids == "error":
            raise LSegError(
                f"label {label_path} has ids {ids} that are neither one of the {self._source_classes} "
                f"classes nor ignore ({self.ignore_index}); fix the labels or pass unknown_ids='ignore'"
            )
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.name}: label {label_path} has ids {ids} outside the {self._source_classes} classes; "
                f"treating them as ignore ({self.ignore_index}); later occurrences are not reported",
                stacklevel=3,
            )
        return mask.masked_fill(bad, self.ignore_index)


def _require(dataset: str, *paths: Path) -> None:
    for path in paths:
        if not path.exists():
            raise LSegError(f"{dataset}: {path} not found; expected layout: {DATASETS[dataset].layout}")


def _split_folder(dataset: str, split: str, folders: Mapping[str, str]) -> str:
    if split not in folders:
        raise LSegError(f"{dataset}: unknown split {split!r}; choose one of: {', '.join(folders)}")
    return folders[split]


def scan_pairs(images_dir: PathLike, masks_dir: PathLike) -> list[tuple[str, str]]:
    """Pair every image in ``images_dir`` with the same-stem PNG in ``masks_dir`` (sorted by file name).

    Paths are absolute, so a dataset rooted at a relative folder does not join the folder twice.
    """
    images_dir, masks_dir = Path(os.path.abspath(images_dir)), Path(os.path.abspath(masks_dir))
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise LSegError(f"folder {folder} not found")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise LSegError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}")
    pairs = []
    for image in images:
        mask = masks_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise LSegError(f"no label {mask} for image {image}")
        pairs.append((str(image), str(mask)))
    return pairs


def keep_sequences(
    dataset: str, split: str | None, pairs: list[tuple[str, str]], sequences: Sequence[str] | None
) -> list[tuple[str, str]]:
    """The pairs whose image file name starts with one of `sequences` (drive ids such as "0006R0"),
    to hold whole drives out of a training split; all pairs when `sequences` is None."""
    if sequences is None:
        return pairs
    if isinstance(sequences, str) or not all(isinstance(s, str) for s in sequences):
        raise LSegError(
            f"{dataset} sequences must be a list of strings, got {sequences!r} (quote ids in YAML: "
            "'0016E5' unquoted is the number 1600000.0)"
        )
    wanted = tuple(sequences)
    kept = [pair for pair in pairs if Path(pair[0]).name.startswith(wanted)]
    if not wanted or not kept:
        found = sorted({Path(image).name.split("_")[0] for image, _ in pairs})
        raise LSegError(
            f"{dataset} {split}: no images of sequences {list(wanted)}; it has {', '.join(found)}"
        )
    return kept


@register_dataset(
    "camvid",
    layout="ROOT/{train,val}.txt with lines 'train/X.png trainannot/X.png' (SegNet CamVid)",
    taxonomy_column="camvid-11",
    taxonomy_aliases=CAMVID_TAXONOMY_ALIASES,
    has_sequences=True,
)
def camvid(
    root: PathLike,
    split: str,
    transform: Transform | None = None,
    sequences: Sequence[str] | None = None,
    **kw: Any,
) -> ListFileDataset:
    """CamVid, SegNet layout: 11 classes, id 11 (Unlabelled) -> ignore.

    `sequences` keeps only the images of those drives (file names start with the sequence id, e.g.
    "0006R0"), to hold whole drives out of the training split for choosing a recipe.
    """
    root = Path(root)
    _split_folder("camvid", split, {"train": "train", "val": "val", "test": "test"})
    _require("camvid", root, root / f"{split}.txt")
    return ListFileDataset(
        root,
        keep_sequences("camvid", split, _read_list_file(root / f"{split}.txt"), sequences),
        CAMVID_CLASSES,
        transform=transform,
        name="camvid",
        id_map={11: IGNORE_INDEX},
        **kw,
    )


def ade20k_names() -> list[str]:
    """ADE20K-150 class names; index = training id = annotation PNG value - 1."""
    return bundled_names("ade20k_150")


@register_dataset(
    "ade20k",
    layout="ROOT/images/{training,validation}/*.jpg and ROOT/annotations/{training,validation}/*.png "
    "(ADEChallengeData2016)",
)
def ade20k(
    root: PathLike,
    split: str,
    transform: Transform | None = None,
    list_file: PathLike | None = None,
    **kw: Any,
) -> ListFileDataset:
    """ADE20K-150 (ADEChallengeData2016): PNG value 0 (other) -> ignore, 1..150 -> class 0..149.

    Without ``list_file`` the image and annotation folders of the split are scanned.
    """
    root = Path(root)
    folder = _split_folder("ade20k", split, {"train": "training", "val": "validation"})
    _require("ade20k", root)
    if list_file is None:
        _require("ade20k", root / "images" / folder, root / "annotations" / folder)
    pairs = list_file or scan_pairs(root / "images" / folder, root / "annotations" / folder)
    id_map = [IGNORE_INDEX, *range(150)]
    return ListFileDataset(
        root, pairs, ade20k_names(), transform=transform, name="ade20k", id_map=id_map, **kw
    )


def _mseg_dataset(
    name: str, subfolder: str, labels: str, splits: Mapping[str, str], column: str, layout: str
) -> Callable[..., ListFileDataset]:
    """Register the builder of the MSeg relabeled dataset `name` under ``root/subfolder``: its images
    in ``images/SPLIT_FOLDER``, relabeled PNGs in ``labels/SPLIT_FOLDER``, in taxonomy column `column`."""

    def build(
        root: PathLike,
        split: str,
        transform: Transform | None = None,
        list_file: PathLike | None = None,
        taxonomy: Literal["universal", "dataset"] = "universal",
        **kw: Any,
    ) -> ListFileDataset:
        """The MSeg dataset in the universal taxonomy (for multi-dataset training) or its own
        (``taxonomy="dataset"``). ``list_file`` lines are relative to ``root/subfolder``, as in MSeg's
        ``dataset_lists/COLUMN/list/{train,val}.txt``; without it the folders are scanned."""
        folder = _split_folder(name, split, splits)
        if taxonomy not in ("universal", "dataset"):
            raise LSegError(f"{name}: taxonomy must be 'universal' or 'dataset', got {taxonomy!r}")
        data_root, images, masks = Path(root) / subfolder, Path("images") / folder, Path(labels) / folder
        _require(name, data_root)
        if list_file is None:
            _require(name, data_root / images, data_root / masks)
        pairs = list_file or scan_pairs(data_root / images, data_root / masks)
        if taxonomy == "universal":
            names, id_map = universal_names(), to_universal_id_map(column)
        else:
            names, id_map = bundled_names(column), None
        return ListFileDataset(data_root, pairs, names, transform=transform, name=name, id_map=id_map, **kw)

    build.__name__ = build.__qualname__ = name.replace("-", "_")
    options = {"taxonomy_column": column, "evaluation_options": {"taxonomy": "dataset"}}
    return register_dataset(name, layout=layout, **options)(build)


mseg_ade20k = _mseg_dataset(
    "mseg-ade20k", "ADE20K", "annotations_semseg150_relabeled", {"train": "training", "val": "validation"},
    "ade20k-150-relabeled", "ROOT/ADE20K/images/{training,validation}/*.jpg and "
    "ROOT/ADE20K/annotations_semseg150_relabeled/{training,validation}/*.png (MSeg)",
)  # fmt: skip
mseg_coco_panoptic = _mseg_dataset(
    "mseg-coco-panoptic", "COCOPanoptic", "semantic_relabeled133", {"train": "train2017", "val": "val2017"},
    "coco-panoptic-133-relabeled", "ROOT/COCOPanoptic/images/{train,val}2017/*.jpg and "
    "ROOT/COCOPanoptic/semantic_relabeled133/{train,val}2017/*.png (MSeg)",
)  # fmt: skip


def image_folder(
    images_dir: PathLike,
    masks_dir: PathLike,
    names_file: PathLike,
    transform: Transform | None = None,
    name: str = "folder",
    sequences: Sequence[str] | None = None,
    **kw: Any,
) -> ListFileDataset:
    """Any folder of images with same-stem PNG masks, and a class-names file (line index = label id);
    `sequences` keeps the images whose file names start with those ids (`keep_sequences`)."""
    pairs = keep_sequences(name, Path(images_dir).name, scan_pairs(images_dir, masks_dir), sequences)
    return ListFileDataset(images_dir, pairs, read_names(names_file), transform=transform, name=name, **kw)


@register_dataset(
    "folder",
    layout="ROOT/images/[SPLIT/]*.jpg, ROOT/masks/[SPLIT/]*.png (same stems) and ROOT/names.txt "
    "(one class name per line, line index = label id)",
    default_split=None,
    has_sequences=True,
)
def folder(
    root: PathLike, split: str | None = None, transform: Transform | None = None, **kw: Any
) -> ListFileDataset:
    """``image_folder`` in the registry layout: ROOT/images/[SPLIT], ROOT/masks/[SPLIT], ROOT/names.txt."""
    root = Path(root)
    sub = split or ""
    _require("folder", root / "images" / sub, root / "masks" / sub, root / "names.txt")
    return image_folder(root / "images" / sub, root / "masks" / sub, root / "names.txt", transform, **kw)


def build_dataset(name: str, root: PathLike, split: str | None, **kw: Any) -> ListFileDataset:
    """Dataset by registry name; extra keywords (``transform``, ``unknown_ids``, ...) go to its definition."""
    record = dataset_record(name)
    if not Path(root).is_dir():
        raise LSegError(f"{name} root {root} not found; expected layout: {record.layout}")
    return record.builder(root, split, **kw)
