"""Inference protocols shared by `segment`, `evaluate`, `features` and the Python API.

Everything here works on a `forward(images) -> Tensor[B, C, h', w']` callable (per-label logits or dense
features) and a batch of *normalised* images, so the same code serves logits and features, any model
and any label set. Protocols only decide how the image is resized, padded, windowed and flipped:

* the forward may return a lower resolution than its input (e.g. stride-2 logits or features); its
  output is upsampled to the window it came from as the network itself does
  (`lseg.model.head.upsample_logits`, ``align_corners=True``), so a whole-image pass equals
  `LSeg.forward` (whole-image passes go straight to the requested output size, so a single pass at its
  native resolution is returned untouched);
* changing resolution between the image and a protocol's scales (images down or up, outputs back)
  uses the half-pixel convention of every image resize (`lseg.images.resize_bilinear`);
* padding uses the `pad_value` the caller passes, one value per channel: the processor's black
  (`LSegImageProcessor.pad_value`), so the model sees black borders whatever its mean/std;
* sliding windows follow mmsegmentation's `slide_inference`: in an image at least as large as the
  crop the last window is shifted back inside the image; only smaller images are padded (to the
  crop). The original LSeg evaluation let the last window run past the edge and padded it instead;
* overlapping windows are averaged with a count map; `run_protocol` returns the *mean* over flips and
  scales (the original LSeg evaluation summed them: the same argmax, but a softmax of the sum would
  divide the model's temperature by the number of passes), so confidences, scores and features of
  every protocol are on the scale of one pass;
* every public function runs under `torch.no_grad()` and returns float32; `dtype` is what the forward
  computes in (`lseg.precision.autocast`: native when the images already have it, autocast when the
  images are float32 and `dtype` is narrower; None: the images' dtype).
* windows are batched (`window_batch_size` per forward call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
from torch import Tensor

from lseg.errors import LSegError
from lseg.images import resize_bilinear
from lseg.model.head import upsample_logits
from lseg.precision import autocast

Forward = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class InferenceProtocol:
    """How one image becomes model passes: resize per scale, pad, slide a window, flip.

    Attributes:
        name: preset name (informational).
        base_size: long side in pixels at scale 1.0 (the other side keeps the aspect ratio);
            None keeps the input size.
        crop_size: sliding-window side; None runs each scaled image whole. Images smaller than the
            crop are padded on the bottom/right (the caller's pad value) and the output cropped back.
        stride: step between windows; required with `crop_size`.
        scales: multipliers of `base_size`; the long side at scale s is ``ceil(base_size * s)``.
        flip: also run the horizontally flipped input and average its (flipped back) output in.
    """

    name: str
    base_size: int | None = None
    crop_size: int | None = None
    stride: int | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales or any(s <= 0 for s in self.scales):
            raise LSegError(f"protocol {self.name!r}: scales must be positive, got {self.scales}")
        if self.base_size is not None and self.base_size <= 0:
            raise LSegError(f"protocol {self.name!r}: base_size must be positive, got {self.base_size}")
        if (self.crop_size is None) != (self.stride is None):
            raise LSegError(f"protocol {self.name!r}: crop_size and stride must be given together")
        if self.crop_size is not None and not 0 < self.stride <= self.crop_size:
            raise LSegError(
                f"protocol {self.name!r}: need 0 < stride <= crop_size, got stride {self.stride}, "
                f"crop_size {self.crop_size}"
            )

    @property
    def num_passes(self) -> int:
        """Number of outputs `run_protocol` averages per pixel: one per scale, doubled with flip."""
        return len(self.scales) * (2 if self.flip else 1)


PROTOCOLS: Mapping[str, InferenceProtocol] = MappingProxyType(
    {
        "single": InferenceProtocol("single"),
        "slide": InferenceProtocol("slide", crop_size=480, stride=320),
        # Original LSeg test-time augmentation (PyTorch-Encoding MultiEvalModule, stride = 2/3 crop).
        # Deliberate changes (see the module docstring): the last window is shifted back inside the
        # image instead of running past its edge into padding, passes are averaged instead of summed
        # (same argmax), and scales are resampled with half-pixel centres. Padding is black in pixel
        # space, as the original's `pad_image` (-mean/std: -1.0 for mean = std = 0.5).
        "lseg-ms": InferenceProtocol(
            "lseg-ms",
            base_size=520,
            crop_size=480,
            stride=320,
            scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
            flip=True,
        ),
        # OpenScene's LSeg feature extraction: one 640 pass (plus flip) for 3D distillation.
        "openscene": InferenceProtocol("openscene", base_size=640, crop_size=640, stride=426, flip=True),
    }
)


def get_protocol(name: str, **overrides: object) -> InferenceProtocol:
    """Return the named preset, optionally with fields replaced (e.g. ``base_size=640``)."""
    if name not in PROTOCOLS:
        raise LSegError(f"unknown inference protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}")
    return replace(PROTOCOLS[name], **overrides) if overrides else PROTOCOLS[name]


@dataclass(frozen=True)
class ScalePass:
    """What one scale of a protocol does to an image: useful to log, test and budget memory."""

    scale: float
    size: tuple[int, int]
    padded_size: tuple[int, int]
    grid: tuple[int, int]

    @property
    def windows(self) -> int:
        """Number of windows (forward inputs, not counting flips) at this scale."""
        return self.grid[0] * self.grid[1]


def resolve_protocol(
    name: str, size: int | None = None, crop_size: int | None = None, stride: int | None = None
) -> tuple[InferenceProtocol, int | None]:
    """The named protocol for a model that should see long side `size` at scale 1, and the long side
    to resize inputs to before the protocol runs.

    Protocols without a base size (single, slide) keep their settings and the input is resized to
    `size`. Protocols with one (lseg-ms, openscene) take `size` as their base size and resize by
    themselves; when their crop equals the base size (openscene: one whole-image window, like
    OpenScene's `img_long_side`) the crop follows, with a 2/3 stride. `crop_size` and `stride`
    override the sliding window of protocols that have one.
    """
    spec = get_protocol(name)
    overrides: dict[str, object] = {}
    resize = size
    if size is not None and spec.base_size is not None:
        overrides["base_size"] = size
        resize = None
        if spec.crop_size is not None and spec.crop_size == spec.base_size:
            overrides.update(crop_size=size, stride=max(1, round(size * 2 / 3)))
    if crop_size is not None or stride is not None:
        if spec.crop_size is None:
            raise LSegError(f"protocol {name!r} has no sliding window; crop size and stride do not apply")
        crop = crop_size or overrides.get("crop_size", spec.crop_size)
        overrides.update(crop_size=crop, stride=stride or max(1, round(crop * 2 / 3)))
    return get_protocol(name, **overrides), resize


def scaled_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size with the long side set to `long_side`, short side rounded half up (as the original)."""
    if height > width:
        return long_side, max(1, int(width * long_side / height + 0.5))
    return max(1, int(height * long_side / width + 0.5)), long_side


def window_starts(length: int, crop_size: int, stride: int) -> list[int]:
    """Window offsets covering `length` (padded up to the crop): ceil((L - crop) / stride) + 1 windows,
    every `stride` pixels, the last one shifted back to end at the edge (mmseg's `slide_inference`)."""
    last = max(length - crop_size, 0)
    count = math.ceil(last / stride) + 1
    return [min(i * stride, last) for i in range(count)]


def plan_protocol(protocol: InferenceProtocol, height: int, width: int) -> list[ScalePass]:
    """Resized size, padded size and window grid of every scale for an image of this size."""
    passes = []
    for scale in protocol.scales:
        base = max(height, width) if protocol.base_size is None else protocol.base_size
        size = scaled_size(height, width, math.ceil(base * scale))
        if protocol.crop_size is None:
            passes.append(ScalePass(scale, size, size, (1, 1)))
            continue
        padded = (max(size[0], protocol.crop_size), max(size[1], protocol.crop_size))
        grid = (
            len(window_starts(padded[0], protocol.crop_size, protocol.stride)),
            len(window_starts(padded[1], protocol.crop_size, protocol.stride)),
        )
        passes.append(ScalePass(scale, size, padded, grid))
    return passes


def _check_images(images: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected a [B, 3, H, W] image batch, got shape {tuple(images.shape)}")


def _call(forward: Forward, batch: Tensor, dtype: torch.dtype | None, size: Sequence[int]) -> Tensor:
    """`forward(batch)` computed in `dtype` (`lseg.precision.autocast`), returned in float32 at `size`."""
    with autocast(batch.device, dtype, batch.dtype):
        out = forward(batch)
    if out.ndim != 4 or out.shape[0] != batch.shape[0]:
        raise ValueError(
            f"forward must return [B, C, h, w] for a batch of {batch.shape[0]}, got {tuple(out.shape)}"
        )
    return upsample_logits(out.float(), size)


def _accumulate(
    forward: Forward,
    images: Tensor,
    starts_y: list[int],
    starts_x: list[int],
    window: tuple[int, int],
    flip: bool,
    window_batch_size: int,
    dtype: torch.dtype | None,
    out_size: tuple[int, int] | None = None,
) -> Tensor:
    """Sum of outputs of all windows (and their flips) over an image already padded to cover them.

    With one window covering the image, `out_size` (default: the image's) is the output resolution.
    """
    if window_batch_size < 1:
        raise ValueError(f"window_batch_size must be >= 1, got {window_batch_size}")
    wh, ww = window
    size = out_size or (wh, ww)
    jobs = [
        (i, y, x, flipped)
        for i in range(images.shape[0])
        for y in starts_y
        for x in starts_x
        for flipped in ((False, True) if flip else (False,))
    ]
    total: Tensor | None = None
    for start in range(0, len(jobs), window_batch_size):
        chunk = jobs[start : start + window_batch_size]
        crops = [images[i, :, y : y + wh, x : x + ww] for i, y, x, _ in chunk]
        batch = torch.stack([c.flip(-1) if f else c for c, (*_, f) in zip(crops, chunk, strict=True)])
        out = _call(forward, batch, dtype, size)
        if total is None:
            full = out_size or tuple(images.shape[-2:])
            total = out.new_zeros(images.shape[0], out.shape[1], *full)
        for o, (i, y, x, flipped) in zip(out, chunk, strict=True):
            total[i, :, y : y + size[0], x : x + size[1]] += o.flip(-1) if flipped else o
    assert total is not None
    return total


@torch.no_grad()
def predict_whole(
    forward: Forward,
    images: Tensor,
    *,
    flip: bool = False,
    out_size: tuple[int, int] | None = None,
    window_batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Run the whole images (and their flips, summed) in chunks of `window_batch_size`.

    Returns [B, C, H, W] at the input resolution, or at `out_size` (each output resized once).
    """
    _check_images(images)
    h, w = images.shape[-2:]
    return _accumulate(forward, images, [0], [0], (h, w), flip, window_batch_size, dtype, out_size)


@torch.no_grad()
def predict_sliding(
    forward: Forward,
    images: Tensor,
    crop_size: int,
    stride: int,
    *,
    pad_value: float | Tensor,
    flip: bool = False,
    window_batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sliding-window prediction with overlapping outputs averaged by a count map.

    Windows start every `stride` pixels, the last one shifted back to end at the image's edge
    (`window_starts`); a side shorter than the crop is padded bottom/right with `pad_value` (per
    channel: the processor's black) and cropped back. Flipped windows are summed with the unflipped
    ones before averaging. Returns [B, C, H, W].
    """
    from lseg.processing import pad_image

    _check_images(images)
    h, w = images.shape[-2:]
    full_h, full_w = max(h, crop_size), max(w, crop_size)
    ys = window_starts(full_h, crop_size, stride)
    xs = window_starts(full_w, crop_size, stride)
    padded = pad_image(images, (full_h, full_w), pad_value)
    total = _accumulate(forward, padded, ys, xs, (crop_size, crop_size), flip, window_batch_size, dtype)
    count = total.new_zeros(1, 1, full_h, full_w)
    for y in ys:
        for x in xs:
            count[..., y : y + crop_size, x : x + crop_size] += 1
    return (total / count)[..., :h, :w]


@torch.no_grad()
def run_protocol(
    forward: Forward,
    images: Tensor,
    protocol: InferenceProtocol,
    out_size: tuple[int, int] | None = None,
    *,
    pad_value: float | Tensor,
    window_batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Run a protocol and return the mean over its scales and flips (`InferenceProtocol.num_passes`) at
    the input (or `out_size`) resolution: the one place where passes are combined.

    `pad_value` fills what sliding windows need beyond a small image: pass the processor's black
    (`model.pad_value` or `LSegImageProcessor.pad_value()`), one value per channel. Each scale's output
    is resized to the target size (`lseg.images.resize_bilinear`) before averaging. See `plan_protocol`
    for the sizes and windows visited.
    """
    _check_images(images)
    h, w = images.shape[-2:]
    target = (h, w) if out_size is None else (int(out_size[0]), int(out_size[1]))
    total: Tensor | None = None
    for scale_pass in plan_protocol(protocol, h, w):
        scaled = resize_bilinear(images, scale_pass.size)
        if protocol.crop_size is None:
            out = predict_whole(
                forward,
                scaled,
                flip=protocol.flip,
                out_size=target,
                window_batch_size=window_batch_size,
                dtype=dtype,
            )
        else:
            out = predict_sliding(
                forward,
                scaled,
                protocol.crop_size,
                protocol.stride,
                flip=protocol.flip,
                pad_value=pad_value,
                window_batch_size=window_batch_size,
                dtype=dtype,
            )
        out = resize_bilinear(out, target)
        total = out if total is None else total.add_(out)
    assert total is not None
    return total.div_(protocol.num_passes) if protocol.num_passes > 1 else total
