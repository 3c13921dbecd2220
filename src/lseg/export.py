"""Export a model with its label set baked in, for runtimes without PyTorch (ONNX Runtime).

`export_onnx(model, labels, path)` writes an ONNX graph `pixel_values -> label_map`: input the
normalised, padded 1 x 3 x H x W batch `model.processor.preprocess` makes (at the exported H x W:
pad smaller images with `model.processor.pad_value()` and crop the map back), output the B x H x W
int64 label map. The label embeddings are constants of the graph, so the text encoder is not exported.
The graph's metadata records the labels, mean, std and input size. Needs `pip install 'lseg[export]'`.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lseg.errors import LSegError
from lseg.labels import validate_labels

FORMATS = ("onnx",)


class LabelledLSeg(nn.Module):
    """An LSeg with fixed label embeddings: normalised B x 3 x H x W images -> B x H x W label maps."""

    def __init__(self, model: nn.Module, labels: str | Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.labels = validate_labels(labels)
        self.register_buffer("label_embeds", model.encode_text(self.labels).detach().clone())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, self.label_embeds).logits.argmax(dim=1)


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as error:
        raise LSegError("ONNX export needs onnx and onnxscript: pip install 'lseg[export]'") from error


def export_onnx(
    model: nn.Module,
    labels: str | Sequence[str],
    path: str | Path,
    height: int = 480,
    width: int = 480,
    opset: int = 18,
) -> Path:
    """Write `model` with `labels` baked in as an ONNX graph for H x W inputs (atomically).

    The model is copied to float32 on the CPU first (the caller's model is left alone).
    """
    from lseg.files import write_atomic

    require_onnx()
    if height < 8 or width < 8:
        raise LSegError(f"the exported input size must be at least 8 x 8, got {height} x {width}")
    cpu = copy.deepcopy(model).float().cpu().eval()
    cpu.inference_dtype, cpu._compiled_embed = None, None  # eager, float32
    cpu.input_multiple = cpu.image_encoder.pad_multiple
    wrapper = LabelledLSeg(cpu, labels).eval()
    example = torch.zeros(1, 3, height, width)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=["label_map"],
            opset_version=opset,
            verbose=False,
        )
    proto = program.model_proto
    processor = model.processor
    meta = {
        "labels": json.dumps(wrapper.labels),
        "mean": json.dumps(list(processor.mean)),
        "std": json.dumps(list(processor.std)),
        "input_size": json.dumps([height, width]),
        "producer": "lseg",
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return write_atomic(Path(path), lambda handle: handle.write(proto.SerializeToString()))


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for an exported graph (`session.run(None, {"pixel_values": x})`)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise LSegError("running ONNX graphs needs onnxruntime: pip install 'lseg[export]'") from error
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
