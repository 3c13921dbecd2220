"""Inference speed of LSeg's execution modes against the original LSeg's execution, in the same process.

    python benchmarks/speed.py --device cpu --quick --json runs/speed_cpu.json   # vit_b16, 480 x 640
    python benchmarks/speed.py --device cpu --case vit_l16-480x480 --modes baseline fp32 bf16
    python benchmarks/speed.py --device cuda --case vit_l16-480x480 --batch-size 8 --train

The baseline ("baseline" mode, `ratio_vs_baseline`) is not the original network: it re-implements how
the original LSeg code runs a forward pass, on this package's modules: float32, the label prompts
re-encoded by the text encoder at every forward, logits at full resolution, then softmax and argmax.
Every other mode runs `LSeg.segment` (or ONNX Runtime) and is reported as images/s, peak memory, the
ratio of its images/s to the baseline's measured in this run, and the share of pixels whose label
agrees with the float32 `segment` label map. Weights are random (seed 0; speed does not depend on
them), the image is a synthetic street scene; nothing is downloaded.

`--case vit_l16-480x480` is the original network's own setting (ViT-L/16, 480 x 480). For it, the
report also holds the time of the original network itself (isl-org/lang-seg's modules), measured by
the reviewer of issue 21 on a 2-core CPU, not in this run, and `ratio_vs_original_network` for runs
in that setting (CPU, 150 labels, batch 1, 480 x 480).

Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the mode's weights plus the peak rise
of the process's resident memory (RSS, sampled every 2 ms) over its level before the mode's calls.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lseg import LSeg
from lseg.data import ade20k_names
from lseg.data.synthetic import SyntheticStreetScenes
from lseg.files import write_json_atomic
from lseg.precision import prepare_for_inference

CPU_MODES = ("baseline", "fp32", "fp32-opt", "bf16", "bf16-compile", "onnx")
CUDA_MODES = ("baseline", "fp32", "tf32", "fp16", "bf16", "bf16-compile")
QUICK_MODES = ("baseline", "fp32", "bf16")


@dataclass(frozen=True)
class OriginalNetworkTime:
    """Seconds per image of the original network itself, measured outside this script."""

    seconds_per_image: tuple[float, float]  # range over the runs
    setting: str
    labels: int = 150
    batch_size: int = 1
    device_type: str = "cpu"


@dataclass(frozen=True)
class Case:
    """A named benchmark setting: the preset and the model input size."""

    preset: str
    height: int
    width: int
    original_network: OriginalNetworkTime | None = None

    def runs_as(self, args: argparse.Namespace) -> bool:
        """Whether the command line kept this case's preset and size."""
        return (args.preset, args.height, args.width) == (self.preset, self.height, self.width)


CASES = {
    "vit_b16-480x640": Case("vit_b16", 480, 640),  # the README's CPU table
    "vit_l16-480x480": Case(
        "vit_l16",
        480,
        480,
        OriginalNetworkTime(
            (14.3, 15.0),
            "isl-org/lang-seg's modules, ViT-L/16, 480 x 480, the 150 ADE20K labels, float32, batch 1, "
            "torch 2.14.1, 2 CPU cores; measured by the reviewer of issue 21, not in this run",
        ),
    ),
}


# --------------------------------------------------------------------------- measuring
def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS rises are this mode's


class PeakMemory:
    """Peak memory of the calls inside the context (see the module docstring)."""

    def __init__(self, device: torch.device, weights_mb: float) -> None:
        self.device, self.weights_mb, self.peak_mb = device, weights_mb, 0.0

    def __enter__(self) -> PeakMemory:
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.start, self.high, self.running = rss_mb(), rss_mb(), True

        def sample() -> None:
            while self.running:
                self.high = max(self.high, rss_mb())
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self.running = False
        self.thread.join()
        self.peak_mb = self.weights_mb + max(0.0, max(self.high, rss_mb()) - self.start)


def weights_mb(module: torch.nn.Module) -> float:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def timed(run: Callable[[], Any], device: torch.device, repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return times, out


# --------------------------------------------------------------------------- the modes
def baseline_segment(model: LSeg, images: list[np.ndarray], labels: list[str], size: int) -> list[np.ndarray]:
    """The original LSeg's forward: fp32, prompts re-encoded every call, full-resolution logits,
    softmax, argmax (probabilities for every label and pixel, as its demo and evaluator computed)."""
    with torch.no_grad():
        batch = model.processor.preprocess(images, size, device=model.device)
        text = model.text_encoder.embed_texts(list(labels))  # original: clip.tokenize(labels) each time
        text = F.normalize(text.float(), dim=-1)
        logits = model(batch.pixel_values, text).logits
        maps = []
        for resized in model.processor.resize_logits(logits, batch.original_sizes, batch.sizes):
            maps.append(resized.softmax(dim=0).argmax(dim=0).cpu().numpy())
        return maps


def onnx_runner(model: LSeg, labels: list[str], images: list[np.ndarray], size: int, folder: Path):
    from lseg.export import export_onnx, onnx_session

    batch = model.processor.preprocess(images[:1], size)
    height, width = batch.pixel_values.shape[-2:]
    started = time.perf_counter()
    path = export_onnx(model, labels, folder / "model.onnx", int(height), int(width))
    export_seconds = time.perf_counter() - started
    session = onnx_session(path, torch.get_num_threads())

    def run() -> list[np.ndarray]:
        maps = []
        for image in images:
            one = model.processor.preprocess(image, size)
            (label_map,) = session.run(None, {"pixel_values": one.pixel_values.numpy()})
            maps.append(label_map[0])  # the image is the exported size: nothing to crop or resize
        return maps

    return run, path.stat().st_size / 2**20, export_seconds


def build_mode(name: str, base: LSeg, device: torch.device) -> tuple[LSeg, str | None]:
    """The model a mode runs and the dtype it asks `segment` for."""
    if name in ("fp32", "tf32", "baseline"):
        return base, "float32"
    dtype = {"fp32-opt": "float32", "bf16": "bfloat16", "fp16": "float16", "bf16-compile": "bfloat16"}[name]
    model = prepare_for_inference(copy.deepcopy(base), dtype, device)
    if name.endswith("compile"):
        model.compile_for_inference()
    return model, None


def measure_modes(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    base = LSeg.from_config(args.preset, pretrained=False).to(device).eval()
    labels = (
        ade20k_names()[: args.labels] if args.labels <= 150 else [f"word {i}" for i in range(args.labels)]
    )
    images = [
        SyntheticStreetScenes(args.batch_size, size=(args.height, args.width), seed=0)[i]["image"]
        .permute(1, 2, 0)
        .numpy()
        for i in range(args.batch_size)
    ]
    size = max(args.height, args.width)
    modes = args.modes or (QUICK_MODES if args.quick else CPU_MODES if device.type == "cpu" else CUDA_MODES)
    results: dict[str, Any] = {}
    reference: list[np.ndarray] | None = None
    flops: dict[str, float] = {}
    base.encode_text(labels)  # cached before the fp32 mode's FLOPs are counted (the baseline ignores it)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["fp32", *[m for m in modes if m != "fp32"]]:  # fp32 first: the reference maps
            started = time.perf_counter()
            extra: dict[str, Any] = {}
            if name == "baseline":
                model = base
                run = lambda: baseline_segment(base, images, labels, size)  # noqa: E731
                mode_weights = weights_mb(base)
                warmups = 0
            elif name == "onnx":
                model = base
                run, mode_weights, extra["export_s"] = onnx_runner(base, labels, images, size, Path(tmp))
                warmups = 1
            else:
                model, dtype = build_mode(name, base, device)
                run = lambda m=model, d=dtype: m.segment(  # noqa: E731
                    images, labels=labels, size=size, batch_size=len(images), dtype=d
                )
                mode_weights = weights_mb(model)
                warmups = 1
            matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
            cudnn_tf32 = torch.backends.cudnn.allow_tf32
            if name == "tf32":
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                for index in range(warmups):
                    if name == "fp32" and index == 0:
                        with FlopCounterMode(display=False) as counter:
                            run()
                        flops["forward_gflop_per_image"] = counter.get_total_flops() / 1e9 / len(images)
                    else:
                        run()
                extra["setup_and_warmup_s"] = round(time.perf_counter() - started, 2)
                repeats = args.baseline_repeats if name == "baseline" else args.repeats
                with PeakMemory(device, mode_weights) as peak:
                    times, out = timed(run, device, repeats)
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (
                    matmul_tf32,
                    cudnn_tf32,
                )
            maps = (
                out
                if isinstance(out, list) and isinstance(out[0], np.ndarray)
                else [r.label_map for r in out]
            )
            if reference is None:
                reference = maps
            agreement = float(np.mean([(a == b).mean() for a, b in zip(maps, reference)]))
            seconds = statistics.median(times)
            results[name] = {
                "images_per_s": round(len(images) / seconds, 4),
                "seconds_per_batch": [round(t, 3) for t in times],
                "peak_mem_mb": round(peak.peak_mb, 1),
                "agreement_with_fp32": round(agreement, 5),
                **extra,
            }
            print(json.dumps({name: results[name]}), flush=True)
            if model is not base:
                del model
            run = None
            release_memory()
        text_flops = text_gflop(base, labels[:1]) * len(labels)
    flops["text_gflop_per_label_set"] = text_flops
    flops["baseline_gflop_per_image"] = flops["forward_gflop_per_image"] + text_flops
    baseline = results.get("baseline", {}).get("images_per_s")
    for entry in results.values():
        entry["ratio_vs_baseline"] = round(entry["images_per_s"] / baseline, 2) if baseline else None
    return {"modes": results, "flops": {k: round(v, 1) for k, v in flops.items()}}


def text_gflop(model: LSeg, labels: list[str]) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.text_encoder.embed_texts(labels)
    return counter.get_total_flops() / 1e9


# --------------------------------------------------------------------------- cost curves
MEGAPIXELS = (0.3, 1, 3, 6, 12)
LABEL_COUNTS = (10, 30, 100, 300, 1000)
BASELINE_MAX_MEGAPIXELS = 3  # 150 labels x 6 MP: 3.6 GB of logits + 3.6 GB of probabilities


def measure_curves(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time and peak memory vs image megapixels (150 labels) and vs label count (480 x 640), for the
    baseline and the best mode (bf16 on CPU, bf16 autocast on CUDA), the model seeing --size 480."""
    from PIL import Image

    torch.manual_seed(0)
    base = LSeg.from_config(args.preset, pretrained=False).to(device).eval()
    best = prepare_for_inference(copy.deepcopy(base), "bfloat16", device)
    scene = SyntheticStreetScenes(1, size=(480, 640), seed=0)[0]["image"].permute(1, 2, 0).numpy()
    words = ade20k_names() + [f"word {i}" for i in range(max(LABEL_COUNTS))]
    points = []

    def point(axis: str, value: float, image: np.ndarray, labels: list[str]) -> None:
        for mode in ("baseline", "best"):
            if mode == "baseline" and axis == "megapixels" and value > BASELINE_MAX_MEGAPIXELS:
                continue
            if mode == "baseline":
                run = lambda: baseline_segment(base, [image], labels, 480)  # noqa: E731
                model = base
            else:
                best.segment(image, labels=labels, size=480)  # label embeddings cached, warm
                run = lambda: best.segment(image, labels=labels, size=480)  # noqa: E731
                model = best
            with PeakMemory(device, weights_mb(model)) as peak:
                times, _ = timed(run, device, 1)
            entry = {"axis": axis, "value": value, "mode": mode, "seconds": round(times[0], 3)}
            points.append({**entry, "peak_mem_mb": round(peak.peak_mb, 1)})
            print(json.dumps(points[-1]), flush=True)
            release_memory()

    for megapixels in MEGAPIXELS:
        height = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
        width = int(round(height * 4 / 3))
        image = np.asarray(Image.fromarray(scene).resize((width, height), Image.Resampling.BILINEAR))
        point("megapixels", megapixels, image, words[:150])
    for count in LABEL_COUNTS:
        point("labels", count, scene, words[:count])
    return {"preset": args.preset, "model_size": 480, "device": device_name(device), "points": points}


def plot_curves(curves: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (axis, label) in enumerate(
        (("megapixels", "image megapixels (150 labels)"), ("labels", "labels (480 x 640 image)"))
    ):
        for row, (key, unit) in enumerate((("seconds", "seconds per image"), ("peak_mem_mb", "peak MB"))):
            ax = axes[row][column]
            for mode, style in (("baseline", "o-"), ("best", "s-")):
                xs = [p["value"] for p in curves["points"] if p["axis"] == axis and p["mode"] == mode]
                ys = [p[key] for p in curves["points"] if p["axis"] == axis and p["mode"] == mode]
                name = "original's way re-implemented (fp32)" if mode == "baseline" else "lseg bf16 (best)"
                ax.plot(xs, ys, style, label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    figure.suptitle(f"{curves['preset']}, model input long side {curves['model_size']}, {curves['device']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# --------------------------------------------------------------------------- training steps
def measure_training(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """SGD steps (batch `--train-batch-size`, labels = the first 150 ADE20K names) in fp32 and bf16."""
    results = {}
    labels = ade20k_names()[:150]
    for name, dtype in (("train-fp32", torch.float32), ("train-bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = LSeg.from_config(args.preset, pretrained=False).to(device).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        images = torch.randn(args.train_batch_size, 3, args.height, args.width, device=device)
        masks = torch.randint(0, len(labels), (args.train_batch_size, args.height, args.width), device=device)
        text = model.encode_text(labels)

        def step(model=model, optimizer=optimizer, images=images, masks=masks, text=text, dtype=dtype):
            enabled = dtype != torch.float32
            with torch.autocast(device.type, dtype=dtype, enabled=enabled):
                decoded = model.decoded_features(images)  # `lseg train`'s path: no embedding map
                logits = model.classify_decoded(decoded, text, images.shape[-2:])[0]
            loss = F.cross_entropy(logits.float(), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()
        with PeakMemory(device, weights_mb(model) * 3) as peak:  # weights, gradients, momentum
            times, _ = timed(step, device, args.repeats)
        results[name] = {
            "images_per_s": round(args.train_batch_size / statistics.median(times), 3),
            "seconds_per_step": [round(t, 3) for t in times],
            "peak_mem_mb": round(peak.peak_mb, 1),
            "batch_size": args.train_batch_size,
        }
        print(json.dumps({name: results[name]}), flush=True)
        del model, optimizer, step
        release_memory()
    return results


def original_network_report(
    case: Case, args: argparse.Namespace, device: torch.device, modes: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The original network's time for `case`; when this run is in its setting, each mode in `modes`
    gets its speed-up against it (a ratio across runs: noisier than `ratio_vs_baseline`)."""
    reference = case.original_network
    if reference is None:
        return {}
    comparable = (
        device.type == reference.device_type
        and args.labels == reference.labels
        and args.batch_size == reference.batch_size
        and case.runs_as(args)
    )
    seconds = statistics.mean(reference.seconds_per_image)
    for entry in modes.values():
        entry["ratio_vs_original_network"] = round(seconds * entry["images_per_s"], 2) if comparable else None
    return {
        "original_network": {
            "seconds_per_image": list(reference.seconds_per_image),
            "setting": reference.setting,
            "comparable_with_this_run": comparable,
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--case", choices=sorted(CASES), default="vit_b16-480x640", help="preset and model input size"
    )
    parser.add_argument("--preset", help="instead of the case's preset")
    parser.add_argument("--height", type=int, help="instead of the case's height")
    parser.add_argument("--width", type=int, help="instead of the case's width")
    parser.add_argument("--labels", type=int, default=150, help="number of labels (ADE20K names up to 150)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per segment call")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per mode (median reported)")
    parser.add_argument("--baseline-repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", help="modes to run (default: all for the device)")
    parser.add_argument(
        "--quick", action="store_true", help="few repeats, no compile/onnx (< 90 s on 2 cores)"
    )
    parser.add_argument("--train", action="store_true", help="also time training steps (fp32, bf16)")
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--curves", help="only measure the cost curves; write this PNG (and .json beside)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--out", help="append the results as one JSON line to this file")
    args = parser.parse_args()
    case = CASES[args.case]
    args.preset = args.preset or case.preset
    args.height = args.height or case.height
    args.width = args.width or case.width
    if args.quick:
        args.repeats, args.baseline_repeats = min(args.repeats, 2), 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.curves:
        curves = measure_curves(args, device)
        write_json_atomic(Path(args.curves).with_suffix(".json"), curves)
        plot_curves(curves, Path(args.curves))
        return
    started = time.perf_counter()
    result: dict[str, Any] = {
        "case": args.case if case.runs_as(args) else "custom",
        "preset": args.preset,
        "size": [args.height, args.width],
        "labels": args.labels,
        "batch_size": args.batch_size,
        "device": device_name(device),
        "torch": torch.__version__,
        "baseline": "the original LSeg's execution re-implemented on this package's modules, this run",
        **measure_modes(args, device),
    }
    result.update(original_network_report(case, args, device, result["modes"]))
    if args.train:
        result["training"] = measure_training(args, device)
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, result)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
