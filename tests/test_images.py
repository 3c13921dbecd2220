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
    assert load_image(Image.open(tmp_path / "rotated.jpg")).shape == (10, 4, 3)
    assert load_image(tmp_path / "rotated.jpg", exif_orientation=False).shape == (4, 10, 3)  # as stored


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


def test_decompression_bombs_are_refused_in_one_line_and_the_limit_is_adjustable(tmp_path):
    from PIL import Image

    from lseg.images import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels
    from tests.hostile import png_header_bomb, real_bomb

    header = png_header_bomb(tmp_path / "header.png")
    real = real_bomb(tmp_path / "real.png")
    for path in (header, real):
        with pytest.raises(LSegError, match="decompression bomb") as error:
            load_image(path)
        assert "\n" not in str(error.value)
    moderate = png_header_bomb(tmp_path / "moderate.png", 9_000, 11_000)  # between PIL's 1x and 2x
    with pytest.raises(LSegError, match="9000 x 11000 pixels, more than the limit of 89,478,485"):
        load_image(moderate)
    try:
        set_max_image_pixels(0)  # 0 lifts the limit (trusted files only)
        assert Image.MAX_IMAGE_PIXELS is None
        set_max_image_pixels(100)
        with pytest.raises(LSegError, match="limit of 100 pixels"):
            load_image(header)
    finally:
        set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)


def test_truncated_jpeg_is_a_one_line_error(tmp_path):
    from tests.hostile import truncated_jpeg

    with pytest.raises(LSegError, match="cannot read image .*truncated"):
        load_image(truncated_jpeg(tmp_path / "cut.jpg"))


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 7), (7, 0, 4)])
def test_empty_arrays_are_refused(shape):
    with pytest.raises(LSegError, match="the image is empty"):
        load_image(np.zeros(shape, dtype=np.uint8))
