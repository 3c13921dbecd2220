"""`lseg evaluate`: mIoU & co. of a model on a segmentation dataset, or a zero-shot benchmark fold.

Writes into --out: metrics.json (every number, the configuration and provenance), per_class_iou.png,
confusion_matrix.png, best_worst.png (dataset evaluation) and prints the results as a table.
Runs under `torchrun` too: each process scores a shard, rank 0 writes the reports.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lseg.errors import LSegError

SEGMENTATION_DATASETS = ("camvid", "ade20k", "mseg-ade20k", "mseg-coco-panoptic", "folder")
ZEROSHOT_DATASETS = ("pascal-5i", "coco-20i", "fss-1000")
LABEL_SPACES = ("dataset", "universal")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from lseg.cli.common import add_model_arguments

    parser = subparsers.add_parser(
        "evaluate",
        help="score a model on a segmentation dataset or a zero-shot benchmark",
        description="Evaluate a model: pixel accuracy, mean class accuracy, mIoU, fwIoU and per-class IoU "
        "at the original label resolution (or, for pascal-5i / coco-20i / fss-1000, zero-shot mIoU and "
        "FB-IoU of one fold). Writes metrics.json and charts into --out; see docs/evaluation.md.",
    )
    parser.add_argument(
        "--dataset", required=True, choices=SEGMENTATION_DATASETS + ZEROSHOT_DATASETS, help="dataset to score"
    )
    parser.add_argument("--data-root", required=True, help="dataset root folder")
    parser.add_argument(
        "--split", help="split (default: val; for --dataset folder: none, i.e. ROOT/images and ROOT/masks)"
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
        choices=LABEL_SPACES,
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
    parser.add_argument("--fold", type=int, default=0, help="zero-shot fold (pascal-5i, coco-20i: 0-3)")
    parser.add_argument(
        "--background", default="others", help="zero-shot background word (default: others, as the paper)"
    )
    add_model_arguments(parser)
    parser.set_defaults(run=run)


# ----------------------------------------------------------------------------- argument checks
def _check_args(args: argparse.Namespace) -> None:
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
    if not args.checkpoint and not args.preset:
        raise LSegError("give --checkpoint DIR_OR_ID (a trained model) or --preset NAME")
    check_output_folder(args.out)
    if args.dataset in ZEROSHOT_DATASETS:
        if args.label_space != "dataset":
            raise LSegError(
                "--label-space universal applies to segmentation datasets, not zero-shot benchmarks"
            )
        if args.labels_file:
            raise LSegError("zero-shot benchmarks ask one class at a time; use --synonyms, not --labels-file")
        if args.protocol != "single":
            raise LSegError("zero-shot benchmarks use the single protocol (one 480 x 480 pass), as the paper")


def _check_files(dataset: Any) -> None:
    """Fail before any inference if a listed image or label file is missing."""
    missing = []
    for image, label in dataset.pairs:
        for name in (image, label):
            path = dataset.root / name
            if not path.is_file():
                missing.append(str(path))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise LSegError(f"{len(missing)} dataset file(s) not found: {', '.join(missing[:3])}{more}")


# ----------------------------------------------------------------------------- distributed
def _setup_distributed(requested: str) -> tuple[Any, bool]:
    """Device, and whether this call initialised torch.distributed (under torchrun: WORLD_SIZE > 1)."""
    import torch
    import torch.distributed as dist

    from lseg.device import resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        if (
            dist.is_available()
            and dist.is_initialized()
            and requested == "auto"
            and torch.cuda.is_available()
        ):
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), False
        return resolve_device(requested), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True


# ----------------------------------------------------------------------------- model
def _load_model(args: argparse.Namespace, device: Any) -> Any:
    from lseg import LSeg

    model = LSeg.from_pretrained(args.checkpoint) if args.checkpoint else LSeg.from_config(args.preset)
    encoder = getattr(model, "text_encoder", None)
    if encoder is None or not hasattr(encoder, "encode"):
        raise LSegError(f"{args.checkpoint or args.preset} has no text encoder to embed the label words")
    if args.prompt_template is not None:
        encoder.prompt_templates = [args.prompt_template]
    return model.to(device).eval()


def _check_text(model: Any, labels: list[str], source: str) -> None:
    try:
        model.encode_text(labels[:1])
    except LSegError:
        raise
    except Exception as error:
        raise LSegError(f"the text encoder of {source} cannot embed labels: {error}") from error


# ----------------------------------------------------------------------------- dataset evaluation
def _label_space(args: argparse.Namespace, class_names: list[str]) -> Any:
    from lseg.evaluate import labels as L

    if args.label_space == "universal":
        from lseg.data.taxonomy import universal_names

        universal = universal_names()
        words = L.universal_prompt_names()
        if args.labels_file:
            words = L.read_labels_file(args.labels_file, universal)
        elif args.synonyms:
            synonyms = L.read_synonyms(args.synonyms, universal)
            words = [synonyms.get(u, w) for u, w in zip(universal, words, strict=True)]
        return L.universal_label_space(args.dataset, class_names, words, args.taxonomy_column)
    if args.taxonomy_column:
        raise LSegError("--taxonomy-column only applies with --label-space universal")
    if args.labels_file:
        return L.dataset_label_space(class_names, L.read_labels_file(args.labels_file, class_names))
    if args.synonyms:
        return L.dataset_label_space(
            class_names, L.apply_synonyms(class_names, L.read_synonyms(args.synonyms, class_names))
        )
    return L.dataset_label_space(class_names)


def _build_dataset(args: argparse.Namespace) -> Any:
    from lseg.data import build_dataset

    split = args.split if args.split is not None else (None if args.dataset == "folder" else "val")
    extra = {"taxonomy": "dataset"} if args.dataset.startswith("mseg-") else {}
    dataset = build_dataset(args.dataset, args.data_root, split, **extra)
    _check_files(dataset)
    return dataset, split


def _run_dataset(args: argparse.Namespace, device: Any) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from lseg.evaluate import report as R
    from lseg.evaluate.runner import evaluate_dataset
    from lseg.inference import resolve_protocol
    from lseg.model.text_encoder import validate_labels

    dataset, split = _build_dataset(args)
    space = _label_space(args, list(dataset.class_names))
    validate_labels(space.labels)
    model = _load_model(args, device)
    source = args.checkpoint or f"preset {args.preset}"
    _check_text(model, space.labels, source)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=rank != 0) as progress:
        total = min(len(dataset), args.max_images or len(dataset))
        task = progress.add_task("evaluating", total=total)
        protocol, resize = resolve_protocol(args.protocol, args.size, args.crop_size, args.stride)
        report = evaluate_dataset(
            model,
            dataset,
            space,
            protocol,
            device,
            args.batch_size,
            size=resize,
            num_workers=args.num_workers,
            max_images=args.max_images,
            rank_by=args.rank_by,
            num_examples=args.examples,
            progress=lambda done, _total: progress.update(task, completed=done * report_world()),
        )
    if rank != 0:
        return 0
    payload = {
        **R.environment(report.device),
        "command": "evaluate",
        "checkpoint": R.checkpoint_info(args.checkpoint, args.preset),
        "dataset": {"name": args.dataset, "root": str(Path(args.data_root).resolve()), "split": split},
        "config": {
            "protocol": args.protocol,
            "size": args.size,
            "prompt_template": args.prompt_template,
            "prompt_templates": list(model.text_encoder.prompt_templates),
            "label_space": args.label_space,
            "labels_file": args.labels_file,
            "synonyms": args.synonyms,
            "max_images": args.max_images,
            "batch_size": args.batch_size,
            "rank_by": args.rank_by,
        },
        **report.summary(),
        **(
            {"taxonomy_column": report.extra["taxonomy_column"]}
            if report.extra.get("taxonomy_column")
            else {}
        ),
    }
    paths = R.write_staged(args.out, R.segmentation_writers(report, payload))
    m = report.metrics
    R.print_summary(
        f"lseg evaluate {args.dataset}/{split or '-'}: {report.images} image(s), "
        f"{report.images_per_second:.2f} images/s",
        {
            "pixel accuracy": m["pixel_accuracy"],
            "mean class accuracy": m["mean_class_accuracy"],
            "mIoU": m["miou"],
            "fwIoU": m["fwiou"],
        },
        report.per_class_iou(),
    )
    console.print(f"reports: {', '.join(str(p) for p in paths)}")
    return 0


def report_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ----------------------------------------------------------------------------- zero-shot
def _run_zeroshot(args: argparse.Namespace, device: Any) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from lseg.evaluate import report as R
    from lseg.evaluate.labels import read_synonyms
    from lseg.evaluate.zeroshot import _canonical, _resource_lines, evaluate_zeroshot
    from lseg.inference import get_protocol, run_protocol

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise LSegError("zero-shot benchmarks run in one process; run without torchrun")
    benchmark = _canonical(args.dataset)
    synonyms: dict[str, str] = {}
    if args.synonyms:
        names = _resource_lines(f"fewshot_{benchmark}.txt")
        synonyms = read_synonyms(args.synonyms, names)
    model = _load_model(args, device)
    source = args.checkpoint or f"preset {args.preset}"
    _check_text(model, [args.background], source)
    spec = get_protocol("single")
    amp = device.type == "cuda"

    def predict(images: Any, labels: list[str]) -> Any:
        words = [labels[0], synonyms.get(labels[1], labels[1])]
        text = model.encode_text(words)
        return run_protocol(lambda x: model(x, text).logits, images, spec, pad_value=model.pad_value, amp=amp)

    import time

    console = Console(stderr=True)
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("zero-shot episodes", total=None)
        result = evaluate_zeroshot(
            predict,
            benchmark,
            args.data_root,
            args.fold,
            mean=model.processor.mean,
            std=model.processor.std,
            image_size=args.size or 480,
            background=args.background,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            max_episodes=args.max_images,
            device=device,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    seconds = time.perf_counter() - started
    episodes = int(result["episodes"])
    payload = {
        **R.environment(str(device)),
        "command": "evaluate",
        "checkpoint": R.checkpoint_info(args.checkpoint, args.preset),
        "dataset": {"name": args.dataset, "root": str(Path(args.data_root).resolve()), "fold": args.fold},
        "config": {
            "protocol": "single",
            "image_size": args.size or 480,
            "prompt_template": args.prompt_template,
            "prompt_templates": list(model.text_encoder.prompt_templates),
            "background": args.background,
            "synonyms": args.synonyms,
            "max_episodes": args.max_images,
            "batch_size": args.batch_size,
        },
        "labels": {name: synonyms.get(name, name) for name in result["per_class_iou"]},
        "metrics": {
            "miou": result["miou"],
            "fb_iou": result["fb_iou"],
            "per_class_iou": result["per_class_iou"],
        },
        "timing": {
            "images": episodes,
            "seconds": seconds,
            "images_per_second": episodes / seconds if seconds > 0 else None,
        },
    }
    names = list(result["per_class_iou"])
    ious = list(result["per_class_iou"].values())
    writers = [
        (
            R.IOU_CHART,
            lambda p: R.plot_per_class_iou(names, ious, p, title=f"{args.dataset} fold {args.fold}"),
        ),
        (R.METRICS_FILE, lambda p: R.write_text(R.to_json(payload), p)),
    ]
    paths = R.write_staged(args.out, writers)
    R.print_summary(
        f"lseg evaluate {args.dataset} fold {args.fold}: {episodes} episode(s), "
        f"{payload['timing']['images_per_second'] or 0:.2f} images/s",
        {"mIoU": result["miou"], "FB-IoU": result["fb_iou"]},
        result["per_class_iou"],
    )
    console.print(f"reports: {', '.join(str(p) for p in paths)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from lseg.evaluate.report import require_matplotlib

    _check_args(args)
    require_matplotlib()  # fail before any inference, not after
    device, initialised = _setup_distributed(args.device)
    try:
        if args.dataset in ZEROSHOT_DATASETS:
            return _run_zeroshot(args, device)
        return _run_dataset(args, device)
    finally:
        if initialised:
            import torch.distributed as dist

            dist.destroy_process_group()
