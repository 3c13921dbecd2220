import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from lseg import LSegError
from lseg.app.demo import as_page_text, predict, status_line
from lseg.cli.main import main

HOSTILE_LABELS = ["<img src=x onerror=alert(1)>", "<b>bold</b>", "&amp; ' \""]


class PageText(HTMLParser):
    """What a browser makes of an HTML fragment: the elements it would create and the text it shows."""

    def __init__(self, fragment: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[str] = []
        self.text = ""
        self.feed(fragment)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append(tag)

    def handle_data(self, data):
        self.text += data


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def test_predict_returns_overlay_shares_heatmaps_and_label_map(tiny_model, image):
    prediction = predict(tiny_model, image, " cat, plant ,grass, other", 64, "single")
    labels = ["cat", "plant", "grass", "other"]
    assert prediction.labels == labels
    picture = prediction.overlay
    assert isinstance(picture, Image.Image) and picture.height >= 40 and picture.width > 56
    shares = prediction.shares
    assert {label for label, _ in shares} == set(labels)
    assert sum(share for _, share in shares) == pytest.approx(1)
    assert [s for _, s in shares] == sorted((s for _, s in shares), reverse=True)
    assert prediction.label_map.shape == (40, 56) and prediction.label_map.max() < 4
    assert [caption for _, caption in prediction.heatmaps] == labels
    assert all(heat.shape == (40, 56, 3) and heat.dtype == np.uint8 for heat, _ in prediction.heatmaps)
    assert prediction.seconds > 0
    result = tiny_model.segment(image, labels=labels, size=64)
    assert np.array_equal(prediction.label_map, result.label_map)


def test_heatmaps_follow_the_similarity_of_each_word(tiny_model):
    """The brightest heat-map pixel of a label is where its cosine similarity is highest."""
    from lseg.features import similarity_maps

    image = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    prediction = predict(tiny_model, image, "cat, road", 0, "single")
    features = tiny_model.encode_image(image).float().numpy()
    similarity = similarity_maps(features, tiny_model.encode_text(["cat", "road"]).numpy())
    for (heat, _), values in zip(prediction.heatmaps, similarity):
        assert heat.shape[:2] == (48, 64)
        brightness = heat.astype(np.float32).sum(axis=2)
        top = np.unravel_index(values.argmax(), values.shape)
        assert brightness[top[0] * 2, top[1] * 2] > np.median(brightness)


def test_large_images_get_small_heatmaps(tiny_model):
    from lseg.app.demo import HEATMAP_LONG_SIDE

    image = np.zeros((400, 1000, 3), dtype=np.uint8)
    prediction = predict(tiny_model, image, "a, b", 64, "single")
    assert prediction.heatmaps[0][0].shape == (128, HEATMAP_LONG_SIDE, 3)
    assert prediction.label_map.shape == (400, 1000)
    assert not predict(tiny_model, image, "a, b", 64, "single", heatmaps=False).heatmaps


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


def test_the_status_line_shows_label_text_literally(tiny_model, image):
    prediction = predict(tiny_model, image, ", ".join(HOSTILE_LABELS), 64, "single", heatmaps=False)
    shown = PageText(status_line(prediction, "cpu"))
    assert shown.elements == []
    legend = ", ".join(f"{index} = {label}" for index, label in enumerate(HOSTILE_LABELS))
    assert shown.text.endswith(f"s on cpu · label map values: {legend}")


def test_error_messages_quoting_labels_show_them_literally(tiny_model, image):
    with pytest.raises(LSegError) as caught:
        predict(tiny_model, image, "<b>bold</b>, <B>BOLD</B>", 64, "single")
    shown = PageText(as_page_text(str(caught.value)))
    assert shown.elements == [] and shown.text == str(caught.value)
    assert "<b>bold</b> / <B>BOLD</B>" in shown.text


def test_a_request_runs_the_image_encoder_once(tiny_model, monkeypatch):
    """The label map and the heat maps come from one pass (they used to take two)."""
    calls = []
    encoder = tiny_model.image_encoder.forward
    monkeypatch.setattr(tiny_model.image_encoder, "forward", lambda x: calls.append(1) or encoder(x))
    image = np.random.default_rng(4).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    predict(tiny_model, image, "cat, road", 0, "single")
    assert calls == [1]
