"""The one owner of reading users' text files and writing our output files.

Every file lseg writes goes through `write_atomic`: a hidden temporary file beside the target, created
with mode 0o666 so the kernel applies the user's umask (no process-wide umask toggling, which races with
threads), then `os.replace`. Readers never see half-written files, and a failure leaves the target as it
was. Nothing here deletes or replaces a folder.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

from lseg.errors import LSegError

_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{8}\.tmp")  # write_atomic's temporary files


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """`write(file)` into a temporary file beside `path`, then rename it onto `path`.

    The parent folder must exist. An existing folder at `path` is never replaced (LSegError).
    """
    path = Path(path)
    if path.is_dir():
        raise LSegError(f"cannot write {path}: a folder of that name exists")
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def remove_interrupted_writes(folder: str | Path, stems: Iterable[str]) -> list[Path]:
    """Delete the temporary files `write_atomic` left in `folder` for outputs named `STEM.*` (a process
    killed mid-write cannot remove its own). Only our exact pattern, `.NAME.<8 hex>.tmp`, of the given
    stems: call it for images no other process is writing. The files removed."""
    stems, removed = set(stems), []
    folder = Path(folder)
    if not stems or not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        target = match["target"].split(".")
        if any(".".join(target[:end]) in stems for end in range(1, len(target))):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


def write_text_atomic(path: str | Path, text: str) -> Path:
    data = text.encode("utf-8")
    return write_atomic(path, lambda file: file.write(data))


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def save_image(image: Any, path: str | Path) -> Path:
    """A PIL image or uint8/uint16 array, in the format the suffix names (PNG for `.png`)."""
    from PIL import Image

    path = Path(path)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return write_atomic(path, lambda file: image.save(file, format=image_format))


def save_array(array: np.ndarray, path: str | Path) -> Path:
    """`.npy` without pickles."""
    return write_atomic(path, lambda file: np.save(file, array, allow_pickle=False))


def read_text(path: str | Path, what: str = "file") -> str:
    """A user's text file as UTF-8 (a leading byte-order mark is dropped); LSegError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise LSegError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise LSegError(f"cannot read {what} {path}: {error.strerror or error}") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise LSegError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); "
            "save it with UTF-8 encoding"
        ) from error


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output path that is an existing file or sits under one.

    The folder itself is created later by `make_output_folder`, once there is something to write.
    """
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise LSegError(f"{option} {path}: {candidate} exists and is not a folder")
            if not os.access(candidate, os.W_OK | os.X_OK):
                raise LSegError(f"{option} {path}: {candidate} is not writable")
            break
    return path


def make_output_folder(path: str | Path, option: str = "--out") -> Path:
    path = check_output_folder(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LSegError(f"cannot create {option} {path}: {error.strerror or error}") from error
    return path
