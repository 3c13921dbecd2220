import json

import numpy as np
import pytest
import torch
from PIL import Image

from lseg import LSeg, LSegError
from lseg.cli.features import extract_features, load_features
from lseg.cli.main import main
from lseg.cli.query import colormap, similarity_map


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


# --------------------------------------------------------------------------- extraction
def test_single_protocol_matches_encode_image(tiny_model):
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    features, meta = extract_features(tiny_model, image, "single")
    assert features.shape == (32, 25, 35)
    assert meta["feature_size"] == [25, 35] and meta["feature_stride"] == [2.0, 2.0]
    assert torch.allclose(features, tiny_model.encode_image(image), atol=1e-6)


def test_openscene_grids_are_as_documented(tiny_model):
    """openscene: long side 640 -> model grid 320 long side; image grid = original H/2 x W/2."""
    image = np.random.default_rng(1).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    features, meta = extract_features(tiny_model, image, "openscene")
    assert meta["model_size"] == [427, 640] and features.shape == (32, 214, 320)
    assert meta["feature_stride"] == pytest.approx([100 / 214, 150 / 320])
    assert np.allclose(unit_norms(features), 1, atol=1e-5)
    features, meta = extract_features(tiny_model, image, "openscene", size=96)  # img_long_side 96
    assert meta["model_size"] == [64, 96] and features.shape == (32, 32, 48)
    assert meta["protocol_params"]["crop_size"] == 96 and meta["protocol_params"]["flip"]


def test_image_grid_is_half_the_original_image(tiny_model):
    image = np.random.default_rng(1).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    features, meta = extract_features(tiny_model, image, "single", size=48, feature_grid="image")
    assert meta["model_size"] == [32, 48] and features.shape == (32, 50, 75)
    assert meta["feature_stride"] == [2.0, 2.0]
    assert np.allclose(unit_norms(features), 1, atol=1e-5)


# --------------------------------------------------------------------------- lseg features
def test_features_cli_writes_resumes_and_checks_settings(tmp_path, model_dir, capsys):
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

    assert main([*argv, "--dtype", "float32"]) == 1
    assert "dtype='float16'" in capsys.readouterr().err


def test_features_cli_pt_format_and_unreadable_image(tmp_path, model_dir, capsys):
    images = write_images(tmp_path / "images", [(20, 24)])
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "features"
    argv = ["features", str(images), "--checkpoint", str(model_dir), "--out", str(out)]
    assert main([*argv, "--format", "pt", "--dtype", "float32"]) == 1
    assert "1 of 2 inputs failed: cannot read image" in capsys.readouterr().err
    tensor = torch.load(out / "img0.pt", weights_only=True)
    assert tensor.dtype == torch.float32 and tensor.shape == (32, 10, 12)
    assert np.allclose(unit_norms(load_features(out / "img0.pt")), 1, atol=1e-5)
    assert not (out / "broken.pt").exists()


# --------------------------------------------------------------------------- lseg query
def test_similarity_is_one_where_features_equal_the_text_embedding():
    text = torch.nn.functional.normalize(torch.randn(16), dim=0)
    features = torch.nn.functional.normalize(torch.randn(16, 5, 7), dim=0)
    features[:, 1, 2] = text
    features[:, 4, 6] = 3 * text  # not unit length: still cosine 1
    similarity = similarity_map(features.numpy(), text.numpy())
    assert similarity.shape == (5, 7)
    assert similarity[1, 2] == pytest.approx(1, abs=1e-6) and similarity[4, 6] == pytest.approx(1, abs=1e-6)
    assert similarity.max() <= 1 + 1e-6
    with pytest.raises(LSegError, match="channels"):
        similarity_map(features.numpy(), np.ones(8))


def test_colormap_range():
    colours = colormap(np.array([[0.0, 0.5, 1.0]]))
    assert colours.shape == (1, 3, 3) and colours.dtype == np.uint8
    assert colours[0, 0].tolist() == [68, 1, 84] and colours[0, 2].tolist() == [253, 231, 37]


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
