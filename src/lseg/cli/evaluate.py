"""`lseg evaluate`: mIoU & co. of a model on a segmentation dataset, or a zero-shot benchmark fold.

Writes into --out: metrics.json (every number, the configuration and provenance), per_class_iou.png,
confusion_matrix.png, best_worst.png (dataset evaluation) and prints the results as a table.
Runs under `torchrun` too: each process scores a shard, rank 0 writes the reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lseg.cli.common import add_model_arguments, check_model_named, load_model_from_args
from lseg.errors import LSegError

SETTINGS = ("size", "crop_size", "stride", "batch_size", "num_workers", "max_images", "rank_by")  # options


def zeroshot_names() -> list[str]:
    """The zero-shot benchmarks by their command-line names, from the benchmark registry."""
    from lseg.evaluate.zeroshot import BENCHMARKS

    return [record.display for record in BENCHMARKS.values()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from lseg.data import DATASETS

    parser = subparsers.add_parser(
        "evaluate",
        help="score a model on a segmentation dataset or a zero-shot benchmark",
        description="Evaluate a model: pixel accuracy, mean class accuracy, mIoU, fwIoU and per-class IoU "
        f"at the original label resolution (or, for {' / '.join(zeroshot_names())}, zero-shot mIoU and "
        "FB-IoU of one fold). Writes metrics.json and charts into --out; see docs/evaluation.md.",
    )
    parser.add_argument(
        "--dataset", required=True, choices=[*DATASETS, *zeroshot_names()], help="dataset to score"
    )
    parser.add_argument("--data-root", required=True, help="dataset root folder")
    parser.add_argument(
        "--split", help="split (default: val; for --dataset folder: none, i.e. ROOT/images and ROOT/masks)"
    )
    parser.add_argument(
        "--sequences",
        nargs="+",
        metavar="ID",
        help="camvid, folder: score only these drives (file-name prefixes such as 0006R0), e.g. one "
        "held out of training",
    )
    parser.add_argument("--out", required=True, help="output folder for the reports")
    words = parser.add_mutually_exclusive_group()
    words.add_argument(
        "--labels-file", help="text asked for each class: one label per line, line i for class i"
    )
    words.add_argument(
        "--synonyms", help="lines 'ClassName: word' (or ClassName<TAB>word) replacing the text of classes"
    )
    parser.add_argument(
        "--protocol", default="single", help="inference protocol: single (default), slide, lseg-ms"
    )
    parser.add_argument(
        "--size",
        type=int,
        help="long side (pixels, 8 to 4096) the model sees at scale 1: resizes the image for single/slide, "
        "replaces the base size of lseg-ms (zero-shot: N x N, default 480)",
    )
    parser.add_argument("--crop-size", type=int, help="sliding-window crop of slide/lseg-ms (default 480)")
    parser.add_argument("--stride", type=int, help="sliding-window stride (default: 2/3 of the crop)")
    parser.add_argument(
        "--prompt-template",
        help='prompt wrapping each label, e.g. "a photo of a {}." (default: the model\'s)',
    )
    parser.add_argument(
        "--label-space",
        default="dataset",
        choices=("dataset", "universal"),
        help="dataset: ask for the dataset's classes; universal: ask for the 194 MSeg universal classes and "
        "map predictions to the dataset's classes through MSeg_master.tsv",
    )
    parser.add_argument(
        "--taxonomy-column",
        help="with --label-space universal: MSeg_master.tsv column naming the dataset's classes",
    )
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images (episodes)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loading processes (default 0)")
    parser.add_argument(
        "--rank-by", default="miou", choices=("miou", "pixel_accuracy"), help="per-image score for best/worst"
    )
    parser.add_argument(
        "--examples", type=int, default=4, help="best and worst images shown (default 4 each)"
    )
    unseen = parser.add_mutually_exclusive_group()
    unseen.add_argument(
        "--unseen",
        metavar="CLASS,CLASS",
        help="classes held out of training: every class is still asked; adds seen / unseen mIoU and "
        "their harmonic mean hIoU (generalised zero-shot)",
    )
    unseen.add_argument(
        "--unseen-file",
        help="the unseen classes: one per line, or a folds YAML file (folds, apart) read at --fold",
    )
    bias = parser.add_mutually_exclusive_group()
    bias.add_argument(
        "--seen-bias",
        type=float,
        default=0.0,
        help="with --unseen: subtracted from the seen classes' logits (calibration; default 0)",
    )
    bias.add_argument(
        "--seen-bias-file",
        help="with --unseen: a YAML/JSON mapping of seen class -> bias, one per class (others: 0)",
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=0,
        help="zero-shot fold (pascal-5i, coco-20i: 0-3), or the fold of an --unseen-file folds file",
    )
    parser.add_argument(
        "--background", default="others", help="zero-shot background word (default: others, as the paper)"
    )
    add_model_arguments(parser)
    parser.set_defaults(run=run)


# ----------------------------------------------------------------------------- argument checks
def _check_args(args: argparse.Namespace) -> None:
    from lseg.data import DATASETS
    from lseg.files import check_output_folder
    from lseg.images import check_model_size
    from lseg.inference import resolve_protocol

    check_model_size(args.size)
    check_model_size(args.crop_size, "--crop-size")
    if args.batch_size < 1:
        raise LSegError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise LSegError(f"--max-images must be at least 1, got {args.max_images}")
    if args.num_workers < 0:
        raise LSegError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.examples < 0:
        raise LSegError(f"--examples must be >= 0, got {args.examples}")
    if args.prompt_template is not None and "{}" not in args.prompt_template:
        raise LSegError(
            f"--prompt-template must contain '{{}}' where the label goes, got {args.prompt_template!r}"
        )
    resolve_protocol(args.protocol, args.size, args.crop_size, args.stride)  # fails early on bad values
    check_model_named(args)
    check_output_folder(args.out)
    if args.sequences is not None and not (args.dataset in DATASETS and DATASETS[args.dataset].has_sequences):
        raise LSegError(f"--sequences selects drives (camvid, folder); --dataset {args.dataset} has none")
    unseen = args.unseen is not None or args.unseen_file is not None
    for flag, value in (("--seen-bias", args.seen_bias), ("--seen-bias-file", args.seen_bias_file)):
        if value and not unseen:
            raise LSegError(f"{flag} calibrates seen against unseen classes; give --unseen or --unseen-file")
    if unseen and args.label_space != "dataset":
        raise LSegError("--unseen scores the dataset's classes; it does not apply to --label-space universal")
    if args.dataset in zeroshot_names():
        if unseen:
            raise LSegError("zero-shot benchmarks hold out whole folds already; --unseen is for datasets")
        if args.label_space != "dataset":
            raise LSegError(
                "--label-space universal applies to segmentation datasets, not zero-shot benchmarks"
            )
        if args.labels_file:
            raise LSegError("zero-shot benchmarks ask one class at a time; use --synonyms, not --labels-file")
        if args.protocol != "single":
            raise LSegError("zero-shot benchmarks use the single protocol (one 480 x 480 pass), as the paper")


def _progress_bar(console: Any, description: str) -> tuple[Any, Any]:
    """A transient rich progress bar (drawn on rank 0 only) and its `progress(done, total)` callback."""
    from rich.progress import Progress

    from lseg.evaluate import is_main_process

    bar = Progress(console=console, transient=True, disable=not is_main_process())
    task = bar.add_task(description, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def _run_dataset(args: argparse.Namespace, device: Any, console: Any) -> list[Path]:
    from lseg.evaluate import build_label_space, default_split, evaluate, is_main_process, load_dataset
    from lseg.evaluate import report as R
    from lseg.evaluate.labels import read_seen_bias, read_unseen

    split = args.split if args.split is not None else default_split(args.dataset)
    dataset = load_dataset(args.dataset, args.data_root, split, args.sequences)
    space = build_label_space(  # before loading the model: bad word files fail fast
        dataset.class_names,
        dataset=args.dataset,
        label_space=args.label_space,
        labels_file=args.labels_file,
        synonyms=args.synonyms,
        taxonomy_column=args.taxonomy_column,
    )
    unseen = read_unseen(
        dataset.class_names, args.unseen, args.unseen_file, args.fold if args.unseen_file else None
    )
    seen_bias = (
        read_seen_bias(args.seen_bias_file, dataset.class_names, unseen)
        if args.seen_bias_file
        else args.seen_bias
    )
    model = load_model_from_args(args, device)
    bar, progress = _progress_bar(console, "evaluating")
    with bar:
        report = evaluate(
            model,
            dataset,
            args.protocol,
            space,
            prompt_template=args.prompt_template,
            device=device,
            progress=progress,
            num_examples=args.examples,
            unseen=unseen,
            seen_bias=seen_bias,
            **{name: getattr(args, name) for name in SETTINGS},
        )
    if not is_main_process():
        return []
    paths = R.write_dataset_report(report, vars(args), split)
    R.print_segmentation(
        report,
        f"lseg evaluate {args.dataset}/{split or '-'}: {report.images} image(s), "
        f"{report.images_per_second:.2f} images/s",
    )
    return paths


def _run_zeroshot(args: argparse.Namespace, device: Any, console: Any) -> list[Path]:
    from lseg.evaluate import evaluate_zeroshot
    from lseg.evaluate import report as R
    from lseg.evaluate.labels import read_synonyms
    from lseg.evaluate.zeroshot import benchmark_classes

    synonyms = read_synonyms(args.synonyms, benchmark_classes(args.dataset)) if args.synonyms else None
    model = load_model_from_args(args, device)
    bar, progress = _progress_bar(console, "zero-shot episodes")
    with bar:
        report = evaluate_zeroshot(
            model,
            args.dataset,
            args.data_root,
            args.fold,
            synonyms=synonyms,
            background=args.background,
            size=args.size or 480,
            prompt_template=args.prompt_template,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            max_episodes=args.max_images,
            progress=progress,
        )
    paths = R.write_zeroshot_report(report, vars(args))
    R.print_summary(
        f"lseg evaluate {args.dataset} fold {args.fold}: {report.episodes} episode(s), "
        f"{report.images_per_second if report.seconds > 0 else 0:.2f} images/s",
        {"mIoU": report.miou, "FB-IoU": report.fb_iou},
        report.per_class_iou,
    )
    return paths


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lseg.evaluate import distributed_device
    from lseg.evaluate.report import require_matplotlib

    _check_args(args)
    require_matplotlib()  # fail before any inference, not after
    console = Console(stderr=True)
    with distributed_device(args.device) as device:
        paths = (_run_zeroshot if args.dataset in zeroshot_names() else _run_dataset)(args, device, console)
    if paths:
        console.print(f"reports: {', '.join(str(p) for p in paths)}")
    return 0
