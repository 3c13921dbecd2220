import time

import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from lseg.data import SYNTHETIC_CLASS_NAMES, SyntheticStreetScenes, collate, train_transform
from lseg.model.config import LSEG_MEAN_STD
from lseg.processing import LSegImageProcessor


def test_sample_format():
    ds = SyntheticStreetScenes(3, size=(64, 96), seed=1)
    sample = ds[2]
    assert len(ds) == 3 and ds.name == "synthetic" and ds.ignore_index == 255
    assert (
        ds.class_names == list(SYNTHETIC_CLASS_NAMES) == ["sky", "road", "building", "tree", "car", "person"]
    )
    assert isinstance(sample["image"], tv_tensors.Image) and sample["image"].dtype == torch.uint8
    assert sample["image"].shape == (3, 64, 96)
    assert isinstance(sample["mask"], tv_tensors.Mask) and sample["mask"].dtype == torch.int64
    assert sample["mask"].shape == (64, 96) and int(sample["mask"].max()) < 6
    assert sample["dataset"] == "synthetic" and isinstance(sample["path"], str)


def test_deterministic_by_seed_and_index():
    a, b = SyntheticStreetScenes(5, seed=7), SyntheticStreetScenes(5, seed=7)
    first = [b[i] for i in (4, 1)]  # access order must not matter
    for sample, i in zip(first, (4, 1), strict=True):
        assert torch.equal(sample["image"], a[i]["image"]) and torch.equal(sample["mask"], a[i]["mask"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], SyntheticStreetScenes(5, seed=8)[0]["image"])


def test_all_classes_appear_and_images_are_not_a_colour_lookup():
    ds = SyntheticStreetScenes(4)
    seen = set()
    for i in range(len(ds)):
        sample = ds[i]
        seen |= set(sample["mask"].unique().tolist())
        pixels = sample["image"].flatten(1)[:, sample["mask"].flatten() == 1]  # road
        assert pixels.float().std(dim=1).min() > 5  # textured, not a flat colour
    assert seen == set(range(len(SYNTHETIC_CLASS_NAMES)))


def test_fast_enough():
    ds = SyntheticStreetScenes(20)
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    per_image = (time.perf_counter() - start) / len(ds)
    assert per_image < 0.015, f"{per_image * 1000:.1f} ms per image (target < 5 ms; loose bound for busy CI)"


def test_works_with_transform_and_loader():
    ds = SyntheticStreetScenes(
        4, transform=train_transform(LSegImageProcessor(*LSEG_MEAN_STD), crop_size=64, base_size=96)
    )
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 64, 64) and batch["dataset"] == ["synthetic"] * 4
