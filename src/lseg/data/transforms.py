"""Joint image + mask transforms on sample dicts, built from the model's processor, and a collate.

The processor (`LSegImageProcessor`) owns preprocessing: its mean/std, its long-side rule and its
black padding. `eval_transform` is the processor's own `preprocess` (the tensors inference feeds the
model), `train_transform` draws its random sizes with the same long-side rule, pads with the same
black and normalises with the same statistics. Geometry is applied to ``tv_tensors.Image`` and
``tv_tensors.Mask`` together so labels stay aligned; masks are resized with nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lseg.data.datasets import Sample
from lseg.data.taxonomy import IGNORE_INDEX
from lseg.errors import LSegError
from lseg.images import long_side_size

if TYPE_CHECKING:
    from lseg.processing import LSegImageProcessor


class RandomLongSideResize(v2.Transform):
    """Resize so the long side is ``base_size * s``, ``s ~ U(scale_range)``: LSeg's multi-scale training,
    with inference's long-side rule (`long_side_size`)."""

    def __init__(self, base_size: int, scale_range: tuple[float, float]) -> None:
        super().__init__()
        if not 0 < scale_range[0] <= scale_range[1]:
            raise LSegError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.base_size = base_size
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        scale = float(torch.empty(()).uniform_(*self.scale_range))
        return {"size": list(long_side_size(*v2.query_size(flat_inputs), self.base_size * scale))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


def train_transform(
    processor: LSegImageProcessor,
    crop_size: int = 480,
    base_size: int = 520,
    scale_range: tuple[float, float] = (0.5, 2.0),
    *,
    ignore_index: int = IGNORE_INDEX,
    hflip: bool = True,
    color_jitter: bool = False,
) -> v2.Compose:
    """Random scale, flip, (colour jitter), pad and random-crop to ``crop_size``, then normalise with the
    model's `processor` (its mean/std: data and model cannot disagree).

    Crops are padded before normalisation, with black pixels (what inference pads with,
    `processor.pad_value`: a model trained on mean-coloured borders loses points on every padded test
    image) and with ``ignore_index`` in the mask, so padding never counts as a class. Images are
    resampled as stored (uint8, torchvision's antialiased half-pixel bilinear), before the float
    conversion: the same convention as inference's `resize_bilinear`, within uint8 rounding.
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
        v2.Normalize(mean=list(processor.mean), std=list(processor.std)),
    ]
    return v2.Compose(ops)


def eval_transform(processor: LSegImageProcessor, size: int | None = None) -> Callable[[Sample], Sample]:
    """The processor's `preprocess` of one sample (long side to `size` if given, normalised: the model
    input inference makes of the same picture), its mask resized to match with nearest neighbour."""
    return partial(_preprocess_sample, processor, size)


def _preprocess_sample(processor: LSegImageProcessor, size: int | None, sample: Sample) -> Sample:
    batch = processor.preprocess(sample["image"].as_subclass(torch.Tensor)[None], size)
    out = {**sample, "image": batch.pixel_values[0]}
    if "mask" in sample:
        nearest = v2.InterpolationMode.NEAREST
        out["mask"] = F.resize(sample["mask"], list(batch.sizes[0]), interpolation=nearest)
    return out


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
