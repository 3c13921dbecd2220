"""benchmarks/synonym_neighbours.py: which synonym each training word is nearest to."""

import subprocess
import sys
from pathlib import Path

from lseg import LSeg

REPO = Path(__file__).resolve().parents[2]


def test_swapped_synonyms_are_reported_with_the_class_they_were_asked_for(tmp_path):
    LSeg.from_config("tiny").save_pretrained(tmp_path / "model")
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("Sky: road\nRoad: sky\n")  # exact words: each is nearest to the other class's
    same = tmp_path / "same.txt"
    same.write_text("Sky: sky\n")
    script = REPO / "benchmarks" / "synonym_neighbours.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(same), str(swapped)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{same}: 11 of 11 words nearest to their own synonym"
    assert lines[1] == f"{swapped}: 9 of 11 words nearest to their own synonym"
    assert lines[2:] == ["  sky -> 'sky', asked for Road", "  road -> 'road', asked for Sky"]
