"""Hostile inputs shared by the CLI tests: decompression bombs, truncated and fake images, bad text."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_header_bomb(path: Path, width: int = 60_000, height: int = 60_000) -> Path:
    """A tiny PNG whose header claims `width` x `height` pixels (it would decode to gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def real_bomb(path: Path) -> Path:
    """A genuine 20000 x 20000 1-bit PNG: 48 kB on disk, 400 megapixels decoded."""
    Image.new("1", (20_000, 20_000)).save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: `Image.verify()` accepts it, decoding fails."""
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def good_image(path: Path, size: tuple[int, int] = (37, 53), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: compare before and after a command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
