"""A frequency-aware seen-class calibration for the CamVid-32 folds, measured on trained fold models.

The constant calibration (`lseg evaluate --seen-bias B`) subtracts B from every seen class's logits.
Here a seen class c loses B + T * log(f_c / f_mean) instead, where f_c is its share of the training
drive's labelled pixels (f_mean their geometric mean): T > 0 takes more off frequent seen classes, the
ones whose logits are high everywhere. B and T are chosen together on the held-out drive by hIoU
(T = 0 is the constant calibration), then val is scored once with them. One forward pass per image.

    python benchmarks/camvid32_calibration.py --runs RUNS [--folds 0 1 2 3] [--variant NAME]

reads RUNS/camvid32_foldF[_NAME]/model (trained by benchmarks/camvid32_zeroshot.py) and writes
RUNS/camvid32[_NAME]_calibration.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from camvid32_zeroshot import (  # noqa: E402
    BIASES,
    DATA,
    TRAIN_DRIVE,
    chosen_against_constant,
    fold_classes,
    fold_models,
    score_offsets,
)

from lseg.evaluate.runner import seen_offsets  # noqa: E402
from lseg.files import write_json_atomic  # noqa: E402

SLOPES = (-0.5, -0.25, 0.0, 0.25, 0.5, 1.0)


def log_frequency(class_names: list[str]) -> torch.Tensor:
    """log(f_c / geometric mean) of each class's labelled pixels on the training drive (0 where none)."""
    masks = sorted((Path(DATA) / "masks" / "train").glob(f"{TRAIN_DRIVE}_*.png"))
    counts = np.zeros(len(class_names))
    for path in masks:
        ids = np.asarray(Image.open(path)).ravel()
        counts += np.bincount(ids[ids < len(class_names)], minlength=len(class_names))
    logs = np.where(counts > 0, np.log(np.maximum(counts, 1)), np.nan)
    logs -= np.nanmean(logs)
    return torch.tensor(np.nan_to_num(logs), dtype=torch.float32)


def main() -> int:
    runs, suffix, models = fold_models(__doc__.splitlines()[0])
    results = []
    frequency = log_frequency(fold_classes(0)[0])[:, None, None]  # one training drive for every fold
    for fold, model in models:
        names, unseen = fold_classes(fold)
        seen = seen_offsets(unseen, 1.0, torch.zeros(len(names), 1, 1))  # 1 for a seen class, 0 unseen
        grid = {(bias, slope): seen * (bias + slope * frequency) for bias in BIASES for slope in SLOPES}
        heldout = score_offsets(model, fold, grid)
        best = max(grid, key=lambda pair: (heldout[pair]["hiou"], -abs(pair[1]), -pair[0]))
        constant = max((p for p in grid if p[1] == 0), key=lambda pair: (heldout[pair]["hiou"], -pair[0]))
        val = score_offsets(model, fold, {pair: grid[pair] for pair in {best, constant}}, "val", None)
        results.append(chosen_against_constant(fold, best, constant, heldout, val))
        results[-1]["heldout_grid"] = {f"{b} {s}": heldout[(b, s)]["hiou"] for b, s in grid}
        print(json.dumps({k: results[-1][k] for k in ("fold", "chosen", "constant", "val")}), file=sys.stderr)
        write_json_atomic(runs / f"camvid32{suffix}_calibration.json", results)  # the folds so far
    return 0


if __name__ == "__main__":
    sys.exit(main())
