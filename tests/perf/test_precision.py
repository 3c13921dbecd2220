"""Every fast path computes the same function as the float32 reference (tolerance per dtype)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lseg import LSeg, LSegError
from lseg.precision import (
    autocast,
    fold_batchnorms,
    model_precision,
    parse_dtype,
    prepare_for_inference,
    resolve_precision,
)

LABELS = ["sky", "road", "car", "tree", "person"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = LSeg.from_config("tiny").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is tested
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def logits(model: LSeg, pixel_values: torch.Tensor, dtype=None) -> torch.Tensor:
    with torch.no_grad(), autocast("cpu", model_precision(model, dtype), model.dtype):
        return model(pixel_values.to(model.dtype), model.encode_text(LABELS)).logits.float()


def test_resolve_precision_rules():
    assert resolve_precision("auto", "cpu") == torch.float32
    assert resolve_precision(None, "cuda") == torch.bfloat16
    assert resolve_precision("auto", "cpu", torch.bfloat16) == torch.bfloat16
    assert resolve_precision("float16", "cpu") == torch.float16
    assert resolve_precision(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(LSegError, match="dtype must be one of"):
        resolve_precision("int8", "cpu")
    with pytest.raises(LSegError, match="cannot compute in float32"):
        resolve_precision("float32", "cpu", torch.bfloat16)


def test_compute_and_load_dtypes_accept_the_same_names(model, tmp_path):
    """One reading of a dtype (`parse_dtype`): `--dtype`, `segment(dtype=)` and `from_pretrained(dtype=)`."""
    chosen = [parse_dtype(d) for d in (None, "auto", "float32", "bfloat16", torch.float16)]
    assert chosen == [None, None, torch.float32, torch.bfloat16, torch.float16]
    folder = model.save_pretrained(tmp_path / "model")
    assert LSeg.from_pretrained(folder, dtype="auto").dtype == torch.float32  # as stored
    for wrong in ("int8", "float64", torch.float64, "half"):
        with pytest.raises(LSegError, match="dtype must be one of auto, float32, bfloat16, float16, got"):
            parse_dtype(wrong)
    with pytest.raises(LSegError, match="dtype must be one of"):
        LSeg.from_pretrained(folder, dtype="float64")


def test_folded_batchnorm_and_channels_last_compute_the_same_function(model):
    pixels = model.processor.preprocess(image()).pixel_values
    reference = logits(model, pixels)
    fast = prepare_for_inference(copy.deepcopy(model), "float32", "cpu")
    assert fast.inference_dtype == torch.float32 and fold_batchnorms(fast) == 0  # already folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert torch.allclose(logits(fast, pixels), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("dtype", "native", "atol", "agreement"),
    [
        ("bfloat16", True, 0.5, 0.95),  # CPU: bf16 weights (what `prepare_for_inference` does)
        ("bfloat16", False, 0.5, 0.95),  # float32 weights under autocast (how CUDA runs)
        ("float16", True, 0.1, 0.98),
    ],
)
def test_half_precision_paths_match_float32_within_tolerance(model, dtype, native, atol, agreement):
    pixels = model.processor.preprocess(image()).pixel_values
    reference = logits(model, pixels)
    if native:
        fast = prepare_for_inference(copy.deepcopy(model), dtype, "cpu")
        assert fast.dtype == getattr(torch, dtype)
        out = logits(fast, pixels)
    else:
        out = logits(model, pixels, dtype)
    # logits are scaled cosines: |logit| <= logit_scale (14.3)
    assert (out - reference).abs().max() < atol
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= agreement
    result = (fast if native else model).segment(image(), labels=LABELS, dtype=None if native else dtype)
    expected = model.segment(image(), labels=LABELS).label_map
    assert (result.label_map == expected).mean() >= agreement


@pytest.mark.parametrize("labels_per_chunk", [1, 2])  # 1: the large-image path, no argmax tensor
@pytest.mark.parametrize("with_confidence", [True, False])
def test_label_maps_equal_the_argmax_of_fully_resized_logits_in_bounded_chunks(
    model, labels_per_chunk, with_confidence
):
    processor = model.processor
    torch.manual_seed(1)
    low = torch.randn(2, 7, 23, 31) * 4
    low[0, 3] = low[0, 1]  # exact ties go to the first label, as argmax
    targets, sizes = [(97, 61), (40, 33)], [(23, 31), (20, 17)]
    full = processor.postprocess(low, targets, sizes, return_scores=True)
    budget = labels_per_chunk * 97 * 61
    chunked = processor.label_maps(
        low, targets, sizes, return_confidence=with_confidence, max_elements=budget
    )
    for (label_map, scores), (fast_map, confidence) in zip(full, chunked):
        assert torch.equal(label_map, fast_map) and fast_map.dtype == torch.int64
        if with_confidence:
            assert torch.allclose(confidence, scores.amax(dim=0), atol=1e-6)
        else:
            assert confidence is None
    assert all(
        torch.equal(a, b) for a, b in zip(processor.postprocess(low, targets, sizes), [m for m, _ in full])
    )


def test_segment_computes_scores_only_when_asked(model):
    plain = model.segment(image(30, 40), labels=LABELS)
    assert plain.scores is None and plain.confidence is None
    full = model.segment(image(30, 40), labels=LABELS, return_scores=True, return_confidence=True)
    assert full.scores.shape == (5, 30, 40) and np.array_equal(full.label_map, plain.label_map)
    sure = model.segment(image(30, 40), labels=LABELS, return_confidence=True).confidence
    assert np.allclose(sure, full.confidence, atol=1e-6) and np.allclose(sure, full.scores.max(0), atol=1e-6)


def test_encode_image_takes_a_dtype(model):
    reference = model.encode_image(image())
    fast = model.encode_image(image(), dtype="bfloat16")
    assert fast.dtype == torch.float32 and fast.shape == reference.shape
    assert F.cosine_similarity(fast, reference, dim=0).mean() > 0.98
