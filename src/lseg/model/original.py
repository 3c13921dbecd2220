"""Import the original LSeg release checkpoints (Li et al., 2022; Lightning 1.3, torch 1.7).

Their `state_dict` keys start with `net.`: a full OpenAI CLIP (`net.clip_pretrained.*`, text tower
used), the image encoder (`net.pretrained.*`: a timm ViT plus DPT reassembly `act_postprocess*`, or a
torchvision ResNet-101) and the decoder/head (`net.scratch.*`). The architecture is inferred from
tensor shapes; every key is either mapped, or dropped because the original never used it.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lseg.errors import LSegError
from lseg.model.config import ImageEncoderConfig, LSegConfig, TextEncoderConfig

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
KNOWN_VITS = {  # (embed dim, patch, grid) -> timm name
    (1024, 16, 24): "vit_large_patch16_384",
    (768, 16, 24): "vit_base_patch16_384",
    (768, 32, 12): "vit_base_patch32_384",
}
NEVER_USED = (  # present in the original files, never executed by the original forward
    re.compile(r"net\.clip_pretrained\.(visual\..*|logit_scale)$"),
    re.compile(r"net\.pretrained\.model\.(head|norm)\..*"),  # hooks are taken before the final norm
    re.compile(r"net\.scratch\.refinenet4\.resConfUnit1\..*"),
)
# Key prefix (a regex) -> our prefix, the rest of the key kept: a block number `(\d)` counts from 1
# in the original, from 0 in ours.
SCRATCH_RULES = (
    (r"net\.scratch\.layer(\d)_rn\.", "decoder.project.{}."),
    (r"net\.scratch\.refinenet(\d)\.resConfUnit1\.", "decoder.fusion.{}.skip_unit."),
    (r"net\.scratch\.refinenet(\d)\.resConfUnit2\.", "decoder.fusion.{}.unit."),
    (r"net\.scratch\.refinenet(\d)\.out_conv\.", "decoder.fusion.{}.out_conv."),
    (r"net\.scratch\.head1\.", "head.project."),
    (r"net\.scratch\.head_block\.depthwise\.depthwise\.", "head.regularizer.labelwise.conv."),
    (r"net\.clip_pretrained\.", "text_encoder.model."),
)
VIT_RULES = (
    (r"net\.pretrained\.model\.", "image_encoder.model."),
    (r"net\.pretrained\.act_postprocess(\d)\.0\.", "image_encoder.reassemble.{}.readout."),
    (r"net\.pretrained\.act_postprocess(\d)\.3\.", "image_encoder.reassemble.{}.project."),
    (r"net\.pretrained\.act_postprocess(\d)\.4\.", "image_encoder.reassemble.{}.resample."),
)
RESNET_RULES = (
    (r"net\.pretrained\.layer1\.0\.", "image_encoder.model.conv1."),
    (r"net\.pretrained\.layer1\.1\.", "image_encoder.model.bn1."),
    (r"net\.pretrained\.layer1\.4\.", "image_encoder.model.layer1."),
    (r"net\.pretrained\.layer(?=[234]\.)", "image_encoder.model.layer"),
)


def _require(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise LSegError(f"{source} is not a complete original LSeg checkpoint: '{key}' is missing")
    return state[key]


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({regex.match(k)[1] for k in state if regex.match(k)})


def _text_config(state: dict[str, torch.Tensor], source: str) -> TextEncoderConfig:
    vocab, width = _require(state, "net.clip_pretrained.token_embedding.weight", source).shape
    context = _require(state, "net.clip_pretrained.positional_embedding", source).shape[0]
    embed_dim = _require(state, "net.clip_pretrained.text_projection", source).shape[1]
    layers = _count(state, r"net\.clip_pretrained\.transformer\.resblocks\.(\d+)\.")
    if (vocab, width, context, embed_dim, layers) == (49408, 512, 77, 512, 12):
        return TextEncoderConfig(model="ViT-B-32", pretrained="openai")
    custom = {
        "embed_dim": embed_dim,
        "width": width,
        "heads": max(1, width // 64),
        "layers": layers,
        "context_length": context,
        "vocab_size": vocab,
        "quick_gelu": True,
    }
    return TextEncoderConfig(model="custom", pretrained=None, custom=custom)


def _image_config(state: dict[str, torch.Tensor], source: str) -> tuple[ImageEncoderConfig, dict[str, Any]]:
    if "net.pretrained.model.pos_embed" in state:
        pos = state["net.pretrained.model.pos_embed"]
        dim = pos.shape[-1]
        patch = _require(state, "net.pretrained.model.patch_embed.proj.weight", source).shape[-1]
        grid = round((pos.shape[1] - 1) ** 0.5)
        depth = _count(state, r"net\.pretrained\.model\.blocks\.(\d+)\.")
        channels = [
            _require(state, f"net.pretrained.act_postprocess{i}.3.weight", source).shape[0]
            for i in range(1, 5)
        ]
        readout = "project" if "net.pretrained.act_postprocess1.0.project.0.weight" in state else "ignore"
        name = KNOWN_VITS.get((dim, patch, grid))
        custom = dict(
            embed_dim=dim, depth=depth, num_heads=max(1, dim // 64), patch_size=patch, img_size=grid * patch
        )
        hooks = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
        image = ImageEncoderConfig(
            type="vit",
            name=name or "vit_base_patch16_384",
            pretrained=False,
            hooks=hooks,
            channels=channels,
            readout=readout,
            pos_embed_interpolation="bilinear",
            pos_embed_antialias=False,
            kwargs={} if name else custom,  # a known ViT's own settings, else its shapes on a ViT-B/16
        )
        return image, {"rules": VIT_RULES, "mean_std": ((0.5,) * 3, (0.5,) * 3)}
    if "net.pretrained.layer1.0.weight" in state:
        blocks = [_count(state, r"net\.pretrained\.layer1\.4\.(\d+)\.")] + [
            _count(state, rf"net\.pretrained\.layer{i}\.(\d+)\.") for i in (2, 3, 4)
        ]
        names = {(3, 4, 23, 3): "resnet101", (3, 4, 6, 3): "resnet50"}
        if tuple(blocks) not in names:
            raise LSegError(f"{source}: unsupported ResNet depth (blocks per stage {blocks})")
        image = ImageEncoderConfig(type="cnn", name=names[tuple(blocks)], pretrained=False)
        return image, {"rules": RESNET_RULES, "mean_std": IMAGENET_MEAN_STD}
    raise LSegError(
        f"{source}: unknown image encoder in an original LSeg checkpoint (no net.pretrained.* ViT/ResNet)"
    )


def _regularizer(
    state: dict[str, torch.Tensor], hparams: dict[str, Any], source: str
) -> tuple[str | None, int]:
    """(kind, passes) of the original `scratch.head_block`: the keys say whether there is one, the
    hyper-parameters what it is (the weights are shared by every pass, so only `block_depth` tells
    how many). `LSeg.forward` applies it `block_depth - 1` times with activation, then once without:
    `block_depth` 0 or 1 is one pass. Without hyper-parameters, the original's defaults apply
    (`--block_depth 0`); the kind then defaults to `bottleneck` (`arch_option` 1)."""
    if "net.scratch.head_block.depthwise.depthwise.weight" not in state:
        return None, 1
    arch_option = 1 if hparams.get("arch_option") is None else int(hparams["arch_option"])
    kinds = {1: "bottleneck", 2: "depthwise"}
    if arch_option not in kinds:
        raise LSegError(
            f"{source} has head_block weights but arch_option {arch_option}; the original builds them only "
            "for arch_option 1 (bottleneck) or 2 (depthwise)"
        )
    return kinds[arch_option], max(1, int(hparams.get("block_depth") or 0))


def _uses_batchnorm(state: dict[str, torch.Tensor]) -> bool:
    """Whether the fusion blocks' residual units have BatchNorm (`bn=True`: unbiased convolutions
    followed by BN) or not (biased convolutions only). Read from the keys, not from `no_batchnorm`:
    the released `LSegNet` forces `use_bn=True` whatever that flag says, while forks honour it."""
    return "net.scratch.refinenet4.resConfUnit2.bn1.weight" in state


def convert_state_dict(
    state: dict[str, torch.Tensor], hparams: dict[str, Any] | None = None, source: str = "checkpoint"
) -> tuple[LSegConfig, dict[str, torch.Tensor]]:
    """Original `net.*` state dict -> (our config, our state dict). Raises on any unmapped key."""
    hparams = hparams or {}
    image, spec = _image_config(state, source)
    features = _require(state, "net.scratch.layer1_rn.weight", source).shape[0]
    regularizer, regularizer_depth = _regularizer(state, hparams, source)
    config = LSegConfig(
        image_encoder=image,
        text_encoder=_text_config(state, source),
        features=features,
        use_bn=_uses_batchnorm(state),
        regularizer=regularizer,
        regularizer_depth=regularizer_depth,
        regularizer_activation=str(hparams.get("activation", "lrelu")),
        mean=spec["mean_std"][0],
        std=spec["mean_std"][1],
        labels=["other"],
    )
    rules = spec["rules"] + SCRATCH_RULES
    converted, unknown = {}, []
    for key, tensor in state.items():
        if any(p.match(key) for p in NEVER_USED):
            continue
        for pattern, prefix in rules:
            if match := re.match(pattern, key):
                ours = prefix.format(*(int(block) - 1 for block in match.groups())) + key[match.end() :]
                converted[ours] = tensor.float() if tensor.is_floating_point() else tensor
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise LSegError(f"{source}: {len(unknown)} keys unknown to the original LSeg schema ({shown})")
    return config, converted
