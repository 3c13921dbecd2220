"""`lseg segment` end to end on a tiny random model, and every user error it must catch."""

import numpy as np
import pytest
from PIL import Image

from lseg.cli.main import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lseg import LSeg

    return str(LSeg.from_config("tiny").save_pretrained(tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), mode="L").save(folder / "b.jpg")
    return folder


def test_writes_label_maps_overlays_and_features(tmp_path, images, model_dir, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            str(images),
            "--labels",
            "cat, plant, other",
            "--checkpoint",
            model_dir,
            "--out",
            str(out),
            "--save-features",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    label_map = np.asarray(Image.open(out / "a.labels.png"))
    assert label_map.shape == (37, 53) and label_map.max() < 3
    assert Image.open(out / "b.overlay.png").size[1] >= 20
    assert np.load(out / "a.features.npy").shape == (32, 19, 27)
    assert "2 image(s)" in capsys.readouterr().out


def test_labels_file_and_size(tmp_path, images, model_dir):
    labels = tmp_path / "labels.txt"
    labels.write_text("sky\nroad\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "segment",
                str(images / "a.png"),
                "--labels-file",
                str(labels),
                "--checkpoint",
                model_dir,
                "--out",
                str(out),
                "--size",
                "24",
            ]
        )
        == 0
    )
    assert np.asarray(Image.open(out / "a.labels.png")).shape == (37, 53)  # original resolution


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.png", "--labels", "a, b"], "image not found"),
        (["EMPTY", "--labels", "a, b"], "no images in directory"),
        (["CORRUPT", "--labels", "a, b"], "cannot read image"),
        (["IMAGE", "--labels", "a, , b"], "empty label"),
        (["IMAGE", "--labels", "a, a"], "duplicate labels: a"),
        (["IMAGE", "--labels", "a", "--device", "cuda"], "CUDA is not available"),
        (["IMAGE", "--labels", "a", "--preset", "nope", "--checkpoint", None], "valid presets"),
        (["IMAGE", "--labels", "a", "--checkpoint", "does/not/exist.ckpt"], "checkpoint not found"),
    ],
)
def test_user_errors_are_one_line_and_leave_no_output(tmp_path, images, model_dir, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    replace = {
        "EMPTY": str(tmp_path / "empty"),
        "CORRUPT": str(tmp_path / "corrupt.jpg"),
        "IMAGE": str(images / "a.png"),
        "missing.png": str(tmp_path / "missing.png"),
    }
    args = [replace.get(a, a) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", model_dir]
    if None in args:  # --preset replaces --checkpoint
        index = args.index("--checkpoint")
        del args[index : index + 2]
    out = tmp_path / "out"
    code = main(["segment", *args, "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert code == 1
    assert message in error and error.count("\n") == 0 and "Traceback" not in error
    assert not out.exists() or not any(out.iterdir())


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("quickstart", "segment", "evaluate", "train", "features", "query", "convert", "demo"):
        assert command in text
