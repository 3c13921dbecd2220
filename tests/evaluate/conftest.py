"""Fixtures of the evaluation tests: a tiny fake CamVid (40 x 56 images) and a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lseg import LSeg
from lseg.data import CAMVID_CLASSES
from lseg.data.taxonomy import label_id_map, universal_names

HEIGHT, WIDTH = 40, 56
STEP = 20  # fake images encode the mask: grey level = STEP * class id (ignore -> 255)
UNLABELLED = 11  # CamVid raw id mapped to ignore


def camvid_mask(shift: int) -> np.ndarray:
    """Three vertical bands of Sky / Road / Car (moved by `shift`) under two unlabelled rows."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[:, 18 + shift : 38 + shift] = 3
    mask[:, 38 + shift :] = 8
    mask[:2] = UNLABELLED
    return mask


@pytest.fixture
def camvid_root(tmp_path) -> Path:
    root = tmp_path / "camvid"
    (root / "val").mkdir(parents=True)
    (root / "valannot").mkdir()
    lines = []
    for i in range(3):
        mask = camvid_mask(i)
        grey = np.where(mask == UNLABELLED, 255, mask.astype(np.int64) * STEP).astype(np.uint8)
        Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(root / "val" / f"img{i}.png")
        Image.fromarray(mask).save(root / "valannot" / f"img{i}.png")
        lines.append(f"val/img{i}.png valannot/img{i}.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return LSeg.from_config("tiny", pretrained=False).save_pretrained(tmp_path_factory.mktemp("m") / "tiny")


def annotated_pixels(root: Path) -> int:
    return sum(int((camvid_mask(i) != UNLABELLED).sum()) for i in range(3))


def decode_classes(pixel_values: torch.Tensor) -> torch.Tensor:
    """Class id painted in a normalised fake image (mean = std = 0.5); 255 marks unlabelled pixels."""
    grey = torch.round((pixel_values[:, 0] * 0.5 + 0.5) * 255)
    return torch.round(grey / STEP).long()


@pytest.fixture
def oracle(monkeypatch):
    """Replace LSeg.forward by perfect one-hot logits decoded from the image; records the label counts."""
    universal = universal_names()
    table = label_id_map(
        universal, "camvid-11", list(CAMVID_CLASSES), aliases={"Column_Pole": "Pole", "Sidewalk": "Pavement"}
    )
    to_universal = {int(c): u for u, c in reversed(list(enumerate(table.tolist()))) if c != 255}
    asked: list[int] = []

    from lseg.model.lseg import LSegOutput

    def forward(self, pixel_values, labels):
        count = labels.shape[0] if isinstance(labels, torch.Tensor) else len(labels)
        asked.append(count)
        classes = decode_classes(pixel_values).clamp(max=len(CAMVID_CLASSES) - 1)
        if count == len(universal):
            lookup = torch.zeros(len(CAMVID_CLASSES), dtype=torch.long)
            for c, u in to_universal.items():
                lookup[c] = u
            classes = lookup[classes]
        logits = torch.nn.functional.one_hot(classes, count).permute(0, 3, 1, 2).float() * 10
        return LSegOutput(logits, pixel_embeds=None, label_embeds=labels)

    monkeypatch.setattr(LSeg, "forward", forward)
    return asked


def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())
