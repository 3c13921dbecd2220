"""Image encoders that feed the DPT decoder four feature maps at strides 4, 8, 16 and 32.

A ViT yields one token grid per hooked block; DPT "reassembles" each into an image-like map and
resamples it to its stride. A CNN yields the four strides directly. A hybrid ViT (DPT-Hybrid) takes
its two high-resolution maps from the ResNet stem of its patch embedding and the others from ViT
blocks. All three expose `out_channels` (channels of the four maps) and `pad_multiple` (input sides
must be multiples of it; the model pads and crops back).
"""

from __future__ import annotations

import math
from types import MethodType

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.utils.checkpoint import checkpoint

from lseg.errors import LSegError, first_line
from lseg.model.config import IMAGE_ENCODERS, ImageEncoderConfig, Rule, is_int, register_image_encoder
from lseg.model.hub import hub_access
from lseg.model.packaged_weights import load_packaged_weights

STRIDES = (4, 8, 16, 32)
TIMM_POS_EMBED_RESIZE = ("bicubic", True)  # how timm resizes position embeddings for other image sizes
VIT_RULES: dict[str, Rule] = {  # the config fields a ViT's token reassembly reads (vit and hybrid)
    "hooks": (
        lambda v: v is None or (isinstance(v, list) and all(is_int(h, 0) for h in v)),
        "null or a list of block indices (integers >= 0)",
    ),
    "channels": (
        lambda v: v is None or (isinstance(v, list) and all(is_int(c, 1) for c in v)),
        "null or a list of positive integers",
    ),
    "readout": (lambda v: v in ("project", "add", "ignore"), "one of project, add, ignore"),
    "pos_embed_interpolation": (lambda v: v in ("bicubic", "bilinear"), "one of bicubic, bilinear"),
    "pos_embed_antialias": (lambda v: isinstance(v, bool), "true or false"),
}


class ProjectReadout(nn.Module):
    """Concatenate the class token to every patch token, then Linear(2D -> D) + GELU (DPT default)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([tokens, cls_token.expand_as(tokens)], dim=-1))


class AddReadout(nn.Module):
    def forward(self, tokens: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
        return tokens + cls_token


class IgnoreReadout(nn.Module):
    def forward(self, tokens: torch.Tensor, cls_token: torch.Tensor | None) -> torch.Tensor:
        return tokens


READOUTS = {"project": ProjectReadout, "add": lambda dim: AddReadout(), "ignore": lambda dim: IgnoreReadout()}


def resample_layer(channels: int, factor: float) -> nn.Module:
    """DPT resampling of a token map: transposed conv to upsample, strided 3x3 conv to downsample."""
    if factor == 1:
        return nn.Identity()
    if factor > 1:
        step = int(factor)
        return nn.ConvTranspose2d(channels, channels, kernel_size=step, stride=step)
    step = int(round(1 / factor))
    return nn.Conv2d(channels, channels, kernel_size=3, stride=step, padding=1)


class Reassemble(nn.Module):
    """Token grid (B x h*w x D) -> image map (B x C x H/stride x W/stride).

    Patch sizes that do not divide the strides (14 for DINOv2) give a non-integer resampling factor;
    the map is then resized to its exact stride size.
    """

    def __init__(self, dim: int, channels: int, factor: float, readout: str) -> None:
        super().__init__()
        self.readout = READOUTS[readout](dim)
        self.project = nn.Conv2d(dim, channels, kernel_size=1)
        self.resample = resample_layer(channels, factor)

    def forward(
        self,
        tokens: torch.Tensor,
        cls_token: torch.Tensor | None,
        grid: tuple[int, int],
        size: tuple[int, int],
    ) -> torch.Tensor:
        tokens = self.readout(tokens, cls_token)
        feature_map = self.resample(self.project(tokens.transpose(1, 2).unflatten(2, grid)))
        if tuple(feature_map.shape[-2:]) != tuple(size):
            feature_map = F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False)
        return feature_map


def _make_pos_embed(interpolation: str, antialias: bool):
    """timm's `VisionTransformer._pos_embed` with a configurable grid resize.

    timm resizes position embeddings bicubically with antialias; the original LSeg resized them
    bilinearly (align_corners=False, no antialias) at every forward. Checkpoints trained one way
    lose accuracy when run the other way, so the choice is part of the model config. Only used
    when it differs from timm's; otherwise timm's own method runs. Mirrors timm's token layout:
    class and register tokens first, position embeddings with or without prefix entries.
    """

    def pos_embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        prefix = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        x = x.reshape(batch, -1, dim)
        if vit.pos_embed is None:
            return torch.cat(prefix + [x], dim=1)
        pos = resample_abs_pos_embed(
            vit.pos_embed,
            new_size=(height, width),
            old_size=vit.patch_embed.grid_size,
            num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
            interpolation=interpolation,
            antialias=antialias,
        )
        if vit.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return vit.pos_drop(x)

    return pos_embed


def _tap_blocks(vit: nn.Module, cfg: ImageEncoderConfig, default: list[int], what: str) -> list[int]:
    """The blocks a timm ViT is tapped at (the config's `hooks`, else `default`), checked; installs the
    config's position-embedding resize (`_make_pos_embed`) when it differs from timm's, and drops what
    runs after the last hook: the blocks after it, the final norm and the head (DDP requires every
    trainable parameter to receive a gradient)."""
    if (cfg.pos_embed_interpolation, cfg.pos_embed_antialias) != TIMM_POS_EMBED_RESIZE:
        vit._pos_embed = MethodType(
            _make_pos_embed(cfg.pos_embed_interpolation, cfg.pos_embed_antialias), vit
        )
    depth = len(vit.blocks)
    hooks = list(cfg.hooks or default)
    if len(hooks) != len(default) or not all(0 <= h < depth for h in hooks):
        raise LSegError(f"{what} hooks must be {len(default)} block indices in [0, {depth - 1}], got {hooks}")
    vit.prune_intermediate_layers(hooks, prune_norm=True, prune_head=True)
    return hooks


def _timm_create(cfg: ImageEncoderConfig, pretrained: bool, **kwargs) -> nn.Module:
    """timm.create_model with the config's kwargs; a failure they cause is an LSegError naming them."""
    try:
        return timm.create_model(cfg.name, pretrained=pretrained, **{**kwargs, **cfg.kwargs})
    except (TypeError, ValueError, AssertionError) as error:
        if not cfg.kwargs:
            raise
        raise LSegError(
            f"timm cannot build '{cfg.name}' with image_encoder.kwargs {cfg.kwargs}: {first_line(error)}; "
            "fix or remove those arguments"
        ) from error


def create_timm_model(cfg: ImageEncoderConfig, **kwargs) -> nn.Module:
    """timm.create_model with clear errors for unknown names, bad kwargs and unavailable weights.

    Pretrained weights come from the Hugging Face Hub, or with `pretrained_source: package` from a
    pip package that ships them (offline).
    """
    if not timm.is_model(cfg.name):
        close = ", ".join(timm.list_models(f"*{cfg.name.split('_')[0]}*")[:12])
        raise LSegError(
            f"unknown timm backbone '{cfg.name}'" + (f"; similar names: {close}" if close else "")
        )
    if not cfg.pretrained:
        return _timm_create(cfg, False, **kwargs)
    if cfg.pretrained_source == "package":
        model = _timm_create(cfg, False, **kwargs)
        load_packaged_weights(model, cfg.name)
        return model
    with hub_access(f"pretrained timm weights for '{cfg.name}'"):
        return _timm_create(cfg, True, **kwargs)


@register_image_encoder("vit", VIT_RULES)
class ViTEncoder(nn.Module):
    """timm Vision Transformer + DPT reassembly of the hooked blocks' tokens."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.model = create_timm_model(cfg, dynamic_img_size=True, num_classes=0)
        if not hasattr(self.model, "blocks") or not hasattr(self.model, "patch_embed"):
            raise LSegError(f"'{cfg.name}' is not a plain timm VisionTransformer; use type 'cnn' or 'hybrid'")
        if self.model.cls_token is None and cfg.readout != "ignore":
            raise LSegError(
                f"readout '{cfg.readout}' needs a class token and '{cfg.name}' has none; "
                "set image_encoder.readout to 'ignore'"
            )
        depth = len(self.model.blocks)
        self.hooks = _tap_blocks(self.model, cfg, [round(depth * (i + 1) / 4) - 1 for i in range(4)], "ViT")
        dim = self.model.embed_dim
        patch = self.model.patch_embed.patch_size[0]
        self.pad_multiple = math.lcm(patch, 32)
        channels = cfg.channels or [dim // 4, dim // 2, dim, dim]
        self.out_channels = list(channels)
        self.reassemble = nn.ModuleList(
            Reassemble(dim, c, patch / stride, cfg.readout) for c, stride in zip(channels, STRIDES)
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        grid = self.model.patch_embed.dynamic_feat_size(images.shape[-2:])
        outputs = self.model.forward_intermediates(
            images,
            indices=self.hooks,
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
            output_dict=True,
        )
        tokens = outputs["image_intermediates"]
        # Prefix tokens are the class token (if any), then register tokens; only the class token is read.
        if self.model.cls_token is None:
            classes = [None] * len(tokens)
        else:
            classes = [prefix[:, :1] for prefix in outputs["image_intermediates_prefix"]]
        height, width = images.shape[-2:]
        return [
            layer(t, c, grid, (height // stride, width // stride))
            for layer, t, c, stride in zip(self.reassemble, tokens, classes, STRIDES)
        ]


@register_image_encoder("cnn")
class CNNEncoder(nn.Module):
    """Any timm CNN with `features_only`; picks the maps whose reduction is 4, 8, 16 and 32."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        probe = _timm_create(cfg, False, features_only=True)
        reductions = probe.feature_info.reduction()
        missing = [s for s in STRIDES if s not in reductions]
        if missing:
            raise LSegError(
                f"backbone '{cfg.name}' has no feature maps at strides {missing} (has {reductions})"
            )
        indices = [reductions.index(s) for s in STRIDES]
        out_indices = [probe.feature_info.out_indices[i] for i in indices]
        del probe
        self.model = create_timm_model(cfg, features_only=True, out_indices=out_indices)
        self.out_channels = self.model.feature_info.channels()
        self.pad_multiple = 32

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(images))


@register_image_encoder("hybrid", VIT_RULES)
class HybridViTEncoder(nn.Module):
    """DPT-Hybrid: ResNet stages of the patch embedding give strides 4 and 8, ViT blocks 16 and 32."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.model = create_timm_model(cfg, dynamic_img_size=True, num_classes=0)
        backbone = getattr(self.model.patch_embed, "backbone", None)
        if backbone is None or not hasattr(backbone, "stages"):
            raise LSegError(f"'{cfg.name}' is not a timm hybrid ViT with a ResNet patch embedding")
        depth = len(self.model.blocks)
        self.hooks = _tap_blocks(self.model, cfg, [depth * 2 // 3 - 1, depth - 1], "hybrid ViT")
        dim = self.model.embed_dim
        cnn_channels = [info["num_chs"] for info in backbone.feature_info if info["reduction"] in (4, 8)][-2:]
        vit_channels = (cfg.channels or [dim, dim])[-2:]
        self.out_channels = [*cnn_channels, *vit_channels]
        self.reassemble = nn.ModuleList(
            Reassemble(dim, c, 16 / stride, cfg.readout) for c, stride in zip(vit_channels, STRIDES[2:])
        )
        self.pad_multiple = 32
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each ResNet stage and ViT block in the backward pass instead of storing activations."""
        self.grad_checkpointing = enable

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        # Stages and blocks are run here (not by timm) to tap the ResNet maps, so checkpointing is ours.
        backbone = self.model.patch_embed.backbone
        cnn_maps = []
        x = backbone.stem(images)
        for stage in backbone.stages:
            x = self._run(stage, x)
            cnn_maps.append(x)
        grid = x.shape[-2:]
        tokens = self.model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = self.model._pos_embed(tokens.unflatten(1, grid))
        tokens = self.model.norm_pre(tokens)
        vit_maps = []
        for index, block in enumerate(self.model.blocks):
            tokens = self._run(block, tokens)
            if index in self.hooks:
                vit_maps.append(tokens)
        prefix = self.model.num_prefix_tokens
        height, width = images.shape[-2:]
        vit_maps = [
            layer(t[:, prefix:], t[:, :1], tuple(grid), (height // stride, width // stride))
            for layer, t, stride in zip(self.reassemble, vit_maps, STRIDES[2:])
        ]
        return [cnn_maps[0], cnn_maps[1], *vit_maps]


def early_stage_parameters(encoder: nn.Module, stages: int) -> list[nn.Parameter]:
    """The pretrained backbone's (`encoder.model`'s) parameters that the encoder's first `stages`
    maps (strides 4, 8, ...) depend on: the stem, the embeddings and the stages or blocks up to there.

    Found by differentiating those maps of one small eval-mode forward (BatchNorm statistics are not
    touched), so it holds for any registered encoder, whatever order its modules run in. The DPT
    reassembly layers are not the backbone's and are never included.
    """
    if not 0 <= stages <= len(STRIDES):
        raise LSegError(
            f"frozen_stages must be 0 to {len(STRIDES)} (the image encoder's maps at strides {STRIDES}), "
            f"got {stages}"
        )
    if stages == 0:
        return []
    parameters = list(encoder.model.parameters())
    reference = parameters[0]
    side = encoder.pad_multiple
    image = torch.zeros(1, 3, side, side, device=reference.device, dtype=reference.dtype)
    modes = [(module, module.training) for module in encoder.modules()]
    encoder.eval()
    try:
        with torch.enable_grad():
            maps = encoder(image)[:stages]
            gradients = torch.autograd.grad(sum(m.sum() for m in maps), parameters, allow_unused=True)
    finally:
        for module, training in modes:
            module.training = training
    return [p for p, gradient in zip(parameters, gradients) if gradient is not None]


def build_image_encoder(cfg: ImageEncoderConfig) -> nn.Module:
    """The encoder of the config's registered `type`."""
    return IMAGE_ENCODERS.record(cfg.type).builder(cfg)
