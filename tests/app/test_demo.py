import sys

import numpy as np
import pytest
from PIL import Image

from lseg import LSegError
from lseg.app.demo import predict
from lseg.cli.main import main


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def test_predict_returns_overlay_and_shares(tiny_model, image):
    picture, shares = predict(tiny_model, image, " cat, plant ,grass, other", 64, "single")
    assert isinstance(picture, Image.Image) and picture.height >= 40 and picture.width > 56
    assert [label for label, _ in shares] != [] and {label for label, _ in shares} == {
        "cat",
        "plant",
        "grass",
        "other",
    }
    assert sum(share for _, share in shares) == pytest.approx(1)
    assert [s for _, s in shares] == sorted((s for _, s in shares), reverse=True)


@pytest.mark.parametrize(
    ("labels", "size", "protocol", "message"),
    [
        ("cat,, dog", 64, "single", "empty label"),
        ("", 64, "single", "type some labels"),
        ("cat, cat", 64, "single", "duplicate"),
        ("cat, dog", 10_000, "single", "size must be"),
        ("cat, dog", 64, "bogus", "unknown protocol"),
        ("cat, dog", float("nan"), "single", "size must be a number"),
        ("cat, dog", float("inf"), "single", "size must be a number"),
        ("cat, dog", "64", "single", "size must be a number"),
        (["cat", "dog"], 64, "single", "type some labels"),
        (7, 64, "single", "type some labels"),
    ],
)
def test_bad_inputs_raise_one_line_errors(tiny_model, image, labels, size, protocol, message):
    with pytest.raises(LSegError, match=message) as error:
        predict(tiny_model, image, labels, size, protocol)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (5, 0)])
def test_empty_images_are_refused(tiny_model, shape):
    with pytest.raises(LSegError, match="the image is empty"):
        predict(tiny_model, np.zeros(shape, dtype=np.uint8), "cat, dog", 64, "single")


def test_no_image(tiny_model):
    with pytest.raises(LSegError, match="upload an image"):
        predict(tiny_model, None, "cat", 64, "single")


def test_demo_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail
    assert main(["demo", "--preset", "tiny"]) == 1
    assert "lseg[demo]" in capsys.readouterr().err


def test_gradio_app_builds(tiny_model):
    gr = pytest.importorskip("gradio")
    from lseg.app.demo import build_app

    app = build_app(tiny_model)
    assert isinstance(app, gr.Blocks)
