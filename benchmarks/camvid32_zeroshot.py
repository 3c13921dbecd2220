"""Generalised zero-shot segmentation on CamVid's 31 fine classes: the four folds of
configs/labels/camvid32_folds.yaml, each trained without its unseen classes (configs/camvid32.yaml,
600 steps), calibrated on the held-out drive 0006R0 and scored on val; plus the same recipe on all 31.

    python benchmarks/camvid32_zeroshot.py [--runs runs] [--folds 0 1 2 3] [--all] [--train]
        [--variant NAME --config OVERRIDE.yaml ... --words SYNONYMS.yaml]

Per fold it writes RUNS/camvid32_foldF[_NAME]/{model, eval_val, eval_val_uncalibrated, eval_heldout}
(each an `lseg evaluate` report) and RUNS/camvid32[_NAME]_summary.json; docs/results.md quotes its
tables. A variant trains with override configs stacked on the recipe (the ablation). The seen-class
bias is the one of BIASES with the best hIoU on the held-out drive, from one forward pass per image.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from lseg import LSeg
from lseg.evaluate import build_label_space, load_dataset
from lseg.evaluate.labels import UnseenClasses, read_unseen
from lseg.evaluate.metrics import SegmentationMetrics, seen_unseen_scores
from lseg.evaluate.runner import EvaluationSettings, embed_labels, mask_logits, seen_offsets
from lseg.files import write_json_atomic

FOLDS = "configs/labels/camvid32_folds.yaml"
DATA = "../shared/data/camvid32"
TRAIN_DRIVE, HELDOUT_DRIVE = "0016E5", "0006R0"
BIASES = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 25.0, 30.0)
SIZE = 480


def train_arguments(out: Path, fold: int | None, overrides: list[str] = (), words: str = FOLDS) -> list[str]:
    """`lseg train` arguments of the recipe (+ override configs), without the fold's unseen classes
    (None: all classes); `words` is the training spec's synonyms file (its words must be FOLDS's)."""
    spec = f"{{name: folder, root: {DATA}, synonyms: {words}, options: {{sequences: ['{TRAIN_DRIVE}']}}"
    spec += f", unseen_file: {FOLDS}, fold: {fold}}}" if fold is not None else "}"
    configs = [arg for config in ["configs/camvid32.yaml", *overrides] for arg in ("--config", config)]
    return [*configs, "--trainer.default_root_dir", str(out), "--data.train", f"[{spec}]"]


def train(out: Path, fold: int | None, overrides: list[str], words: str) -> float:
    """Train the recipe; seconds taken."""
    start = time.perf_counter()
    subprocess.run(["lseg", "train", *train_arguments(out, fold, overrides, words)], check=True)
    return time.perf_counter() - start


def fold_classes(fold: int) -> tuple[list[str], UnseenClasses]:
    """The 31 class names and fold `fold`'s unseen and apart classes."""
    names = load_dataset("folder", DATA, "val").class_names
    return names, read_unseen(names, unseen_file=FOLDS, fold=fold)


def drive_logits(
    model: LSeg,
    split: str = "train",
    sequences: tuple[str, ...] | None = (HELDOUT_DRIVE,),
    text: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(31 x H x W float32 logits, H x W mask) of each image of `split` (by default the held-out drive),
    from one forward pass at long side SIZE, at the label resolution; `text`: the class embeddings
    asked (default: the folds file's words, one per class, so logit channel c is class c)."""
    dataset = load_dataset("folder", DATA, split, list(sequences) if sequences else None)
    space = build_label_space(dataset.class_names, synonyms=FOLDS)
    assert space.to_class is None and len(space.labels) == len(dataset.class_names)
    protocol, size = EvaluationSettings(size=SIZE).resolved_protocol()
    with torch.no_grad():
        text = embed_labels(model, space.labels) if text is None else text
        forward = lambda pixels: model(pixels, text).logits  # noqa: E731
        for index in range(len(dataset)):
            sample = dataset[index]
            (logits,) = mask_logits(
                forward, [sample], model.processor, protocol, size, device=torch.device("cpu")
            )
            yield logits, sample["mask"]


def score_offsets(
    model: LSeg,
    fold: int,
    offsets: dict,
    split: str = "train",
    sequences: tuple[str, ...] | None = (HELDOUT_DRIVE,),
    text: torch.Tensor | None = None,
) -> dict:
    """Seen / unseen mIoU and hIoU with each N x 1 x 1 tensor of `offsets` subtracted from the logits
    of `drive_logits` (by default the held-out drive's), from one forward pass per image."""
    names, unseen = fold_classes(fold)
    metrics = {key: SegmentationMetrics(len(names)) for key in offsets}
    for logits, mask in drive_logits(model, split, sequences, text):
        for key, metric in metrics.items():
            metric.update((logits - offsets[key].to(logits)).argmax(0)[None], mask[None])
    return {
        key: seen_unseen_scores(metric.compute()["per_class_iou"], unseen.unseen, unseen.apart)
        for key, metric in metrics.items()
    }


def chosen_against_constant(fold: int, chosen: tuple, constant: tuple, heldout: dict, val: dict) -> dict:
    """The record of a calibration chosen on the held-out drive beside the constant bias's choice, each
    scored there (`heldout`) and on val (`val`), both keyed by grid point."""
    return {
        "fold": fold,
        "chosen": chosen,
        "constant": constant,
        "heldout": {"chosen": heldout[chosen], "constant": heldout[constant]},
        "val": {"chosen": val[chosen], "constant": val[constant]},
    }


def fold_models(description: str) -> tuple[Path, str, Iterator[tuple[int, LSeg]]]:
    """Command line of a script that scores trained fold models (--runs, --folds, --variant): the runs
    folder, the variant's run-folder suffix and (fold, model) pairs, each model loaded when reached."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--variant", default="")
    args = parser.parse_args()
    suffix = f"_{args.variant}" if args.variant else ""
    models = (
        (fold, LSeg.from_pretrained(args.runs / f"camvid32_fold{fold}{suffix}" / "model").eval())
        for fold in args.folds
    )
    return args.runs, suffix, models


def calibrate(model_dir: Path, fold: int) -> dict[float, dict[str, float]]:
    """Seen / unseen mIoU and hIoU on the held-out drive for every bias of BIASES."""
    names, unseen = fold_classes(fold)
    zeros = torch.zeros(len(names), 1, 1)
    offsets = {bias: seen_offsets(unseen, bias, zeros) for bias in BIASES}
    return score_offsets(LSeg.from_pretrained(model_dir).eval(), fold, offsets)


def evaluate(model_dir: Path, out: Path, *extra: str, split: str = "val") -> dict:
    """`lseg evaluate` of the model on val (or the held-out drive); its metrics.json."""
    command = ["lseg", "evaluate", "--checkpoint", str(model_dir), "--dataset", "folder", "--data-root", DATA]
    command += [
        "--split",
        split,
        "--synonyms",
        FOLDS,
        "--size",
        str(SIZE),
        "--out",
        str(out),
        "--examples",
        "0",
    ]
    subprocess.run([*command, *extra], check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def fold_result(run: Path, fold: int, seconds: float | None) -> dict:
    sweep = calibrate(run / "model", fold)
    bias = max(BIASES, key=lambda b: (sweep[b]["hiou"], -b))
    unseen = ["--unseen-file", FOLDS, "--fold", str(fold)]
    val = evaluate(run / "model", run / "eval_val", *unseen, "--seen-bias", str(bias))
    raw = evaluate(run / "model", run / "eval_val_uncalibrated", *unseen)
    heldout = evaluate(run / "model", run / "eval_heldout", *unseen, "--seen-bias", str(bias),
                       "--sequences", HELDOUT_DRIVE, split="train")  # fmt: skip
    keys = ("miou_seen", "miou_unseen", "hiou", "miou_apart", "miou")
    return {
        "fold": fold,
        "unseen": val["unseen_classes"],
        "train_seconds": seconds,
        "seen_bias": bias,
        "heldout_sweep": {str(b): s for b, s in sweep.items()},
        "val": {k: val["metrics"][k] for k in keys},
        "val_uncalibrated": {k: raw["metrics"][k] for k in keys},
        "heldout": {k: heldout["metrics"][k] for k in keys},
        "val_per_class_iou": val["metrics"]["per_class_iou"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--all", action="store_true", help="also the model trained on all 31 classes")
    parser.add_argument("--train", action="store_true", help="train models that are not there yet")
    parser.add_argument("--variant", default="", help="name of an ablation variant (run folder suffix)")
    parser.add_argument("--config", action="append", default=[], help="override config of the variant")
    parser.add_argument("--words", default=FOLDS, help="synonyms file of training (with alternatives)")
    args = parser.parse_args()
    suffix = f"_{args.variant}" if args.variant else ""
    results: dict = {"folds": [], "size": SIZE, "biases": BIASES, "overrides": args.config}
    results["words"] = args.words
    summary = args.runs / f"camvid32{suffix}_summary.json"

    def trained(run: Path, fold: int | None) -> float | None:
        """Seconds taken to train `run`'s model; None where it is there already or --train is not given."""
        if not args.train or (run / "model").is_dir():
            return None
        return train(run, fold, args.config, args.words)

    for fold in args.folds:
        run = args.runs / f"camvid32_fold{fold}{suffix}"
        seconds = trained(run, fold)
        results["folds"].append(fold_result(run, fold, seconds))
        print(json.dumps(results["folds"][-1]["val"]), file=sys.stderr)
        write_json_atomic(summary, results)  # a stopped run keeps the folds it finished
    if args.all:
        run = args.runs / f"camvid32_all{suffix}"
        seconds = trained(run, None)
        val = evaluate(run / "model", run / "eval_val")
        heldout = evaluate(run / "model", run / "eval_heldout", "--sequences", HELDOUT_DRIVE, split="train")
        results["all"] = {
            "train_seconds": seconds,
            "val_miou": val["metrics"]["miou"],
            "heldout_miou": heldout["metrics"]["miou"],
            "val_per_class_iou": val["metrics"]["per_class_iou"],
            "classes_scored": val["metrics"]["classes_scored"],
        }
    write_json_atomic(summary, results)
    table = ("fold", "seen_bias", "val", "val_uncalibrated", "heldout")
    print(json.dumps([{key: fold[key] for key in table} for fold in results["folds"]], indent=1))
    if "all" in results:
        print(json.dumps({k: v for k, v in results["all"].items() if k != "val_per_class_iou"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
