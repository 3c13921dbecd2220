"""Joint image + mask transforms on sample dicts, and a collate for variable-size samples.

Geometry is applied to ``tv_tensors.Image`` and ``tv_tensors.Mask`` together so labels stay aligned;
masks are always resized with nearest-neighbour interpolation (torchvision does so for ``Mask``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lseg.data.datasets import Sample
from lseg.data.taxonomy import IGNORE_INDEX
from lseg.errors import LSegError


class RandomLongSideResize(v2.Transform):
    """Resize so the long side is ``base_size * s``, ``s ~ U(scale_range)``: LSeg's multi-scale training."""

    def __init__(self, base_size: int, scale_range: tuple[float, float]) -> None:
        super().__init__()
        if not 0 < scale_range[0] <= scale_range[1]:
            raise LSegError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.base_size = base_size
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = float(torch.empty(()).uniform_(*self.scale_range))
        factor = self.base_size * scale / max(height, width)
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


def train_transform(
    crop_size: int = 480,
    base_size: int = 520,
    scale_range: tuple[float, float] = (0.5, 2.0),
    *,
    mean: Sequence[float],
    std: Sequence[float],
    ignore_index: int = IGNORE_INDEX,
    hflip: bool = True,
    color_jitter: bool = False,
) -> v2.Compose:
    """Random scale, flip, (colour jitter), pad and random-crop to ``crop_size``, then normalise.

    `mean`/`std` are the model's (`model.processor.mean/std`, from its config): no default, so data
    and model cannot silently disagree.

    Crops are padded before normalisation, with black pixels (what inference pads with, see
    `LSegImageProcessor.pad_value`: a model trained on mean-coloured borders loses points on every
    padded test image) and with ``ignore_index`` in the mask, so padding never counts as a class.
    """
    ops: list[v2.Transform] = [RandomLongSideResize(base_size, scale_range)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if color_jitter:
        ops.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05))
    ops += [
        v2.RandomCrop(
            crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
        ),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]
    return v2.Compose(ops)


def eval_transform(size: int | None = None, *, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Keep the aspect ratio (long side -> ``size`` if given, image and mask alike) and normalise with
    the model's `mean`/`std`."""
    ops: list[v2.Transform] = [] if size is None else [v2.Resize(size=None, max_size=size, antialias=True)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(ops)


def collate(
    batch: Sequence[Sample], ignore_index: int = IGNORE_INDEX, pad_value: torch.Tensor | None = None
) -> dict[str, Any]:
    """Stack samples of different sizes: pad bottom/right to the batch max (mask: ignore).

    Images are padded with `pad_value` (per channel, normalised; the model's black,
    `model.processor.pad_value()`), or 0 if not given. Each sample's mask must have its image's size
    (as the transforms here guarantee). Other keys (``dataset``, ``path``) are kept as lists.
    """
    height = max(s["image"].shape[-2] for s in batch)
    width = max(s["image"].shape[-1] for s in batch)
    first = batch[0]["image"]
    images = torch.zeros((len(batch), first.shape[0], height, width), dtype=first.dtype)
    if pad_value is not None:
        images[:] = pad_value.reshape(1, -1, 1, 1).to(first.dtype)
    out: dict[str, Any] = {"image": images}
    if "mask" in batch[0]:
        out["mask"] = torch.full((len(batch), height, width), ignore_index, dtype=torch.int64)
    for i, sample in enumerate(batch):
        h, w = sample["image"].shape[-2:]
        images[i, :, :h, :w] = sample["image"].as_subclass(torch.Tensor)
        if "mask" in out:
            out["mask"][i, :h, :w] = sample["mask"].as_subclass(torch.Tensor)
    for key in batch[0]:
        if key not in out:
            out[key] = [s[key] for s in batch]
    return out
