"""Colour overlays with a legend."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(count: int) -> np.ndarray:
    """`count` distinct, deterministic RGB colours (golden-ratio hue steps)."""
    colours = []
    for index in range(count):
        hue = (index * 0.618033988749895) % 1.0
        lightness = 0.5 if index % 2 == 0 else 0.38
        colours.append([round(c * 255) for c in colorsys.hls_to_rgb(hue, lightness, 0.85)])
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


LEGEND_LABEL_CHARS = 40


def shorten(label: str, limit: int = LEGEND_LABEL_CHARS) -> str:
    """A label cut to `limit` characters for a legend (long prompts would make the image huge)."""
    return label if len(label) <= limit else label[: limit - 1] + "…"


def blend(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """uint8 `image` with `colours` (same H x W x 3) laid over it at opacity `alpha`."""
    mixed = image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    return mixed.round().clip(0, 255).astype(np.uint8)


def overlay(image: np.ndarray, label_map: np.ndarray, labels: list[str], alpha: float = 0.55) -> Image.Image:
    """Image blended with the label colours, plus a legend: colour, label, share of pixels."""
    colours = palette(len(labels))
    blended = np.empty_like(image, dtype=np.uint8)
    for top in range(0, image.shape[0], 256):  # in strips: bounded memory for large photos
        rows = slice(top, top + 256)
        blended[rows] = blend(image[rows], colours[label_map[rows]], alpha)
    counts = np.bincount(label_map.ravel(), minlength=len(labels))
    order = [i for i in np.argsort(-counts) if counts[i] > 0]
    font_size = max(12, min(28, image.shape[0] // 30))
    font = ImageFont.load_default(size=font_size)
    row = font_size + 8
    names = [shorten(label) for label in labels]
    legend_width = max(180, int(max(font.getlength(f"{names[i]}  100.0%") for i in order) + row + 24))
    canvas = Image.new(
        "RGB", (image.shape[1] + legend_width, max(image.shape[0], row * len(order) + 16)), "white"
    )
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = image.shape[1] + 10
    for line, index in enumerate(order):
        y = 8 + line * row
        draw.rectangle([x, y, x + font_size, y + font_size], fill=tuple(int(c) for c in colours[index]))
        share = 100.0 * counts[index] / label_map.size
        draw.text((x + font_size + 8, y), f"{names[index]}  {share:.1f}%", fill="black", font=font)
    return canvas
