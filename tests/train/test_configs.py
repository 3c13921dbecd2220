"""Every shipped YAML config parses against the current LightningCLI signature (no training run)."""

import pytest

from lseg.cli.main import main
from tests.conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {c.stem for c in CONFIGS}
    assert {
        "quickstart",
        "camvid",
        "camvid_gpu",
        "ade20k_vitl16",
        "mseg_coco_ade",
        "mseg7_own_labels",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "checkpoint:" in printed


ABLATIONS = sorted((REPO_ROOT / "benchmarks" / "camvid_ablation").glob("*.yaml"))


@pytest.mark.parametrize("override", ABLATIONS, ids=lambda c: c.stem)
def test_camvid_ablation_override_parses_on_the_recipe(override, capsys):
    """benchmarks/camvid_ablation.sh stacks these on the recipe; a typo would only show after training."""
    configs = [REPO_ROOT / "configs" / "camvid.yaml", REPO_ROOT / "configs" / "camvid_holdout.yaml", override]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *(arg for c in configs for arg in ("--config", str(c))), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


def test_camvid32_fold_override_holds_the_folds_unseen_classes_out(capsys, monkeypatch):
    """benchmarks/camvid32_zeroshot.py trains each fold with this override of configs/camvid32.yaml."""
    import importlib.util

    path = REPO_ROOT / "benchmarks" / "camvid32_zeroshot.py"
    spec = importlib.util.spec_from_file_location("camvid32_zeroshot", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_info:
        override = str(REPO_ROOT / "benchmarks" / "camvid_ablation" / "slowbackbone.yaml")
        words = "configs/labels/camvid32_mseg_words.yaml"  # the label-augmentation ablation's words
        arguments = benchmark.train_arguments(REPO_ROOT / "runs" / "x", 2, [override], words)
        main(["train", *arguments, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "unseen_file: configs/labels/camvid32_folds.yaml" in printed and "fold: 2" in printed
    assert f"synonyms: {words}" in printed
    assert "lr: 0.0005" in printed  # an ablation's override config is stacked on the recipe


def test_a_command_line_dataset_list_replaces_the_configs_and_takes_none_of_its_fields(capsys):
    """Regression: jsonargparse filled the new entry's missing fields from the config's entry at the
    same place, so smoke.yaml's synthetic `options: {num_images: 32, ...}` reached a folder dataset."""
    import yaml

    with pytest.raises(SystemExit) as exit_info:
        main([
            "train", "--config", str(REPO_ROOT / "configs" / "smoke.yaml"), "--print_config",
            "--data.train", "[{name: folder, root: streets}]", "--data.val", "{name: folder, root: x}",
        ])  # fmt: skip
    assert exit_info.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["train"] == [{"name": "folder", "root": "streets"}]
    assert data["val"] == {"name": "folder", "root": "x"}
