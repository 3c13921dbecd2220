"""`lseg.pipeline(model, device, dtype)`: LSeg behind the interface of transformers' image-segmentation
pipeline, so code written for it gets LSeg's open vocabulary by naming the labels.

`pipe(images, candidate_labels=[...])` gives, per image, a list of `{"label", "score", "mask"}`. The
pipeline loads the model the way the CLI does and reformats what `LSegPredictor.predict` returns
(label map and confidence): there is no second inference path. The module is named `pipelines`, as
transformers' is, so that `lseg.pipeline` stays the function.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lseg.device import resolve_device
from lseg.errors import LSegError
from lseg.images import ImageInput
from lseg.labels import validate_labels
from lseg.model import LSeg, preset_names
from lseg.precision import model_precision, prepare_for_inference
from lseg.predictor import LSegPredictor
from lseg.processing import SegmentationResult

Segment = dict[str, Any]  # {"label": str, "score": float, "mask": PIL.Image, mode "L"}
ASKED = frozenset({"label_map", "confidence"})  # all `segments` needs: no N x H x W scores held


def load_model(
    model: LSeg | str | Path, device: str | torch.device | None, dtype: str | torch.dtype | None
) -> LSeg:
    """The model `pipeline` runs. An LSeg instance stays the caller's: moved to `device` if one is
    given, its weights otherwise untouched (`dtype` is then the forward's precision). A preset name or
    config JSON file (`LSeg.from_config`), else a model folder, file or hub id (`LSeg.from_pretrained`),
    is loaded and prepared as the CLI does (`prepare_for_inference`; `device` None: auto)."""
    if isinstance(model, LSeg):
        return model if device is None else model.to(resolve_device(device))
    target = resolve_device("auto" if device is None else device)  # before any weights are read
    name = str(model)
    preset = name in preset_names() or name.endswith(".json")
    loaded = LSeg.from_config(name) if preset else LSeg.from_pretrained(name)
    return prepare_for_inference(loaded, dtype, target)


def segments(result: SegmentationResult) -> list[Segment]:
    """One entry per label present, in label order: a mask of the pixels it won (255, else 0) and
    their mean probability of it, which is the top-1 softmax probability (`confidence`) there."""
    pixels = result.label_map.ravel()
    counts = np.bincount(pixels, minlength=len(result.labels))
    sums = np.bincount(pixels, weights=result.confidence.ravel(), minlength=len(result.labels))
    return [
        {
            "label": result.labels[index],
            "score": float(sums[index] / counts[index]),
            "mask": Image.fromarray((result.label_map == index).astype(np.uint8) * 255),
        }
        for index in np.flatnonzero(counts)
    ]


class LSegSegmentationPipeline:
    """Images and candidate labels -> transformers-style segments, through `predictor`; up to
    `batch_size` images are read ahead and consecutive same-size ones share a forward pass."""

    def __init__(self, predictor: LSegPredictor, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise LSegError(f"batch_size must be at least 1, got {batch_size}")
        self.predictor, self.batch_size = predictor, batch_size

    @property
    def model(self) -> LSeg:
        return self.predictor.model

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | Iterator[ImageInput],
        candidate_labels: str | Sequence[str] | None = None,
    ) -> list[Segment] | list[list[Segment]] | Iterator[list[Segment]]:
        """Segments of one image (a list of dicts), of a list or tuple of images or a B x 3 x H x W
        tensor (a list of such lists) or of an iterator such as a generator (a generator, consuming
        the input as it is itself consumed: any number of images in bounded memory).

        `candidate_labels`: a list or "cat, dog" (default: the model's labels); bad labels raise
        LSegError here, before any image is read.
        """
        labels = validate_labels(self.model.config.labels if candidate_labels is None else candidate_labels)
        if isinstance(images, Iterator):
            return self._segments(images, labels)
        if isinstance(images, (list, tuple)) or (isinstance(images, torch.Tensor) and images.ndim == 4):
            return list(self._segments(images, labels))
        return next(self._segments([images], labels))

    def _segments(self, images: Iterable[ImageInput], labels: list[str]) -> Iterator[list[Segment]]:
        """Each image's segments, `batch_size` images pulled from `images` at a time."""
        pending = iter(images)
        while chunk := list(islice(pending, self.batch_size)):
            yield from map(segments, self.predictor.predict(chunk, labels, ASKED, batch_size=self.batch_size))


def pipeline(
    model: LSeg | str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    protocol: str = "single",
    size: int | None = None,
    batch_size: int = 1,
) -> LSegSegmentationPipeline:
    """A callable segmentation pipeline, as `transformers.pipeline("image-segmentation", ...)`.

    `model`: an LSeg, a preset name ("tiny", "vit_l16", a config JSON) or a model folder / hub id
    (see `load_model`). `device`: auto, cpu, cuda, cuda:N (`lseg.device`). `dtype`: the forward's
    precision, auto / float32 / bfloat16 / float16 (`lseg.precision`). `protocol` and `size` are
    `LSegPredictor`'s: the inference protocol and the long side the model sees (default: the image's).
    Bad protocols, sizes, batch sizes, devices and dtypes raise LSegError here (all but the dtype
    before any weights are read).
    """
    predictor = LSegPredictor(lambda: load_model(model, device, dtype), protocol, size, dtype)
    pipe = LSegSegmentationPipeline(predictor, batch_size)
    model_precision(pipe.model, dtype)  # loads the model now: a dtype it cannot compute in fails here
    return pipe
