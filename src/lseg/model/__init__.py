"""LSeg model: image encoders (timm), DPT decoder, LSeg head, frozen text encoders."""

from lseg.model.config import (
    ImageEncoderConfig,
    LSegConfig,
    TextEncoderConfig,
    add_preset,
    load_preset,
    preset_names,
    register_image_encoder,
    register_text_encoder,
)
from lseg.model.lseg import LSeg, LSegOutput, SegmentationResult

__all__ = [
    "ImageEncoderConfig",
    "LSeg",
    "LSegConfig",
    "LSegOutput",
    "SegmentationResult",
    "TextEncoderConfig",
    "add_preset",
    "load_preset",
    "preset_names",
    "register_image_encoder",
    "register_text_encoder",
]
