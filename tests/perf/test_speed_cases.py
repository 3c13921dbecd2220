"""benchmarks/speed.py: which baseline each ratio is against, and the ViT-L/16 480 x 480 case."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name)


def test_the_vit_l16_case_is_the_original_networks_setting(speed):
    case = speed.CASES["vit_l16-480x480"]
    assert (case.preset, case.height, case.width) == ("vit_l16", 480, 480)
    assert case.original_network.seconds_per_image == (14.3, 15.0)


def test_ratios_against_the_original_network_only_in_its_setting(speed):
    case = speed.CASES["vit_l16-480x480"]
    setting = {"preset": "vit_l16", "height": 480, "width": 480, "labels": 150, "batch_size": 1}
    modes = {"fp32": {"images_per_s": 1 / 5.1}, "bf16": {"images_per_s": 1 / 3.0}}
    report = speed.original_network_report(case, argparse.Namespace(**setting), torch.device("cpu"), modes)
    assert report["original_network"]["comparable_with_this_run"] is True
    assert (modes["fp32"]["ratio_vs_original_network"], modes["bf16"]["ratio_vs_original_network"]) == (
        2.87,
        4.88,
    )
    for change in ({"labels": 10}, {"batch_size": 8}, {"height": 32}, {"preset": "tiny"}):
        args = argparse.Namespace(**{**setting, **change})
        report = speed.original_network_report(case, args, torch.device("cpu"), modes)
        assert report["original_network"]["comparable_with_this_run"] is False, change
        assert modes["fp32"]["ratio_vs_original_network"] is None
    args = argparse.Namespace(**setting)
    assert (
        speed.original_network_report(speed.CASES["vit_b16-480x640"], args, torch.device("cpu"), modes) == {}
    )


def test_the_case_runs_end_to_end_and_names_its_baselines(tmp_path):
    """A small run of the ViT-L/16 case's code path (tiny preset, 32 x 32, one call per mode)."""
    out = tmp_path / "speed.json"
    command = [sys.executable, str(SCRIPT), "--case", "vit_l16-480x480", "--preset", "tiny"]
    command += ["--height", "32", "--width", "32", "--labels", "3", "--repeats", "1"]
    command += ["--baseline-repeats", "1", "--modes", "baseline", "fp32", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["case"] == "custom" and result["preset"] == "tiny" and result["size"] == [32, 32]
    assert "re-implemented" in result["baseline"]
    assert result["original_network"]["comparable_with_this_run"] is False
    assert set(result["modes"]) == {"baseline", "fp32"}
    assert all(entry["ratio_vs_original_network"] is None for entry in result["modes"].values())
    assert result["modes"]["baseline"]["ratio_vs_baseline"] == 1.0
