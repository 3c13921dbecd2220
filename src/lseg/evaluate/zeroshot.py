"""Zero-shot benchmarks of the LSeg paper: PASCAL-5i, COCO-20i and FSS-1000.

The protocol follows the original evaluation (LSeg's fork of HSNet's few-shot loaders): each episode
is one query image resized to 480 x 480 (antialiased bilinear: the original used PIL's, this uses
inference's `resize_bilinear`, the same convention in float instead of uint8), normalised with the
model's processor, run once (no flip, single scale) against the two labels ``[background, class
name]``; the mask is resized with nearest neighbour.
Intersection and union of the foreground are accumulated per class over the episodes; the fold's mIoU
is the mean foreground IoU over its classes and FB-IoU the mean of foreground and background IoU of
the summed counts. Values are fractions in [0, 1].

Benchmark details:

* PASCAL-5i: VOC2012 with SBD-augmented masks (``SegmentationClassAug``); fold f holds VOC classes
  5f+1 .. 5f+5; the episodes are the packaged HSNet validation lists (346/451/725/346), each used once;
  mask value 255 (object boundaries) is ignored.
* COCO-20i: COCO 2014 val with HSNet-style masks (one PNG per image, value = class id 1..80 in the
  order of ``fewshot_coco.txt``, 0 = background). Fold f holds the classes whose 0-based id c has
  ``c % 4 == f`` (HSNet's ``fold + 4 * v``), i.e. 1-based mask values 1+f, 5+f, ..., 77+f. As in HSNet,
  1000 episodes are sampled (class uniformly, then an image containing it); HSNet's pickled image lists
  are replaced by a scan of the masks (cached in ``annotations/lseg_val2014_classes.json`` when the
  folder is writable), so sampled episodes differ from the original run but follow the same law.
* FSS-1000: the 240 test classes (lines 761-1000 of ``fewshot_fss.txt``); every image except ``1.jpg``
  (the 1-shot support image of the original protocol) is a query; masks are thresholded at 128.

Difference from HSNet's meter: a class with no episode at all (only possible with `max_episodes` or
partial data) is reported as NaN and left out of the mean instead of counting as IoU 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lseg.data import IGNORE_INDEX
from lseg.errors import LSegError
from lseg.evaluate import report as reports
from lseg.evaluate.metrics import SegmentationMetrics
from lseg.files import write_text_atomic
from lseg.images import load_image, open_image, resize_bilinear
from lseg.labels import class_words
from lseg.model.config import LSEG_MEAN_STD
from lseg.processing import LSegImageProcessor, resize_logits


@dataclass(frozen=True)
class BenchmarkRecord:
    """A zero-shot benchmark: its `EpisodeDataset` class (built as `builder(root, fold, settings)`, a
    `ZeroShotSettings`), its name on the command line, its number of folds and other accepted names."""

    name: str
    builder: type[EpisodeDataset]
    display: str
    folds: int
    aliases: tuple[str, ...] = ()


BENCHMARKS: dict[str, BenchmarkRecord] = {}


def register_benchmark(name: str, **record: Any) -> Callable[[type], type]:
    """Class decorator adding an `EpisodeDataset` to `BENCHMARKS`; `lseg evaluate --dataset` and
    `build_episodes` read it. `record` holds the other `BenchmarkRecord` fields."""

    def register(builder: type[EpisodeDataset]) -> type[EpisodeDataset]:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is already registered")
        BENCHMARKS[name] = BenchmarkRecord(name, builder, **record)
        builder.benchmark = name
        return builder

    return register


@dataclass(frozen=True)
class ZeroShotSettings:
    """How a zero-shot fold is scored, in one place: the episodes' size and normalisation (the model's
    mean/std), the `background` word asked beside each class, batching, the first `max_episodes` only,
    and COCO-20i's sampling (`coco_episodes` with `seed`; None: every pair)."""

    image_size: int = 480
    mean: Sequence[float] = LSEG_MEAN_STD[0]
    std: Sequence[float] = LSEG_MEAN_STD[1]
    background: str = "others"
    batch_size: int = 1
    num_workers: int = 0
    max_episodes: int | None = None
    coco_episodes: int | None = 1000
    seed: int = 0
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LSegError(f"batch_size must be >= 1, got {self.batch_size}")


_FSS_TEST = slice(760, 1000)

PredictFn = Callable[[Tensor, list[str]], Tensor]


def _resource_lines(name: str) -> list[str]:
    text = files("lseg").joinpath("resources", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Episode:
    """One query: image and mask files, the class value in the mask, and the class name."""

    image: Path
    mask: Path
    label: int
    class_name: str


class EpisodeDataset(Dataset):
    """Zero-shot episodes yielding (normalised image [3, S, S], mask [S, S], class name).

    The mask is int64 with 1 = the episode's class, 0 = anything else, 255 = ignored.
    Images are resized and normalised as `settings` say; `max_episodes` keeps only the first N
    episodes (smoke tests on partial data).
    """

    benchmark: str  # its name in `BENCHMARKS`, set by `register_benchmark`
    layout: str

    def __init__(
        self,
        episodes: Sequence[Episode],
        classes: Sequence[str],
        settings: ZeroShotSettings,
    ) -> None:
        self.processor = LSegImageProcessor(settings.mean, settings.std)  # the model's (checks them)
        episodes = list(episodes)[: settings.max_episodes]
        for episode in episodes:
            for path in (episode.image, episode.mask):
                if not path.is_file():
                    raise LSegError(f"{self.benchmark}: missing {path}; expected layout {self.layout}")
        self.episodes = episodes
        self.classes = list(classes)
        self.image_size = settings.image_size

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, str]:
        episode = self.episodes[index]
        size = (self.image_size, self.image_size)
        stored = load_image(episode.image, exif_orientation=False)  # the pixels the mask was drawn on
        pixels = torch.from_numpy(stored).permute(2, 0, 1)[None].float().div_(255)
        image = self.processor.normalize(resize_bilinear(pixels, size))[0]  # inference's resize, squared
        mask = self.binary_mask(episode)
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return image, mask, episode.class_name

    def binary_mask(self, episode: Episode) -> Tensor:
        """Mask at the file's resolution: 1 where the mask holds the episode's class value, else 0."""
        return (_read_mask(episode.mask) == episode.label).long()


def _read_mask(path: Path, mode: str | None = None) -> Tensor:
    """A mask file's values as int64 (converted to PIL `mode` first if given)."""
    with open_image(path, "mask") as img:
        return torch.from_numpy(np.array(img if mode is None else img.convert(mode))).long()


@dataclass
class ZeroShotReport:
    """One fold's zero-shot scores: foreground IoU per class (NaN: no episode), mIoU, FB-IoU, timing."""

    benchmark: str
    fold: int
    episodes: int
    miou: float
    fb_iou: float
    per_class_iou: dict[str, float]
    seconds: float
    device: str
    image_size: int
    background: str
    labels: dict[str, str] = field(default_factory=dict)  # class name -> foreground word asked
    prompt_templates: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.episodes / self.seconds if self.seconds > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        """The numbers of metrics.json (`report.zeroshot_summary`)."""
        return reports.zeroshot_summary(self)


def _find_root(
    root: Path, candidates: Sequence[str], required: Sequence[str], name: str, layout: str
) -> Path:
    for sub in candidates:
        base = root / sub
        if all((base / r).is_dir() for r in required):
            return base
    raise LSegError(f"{name} data not found under {root}; expected layout {layout}")


@register_benchmark("pascal", display="pascal-5i", folds=4, aliases=("pascal5i",))
class PascalEpisodes(EpisodeDataset):
    """PASCAL-5i validation episodes of one fold (packaged HSNet lists)."""

    layout = "<root>/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png}"

    def __init__(self, root: str | Path, fold: int, settings: ZeroShotSettings) -> None:
        base = _find_root(
            Path(root),
            ("VOCdevkit/VOC2012", "VOC2012", "."),
            ("JPEGImages", "SegmentationClassAug"),
            "PASCAL-5i",
            self.layout,
        )
        names = _resource_lines("fewshot_pascal.txt")
        episodes = []
        for line in _resource_lines(f"pascal5i_val_fold{fold}.txt"):
            image_id, label = line.split("__")
            episodes.append(
                Episode(
                    base / "JPEGImages" / f"{image_id}.jpg",
                    base / "SegmentationClassAug" / f"{image_id}.png",
                    int(label),
                    names[int(label) - 1],
                )
            )
        super().__init__(episodes, names[5 * fold : 5 * fold + 5], settings)

    def binary_mask(self, episode: Episode) -> Tensor:
        """Class pixels 1, boundary pixels (255) ignored, the rest 0."""
        raw = _read_mask(episode.mask)
        return torch.where(raw == IGNORE_INDEX, IGNORE_INDEX, (raw == episode.label).long())


@register_benchmark("coco", display="coco-20i", folds=4, aliases=("coco20i",))
class CocoEpisodes(EpisodeDataset):
    """COCO-20i val2014 episodes of one fold, sampled like HSNet (`coco_episodes` None: every pair)."""

    layout = "<root>/COCO2014/{val2014/<name>.jpg, annotations/val2014/<name>.png}"

    def __init__(self, root: str | Path, fold: int, settings: ZeroShotSettings) -> None:
        base = _find_root(
            Path(root), ("COCO2014", "."), ("val2014", "annotations/val2014"), "COCO-20i", self.layout
        )
        names = _resource_lines("fewshot_coco.txt")
        labels = [c + 1 for c in range(fold, len(names), 4)]
        index = _coco_class_index(base / "annotations")
        per_class = {label: [stem for stem, present in index.items() if label in present] for label in labels}

        def episode(label: int, stem: str) -> Episode:
            return Episode(
                base / "val2014" / f"{stem}.jpg",
                base / "annotations" / "val2014" / f"{stem}.png",
                label,
                names[label - 1],
            )

        if settings.coco_episodes is None:
            episodes = [episode(label, stem) for label in labels for stem in per_class[label]]
        else:
            available = [label for label in labels if per_class[label]]
            if not available:
                raise LSegError(f"COCO-20i fold {fold}: no mask under {base} contains a class of the fold")
            rng = np.random.default_rng(settings.seed)
            episodes = []
            for _ in range(settings.coco_episodes):
                label = available[rng.integers(len(available))]
                episodes.append(episode(label, per_class[label][rng.integers(len(per_class[label]))]))
        super().__init__(episodes, [names[label - 1] for label in labels], settings)


def _coco_class_index(annotations: Path) -> dict[str, list[int]]:
    """Mask stem -> class values present, scanning val2014 masks once and caching the result."""
    masks = sorted((annotations / "val2014").glob("*.png"))
    cache = annotations / "lseg_val2014_classes.json"
    if cache.is_file():
        index = json.loads(cache.read_text())
        if len(index) == len(masks):
            return index
    index = {}
    for path in masks:
        with open_image(path, "mask") as img:
            counts = np.bincount(np.asarray(img).ravel(), minlength=256)
        index[path.stem] = [int(v) for v in np.flatnonzero(counts) if 0 < v < IGNORE_INDEX]
    with contextlib.suppress(OSError):  # a read-only dataset is rescanned next time
        write_text_atomic(cache, json.dumps(index))
    return index


@register_benchmark("fss", display="fss-1000", folds=1)
class FssEpisodes(EpisodeDataset):
    """FSS-1000 test episodes: the 240 test classes, images 2..10 of each as queries."""

    layout = "<root>/fewshot_data/<class>/{<n>.jpg, <n>.png} for the 240 FSS-1000 test classes"

    def __init__(self, root: str | Path, fold: int, settings: ZeroShotSettings) -> None:  # fold 0 only
        classes = _resource_lines("fewshot_fss.txt")[_FSS_TEST]
        base = _find_root(Path(root), ("fewshot_data", "FSS-1000", "."), classes[:1], "FSS-1000", self.layout)
        missing = [name for name in classes if not (base / name).is_dir()]
        if missing:
            raise LSegError(
                f"FSS-1000 under {base} lacks {len(missing)} test classes (e.g. {missing[0]!r}); "
                f"expected layout {self.layout}"
            )
        episodes = [
            Episode(image, image.with_suffix(".png"), 1, name)
            for name in classes
            for image in sorted((base / name).glob("*.jpg"))
            if image.stem != "1"
        ]
        super().__init__(episodes, classes, settings)

    def binary_mask(self, episode: Episode) -> Tensor:
        """Foreground where the grey level is >= 128."""
        return (_read_mask(episode.mask, "L") >= 128).long()


def benchmark_record(benchmark: str) -> BenchmarkRecord:
    """The record of a benchmark by name, command-line name or alias (``pascal-5i``, ``coco20i``, ...)."""
    wanted = benchmark.lower()
    for record in BENCHMARKS.values():
        if wanted in (record.name, record.display, *record.aliases):
            return record
    names = ", ".join(record.display for record in BENCHMARKS.values())
    raise LSegError(f"unknown zero-shot benchmark {benchmark!r}; choose one of: {names}")


def benchmark_classes(benchmark: str) -> list[str]:
    """Every class name of a benchmark (all folds), the keys its synonyms may use."""
    return _resource_lines(f"fewshot_{benchmark_record(benchmark).name}.txt")


def build_episodes(
    benchmark: str, root: str | Path, fold: int = 0, settings: ZeroShotSettings | None = None, **options: Any
) -> EpisodeDataset:
    """Episode dataset of a benchmark ('pascal', 'coco' or 'fss'; FSS-1000 has the single fold 0), as
    `settings` say (`options`: its fields, as a shorthand or overriding it)."""
    record = benchmark_record(benchmark)
    if not 0 <= fold < record.folds:
        raise LSegError(f"fold must be in 0..{record.folds - 1}, got {fold}")
    return record.builder(root, fold, replace(settings or ZeroShotSettings(), **options))


def _class_batches(episodes: Sequence[Episode], batch_size: int) -> Iterator[list[int]]:
    """Batches of episode indices sharing a class, so one label pair serves the whole batch."""
    by_class: dict[str, list[int]] = {}
    for i, episode in enumerate(episodes):
        by_class.setdefault(episode.class_name, []).append(i)
    for indices in by_class.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


def score_episodes(
    predict_fn: PredictFn,
    benchmark: str,
    root: str | Path,
    fold: int = 0,
    settings: ZeroShotSettings | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> ZeroShotReport:
    """Score `predict_fn(images, [background, class_name]) -> logits [B, 2, h, w]` on one fold.

    Any predictor fits (e.g. a reference implementation); `lseg.evaluate.evaluate_zeroshot` scores an
    `LSeg`. `settings` say how (`ZeroShotSettings`; `options`: its fields, as a shorthand or overriding
    it); the background word defaults to "others", the word of the original zero-shot model.
    `progress(done, total)` is called after each batch.
    """
    started = time.perf_counter()
    settings = replace(settings or ZeroShotSettings(), **options)
    dataset = build_episodes(benchmark, root, fold, settings)
    class_index = {name: k for k, name in enumerate(dataset.classes)}
    # [background, class 1..K]: class k's IoU is its episodes' foreground IoU, FB-IoU the summed one's
    metric = SegmentationMetrics(len(dataset.classes) + 1, IGNORE_INDEX, background=0)
    episodes_per_class = torch.zeros(len(dataset.classes), dtype=torch.long)
    batches = list(_class_batches(dataset.episodes, settings.batch_size))
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=settings.num_workers)
    done = 0
    with torch.no_grad():
        for images, masks, names in loader:
            logits = predict_fn(images.to(settings.device), [settings.background, *class_words(names[:1])])
            if logits.ndim != 4 or logits.shape[:2] != (len(names), 2):
                raise ValueError(f"predict_fn must return [B, 2, h, w] logits, got {tuple(logits.shape)}")
            logits = resize_logits(logits.float(), masks.shape[-2:])
            k = class_index[names[0]]
            foreground = torch.where(masks == IGNORE_INDEX, masks, masks * (k + 1))
            metric.update(logits.argmax(1).cpu() * (k + 1), foreground)
            episodes_per_class[k] += len(names)
            done += len(names)
            if progress is not None:
                progress(done, len(dataset))
    scores = metric.compute()
    seen = episodes_per_class > 0
    # HSNet divides by max(union, 1): a seen class with empty prediction and ground truth scores 0.
    iou = torch.tensor(scores["per_class_iou"][1:], dtype=torch.float64)
    iou = torch.where(seen, iou.nan_to_num(0.0), torch.full_like(iou, math.nan))
    return ZeroShotReport(
        benchmark=dataset.benchmark,
        fold=fold,
        episodes=done,
        miou=float(iou[seen].mean()) if seen.any() else math.nan,
        fb_iou=scores["fb_iou"],
        per_class_iou=dict(zip(dataset.classes, iou.tolist(), strict=True)),
        seconds=time.perf_counter() - started,
        device=str(settings.device),
        image_size=settings.image_size,
        background=settings.background,
    )
