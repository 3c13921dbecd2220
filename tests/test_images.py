import numpy as np
import pytest
import torch
from PIL import Image

from lseg import LSegError
from lseg.images import find_images, load_image


def test_formats_become_rgb_uint8(tmp_path):
    gray = Image.fromarray(np.full((5, 7), 100, np.uint8), mode="L")
    rgba = Image.fromarray(np.zeros((5, 7, 4), np.uint8), mode="RGBA")  # fully transparent -> white
    deep = Image.fromarray(np.full((5, 7), 65535, np.uint16))
    for image, value in ((gray, 100), (rgba, 255), (deep, 255)):
        path = tmp_path / f"{image.mode}.png"
        image.save(path)
        array = load_image(path)
        assert array.shape == (5, 7, 3) and array.dtype == np.uint8
        assert (array == value).all()


def test_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((4, 10, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (10, 4, 3)


def test_arrays_and_tensors():
    assert load_image(np.zeros((3, 4), np.uint8)).shape == (3, 4, 3)
    assert load_image(torch.ones(3, 3, 4)).max() == 255
    assert load_image(torch.zeros(1, 2, 2, dtype=torch.uint8)).shape == (2, 2, 3)
    with pytest.raises(LSegError, match="H x W"):
        load_image(np.zeros((2, 2, 5), np.uint8))


def test_missing_corrupt_and_empty_inputs(tmp_path):
    with pytest.raises(LSegError, match="image not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(LSegError, match="cannot read image .*bad.jpg"):
        load_image(tmp_path / "bad.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LSegError, match="no images in directory"):
        find_images([tmp_path / "empty"])
