from importlib.resources import files

import numpy as np
import pytest
import torch
from PIL import Image

from lseg.errors import LSegError
from lseg.evaluate.zeroshot import build_episodes, score_episodes

SIZE = 16  # tiny square images: image_size=SIZE keeps pixels and masks unresized
STEP = 3  # fake images encode the mask: grey level = STEP * class value


def names(resource: str) -> list[str]:
    return files("lseg").joinpath("resources", resource).read_text().split()


def write_pair(image_path, mask_path, mask: np.ndarray, encode=None) -> None:
    """Mask PNG plus an image whose grey level encodes it (lossless PNG bytes behind a .jpg name)."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)
    grey = encode(mask) if encode else np.where(mask == 255, 0, mask * STEP)
    Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)).save(image_path, format="PNG")


def oracle(class_names: list[str], std=0.5, mean=0.5):
    """predict_fn decoding the class painted in the image: perfect logits for [background, name]."""

    def predict(images: torch.Tensor, labels: list[str]) -> torch.Tensor:
        assert labels[0] == "others"
        value = torch.round((images[:, 0] * std + mean) * 255 / STEP)
        fg = (value == class_names.index(labels[1]) + 1).float()
        return torch.stack([1 - fg, fg], dim=1)

    return predict


def blocks(*values: int) -> np.ndarray:
    """SIZE x SIZE mask with one 4-pixel-wide vertical band per value, boundary 255 rows at the bottom."""
    mask = np.zeros((SIZE, SIZE), dtype=np.int64)
    for i, v in enumerate(values):
        mask[: SIZE - 2, 4 * i : 4 * i + 4] = v
    mask[SIZE - 2 :, :] = 255
    return mask


@pytest.fixture
def pascal_root(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    episodes = files("lseg").joinpath("resources", "pascal5i_val_fold0.txt").read_text().split()[:3]
    for line in episodes:  # 2007_000033__01, 2007_000061__04, 2007_000129__02
        image_id, label = line.split("__")
        mask = blocks(int(label), 7)
        write_pair(
            voc / "JPEGImages" / f"{image_id}.jpg", voc / "SegmentationClassAug" / f"{image_id}.png", mask
        )
    return tmp_path


def test_pascal_episodes_load_binary_masks_with_ignore(pascal_root):
    dataset = build_episodes("pascal-5i", pascal_root, 0, image_size=SIZE, max_episodes=3, mean=(0.2,) * 3)
    assert dataset.classes == ["aeroplane", "bicycle", "bird", "boat", "bottle"]
    assert len(dataset) == 3
    image, mask, name = dataset[0]
    assert (image.shape, mask.shape, mask.dtype, name) == (
        (3, SIZE, SIZE),
        (SIZE, SIZE),
        torch.int64,
        "aeroplane",
    )
    assert mask[0, :4].tolist() == [1] * 4 and mask[0, 4:].eq(0).all()  # class 7 (car) is background
    assert mask[-2:].eq(255).all()
    assert image[0, -1, 0] == pytest.approx((0 - 0.2) / 0.5)  # black pixel, mean 0.2, std 0.5
    assert [dataset[i][2] for i in range(3)] == ["aeroplane", "boat", "bicycle"]


def test_pascal_ground_truth_scores_one_and_background_only_scores_zero(pascal_root):
    voc_names = names("fewshot_pascal.txt")
    result = score_episodes(oracle(voc_names), "pascal", pascal_root, 0, image_size=SIZE, max_episodes=3)
    assert (result.benchmark, result.fold, result.episodes) == ("pascal", 0, 3)
    assert result.miou == pytest.approx(1.0) and result.fb_iou == pytest.approx(1.0)
    assert np.isnan(result.per_class_iou["bird"])  # fold class without episodes: excluded

    def background(images, labels):
        return torch.stack([torch.ones_like(images[:, 0]), torch.zeros_like(images[:, 0])], dim=1)

    result = score_episodes(background, "pascal", pascal_root, 0, image_size=SIZE, max_episodes=3)
    assert result.miou == 0.0
    # Per episode 14x16 counted pixels, 14x4 foreground: background IoU 168/224, foreground IoU 0.
    assert result.fb_iou == pytest.approx((168 / 224 + 0) / 2)


@pytest.mark.parametrize("orientation", [6, 3, 2])  # EXIF: rotate 90 degrees, rotate 180, mirror
def test_exif_tagged_query_images_stay_aligned_with_their_masks(pascal_root, orientation):
    """Image and mask are both resized to the square model size, so only alignment reveals a turn."""
    for image_path in (pascal_root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = np.array(Image.open(image_path))
        Image.fromarray(stored).save(image_path, format="PNG", exif=exif)
    voc_names = names("fewshot_pascal.txt")
    result = score_episodes(oracle(voc_names), "pascal", pascal_root, 0, image_size=SIZE, max_episodes=3)
    assert result.miou == pytest.approx(1.0) and result.fb_iou == pytest.approx(1.0)


@pytest.fixture
def coco_root(tmp_path):
    coco = tmp_path / "COCO2014"
    for stem, values in {"000001": (1, 2), "000002": (5,), "000003": (9, 1)}.items():
        name = f"COCO_val2014_000000{stem}"
        mask = blocks(*values)
        mask[mask == 255] = 0  # COCO masks have no ignore label
        write_pair(coco / "val2014" / f"{name}.jpg", coco / "annotations" / "val2014" / f"{name}.png", mask)
    return tmp_path


def test_coco_fold_classes_follow_hsnet_and_episodes_cover_every_pair(coco_root):
    dataset = build_episodes("coco", coco_root, 0, image_size=SIZE, coco_episodes=None)
    coco_names = names("fewshot_coco.txt")
    assert dataset.classes == [coco_names[c] for c in range(0, 80, 4)]  # person, aeroplane, boat, ...
    pairs = sorted((e.class_name, e.image.stem[-1]) for e in dataset.episodes)
    assert pairs == [("aeroplane", "2"), ("boat", "3"), ("person", "1"), ("person", "3")]
    image, mask, name = dataset[[e.class_name for e in dataset.episodes].index("boat")]
    assert name == "boat" and mask[0, :4].eq(1).all() and mask[0, 4:].eq(0).all()
    assert (coco_root / "COCO2014" / "annotations" / "lseg_val2014_classes.json").is_file()


def test_coco_sampled_episodes_and_ground_truth_score(coco_root):
    dataset = build_episodes("coco", coco_root, 0, image_size=SIZE, coco_episodes=10, seed=1)
    assert len(dataset) == 10 and {e.class_name for e in dataset.episodes} <= {"person", "aeroplane", "boat"}
    result = score_episodes(
        oracle(names("fewshot_coco.txt")), "coco-20i", coco_root, 0, image_size=SIZE, batch_size=4
    )
    assert result.episodes == 1000
    assert result.miou == pytest.approx(1.0) and result.fb_iou == pytest.approx(1.0)


@pytest.fixture
def fss_root(tmp_path):
    base = tmp_path / "fewshot_data"
    fg = np.zeros((SIZE, SIZE), dtype=np.int64)
    fg[4:12, 4:12] = 255

    def encode(mask):
        return np.where(mask > 0, STEP, 0)

    test_classes = names("fewshot_fss.txt")[760:]
    for i, name in enumerate(test_classes):
        for n in (1, 2, 3) if i == 0 else (2,):
            write_pair(base / name / f"{n}.jpg", base / name / f"{n}.png", fg, encode)
    return tmp_path


def test_fss_uses_test_classes_and_skips_the_support_image(fss_root):
    dataset = build_episodes("fss", fss_root, image_size=SIZE)
    assert len(dataset.classes) == 240 and dataset.classes[0] == "abe's_flyingfish"
    assert len(dataset) == 241  # image 1 of the first class is the original 1-shot support
    assert sorted(e.image.stem for e in dataset.episodes[:2]) == ["2", "3"]
    _, mask, _ = dataset[0]
    assert mask.sum() == 64 and set(mask.unique().tolist()) == {0, 1}


def test_fss_ground_truth_scores_one(fss_root):
    def predict(images, labels):
        fg = (torch.round((images[:, 0] * 0.5 + 0.5) * 255) == STEP).float()
        return torch.stack([1 - fg, fg], dim=1)

    asked = []
    result = score_episodes(
        lambda images, labels: asked.append(labels) or predict(images, labels),
        "fss",
        fss_root,
        image_size=SIZE,
        max_episodes=5,
        batch_size=2,
    )
    assert asked[0] == ["others", "abe's flyingfish"]  # the class name as words, as training asks
    assert result.episodes == 5
    assert result.miou == pytest.approx(1.0) and result.fb_iou == pytest.approx(1.0)


@pytest.mark.parametrize("benchmark", ["pascal", "coco", "fss"])
def test_missing_data_root_explains_layout(tmp_path, benchmark):
    with pytest.raises(LSegError, match="expected layout"):
        build_episodes(benchmark, tmp_path / "nowhere")


def test_missing_files_and_bad_arguments_are_user_errors(pascal_root):
    with pytest.raises(LSegError, match="missing .*2007_000"):
        build_episodes("pascal", pascal_root, 0, max_episodes=4)
    with pytest.raises(LSegError, match="fold"):
        build_episodes("pascal", pascal_root, 4)
    with pytest.raises(LSegError, match="pascal-5i, coco-20i, fss-1000"):
        build_episodes("ade20k", pascal_root)


def test_fold_scores_are_the_one_scorers_on_the_same_predictions(pascal_root):
    """Per-class IoU is each class's own binary matrix, FB-IoU that of their sum (HSNet's meter)."""
    from lseg.evaluate.metrics import SegmentationMetrics, fb_iou

    def left_columns(images, labels):
        fg = torch.zeros_like(images[:, 0])
        fg[..., :6] = 1
        return torch.stack([1 - fg, fg], dim=1)

    dataset = build_episodes("pascal", pascal_root, 0, image_size=SIZE, max_episodes=3)
    per_class = {name: SegmentationMetrics(2) for name in dataset.classes}
    for index in range(len(dataset)):
        image, mask, name = dataset[index]
        per_class[name].update(left_columns(image[None], []).argmax(1), mask[None])
    result = score_episodes(left_columns, "pascal", pascal_root, 0, image_size=SIZE, max_episodes=3)
    seen = {n: m for n, m in per_class.items() if m.confmat.sum()}
    for name, metric in seen.items():
        assert result.per_class_iou[name] == metric.compute()["per_class_iou"][1]
    assert result.fb_iou == fb_iou(sum(m.confmat for m in seen.values()))
    assert result.miou == pytest.approx(sum(result.per_class_iou[n] for n in seen) / len(seen))
