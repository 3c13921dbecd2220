"""Model configuration as data: dataclasses that round-trip through `config.json`, and named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from lseg.errors import LSegError

CLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass
class ImageEncoderConfig:
    """Which timm backbone, and how its features are reassembled for the DPT decoder."""

    type: str = "vit"  # vit | cnn | hybrid
    name: str = "vit_large_patch16_384"
    pretrained: bool = True
    hooks: list[int] | None = None  # ViT blocks tapped for the four maps (hybrid: the last two)
    channels: list[int] | None = None  # reassembled channels per stride (ViT only)
    readout: str = "project"  # ignore | add | project: how the class token enters patch tokens
    pos_embed_interpolation: str = "bicubic"  # original LSeg checkpoints: "bilinear"
    pos_embed_antialias: bool = True  # original LSeg checkpoints: False
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class TextEncoderConfig:
    """Which frozen text encoder embeds the label words."""

    type: str = "open_clip"  # open_clip | minilm
    model: str = "ViT-B-32"  # open_clip model name, or a custom text tower when `custom` is set
    pretrained: str | None = "openai"  # open_clip pretrained tag; None = random weights
    custom: dict[str, int] | None = None  # embed_dim + open_clip text_cfg of a random tiny tower
    prompt_templates: list[str] = field(default_factory=lambda: ["{}"])


@dataclass
class LSegConfig:
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    features: int = 256  # DPT decoder width
    use_bn: bool = True  # BatchNorm in the fusion blocks' residual units
    logit_scale: float = 1 / 0.07  # CLIP's temperature; capped at MAX_LOGIT_SCALE
    learn_logit_scale: bool = False
    regularizer: str | None = None  # None | depthwise | bottleneck: spatial blocks after the logits
    regularizer_depth: int = 2
    regularizer_activation: str = "lrelu"  # relu | lrelu | tanh
    mean: tuple[float, float, float] = CLIP_MEAN_STD[0]
    std: tuple[float, float, float] = CLIP_MEAN_STD[1]
    labels: list[str] = field(default_factory=lambda: ["other"])  # default label set for `segment`

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LSegConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LSegError(f"unknown model config fields: {', '.join(sorted(unknown))}")
        try:
            image = ImageEncoderConfig(**data.pop("image_encoder", {}))
            text = TextEncoderConfig(**data.pop("text_encoder", {}))
        except TypeError as error:
            raise LSegError(f"invalid model config: {error}") from error
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(image_encoder=image, text_encoder=text, **data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    files = resources.files("lseg.model").joinpath("presets").iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def load_preset(name: str) -> LSegConfig:
    path = resources.files("lseg.model").joinpath("presets", f"{name}.json")
    if not path.is_file():
        raise LSegError(f"unknown preset '{name}'; valid presets: {', '.join(preset_names())}")
    return LSegConfig.from_dict(json.loads(path.read_text()))
