"""The one seam between pictures and the model: images -> normalised, padded batches -> label maps.

`LSegImageProcessor` is built from a model's config (`LSegImageProcessor.from_config(config)`, or
`model.processor`) and owns, for that model, everything the pixels go through on their way in and
out: loading (`lseg.images`), long-side resize, normalisation with the config's mean/std, padding
with the colour that is *black in pixel space* for that mean/std, batching images of different
sizes, and turning logits back into label maps at the original sizes (`SegmentationResult`).
`lseg.predictor` (so `segment`, `encode_image`, the batch commands and the demo), the evaluation
runner and `lseg query` all go through it, so they cannot disagree on any of these steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lseg.errors import LSegError
from lseg.images import ImageInput, load_image, resize_bilinear, resize_long_side
from lseg.precision import to_device

if TYPE_CHECKING:
    from lseg.model.config import LSegConfig
    from lseg.model.lseg import LSegOutput

Size = tuple[int, int]
# Resized logits held at once by `label_maps` (float32: 64 MB), whatever the image and label count.
LABEL_CHUNK_ELEMENTS = 2**24


def pad_image(images: Tensor, size: Sequence[int], value: float | Tensor) -> Tensor:
    """Pad B x C x H x W bottom/right to `size` with `value` (a number or one value per channel).

    Concatenation rather than `F.pad`, which only takes one number, so per-channel black works and the
    op traces cleanly (torch.compile, ONNX).
    """
    batch, channels, height, width = images.shape
    target_h, target_w = int(size[0]), int(size[1])
    if target_h < height or target_w < width:
        raise ValueError(f"cannot pad {height} x {width} to the smaller {target_h} x {target_w}")
    fill = torch.as_tensor(value, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    if target_w > width:
        images = torch.cat([images, fill.expand(batch, channels, height, target_w - width)], dim=3)
    if target_h > height:
        images = torch.cat([images, fill.expand(batch, channels, target_h - height, target_w)], dim=2)
    return images


def padded_size(height: int, width: int, multiple: int) -> Size:
    """(H, W) rounded up to multiples of `multiple`: the shape the encoder sees (`LSeg.input_multiple`)."""
    return -(-int(height) // multiple) * multiple, -(-int(width) // multiple) * multiple


def resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """B x C x h x w logits at the model's input size -> `size` (usually the image's or its label
    mask's): `lseg.images.resize_bilinear`, the half-pixel convention the image was resized down with,
    so each logit goes back to where its pixel came from."""
    return resize_bilinear(logits, size)


def _valid_logits(
    logits: Tensor, target_sizes: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]] | None
) -> Iterator[tuple[Tensor, Size]]:
    """Per image, one at a time: its 1 x N x h x w float logits cropped to its valid size, and its
    target size."""
    if len(target_sizes) != logits.shape[0] or (sizes is not None and len(sizes) != logits.shape[0]):
        raise ValueError(f"need one target size (and valid size) per image, got {len(target_sizes)}")
    for index, target in enumerate(target_sizes):
        height, width = sizes[index] if sizes is not None else logits.shape[-2:]
        yield logits[index : index + 1, :, :height, :width].float(), (int(target[0]), int(target[1]))


@dataclass
class SegmentationResult:
    """One image's results at its original resolution; what was not asked for is None."""

    label_map: np.ndarray | None  # H x W int64, index into `labels`
    scores: np.ndarray | None  # N x H x W float32 softmax probabilities (`return_scores=True` only)
    labels: list[str]
    confidence: np.ndarray | None = None  # H x W float32 top-1 probability (`return_confidence=True`)
    features: Tensor | None = None  # D x h x w float32, normalised over D (`LSegPredictor`, "features")
    geometry: dict | None = None  # where `features` sit in the image (`LSegPredictor`, "features")

    def shares(self) -> dict[str, float]:
        """Fraction of pixels assigned to each label."""
        counts = np.bincount(self.label_map.ravel(), minlength=len(self.labels))
        return {label: float(c) / self.label_map.size for label, c in zip(self.labels, counts)}


@dataclass
class ImageBatch:
    """Model input for a batch: images padded to the largest, and where each one really is."""

    pixel_values: Tensor  # B x 3 x H x W, normalised, padded bottom/right with black
    sizes: list[Size]  # each image's valid (resized) region, top-left of `pixel_values`
    original_sizes: list[Size]  # each image's size before the resize: where results go back to


class LSegImageProcessor:
    """Pre- and post-processing of one model's images (see the module docstring).

    `size` is the default long side images are resized to (None: keep their size).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int | None = None) -> None:
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise LSegError(f"mean and std need 3 values each (std > 0), got {list(mean)} and {list(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.size = size

    @classmethod
    def from_config(cls, config: LSegConfig, size: int | None = None) -> LSegImageProcessor:
        return cls(config.mean, config.std, size)

    def __repr__(self) -> str:
        return f"LSegImageProcessor(mean={self.mean}, std={self.std}, size={self.size})"

    # ------------------------------------------------------------------ pixel <-> model space
    def _stats(self, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        return mean, torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    def pad_value(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """1 x 3 x 1 x 1 normalised value of a black pixel, `(0 - mean) / std`: what padding must be,
        so the model sees a black border whatever its normalisation (-1 only for mean = std = 0.5)."""
        mean, std = self._stats(device)
        return ((0 - mean) / std).to(dtype or torch.float32)

    def normalize(
        self, images: Tensor, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """uint8 or [0, 1] float B x 3 x H x W -> model input (computed in float32, then cast)."""
        if not images.is_floating_point():
            images = images.float() / 255
        images = images.to(device, torch.float32)
        mean, std = self._stats(images.device)
        return ((images - mean) / std).to(dtype or torch.float32)

    def denormalize(self, pixel_values: Tensor) -> Tensor:
        """Model input -> float32 [0, 1] pixels (previews, debugging)."""
        mean, std = self._stats(pixel_values.device)
        return (pixel_values.float() * std + mean).clamp(0, 1)

    # ------------------------------------------------------------------ images in
    def load(self, image: ImageInput) -> np.ndarray:
        """H x W x 3 uint8 RGB from any supported input (`lseg.images.load_image`)."""
        return load_image(image)

    def preprocess(
        self,
        images: ImageInput | Sequence[ImageInput],
        size: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageBatch:
        """Load, resize (long side `size`, default `self.size`), normalise and batch images.

        `images` is one image, a list of images of any sizes (padded with black to the largest), or a
        B x 3 x H x W batch tensor (uint8 or [0, 1] float).
        """
        size = self.size if size is None else size
        if isinstance(images, Tensor) and images.ndim == 4:
            if images.shape[1] != 3 or 0 in images.shape:
                raise LSegError(f"image batches must be B x 3 x H x W, got {tuple(images.shape)}")
            originals = [tuple(images.shape[-2:])] * images.shape[0]
            pixels = images.float() / 255 if not images.is_floating_point() else images.float()
            resized = [resize_long_side(to_device(pixels, device).clamp(0, 1), size)]
        else:
            items = list(images) if isinstance(images, (list, tuple)) else [images]
            if not items:
                raise LSegError("no images given")
            arrays = [self.load(item) for item in items]
            originals = [array.shape[:2] for array in arrays]
            resized = [
                resize_long_side(  # one float copy, divided in place: 144 MB for a 12 MP photo, not 288
                    to_device(torch.from_numpy(a), device).permute(2, 0, 1)[None].float().div_(255), size
                )
                for a in arrays
            ]
        sizes = [tuple(r.shape[-2:]) for r in resized for _ in range(r.shape[0])]
        batch_size = (max(h for h, _ in sizes), max(w for _, w in sizes))
        normalised = [self.normalize(r, dtype=dtype) for r in resized]
        black = self.pad_value(normalised[0].device, normalised[0].dtype)
        pixel_values = torch.cat([pad_image(n, batch_size, black) for n in normalised])
        return ImageBatch(
            pixel_values, [(int(h), int(w)) for h, w in sizes], [tuple(map(int, o)) for o in originals]
        )

    # ------------------------------------------------------------------ results out
    def resize_logits(
        self,
        logits: Tensor,
        target_sizes: Sequence[Sequence[int]],
        sizes: Sequence[Sequence[int]] | None = None,
    ) -> list[Tensor]:
        """Per image: crop B x N x H x W logits to its valid `sizes` (default: all), resize to its
        `target_sizes` entry; float32 N x h x w tensors."""
        return [
            resize_logits(source, target)[0] for source, target in _valid_logits(logits, target_sizes, sizes)
        ]

    def postprocess(
        self,
        logits: Tensor,
        target_sizes: Sequence[Sequence[int]],
        sizes: Sequence[Sequence[int]] | None = None,
        return_scores: bool = False,
    ) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
        """Logits of a batch -> one H x W int64 label map per image at its `target_sizes` entry
        (usually `ImageBatch.original_sizes`), with N x H x W softmax scores if `return_scores`.

        `sizes` (usually `ImageBatch.sizes`) crops away each image's batch padding first. Without
        scores, the full-resolution logits are never held at once (`label_maps`); the label maps are the
        same.
        """
        if not return_scores:
            return [label_map for label_map, _ in self.label_maps(logits, target_sizes, sizes)]
        results = []
        for resized in self.resize_logits(logits, target_sizes, sizes):
            results.append((resized.argmax(dim=0), resized.softmax(dim=0)))
        return results

    def post_process_semantic_segmentation(
        self,
        outputs: LSegOutput | Tensor,
        target_sizes: Sequence[Sequence[int]] | Tensor | None = None,
        *,
        sizes: Sequence[Sequence[int]] | None = None,
    ) -> list[Tensor]:
        """`LSeg.forward`'s output (or its B x N x h x w logits) -> one int64 label map per image, at
        its `target_sizes` entry (H, W), else at the logits' size: transformers' image-processor
        method of this name, so code written for its segmentation models works unchanged.

        `sizes` (`ImageBatch.sizes`) crops each image's batch padding away first (images of different
        sizes in one batch); without `target_sizes` the maps then keep those sizes. `postprocess` does
        the work: the one resize, in bounded memory.
        """
        logits = getattr(outputs, "logits", outputs)
        if target_sizes is None:
            target_sizes = sizes if sizes is not None else [logits.shape[-2:]] * logits.shape[0]
        return self.postprocess(logits, target_sizes, sizes)

    def label_maps(
        self,
        logits: Tensor,
        target_sizes: Sequence[Sequence[int]],
        sizes: Sequence[Sequence[int]] | None = None,
        return_confidence: bool = False,
        max_elements: int = LABEL_CHUNK_ELEMENTS,
    ) -> list[tuple[Tensor, Tensor | None]]:
        """Per image: (H x W int64 label map, H x W float32 top-1 softmax probability or None), in
        bounded memory.

        The logits are resized to the target size a few labels at a time (at most `max_elements`
        resized values at once) while a running maximum keeps the best label: bilinear resizing treats
        every label alone, so the label map equals the argmax of the fully resized logits (ties go to
        the first label, as `argmax`), without the N x H x W tensor (7.2 GB for 150 labels on a
        4000 x 3000 photo). The confidence is computed with a running log-sum-exp.
        """
        results = []
        for source, target in _valid_logits(logits, target_sizes, sizes):
            chunk = max(1, max_elements // max(1, target[0] * target[1]))
            best = label_map = total = None
            for start in range(0, source.shape[1], chunk):
                part = resize_logits(source[:, start : start + chunk], target)[0]
                if part.shape[0] == 1:  # one label at a time (large images): no argmax tensor needed
                    value, arg = part[0], None
                else:
                    value, arg = part.max(dim=0)
                    arg = arg.to(torch.int32).add_(start)  # int32 while running: half the memory
                if best is None:
                    best = value
                    label_map = value.new_full(target, start, dtype=torch.int32) if arg is None else arg
                    if return_confidence:
                        total = (part - best).exp_().sum(dim=0)
                    continue
                better = value > best  # strict: ties keep the earlier label, as argmax
                if arg is None:
                    label_map.masked_fill_(better, start)
                else:
                    torch.where(better, arg, label_map, out=label_map)
                if return_confidence:
                    new_best = torch.maximum(best, value)
                    total.mul_((best - new_best).exp_()).add_((part - new_best).exp_().sum(dim=0))
                    best = new_best
                else:
                    torch.maximum(best, value, out=best)  # in place: no new H x W map per label
                del part, value, arg, better
            label_map = label_map.long()
            results.append((label_map, total.reciprocal_() if return_confidence else None))
        return results
