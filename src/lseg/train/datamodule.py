"""Datasets for training, described as data (so YAML configs and the CLI can set every field).

Each training dataset keeps its own label names; a mixed batch scores each sample against its own
dataset's labels (how the LSeg paper trained its 7-dataset demo model). Alternatively MSeg datasets
can be mapped into the 194-class universal taxonomy, as the original reimplementation did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from lseg.data import SyntheticStreetScenes, build_dataset, collate, train_transform
from lseg.errors import LSegError
from lseg.evaluate.labels import build_label_space, read_alternatives, read_unseen
from lseg.evaluate.runner import ShardSampler
from lseg.labels import label_key
from lseg.processing import LSegImageProcessor


@dataclass
class DatasetSpec:
    """One dataset: a registry name (camvid, ade20k, mseg-ade20k, mseg-coco-panoptic, folder, synthetic),
    where it lives, and optionally the words used as its labels (default: its class names; `labels`
    one per class, or `synonyms`: a synonyms file as `lseg evaluate --synonyms` reads it, whose YAML
    form may also give `alternatives`, other words `label_augmentation` asks a class as).

    `unseen` (class names) or `unseen_file` (+ `fold` for a folds YAML file) hold classes out, as
    `lseg evaluate --unseen` scores them: their pixels become ignore and their words are not asked.
    """

    name: str
    root: str | None = None
    split: str = "train"
    labels: list[str] | None = None
    synonyms: str | None = None
    unseen: list[str] | None = None
    unseen_file: str | None = None
    fold: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # extra build_dataset keyword arguments


def dataset_spec(spec: DatasetSpec | dict[str, Any]) -> DatasetSpec:
    """A config's dataset entry as a DatasetSpec; an unknown or missing key is one line."""
    if isinstance(spec, DatasetSpec):
        return spec
    known = [f.name for f in fields(DatasetSpec)]
    unknown = [str(key) for key in spec if key not in known]
    if unknown or "name" not in spec:
        problem = f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown else "no 'name'"
        raise LSegError(f"dataset spec {dict(spec)!r} has {problem}; its keys are {', '.join(known)}")
    return DatasetSpec(**spec)


class BuiltDataset(NamedTuple):
    """A training or validation dataset and the words of its classes."""

    dataset: Dataset
    labels: list[str]  # the word each class id is asked as
    alternatives: list[list[str]]  # per class, the other words label augmentation may ask it as
    unseen_labels: list[str]  # the held-out classes' words (their pixels are ignore); [] if none


def build(spec: DatasetSpec | dict[str, Any], transform) -> BuiltDataset:
    """Dataset with `transform`, the words its class ids are asked as (default: its class names),
    each class's alternative words (`read_alternatives`; none without a synonyms file) and the words
    of the classes it holds out (`unseen`), which only transductive self-training asks."""
    spec = dataset_spec(spec)
    if spec.name == "synthetic":
        options = {"num_images": 256, **spec.options}
        if "size" in options:
            options["size"] = tuple(options["size"])
        dataset = SyntheticStreetScenes(transform=transform, **options)
    else:
        if spec.root is None:
            raise LSegError(f"dataset '{spec.name}' needs a root folder")
        dataset = build_dataset(spec.name, spec.root, spec.split, transform=transform, **spec.options)
    names = dataset.class_names
    if spec.labels and len(spec.labels) != len(names):
        given = len(spec.labels)
        raise LSegError(f"dataset '{spec.name}' has {len(names)} classes, {given} labels were given")
    labels = build_label_space(names, labels=spec.labels, synonyms=spec.synonyms).labels  # as evaluation asks
    alternatives = _alternatives(spec.synonyms, names, labels)
    held_out = read_unseen(names, spec.unseen, spec.unseen_file, spec.fold)
    unseen_labels = []
    if held_out is not None:
        if not hasattr(dataset, "drop_classes"):
            raise LSegError(f"dataset '{spec.name}' cannot hold classes out (unseen)")
        dataset.drop_classes(held_out.unseen)
        # An unseen class's words are never asked, not even as another class's alternative ("vehicle").
        unseen_words = {label_key(w) for i in held_out.unseen for w in alternatives[i]}
        kept = [i for i in range(len(names)) if i not in held_out.unseen]
        unseen_labels = [labels[i] for i in sorted(held_out.unseen)]
        labels = [labels[i] for i in kept]
        alternatives = [[w for w in alternatives[i] if label_key(w) not in unseen_words] for i in kept]
    return BuiltDataset(dataset, labels, alternatives, unseen_labels)


def _alternatives(synonyms: str | None, names: list[str], labels: list[str]) -> list[list[str]]:
    """Each class's alternative words; one that is a class's own word would make two targets alike."""
    table = read_alternatives(synonyms, names) if synonyms else {}
    owner = {label_key(word): name for name, word in zip(names, labels)}
    for name, words in table.items():
        for word in words:
            if label_key(word) in owner:
                raise LSegError(
                    f"{synonyms}: alternative {word!r} of class {name!r} is the word of class "
                    f"{owner[label_key(word)]!r}; a word may name one class only"
                )
    return [table.get(name, []) for name in names]


class LabelledDataset(Dataset):
    """Tags every sample with the key of its label set (datasets may share a registry name)."""

    def __init__(self, dataset: Dataset, key: str) -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        sample["dataset"] = self.key
        return sample


class SeededSamples(Dataset):
    """Draws each sample's augmentation from its own seed, given by `EpochSampler` with the index.

    Randomness then depends only on (seed, epoch, position), not on worker count, global RNG use
    elsewhere (validation, logging) or process restarts, so resuming from a checkpoint reproduces
    the uninterrupted run exactly.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class EpochSampler(DistributedSampler):
    """Shuffles with a generator seeded by (seed, epoch); yields this rank's (index, per-sample seed) pairs.

    The epoch is asked from `current_epoch()` when an epoch's iteration starts, not received via
    `set_epoch`, which Lightning's DDP sampler wrapper forwarded only since 2.6
    (Lightning-AI/pytorch-lightning#21456). Ranks shard the permutation themselves (rank r takes
    positions r, r + W, ...), so Lightning keeps this sampler (it is a `DistributedSampler`) and global
    batch s holds the samples of batch s of a one-process run with the global batch size. `start` skips
    this rank's first samples of the epoch: `ResumableDataLoader` sets it to continue an interrupted epoch.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        current_epoch: Callable[[], int],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(range(num_samples), world_size, rank, shuffle=False, drop_last=True)
        self.total, self.seed, self.current_epoch = num_samples, seed, current_epoch
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.current_epoch())
        order = torch.randperm(self.total, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (self.total,), generator=generator).tolist()
        pairs = list(zip(order, seeds))[: self.num_samples * self.num_replicas]  # equal shards
        return iter(pairs[self.rank :: self.num_replicas][self.start :])


class ResumableDataLoader(DataLoader):
    """A training DataLoader that resumes mid-epoch where the interrupted run stopped.

    Its state (saved by Lightning in every checkpoint) is the epoch and the number of batches it has
    delivered in it; a loader restored from a checkpoint of that epoch starts at the next batch, so no
    batch is trained twice or skipped (Lightning counts the delivered batches as done either way).
    Skipped batches are never loaded: the sampler starts after them.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch, self.delivered = 0, 0
        self._resume_at: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = dict(state)

    def __iter__(self) -> Iterator[Any]:
        """Reads the epoch at the first batch: on resume Lightning creates the iterator before it moves
        the epoch counter past an epoch that its checkpoint ended."""
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        self.epoch = self.sampler.current_epoch()
        resume, self._resume_at = self._resume_at, None
        self.delivered = resume["batches"] if resume is not None and resume["epoch"] == self.epoch else 0
        self.sampler.start = self.delivered * self.batch_size
        for batch in super().__iter__():
            self.delivered += 1
            yield batch


class LSegDataModule(L.LightningDataModule):
    """Training and validation data with LSeg's augmentation (random scale, pad, crop, flip)."""

    def __init__(
        self,
        train: list[dict[str, Any]],
        val: dict[str, Any] | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        crop_size: int = 480,
        base_size: int = 520,
        scale_range: tuple[float, float] = (0.5, 2.0),
        color_jitter: bool = False,
        val_size: int | None = None,  # long side validation images are resized to (None: their own)
        seed: int = 0,
    ) -> None:
        """`train` and `val` entries hold DatasetSpec fields (DatasetSpec instances serve too). They are
        typed as mappings so that a command line's `--data.train '[{...}]'` replaces a config's
        entries: jsonargparse would fill a dataclass entry's missing fields from the config's entry
        at the same place (a synthetic set's `options` would reach the folder dataset that replaced it).
        """
        super().__init__()
        if not train:
            raise LSegError("give at least one training dataset")
        self.train_specs = [dataset_spec(s) for s in train]
        self.val_spec = None if val is None else dataset_spec(val)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.crop_size = crop_size
        self.base_size = base_size
        self.scale_range = tuple(scale_range)
        self.color_jitter = color_jitter
        self.val_size = val_size
        self.seed = seed
        self.label_sets: dict[str, list[str]] = {}
        self.word_alternatives: dict[str, list[list[str]]] = {}  # per training label set, per class
        self.unseen_labels: dict[str, list[str]] = {}  # per training label set, its held-out classes' words
        self.train_datasets: dict[str, Dataset] = {}
        self.val_key: str | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._train_loader_state: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, saved in every checkpoint so a resume continues the epoch.

        Lightning saves it with its fit loop too, but applies it only to a loader it builds after the
        restore; `LSegModule`'s schedule asks `estimated_stepping_batches`, which builds it before.
        """
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train_loader_state = state.get("train_loader")

    def _processor(self) -> LSegImageProcessor:
        """The model's processor (mean/std, black padding), so data and model can never disagree."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        processor = getattr(getattr(module, "model", None), "processor", None)
        if processor is None:
            raise LSegError(
                "the data module normalises images with the model's mean/std: attach it to a Trainer "
                "with an LSegModule (trainer.fit(module, datamodule=data)) before setup"
            )
        return processor

    def setup(self, stage: str | None = None) -> None:
        processor = self._processor()
        self._collate = partial(collate, pad_value=processor.pad_value())
        augment = train_transform(
            processor,
            crop_size=self.crop_size,
            base_size=self.base_size,
            scale_range=self.scale_range,
            color_jitter=self.color_jitter,
        )
        datasets = []
        for index, spec in enumerate(self.train_specs):
            dataset, labels, alternatives, unseen_labels = build(spec, augment)
            key = spec.name if len(self.train_specs) == 1 else f"{index}:{spec.name}"
            self.label_sets[key] = labels
            self.word_alternatives[key] = alternatives
            self.unseen_labels[key] = unseen_labels
            self.train_datasets[key] = dataset
            datasets.append(LabelledDataset(dataset, key))
        self.train_dataset = SeededSamples(ConcatDataset(datasets))
        self.val_dataset = None
        if self.val_spec is not None:  # untransformed, as `lseg evaluate` reads it: scored at the masks' size
            dataset, labels, *_ = build(self.val_spec, None)
            self.val_key = f"val:{self.val_spec.name}"
            self.label_sets[self.val_key] = labels
            self.val_dataset = LabelledDataset(dataset, self.val_key)

    def train_dataloader(self) -> ResumableDataLoader:
        rank, world_size = self._rank_world()
        loader = ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(self.train_dataset), self.seed, self._current_epoch, rank, world_size),
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=self._collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
        if self._train_loader_state is not None:  # restored from a checkpoint: continue its epoch
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def _rank_world(self) -> tuple[int, int]:
        """This process's rank and the number of ranks (0, 1 outside a trainer)."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _current_epoch(self) -> int:
        """The trainer's epoch (restored on resume); 0 outside a trainer."""
        return self.trainer.current_epoch if self.trainer is not None else 0

    def val_dataloader(self) -> DataLoader | list:
        """Lists of untransformed samples: `LSegModule.validation_step` scores them as `lseg evaluate`
        does (`lseg.evaluate.runner.mask_logits`, long side `val_size`).

        Each rank scores its `ShardSampler` shard, so every image counts once across ranks; Lightning
        keeps this sampler (a `DistributedSampler`) instead of its padding one, which repeats images.
        """
        if self.val_dataset is None:
            return []
        rank, world_size = self._rank_world()
        return DataLoader(
            self.val_dataset,
            batch_size=max(1, self.batch_size // 2),
            sampler=ShardSampler(self.val_dataset, num_replicas=world_size, rank=rank),
            num_workers=self.num_workers,
            collate_fn=list,
            pin_memory=torch.cuda.is_available(),
        )
