import pytest
import torch

from lseg import LSeg, LSegError
from lseg.model.original import convert_state_dict

from .original_reference import original_forward, original_vit_schema

TINY_CLIP = {"embed_dim": 32, "width": 64, "layers": 2}


def tiny_clip_state() -> dict[str, torch.Tensor]:
    """Key names and shapes of an OpenAI CLIP text tower (+ unused visual/logit_scale), scaled down."""
    from open_clip.model import _build_text_tower

    tower = _build_text_tower(32, {"width": 64, "heads": 1, "layers": 2}, quick_gelu=True)
    state = dict(tower.state_dict())
    state["visual.conv1.weight"] = torch.zeros(8, 3, 32, 32)
    state["logit_scale"] = torch.tensor(4.6)
    return state


def tiny_original(head_block: bool = False, use_bn: bool = True) -> dict[str, torch.Tensor]:
    return original_vit_schema(
        dim=64,
        depth=4,
        patch=16,
        grid=4,
        channels=[8, 16, 32, 32],
        features=16,
        embed_dim=32,
        clip_state=tiny_clip_state(),
        head_block=head_block,
        use_bn=use_bn,
    )


def save_lightning(state, path, hparams=None):
    import argparse

    torch.save(
        {"state_dict": state, "hyper_parameters": argparse.Namespace(**(hparams or {})), "epoch": 200}, path
    )
    return path


def assert_logits_match(tmp_path, state, hparams, arch_option=0, block_depth=0):
    model = LSeg.from_pretrained(save_lightning(state, tmp_path / "orig.ckpt", hparams)).eval()
    assert model.config.image_encoder.pos_embed_interpolation == "bilinear"
    images = torch.randn(2, 3, 64, 96)  # grid 4x6 from a 4x4 position embedding
    text = torch.randn(3, 32)
    expected = original_forward(
        state, images, text, depth=4, heads=1, patch=16, arch_option=arch_option, block_depth=block_depth
    )
    with torch.no_grad():
        ours = model(images, text).logits
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()


def test_logits_match_the_original_network(tmp_path):
    assert_logits_match(tmp_path, tiny_original(), {})


@pytest.mark.parametrize(
    ("arch_option", "block_depth"),
    [(1, 2), (2, 3), (1, 0), (2, 0), (1, 1)],  # depth 0 and 1: one pass, the last without activation
)
def test_head_block_passes_follow_the_original(tmp_path, arch_option, block_depth):
    hparams = {"arch_option": arch_option, "block_depth": block_depth, "activation": "lrelu"}
    assert_logits_match(tmp_path, tiny_original(head_block=True), hparams, arch_option, block_depth)


def test_no_batchnorm_checkpoint_loads_and_matches(tmp_path):
    """`--no-batchnorm` in a fork that honours it: biased convolutions and no BN keys in the fusion."""
    state = tiny_original(use_bn=False)
    assert not any(".bn1." in key for key in state)
    assert_logits_match(tmp_path, state, {"no_batchnorm": True})


def test_batchnorm_keys_win_over_the_no_batchnorm_flag(tmp_path):
    """The released LSegNet builds BN even when trained with `--no-batchnorm`: the keys decide."""
    assert_logits_match(tmp_path, tiny_original(use_bn=True), {"no_batchnorm": True})


def test_head_block_contradicting_arch_option_is_refused(tmp_path):
    path = save_lightning(tiny_original(head_block=True), tmp_path / "orig.ckpt", {"arch_option": 0})
    with pytest.raises(LSegError, match="head_block weights but arch_option 0"):
        LSeg.from_pretrained(path)


def test_fp16_original_weights_load(tmp_path):
    state = {k: v.half() if v.is_floating_point() else v for k, v in tiny_original().items()}
    model = LSeg.from_pretrained(save_lightning(state, tmp_path / "half.ckpt"))
    assert next(model.parameters()).dtype == torch.float32


def test_text_tower_weights_come_from_the_checkpoint(tmp_path):
    state = tiny_original()
    model = LSeg.from_pretrained(save_lightning(state, tmp_path / "orig.ckpt"))
    assert torch.equal(
        model.text_encoder.model.token_embedding.weight, state["net.clip_pretrained.token_embedding.weight"]
    )


def test_full_vit_l16_schema_loads_strictly():
    """The released demo_e200.ckpt layout: 730 tensors (ViT-L/16 + CLIP ViT-B/32), all mapped or unused."""
    import open_clip

    with torch.device("meta"):
        clip = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-32"))
    clip_state = {k: torch.empty(v.shape) for k, v in clip.state_dict().items() if k != "attn_mask"}
    assert len(clip_state) == 302
    state = original_vit_schema(1024, 24, 16, 24, [256, 512, 1024, 1024], 256, 512, clip_state)
    assert len(state) == 730
    config, converted = convert_state_dict(state, source="demo_e200.ckpt")
    assert config.image_encoder.name == "vit_large_patch16_384"
    assert config.image_encoder.hooks == [5, 11, 17, 23]
    assert config.text_encoder.model == "ViT-B-32" and config.text_encoder.pretrained == "openai"
    with torch.device("meta"):
        model = LSeg(config, load_pretrained=False)
    expected = set(model.state_dict())
    assert set(converted) == expected


def test_unknown_and_partial_checkpoints_name_what_differs(tmp_path):
    state = tiny_original()
    state["net.scratch.extra_layer.weight"] = torch.zeros(1)
    with pytest.raises(LSegError, match="1 keys unknown.*net.scratch.extra_layer.weight"):
        LSeg.from_pretrained(save_lightning(state, tmp_path / "extra.ckpt"))
    state = tiny_original()
    del state["net.scratch.refinenet2.out_conv.weight"]
    with pytest.raises(LSegError, match=r"missing \(decoder.fusion.1.out_conv.weight"):
        LSeg.from_pretrained(save_lightning(state, tmp_path / "partial.ckpt"))
    state = tiny_original()
    del state["net.scratch.layer1_rn.weight"]
    with pytest.raises(LSegError, match="'net.scratch.layer1_rn.weight' is missing"):
        LSeg.from_pretrained(save_lightning(state, tmp_path / "nolayer.ckpt"))
