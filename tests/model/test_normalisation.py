"""mean/std: a new config without them takes its timm backbone's (`pretrained_cfg`) and saves them; a
saved config keeps what it trained with, LSeg's 0.5 for files written before mean/std were saved."""

import json

import pytest
import torch
import yaml

from lseg import LSeg
from lseg.model import LSegConfig, load_preset, preset_names
from lseg.model.config import LSEG_MEAN_STD, backbone_mean_std
from tests.conftest import REPO_ROOT

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def cnn_config(**fields) -> dict:
    """The tiny preset (random, offline) with a small timm CNN whose ImageNet statistics are not CLIP's."""
    config = {k: v for k, v in load_preset("tiny").to_dict().items() if k not in ("mean", "std")}
    return {**config, "image_encoder": {"type": "cnn", "name": "resnet10t", "pretrained": False}, **fields}


def stats(config: LSegConfig) -> tuple:
    return tuple(config.mean), tuple(config.std)


def test_a_new_config_takes_the_backbones_statistics_from_timm():
    assert stats(LSegConfig.from_dict(cnn_config())) == IMAGENET
    assert (
        backbone_mean_std("resnet18d") == IMAGENET
        and backbone_mean_std("vit_base_patch16_384") == LSEG_MEAN_STD
    )
    assert backbone_mean_std("vit_base_patch16_clip_224.openai") == OPENAI_CLIP  # a tag's own weights
    # timm knows no statistics: CLIP's (an unknown name or tag fails when the model is built)
    assert backbone_mean_std("no_such_backbone") == LSEG_MEAN_STD == backbone_mean_std("resnet18d.no_tag")
    assert stats(LSegConfig()) == LSEG_MEAN_STD  # vit_large_patch16_384's are 0.5 too


def test_statistics_the_config_states_win():
    assert stats(LSegConfig.from_dict(cnn_config(mean=[0.5] * 3, std=[0.5] * 3))) == LSEG_MEAN_STD
    only_std = LSegConfig.from_dict(cnn_config(std=[0.25] * 3))
    assert stats(only_std) == (IMAGENET[0], (0.25,) * 3)


def test_the_backbones_statistics_are_saved_and_a_saved_config_loads_unchanged(tmp_path):
    model = LSeg.from_config(cnn_config(), pretrained=False)
    assert (model.processor.mean, model.processor.std) == IMAGENET
    folder = model.save_pretrained(tmp_path / "model")
    saved = json.loads((folder / "config.json").read_text())
    assert (saved["mean"], saved["std"]) == tuple(map(list, IMAGENET))
    assert LSeg.from_pretrained(folder).config == model.config
    clip = LSeg.from_config(cnn_config(mean=[0.5] * 3, std=[0.5] * 3), pretrained=False)
    assert stats(LSeg.from_pretrained(clip.save_pretrained(tmp_path / "clip")).config) == LSEG_MEAN_STD


def test_an_old_config_json_without_statistics_loads_with_clips_it_trained_with(tmp_path):
    model = LSeg.from_config(cnn_config(mean=[0.5] * 3, std=[0.5] * 3), pretrained=False)
    folder = model.save_pretrained(tmp_path / "old")
    saved = json.loads((folder / "config.json").read_text())
    del saved["mean"], saved["std"]
    (folder / "config.json").write_text(json.dumps(saved))
    loaded = LSeg.from_pretrained(folder)
    assert (
        stats(loaded.config) == LSEG_MEAN_STD and loaded.processor.pad_value().flatten().tolist() == [-1] * 3
    )
    # the same content as a new config (a preset file) takes the backbone's
    assert (
        stats(
            LSegConfig.from_dict(
                {k: v for k, v in saved.items() if k not in ("architecture", "format_version")}
            )
        )
        == IMAGENET
    )


def test_an_old_training_checkpoint_without_statistics_loads_with_clips(tmp_path):
    model = LSeg.from_config(cnn_config(mean=[0.5] * 3, std=[0.5] * 3), pretrained=False)
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("mean", "std")}
    path = tmp_path / "old.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": config}}, path)
    assert stats(LSeg.from_pretrained(path).config) == LSEG_MEAN_STD


@pytest.mark.parametrize("name", preset_names(added=False))
def test_the_bundled_presets_keep_their_statistics(name):
    """backbones.md's table: 0.5 for the ViTs and tiny (timm's too), ImageNet's for the CNNs (stated)."""
    expected = IMAGENET if name in ("rn101", "resnet26d", "convnext_tiny") else LSEG_MEAN_STD
    assert stats(load_preset(name)) == expected


def recipe_models() -> dict[str, str | dict]:
    """`model.model` of every recipe that names one (the others override training options only)."""
    found = {}
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")) + sorted(
        (REPO_ROOT / "benchmarks" / "camvid_ablation").glob("*.yaml")
    ):
        model = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("model")
        if model is not None:
            found[f"{path.parent.name}/{path.stem}"] = model
    return found


@pytest.mark.parametrize(("recipe", "model"), recipe_models().items())
def test_every_recipe_trains_with_the_statistics_it_trained_with(recipe, model):
    """The recipes trained with LSeg's 0.5 before mean/std came from the backbone (the CamVid model's
    EfficientNet-Lite0 has them from timm too, the quickstart's ResNet-18d would take ImageNet's):
    those with a model config of their own state them, so their training is unchanged."""
    config = load_preset(model) if isinstance(model, str) else LSegConfig.from_dict(model)
    assert stats(config) == LSEG_MEAN_STD
    assert isinstance(model, str) or ("mean" in model and "std" in model)
