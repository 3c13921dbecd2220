"""DPT decoder (Ranftl et al., 2021): project four maps to one width, then fuse coarse to fine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fusion_weight_count(features: int) -> int:
    """Convolution weights of the fusion blocks at width `features` (the projections add the image
    encoder's channels x 9 x `features`): 7 residual units of two 3x3 convs, 4 1x1 output convs."""
    return (7 * 2 * 9 + 4) * features * features


class ResidualConvUnit(nn.Module):
    """ReLU -> 3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the input."""

    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.bn1 = nn.BatchNorm2d(features) if use_bn else nn.Identity()
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.bn2 = nn.BatchNorm2d(features) if use_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        out = self.bn2(self.conv2(F.relu(out)))
        return out + x


class FusionBlock(nn.Module):
    """Add the (refined) skip map, refine, upsample x2 (align_corners=True), 1x1 conv.

    The coarsest block has no skip input, hence no `skip_unit`.
    """

    def __init__(self, features: int, use_bn: bool, has_skip: bool) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(features, use_bn) if has_skip else None
        self.unit = ResidualConvUnit(features, use_bn)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTDecoder(nn.Module):
    """Four maps at strides 4..32 -> one `features`-channel map at stride 2."""

    def __init__(self, in_channels: list[int], features: int = 256, use_bn: bool = True) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in in_channels)
        # fusion[i] fuses at the resolution of map i; fusion[3] (stride 32) starts the chain.
        self.fusion = nn.ModuleList(FusionBlock(features, use_bn, has_skip=i < 3) for i in range(4))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        projected = [proj(m) for proj, m in zip(self.project, maps)]
        path = self.fusion[3](projected[3])
        for index in (2, 1, 0):
            path = self.fusion[index](path, projected[index])
        return path
