"""The encoder registries: one record per image / text encoder type, read by config validation, the
builders and docs/architecture.md."""

import re

import pytest
import torch

from lseg.errors import LSegError
from lseg.model import LSegConfig, TextEncoderConfig, register_image_encoder
from lseg.model.config import IMAGE_ENCODERS, TEXT_ENCODERS
from lseg.model.image_encoder import CNNEncoder, HybridViTEncoder, ViTEncoder
from tests.conftest import REPO_ROOT

ARCHITECTURE = (REPO_ROOT / "docs" / "architecture.md").read_text()


def test_the_builtin_types_are_registered_with_their_builders():
    assert {name: record.builder for name, record in IMAGE_ENCODERS.items()} == {
        "vit": ViTEncoder,
        "cnn": CNNEncoder,
        "hybrid": HybridViTEncoder,
    }
    assert list(TEXT_ENCODERS) == ["open_clip", "minilm"]
    assert set(IMAGE_ENCODERS["vit"].rules) == {
        "hooks", "channels", "readout", "pos_embed_interpolation", "pos_embed_antialias",
    }  # fmt: skip
    assert not IMAGE_ENCODERS["cnn"].rules and not TEXT_ENCODERS["minilm"].rules


def test_the_docs_list_every_registered_type():
    image = re.search(r"Registered image encoder types: (.*?) \(", ARCHITECTURE, re.S).group(1)
    text = re.search(r"text encoder\s+types: (.*?) \(", ARCHITECTURE, re.S).group(1)
    assert re.findall(r"`(\w+)`", image) == list(IMAGE_ENCODERS)
    assert re.findall(r"`(\w+)`", text) == list(TEXT_ENCODERS)
    backbones = (REPO_ROOT / "docs" / "backbones.md").read_text()
    assert all(f"| `{name}` |" in backbones for name in IMAGE_ENCODERS)


def test_validation_reads_the_registry():
    with pytest.raises(LSegError, match=r"image_encoder.type must be one of vit, cnn, hybrid, got 'rnn'"):
        LSegConfig.from_dict({"image_encoder": {"type": "rnn"}})
    with pytest.raises(LSegError, match=r"text_encoder.type must be one of open_clip, minilm, got \['x'\]"):
        LSegConfig.from_dict({"text_encoder": {"type": ["x"]}})
    # a field its type does not read is still checked (saved configs list every image encoder field)
    with pytest.raises(LSegError, match="image_encoder.readout must be one of"):
        LSegConfig.from_dict({"image_encoder": {"type": "cnn", "name": "resnet18d", "readout": "sum"}})
    assert TextEncoderConfig(type="minilm").to_dict() == {"type": "minilm", "prompt_templates": ["{}"]}


def test_a_type_is_registered_once():
    with pytest.raises(ValueError, match="image encoder type 'cnn' is already registered"):
        register_image_encoder("cnn")(CNNEncoder)


@pytest.fixture
def documented_encoder():
    """docs/architecture.md's worked example, executed as written; the registry restored after."""
    example = re.search(r"<!-- example:register-image-encoder -->\n```python\n(.*?)```", ARCHITECTURE, re.S)
    namespace: dict = {}
    try:
        exec(compile(example.group(1), "docs/architecture.md", "exec"), namespace)
        yield namespace
    finally:
        IMAGE_ENCODERS.pop("frozen_cnn", None)


def test_the_documented_encoder_type_builds_a_model(documented_encoder):
    model = documented_encoder["model"]
    assert isinstance(model.image_encoder, documented_encoder["FrozenCNNEncoder"])
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert LSegConfig.from_dict(model.config.to_dict()).image_encoder.type == "frozen_cnn"
    with pytest.raises(LSegError, match="one of vit, cnn, hybrid, frozen_cnn"):
        LSegConfig.from_dict({"image_encoder": {"type": "frozen"}})
    assert model.segment(torch.zeros(3, 40, 56, dtype=torch.uint8), ["a", "b"]).label_map.shape == (40, 56)
