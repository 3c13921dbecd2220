"""The LSeg head: per-pixel embeddings in the text space, scaled cosine logits, spatial regularisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lseg.model.config import MAX_LOGIT_SCALE

ACTIVATIONS = {"relu": nn.ReLU, "lrelu": nn.LeakyReLU, "tanh": nn.Tanh}


def upsample_logits(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """The network's own bilinear upsampling of its stride-2 output to the input size.

    align_corners=True, as in the original LSeg's output head: trained weights (and the original
    checkpoints' logits) depend on it, so it is part of the model. Every resize between the model's
    input size and an image's own size uses half-pixel centres instead (`lseg.images.resize_bilinear`).
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(int(s) for s in size), mode="bilinear", align_corners=True)


class LabelwiseConv(nn.Module):
    """One 3x3 conv shared by every label channel: smooths each label's logit map the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        batch, labels, height, width = logits.shape
        out = self.conv(logits.reshape(batch * labels, 1, height, width))
        return out.reshape(batch, labels, height, width)


class SpatialRegularizer(nn.Module):
    """LSeg's optional blocks after the logits, applied `depth` times (the last without activation).

    `depthwise`: shared label-wise conv. `bottleneck`: the same plus the per-pixel max over labels
    added back. The same block (weights) is reused at every step, as in the original LSeg.
    """

    def __init__(self, kind: str, depth: int, activation: str) -> None:
        super().__init__()
        if kind not in ("depthwise", "bottleneck"):
            raise ValueError(f"unknown regularizer '{kind}'; valid: depthwise, bottleneck")
        self.kind = kind
        self.depth = depth
        self.labelwise = LabelwiseConv()
        self.activation = ACTIVATIONS[activation]()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        for step in range(self.depth):
            out = self.labelwise(logits)
            if self.kind == "bottleneck":
                out = out + logits.amax(dim=1, keepdim=True)
            logits = self.activation(out) if step < self.depth - 1 else out
        return logits


class TextProjection(nn.Module):
    """A learned map of the frozen encoder's label embeddings into the pixel space: t + W t, normalised.

    W starts at zero, so training starts from the plain model, and weight decay pulls it back there.
    It learns from the words training asks (the seen classes'); words never asked in training are
    mapped by what those taught it.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, embed_dim, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(text + self.linear(text), dim=-1)


class LSegHead(nn.Module):
    """Stride-2 decoder map -> per-pixel embeddings -> stride-2 logits against label embeddings."""

    def __init__(
        self,
        features: int,
        embed_dim: int,
        logit_scale: float = 1 / 0.07,
        learn_logit_scale: bool = False,
        regularizer: str | None = None,
        regularizer_depth: int = 2,
        regularizer_activation: str = "lrelu",
    ) -> None:
        super().__init__()
        if not 0 < logit_scale <= MAX_LOGIT_SCALE:
            raise ValueError(f"logit_scale must be in (0, {MAX_LOGIT_SCALE}], got {logit_scale}")
        self.project = nn.Conv2d(features, embed_dim, kernel_size=1)
        log_scale = torch.tensor(math.log(logit_scale))
        if learn_logit_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale, persistent=False)
        self.regularizer = (
            SpatialRegularizer(regularizer, regularizer_depth, regularizer_activation)
            if regularizer
            else None
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def embed(self, decoded: torch.Tensor) -> torch.Tensor:
        """Per-pixel embeddings, L2-normalised over the channel axis (dim 1), at stride 2."""
        return F.normalize(self.project(decoded), dim=1)

    def forward(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits at the embeddings' (stride 2) resolution: scaled cosines of `embed`'s output with
        N x D label embeddings, then the spatial regulariser if any (the model upsamples them)."""
        text = F.normalize(text.to(pixels.dtype), dim=-1)
        if pixels.is_contiguous(memory_format=torch.channels_last) and pixels.shape[1] > 1:
            # The same dot products as a 1x1 convolution: oneDNN runs it 2x (fp32) to 6x (bf16) faster
            # than einsum on channels_last maps (`lseg.precision.prepare_for_inference`).
            similarity = F.conv2d(pixels, text[:, :, None, None])
        else:
            similarity = torch.einsum("bdhw,nd->bnhw", pixels, text)
        return self.logits(similarity)

    def logits(self, cosines: torch.Tensor) -> torch.Tensor:
        """Scaled cosines, then the spatial regulariser if any."""
        logits = self.logit_scale * cosines
        return logits if self.regularizer is None else self.regularizer(logits)

    def cosines(self, decoded: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """B x N x h x w cosines between `embed(decoded)` and N x D label embeddings, computed without
        the D-channel embedding map (what training needs; `forward` serves the embeddings' users).

        With e = W x + b the projection of a decoded feature x, cos(e, t) = (W^T t . x + t . b) / |e|
        and |e|^2 = x^T (W^T W) x + 2 (W^T b) . x + |b|^2: every map has the decoder's few channels,
        not D (384-768): a float32 CPU training step of the CamVid recipe takes 0.72 s instead of 1.66 s.
        Always in float32: under bfloat16 autocast the norm's rounding would show in the logits.
        """
        with torch.autocast(decoded.device.type, enabled=False):
            x = decoded.float()
            weight, bias = self.project.weight[:, :, 0, 0].float(), self.project.bias.float()
            text = F.normalize(text.to(x.device, torch.float32), dim=-1)
            dots = F.conv2d(x, (text @ weight)[:, :, None, None], text @ bias)
            gram = F.conv2d(x, (weight.T @ weight)[:, :, None, None], 2 * (weight.T @ bias))
            squared_norms = (x * gram).sum(1, keepdim=True) + bias @ bias  # gram's bias adds 2 (W^T b) . x
            return dots / squared_norms.clamp_min(1e-24).sqrt()
