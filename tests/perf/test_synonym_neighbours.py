"""benchmarks/synonym_neighbours.py: which synonym each training word is nearest to."""

import subprocess
import sys
from pathlib import Path

from lseg import LSeg

REPO = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, *lists: Path) -> subprocess.CompletedProcess:
    """The script on a tiny random model saved under `tmp_path`, offline."""
    LSeg.from_config("tiny").save_pretrained(tmp_path / "model")
    script = REPO / "benchmarks" / "synonym_neighbours.py"
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), *map(str, lists)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )


def test_swapped_synonyms_are_reported_with_the_class_they_were_asked_for(tmp_path):
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("Sky: road\nRoad: sky\n")  # exact words: each is nearest to the other class's
    same = tmp_path / "same.txt"
    same.write_text("Sky: sky\n")
    done = run(tmp_path, same, swapped)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{same}: 11 of 11 words nearest to their own synonym"
    assert lines[1] == f"{swapped}: 9 of 11 words nearest to their own synonym"
    assert lines[2:] == ["  sky -> 'sky', asked for Road", "  road -> 'road', asked for Sky"]


def test_a_bad_synonym_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("NotAClass: word\n")
    done = run(tmp_path, bad)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "NotAClass" in done.stderr
