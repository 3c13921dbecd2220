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

Forward = Callable[[Tensor], tuple[Tensor, ...]]  # one pass -> its outputs (logits, features)


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


def _accumulate(
    forward: Forward,
    images: Tensor,
    starts_y: list[int],
    starts_x: list[int],
    window: tuple[int, int],
    flip: bool,
    window_batch_size: int,
    dtype: torch.dtype | None,
    out_sizes: Sequence[Sequence[int] | None],
) -> list[Tensor]:
    """Per output of `forward` (one per `out_sizes` entry), the sum over all windows (and their flips)
    of an image already padded to cover them, each output computed in `dtype`
    (`lseg.precision.autocast`) and upsampled in float32 to its window, or (one window covering the
    image) to its `out_sizes` entry.
    """
    if window_batch_size < 1:
        raise ValueError(f"window_batch_size must be >= 1, got {window_batch_size}")
    wh, ww = window
    jobs = [
        (i, y, x, flipped)
        for i in range(images.shape[0])
        for y in starts_y
        for x in starts_x
        for flipped in ((False, True) if flip else (False,))
    ]
    totals: list[Tensor] = []
    for start in range(0, len(jobs), window_batch_size):
        chunk = jobs[start : start + window_batch_size]
        crops = [images[i, :, y : y + wh, x : x + ww] for i, y, x, _ in chunk]
        batch = torch.stack([c.flip(-1) if f else c for c, (*_, f) in zip(crops, chunk, strict=True)])
        with autocast(batch.device, dtype, batch.dtype):
            outs = forward(batch)
        if len(outs) != len(out_sizes) or any(o.ndim != 4 or o.shape[0] != batch.shape[0] for o in outs):
            got = [tuple(o.shape) for o in outs]
            raise ValueError(
                f"forward must return {len(out_sizes)} [B, C, h, w] for B={batch.shape[0]}, got {got}"
            )
        outs = [upsample_logits(o.float(), size or window) for o, size in zip(outs, out_sizes)]
        if not totals:
            full = [size or tuple(images.shape[-2:]) for size in out_sizes]
            totals = [o.new_zeros(images.shape[0], o.shape[1], *f) for o, f in zip(outs, full)]
        for out, total in zip(outs, totals):
            for o, (i, y, x, flipped) in zip(out, chunk, strict=True):
                total[i, :, y : y + o.shape[-2], x : x + o.shape[-1]] += o.flip(-1) if flipped else o
    return totals


def _sliding(
    forward: Forward,
    images: Tensor,
    protocol: InferenceProtocol,
    pad_value: float | Tensor,
    window_batch_size: int,
    dtype: torch.dtype | None,
    outputs: int,
) -> list[Tensor]:
    """Sliding-window outputs (`outputs` of them) averaged by a count map.

    Windows start every `stride` pixels, the last one shifted back to end at the image's edge
    (`window_starts`); a side shorter than the crop is padded bottom/right with `pad_value` (per
    channel: the processor's black) and cropped back. Flipped windows are summed with the unflipped
    ones before averaging.
    """
    from lseg.processing import pad_image

    h, w = images.shape[-2:]
    crop, stride = protocol.crop_size, protocol.stride
    full_h, full_w = max(h, crop), max(w, crop)
    ys, xs = window_starts(full_h, crop, stride), window_starts(full_w, crop, stride)
    padded = pad_image(images, (full_h, full_w), pad_value)
    totals = _accumulate(
        forward, padded, ys, xs, (crop, crop), protocol.flip, window_batch_size, dtype, [None] * outputs
    )
    count = totals[0].new_zeros(1, 1, full_h, full_w)
    for y in ys:
        for x in xs:
            count[..., y : y + crop, x : x + crop] += 1
    return [(total / count)[..., :h, :w] for total in totals]


@torch.no_grad()
def run_protocol(
    forward: Callable[[Tensor], Tensor | tuple[Tensor, ...]],
    images: Tensor,
    protocol: InferenceProtocol,
    out_size: Sequence[int] | list[Sequence[int] | None] | None = None,
    *,
    pad_value: float | Tensor,
    window_batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Run a protocol and return the mean over its scales and flips (`InferenceProtocol.num_passes`) at
    the input (or `out_size`) resolution: the one place where passes are combined.

    With `out_size` a list (one size, or None for the input's, per output) the forward returns a tuple
    of that many outputs, each combined alone and returned in a tuple: the logits and the features of
    one pass, so the network runs once for both.

    `pad_value` fills what sliding windows need beyond a small image: pass the processor's black
    (`model.pad_value` or `LSegImageProcessor.pad_value()`), one value per channel. Each scale's output
    is resized to the target size (`lseg.images.resize_bilinear`) before averaging. See `plan_protocol`
    for the sizes and windows visited.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a [B, 3, H, W] image batch, got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    many = isinstance(out_size, list)
    targets = [(h, w) if s is None else (int(s[0]), int(s[1])) for s in (out_size if many else [out_size])]
    forward = forward if many else (lambda batch, one=forward: (one(batch),))
    totals: list[Tensor] = []
    for scale_pass in plan_protocol(protocol, h, w):
        scaled = resize_bilinear(images, scale_pass.size)
        if protocol.crop_size is None:  # whole images (and flips) in chunks of `window_batch_size`
            window = tuple(scaled.shape[-2:])
            outs = _accumulate(
                forward, scaled, [0], [0], window, protocol.flip, window_batch_size, dtype, targets
            )
        else:
            outs = _sliding(forward, scaled, protocol, pad_value, window_batch_size, dtype, len(targets))
        outs = [resize_bilinear(o, t) for o, t in zip(outs, targets)]
        totals = outs if not totals else [t.add_(o) for t, o in zip(totals, outs)]
    if protocol.num_passes > 1:
        totals = [t.div_(protocol.num_passes) for t in totals]
    return tuple(totals) if many else totals[0]
