"""The one owner of numeric precision and inference-time model preparation.

Every path that runs the model (`lseg.predictor`, so `LSeg.segment` and `encode_image`, the evaluation runner,
the CLI and the demo) asks here which dtype to compute in and how:

* `parse_dtype`: the one reading of a user's dtype (auto, float32, bfloat16, float16 or a torch
  dtype), for compute and for `LSeg.from_pretrained(dtype=...)`'s load-time cast alike;
* `resolve_precision("auto" | "float32" | "bfloat16" | "float16" | torch.dtype, device, weights)`:
  "auto" (or None) is the weights' own dtype when they are already half precision, else bfloat16
  on CUDA (tensor cores) and float32 elsewhere;
* `autocast(device, dtype, weights_dtype)`: the context a forward pass runs in. Weights already in
  `dtype` run natively (no autocast); float32 weights with a lower `dtype` run under `torch.autocast`
  (how CUDA is used: weights stay float32, matmuls and convolutions run in half precision);
* `prepare_for_inference(model, dtype, device)`: what the CLI and the demo do once after loading: on
  CPU the weights are cast to `dtype` (native bf16 kernels; CPU autocast re-casts the weights at every
  call), on CUDA they stay float32 for autocast; convolutional parts go channels_last and the
  decoder's BatchNorms are folded into their convolutions;
* `cpu_has_native_bfloat16()`: whether bfloat16 is a speed-up on this CPU (training warns when a
  `bf16-mixed` run would have oneDNN emulate it).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from lseg.errors import LSegError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A user's dtype choice (a name or torch dtype of `DTYPE_CHOICES`, as `--dtype` and the Python API
    take it) as a torch dtype; None for "auto" or None, whose meaning is the caller's."""
    if dtype is None or dtype == "auto":
        return None
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in DTYPES.values():
        raise LSegError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    return resolved


def resolve_precision(
    dtype: str | torch.dtype | None,
    device: torch.device | str = "cpu",
    weights_dtype: torch.dtype = torch.float32,
) -> torch.dtype:
    """The dtype a forward pass computes in (see the module docstring); LSegError for anything else.

    A dtype wider than the weights (float32 compute with bfloat16 weights) is refused: autocast only
    narrows, so cast the model back with `model.float()` first.
    """
    resolved = parse_dtype(dtype)
    if resolved is None:
        if weights_dtype != torch.float32:
            return weights_dtype
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if resolved != weights_dtype and weights_dtype != torch.float32:
        raise LSegError(
            f"the model's weights are {_name(weights_dtype)}; it cannot compute in {_name(resolved)} "
            "(cast it with model.float() first)"
        )
    return resolved


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without either, oneDNN
    emulates bfloat16, and `bf16-mixed` training can be slower than float32."""
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up defensively
    return any(getattr(torch.cpu, name, lambda: False)() for name in names)


def autocast(
    device: torch.device | str, dtype: torch.dtype | None, weights_dtype: torch.dtype = torch.float32
) -> AbstractContextManager:
    """Context for a forward pass computing in `dtype` with weights of `weights_dtype`."""
    if dtype is None or dtype == weights_dtype or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def prepare_for_inference(
    model: nn.Module,
    dtype: str | torch.dtype | None = "auto",
    device: torch.device | str | None = None,
    *,
    channels_last: bool = True,
    fold_batchnorm: bool = True,
) -> nn.Module:
    """Move `model` (an LSeg) to `device`, cast it for `dtype` and optimise it for inference, in place.

    On CPU the weights become `dtype`; on CUDA they stay float32 and `LSeg.segment(dtype=...)` /
    "auto" run under autocast. Folding BatchNorm changes the decoder for good: do not train the result.
    Returns the model, in eval mode.
    """
    device = torch.device(device) if device is not None else model.device
    model = model.to(device).eval()
    compute = resolve_precision(dtype, device, model.dtype)
    if fold_batchnorm:
        fold_batchnorms(model)  # before any cast: the folded weights are computed in float32
    if device.type != "cuda" and compute != model.dtype:
        model.to(compute)
    if channels_last:
        # The decoder and head are convolutions over large maps: oneDNN / cuDNN run them fastest
        # channels_last (bf16 on CPU: ~5x). The ViT's token maps are already channels-last views.
        model.to(memory_format=torch.channels_last)
    model.inference_dtype = compute  # what `model_precision(model, None)` then picks
    return model


def model_precision(
    model: nn.Module, dtype: str | torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.dtype:
    """The compute dtype for a pass of `model` (an LSeg, or anything with `device` / `dtype`) on
    `device` (default: the model's): `dtype` if given, else the one `prepare_for_inference` chose,
    else "auto" for its device and weights."""
    chosen = dtype if dtype is not None else getattr(model, "inference_dtype", None)
    device = device if device is not None else getattr(model, "device", "cpu")
    return resolve_precision(chosen, device, getattr(model, "dtype", torch.float32))


def fold_batchnorms(module: nn.Module) -> int:
    """Fold every `BatchNorm2d` that directly follows a `Conv2d` in a module's attributes `convN`/`bnN`
    (the DPT residual units) into the convolution; returns how many were folded."""
    folded = 0
    for unit in module.modules():
        for index in (1, 2):
            conv, bn = getattr(unit, f"conv{index}", None), getattr(unit, f"bn{index}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(unit, f"conv{index}", _fold(conv, bn))
                setattr(unit, f"bn{index}", nn.Identity())
                folded += 1
    return folded


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
    bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(bn.running_mean.float())
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    fused.weight.copy_(conv.weight.float() * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean.float()) * scale + bn.bias.float())
    fused.requires_grad_(conv.weight.requires_grad)
    return fused


def to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Host -> device copy; pinned and non-blocking for CUDA (the copy overlaps queued kernels)."""
    if device is None:
        return tensor
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
