"""ONNX export (label map equal to PyTorch's) and torch.compile with bucketed input shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lseg import LSeg
from lseg.processing import padded_size

LABELS = ["sky", "road", "car", "tree"]


def test_onnx_export_runs_in_onnx_runtime_with_pytorchs_label_map(tmp_path, tiny_model, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from lseg.cli.main import main
    from lseg.export import onnx_session

    folder = tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "tiny.onnx"
    argv = ["export", "--checkpoint", str(folder), "--labels", ", ".join(LABELS), "--out", str(out)]
    assert main([*argv, "--height", "64", "--width", "96"]) == 0
    assert "4 labels" in capsys.readouterr().out
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    pixels = tiny_model.processor.preprocess(image).pixel_values
    (label_map,) = onnx_session(out).run(None, {"pixel_values": pixels.numpy()})
    expected = tiny_model.segment(image, labels=LABELS).label_map
    assert label_map.shape == (1, 64, 96) and (label_map[0] == expected).mean() > 0.999


def test_bucketing_bounds_the_shapes_the_compiled_encoder_sees():
    """A folder of every aspect ratio at --size 480 gives a handful of padded shapes, not one each."""
    shapes = set()
    for width in range(100, 2000, 7):
        height = 1000
        scale = 480 / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        shapes.add(padded_size(*size, 128))
    assert len(shapes) <= 7 and all(max(s) == 512 for s in shapes)


@pytest.mark.slow
def test_compiled_tiny_model_matches_eager_and_does_not_recompile_per_image():
    torch.manual_seed(0)
    eager = LSeg.from_config("tiny").eval()
    compiled = LSeg.from_config("tiny").eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_for_inference(bucket=64)
    eager.input_multiple = compiled.input_multiple  # the same padding: the same function
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 60), (50, 64), (33, 61)]]
    torch._dynamo.utils.counters.clear()
    for image in images:
        fast = compiled.segment(image, labels=LABELS)
        assert (fast.label_map == eager.segment(image, labels=LABELS).label_map).mean() > 0.99
    # all three pad to 64 x 64: one graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
