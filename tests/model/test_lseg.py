import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lseg import LSeg, LSegError
from lseg.model.head import MAX_LOGIT_SCALE, LSegHead


def test_logits_are_scaled_cosines_over_the_channel_axis(tiny_model):
    """Regression for the reimplementation's bug: pixel embeddings normalised along the width axis."""
    images = torch.randn(2, 3, 64, 96)
    labels = ["cat", "dog", "other"]
    pixels = tiny_model.pixel_embeddings(images)  # B x D x H/2 x W/2
    assert torch.allclose(pixels.norm(dim=1), torch.ones(2, 32, 48), atol=1e-5)
    assert not torch.allclose(pixels.norm(dim=3), torch.ones(2, 32, 32), atol=1e-2)
    text = tiny_model.encode_text(labels)
    expected = (1 / 0.07) * torch.einsum("bdhw,nd->bnhw", pixels, text)
    expected = F.interpolate(expected, scale_factor=2, mode="bilinear", align_corners=True)
    assert torch.allclose(tiny_model(images, text).logits, expected, atol=1e-4)


def test_logit_scale_is_inverse_temperature_not_exp():
    """Regression: exp(0.07) ~ 1.07 made logits too flat to train."""
    head = LSegHead(features=8, embed_dim=4)
    assert head.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    decoded = torch.randn(1, 8, 4, 4)
    text = head.embed(decoded)[0, :, 0, 0][None]  # the first pixel's own embedding
    logits = head(head.embed(decoded), text)
    assert logits[0, 0, 0, 0].item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_learnable_logit_scale_is_capped():
    head = LSegHead(features=8, embed_dim=4, learn_logit_scale=True)
    with torch.no_grad():
        head.log_logit_scale.fill_(math.log(1000.0))
    assert head.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    with pytest.raises(ValueError):
        LSegHead(features=8, embed_dim=4, logit_scale=150.0)


def test_label_order_equivariance(tiny_model):
    images = torch.randn(1, 3, 48, 48)
    labels = ["sky", "road", "tree", "car"]
    permutation = [2, 0, 3, 1]
    logits = tiny_model(images, tiny_model.encode_text(labels)).logits
    permuted = tiny_model(images, tiny_model.encode_text([labels[i] for i in permutation])).logits
    assert torch.allclose(permuted, logits[:, permutation], atol=1e-5)


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (17, 129), (1, 1)])
def test_any_input_size_gives_exact_output_size(tiny_model, size):
    output = tiny_model(torch.randn(3, 3, *size), tiny_model.encode_text(["a", "b"]))
    assert output.logits.shape == (3, 2, *size)
    assert output.pixel_embeds.shape == (3, 32, (size[0] + 1) // 2, (size[1] + 1) // 2)
    assert tiny_model.pixel_embeddings(torch.randn(1, 3, *size)).shape[-2:] == (
        (size[0] + 1) // 2,
        (size[1] + 1) // 2,
    )


def test_batch_items_are_independent(tiny_model):
    images = torch.randn(2, 3, 32, 48)
    text = tiny_model.encode_text(["a", "b"])
    batched = tiny_model(images, text).logits
    single = tiny_model(images[1:], text).logits
    assert torch.allclose(batched[1:], single, atol=1e-5)


def test_gradients_reach_image_encoder_never_text_encoder():
    model = LSeg.from_config("tiny").train()
    logits = model(torch.randn(2, 3, 32, 32), model.encode_text(["a", "b", "c"])).logits
    F.cross_entropy(logits, torch.randint(0, 3, (2, 32, 32))).backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert model.image_encoder.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.head.project.weight.grad.abs().sum() > 0
    assert not model.text_encoder.training  # frozen encoder stays in eval mode


def test_regularizer_blocks_keep_shape_and_share_weights():
    cfg = {"regularizer": "bottleneck", "regularizer_depth": 3}
    model = LSeg.from_config({**_tiny_dict(), **cfg})
    assert model(torch.randn(1, 3, 33, 41), model.encode_text(["a", "b", "c"])).logits.shape == (1, 3, 33, 41)
    assert sum(p.numel() for p in model.head.regularizer.parameters()) == 10  # one 3x3 conv + bias


@pytest.mark.parametrize("regularizer", [None, "bottleneck"])
def test_training_logits_from_the_decoder_map_equal_the_embedding_path(regularizer):
    """`classify_decoded` folds the projection into the text side; it must give forward's logits."""
    torch.manual_seed(0)
    model = LSeg.from_config({**_tiny_dict(), "regularizer": regularizer})
    with torch.no_grad():  # a projection bias and an off-centre decoder map exercise every term
        model.head.project.bias.normal_()
    images = torch.randn(2, 3, 45, 62)  # odd sizes: the stride-2 grid is cropped to 23 x 31
    text = model.encode_text(["cat", "dog", "other", "sky"])
    output = model(images, text)
    logits, cosines = model.classify_decoded(model.decoded_features(images), text, images.shape[-2:])
    torch.testing.assert_close(logits, output.logits, atol=1e-4, rtol=1e-4)
    expected = torch.einsum("bdhw,nd->bnhw", output.pixel_embeds, output.label_embeds)
    torch.testing.assert_close(cosines, expected, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cosines = model.classify_decoded(model.decoded_features(images), text, images.shape[-2:])[1]
    assert cosines.dtype == torch.float32 and (cosines - expected).abs().max() < 0.05


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(LSegError, match="valid presets: .*tiny"):
        LSeg.from_config("nope")


def test_unknown_backbone_is_a_clear_error():
    cfg = _tiny_dict()
    cfg["image_encoder"] = {**cfg["image_encoder"], "name": "vit_does_not_exist"}
    with pytest.raises(LSegError, match="unknown timm backbone 'vit_does_not_exist'"):
        LSeg.from_config(cfg)


def test_random_presets_build_without_downloads():
    model = LSeg.from_config("vit_b16", pretrained=False)
    assert model.text_encoder.embed_dim == 512
    assert model.image_encoder.hooks == [2, 5, 8, 11]
    assert model.image_encoder.out_channels == [96, 192, 384, 768]


def _tiny_dict() -> dict:
    import json
    from importlib import resources

    return json.loads(resources.files("lseg.model").joinpath("presets", "tiny.json").read_text())


def test_segment_batches_same_size_images_with_identical_results(tiny_model):
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = [(30, 40, 3), (30, 40, 3), (25, 33, 3)]
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in shapes]
    one_by_one = tiny_model.segment(images, labels=["a", "b", "c"], return_scores=True)
    batched = tiny_model.segment(images, labels=["a", "b", "c"], batch_size=3, return_scores=True)
    assert [r.label_map.shape for r in batched] == [(30, 40), (30, 40), (25, 33)]
    for a, b in zip(one_by_one, batched):
        assert np.allclose(a.scores, b.scores, atol=1e-5)
        assert abs(sum(b.shares().values()) - 1) < 1e-6


def test_bfloat16_model_segments_like_float32():
    import numpy as np

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    model = LSeg.from_config("tiny").eval()
    labels = ["a", "b", "c"]
    expected = model.segment(image, labels=labels).label_map
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    batch = model.processor.preprocess(image, device=model.device, dtype=model.dtype)
    assert batch.pixel_values.dtype == torch.bfloat16
    assert model.encode_text(labels).dtype == torch.bfloat16
    result = model.segment(image, labels=labels, return_scores=True)
    assert result.label_map.shape == (40, 56) and result.scores.dtype == np.float32
    assert (result.label_map == expected).mean() > 0.9
    assert model.encode_image(image).shape == (32, 20, 28)


def test_labels_may_be_a_comma_separated_string(tiny_model):
    import numpy as np

    image = np.zeros((20, 24, 3), dtype=np.uint8)
    result = tiny_model.segment(image, labels="cat, dog ,grass", return_scores=True)
    assert result.labels == ["cat", "dog", "grass"] and result.scores.shape == (3, 20, 24)
    assert torch.equal(tiny_model.encode_text("cat,dog"), tiny_model.encode_text(["cat", "dog"]))


def test_segment_turns_a_photo_upright_by_its_exif_tag(tiny_model, tmp_path):
    """A user's photo is segmented as it is shown (datasets, whose masks match the stored pixels, are not)."""
    import numpy as np
    from PIL import Image, ImageOps

    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 24 x 40 stored, 40 x 24 shown
    stored.save(tmp_path / "photo.png", exif=exif)
    upright = np.array(ImageOps.exif_transpose(Image.open(tmp_path / "photo.png")))
    assert upright.shape == (40, 24, 3)
    from_file = tiny_model.segment(tmp_path / "photo.png", labels=["a", "b", "c"])
    assert np.array_equal(from_file.label_map, tiny_model.segment(upright, labels=["a", "b", "c"]).label_map)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["cat", 3], "labels must be strings; got 3"),
        (["cat", None], "labels must be strings; got None"),
        (7, "labels must be a comma-separated string or a list of strings, got 7"),
        ("cat, Cat", "duplicate labels: cat / Cat"),
    ],
)
def test_bad_labels_for_segment_are_clear_errors(tiny_model, labels, message):
    import numpy as np

    with pytest.raises(LSegError, match=message):
        tiny_model.segment(np.zeros((8, 8, 3), dtype=np.uint8), labels=labels)


# --------------------------------------------------------------------------- outputs agree
def random_image(height: int, width: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [(37, 53), (61, 29)])
def test_encode_image_features_give_segments_label_map(tiny_model, size):
    """Sizes off the stride: features and logits must come from the same (cropped) map."""
    labels = ["sky", "road", "car", "tree"]
    image = random_image(*size)
    result = tiny_model.segment(image, labels=labels)
    features = tiny_model.encode_image(image)
    upsampled = F.interpolate(features[None], size=size, mode="bilinear", align_corners=True)[0]
    similarity = torch.einsum("dhw,nd->nhw", upsampled, tiny_model.encode_text(labels))
    assert (similarity.argmax(0).numpy() == result.label_map).all()


@pytest.mark.parametrize("size", [(37, 53), (64, 96)])
def test_logits_are_the_upsampled_pixel_embeddings_against_the_labels(tiny_model, size):
    output = tiny_model(torch.randn(2, 3, *size), tiny_model.encode_text(["a", "b", "c"]))
    upsampled = F.interpolate(output.pixel_embeds, size=size, mode="bilinear", align_corners=True)
    expected = tiny_model.head.logit_scale * torch.einsum("bdhw,nd->bnhw", upsampled, output.label_embeds)
    torch.testing.assert_close(output.logits, expected, atol=1e-4, rtol=1e-4)


def test_the_model_pads_to_its_stride_with_black_for_its_own_statistics():
    """An ImageNet-normalised model: padding by hand with black changes nothing; mean grey would."""
    from lseg.processing import pad_image

    config = {**_tiny_dict(), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    model = LSeg.from_config(config).eval()
    text = model.encode_text(["a", "b"])
    images = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        own = model(images, text).pixel_embeds
        black = model(pad_image(images, (64, 64), model.processor.pad_value()), text).pixel_embeds
        grey = model(pad_image(images, (64, 64), 0.0), text).pixel_embeds
    torch.testing.assert_close(own, black[..., :19, :27])
    assert not torch.allclose(own, grey[..., :19, :27], atol=1e-3)


def test_forward_takes_tensors_only_and_exports(tiny_model):
    from lseg import LSegOutput

    images, text = torch.randn(1, 3, 37, 53), tiny_model.encode_text(["a", "b"])
    with pytest.raises(LSegError, match="encode_text"):
        tiny_model(images, ["a", "b"])
    exported = torch.export.export(tiny_model, (images, text))
    output = exported.module()(images, text)
    assert isinstance(output, LSegOutput)
    torch.testing.assert_close(output.logits, tiny_model(images, text).logits)


def test_release_text_encoder_segments_as_before_and_refuses_other_labels(tmp_path):
    model = LSeg.from_config("tiny").eval()
    images = [torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8) for _ in range(2)]
    labels = ["cat", "dog", "other"]
    before = [r.label_map for r in model.segment(images, labels)]
    model.text_encoder.clear_cache()
    model.release_text_encoder(labels)
    assert {p.device.type for p in model.text_encoder.parameters()} == {"meta"}
    assert all((r.label_map == b).all() for r, b in zip(model.segment(images, labels), before))
    with pytest.raises(LSegError, match="released"):
        model.segment(images[0], ["cat", "tree"])
    with pytest.raises(LSegError, match="cannot save a model whose text encoder was released"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("protocol", ["lseg-ms", "openscene"])
def test_multi_pass_protocols_keep_the_models_confidence(tiny_model, monkeypatch, protocol):
    """Regression: the passes' logits were summed before the softmax, dividing the model's temperature
    by their number (lseg-ms: 12; mean top-1 probability 1.000 against 0.616 single). A model whose
    every pass gives the same logits must give the single pass's scores under any protocol."""
    embedding = F.normalize(torch.randn(1, tiny_model.text_encoder.embed_dim, 1, 1), dim=1)

    def same_everywhere(pixel_values):
        height, width = pixel_values.shape[-2:]
        return embedding.expand(len(pixel_values), -1, (height + 1) // 2, (width + 1) // 2)

    monkeypatch.setattr(tiny_model, "pixel_embeddings", same_everywhere)
    labels, image = ["sky", "road", "car"], random_image(40, 52)
    single = tiny_model.segment(image, labels, size=48, return_scores=True, return_confidence=True)
    other = tiny_model.segment(image, labels, size=48, protocol=protocol, return_scores=True)
    confident = tiny_model.segment(image, labels, size=48, protocol=protocol, return_confidence=True)
    assert 0.34 < single.confidence.mean() < 0.99
    np.testing.assert_allclose(other.scores, single.scores, atol=1e-5)
    np.testing.assert_allclose(confident.confidence, single.confidence, atol=1e-5)


def test_text_projection_starts_as_the_plain_model_and_every_text_user_sees_its_map(tmp_path):
    """`text_projection` maps label embeddings into the pixel space: at initialisation the model's
    logits are the plain model's; once learned, `encode_text` (what segment, features and export use)
    gives normalize(t + W t), and save / load keeps W."""
    torch.manual_seed(0)
    plain = LSeg.from_config("tiny").eval()
    projected = LSeg.from_config({**plain.config.to_dict(), "text_projection": True}).eval()
    projected.load_state_dict(plain.state_dict(), strict=False)
    images, labels = torch.randn(1, 3, 40, 56), ["cat", "dog", "other"]
    torch.testing.assert_close(projected.encode_text(labels), plain.encode_text(labels))
    with torch.no_grad():
        projected.text_projection.linear.weight.normal_(0, 0.3)
    raw = plain.encode_text(labels)
    expected = F.normalize(raw + raw @ projected.text_projection.linear.weight.T, dim=-1)
    torch.testing.assert_close(projected.encode_text(labels), expected)
    assert not torch.allclose(projected.encode_text(labels), raw, atol=1e-2)
    segmented = projected.segment(torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8), labels)
    assert segmented.label_map.shape == (40, 56)
    logits = projected(images, projected.encode_text(labels)).logits
    loaded = LSeg.from_pretrained(projected.save_pretrained(tmp_path / "model")).eval()
    torch.testing.assert_close(loaded(images, loaded.encode_text(labels)).logits, logits)
    projected.text_encoder.clear_cache()
    torch.testing.assert_close(projected.release_text_encoder(labels), expected)
