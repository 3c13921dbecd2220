"""The one image-to-outputs pipeline (as segment-anything's `SamPredictor`): `LSeg.segment`,
`LSeg.encode_image`, the batch commands and the demo call it, so they cannot disagree.

`predict` runs the image encoder once per image whatever is asked (the protocol combines each pass's
logits and embeddings side by side) and keeps large photos in bounded memory; `predict_folder` owns
the files of `lseg segment` / `lseg features`, their one resume rule, shards and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lseg.errors import LSegError
from lseg.features import GRIDS, read_sidecar, save_features
from lseg.files import (
    check_output_folder,
    make_output_folder,
    remove_interrupted_writes,
    save_array,
    save_image,
    write_json_atomic,
)
from lseg.images import ImageInput, load_image
from lseg.inference import InferenceProtocol, resolve_protocol, run_protocol, scaled_size
from lseg.labels import validate_labels
from lseg.precision import model_precision
from lseg.processing import ImageBatch, SegmentationResult
from lseg.shard import finish_shard, merge_summary, shard_from_env, start_shard, take_shard
from lseg.version import __version__

if TYPE_CHECKING:
    from lseg.model.lseg import LSeg

T = TypeVar("T")
OUTPUTS = frozenset({"label_map", "scores", "confidence", "features"})


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm's running statistics) for inference, the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def same_size_runs(items: Sequence[T], key: Callable[[T], Any]) -> list[list[T]]:
    """Consecutive items with one `key` (their size): one forward pass each, never padded together
    (a ViT's attention would see the other images' padding)."""
    return [list(run) for _, run in groupby(items, key=key)]


def model_input_size(protocol: InferenceProtocol, height: int, width: int) -> tuple[int, int]:
    """Resolution the model sees at scale 1 for an input of this size under `protocol`."""
    return (height, width) if protocol.base_size is None else scaled_size(height, width, protocol.base_size)


class LSegPredictor:
    """Images -> what was asked of them, for one model, protocol (`lseg.inference`), long side `size`
    at scale 1 and forward precision `dtype` (`lseg.precision`). `model` may also be a function that
    loads it on first use, so a folder run with nothing left to do never loads weights."""

    def __init__(
        self,
        model: LSeg | Callable[[], LSeg],
        protocol: str = "single",
        size: int | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.protocol, self.resize = resolve_protocol(protocol, size)
        self.dtype = dtype
        self._model = model

    @property
    def model(self) -> LSeg:
        if not isinstance(self._model, nn.Module):
            self._model = self._model()
        return self._model

    # ------------------------------------------------------------------ images in memory
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: str | Sequence[str] | None = None,
        outputs: Collection[str] = ("label_map",),
        *,
        feature_grid: str | None = None,
        batch_size: int = 1,
    ) -> SegmentationResult | list[SegmentationResult]:
        """One result per image (a list for a list; B for a B x 3 x H x W tensor) with the `outputs`:
        "label_map" (bounded memory), "confidence", "scores" (N x H x W: 4 bytes x labels x pixels),
        "features" (D x h x w, normalised; `geometry` says where they sit). `feature_grid`: "model"
        (half what the model sees at scale 1), "image" (half the image) or None (the grid the logits
        come from). Up to `batch_size` consecutive same-size images share a forward pass.
        """
        asked = set(outputs)
        if not asked or asked - OUTPUTS:
            raise LSegError(f"outputs must be some of {', '.join(sorted(OUTPUTS))}, got {sorted(asked)}")
        if feature_grid is not None and feature_grid not in GRIDS:
            raise LSegError(f"unknown feature grid {feature_grid!r}; choose one of: {', '.join(GRIDS)}")
        if batch_size < 1:
            raise LSegError(f"batch_size must be at least 1, got {batch_size}")
        model = self.model
        wants_labels, wants_features = bool(asked - {"features"}), "features" in asked
        labels = validate_labels(model.config.labels if labels is None else labels) if wants_labels else []
        default_grid = "model" if self.protocol.base_size is None else "image"
        grid = (feature_grid or default_grid) if wants_features else None  # None: no features
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results: list[SegmentationResult] = []
        with eval_mode(model), torch.inference_mode():
            text = model.encode_text(labels) if labels else None
            for start in range(0, len(items), batch_size):
                batches = [
                    model.processor.preprocess(item, self.resize, device=model.device, dtype=model.dtype)
                    for item in items[start : start + batch_size]
                ]
                key = lambda b: (tuple(b.pixel_values.shape[-2:]), self._feature_size(b, grid))  # noqa: E731
                for group in same_size_runs(batches, key):
                    results += self._run(group, text, labels, asked, grid)
        return results[0] if single and len(results) == 1 else results

    def _feature_size(self, batch: ImageBatch, grid: str | None) -> tuple[int, int] | None:
        """The stride-2 grid of the image (`grid` "image") or of what the model sees at scale 1."""
        if grid is None:
            return None
        of = batch.original_sizes[0] if grid == "image" else model_input_size(self.protocol, *batch.sizes[0])
        return (of[0] + 1) // 2, (of[1] + 1) // 2

    def _run(
        self,
        group: list[ImageBatch],
        text: Tensor | None,
        labels: list[str],
        asked: set[str],
        grid: str | None,
    ) -> list[SegmentationResult]:
        """One protocol run over same-size images; each pass gives the logits and features asked for."""
        model, grid_size = self.model, self._feature_size(group[0], grid)

        def forward(pixels: Tensor) -> tuple[Tensor, ...]:
            embeds = model.pixel_embeddings(pixels)
            logits = () if text is None else (model.head(embeds, text),)
            return logits + ((embeds,) if grid_size else ())

        pixel_values = torch.cat([b.pixel_values for b in group])
        sizes = ([] if text is None else [None]) + ([grid_size] if grid_size else [])
        compute = model_precision(model, self.dtype)
        outs = list(
            run_protocol(
                forward, pixel_values, self.protocol, sizes, pad_value=model.pad_value, dtype=compute
            )
        )
        originals = [size for b in group for size in b.original_sizes]
        results = [SegmentationResult(None, None, labels) for _ in originals]
        if text is not None:  # logits at the input size -> the original size, in bounded memory
            logits, processor = outs.pop(0), model.processor
            if "scores" in asked:
                for result, (label_map, scores) in zip(
                    results, processor.postprocess(logits, originals, return_scores=True)
                ):
                    result.label_map, result.scores = label_map.cpu().numpy(), scores.cpu().numpy()
                    result.confidence = scores.amax(dim=0).cpu().numpy() if "confidence" in asked else None
            else:
                maps = processor.label_maps(logits, originals, return_confidence="confidence" in asked)
                for result, (label_map, confidence) in zip(results, maps):
                    result.label_map = label_map.cpu().numpy()
                    result.confidence = confidence.cpu().numpy() if confidence is not None else None
            del logits
        sizes = [size for b in group for size in b.sizes]
        for index, (result, original, size) in enumerate(zip(results, originals, sizes)):
            if outs:
                result.features = F.normalize(outs[0][index : index + 1].float(), dim=1)[0]
                result.geometry = self._geometry(original, size, grid_size, result.features.shape[0])
        return results

    def _geometry(
        self, original: tuple[int, int], size: tuple[int, int], grid: tuple[int, int], embed_dim: int
    ) -> dict[str, Any]:
        spec = self.protocol
        params = {key: getattr(spec, key) for key in ("base_size", "crop_size", "stride", "scales", "flip")}
        return {
            "image_size": list(original),
            "model_size": list(model_input_size(spec, *size)),
            "feature_size": list(grid),
            "feature_stride": [original[0] / grid[0], original[1] / grid[1]],
            "embed_dim": int(embed_dim),
            "protocol_params": {**params, "scales": list(spec.scales)},
        }

    # ------------------------------------------------------------------ folders of images
    def predict_folder(
        self,
        inputs: Sequence[Path],
        out: str | Path,
        files: SegmentFiles | FeatureFiles,
        settings: dict[str, Any],
        *,
        overwrite: bool = False,
        batch_size: int = 1,
        progress: Callable[[Path], None] = lambda path: None,
        log: Callable[[str], None] = print,
    ) -> FolderRun:
        """Write `files` for each image of this process's shard of `inputs` (`lseg.shard`) into `out`.

        The resume rule of every batch command: an image whose `NAME.json` records `settings` is done
        (skipped); other settings, or `overwrite`, redo it. Unreadable images are listed in
        `FolderRun.failures`, the others processed. One batch is decoded ahead of the model and one
        written behind it (bounded memory); the rank that finishes last writes the summary.
        """
        names = check_names(inputs)
        out = check_output_folder(out)
        rank, world = shard_from_env()
        mine = take_shard(list(inputs), rank, world)
        remove_interrupted_writes(out, [path.stem for path in mine])  # this shard is written only here
        todo = [path for path in mine if overwrite or not files.is_done(out / f"{path.stem}.json", settings)]
        if world > 1:
            start_shard(out, rank, world)
            log(f"rank {rank} of {world}: {len(mine)} image(s) in this shard")
        if len(todo) < len(mine):
            log(f"skipping {len(mine) - len(todo)} image(s) {files.done} in {out}")
        run = FolderRun(len(mine), len(mine) - len(todo), [], [])
        chunks = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        options = {"feature_grid": files.grid, "batch_size": batch_size}
        with ThreadPoolExecutor(1) as writer:
            written: Future | None = None
            for loaded in _one_ahead(_load_all, chunks):
                run.failures += [str(image) for _, image in loaded if isinstance(image, LSegError)]
                good = [(path, image) for path, image in loaded if not isinstance(image, LSegError)]
                if good:
                    started = time.perf_counter()
                    results = self.predict(
                        [image for _, image in good], files.labels, files.outputs, **options
                    )
                    seconds = (time.perf_counter() - started) / len(good)
                    items = []
                    for (path, image), result in zip(good, results):
                        shares = result.shares() if result.label_map is not None else None
                        items.append((Written(path, image.shape[:2], shares, seconds), image, result))
                    run.written += [item for item, _, _ in items]
                    if written is not None:
                        written.result()
                    make_output_folder(out)
                    written = writer.submit(lambda todo=items: [files.write(out, *i, settings) for i in todo])
                    del good, results, items
                for path, _ in loaded:
                    progress(path)
            if written is not None:
                written.result()
        if world > 1 and out.is_dir():
            record = {"rank": rank, "world_size": world, "images": len(mine), "failed": len(run.failures)}
            if finish_shard(out, rank, world, record):
                merge_summary(out, names, files.summary, {"command": files.command, "settings": settings})
        return run


def check_names(inputs: Sequence[Path]) -> list[str]:
    """Output names (file stems) of `inputs`; LSegError when two would write the same files."""
    seen: dict[str, Path] = {}
    for path in inputs:
        if seen.setdefault(path.stem, path) is not path:
            raise LSegError(
                f"several inputs are named '{path.stem}' ({path}); outputs would overwrite each other "
                "(use one --out per folder)"
            )
    return list(seen)


def _one_ahead(function: Callable[[T], Any], items: Sequence[T]) -> Iterator[Any]:
    """`function(item)` of each item, the next one computed in a thread while the caller works."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(function, items[0]) if items else None
        for item in items[1:]:
            current, pending = pending, pool.submit(function, item)
            yield current.result()
        if pending is not None:
            yield pending.result()


def _load_all(paths: list[Path]) -> list[tuple[Path, np.ndarray | LSegError]]:
    """Decoded images (writable, as torch wants them) or the one-line error of each unreadable one."""
    loaded: list[tuple[Path, np.ndarray | LSegError]] = []
    for path in paths:
        try:
            loaded.append((path, np.require(load_image(path), requirements="W")))
        except LSegError as error:
            loaded.append((path, error))
    return loaded


@dataclass
class Written:
    """One image `predict_folder` wrote: label shares (segment) and model seconds per image."""

    path: Path
    image_size: tuple[int, int]
    shares: dict[str, float] | None
    seconds: float


@dataclass
class FolderRun:
    """What `predict_folder` did with this shard: its images, skipped as done, written, failures."""

    images: int
    skipped: int
    written: list[Written]
    failures: list[str]


class SegmentFiles:
    """`lseg segment`'s files per image: NAME.labels.png (index map), NAME.overlay.png (colours and a
    legend), with `save_features` NAME.features.npy (float16, the label map's grid), and NAME.json
    (label shares and the run's settings) last."""

    command, summary, done, grid = "segment", "segment-summary.json", "already segmented", None

    def __init__(self, labels: list[str], save_features: bool = False) -> None:
        self.labels = labels
        self.outputs = {"label_map", "features"} if save_features else {"label_map"}

    def is_done(self, sidecar: Path, settings: dict[str, Any]) -> bool:
        return (read_sidecar(sidecar) or {}).get("settings") == settings

    def write(
        self, out: Path, item: Written, image: np.ndarray, result: SegmentationResult, run: dict
    ) -> None:
        from lseg.visualize import overlay

        name = out / item.path.stem
        dtype = np.uint8 if len(self.labels) <= 256 else np.uint16
        save_image(result.label_map.astype(dtype), f"{name}.labels.png")
        save_image(overlay(image, result.label_map, self.labels), f"{name}.overlay.png")
        if result.features is not None:
            save_array(result.features.half().cpu().numpy(), f"{name}.features.npy")
        shares = {k: round(v, 6) for k, v in item.shares.items() if v > 0}
        record = {"image": str(item.path.resolve()), "image_size": list(item.image_size), "shares": shares}
        write_json_atomic(f"{name}.json", {**record, "seconds": round(item.seconds, 4), "settings": run})


class FeatureFiles:
    """`lseg features`' files per image: NAME.npy or NAME.pt (normalised D x h x w, `save_dtype`) and
    NAME.json (geometry and the run's settings, as top-level fields) last (docs/features.md)."""

    command, summary, done = "features", "features-summary.json", "whose features already exist"
    labels, outputs = None, frozenset({"features"})

    def __init__(self, fmt: str = "npy", save_dtype: str = "float16", feature_grid: str = "model") -> None:
        self.fmt, self.grid = fmt, feature_grid
        self.save_dtype = torch.float16 if save_dtype == "float16" else torch.float32

    def is_done(self, sidecar: Path, settings: dict[str, Any]) -> bool:  # settings are top-level fields
        meta = read_sidecar(sidecar) or {}
        return all(key in meta and meta[key] == value for key, value in settings.items())

    def write(
        self, out: Path, item: Written, image: np.ndarray, result: SegmentationResult, run: dict
    ) -> None:
        meta = {"image": str(item.path.resolve()), **result.geometry, **run}
        meta.update(normalized=True, lseg_version=__version__)
        save_features(result.features.to(self.save_dtype).cpu().numpy(), meta, out, item.path.stem, self.fmt)
