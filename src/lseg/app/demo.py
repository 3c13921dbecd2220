"""Web demo: upload an image, type label words, get a colour overlay, label shares, a heat map per
label (which pixels look like *this word*), the label map as a PNG and the time it took.

`predict` holds all the logic and needs no gradio (tests call it directly); `build_app` wraps it in a
gradio Blocks UI and turns `LSegError` into `gr.Error` messages shown in the page. gradio is an optional
dependency: `pip install 'lseg[demo]'`.
"""

from __future__ import annotations

import html
import math
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lseg.errors import LSegError

if TYPE_CHECKING:
    from PIL import Image

    from lseg.model.lseg import LSeg

DEFAULT_LABELS = "cat, plant, grass, stone, other"
STREET_LABELS = "road, car, building, tree, sky, person, other"
DEFAULT_SIZE = 480
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_LABELS = 64
HEATMAP_LONG_SIDE = 320  # gallery thumbnails: enough to see where a word matches, cheap to send


@dataclass
class Prediction:
    """What the page shows for one request."""

    labels: list[str]
    overlay: Image.Image  # image blended with one colour per label, with a legend
    shares: list[tuple[str, float]]  # (label, share of pixels), largest first, summing to 1
    label_map: np.ndarray  # H x W indices into `labels` at the image's size
    heatmaps: list[tuple[np.ndarray, str]]  # per label: cosine-similarity heat map over the image
    seconds: float


def predict(
    model: LSeg,
    image: Any,
    labels_text: str | None,
    size: int | float | None,
    protocol: str = "single",
    heatmaps: bool = True,
) -> Prediction:
    """Segment `image` with comma-separated `labels_text`; `size` is the long side the model sees
    (None or 0: original size). Heat maps share one colour scale, so they compare across labels.
    Raises LSegError with a one-line, user-facing message for any bad input.
    """
    from lseg.features import colormap, resize_map, similarity_maps
    from lseg.images import long_side_size
    from lseg.inference import PROTOCOLS
    from lseg.labels import parse_labels
    from lseg.predictor import LSegPredictor
    from lseg.visualize import blend, overlay

    if image is None:
        raise LSegError("upload an image first")
    if not isinstance(labels_text, str) or not labels_text.strip():
        raise LSegError(f"type some labels separated by commas, e.g. '{DEFAULT_LABELS}'")
    labels = parse_labels(labels_text)
    if len(labels) > MAX_LABELS:
        raise LSegError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    if protocol not in PROTOCOLS:
        raise LSegError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    size = checked_size(size)
    array = model.processor.load(image)
    started = time.perf_counter()
    outputs = {"label_map", "features"} if heatmaps else {"label_map"}  # one pass of the model for both
    result = LSegPredictor(model, protocol, size).predict(array, labels, outputs)
    maps: list[tuple[np.ndarray, str]] = []
    if heatmaps:
        thumbnail = _thumbnail(array)
        seen = long_side_size(*array.shape[:2], size)  # the size the model saw
        features, text = result.features.numpy(force=True), model.encode_text(labels).float().cpu()
        similarity = similarity_maps(features, text)
        low, high = float(similarity.min()), float(similarity.max())
        for label, values in zip(labels, similarity):
            heat = colormap(resize_map(values, thumbnail.shape[:2], seen), low, high)
            maps.append((blend(thumbnail, heat, 0.6), label))
    seconds = time.perf_counter() - started
    shares = sorted(result.shares().items(), key=lambda item: -item[1])
    return Prediction(
        labels, overlay(array, result.label_map, labels), shares, result.label_map, maps, seconds
    )


def _thumbnail(array: np.ndarray) -> np.ndarray:
    """The image with its long side at most HEATMAP_LONG_SIDE (the gallery does not need more)."""
    import torch

    from lseg.images import resize_long_side

    if max(array.shape[:2]) <= HEATMAP_LONG_SIDE:
        return array
    small = resize_long_side(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255, HEATMAP_LONG_SIDE)
    return (small[0].permute(1, 2, 0) * 255).round().byte().numpy()


def as_page_text(text: str) -> str:
    """`text` as HTML that shows it literally. gradio renders the status line and error messages as
    HTML, so a label such as `<img src=x onerror=...>` would otherwise become an element of the page."""
    return html.escape(text)


def status_line(prediction: Prediction, device: str) -> str:
    """The time, the device and which label each value of the label map stands for, as escaped HTML."""
    legend = ", ".join(f"{index} = {label}" for index, label in enumerate(prediction.labels))
    return as_page_text(f"{prediction.seconds:.2f} s on {device} · label map values: {legend}")


def checked_size(size: Any) -> int | None:
    """The slider's long side as an int in [MIN_SIZE, MAX_SIZE]; None or 0 means the original size."""
    if size is None or size == 0:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size):
        raise LSegError(f"size must be a number of pixels between {MIN_SIZE} and {MAX_SIZE}, got {size!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise LSegError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size:g}")
    return int(size)


def example_images(folder: Path) -> list[tuple[Path, str]]:
    """(image, labels) examples to click: the repository's shared photo when present (never shipped)
    and two procedurally generated street scenes written to `folder`."""
    from lseg.data.synthetic import SyntheticStreetScenes
    from lseg.files import save_image

    examples = []
    candidates = []
    if os.environ.get("LSEG_SHARED_DATA"):
        candidates.append(Path(os.environ["LSEG_SHARED_DATA"]) / "images")
    candidates.append(Path.cwd().parent / "shared" / "data" / "images")
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "images")
    photo = next((folder / "cat1.jpeg" for folder in candidates if (folder / "cat1.jpeg").is_file()), None)
    if photo is not None:
        examples.append((photo.resolve(), DEFAULT_LABELS))
    scenes = SyntheticStreetScenes(2, size=(240, 320), seed=7)
    for index in range(len(scenes)):
        path = save_image(scenes[index]["image"].permute(1, 2, 0).numpy(), folder / f"street{index}.png")
        examples.append((path, STREET_LABELS))
    return examples


def require_gradio():
    try:
        import gradio
    except ImportError as error:
        raise LSegError("the web demo needs gradio: install lseg[demo] (pip install 'lseg[demo]')") from error
    return gradio


def build_app(
    model: LSeg,
    title: str = "LSeg: language-driven semantic segmentation",
    scratch: Path | None = None,
    examples: list[tuple[Path, str]] | None = None,
):
    """A gradio Blocks app around `predict` for `model` (not launched). The model is loaded once by the
    caller and shared by every request; its text encoder caches label embeddings (bounded LRU).
    `scratch` holds the generated examples and label-map downloads (default: a new temporary folder)."""
    gr = require_gradio()
    from lseg.files import save_image
    from lseg.inference import PROTOCOLS

    scratch = scratch or Path(tempfile.mkdtemp(prefix="lseg-demo-"))
    examples = example_images(scratch) if examples is None else examples

    def run(image, labels_text, size, protocol, heatmaps):
        try:
            prediction = predict(model, image, labels_text, size, protocol, heatmaps)
        except LSegError as error:  # messages quote the user's labels
            raise gr.Error(as_page_text(str(error))) from error
        _prune(scratch)
        dtype = np.uint8 if len(prediction.labels) <= 256 else np.uint16
        label_map = save_image(
            prediction.label_map.astype(dtype), scratch / f"labels-{secrets.token_hex(6)}.png"
        )
        table = [[label, f"{100 * share:.1f}%"] for label, share in prediction.shares]
        timing = status_line(prediction, str(model.device))
        return prediction.overlay, table, prediction.heatmaps, str(label_map), timing

    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"# {title}\nUpload an image and type any label words separated by commas; every pixel gets "
            "the label whose text embedding is closest to its own. Add a catch-all label such as "
            "*other*."
        )
        with gr.Row():
            with gr.Column():
                # A file path: lseg.images decodes it (size limit, EXIF, 16-bit, alpha), not gradio.
                image = gr.Image(type="filepath", image_mode=None, label="image")
                labels = gr.Textbox(value=DEFAULT_LABELS, label="labels (comma-separated)")
                size = gr.Slider(
                    minimum=MIN_SIZE,
                    maximum=1024,
                    value=DEFAULT_SIZE,
                    step=32,
                    label="size (long side in pixels the model sees)",
                )
                protocol = gr.Dropdown(
                    choices=list(PROTOCOLS),
                    value="single",
                    label="inference protocol (single is fastest; lseg-ms is the paper's multi-scale)",
                )
                heatmaps = gr.Checkbox(value=True, label="similarity heat map per label")
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                picture = gr.Image(type="pil", label="segmentation", elem_id="segmentation")
                table = gr.Dataframe(
                    headers=["label", "share"], label="label shares", interactive=False, elem_id="shares"
                )
                # HTML, not Markdown: escaped text stays literal (Markdown would still turn a label
                # such as `[x](https://...)` into a link).
                timing = gr.HTML(elem_id="timing")
                label_map = gr.File(label="label map (PNG of label indices)", elem_id="label-map")
        gallery = gr.Gallery(
            label="which pixels look like each word (cosine similarity, one colour scale)",
            columns=4,
            elem_id="heatmaps",
        )
        inputs = [image, labels, size, protocol, heatmaps]
        button.click(
            run, inputs=inputs, outputs=[picture, table, gallery, label_map, timing], api_name="segment"
        )
        gr.Examples(
            examples=[[str(path), words, DEFAULT_SIZE, "single", True] for path, words in examples],
            inputs=inputs,
        )
    return app


def _prune(folder: Path, max_age_s: float = 3600) -> None:
    """Delete our own label-map downloads older than an hour, so a long-running demo stays bounded."""
    cutoff = time.time() - max_age_s
    for path in folder.glob("labels-*.png"):
        if path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)


def launch(model: LSeg, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="lseg-demo-"))
    examples = example_images(scratch)
    app = build_app(model, scratch=scratch, examples=examples)
    app.queue(default_concurrency_limit=1)  # one model, one request at a time
    allowed = sorted({str(scratch), *(str(path.parent) for path, _ in examples)})
    # show_error: what gradio itself refuses (a file that is no image) is shown in the page too.
    app.launch(server_name=host, server_port=port, share=share, allowed_paths=allowed, show_error=True)
