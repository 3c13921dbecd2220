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


# --------------------------------------------------------------------------- batches and hostile inputs
def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    streams = capsys.readouterr()
    return code, streams.out, streams.err.strip()


def test_a_bad_image_in_a_folder_does_not_stop_the_others(tmp_path, model_dir, capsys):
    from tests.hostile import good_image, real_bomb, truncated_jpeg

    folder = tmp_path / "images"
    folder.mkdir()
    good_image(folder / "a.png")
    truncated_jpeg(folder / "b.jpg")
    real_bomb(folder / "c.png")
    good_image(folder / "d.png", seed=1)
    out = tmp_path / "out"
    code, _, error = run_cli(
        capsys, "segment", folder, "--labels", "a, b", "--checkpoint", model_dir, "--out", out
    )
    assert code == 1
    lines = error.splitlines()
    assert len(lines) == 3 and "Traceback" not in error
    assert "b.jpg" in lines[0] and "truncated" in lines[0] and "c.png" in lines[1]
    assert lines[2] == "lseg: error: 2 of 4 inputs failed (listed above); the others were processed"
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json",
        "a.labels.png",
        "a.overlay.png",
        "d.json",
        "d.labels.png",
        "d.overlay.png",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--protocol", "bogus"], "unknown inference protocol"),
        (["--size", "20000"], "--size must be between 8 and 4096 pixels, got 20000"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_failed_runs_create_no_output_folder(tmp_path, images, model_dir, capsys, extra, message):
    out = tmp_path / "new" / "out"
    code, _, error = run_cli(
        capsys, "segment", images, "--labels", "a, b", "--checkpoint", model_dir, "--out", out, *extra
    )
    assert code == 1 and message in error and error.count("\n") == 0
    assert not (tmp_path / "new").exists()


def test_a_single_truncated_image_leaves_no_output_folder(tmp_path, model_dir, capsys):
    from tests.hostile import truncated_jpeg

    image = truncated_jpeg(tmp_path / "cut.jpg")
    out = tmp_path / "out"
    code, _, error = run_cli(
        capsys, "segment", image, "--labels", "a", "--checkpoint", model_dir, "--out", out
    )
    assert code == 1 and error.count("\n") == 0 and "truncated" in error
    assert not out.exists()


def test_out_that_is_a_file_is_refused_and_untouched(tmp_path, images, model_dir, capsys):
    report = tmp_path / "report.txt"
    report.write_text("mine")
    for out in (report, report / "sub"):
        code, _, error = run_cli(
            capsys, "segment", images, "--labels", "a", "--checkpoint", model_dir, "--out", out
        )
        assert code == 1 and "exists and is not a folder" in error and error.count("\n") == 0
    assert report.read_text() == "mine"


def test_labels_files_must_be_utf8_and_a_bom_is_dropped(tmp_path, images, model_dir, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\nroad\n".encode("latin-1"))
    out = tmp_path / "out"
    argv = ["segment", images / "a.png", "--checkpoint", model_dir, "--out", out]
    code, _, error = run_cli(capsys, *argv, "--labels-file", latin)
    assert code == 1 and "is not UTF-8 text (byte 0xe9 on line 1)" in error and not out.exists()
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffcat\nroad\n".encode())
    assert run_cli(capsys, *argv, "--labels-file", bom)[0] == 0
    legend = np.asarray(Image.open(out / "a.overlay.png"))
    assert legend.shape[0] >= 37  # written; the labels are checked through parse_labels below
    from lseg.labels import parse_labels

    assert parse_labels(None, str(bom)) == ["cat", "road"]


def test_batch_size_reaches_the_model_and_features_follow_the_protocol(
    tmp_path, model_dir, capsys, monkeypatch
):
    import torch

    from lseg import LSeg
    from tests.hostile import good_image

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(4):
        good_image(folder / f"{index}.png", size=(40, 56), seed=index)
    batches = []
    forward = LSeg.pixel_embeddings  # what segment's passes run (then the head, at stride 2)

    def spy(self, pixel_values, *args, **kwargs):
        batches.append(pixel_values.shape[0])
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(LSeg, "pixel_embeddings", spy)
    out = tmp_path / "out"
    argv = ["segment", folder, "--labels", "a, b", "--checkpoint", model_dir, "--out", out]
    assert run_cli(capsys, *argv, "--batch-size", "2")[0] == 0
    assert batches == [2, 2]
    monkeypatch.setattr(LSeg, "pixel_embeddings", forward)

    assert run_cli(capsys, *argv, "--protocol", "lseg-ms", "--size", "32", "--save-features")[0] == 0
    model = LSeg.from_pretrained(model_dir).eval()
    image = str(folder / "0.png")
    expected = model.encode_image(image, size=32, protocol="lseg-ms").half().float()
    single = model.encode_image(image, size=32).half().float()
    saved = torch.from_numpy(np.load(out / "0.features.npy")).float()
    assert saved.shape == expected.shape
    assert torch.allclose(saved, expected, atol=2e-3)
    assert saved.shape != single.shape  # lseg-ms keeps the original grid; single saw 32 px


def test_hostile_file_names_cannot_inject_terminal_codes(tmp_path, model_dir, capsys):
    name = tmp_path / "evil\x1b[31m\nname.png"
    name.write_bytes(b"not an image")
    code, _, error = run_cli(
        capsys, "segment", name, "--labels", "a", "--checkpoint", model_dir, "--out", tmp_path / "o"
    )
    assert code == 1 and "\x1b" not in error and error.count("\n") == 0 and "evil" in error


def test_the_text_encoder_is_released_once_the_labels_are_embedded(tmp_path, images, model_dir, monkeypatch):
    """A run knows its labels: the text weights are freed before any image is segmented (memory)."""
    from lseg import LSeg

    released = []
    real_release = LSeg.release_text_encoder

    def spy(self, labels):
        released.append(list(labels))
        return real_release(self, labels)

    monkeypatch.setattr(LSeg, "release_text_encoder", spy)
    argv = ["segment", str(images), "--labels", "cat, plant", "--checkpoint", model_dir, "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert released == [["cat", "plant"]]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0  # nothing left to do: no model loaded
    assert released == [["cat", "plant"]]


def test_a_decoder_wider_than_the_machine_is_refused_before_anything_is_built(
    tmp_path, images, model_dir, capsys, monkeypatch
):
    """`features: 1000000000` cannot be built anywhere; torch's allocation failure used to be reported
    as "out of memory; use a smaller --size or --batch-size"."""
    import json
    import shutil

    import lseg.model.lseg

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "features": 1_000_000_000}))

    def no_building(*args, **kwargs):
        raise AssertionError("an encoder was built")

    monkeypatch.setattr(lseg.model.lseg, "build_text_encoder", no_building)
    argv = ["segment", str(images), "--labels", "cat, other", "--checkpoint", str(folder),
            "--out", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("lseg: error: model config features 1000000000 ")
    assert "451.0 EiB of float32 decoder weights" in error and "cannot be built" in error
    assert "--size" not in error and not (tmp_path / "out").exists()


def test_a_rerun_removes_what_a_killed_run_left_half_written(tmp_path, images, model_dir):
    """A process killed mid-write leaves write_atomic's temporary file; the run that redoes the image
    removes it, so the folder holds only finished outputs."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".a.overlay.png.0123abcd.tmp").write_bytes(b"half an image")
    arguments = ["--labels", "cat, plant", "--checkpoint", model_dir, "--out", str(out), "--device", "cpu"]
    code = main(["segment", str(images), *arguments])
    assert code == 0 and not list(out.glob(".*.tmp")) and (out / "a.overlay.png").is_file()
