"""Peak resident memory of `lseg segment` on a 4000 x 3000 photo with the 150 ADE20K labels.

    python benchmarks/segment_memory.py --preset vit_b16 --size 480 [--dtype bfloat16]

Saves a random-weight model folder and a 12-megapixel synthetic photo in a temporary folder, runs the
command in a child process and reports the child's peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lseg import LSeg
from lseg.data import ade20k_names
from lseg.data.synthetic import SyntheticStreetScenes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="vit_b16")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = LSeg.from_config(args.preset, pretrained=False).save_pretrained(tmp / "model")
        scene = SyntheticStreetScenes(1, size=(480, 640), seed=0)[0]["image"].permute(1, 2, 0).numpy()
        photo = Image.fromarray(scene).resize((args.width, args.height), Image.Resampling.BILINEAR)
        photo.save(tmp / "photo.png")
        (tmp / "labels.txt").write_text("\n".join(ade20k_names()[:150]) + "\n")
        command = [sys.executable, "-m", "lseg.cli.main", "segment", str(tmp / "photo.png")]
        command += [
            "--checkpoint",
            str(model),
            "--labels-file",
            str(tmp / "labels.txt"),
            "--size",
            str(args.size),
        ]
        command += ["--out", str(tmp / "out"), "--device", "cpu", "--dtype", args.dtype]
        started = time.perf_counter()
        subprocess.run(
            command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL
        )
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        label_map = np.asarray(Image.open(tmp / "out" / "photo.labels.png"))
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "image": [args.height, args.width],
                    "labels": 150,
                    "size": args.size,
                    "dtype": args.dtype,
                    "peak_rss_mb": round(peak_mb, 1),
                    "seconds": round(seconds, 1),
                    "label_map": list(label_map.shape),
                    "scores_would_need_gb": round(150 * args.height * args.width * 4 / 1e9, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
