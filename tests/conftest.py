"""Shared fixtures: tiny random models and the read-only shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports huggingface_hub (timm and open_clip do at import): tests never download,
# also on a machine with internet access.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tiny test models gain nothing from intra-op threads, and on a loaded 2-core machine extra threads
# oversubscribe the CPU badly; one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


def shared_data_dir() -> Path:
    return Path(os.environ.get("LSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    from lseg import LSeg

    torch.manual_seed(0)
    return LSeg.from_config("tiny").eval()


@pytest.fixture
def cat_image() -> Path:
    path = shared_data_dir() / "images" / "cat1.jpeg"
    if not path.is_file():
        pytest.skip(f"shared sample image not found at {path} (../shared/data is absent)")
    return path
