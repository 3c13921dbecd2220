"""A per-class seen-class calibration for the CamVid-32 folds, learned on the held-out drive.

The constant calibration (`lseg evaluate --seen-bias B`) subtracts one B from every seen class's
logits. Here each seen class c gets its own offset B_c, fitted by coordinate ascent on the held-out
drive's hIoU from the constant B (the recipe's choice) as the start: each sweep tries moving one
class's offset by each of STEPS and keeps the best move if it gains at least MIN_GAIN. The unseen
classes' offsets stay 0: their labels only score the calibration, as for B, and no parameter is their
own. Then val is scored once with the fitted offsets and once with B.

    python benchmarks/camvid32_class_calibration.py --runs RUNS [--folds 0 1 2 3] [--variant NAME]

reads RUNS/camvid32_foldF[_NAME]/model (trained by benchmarks/camvid32_zeroshot.py) and writes
RUNS/camvid32[_NAME]_class_calibration.json, and each fold's offsets as
RUNS/camvid32_foldF[_NAME]/seen_bias.yaml, which `lseg evaluate --seen-bias-file` reads. The fit sees
every second pixel of every second row of the held-out drive; the held-out numbers reported are over
all its pixels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from camvid32_zeroshot import BIASES, drive_logits, fold_classes, fold_models, score_offsets  # noqa: E402

from lseg.evaluate.labels import UnseenClasses  # noqa: E402
from lseg.evaluate.metrics import confusion_matrix, metrics_from_confusion, seen_unseen_scores  # noqa: E402
from lseg.evaluate.runner import seen_offsets  # noqa: E402
from lseg.files import write_json_atomic, write_text_atomic  # noqa: E402

STEPS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
SWEEPS = 3
MIN_GAIN = 0.002  # hIoU in [0, 1]: 0.2 points


def scores(
    images: list[tuple[torch.Tensor, torch.Tensor]], offsets: torch.Tensor, unseen: UnseenClasses
) -> dict:
    """Seen / unseen mIoU, hIoU and per-class IoU of (N x ... logits, ... labels) pairs with the
    offsets (N x 1 [x 1]) subtracted from the logits."""
    num_classes = len(offsets)
    confmat = sum(
        confusion_matrix((logits - offsets).argmax(0), mask, num_classes) for logits, mask in images
    )
    iou = metrics_from_confusion(confmat)["per_class_iou"]
    return {**seen_unseen_scores(iou, unseen.unseen, unseen.apart), "per_class_iou": iou}


def fit(images: list, start: torch.Tensor, unseen: UnseenClasses) -> torch.Tensor:
    """Per-class offsets (`start`'s shape) by coordinate ascent on the hIoU of `scores`, the unseen
    classes' fixed at 0."""
    offsets, best = start.clone(), scores(images, start, unseen)["hiou"]
    movable = [c for c in range(len(offsets)) if c not in set(unseen.unseen)]
    low, high = min(BIASES), max(BIASES)
    for _ in range(SWEEPS):
        moved = False
        for c in movable:
            trials = []
            for step in STEPS:
                trial = offsets.clone()
                trial[c] = (trial[c] + step).clamp(low, high)
                trials.append((scores(images, trial, unseen)["hiou"], trial))
            score, trial = max(trials, key=lambda pair: pair[0])
            if score >= best + MIN_GAIN:
                offsets, best, moved = trial, score, True
        if not moved:
            break
    return offsets


def main() -> int:
    runs, suffix, models = fold_models(__doc__.splitlines()[0])
    results = []
    for fold, model in models:
        names, unseen = fold_classes(fold)
        cached = list(drive_logits(model))  # the held-out drive, full label resolution
        sample = [
            (
                torch.cat([logits[:, ::2, ::2].reshape(len(names), -1) for logits, _ in cached], dim=1),
                torch.cat([mask[::2, ::2].reshape(-1) for _, mask in cached]),
            )
        ]
        constants = {b: seen_offsets(unseen, b, torch.zeros(len(names), 1, 1)) for b in BIASES}
        sweep = {b: scores(cached, offsets, unseen)["hiou"] for b, offsets in constants.items()}
        bias = max(BIASES, key=lambda b: (sweep[b], -b))
        fitted = fit(sample, constants[bias][:, :, 0], unseen)[:, :, None]
        chosen = {"constant": constants[bias], "per_class": fitted}
        val = score_offsets(model, fold, chosen, "val", None)
        result = {
            "fold": fold,
            "bias": bias,
            "offsets": dict(zip(names, fitted.flatten().tolist())),
            "heldout": {key: scores(cached, offsets, unseen) for key, offsets in chosen.items()},
            "val": val,
        }
        seen = {
            name: offset
            for name, offset in result["offsets"].items()
            if names.index(name) not in unseen.unseen
        }
        offsets_file = runs / f"camvid32_fold{fold}{suffix}" / "seen_bias.yaml"
        write_text_atomic(offsets_file, yaml.safe_dump(seen, sort_keys=False))
        results.append(result)
        summary = {k: {key: round(v["hiou"], 4) for key, v in result[k].items()} for k in ("heldout", "val")}
        print(json.dumps({"fold": fold, "bias": bias, **summary}), file=sys.stderr)
        write_json_atomic(runs / f"camvid32{suffix}_class_calibration.json", results)  # the folds so far
    return 0


if __name__ == "__main__":
    sys.exit(main())
