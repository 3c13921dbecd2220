"""Procedural street scenes with exact masks: a dataset that needs no download, for tests and smoke runs.

Scenes vary layout, colours and texture (noise, windows, lane marks, occlusion), so a model has to
use shape and context rather than a colour lookup to segment them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from lseg.data.datasets import Sample
from lseg.data.taxonomy import IGNORE_INDEX
from lseg.errors import LSegError

CLASS_NAMES = ("sky", "road", "building", "tree", "car", "person")
SKY, ROAD, BUILDING, TREE, CAR, PERSON = range(len(CLASS_NAMES))

_BUILDING_COLOURS = np.array(
    [[0.62, 0.32, 0.25], [0.78, 0.72, 0.6], [0.55, 0.55, 0.58], [0.85, 0.82, 0.75], [0.45, 0.38, 0.33],
     [0.7, 0.6, 0.45], [0.35, 0.4, 0.48], [0.9, 0.88, 0.84]], dtype=np.float32,
)  # fmt: skip
_CAR_COLOURS = np.array(
    [[0.75, 0.08, 0.08], [0.1, 0.2, 0.65], [0.92, 0.92, 0.92], [0.08, 0.08, 0.09], [0.6, 0.62, 0.65],
     [0.9, 0.75, 0.1], [0.1, 0.45, 0.2], [0.35, 0.2, 0.45]], dtype=np.float32,
)  # fmt: skip
_SKIN_COLOURS = np.array(
    [[0.96, 0.8, 0.69], [0.87, 0.67, 0.5], [0.68, 0.47, 0.33], [0.45, 0.3, 0.2]], dtype=np.float32
)


def _window(shape: tuple[int, int], y0: float, y1: float, x0: float, x1: float):
    """Clipped integer box as slices, plus its pixel-centre coordinates (column, row vectors); or None."""
    h, w = shape
    r0, r1 = max(int(y0), 0), min(int(np.ceil(y1)), h)
    c0, c1 = max(int(x0), 0), min(int(np.ceil(x1)), w)
    if r0 >= r1 or c0 >= c1:
        return None
    ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
    return (slice(r0, r1), slice(c0, c1)), ys, xs


class _Canvas:
    """Image, label map and a texture field; shapes are painted in their bounding boxes only (fast)."""

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.rng = rng
        self.shape = (height, width)
        self.image = np.empty((height, width, 3), np.float32)
        self.label = np.empty((height, width), np.uint8)
        self.texture = rng.random((height, width), dtype=np.float32) - 0.5

    def paint(
        self,
        box: tuple[float, float, float, float],
        inside: Callable[[np.ndarray, np.ndarray], np.ndarray],
        colour: np.ndarray,
        cls: int | None,
        texture: float = 0.0,
    ) -> None:
        """Colour pixels of ``box`` (y0, y1, x0, x1) where ``inside(ys, xs)``; ``cls=None`` keeps labels."""
        win = _window(self.shape, *box)
        if win is None:
            return
        sl, ys, xs = win
        mask = np.broadcast_to(inside(ys, xs), (ys.shape[0], xs.shape[1]))
        shade = 1.0 + texture * self.texture[sl][mask]
        self.image[sl][mask] = colour[None, :] * shade[:, None]
        if cls is not None:
            self.label[sl][mask] = cls


def _ellipse(cy: float, cx: float, ry: float, rx: float):
    return lambda ys, xs: ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0


def _rounded_box(y0: float, y1: float, x0: float, x1: float, r: float):
    def inside(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        dy = np.maximum(np.maximum(y0 + r - ys, ys - (y1 - r)), 0.0)
        dx = np.maximum(np.maximum(x0 + r - xs, xs - (x1 - r)), 0.0)
        return dy**2 + dx**2 <= r * r

    return inside


def _everywhere(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return np.ones((ys.shape[0], xs.shape[1]), bool)


def _sky_and_road(c: _Canvas, horizon: int) -> None:
    rng, (h, w) = c.rng, c.shape
    if rng.random() < 0.25:  # overcast
        top = np.full(3, rng.uniform(0.55, 0.75), np.float32)
        bottom = top + rng.uniform(0.05, 0.15)
    else:
        top = rng.uniform([0.1, 0.25, 0.55], [0.35, 0.5, 0.9]).astype(np.float32)
        bottom = rng.uniform([0.55, 0.65, 0.8], [0.85, 0.9, 1.0]).astype(np.float32)
    t = np.linspace(0.0, 1.0, max(horizon, 1), dtype=np.float32)[:horizon, None, None]
    ys, xs = np.arange(horizon, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    f = rng.uniform(0.03, 0.12, 3)
    p = rng.uniform(0, 2 * np.pi, 2)
    clouds = np.sin(f[0] * xs + p[0]) * np.sin(f[1] * ys + f[2] * xs + p[1])  # soft cloud bands
    c.image[:horizon] = top * (1 - t) + bottom * t + 0.3 * np.clip(clouds - 0.4, 0, None)[..., None]
    c.label[:horizon] = SKY

    grey = rng.uniform(0.22, 0.5)
    road = np.float32(grey) + rng.uniform(-0.03, 0.03, 3).astype(np.float32)
    c.image[horizon:] = road * (1.0 + 0.35 * c.texture[horizon:, :, None])
    c.label[horizon:] = ROAD

    depth_span = max(h - horizon, 1)
    vx = w * rng.uniform(0.3, 0.7)
    drift = w * rng.uniform(-0.4, 0.4)
    lane = np.array([0.95, 0.95, 0.9] if rng.random() < 0.6 else [0.95, 0.8, 0.15], np.float32)

    def centre_line(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        d = (ys - horizon) / depth_span
        dashed = np.floor(np.sqrt(np.clip(d, 0, None)) * 9) % 2 == 0
        return (np.abs(xs - (vx + drift * d)) < 0.4 + 2.0 * d) & dashed

    def edge_lines(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        d = (ys - horizon) / depth_span
        half = 1.3 * w * d
        return np.abs(np.abs(xs - (vx + drift * d)) - half) < 0.4 + 1.5 * d

    c.paint((horizon, h, 0, w), centre_line, lane, None)
    c.paint((horizon, h, 0, w), edge_lines, np.array([0.9, 0.9, 0.88], np.float32), None)


def _buildings(c: _Canvas, horizon: int) -> None:
    rng, (_, w) = c.rng, c.shape
    x = -float(rng.integers(0, 10))
    while x < w:
        bw = float(rng.integers(max(w // 10, 4), max(w // 3, 5)))
        if rng.random() < 0.2:  # gap showing sky
            x += bw / 2
            continue
        top = horizon * (1 - rng.uniform(0.2, 0.95))
        base = horizon + float(rng.integers(0, 3))
        colour = _BUILDING_COLOURS[rng.integers(len(_BUILDING_COLOURS))] * rng.uniform(0.8, 1.1)
        c.paint((top, base, x, x + bw), _everywhere, colour.astype(np.float32), BUILDING, texture=0.15)
        px, py = float(rng.integers(5, 10)), float(rng.integers(6, 11))
        fill = rng.uniform(0.4, 0.7)
        lit = rng.random() < 0.3
        glass = np.array([0.95, 0.85, 0.45] if lit else [0.15, 0.2, 0.3], np.float32) * rng.uniform(0.8, 1.2)
        x0, top0 = x, top

        def windows(ys: np.ndarray, xs: np.ndarray, x0=x0, top0=top0, px=px, py=py, fill=fill, base=base):
            return (((xs - x0 - 2) % px) < px * fill) & (((ys - top0 - 3) % py) < py * fill) & (ys < base - 4)

        c.paint((top + 2, base, x + 2, x + bw - 2), windows, glass.astype(np.float32), BUILDING, texture=0.3)
        x += bw


def _tree(c: _Canvas, base: float, scale: float) -> None:
    rng, (h, w) = c.rng, c.shape
    cx = w * rng.uniform(-0.05, 1.05)
    trunk_h = h * scale * rng.uniform(0.12, 0.22)
    trunk_w = max(1.5, 4 * scale)
    bark = np.array([0.35, 0.25, 0.15], np.float32) * rng.uniform(0.7, 1.2)
    c.paint((base - trunk_h, base, cx - trunk_w / 2, cx + trunk_w / 2), _everywhere, bark, TREE, texture=0.3)
    radius = h * scale * rng.uniform(0.08, 0.16)
    green = np.array([rng.uniform(0.1, 0.3), rng.uniform(0.35, 0.6), rng.uniform(0.08, 0.2)], np.float32)
    for _ in range(int(rng.integers(3, 6))):
        oy, ox = rng.uniform(-0.7, 0.3) * radius, rng.uniform(-0.8, 0.8) * radius
        r = radius * rng.uniform(0.6, 1.0)
        cy, ccx = base - trunk_h - radius * 0.5 + oy, cx + ox
        leaf = green * rng.uniform(0.85, 1.15)
        c.paint(
            (cy - r, cy + r, ccx - r, ccx + r), _ellipse(cy, ccx, r, r), leaf.astype(np.float32), TREE, 0.7
        )


def _car(c: _Canvas, base: float, scale: float) -> None:
    rng, (_, w) = c.rng, c.shape
    width = w * scale * rng.uniform(0.18, 0.28)
    x0 = w * rng.uniform(-0.1, 1.0)
    x1 = x0 + width
    body_h, cabin_h = width * rng.uniform(0.28, 0.36), width * rng.uniform(0.2, 0.28)
    wheel_r = body_h * 0.45
    body_bottom = base - wheel_r * 0.6
    paint = _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))] * rng.uniform(0.85, 1.1)
    inset = width * rng.uniform(0.12, 0.22)
    cabin = (body_bottom - body_h - cabin_h, body_bottom - body_h + 2, x0 + inset, x1 - inset * 0.8)
    c.paint(cabin, _rounded_box(*cabin, cabin_h * 0.4), paint.astype(np.float32), CAR, 0.1)
    glass = (cabin[0] + cabin_h * 0.2, cabin[1] - 1, cabin[2] + inset * 0.2, cabin[3] - inset * 0.2)
    c.paint(glass, _rounded_box(*glass, cabin_h * 0.2), np.array([0.2, 0.25, 0.3], np.float32), CAR, 0.2)
    body = (body_bottom - body_h, body_bottom, x0, x1)
    c.paint(body, _rounded_box(*body, body_h * 0.35), paint.astype(np.float32), CAR, 0.1)
    for wx in (x0 + width * 0.2, x1 - width * 0.2):
        cy = base - wheel_r
        box = (cy - wheel_r, cy + wheel_r, wx - wheel_r, wx + wheel_r)
        c.paint(box, _ellipse(cy, wx, wheel_r, wheel_r), np.array([0.06, 0.06, 0.06], np.float32), CAR, 0.2)
        hub = wheel_r * 0.45
        c.paint(box, _ellipse(cy, wx, hub, hub), np.array([0.55, 0.55, 0.58], np.float32), CAR)


def _person(c: _Canvas, base: float, scale: float) -> None:
    rng, (h, w) = c.rng, c.shape
    height = h * scale * rng.uniform(0.22, 0.32)
    cx = w * rng.uniform(0.0, 1.0)
    head_r = height * 0.09
    torso_w = height * rng.uniform(0.2, 0.28)
    shirt = rng.uniform(0.05, 0.95, 3).astype(np.float32)
    trousers = (rng.uniform(0.05, 0.5) * np.array([1.0, 1.0, rng.uniform(1.0, 1.6)])).astype(np.float32)
    hip = base - height * 0.45
    stride = rng.uniform(0.0, 0.15) * height
    for side in (-1, 1):
        leg = (
            hip,
            base,
            cx + side * torso_w * 0.25 - torso_w * 0.2,
            cx + side * torso_w * 0.25 + torso_w * 0.2,
        )
        foot = side * stride / 2
        lx0, lx1 = leg[2], leg[3]

        def leg_shape(ys: np.ndarray, xs: np.ndarray, lx0=lx0, lx1=lx1, foot=foot) -> np.ndarray:
            shift = foot * (ys - hip) / max(base - hip, 1e-3)
            return (xs >= lx0 + shift) & (xs < lx1 + shift)

        c.paint((hip, base, lx0 - stride, lx1 + stride), leg_shape, trousers, PERSON, 0.2)
    torso = (hip - height * 0.38, hip + 1, cx - torso_w / 2, cx + torso_w / 2)
    c.paint(torso, _rounded_box(*torso, torso_w * 0.25), shirt, PERSON, 0.2)
    cy = torso[0] - head_r * 0.9
    skin = _SKIN_COLOURS[rng.integers(len(_SKIN_COLOURS))]
    c.paint(
        (cy - head_r, cy + head_r, cx - head_r, cx + head_r), _ellipse(cy, cx, head_r, head_r), skin, PERSON
    )


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: uint8 RGB image (H, W, 3) and uint8 label map (H, W) with ids into ``CLASS_NAMES``."""
    c = _Canvas(rng, height, width)
    horizon = int(height * rng.uniform(0.35, 0.6))
    _sky_and_road(c, horizon)
    _buildings(c, horizon)
    span = height - horizon
    objects = [(_tree, rng.uniform(0.0, 0.5)) for _ in range(int(rng.integers(1, 4)))]
    objects += [(_car, rng.uniform(0.1, 1.0)) for _ in range(int(rng.integers(1, 4)))]
    objects += [(_person, rng.uniform(0.05, 0.9)) for _ in range(int(rng.integers(1, 4)))]
    for draw, depth in sorted(objects, key=lambda o: o[1]):  # far to near, so near objects occlude
        draw(c, horizon + 2 + depth * span, 0.3 + depth)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 0.025
    image = np.clip((c.image + noise) * 255.0, 0, 255).astype(np.uint8)
    return image, c.label


class SyntheticStreetScenes(Dataset):
    """``num_images`` procedural street scenes; sample ``i`` depends only on ``(seed, i)``."""

    def __init__(
        self,
        num_images: int,
        size: tuple[int, int] = (128, 160),
        seed: int = 0,
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        if num_images < 1 or min(size) < 16:
            raise LSegError(
                f"synthetic scenes need num_images >= 1 and size >= 16x16, got {num_images}, {size}"
            )
        self.name = "synthetic"
        self.class_names = list(CLASS_NAMES)
        self.ignore_index = IGNORE_INDEX
        self.num_images = num_images
        self.size = (int(size[0]), int(size[1]))
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic scenes")
        image, label = render_scene(np.random.default_rng([self.seed, index]), *self.size)
        sample = {
            "image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
            "mask": tv_tensors.Mask(torch.from_numpy(label).to(torch.int64)),
            "dataset": self.name,
            "path": f"synthetic/{self.seed}/{index:06d}.png",
        }
        return self.transform(sample) if self.transform is not None else sample

    def pixel_counts(self) -> torch.Tensor:
        """Pixels per class over every scene (int64, one per class), untransformed."""
        counts = torch.zeros(len(self.class_names), dtype=torch.int64)
        for index in range(self.num_images):
            _, label = render_scene(np.random.default_rng([self.seed, index]), *self.size)
            ids = torch.from_numpy(label).long()
            counts += torch.bincount(ids[ids != self.ignore_index], minlength=len(counts))
        return counts
