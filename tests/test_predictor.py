import json

import numpy as np
import pytest
import torch

from lseg import LSeg, LSegError
from lseg.inference import run_protocol
from lseg.predictor import FeatureFiles, LSegPredictor, SegmentFiles, same_size_runs
from lseg.processing import LSegImageProcessor


def unit_norms(array):
    return np.linalg.norm(np.asarray(array, dtype=np.float32), axis=0)


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def features_of(model, image, protocol="single", size=None, grid="model"):
    result = LSegPredictor(model, protocol, size).predict(image, outputs={"features"}, feature_grid=grid)
    return result.features, result.geometry


# --------------------------------------------------------------------------- one pass, every output
@pytest.mark.parametrize("protocol", ["single", "lseg-ms"])
def test_labels_and_features_run_the_image_encoder_once_per_image(tiny_model, monkeypatch, protocol):
    images = [random_image(40, 56, seed) for seed in range(3)]
    labels = ["cat", "grass", "other"]
    size = 96  # lseg-ms: six scales (48 to 168 pixels) and their flips, not its 520-pixel default
    separate = tiny_model.segment(
        images, labels, protocol=protocol, size=size, return_scores=True, return_confidence=True
    )
    features = tiny_model.encode_image(images, protocol=protocol, size=size)
    calls = []
    encoder = tiny_model.image_encoder.forward
    monkeypatch.setattr(tiny_model.image_encoder, "forward", lambda x: calls.append(x.shape[0]) or encoder(x))
    predictor = LSegPredictor(tiny_model, protocol, size)
    outputs = {"label_map", "scores", "confidence", "features"}
    together = predictor.predict(images, labels, outputs)
    windows = sum(calls)
    calls.clear()
    tiny_model.segment(images, labels, protocol=protocol, size=size)
    assert windows == sum(calls)  # the label map alone costs the same passes: features came free
    for old, feats, new in zip(separate, features, together, strict=True):
        assert np.array_equal(old.label_map, new.label_map)
        assert np.array_equal(old.scores, new.scores) and np.array_equal(old.confidence, new.confidence)
        assert torch.equal(feats, new.features)


def test_batched_images_share_a_pass_and_keep_their_label_maps(tiny_model):
    images = [random_image(40, 56, 0), random_image(40, 56, 1), random_image(30, 20, 2)]
    one = LSegPredictor(tiny_model).predict(images, "a, b", {"label_map", "features"})
    three = LSegPredictor(tiny_model).predict(images, "a, b", {"label_map", "features"}, batch_size=3)
    for a, b in zip(one, three, strict=True):
        assert np.array_equal(a.label_map, b.label_map)
        torch.testing.assert_close(a.features, b.features, rtol=0, atol=1e-5)


def test_large_images_take_the_bounded_memory_label_map(tiny_model, monkeypatch):
    seen = []
    label_maps = LSegImageProcessor.label_maps
    monkeypatch.setattr(
        LSegImageProcessor, "label_maps", lambda self, *a, **k: seen.append(k) or label_maps(self, *a, **k)
    )
    monkeypatch.setattr(LSegImageProcessor, "postprocess", lambda *a, **k: pytest.fail("full logits"))
    result = LSegPredictor(tiny_model, size=64).predict(random_image(1500, 2000), "a, b, c", {"label_map"})
    assert result.label_map.shape == (1500, 2000) and result.scores is None and len(seen) == 1


def test_outputs_are_checked(tiny_model):
    predictor = LSegPredictor(tiny_model)
    with pytest.raises(LSegError, match="outputs must be"):
        predictor.predict(random_image(8, 8), "a", {"logits"})
    with pytest.raises(LSegError, match="feature grid"):
        predictor.predict(random_image(8, 8), outputs={"features"}, feature_grid="pixels")


def test_a_model_loader_is_called_only_when_an_image_needs_it(tiny_model):
    calls = []
    predictor = LSegPredictor(lambda: calls.append(1) or tiny_model)
    assert calls == []
    predictor.predict(random_image(8, 8), "a, b")
    predictor.predict(random_image(8, 8), "a, b")
    assert calls == [1]


# --------------------------------------------------------------------------- device and dtype
def test_every_tensor_follows_the_inputs_device(tiny_model):
    model = LSeg.from_config("tiny").to("meta")
    result = LSegPredictor(model).predict(torch.zeros(3, 24, 40), outputs={"features"})
    assert result.features.device.type == "meta" and result.features.shape == (32, 12, 20)

    images = torch.zeros(2, 3, 20, 30, device="meta")
    logits, features = run_protocol(
        lambda x: (x[:, :2], x[:, :, ::2, ::2]),
        images,
        tiny_model_protocol(),
        [None, (10, 15)],
        pad_value=0.0,
    )
    assert logits.device.type == features.device.type == "meta"
    assert logits.shape == (2, 2, 20, 30) and features.shape == (2, 3, 10, 15)


def tiny_model_protocol():
    from lseg.inference import get_protocol

    return get_protocol("lseg-ms", base_size=32)


def test_same_size_runs_group_consecutive_items_only():
    assert same_size_runs([1, 1, 2, 1], key=lambda x: x) == [[1, 1], [2], [1]]


# --------------------------------------------------------------------------- features and their grids
def test_single_protocol_matches_encode_image(tiny_model):
    image = random_image(50, 70)
    features, meta = features_of(tiny_model, image)
    assert features.shape == (32, 25, 35)
    assert meta["feature_size"] == [25, 35] and meta["feature_stride"] == [2.0, 2.0]
    assert torch.allclose(features, tiny_model.encode_image(image), atol=1e-6)


def test_openscene_grids_are_as_documented(tiny_model):
    """openscene: long side 640 -> model grid 320 long side; image grid = original H/2 x W/2."""
    image = random_image(100, 150, 1)
    features, meta = features_of(tiny_model, image, "openscene")
    assert meta["model_size"] == [427, 640] and features.shape == (32, 214, 320)
    assert meta["feature_stride"] == pytest.approx([100 / 214, 150 / 320])
    assert np.allclose(unit_norms(features), 1, atol=1e-5)
    features, meta = features_of(tiny_model, image, "openscene", size=96)  # img_long_side 96
    assert meta["model_size"] == [64, 96] and features.shape == (32, 32, 48)
    assert meta["protocol_params"]["crop_size"] == 96 and meta["protocol_params"]["flip"]


def test_image_grid_is_half_the_original_image(tiny_model):
    features, meta = features_of(tiny_model, random_image(100, 150, 1), "single", size=48, grid="image")
    assert meta["model_size"] == [32, 48] and features.shape == (32, 50, 75)
    assert meta["feature_stride"] == [2.0, 2.0]
    assert np.allclose(unit_norms(features), 1, atol=1e-5)


# --------------------------------------------------------------------------- folders: one resume rule
def write_images(folder, count):
    from PIL import Image

    folder.mkdir()
    paths = []
    for index in range(count):
        paths.append(folder / f"img{index}.png")
        Image.fromarray(random_image(20 + 4 * index, 24, index)).save(paths[-1])
    return paths


@pytest.mark.parametrize("kind", ["segment", "features"])
def test_segment_and_features_share_the_resume_rule(tmp_path, tiny_model, kind):
    paths = write_images(tmp_path / "images", 3)
    files = SegmentFiles(["a", "b"]) if kind == "segment" else FeatureFiles()
    out = tmp_path / "out"
    predictor = LSegPredictor(tiny_model)
    settings = {"size": None, "checkpoint": "x"}
    first = predictor.predict_folder(paths, out, files, settings, log=lambda line: None)
    assert (first.images, first.skipped, len(first.written), first.failures) == (3, 0, 3, [])
    (out / "img1.json").unlink()  # as if interrupted before the sidecar
    logged = []
    again = predictor.predict_folder(paths, out, files, settings, log=logged.append)
    assert (again.skipped, [w.path for w in again.written]) == (2, [paths[1]])
    assert logged == [f"skipping 2 image(s) {files.done} in {out}"]
    other = predictor.predict_folder(paths, out, files, {**settings, "size": 16}, log=lambda line: None)
    assert other.skipped == 0 and len(other.written) == 3  # other settings: redone, never refused
    sidecar = json.loads((out / "img0.json").read_text())
    assert (sidecar["settings"]["size"] if kind == "segment" else sidecar["size"]) == 16
    redo = predictor.predict_folder(
        paths, out, files, {**settings, "size": 16}, overwrite=True, log=lambda line: None
    )
    assert redo.skipped == 0 and len(redo.written) == 3


def test_a_folder_run_reports_bad_images_and_writes_the_others(tmp_path, tiny_model):
    paths = write_images(tmp_path / "images", 2)
    bad = tmp_path / "images" / "bad.png"
    bad.write_bytes(b"not a png")
    run = LSegPredictor(tiny_model).predict_folder(
        [paths[0], bad, paths[1]], tmp_path / "out", SegmentFiles(["a", "b"]), {}, batch_size=2
    )
    assert len(run.failures) == 1 and "bad.png" in run.failures[0]
    assert [w.path for w in run.written] == paths
    assert not (tmp_path / "out" / "bad.json").exists()


def test_an_unusable_output_path_is_refused_before_any_work(tmp_path, tiny_model):
    paths = write_images(tmp_path / "images", 1)
    (tmp_path / "file").write_text("mine")
    predictor = LSegPredictor(lambda: pytest.fail("the model was loaded"))
    with pytest.raises(LSegError, match="not a folder"):
        predictor.predict_folder(paths, tmp_path / "file", FeatureFiles(), {})
    assert (tmp_path / "file").read_text() == "mine"
