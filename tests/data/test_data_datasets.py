import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from lseg.data import (
    CAMVID_CLASSES,
    DATASETS,
    ListFileDataset,
    ade20k,
    ade20k_names,
    build_dataset,
    camvid,
    folder,
    image_folder,
    mseg_ade20k,
    mseg_coco_panoptic,
    read_names,
    universal_names,
)
from lseg.data.taxonomy import bundled_names
from lseg.errors import LSegError

NAMES = ["a", "b", "c"]


@pytest.fixture
def tiny(tmp_path, write_image, write_label):
    """Two 6x8 samples with 8-bit labels and their list file."""
    labels = [np.array([[0, 1, 2, 255] * 2] * 6, np.uint8), np.full((6, 8), 2, np.uint8)]
    for i, label in enumerate(labels):
        write_image(tmp_path / "img" / f"{i}.png", 6, 8, seed=i)
        write_label(tmp_path / "lbl" / f"{i}.png", label)
    (tmp_path / "list.txt").write_text("img/0.png lbl/0.png\n\n# comment\nimg/1.png lbl/1.png\n")
    return tmp_path, labels


def test_sample_format_and_values(tiny):
    root, labels = tiny
    ds = ListFileDataset(root, root / "list.txt", NAMES, name="tiny")
    assert len(ds) == 2 and ds.class_names == NAMES and ds.name == "tiny" and ds.ignore_index == 255
    sample = ds[0]
    assert set(sample) == {"image", "mask", "dataset", "path"}
    assert isinstance(sample["image"], tv_tensors.Image) and sample["image"].dtype == torch.uint8
    assert sample["image"].shape == (3, 6, 8)
    assert isinstance(sample["mask"], tv_tensors.Mask) and sample["mask"].dtype == torch.int64
    assert torch.equal(sample["mask"], torch.from_numpy(labels[0]).long())
    assert sample["dataset"] == "tiny" and sample["path"] == str(root / "img" / "0.png")
    expected = np.array(Image.open(root / "img" / "0.png"))
    assert torch.equal(sample["image"], torch.from_numpy(expected).permute(2, 0, 1))


def test_sixteen_bit_labels(tmp_path, write_image, write_label):
    write_image(tmp_path / "x.png", 4, 5)
    label = np.full((4, 5), 300, np.uint16)
    label[0, 0] = 65535
    write_label(tmp_path / "x_label.png", label)
    (tmp_path / "list.txt").write_text("x.png x_label.png\n")
    names = [f"c{i}" for i in range(400)]
    mask = ListFileDataset(tmp_path, tmp_path / "list.txt", names, ignore_index=65535)[0]["mask"]
    assert mask[0, 0] == 65535 and (mask.flatten()[1:] == 300).all()


@pytest.mark.parametrize("orientation", [6, 3, 2])  # EXIF: rotate 90 degrees, rotate 180, mirror
def test_exif_tagged_images_stay_aligned_with_their_masks(tmp_path, write_label, orientation):
    """The mask was drawn on the stored pixels: the EXIF tag must not turn the image away from it."""
    stored = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)  # H 6 x W 8
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "x.png", exif=exif)  # lossless, so pixels compare exactly
    label = np.zeros((6, 8), np.uint8)
    label[:3, :4] = 1
    write_label(tmp_path / "x_label.png", label)
    (tmp_path / "list.txt").write_text("x.png x_label.png\n")
    sample = ListFileDataset(tmp_path, tmp_path / "list.txt", NAMES)[0]
    assert torch.equal(sample["image"], torch.from_numpy(stored).permute(2, 0, 1))
    assert torch.equal(sample["mask"], torch.from_numpy(label).long())


def test_id_map_dict_and_table(tiny):
    root, _ = tiny
    ds = ListFileDataset(root, root / "list.txt", ["x", "y"], id_map={2: 0, 0: 255})
    assert ds[0]["mask"][0, :4].tolist() == [255, 1, 0, 255]
    table = ListFileDataset(root, root / "list.txt", ["x", "y", "z"], id_map=torch.tensor([2, 1, 0]))
    assert table[0]["mask"][0, :4].tolist() == [2, 1, 0, 255]
    short = ListFileDataset(root, root / "list.txt", ["x", "y"], id_map=[1, 0])  # raw 2 is past the table
    with pytest.raises(LSegError, match=r"lbl/0\.png has ids \[2\]"):
        short[0]


def test_pixel_counts_read_training_ids_without_the_transform(tiny):
    root, _ = tiny
    crop = lambda s: {**s, "mask": s["mask"][:1, :1]}  # noqa: E731 - a transform the counts must not see
    dataset = ListFileDataset(root, root / "list.txt", NAMES, transform=crop)
    assert dataset.pixel_counts().tolist() == [12, 12, 60]
    remapped = ListFileDataset(root, root / "list.txt", ["x", "y"], id_map={2: 0, 0: 255})
    assert remapped.pixel_counts().tolist() == [60, 12]


def test_transform_is_applied(tiny):
    root, _ = tiny
    ds = ListFileDataset(root, root / "list.txt", NAMES, transform=lambda s: {**s, "extra": 1})
    assert ds[0]["extra"] == 1


def test_missing_list_file_and_root(tmp_path):
    with pytest.raises(LSegError, match=r"list file not found: .*nope\.txt"):
        ListFileDataset(tmp_path, tmp_path / "nope.txt", NAMES)
    with pytest.raises(LSegError, match="dataset root .*absent not found"):
        ListFileDataset(tmp_path / "absent", tmp_path / "nope.txt", NAMES)


def test_list_file_not_utf8_is_one_line_naming_file_and_line(tiny):
    root, _ = tiny
    latin1 = "img/0.png lbl/0.png\n# r\xe9sum\xe9\nimg/1.png lbl/1.png\n".encode("latin-1")
    (root / "list.txt").write_bytes(latin1)
    with pytest.raises(LSegError, match=r"list file .*list\.txt is not UTF-8 text \(byte 0xe9 on line 2\)"):
        ListFileDataset(root, root / "list.txt", NAMES)
    (root / "names.txt").write_bytes("a\nb\u00e9\nc\n".encode("latin-1"))
    with pytest.raises(LSegError, match=r"class-names file .*names\.txt is not UTF-8 text \(.* line 2\)"):
        read_names(root / "names.txt")


def test_list_and_names_files_with_a_byte_order_mark(tiny):
    root, _ = tiny
    (root / "list.txt").write_text("img/0.png lbl/0.png\n", encoding="utf-8-sig")
    assert ListFileDataset(root, root / "list.txt", NAMES)[0]["path"] == str(root / "img" / "0.png")
    (root / "names.txt").write_text("a\nb\n", encoding="utf-8-sig")
    assert read_names(root / "names.txt") == ["a", "b"]


def test_malformed_list_line(tmp_path):
    (tmp_path / "list.txt").write_text("a.png b.png\nonly_one.png\n")
    with pytest.raises(LSegError, match=r"list.txt:2: expected 'IMAGE LABEL'"):
        ListFileDataset(tmp_path, tmp_path / "list.txt", NAMES)


def test_missing_image_or_label(tiny):
    root, _ = tiny
    (root / "list.txt").write_text("img/none.png lbl/0.png\nimg/0.png lbl/none.png\n")
    ds = ListFileDataset(root, root / "list.txt", NAMES)
    with pytest.raises(LSegError, match=r"image not found: .*img/none\.png"):
        ds[0]
    with pytest.raises(LSegError, match=r"label not found: .*lbl/none\.png"):
        ds[1]


def test_size_mismatch(tiny, write_label):
    root, _ = tiny
    write_label(root / "lbl" / "0.png", np.zeros((5, 8), np.uint8))
    with pytest.raises(LSegError, match=r"label .*lbl/0\.png is 8x5 but image .*img/0\.png is 8x6"):
        ListFileDataset(root, root / "list.txt", NAMES)[0]


def test_colour_label_rejected(tiny):
    root, _ = tiny
    Image.new("RGB", (8, 6)).save(root / "lbl" / "0.png")
    with pytest.raises(LSegError, match=r"lbl/0\.png has mode RGB"):
        ListFileDataset(root, root / "list.txt", NAMES)[0]


def test_unknown_ids_error_names_file(tiny):
    root, _ = tiny
    with pytest.raises(LSegError, match=r"lbl/0\.png has ids \[2\].*unknown_ids='ignore'"):
        ListFileDataset(root, root / "list.txt", ["a", "b"])[0]


def test_unknown_ids_ignore_warns_once(tiny):
    root, _ = tiny
    ds = ListFileDataset(root, root / "list.txt", ["a", "b"], unknown_ids="ignore")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = [ds[0]["mask"], ds[1]["mask"], ds[0]["mask"]]
    assert len(caught) == 1 and "lbl/0.png" in str(caught[0].message)
    assert masks[0][0, :4].tolist() == [0, 1, 255, 255] and (masks[1] == 255).all()


def test_bad_options(tiny):
    root, _ = tiny
    with pytest.raises(LSegError, match="unknown_ids"):
        ListFileDataset(root, root / "list.txt", NAMES, unknown_ids="drop")
    with pytest.raises(LSegError, match="ignore_index 1 collides"):
        ListFileDataset(root, root / "list.txt", NAMES, ignore_index=1)


def test_image_folder_and_registry_folder(tmp_path, write_image, write_label):
    for split in ("train", "val"):
        for stem in ("b", "a"):
            write_image(tmp_path / "images" / split / f"{stem}.jpg", 4, 4)
            write_label(tmp_path / "masks" / split / f"{stem}.png", np.ones((4, 4), np.uint8))
    (tmp_path / "names.txt").write_text("road\nsky\n\n")
    ds = image_folder(tmp_path / "images" / "train", tmp_path / "masks" / "train", tmp_path / "names.txt")
    assert ds.class_names == ["road", "sky"] and [p[0][-5:] for p in ds.pairs] == ["a.jpg", "b.jpg"]
    assert build_dataset("folder", tmp_path, "val")[1]["mask"].sum() == 16
    (tmp_path / "masks" / "val" / "a.png").unlink()
    with pytest.raises(LSegError, match=r"no label .*val/a\.png for image"):
        folder(tmp_path, "val")


def _drives(root: Path, write_image, write_label) -> None:
    """A folder dataset of three classes over two drives: each mask is 0 | 1 | 2 in thirds."""
    mask = np.repeat(np.array([[0, 0, 1, 1, 2, 2]], np.uint8), 2, axis=0)
    mask[0, 0] = 255
    for stem in ("0001TP_1", "0006R0_1", "0006R0_2"):
        write_image(root / "images" / "train" / f"{stem}.jpg", 2, 6)
        write_label(root / "masks" / "train" / f"{stem}.png", mask)
    (root / "names.txt").write_text("road\nsky\ncar\n")


def test_a_folder_dataset_at_a_relative_root_reads_its_files(tmp_path, monkeypatch, write_image, write_label):
    """Scanned paths are absolute: a relative root was joined twice (root/images/root/images/x.jpg)."""
    _drives(tmp_path / "data", write_image, write_label)
    monkeypatch.chdir(tmp_path)
    dataset = build_dataset("folder", "data", "train")
    assert dataset[0]["image"].shape == (3, 2, 6)


def test_folder_sequences_keep_only_those_drives(tmp_path, write_image, write_label):
    _drives(tmp_path, write_image, write_label)
    kept = build_dataset("folder", tmp_path, "train", sequences=["0006R0"])
    assert [Path(image).name for image, _ in kept.pairs] == ["0006R0_1.jpg", "0006R0_2.jpg"]
    with pytest.raises(LSegError, match=r"no images of sequences \['Seq05VD'\]; it has 0001TP, 0006R0"):
        build_dataset("folder", tmp_path, "train", sequences=["Seq05VD"])


def test_dropped_classes_become_ignore_and_the_rest_are_renumbered(tmp_path, write_image, write_label):
    """Training on seen classes only: an unseen class's pixels are never a target (ignore)."""
    _drives(tmp_path, write_image, write_label)
    dataset = build_dataset("folder", tmp_path, "train")
    full = dataset[0]["mask"].clone()
    dataset.drop_classes([1])
    assert dataset.class_names == ["road", "car"]
    expected = torch.tensor([0, 255, 1, 255])[full.clamp(max=3).where(full != 255, torch.tensor(3))]
    assert torch.equal(dataset[0]["mask"], expected)
    assert dataset.pixel_counts().tolist() == [3 * 3, 3 * 4]  # 3 images; road lost its ignored pixel
    dataset.drop_classes([0])  # ids of the remaining classes: car is now 0
    assert dataset.class_names == ["car"] and dataset[0]["mask"].unique().tolist() == [0, 255]
    with pytest.raises(LSegError, match="cannot drop classes"):
        dataset.drop_classes([0])


def test_build_dataset_errors(tmp_path):
    with pytest.raises(LSegError, match="unknown dataset 'kitti'.*camvid, ade20k"):
        build_dataset("kitti", tmp_path, "train")
    for name in DATASETS:
        with pytest.raises(LSegError, match=f"{name} root .*missing not found; expected layout: ROOT/"):
            build_dataset(name, tmp_path / "missing", "train")
    with pytest.raises(LSegError, match=r"camvid: .*train\.txt not found; expected layout"):
        camvid(tmp_path, "train")
    with pytest.raises(LSegError, match="unknown split 'dev'"):
        ade20k(tmp_path, "dev")


def test_ade20k_scan(tmp_path, write_image, write_label):
    write_image(tmp_path / "images" / "validation" / "ADE_val_1.jpg", 3, 4)
    write_label(
        tmp_path / "annotations" / "validation" / "ADE_val_1.png", np.array([[0, 1, 150, 7]] * 3, np.uint8)
    )
    ds = ade20k(tmp_path, "val")
    assert len(ds.class_names) == 150 and ds.class_names[:3] == ["wall", "building", "sky"]
    assert ds.class_names[64] == "coffee table"
    assert ds[0]["mask"][0].tolist() == [255, 0, 149, 6] and ds.name == "ade20k"


def test_mseg_layouts(tmp_path, write_image, write_label):
    write_image(tmp_path / "ADE20K" / "images" / "training" / "x.jpg", 2, 3)
    write_label(
        tmp_path / "ADE20K" / "annotations_semseg150_relabeled" / "training" / "x.png",
        np.zeros((2, 3), np.uint8),
    )
    write_image(tmp_path / "COCOPanoptic" / "images" / "val2017" / "y.jpg", 2, 3)
    write_label(
        tmp_path / "COCOPanoptic" / "semantic_relabeled133" / "val2017" / "y.png",
        np.full((2, 3), 5, np.uint8),
    )
    ade = mseg_ade20k(tmp_path, "train")
    assert ade.class_names == universal_names() and ade.name == "mseg-ade20k"
    assert universal_names()[int(ade[0]["mask"][0, 0])] == bundled_names("ade20k-150-relabeled")[0]
    own = mseg_ade20k(tmp_path, "train", taxonomy="dataset")
    assert own.class_names == bundled_names("ade20k-150-relabeled") and own[0]["mask"].max() == 0
    coco = build_dataset("mseg-coco-panoptic", tmp_path, "val")
    assert universal_names()[int(coco[0]["mask"][0, 0])] == bundled_names("coco-panoptic-133-relabeled")[5]
    with pytest.raises(LSegError, match=r"COCOPanoptic/images/train2017 not found; expected layout"):
        mseg_coco_panoptic(tmp_path, "train")


def test_mseg_list_file_convention(shared_data, tmp_path, write_image, write_label):
    """MSeg's own list files resolve against ROOT/ADE20K and ROOT/COCOPanoptic."""
    lists = shared_data / "mseg" / "dataset_lists"
    for factory, dataset, sub in (
        (mseg_ade20k, "ade20k-150-relabeled", "ADE20K"),
        (mseg_coco_panoptic, "coco-panoptic-133-relabeled", "COCOPanoptic"),
    ):
        list_file = lists / dataset / "list" / "val.txt"
        image, label = list_file.read_text().split("\n", 1)[0].split()
        write_image(tmp_path / sub / image, 2, 2)
        write_label(tmp_path / sub / label, np.zeros((2, 2), np.uint8))
        ds = factory(tmp_path, "val", list_file=list_file)
        assert len(ds) == len(list_file.read_text().split()) // 2
        assert ds[0]["path"] == str(tmp_path / sub / image)


def test_bundled_names_match_mseg_lists(shared_data):
    for dataset in ("ade20k-150-relabeled", "coco-panoptic-133-relabeled"):
        path = shared_data / "mseg" / "dataset_lists" / dataset / f"{dataset}_names.txt"
        assert bundled_names(dataset) == [n.strip() for n in path.read_text().splitlines() if n.strip()]


def test_ade20k_names_match_lseg_label_file(shared_data):
    rows = (shared_data / "lseg_labels" / "ade20k_objectInfo150.txt").read_text().splitlines()[1:]
    first_words = [row.split(",")[-1].split(";")[0] for row in rows]
    names = ade20k_names()
    assert len(names) == 150
    assert sum(name.split()[0] == word for name, word in zip(names, first_words, strict=True)) == 150


def test_camvid_real_data(shared_data):
    root = shared_data / "camvid"
    train, val = camvid(root, "train"), camvid(root, "val")
    assert (len(train), len(val)) == (367, 101)
    assert train.class_names == list(CAMVID_CLASSES) and len(CAMVID_CLASSES) == 11
    seen: set[int] = set()
    for ds, indices in ((train, (0, 183, 366)), (val, range(101))):
        for i in indices:
            sample = ds[i]
            assert sample["image"].shape == (3, 360, 480) and sample["mask"].shape == (360, 480)
            seen |= set(np.flatnonzero(np.bincount(sample["mask"].numpy().ravel())).tolist())
    assert seen == set(range(11)) | {255}


def test_camvid_sequences_hold_out_whole_drives(shared_data):
    root = shared_data / "camvid"
    held_out = camvid(root, "train", sequences=["0006R0"])
    rest = camvid(root, "train", sequences=["0001TP", "0016E5"])
    assert (len(held_out), len(rest)) == (101, 266)
    assert all(Path(image).name.startswith("0006R0") for image, _ in held_out.pairs)
    assert not {p for p, _ in held_out.pairs} & {p for p, _ in rest.pairs}
    with pytest.raises(
        LSegError, match=r"no images of sequences \['Seq05VD'\]; it has 0001TP, 0006R0, 0016E5"
    ):
        camvid(root, "train", sequences=["Seq05VD"])
    with pytest.raises(LSegError, match="quote ids in YAML"):
        camvid(root, "train", sequences=[16e5])
