"""Which word of a synonym list is nearest to each training word, in a model's text space.

    python benchmarks/synonym_neighbours.py runs/camvid/model configs/labels/camvid_synonyms.txt

If a pixel's embedding sat exactly on its class's training word, asking with the synonym list would
give each class the synonym nearest to that word. A class whose nearest synonym belongs to another
class is one the list cannot recover whatever the image encoder learns (docs/results.md, CamVid).
Class names and training words are the CamVid ones unless --classes / --words name a file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lseg import LSeg, LSegError
from lseg.data import CAMVID_CLASSES, read_names
from lseg.evaluate.labels import read_synonyms

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a saved model folder (its text encoder embeds the words)")
    parser.add_argument("synonyms", nargs="+", help="synonym files: 'ClassName: word' lines")
    parser.add_argument("--classes", help="class names, one per line (default: CamVid's)")
    parser.add_argument("--words", default=str(REPO / "configs/labels/camvid.txt"), help="training words")
    args = parser.parse_args()
    classes = read_names(args.classes) if args.classes else list(CAMVID_CLASSES)
    words = read_names(args.words)
    model = LSeg.from_pretrained(args.checkpoint).eval()
    with torch.no_grad():
        anchors = F.normalize(model.encode_text(words).float(), dim=-1)
        for path in args.synonyms:
            mapping = read_synonyms(path, classes)
            asked = [mapping.get(name, word) for name, word in zip(classes, words)]
            nearest = (anchors @ F.normalize(model.encode_text(asked).float(), dim=-1).T).argmax(1).tolist()
            wrong = [(i, j) for i, j in enumerate(nearest) if i != j]
            print(f"{path}: {len(words) - len(wrong)} of {len(words)} words nearest to their own synonym")
            for i, j in wrong:
                print(f"  {words[i]} -> {asked[j]!r}, asked for {classes[j]}")


if __name__ == "__main__":
    try:
        main()
    except LSegError as error:  # a missing model or a bad synonym file: one line, not a traceback
        sys.exit(f"error: {error}")
