"""Shared fixtures for data tests: tiny image/label files and the optional real-data folder."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shared_data() -> Path:
    """The read-only real-data folder (``LSEG_SHARED_DATA`` or ``../shared/data``); skips when absent."""
    path = Path(os.environ.get("LSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not found (set LSEG_SHARED_DATA to run this test)")
    return path


def _write_image(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random RGB PNG (lossless, so tests can compare pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def _write_label(path: Path, array: np.ndarray) -> None:
    """Label PNG: 8-bit for uint8 arrays, 16-bit for uint16 arrays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def write_image():
    return _write_image


@pytest.fixture
def write_label():
    return _write_label
