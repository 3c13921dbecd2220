import os
import stat

import numpy as np
import pytest

from lseg.errors import LSegError
from lseg.files import (
    check_output_folder,
    make_output_folder,
    read_text,
    save_array,
    save_image,
    write_atomic,
    write_text_atomic,
)


def test_write_atomic_leaves_nothing_when_interrupted(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"previous")

    def explode(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "a.npy", explode)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]
    assert (tmp_path / "a.npy").read_bytes() == b"previous"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_follow_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = write_text_atomic(tmp_path / "x.txt", "hi")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_write_atomic_never_replaces_a_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(LSegError, match="folder"):
        write_text_atomic(tmp_path / "taken", "x")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_save_image_and_array_round_trip(tmp_path):
    from PIL import Image

    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    save_image(array, tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").format == "PNG"
    assert np.array_equal(np.array(Image.open(tmp_path / "a.png")), array)
    save_array(array.astype(np.float16), tmp_path / "a.npy")
    assert np.array_equal(np.load(tmp_path / "a.npy"), array.astype(np.float16))


def test_read_text_drops_bom_and_rejects_other_encodings(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffcat\ndog\n".encode())
    assert read_text(tmp_path / "bom.txt").splitlines() == ["cat", "dog"]
    (tmp_path / "latin.txt").write_bytes("cat\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(LSegError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_text(tmp_path / "latin.txt", "labels file")
    with pytest.raises(LSegError, match="labels file not found"):
        read_text(tmp_path / "missing.txt", "labels file")


def test_output_folder_checks_refuse_files_and_create_lazily(tmp_path):
    (tmp_path / "report.txt").write_text("mine")
    for bad in (tmp_path / "report.txt", tmp_path / "report.txt" / "sub"):
        with pytest.raises(LSegError, match="exists and is not a folder"):
            check_output_folder(bad)
    target = check_output_folder(tmp_path / "new" / "deeper")
    assert not target.exists()
    assert make_output_folder(target).is_dir()


def test_interrupted_writes_of_the_named_images_are_removed_and_nothing_else(tmp_path):
    """A task killed mid-write (SIGKILL) leaves write_atomic's temporary file; the rerun that owns those
    images removes it. A user's look-alike, other images' temporaries and finished files stay."""
    from lseg.files import remove_interrupted_writes

    names = [".007.overlay.png.7fd6fcd4.tmp", ".img.v2.json.0a1b2c3d.tmp", ".008.json.00000000.tmp",
             ".007.overlay.png.notes.tmp", "007.overlay.png", ".007.tmp"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_text("x")
    removed = remove_interrupted_writes(tmp_path, ["007", "img.v2"])
    assert sorted(path.name for path in removed) == [
        ".007.overlay.png.7fd6fcd4.tmp",
        ".img.v2.json.0a1b2c3d.tmp",
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[2:])
