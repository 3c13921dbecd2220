import json

import numpy as np
import pytest
import torch
from PIL import Image

from lseg import LSeg
from lseg.cli.main import main
from lseg.features import load_features


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return LSeg.from_config("tiny").save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(sizes):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img{index}.png")
    return folder


def unit_norms(array):
    return np.linalg.norm(np.asarray(array, dtype=np.float32), axis=0)


# --------------------------------------------------------------------------- lseg features
def test_features_cli_writes_resumes_and_redoes_other_settings(tmp_path, model_dir, capsys):
    images = write_images(tmp_path / "images", [(40, 60), (64, 48), (30, 30)])
    out = tmp_path / "features"
    argv = ["features", str(images), "--checkpoint", str(model_dir), "--out", str(out), "--size", "64"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"img{i}.{ext}" for i in range(3) for ext in ("json", "npy")
    )
    meta = json.loads((out / "img0.json").read_text())
    array = np.load(out / "img0.npy")
    assert array.dtype == np.float16 and array.shape == (32, 22, 32)  # 40x60 -> 43x64 -> /2
    assert meta["image_size"] == [40, 60] and meta["feature_size"] == [22, 32]
    assert meta["protocol"] == "single" and meta["dtype"] == "float16" and meta["array"] == "img0.npy"
    assert meta["checkpoint"] == str(model_dir.resolve()) and meta["image"].endswith("img0.png")
    assert np.allclose(unit_norms(array), 1, atol=2e-3)

    capsys.readouterr()
    (out / "img1.json").unlink()  # as if interrupted between the array and the json
    assert main(argv) == 0
    streams = capsys.readouterr()
    assert "skipping 2 image(s)" in streams.err and "1 written, 2 skipped" in streams.out

    # Other settings redo the images (the rule of `lseg segment`), --overwrite redoes them all.
    assert main([*argv, "--save-dtype", "float32"]) == 0
    assert "3 written, 0 skipped" in capsys.readouterr().out
    assert np.load(out / "img0.npy").dtype == np.float32
    assert json.loads((out / "img0.json").read_text())["dtype"] == "float32"
    assert main([*argv, "--save-dtype", "float32"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main([*argv, "--save-dtype", "float32", "--overwrite"]) == 0
    assert "3 written, 0 skipped" in capsys.readouterr().out


def test_features_cli_pt_format_and_unreadable_image(tmp_path, model_dir, capsys):
    images = write_images(tmp_path / "images", [(20, 24)])
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "features"
    argv = ["features", str(images), "--checkpoint", str(model_dir), "--out", str(out)]
    assert main([*argv, "--format", "pt", "--save-dtype", "float32"]) == 1
    assert "1 of 2 inputs failed: cannot read image" in capsys.readouterr().err
    tensor = torch.load(out / "img0.pt", weights_only=True)
    assert tensor.dtype == torch.float32 and tensor.shape == (32, 10, 12)
    assert np.allclose(unit_norms(load_features(out / "img0.pt")), 1, atol=1e-5)
    assert not (out / "broken.pt").exists()


# --------------------------------------------------------------------------- lseg query
def test_query_cli_heatmaps_and_values(tmp_path, model_dir, capsys):
    model = LSeg.from_pretrained(model_dir)
    text = model.encode_text(["chair"])[0]
    features = torch.nn.functional.normalize(torch.randn(32, 6, 8), dim=0)
    features[:, 2, 3] = text
    folder = tmp_path / "features"
    folder.mkdir()
    np.save(folder / "scene.npy", features.half().numpy())
    image = write_images(tmp_path / "images", [(12, 16)]) / "img0.png"
    sidecar = {"image": str(image), "image_size": [12, 16], "checkpoint": str(model_dir), "preset": None}
    (folder / "scene.json").write_text(json.dumps(sidecar))
    out = tmp_path / "query"
    # no --checkpoint: the one recorded in the sidecar is used
    assert main(["query", str(folder), "--text", "chair", "--out", str(out), "--save-similarity"]) == 0
    assert "1.000" in capsys.readouterr().out
    similarity = np.load(out / "scene.chair.npy")
    assert similarity.shape == (6, 8) and similarity[2, 3] == pytest.approx(1, abs=2e-3)
    assert similarity.argmax() == 2 * 8 + 3
    for name in ("scene.chair.png", "scene.chair.overlay.png"):
        with Image.open(out / name) as heatmap:
            assert heatmap.size == (16, 12) and heatmap.mode == "RGB"


def test_query_needs_a_model(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((4, 2, 2), dtype=np.float32))
    assert main(["query", str(tmp_path / "x.npy"), "--text", "a", "--out", str(tmp_path / "o")]) == 1
    assert "--checkpoint" in capsys.readouterr().err
