"""One ignore label id for datasets, augmentation padding, batching, training and evaluation."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import lseg
from lseg.data import IGNORE_INDEX, SyntheticStreetScenes, collate, train_transform
from lseg.model.config import LSEG_MEAN_STD
from lseg.processing import LSegImageProcessor

SOURCE = Path(lseg.__file__).parent


def python_files() -> list[tuple[str, ast.AST]]:
    return [
        (path.relative_to(SOURCE).as_posix(), ast.parse(path.read_text(encoding="utf-8")))
        for path in sorted(SOURCE.rglob("*.py"))
    ]


def test_ignore_index_is_defined_once():
    definitions = []
    for name, tree in python_files():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "IGNORE_INDEX" for t in targets):
                    definitions.append(name)
    assert definitions == ["data/taxonomy.py"]


def test_data_and_training_never_spell_the_ignore_index_as_a_number():
    literal_defaults = []
    for name, tree in python_files():
        if not name.startswith(("data/", "train/")):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                arguments = node.args.posonlyargs + node.args.args
                defaults = [None] * (len(arguments) - len(node.args.defaults)) + node.args.defaults
                pairs = [*zip(arguments, defaults), *zip(node.args.kwonlyargs, node.args.kw_defaults)]
                literal_defaults += [
                    f"{name}:{node.name}"
                    for argument, default in pairs
                    if argument.arg == "ignore_index" and isinstance(default, ast.Constant)
                ]
    assert literal_defaults == []


def test_evaluation_and_training_use_the_same_ignore_index():
    from lseg.data import datasets, synthetic, transforms
    from lseg.evaluate import labels, zeroshot

    for module in (datasets, synthetic, transforms, labels, zeroshot):
        assert module.IGNORE_INDEX is IGNORE_INDEX, module.__name__


def test_crop_padding_and_collate_padding_are_ignore():
    scenes = SyntheticStreetScenes(2, size=(32, 48), seed=0)
    augment = train_transform(
        LSegImageProcessor(*LSEG_MEAN_STD), crop_size=64, base_size=48, scale_range=(1.0, 1.0), hflip=False
    )
    cropped = augment(scenes[0])
    assert cropped["mask"].shape == (64, 64) and not (scenes[0]["mask"] == IGNORE_INDEX).any()
    assert int((cropped["mask"] == IGNORE_INDEX).sum()) == 64 * 64 - 32 * 48  # exactly the padding
    small = {**scenes[1], "image": scenes[1]["image"][:, :16], "mask": scenes[1]["mask"][:16]}
    batch = collate([cropped, small])
    assert (batch["mask"][1, 16:] == IGNORE_INDEX).all() and (batch["mask"][1, :, 48:] == IGNORE_INDEX).all()
    assert torch.equal(batch["mask"][1, :16, :48], small["mask"].as_subclass(torch.Tensor))
