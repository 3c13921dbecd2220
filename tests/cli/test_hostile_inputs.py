"""A battery of hostile inputs against every command: images, label strings, config files, checkpoints
and output paths. The promise (README, "Errors"): exit status 1, one line on stderr that names the
problem, no traceback, no colour codes, nothing written, and no file of the user's touched."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lseg import LSeg
from lseg.cli.main import main
from tests.conftest import REPO_ROOT
from tests.hostile import good_image, png_header_bomb, real_bomb, snapshot, truncated_jpeg

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return LSeg.from_config("tiny", pretrained=False).save_pretrained(tmp_path_factory.mktemp("m") / "tiny")


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pwned')",))


class World:
    """A user's folder (the current directory during the command) holding the inputs of one case."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root, self.model_dir = root, model_dir
        self.image = good_image(root / "photo.png")
        (root / "notes.txt").write_text("the user's own file\n")
        (root / "report.txt").write_text("an existing file\n")

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def model_with_config(self, edit: Callable[[dict], object] | bytes) -> Path:
        folder = self.root / "model"
        shutil.copytree(self.model_dir, folder)
        if isinstance(edit, bytes):
            (folder / "config.json").write_bytes(edit)
        else:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps(edit(config)))
        return folder

    def checkpoint(self, kind: str) -> Path:
        path = self.root / f"{kind}.ckpt"
        if kind == "evil":
            torch.save({"state_dict": {"model.x": torch.zeros(1)}, "extra": Evil()}, path)
        elif kind == "raw-pickle":
            path.write_bytes(pickle.dumps(Evil()))
        elif kind == "truncated":
            torch.save({"state_dict": {"model.x": torch.zeros(1000)}}, path)
            path.write_bytes(path.read_bytes()[:300])
        else:  # an image named .ckpt
            path.write_bytes(self.image.read_bytes())
        return path

    def camvid(self, comment: bytes = b"", image: Callable[[Path], Path] | None = None) -> Path:
        from PIL import Image

        root = self.root / "camvid"
        (root / "val").mkdir(parents=True)
        (root / "valannot").mkdir()
        good_image(root / "val" / "a.png", size=(24, 32))
        if image is not None:
            image(root / "val" / "a.png")
        Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "valannot" / "a.png")
        (root / "val.txt").write_bytes(comment + b"val/a.png valannot/a.png\n")
        return root


def segment(w: World, *extra: object, image: object = None) -> list[object]:
    return ["segment", image or w.image, "--labels", "cat, other", "--out", "out", *extra]


def with_model(w: World, argv: list[object]) -> list[object]:
    return argv if "--checkpoint" in argv or "--preset" in argv else [*argv, "--checkpoint", w.model_dir]


def features(w: World, *extra: object, image: object = None) -> list[object]:
    return ["features", image or w.image, "--out", "feats", *extra]


def evaluate(w: World, *extra: object, root: Path | None = None) -> list[object]:
    root = root or w.camvid()
    return [
        "evaluate",
        "--dataset",
        "camvid",
        "--data-root",
        root,
        "--out",
        "eval",
        "--device",
        "cpu",
        *extra,
    ]


def config(edit) -> Callable[[World], list[object]]:
    return lambda w: segment(w, "--checkpoint", w.model_with_config(edit))


LATIN1 = "caf\xe9\nroad\n".encode("latin-1")

CASES: dict[str, Callable[[World], list[object]]] = {
    # images
    "segment-header-bomb": lambda w: segment(w, image=png_header_bomb(w.root / "bomb.png")),
    "segment-real-bomb": lambda w: segment(w, image=real_bomb(w.root / "bomb.png")),
    "segment-truncated-jpeg": lambda w: segment(w, image=truncated_jpeg(w.root / "cut.jpg")),
    "segment-not-an-image": lambda w: segment(w, image=w.file("fake.png", "hello")),
    "segment-empty-file": lambda w: segment(w, image=w.file("empty.jpg", b"")),
    "segment-missing-image": lambda w: segment(w, image=w.root / "missing.png"),
    "features-real-bomb": lambda w: features(w, image=real_bomb(w.root / "bomb.png")),
    "features-truncated-jpeg": lambda w: features(w, image=truncated_jpeg(w.root / "cut.jpg")),
    "evaluate-bomb-in-dataset": lambda w: evaluate(w, root=w.camvid(image=real_bomb)),
    # label strings and files
    "labels-empty": lambda w: [*segment(w)[:2], "--labels", "", "--out", "out"],
    "labels-stray-comma": lambda w: [*segment(w)[:2], "--labels", "a, , b", "--out", "out"],
    "labels-case-duplicates": lambda w: [*segment(w)[:2], "--labels", "cat, Cat", "--out", "out"],
    "labels-10000-chars": lambda w: [*segment(w)[:2], "--labels", "x" * 10_000, "--out", "out"],
    "labels-file-latin1": lambda w: [*segment(w)[:2], "--labels-file", w.file("l.txt", LATIN1), "--out", "o"],
    "labels-file-empty": lambda w: [*segment(w)[:2], "--labels-file", w.file("l.txt", ""), "--out", "o"],
    "labels-file-missing": lambda w: [*segment(w)[:2], "--labels-file", w.root / "nope.txt", "--out", "o"],
    "evaluate-labels-file-latin1": lambda w: evaluate(w, "--labels-file", w.file("l.txt", LATIN1)),
    "evaluate-list-file-latin1": lambda w: evaluate(w, root=w.camvid(comment=b"# caf\xe9\n")),
    "query-empty-text": lambda w: ["query", w.file("f.npy", b""), "--text", " ", "--out", "q"],
    # model config files
    "config-not-utf8": config(b'{"features": "caf\xe9"}'),
    "config-a-list": config(lambda c: [c]),
    "config-a-string": config(lambda c: "vit_b16"),
    "config-null": config(lambda c: None),
    "config-features-abc": config(lambda c: {**c, "features": "abc"}),
    "config-features-negative": config(lambda c: {**c, "features": -5}),
    "config-unknown-timm-kwargs": config(
        lambda c: {**c, "image_encoder": {**c["image_encoder"], "kwargs": {"no_such_option": 1}}}
    ),
    "config-newer-format": config(lambda c: {**c, "format_version": 99}),
    "features-config-not-utf8": lambda w: features(w, "--checkpoint", w.model_with_config(b"\xff\xfe")),
    # checkpoints
    "segment-evil-ckpt": lambda w: segment(w, "--checkpoint", w.checkpoint("evil")),
    "segment-raw-pickle-ckpt": lambda w: segment(w, "--checkpoint", w.checkpoint("raw-pickle")),
    "segment-truncated-ckpt": lambda w: segment(w, "--checkpoint", w.checkpoint("truncated")),
    "segment-image-as-ckpt": lambda w: segment(w, "--checkpoint", w.checkpoint("image")),
    "segment-mistyped-local-path": lambda w: segment(w, "--checkpoint", w.file("ck/x", "") and "ck/nope"),
    "convert-evil-ckpt": lambda w: ["convert", w.checkpoint("evil"), "converted"],
    "convert-image": lambda w: ["convert", w.checkpoint("image"), "converted"],
    "demo-evil-ckpt": lambda w: ["demo", "--checkpoint", w.checkpoint("evil")],
    "demo-config-not-utf8": lambda w: ["demo", "--checkpoint", w.model_with_config(b"\xff")],
    "train-missing-ckpt": lambda w: ["train", "--config", SMOKE, "--ckpt_path", "missing.ckpt"],
    "train-evil-ckpt": lambda w: ["train", "--config", SMOKE, "--ckpt_path", w.checkpoint("evil")],
    # output paths and sizes
    "segment-out-is-a-file": lambda w: [*segment(w)[:-2], "--out", "report.txt"],
    "segment-out-under-a-file": lambda w: [*segment(w)[:-2], "--out", "report.txt/sub"],
    "segment-size-20000": lambda w: segment(w, "--size", "20000"),
    "features-out-is-a-file": lambda w: [*features(w)[:-2], "--out", "report.txt"],
    "segment-merge-out-missing": lambda w: [*segment(w)[:-2], "--out", "nowhere", "--merge"],
    "features-merge-out-missing": lambda w: [*features(w)[:-2], "--out", "nowhere", "--merge"],
    "features-size-20000": lambda w: features(w, "--size", "20000"),
    "evaluate-out-is-a-file": lambda w: [*evaluate(w)[:-4], "--out", "report.txt", "--device", "cpu"],
    "evaluate-size-20000": lambda w: evaluate(w, "--size", "20000"),
    "convert-out-is-a-file": lambda w: ["convert", w.checkpoint("truncated"), "report.txt"],
    "quickstart-out-is-a-file": lambda w: ["quickstart", "--out", "report.txt"],
    "quickstart-out-is-the-users-folder": lambda w: ["quickstart", "--out", "."],
}

NO_MODEL = ("convert", "train", "quickstart", "query")


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_one_line_and_touches_nothing(case, tmp_path, model_dir, capsys, monkeypatch):
    root = tmp_path / "user"
    root.mkdir()
    world = World(root, model_dir)
    argv = CASES[case](world)
    if argv[0] not in NO_MODEL:
        argv = with_model(world, argv)
    before = snapshot(root)
    monkeypatch.chdir(root)
    code = main([str(a) for a in argv])
    streams = capsys.readouterr()
    error = streams.err.strip()
    assert code == 1, f"exit {code}; stderr: {error[-500:]}"
    assert error.startswith("lseg: error: ") and error.count("\n") == 0, error[-2000:]
    assert "Traceback" not in error and "\x1b" not in error
    assert "weights_only=False" not in error and "pwned" not in streams.out + error
    assert snapshot(root) == before, f"files changed: {set(snapshot(root)) ^ set(before)}"
    assert sorted(os.listdir(root)) == sorted(before_top(before)), "a folder was created"


def before_top(files: dict[str, bytes]) -> set[str]:
    return {name.split(os.sep)[0] for name in files}
