import pytest
import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors

from lseg.data import collate, eval_transform, train_transform
from lseg.errors import LSegError
from lseg.processing import LSegImageProcessor

# ImageNet statistics (as the rn101 / resnet26d / convnext_tiny presets): mean != std != 0.5 shows
# a transform that ignores the model's normalisation.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PROCESSOR = LSegImageProcessor(MEAN, STD)

# One saturated colour per class, far apart, none equal to the mean grey that padding uses.
COLOURS = torch.tensor(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], dtype=torch.uint8
)


def block_sample(height: int = 60, width: int = 80, block: int = 10, seed: int = 0) -> dict:
    """Image whose colour encodes the mask class, in ``block``-sized squares; one block is ignore."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, len(COLOURS), (height // block, width // block), generator=g)
    mask = classes.repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = COLOURS[mask].permute(2, 0, 1).contiguous()
    mask[:block, :block] = 255
    return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "dataset": "t", "path": "p"}


def normalised_colours() -> torch.Tensor:
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    return (COLOURS.float() / 255 - mean) / std


def interior(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood has a single mask value: away from resampling blur.

    The crop border counts as a boundary too (the class beyond it may bleed in).
    """
    m = nnf.pad(mask.float()[None, None], [radius] * 4, value=-1.0)
    size = 2 * radius + 1
    hi = nnf.max_pool2d(m, size, 1)
    lo = -nnf.max_pool2d(-m, size, 1)
    return (hi == lo)[0, 0]


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_keeps_image_and_mask_aligned(seed):
    torch.manual_seed(seed)
    transform = train_transform(PROCESSOR, crop_size=48, base_size=80, scale_range=(0.5, 2.0))
    out = transform(block_sample(seed=seed))
    image, mask = out["image"], out["mask"]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert isinstance(mask, tv_tensors.Mask) and mask.shape == (48, 48) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= set(range(len(COLOURS))) | {255}  # nearest: no blended ids
    assert out["dataset"] == "t" and out["path"] == "p"
    labelled = (mask != 255) & interior(mask)
    assert labelled.sum() > 100
    expected = normalised_colours()[mask[labelled]]
    assert torch.allclose(image.permute(1, 2, 0)[labelled], expected, atol=0.1)


def test_train_transform_pads_with_black_and_ignore():
    torch.manual_seed(0)
    transform = train_transform(PROCESSOR, crop_size=32, base_size=40, scale_range=(0.5, 0.5), hflip=False)
    sample = block_sample()
    sample["mask"][:] = 1  # no ignore in the source, so ignore marks padding only
    out = transform(sample)
    padding = out["mask"] == 255
    assert padding.sum() == 32 * 32 - 15 * 20  # image scaled to 15x20 (long side 40 * 0.5)
    black = (torch.zeros(3) - torch.tensor(MEAN)) / torch.tensor(STD)  # what inference pads with
    assert torch.allclose(out["image"][:, padding], black[:, None])
    rows, cols = torch.nonzero(~padding, as_tuple=True)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (15, 20)  # one unpadded rectangle


def test_train_transform_colour_jitter_runs():
    torch.manual_seed(0)
    out = train_transform(PROCESSOR, crop_size=32, base_size=64, color_jitter=True)(block_sample())
    assert out["image"].shape == (3, 32, 32) and out["mask"].dtype == torch.int64


def test_train_transform_rejects_bad_scale_range():
    with pytest.raises(LSegError, match="scale_range"):
        train_transform(PROCESSOR, scale_range=(2.0, 0.5))


def test_eval_transform_keeps_aspect_ratio():
    sample = block_sample(60, 80)
    out = eval_transform(PROCESSOR, size=120)(sample)
    assert out["image"].shape == (3, 90, 120) and out["mask"].shape == (90, 120)
    assert out["mask"].dtype == torch.int64 and out["image"].dtype == torch.float32
    labelled = (out["mask"] != 255) & interior(out["mask"])
    expected = normalised_colours()[out["mask"][labelled]]
    assert torch.allclose(out["image"].permute(1, 2, 0)[labelled], expected, atol=0.05)
    same = eval_transform(PROCESSOR)(block_sample(60, 80))
    assert same["image"].shape == (3, 60, 80) and torch.equal(same["mask"], sample["mask"])
    extremes = torch.tensor([[0.0] * 3, [1.0] * 3])  # black and white, normalised per channel
    normalised = (extremes - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(same["image"].amin(dim=(1, 2)), normalised[0])
    torch.testing.assert_close(same["image"].amax(dim=(1, 2)), normalised[1])


@pytest.mark.parametrize("size", [None, 50, 120], ids=["as stored", "shrunk", "enlarged"])
def test_the_eval_transform_gives_the_tensors_inference_gives(size):
    """Training's held-out data and inference preprocess a picture identically: one owner, the processor."""
    sample = block_sample(60, 80)
    sample["image"] = tv_tensors.Image(torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8))
    transformed = eval_transform(PROCESSOR, size)(sample)
    inferred = PROCESSOR.preprocess(sample["image"].permute(1, 2, 0).numpy(), size)
    assert torch.equal(transformed["image"], inferred.pixel_values[0])
    assert transformed["mask"].shape == inferred.pixel_values.shape[-2:]


def test_collate_pads_to_batch_max():
    a = eval_transform(PROCESSOR)(block_sample(20, 30))
    b = eval_transform(PROCESSOR)(block_sample(40, 10))
    batch = collate([a, b])
    assert batch["image"].shape == (2, 3, 40, 30) and batch["mask"].shape == (2, 40, 30)
    assert batch["mask"].dtype == torch.int64 and type(batch["image"]) is torch.Tensor
    assert torch.equal(batch["image"][0, :, :20, :30], a["image"]) and (batch["image"][0, :, 20:] == 0).all()
    assert torch.equal(batch["mask"][1, :40, :10], b["mask"]) and (batch["mask"][1, :, 10:] == 255).all()
    assert (batch["mask"][0, 20:] == 255).all()
    assert batch["dataset"] == ["t", "t"] and batch["path"] == ["p", "p"]
    assert (collate([a], ignore_index=7)["mask"] == 255).sum() == 100  # only the ignore block of the sample
    black = torch.tensor([-1.0, -2.0, 0.5])
    padded = collate([a, b], pad_value=black)["image"]
    assert torch.equal(padded[0, :, 20:], black[:, None, None].expand(3, 20, 30))
    assert torch.equal(padded[0, :, :20, :30], a["image"])
