"""`LSegImageProcessor`: the one owner of normalisation, padding, batching and postprocessing."""

import numpy as np
import pytest
import torch

from lseg import LSeg, LSegError
from lseg.model.config import LSEG_MEAN_STD
from lseg.processing import LSegImageProcessor, pad_image

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("mean_std", [IMAGENET, LSEG_MEAN_STD])
def test_pad_value_is_black_in_pixel_space(mean_std):
    processor = LSegImageProcessor(*mean_std)
    black = processor.pad_value()
    assert black.shape == (1, 3, 1, 1)
    torch.testing.assert_close(processor.denormalize(black), torch.zeros(1, 3, 1, 1))
    torch.testing.assert_close(black, processor.normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)))


def test_pad_value_is_the_original_minus_one_for_clip_statistics():
    assert torch.equal(LSegImageProcessor(*LSEG_MEAN_STD).pad_value(), torch.full((1, 3, 1, 1), -1.0))


def test_normalise_is_per_channel_and_round_trips():
    processor = LSegImageProcessor(*IMAGENET)
    image = torch.from_numpy(random_image(5, 7)).permute(2, 0, 1)[None]
    pixels = processor.normalize(image)
    mean, std = torch.tensor(IMAGENET[0]).view(1, 3, 1, 1), torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, (image.float() / 255 - mean) / std)
    torch.testing.assert_close(processor.denormalize(pixels), image.float() / 255)


def test_from_config_and_the_model_share_the_configs_statistics():
    config = LSeg.from_config("tiny").config
    config.mean, config.std = IMAGENET
    processor = LSegImageProcessor.from_config(config)
    assert (processor.mean, processor.std) == IMAGENET
    model = LSeg(config)
    assert (model.processor.mean, model.processor.std) == IMAGENET
    torch.testing.assert_close(model.pad_value, processor.pad_value())


def test_images_of_different_sizes_batch_and_come_back_at_their_own_sizes():
    processor = LSegImageProcessor(*IMAGENET)
    images = [random_image(37, 53, 0), random_image(61, 29, 1)]
    batch = processor.preprocess(images)
    assert batch.pixel_values.shape == (2, 3, 61, 53)
    assert batch.sizes == [(37, 53), (61, 29)] and batch.original_sizes == [(37, 53), (61, 29)]
    first = processor.denormalize(batch.pixel_values[:1])
    torch.testing.assert_close(first[..., :37, :53], torch.from_numpy(images[0]).permute(2, 0, 1)[None] / 255)
    second = processor.denormalize(batch.pixel_values[1:])
    assert first[..., 37:, :].abs().max() < 1e-6 and second[..., 29:].abs().max() < 1e-6  # black
    # Logits that mark the batch padding as label 0 and the image as label 1: cropping to the valid
    # size before resizing back leaves no label 0 anywhere.
    valid = (batch.pixel_values != processor.pad_value()).any(dim=1, keepdim=True).float()
    logits = torch.cat([1 - valid, valid], dim=1)
    maps = processor.postprocess(logits, batch.original_sizes, batch.sizes)
    assert [tuple(m.shape) for m in maps] == [(37, 53), (61, 29)]
    assert all((m == 1).all() for m in maps)


def test_resize_then_postprocess_restores_original_sizes_with_scores():
    processor = LSegImageProcessor(*IMAGENET)
    batch = processor.preprocess([random_image(40, 80), random_image(30, 20)], size=16)
    assert batch.sizes == [(8, 16), (16, 11)] and batch.pixel_values.shape[-2:] == (16, 16)
    logits = torch.randn(2, 4, 16, 16)
    results = processor.postprocess(logits, batch.original_sizes, batch.sizes, return_scores=True)
    for (label_map, scores), size in zip(results, [(40, 80), (30, 20)]):
        assert label_map.shape == size and scores.shape == (4, *size)
        torch.testing.assert_close(scores.sum(0), torch.ones(size))
        assert torch.equal(scores.argmax(0), label_map)


def test_a_batch_tensor_is_one_batch_and_is_resized():
    processor = LSegImageProcessor(*LSEG_MEAN_STD)
    images = torch.randint(0, 256, (3, 3, 20, 40), dtype=torch.uint8)
    batch = processor.preprocess(images, size=10)
    assert batch.pixel_values.shape == (3, 3, 5, 10) and batch.original_sizes == [(20, 40)] * 3


def test_pad_image_fills_each_channel_with_its_own_value():
    padded = pad_image(torch.zeros(1, 3, 2, 3), (4, 5), torch.tensor([1.0, 2.0, 3.0]))
    assert padded.shape == (1, 3, 4, 5)
    assert padded[:, :, :2, :3].eq(0).all()
    for channel, value in enumerate((1.0, 2.0, 3.0)):
        assert padded[0, channel, 2:].eq(value).all() and padded[0, channel, :, 3:].eq(value).all()


def test_bad_statistics_are_user_errors():
    with pytest.raises(LSegError, match="mean and std"):
        LSegImageProcessor((0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(LSegError, match="std > 0"):
        LSegImageProcessor((0.5,) * 3, (0.5, 0.0, 0.5))


@pytest.mark.parametrize("return_confidence", [False, True])
def test_label_maps_create_every_tensor_on_the_logits_device(return_confidence):
    """Regression: one label per chunk (photos over ~8.4 MP) created the running label map on the CPU,
    so `segment` on CUDA failed at the second label. Meta tensors show the device without a GPU."""
    logits = torch.empty(1, 3, 8, 8, device="meta")
    processor = LSegImageProcessor(*IMAGENET)
    for max_elements in (1, 2**24):  # one label at a time, and all labels at once
        ((label_map, confidence),) = processor.label_maps(
            logits, [(40, 40)], return_confidence=return_confidence, max_elements=max_elements
        )
        assert label_map.device.type == "meta" and label_map.shape == (40, 40)
        assert label_map.dtype == torch.int64
        assert (confidence is None) != return_confidence
        assert confidence is None or confidence.device.type == "meta"


def test_postprocess_resizes_with_the_images_half_pixel_convention():
    """A one-pixel line near the right edge of a 2048-wide image comes back centred on its column.

    Images go down with half-pixel centres; logits must come back the same way: align_corners=True on
    the way up put the line 1.6 pixels to the right (about half a model pixel)."""
    width, column = 2048, 2040
    image = np.zeros((64, width, 3), dtype=np.uint8)
    image[:, column] = 255
    processor = LSegImageProcessor(*IMAGENET)
    batch = processor.preprocess(image, size=480)
    brightness = processor.denormalize(batch.pixel_values).mean(dim=1, keepdim=True)
    logits = torch.cat([torch.zeros_like(brightness), brightness], dim=1)  # label 1: "line"
    (resized,) = processor.resize_logits(logits, batch.original_sizes, batch.sizes)
    line = resized[1].mean(dim=0)  # the line's response along the row, at the original width
    centre = float((line * torch.arange(width)).sum() / line.sum())
    assert abs(centre - column) < 0.25  # align_corners=True: 2041.6
