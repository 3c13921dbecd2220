"""Web demo: upload an image, type label words, get a colour overlay and label shares.

`predict` holds all the logic and needs no gradio (tests call it directly); `build_app` wraps it in a
gradio Blocks UI and turns `LSegError` into `gr.Error` messages shown in the page. gradio is an optional
dependency: `pip install 'lseg[demo]'`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lseg.errors import LSegError

if TYPE_CHECKING:
    from PIL import Image

    from lseg.model.lseg import LSeg

DEFAULT_LABELS = "cat, plant, grass, stone, other"
DEFAULT_SIZE = 480
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_LABELS = 64


def predict(
    model: LSeg, image: Any, labels_text: str | None, size: int | float | None, protocol: str = "single"
) -> tuple[Image.Image, list[tuple[str, float]]]:
    """Segment `image` with comma-separated `labels_text`.

    Returns the overlay with its legend and (label, share of pixels) pairs, largest first, every label
    included (shares sum to 1). `size` is the long side the model sees (None or 0: original size).
    Raises LSegError with a one-line, user-facing message for any bad input.
    """
    from lseg.inference import PROTOCOLS
    from lseg.labels import parse_labels
    from lseg.visualize import overlay

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
    result = model.segment(array, labels=labels, size=size, protocol=protocol)
    shares = sorted(result.shares().items(), key=lambda item: -item[1])
    return overlay(array, result.label_map, labels), shares


def checked_size(size: Any) -> int | None:
    """The slider's long side as an int in [MIN_SIZE, MAX_SIZE]; None or 0 means the original size."""
    if size is None or size == 0:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size):
        raise LSegError(f"size must be a number of pixels between {MIN_SIZE} and {MAX_SIZE}, got {size!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise LSegError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size:g}")
    return int(size)


def example_images() -> list[Path]:
    """The bundled-with-the-repo sample image(s), when a shared data folder is present (never shipped)."""
    candidates = []
    if os.environ.get("LSEG_SHARED_DATA"):
        candidates.append(Path(os.environ["LSEG_SHARED_DATA"]) / "images")
    candidates.append(Path.cwd().parent / "shared" / "data" / "images")
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "images")
    for folder in candidates:
        image = folder / "cat1.jpeg"
        if image.is_file():
            return [image.resolve()]
    return []


def require_gradio():
    try:
        import gradio
    except ImportError as error:
        raise LSegError("the web demo needs gradio: install lseg[demo] (pip install 'lseg[demo]')") from error
    return gradio


def build_app(model: LSeg, title: str = "LSeg: language-driven semantic segmentation"):
    """A gradio Blocks app around `predict` for `model` (not launched)."""
    gr = require_gradio()
    from lseg.inference import PROTOCOLS

    def run(image, labels_text, size, protocol):
        try:
            picture, shares = predict(model, image, labels_text, size, protocol)
        except LSegError as error:
            raise gr.Error(str(error)) from error
        return picture, [[label, f"{100 * share:.1f}%"] for label, share in shares]

    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"# {title}\nUpload an image and type any label words separated by commas; every pixel gets "
            "the label whose text embedding is closest to its own. Add a catch-all label such as "
            "*other*."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="numpy", label="image")
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
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                picture = gr.Image(type="pil", label="segmentation")
                table = gr.Dataframe(headers=["label", "share"], label="label shares", interactive=False)
        inputs = [image, labels, size, protocol]
        button.click(run, inputs=inputs, outputs=[picture, table])
        examples = example_images()
        if examples:
            gr.Examples(
                examples=[[str(path), DEFAULT_LABELS, DEFAULT_SIZE, "single"] for path in examples],
                inputs=inputs,
            )
    return app


def launch(model: LSeg, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    app = build_app(model)
    app.queue(default_concurrency_limit=1)  # one model, one request at a time
    allowed = [str(path.parent) for path in example_images()]
    app.launch(server_name=host, server_port=port, share=share, allowed_paths=allowed)
