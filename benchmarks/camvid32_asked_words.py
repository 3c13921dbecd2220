"""Asking each CamVid-32 class by its MSeg synonyms and parents at inference, on trained fold models.

Each class's embedding is the mean of its word's and its alternatives' embeddings (each averaged over
the prompt templates), from the alternatives of configs/labels/camvid32_mseg_words.yaml, for every
class, seen and unseen: a prompt ensemble over words. The seen-class bias is chosen on the held-out
drive for the words and for the ensemble separately, then val is scored once with each.

    python benchmarks/camvid32_asked_words.py --runs RUNS [--folds 0 1 2 3] [--variant NAME]

reads RUNS/camvid32_foldF[_NAME]/model (trained by benchmarks/camvid32_zeroshot.py) and writes
RUNS/camvid32[_NAME]_asked_words.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from camvid32_zeroshot import BIASES, fold_classes, fold_models, score_offsets  # noqa: E402

from lseg import LSeg  # noqa: E402
from lseg.evaluate.labels import read_alternatives, read_synonyms  # noqa: E402
from lseg.evaluate.runner import seen_offsets  # noqa: E402
from lseg.files import write_json_atomic  # noqa: E402

WORDS = "configs/labels/camvid32_mseg_words.yaml"


def ensembles(model: LSeg, names: list[str]) -> dict[str, torch.Tensor]:
    """N x D class embeddings: the words alone, and averaged with the alternatives."""
    words, alternatives = read_synonyms(WORDS, names), read_alternatives(WORDS, names)
    asked = [[words[name], *alternatives.get(name, [])] for name in names]
    return {
        "words": model.encode_text([options[0] for options in asked]),
        "alternatives": torch.stack([F.normalize(model.encode_text(o).mean(0), dim=-1) for o in asked]),
    }


def main() -> int:
    runs, suffix, models = fold_models(__doc__.splitlines()[0])
    results = []
    for fold, model in models:
        names, unseen = fold_classes(fold)
        offsets = {bias: seen_offsets(unseen, bias, torch.zeros(len(names), 1, 1)) for bias in BIASES}
        result = {"fold": fold}
        for key, text in ensembles(model, names).items():
            heldout = score_offsets(model, fold, offsets, text=text)
            bias = max(BIASES, key=lambda b: (heldout[b]["hiou"], -b))
            val = score_offsets(model, fold, {bias: offsets[bias]}, "val", None, text=text)[bias]
            result[key] = {"bias": bias, "heldout": heldout[bias], "val": val}
        results.append(result)
        print(json.dumps(result), file=sys.stderr)
        write_json_atomic(runs / f"camvid32{suffix}_asked_words.json", results)  # the folds so far
    return 0


if __name__ == "__main__":
    sys.exit(main())
