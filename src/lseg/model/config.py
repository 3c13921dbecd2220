"""Model configuration as data: dataclasses that round-trip through `config.json`, and named presets."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from timm.models import get_pretrained_cfg

from lseg.device import format_bytes, physical_memory
from lseg.errors import LSegError
from lseg.files import read_text
from lseg.model.dpt import fusion_weight_count

MAX_LOGIT_SCALE = 100.0  # CLIP's cap on the inverse temperature
# The original LSeg's input normalisation (also timm's for its JAX ViT and TF EfficientNet-Lite
# weights); not CLIP's own (0.481, 0.458, 0.408) / (0.269, 0.261, 0.276).
LSEG_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass
class ImageEncoderConfig:
    """Which timm backbone, and how its features are reassembled for the DPT decoder."""

    type: str = "vit"  # a registered image encoder type (IMAGE_ENCODERS): vit | cnn | hybrid
    name: str = "vit_large_patch16_384"
    pretrained: bool = True
    pretrained_source: str = "hub"  # hub | package: weights a pip package ships (lseg.model.packaged_weights)
    hooks: list[int] | None = None  # ViT blocks tapped for the four maps (hybrid: the last two)
    channels: list[int] | None = None  # reassembled channels per stride (ViT only)
    readout: str = "project"  # ignore | add | project: how the class token enters patch tokens
    pos_embed_interpolation: str = "bicubic"  # original LSeg checkpoints: "bilinear"
    pos_embed_antialias: bool = True  # original LSeg checkpoints: False
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class TextEncoderConfig:
    """Which frozen text encoder embeds the label words."""

    type: str = "open_clip"  # a registered text encoder type (TEXT_ENCODERS): open_clip | minilm
    model: str = "ViT-B-32"  # open_clip model name, or a custom text tower when `custom` is set
    pretrained: str | None = "openai"  # open_clip pretrained tag; None = random weights
    custom: dict[str, int] | None = None  # embed_dim + open_clip text_cfg of a random tiny tower
    prompt_templates: list[str] = field(default_factory=lambda: ["{}"])

    def to_dict(self) -> dict[str, Any]:
        """The fields this encoder type reads: a MiniLM encoder has no open_clip model, tag or tower,
        and writing open_clip's defaults for it would describe another model."""
        data = dataclasses.asdict(self)
        record = TEXT_ENCODERS.get(self.type)
        fields = {"type", *TEXT_ENCODERS.shared, *record.rules} if record else data
        return {key: value for key, value in data.items() if key in fields}


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
    text_projection: bool = False  # a learned map of the label embeddings (`TextProjection`)
    mean: tuple[float, float, float] | None = None  # None: the backbone's (`backbone_mean_std`)
    std: tuple[float, float, float] | None = None
    labels: list[str] = field(default_factory=lambda: ["other"])  # default label set for `segment`

    def __post_init__(self) -> None:
        """Take mean/std left out from the backbone, so its weights see the inputs they were trained on;
        refuse a decoder wider than this machine can hold before anything is allocated: torch's
        allocation failure would read like an image or batch too large."""
        if self.mean is None or self.std is None:
            mean, std = backbone_mean_std(getattr(self.image_encoder, "name", ""))
            self.mean = mean if self.mean is None else self.mean
            self.std = std if self.std is None else self.std
        if not isinstance(self.features, int):  # wrongly typed: `from_dict` names the field
            return
        needed, memory = 4 * fusion_weight_count(self.features), physical_memory()  # float32 weights
        if memory is not None and needed > memory:
            raise LSegError(
                f"model config features {self.features} needs {format_bytes(needed)} of float32 decoder "
                f"weights, more than this machine's {format_bytes(memory)} of memory; the model cannot be "
                "built (the presets use 256)"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LSegConfig:
        """Build from `config.json`-style data, checking every field (LSegError names the bad one)."""
        fields = _check_fields(data, cls, "", MODEL_RULES)
        for key, config_class, registry in (
            ("image_encoder", ImageEncoderConfig, IMAGE_ENCODERS),
            ("text_encoder", TextEncoderConfig, TEXT_ENCODERS),
        ):
            part = fields.get(key, {})
            fields[key] = config_class(**_check_fields(part, config_class, f"{key}.", registry.rules(part)))
        for key in ("mean", "std"):
            if key in fields:
                fields[key] = tuple(fields[key])
        return cls(**fields)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> LSegConfig:
        """The config a model was saved with (config.json, a training checkpoint's): one without
        mean/std was written before they came from the backbone and trained with LSeg's 0.5, then the
        default."""
        return cls.from_dict({"mean": LSEG_MEAN_STD[0], "std": LSEG_MEAN_STD[1], **data})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "text_encoder": self.text_encoder.to_dict()}


def backbone_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation timm's `pretrained_cfg` records for a backbone (its default weights, or those
    of a `name.tag`); LSeg's 0.5 where timm records none (an unknown name fails when the model is built)."""
    with contextlib.suppress(RuntimeError):  # a tag timm does not know
        cfg = get_pretrained_cfg(name)
        if cfg is not None and len(cfg.mean or ()) == 3 and len(cfg.std or ()) == 3:
            return tuple(cfg.mean), tuple(cfg.std)
    return LSEG_MEAN_STD


def json_type_name(value: Any) -> str:
    """How a JSON value reads in an error message: "null", "a list", "a str"."""
    return "null" if value is None else f"a {'list' if isinstance(value, list) else type(value).__name__}"


def is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rgb(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(x) for x in value)


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


Rule = tuple[Callable[[Any], bool], str]  # (valid(value), what a valid value is, for the error)


@dataclass(frozen=True)
class EncoderRecord:
    """An encoder type in one place (timm's `register_model` is the model): the builder its config's
    `type` picks, and the rules of the config fields this type reads besides the shared ones."""

    name: str
    builder: Callable[..., Any]
    rules: Mapping[str, Rule] = field(default_factory=dict)


class EncoderRegistry(dict[str, EncoderRecord]):
    """Encoder types by name; config validation, `build_*_encoder` and the docs' lists read it."""

    def __init__(self, kind: str, shared: Mapping[str, Rule]) -> None:
        super().__init__()
        self.kind, self.shared = kind, shared  # "image" / "text"; the rules of the fields all types read

    def register(self, name: str, rules: Mapping[str, Rule] | None = None) -> Callable[[type], type]:
        """Class decorator adding an encoder type `name`; `rules` check the config fields it reads
        beyond the shared ones (a text encoder's config.json holds only those and the shared)."""

        def register(builder: type) -> type:
            if name in self:
                raise ValueError(f"{self.kind} encoder type {name!r} is already registered")
            self[name] = EncoderRecord(name, builder, rules or {})
            return builder

        return register

    def record(self, name: str) -> EncoderRecord:
        if name not in self:
            raise LSegError(f"unknown {self.kind} encoder type '{name}'; valid: {', '.join(self)}")
        return self[name]

    def rules(self, data: Any) -> dict[str, Rule]:
        """The rules of an encoder config: `type` a registered one, the shared fields and every type's
        fields (a saved config lists fields its type never reads), the chosen type's own rules first."""
        kind = data.get("type") if isinstance(data, dict) else None
        chosen = self.get(kind) if isinstance(kind, str) else None
        return {
            "type": (lambda v: isinstance(v, str) and v in self, f"one of {', '.join(self)}"),
            **self.shared,
            **{key: rule for record in self.values() for key, rule in record.rules.items()},
            **(chosen.rules if chosen else {}),
        }


IMAGE_ENCODERS = EncoderRegistry(
    "image",
    {
        "name": (lambda v: isinstance(v, str) and bool(v), "a timm model name"),
        "pretrained": (lambda v: isinstance(v, bool), "true or false"),
        "pretrained_source": (lambda v: v in ("hub", "package"), "one of hub, package"),
        "kwargs": (
            lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
            "an object of timm.create_model arguments",
        ),
    },
)
TEXT_ENCODERS = EncoderRegistry(
    "text",
    {
        "prompt_templates": (
            lambda v: is_str_list(v) and bool(v) and all("{}" in t for t in v),
            "a non-empty list of strings, each with '{}' where the label goes",
        ),
    },
)
register_image_encoder = IMAGE_ENCODERS.register  # in model/image_encoder.py
register_text_encoder = TEXT_ENCODERS.register  # in model/text_encoder.py

MODEL_RULES: dict[str, Rule] = {
    "image_encoder": (lambda v: isinstance(v, dict), "an object"),
    "text_encoder": (lambda v: isinstance(v, dict), "an object"),
    "features": (lambda v: is_int(v, 1), "a positive integer"),
    "use_bn": (lambda v: isinstance(v, bool), "true or false"),
    "logit_scale": (
        lambda v: _is_number(v) and 0 < v <= MAX_LOGIT_SCALE,
        f"a number in (0, {MAX_LOGIT_SCALE:g}]",
    ),
    "learn_logit_scale": (lambda v: isinstance(v, bool), "true or false"),
    "regularizer": (lambda v: v in (None, "depthwise", "bottleneck"), "null or one of depthwise, bottleneck"),
    "regularizer_depth": (lambda v: is_int(v, 1), "a positive integer"),
    "regularizer_activation": (lambda v: v in ("relu", "lrelu", "tanh"), "one of relu, lrelu, tanh"),
    "text_projection": (lambda v: isinstance(v, bool), "true or false"),
    "mean": (_is_rgb, "3 numbers (R, G, B)"),
    "std": (lambda v: _is_rgb(v) and all(x > 0 for x in v), "3 positive numbers (R, G, B)"),
    "labels": (lambda v: is_str_list(v) and bool(v), "a non-empty list of strings"),
}


def _check_fields(data: Any, config_class: type, prefix: str, rules: dict[str, Rule]) -> dict[str, Any]:
    """`data` as keyword arguments for `config_class`, or an LSegError naming the first bad field."""
    if not isinstance(data, dict):
        where = f"{prefix.rstrip('.')} must be an object" if prefix else "it must be a JSON object"
        raise LSegError(f"invalid model config: {where}, got {json_type_name(data)}")
    unknown = set(data) - {f.name for f in dataclasses.fields(config_class)}
    if unknown:
        raise LSegError(f"unknown model config fields: {', '.join(prefix + k for k in sorted(unknown))}")
    for key, value in data.items():
        valid, expected = rules[key]
        if not valid(value):
            raise LSegError(f"invalid model config: {prefix}{key} must be {expected}, got {value!r}")
    return dict(data)


_ADDED_PRESETS: dict[str, Path] = {}  # name -> a user's config JSON, by `add_preset`


def add_preset(path: str | Path) -> list[str]:
    """Make a config JSON file (or every `*.json` in a folder) a preset named by its file stem, as
    open_clip's `add_model_config` does; each is read and checked now. The names added."""
    path = Path(path)
    found = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not found or not all(file.is_file() for file in found):
        raise LSegError(f"no preset config (*.json) at {path}")
    for file in found:
        _read_config(file)
    _ADDED_PRESETS.update({file.stem: file for file in found})
    return [file.stem for file in found]


def preset_names(added: bool = True) -> list[str]:
    """The bundled presets, and (`added`) those `add_preset` added in this process."""
    files = resources.files("lseg.model").joinpath("presets").iterdir()
    bundled = {f.name.removesuffix(".json") for f in files if f.name.endswith(".json")}
    return sorted(bundled | (set(_ADDED_PRESETS) if added else set()))


def load_preset(name: str | Path) -> LSegConfig:
    """A preset by name (bundled, or added by `add_preset`), or the config JSON file at a path ending
    in `.json` (`--preset my_config.json`, `LSeg.from_config("my_config.json")`)."""
    if str(name) in _ADDED_PRESETS:
        return _read_config(_ADDED_PRESETS[str(name)])
    if str(name).endswith(".json"):
        return _read_config(Path(name))
    path = resources.files("lseg.model").joinpath("presets", f"{name}.json")
    if not path.is_file():
        raise LSegError(f"unknown preset '{name}'; valid presets: {', '.join(preset_names())}")
    return LSegConfig.from_dict(json.loads(path.read_text()))


def _read_config(path: Path) -> LSegConfig:
    try:
        data = json.loads(read_text(path, "preset config"))
    except json.JSONDecodeError as error:
        raise LSegError(f"preset config {path} is not valid JSON: {error}") from error
    return LSegConfig.from_dict(data)
