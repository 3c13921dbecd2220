"""Inference speed: seconds per image for a preset at a given size and label count.

    python benchmarks/speed.py --preset vit_b16 --height 480 --width 640 --labels 150 --device cpu

Reports the first call (label embeddings computed) and later calls (label embeddings cached), for
`segment` end to end. Weights are random (speed does not depend on them); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from lseg import LSeg
from lseg.data import ade20k_names


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="vit_b16")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--labels", type=int, default=150, help="number of labels (ADE20K-150 names)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = LSeg.from_config(args.preset, pretrained=False).to(device).eval()
    labels = ade20k_names()[: args.labels]
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.segment(image, labels=labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    first = timed()
    cached = [timed() for _ in range(args.repeats)]
    started = time.perf_counter()
    model.text_encoder.clear_cache()
    model.encode_text(labels)
    text_seconds = time.perf_counter() - started
    result = {
        "preset": args.preset,
        "size": [args.height, args.width],
        "labels": args.labels,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "first_call_s": round(first, 3),
        "cached_labels_s": round(statistics.median(cached), 3),
        "encode_150_labels_s": round(text_seconds, 3),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
