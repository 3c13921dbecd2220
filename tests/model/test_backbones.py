"""Every image-encoder preset builds offline and feeds the DPT decoder four maps at strides 4..32."""

import copy

import pytest
import torch

from lseg import LSeg, LSegError
from lseg.model import load_preset, preset_names
from lseg.model.image_encoder import STRIDES, build_image_encoder, early_stage_parameters
from lseg.model.original import convert_state_dict

from .test_original import save_lightning, tiny_clip_state


@pytest.mark.parametrize("name", preset_names())
def test_preset_builds_without_downloads_and_has_four_strides(name):
    config = load_preset(name)
    config.image_encoder.pretrained = False
    with torch.device("meta"):  # shapes only: the big presets would take seconds to initialise
        encoder = build_image_encoder(config.image_encoder)
        images = torch.empty(2, 3, 7 * encoder.pad_multiple, 5 * encoder.pad_multiple)
        maps = encoder(images)
    assert [m.shape[1] for m in maps] == list(encoder.out_channels)
    for feature_map, stride in zip(maps, STRIDES):
        assert feature_map.shape[-2:] == (images.shape[-2] // stride, images.shape[-1] // stride)


@pytest.mark.parametrize(
    "image_encoder",
    [
        {"type": "cnn", "name": "resnet18d", "pretrained": False},
        {"type": "cnn", "name": "convnext_atto", "pretrained": False},
        {
            "type": "hybrid",
            "name": "vit_base_r50_s16_384",
            "pretrained": False,
            "hooks": [0, 1],
            "kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2},
        },
    ],
)
def test_cnn_and_hybrid_models_give_exact_output_sizes(image_encoder):
    config = {
        "image_encoder": image_encoder,
        "text_encoder": {
            "pretrained": None,
            "custom": {"embed_dim": 16, "width": 32, "heads": 2, "layers": 1},
        },
        "features": 32,
    }
    model = LSeg.from_config(config).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 45, 67), model.encode_text(["a", "b", "c"])).logits
    assert logits.shape == (2, 3, 45, 67)


def test_channels_come_from_feature_info():
    encoder = build_image_encoder(
        load_preset("resnet26d").image_encoder.__class__(type="cnn", name="resnet26d", pretrained=False)
    )
    assert encoder.out_channels == encoder.model.feature_info.channels() == [256, 512, 1024, 2048]


def test_hybrid_tokens_match_timm_patch_embedding():
    config = load_preset("vit_hybrid_b").image_encoder
    config.pretrained = False
    config.kwargs = {"depth": 2, "embed_dim": 64, "num_heads": 2}
    config.hooks = [0, 1]
    encoder = build_image_encoder(config).eval()
    images = torch.randn(1, 3, 64, 96)
    backbone = encoder.model.patch_embed.backbone
    x = backbone.stem(images)
    for stage in backbone.stages:
        x = stage(x)
    ours = encoder.model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    timm_tokens = encoder.model.patch_embed(images)
    assert torch.allclose(ours, timm_tokens.reshape(ours.shape), atol=1e-6)


def original_resnet_key(key: str) -> str:
    """torchvision/timm ResNet key -> the original LSeg layout (stem and layer1 fused into `layer1`)."""
    for prefix, target in (("conv1.", "layer1.0."), ("bn1.", "layer1.1."), ("layer1.", "layer1.4.")):
        if key.startswith(prefix):
            return target + key.removeprefix(prefix)
    return key


def original_rn101_schema() -> dict[str, torch.Tensor]:
    """Random tensors in the layout of the original ResNet-101 zero-shot checkpoints (1,036 tensors)."""
    import timm

    with torch.device("meta"):
        resnet = timm.create_model("resnet101", pretrained=False)
    state = {}
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc."):
            state[f"net.pretrained.{original_resnet_key(key)}"] = torch.zeros(value.shape, dtype=value.dtype)
    for i, channels in enumerate([256, 512, 1024, 2048], 1):
        state[f"net.scratch.layer{i}_rn.weight"] = torch.zeros(256, channels, 3, 3)
    for i in range(1, 5):
        r = f"net.scratch.refinenet{i}."
        state[r + "out_conv.weight"], state[r + "out_conv.bias"] = (
            torch.zeros(256, 256, 1, 1),
            torch.zeros(256),
        )
        for unit in ("resConfUnit1", "resConfUnit2"):
            for n in (1, 2):
                state[f"{r}{unit}.conv{n}.weight"] = torch.zeros(256, 256, 3, 3)
                for stat, shape in (
                    ("weight", 256),
                    ("bias", 256),
                    ("running_mean", 256),
                    ("running_var", 256),
                ):
                    state[f"{r}{unit}.bn{n}.{stat}"] = torch.ones(shape)
                state[f"{r}{unit}.bn{n}.num_batches_tracked"] = torch.tensor(0)
    state["net.scratch.head1.weight"], state["net.scratch.head1.bias"] = (
        torch.zeros(512, 256, 1, 1),
        torch.zeros(512),
    )
    return state


def test_original_rn101_schema_loads_strictly():
    import open_clip

    with torch.device("meta"):
        clip = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-32"))
    state = original_rn101_schema()
    state.update(
        {
            f"net.clip_pretrained.{k}": torch.zeros(v.shape)
            for k, v in clip.state_dict().items()
            if k != "attn_mask"
        }
    )
    assert len(state) == 1036
    config, converted = convert_state_dict(state, source="pascal_fold0.ckpt")
    assert config.image_encoder.type == "cnn" and config.image_encoder.name == "resnet101"
    assert config.mean == (0.485, 0.456, 0.406)
    with torch.device("meta"):
        model = LSeg(config, load_pretrained=False)
    assert set(converted) == set(model.state_dict())


def test_tiny_original_rn_checkpoint_runs(tmp_path):
    """End to end through `from_pretrained` with a small random ResNet-50-shaped original checkpoint."""
    import timm

    resnet = timm.create_model("resnet50", pretrained=False)
    state = {}
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc."):
            state[f"net.pretrained.{original_resnet_key(key)}"] = value
    features = 16
    for i, channels in enumerate([256, 512, 1024, 2048], 1):
        state[f"net.scratch.layer{i}_rn.weight"] = torch.randn(features, channels, 3, 3) * 0.01
    for i in range(1, 5):
        r = f"net.scratch.refinenet{i}."
        state[r + "out_conv.weight"], state[r + "out_conv.bias"] = (
            torch.randn(features, features, 1, 1),
            torch.zeros(features),
        )
        for unit in ("resConfUnit1", "resConfUnit2"):
            for n in (1, 2):
                state[f"{r}{unit}.conv{n}.weight"] = torch.randn(features, features, 3, 3) * 0.05
                for stat in ("weight", "running_var"):
                    state[f"{r}{unit}.bn{n}.{stat}"] = torch.ones(features)
                for stat in ("bias", "running_mean"):
                    state[f"{r}{unit}.bn{n}.{stat}"] = torch.zeros(features)
                state[f"{r}{unit}.bn{n}.num_batches_tracked"] = torch.tensor(0)
    state["net.scratch.head1.weight"], state["net.scratch.head1.bias"] = (
        torch.randn(32, features, 1, 1),
        torch.zeros(32),
    )
    state.update({f"net.clip_pretrained.{k}": v for k, v in tiny_clip_state().items()})
    model = LSeg.from_pretrained(save_lightning(state, tmp_path / "rn.ckpt")).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70), model.encode_text(["a", "b"])).logits.shape == (1, 2, 50, 70)


@pytest.mark.parametrize(
    "image_encoder",
    [
        {
            "type": "vit",
            "name": "vit_tiny_patch16_224",
            "hooks": [0, 1, 2, 3],
            "channels": [8, 8, 16, 16],
            "kwargs": {"depth": 5, "embed_dim": 32, "num_heads": 2},
        },
        {"type": "cnn", "name": "resnet18d"},
        {
            "type": "hybrid",
            "name": "vit_base_r50_s16_384",
            "hooks": [0, 1],
            "kwargs": {"depth": 3, "embed_dim": 64, "num_heads": 2},
        },
    ],
)
def test_every_trainable_parameter_gets_a_gradient(image_encoder):
    """DDP fails on parameters that never take part in the loss (e.g. a ViT's unused final norm)."""
    config = {
        "image_encoder": {**image_encoder, "pretrained": False},
        "text_encoder": {
            "pretrained": None,
            "custom": {"embed_dim": 16, "width": 32, "heads": 2, "layers": 1},
        },
        "features": 16,
        "regularizer": "bottleneck",
    }
    model = LSeg.from_config(config).train()
    model(torch.randn(2, 3, 64, 64), model.encode_text(["a", "b"])).logits.logsumexp(dim=1).mean().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


TINY_TEXT = {"pretrained": None, "custom": {"embed_dim": 16, "width": 32, "heads": 2, "layers": 1}}
TINY_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 56}
TINY_HYBRID = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("name", "kwargs", "readout"),
    [
        ("vit_small_patch14_reg4_dinov2", {}, "project"),  # 4 register tokens, DINOv2 layout
        ("vit_tiny_patch16_224", {"reg_tokens": 4}, "add"),
        ("vit_tiny_patch16_224", {"reg_tokens": 2, "class_token": False, "global_pool": "avg"}, "ignore"),
        (
            "vit_tiny_patch16_224",
            {"class_token": False, "global_pool": "avg", "no_embed_class": True},
            "ignore",
        ),
    ],
)
def test_any_timm_vit_segments_at_any_size(name, kwargs, readout, interpolation):
    config = {
        "image_encoder": {
            "type": "vit",
            "name": name,
            "pretrained": False,
            "readout": readout,
            "pos_embed_interpolation": interpolation,
            "pos_embed_antialias": interpolation == "bicubic",
            "channels": [8, 8, 16, 16],
            "kwargs": {**TINY_VIT, **kwargs},
        },
        "text_encoder": TINY_TEXT,
        "features": 16,
    }
    model = LSeg.from_config(config).eval()
    image = torch.randint(0, 255, (45, 83, 3), dtype=torch.uint8).numpy()
    result = model.segment(image, labels=["a", "b", "c"], size=90, return_scores=True)
    assert result.label_map.shape == (45, 83) and result.scores.shape == (3, 45, 83)


def test_class_token_readout_needs_a_class_token():
    config = {
        "image_encoder": {
            "type": "vit",
            "name": "vit_tiny_patch16_224",
            "pretrained": False,
            "kwargs": {**TINY_VIT, "class_token": False, "global_pool": "avg"},
        },
        "text_encoder": TINY_TEXT,
    }
    with pytest.raises(LSegError, match="readout 'project' needs a class token.*'ignore'"):
        LSeg.from_config(config)


@pytest.mark.parametrize(
    ("image_encoder", "block"),
    [
        (
            {"type": "vit", "name": "vit_tiny_patch16_224", "kwargs": TINY_VIT, "hooks": [0, 1, 2, 3]},
            "blocks.1",
        ),
        ({"type": "cnn", "name": "resnet18d"}, "layer2.0"),
        ({"type": "cnn", "name": "convnext_atto"}, "stages_1"),
        (
            {
                "type": "hybrid",
                "name": "vit_base_r50_s16_384",
                "hooks": [0, 1],
                "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
            },
            "blocks.0",
        ),
    ],
)
def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients(image_encoder, block):
    config = {
        "image_encoder": {**image_encoder, "pretrained": False},
        "text_encoder": TINY_TEXT,
        "features": 16,
    }
    model = LSeg.from_config(config).train()
    images = torch.randn(2, 3, 64, 64)
    module = model.image_encoder.model.get_submodule(block)
    calls = []
    module.register_forward_pre_hook(lambda *args: calls.append(1))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(images, model.encode_text(["a", "b"])).logits.logsumexp(dim=1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    calls.clear()
    checkpointed = gradients()
    assert len(calls) == 2  # run again in the backward pass: activations were not kept
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-5) for n in plain)


@pytest.mark.parametrize(
    ("image_encoder", "stages", "prefixes"),
    [
        (
            {"type": "vit", "name": "vit_tiny_patch16_224", "kwargs": TINY_VIT, "hooks": [0, 1, 2, 3]},
            2,
            ["cls_token", "pos_embed", "patch_embed.", "blocks.0.", "blocks.1."],
        ),
        ({"type": "cnn", "name": "resnet18d"}, 2, ["conv1.", "bn1.", "layer1.", "layer2."]),
        ({"type": "cnn", "name": "convnext_atto"}, 1, ["stem_", "stages_0."]),
        (
            {"type": "cnn", "name": "tf_efficientnet_lite0"},
            1,
            ["conv_stem.", "bn1.", "blocks.0.", "blocks.1."],
        ),
        (
            {"type": "hybrid", "name": "vit_base_r50_s16_384", "hooks": [0, 1], "kwargs": TINY_HYBRID},
            1,
            ["patch_embed.backbone.stem.", "patch_embed.backbone.stages.0."],
        ),
        (
            {"type": "hybrid", "name": "vit_base_r50_s16_384", "hooks": [0, 1], "kwargs": TINY_HYBRID},
            3,
            ["cls_token", "pos_embed", "patch_embed.", "blocks.0."],
        ),
    ],
)
def test_early_stages_are_the_backbone_parameters_their_maps_depend_on(image_encoder, stages, prefixes):
    """`frozen_stages` freezes exactly these: the stem and embeddings, then stage by stage (a hybrid's
    position embedding only from its first ViT map), and never a DPT reassembly layer."""
    config = {
        "image_encoder": {**image_encoder, "pretrained": False},
        "text_encoder": TINY_TEXT,
        "features": 16,
    }
    encoder = LSeg.from_config(config).train().image_encoder
    statistics = [b.clone() for b in encoder.buffers()]
    names = {id(p): n for n, p in encoder.model.named_parameters()}
    early = {names[id(p)] for p in early_stage_parameters(encoder, stages)}
    assert early == {n for n in names.values() if n.startswith(tuple(prefixes))}
    assert all(torch.equal(a, b) for a, b in zip(statistics, encoder.buffers()))  # BatchNorm untouched
    assert all(module.training for module in encoder.modules())
    assert early_stage_parameters(encoder, 0) == []
    assert len(early_stage_parameters(encoder, 4)) == len(names)


@pytest.mark.parametrize("stages", [-1, 5])
def test_frozen_stages_outside_the_four_maps_is_a_clear_error(tiny_model, stages):
    with pytest.raises(LSegError, match=f"frozen_stages must be 0 to 4 .*got {stages}"):
        early_stage_parameters(tiny_model.image_encoder, stages)


def test_early_stages_are_found_on_the_parameters_device(tiny_model):
    """The probe image follows the weights: on `meta` (a GPU in a CPU-only suite) the same set."""
    names = {id(p): n for n, p in tiny_model.image_encoder.model.named_parameters()}
    expected = [names[id(p)] for p in early_stage_parameters(tiny_model.image_encoder, 2)]
    encoder = copy.deepcopy(tiny_model.image_encoder).to("meta")
    meta_names = {id(p): n for n, p in encoder.model.named_parameters()}
    assert [meta_names[id(p)] for p in early_stage_parameters(encoder, 2)] == expected
