"""`lseg.pipeline`: transformers' image-segmentation output over `LSegPredictor`, and the processor's
`post_process_semantic_segmentation`."""

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

import lseg
from lseg import LSeg, LSegError
from lseg.model import LSegOutput
from lseg.pipelines import LSegSegmentationPipeline, segments
from lseg.predictor import LSegPredictor
from lseg.processing import LSegImageProcessor, SegmentationResult

LABELS = ["cat", "grass", "sky"]


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def mask_of(segment) -> np.ndarray:
    return np.asarray(segment["mask"])


# --------------------------------------------------------------------------- the output format
def labels_from_the_image(model, image, size, monkeypatch) -> list[str]:
    """Four labels whose embeddings are the image's own features at two corners, their mean and the
    opposite of the first corner: a random model then gives a label map of several labels (each
    corner is its own label's best match) with one label that wins no pixel."""
    features = model.encode_image(image, size=size)
    first, last = features[:, 0, 0], features[:, -1, -1]
    embeds = torch.nn.functional.normalize(torch.stack([first, last, first + last, -first]), dim=1)
    monkeypatch.setattr(model, "encode_text", lambda labels: embeds[: len(labels)])
    return ["cat", "grass", "sky", "moon"]


def test_segments_are_the_predictors_label_map_and_its_mean_probabilities(tiny_model, monkeypatch):
    image = random_image(45, 70)
    labels = labels_from_the_image(tiny_model, image, 32, monkeypatch)
    segmented = lseg.pipeline(tiny_model, size=32)(image, candidate_labels=labels)
    truth = LSegPredictor(tiny_model, size=32).predict(image, labels, {"label_map", "scores"})
    present = np.unique(truth.label_map)
    assert {0, 1} <= set(present) and 3 not in present
    assert [s["label"] for s in segmented] == [labels[i] for i in present]  # in label order
    for index, segment in zip(present, segmented, strict=True):
        assert set(segment) == {"label", "score", "mask"}
        assert isinstance(segment["label"], str) and type(segment["score"]) is float
        assert isinstance(segment["mask"], Image.Image) and segment["mask"].mode == "L"
        assert segment["mask"].size == (70, 45)  # PIL: width x height, the original image's
        where = truth.label_map == index
        assert np.array_equal(mask_of(segment), np.where(where, 255, 0).astype(np.uint8))
        assert segment["score"] == pytest.approx(float(truth.scores[index][where].mean()), abs=1e-5)
    masks = np.stack([mask_of(s) for s in segmented])
    assert np.array_equal((masks == 255).sum(axis=0), np.ones((45, 70)))  # each pixel in one mask


def test_masks_partition_the_image_and_absent_labels_have_none():
    label_map = np.array([[0, 0, 3], [3, 1, 3]])
    confidence = np.array([[0.5, 0.7, 0.9], [0.6, 0.4, 0.3]], dtype=np.float32)
    result = SegmentationResult(label_map, None, ["a", "b", "c", "d"], confidence)
    found = segments(result)
    assert [s["label"] for s in found] == ["a", "b", "d"]  # "c" won no pixel
    masks = np.stack([mask_of(s) for s in found])
    assert set(np.unique(masks)) == {0, 255} and np.array_equal((masks == 255).sum(axis=0), np.ones((2, 3)))
    assert [s["score"] for s in found] == pytest.approx([0.6, 0.4, 0.6])


# --------------------------------------------------------------------------- single, list, generator
def test_every_kind_of_image_gives_the_same_segments(tiny_model, tmp_path):
    array = random_image(20, 30)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    pipe = lseg.pipeline(tiny_model)
    expected = pipe(array, LABELS)
    kinds = [str(path), path, Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1)]
    for image in kinds:
        got = pipe(image, LABELS)
        assert [(s["label"], s["score"]) for s in got] == [(s["label"], s["score"]) for s in expected]
        assert all(np.array_equal(mask_of(a), mask_of(b)) for a, b in zip(got, expected, strict=True))


def test_a_list_gives_a_list_a_single_image_a_list_of_segments(tiny_model):
    images = [random_image(20, 30, seed) for seed in range(3)]
    pipe = lseg.pipeline(tiny_model)
    single = pipe(images[0], LABELS)
    assert isinstance(single, list) and isinstance(single[0], dict)
    for batch in (images, tuple(images), torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in images])):
        results = pipe(batch, LABELS)
        assert isinstance(results, list) and len(results) == 3
        assert all(isinstance(r, list) and isinstance(r[0], dict) for r in results)
        assert [s["score"] for s in results[0]] == [s["score"] for s in single]
    assert pipe([], LABELS) == []


def test_a_generator_is_consumed_lazily(tiny_model):
    pulled = []

    def images():
        for seed in range(2):
            pulled.append(seed)
            yield random_image(20, 30, seed)
        raise RuntimeError("the camera went away")

    results = lseg.pipeline(tiny_model)(images(), candidate_labels=LABELS)
    assert isinstance(results, Iterator) and pulled == []  # nothing read before asked
    assert isinstance(next(results), list) and pulled == [0]
    assert isinstance(next(results), list) and pulled == [0, 1]
    with pytest.raises(RuntimeError, match="camera"):
        next(results)


def test_batches_give_the_same_segments(tiny_model):
    images = [random_image(20, 30, seed) for seed in range(3)] + [random_image(24, 16)]
    one = lseg.pipeline(tiny_model)(images, LABELS)
    two = lseg.pipeline(tiny_model, batch_size=2)(iter(images), LABELS)
    for a, b in zip(one, two, strict=True):
        assert [s["label"] for s in a] == [s["label"] for s in b]
        assert [s["score"] for s in a] == pytest.approx([s["score"] for s in b], abs=1e-5)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("labels", [[], ["cat", "Cat"], ["cat", ""], "cat, , dog"])
def test_bad_labels_are_one_line_errors_before_any_image_is_read(tiny_model, labels):
    pulled = []

    def images():
        pulled.append(1)
        yield random_image(8, 8)

    with pytest.raises(LSegError) as error:
        lseg.pipeline(tiny_model)(images(), candidate_labels=labels)
    assert "\n" not in str(error.value) and pulled == []


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"protocol": "sideways"}, "protocol"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "gpu"}, "invalid device"),
        ({"dtype": "float8"}, "dtype must be"),
    ],
)
def test_bad_options_fail_when_the_pipeline_is_built(options, match):
    with pytest.raises(LSegError, match=match):
        lseg.pipeline("tiny", **options)


# --------------------------------------------------------------------------- models, devices, dtypes
def test_a_preset_or_a_folder_is_loaded_and_prepared_as_the_cli_does(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    for name in ("tiny", folder, str(folder)):
        pipe = lseg.pipeline(name, device="cpu", dtype="float32")
        assert isinstance(pipe.model, LSeg) and pipe.model is not tiny_model
        assert pipe.model.inference_dtype == torch.float32  # prepare_for_inference ran
        assert pipe(random_image(16, 16), LABELS)


def test_an_instance_is_not_cast_and_dtype_is_the_forwards_precision(tiny_model):
    pipe = lseg.pipeline(tiny_model, dtype="bfloat16")
    assert isinstance(pipe, LSegSegmentationPipeline) and pipe.model is tiny_model
    assert tiny_model.dtype == torch.float32 and tiny_model.inference_dtype is None
    assert pipe.predictor.dtype == "bfloat16" and pipe(random_image(16, 16), LABELS)


def test_weights_in_half_precision_refuse_a_wider_forward():
    model = LSeg.from_config("tiny").to(torch.bfloat16)
    with pytest.raises(LSegError, match="cannot compute in float32"):
        lseg.pipeline(model, dtype="float32")


# ------------------------------------------------------------------------- post_process_semantic_segmentation
def ramp_logits(constants):
    """Per image, label 0 is the ramp [0, 4] over two columns, label 1 a constant."""
    ramp = torch.tensor([0.0, 4.0]).view(1, 1, 1, 2)
    return torch.cat([torch.cat([ramp, torch.full_like(ramp, c)], dim=1) for c in constants])


def test_post_process_resizes_each_image_to_its_target_size():
    # Bilinear, half-pixel centres, 2 -> 4 columns: the ramp becomes [0, 1, 3, 4] (nearest: [0, 0, 4, 4]).
    processor = LSegImageProcessor((0.5,) * 3, (0.5,) * 3)
    first, second = processor.post_process_semantic_segmentation(ramp_logits([1.5, 0.5]), [(2, 4), (3, 4)])
    assert torch.equal(first, torch.tensor([[1, 1, 0, 0]] * 2))
    assert torch.equal(second, torch.tensor([[1, 0, 0, 0]] * 3))


def test_post_process_without_target_sizes_keeps_the_logits_resolution():
    processor = LSegImageProcessor((0.5,) * 3, (0.5,) * 3)
    logits = torch.randn(2, 4, 5, 7)
    maps = processor.post_process_semantic_segmentation(LSegOutput(logits, logits, logits))
    assert len(maps) == 2 and all(torch.equal(m, logits[i].argmax(dim=0)) for i, m in enumerate(maps))


def test_post_process_crops_batch_padding_first():
    processor = LSegImageProcessor((0.5,) * 3, (0.5,) * 3)
    padded = torch.cat([ramp_logits([1.5]), torch.tensor([[[[-9.0]], [[9.0]]]])], dim=3)  # a padded column
    (cropped,) = processor.post_process_semantic_segmentation(padded, sizes=[(1, 2)])
    (resized,) = processor.post_process_semantic_segmentation(padded, torch.tensor([[2, 4]]), sizes=[(1, 2)])
    assert torch.equal(cropped, torch.tensor([[1, 0]]))
    assert torch.equal(resized, torch.tensor([[1, 1, 0, 0]] * 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_post_process_creates_every_tensor_on_the_logits_device(dtype):
    processor = LSegImageProcessor((0.5,) * 3, (0.5,) * 3)
    logits = torch.empty(2, 3, 8, 8, device="meta", dtype=dtype)
    for target_sizes, shape in ((None, (8, 8)), ([(40, 30), (4, 6)], (40, 30))):
        maps = processor.post_process_semantic_segmentation(logits, target_sizes)
        assert all(m.device.type == "meta" and m.dtype == torch.int64 for m in maps)
        assert maps[0].shape == shape


def test_lseg_pipeline_is_exported():
    from lseg.pipelines import pipeline

    assert lseg.pipeline is pipeline and "pipeline" in lseg.__all__
