"""Peak resident memory of `lseg segment` on a 4000 x 3000 photo with the 150 ADE20K labels.

    python benchmarks/segment_memory.py --preset vit_b16 --size 480 [--dtype bfloat16]

Saves a random-weight model folder and a 12-megapixel synthetic photo in a temporary folder, runs the
command in a child process and reports the child's peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The model folder and the photo are made in a child process: this process stays small, so the
# measured command's peak is its own (Linux keeps a forked child's pre-exec high-water mark).
PREPARE = """
import sys, torch
from PIL import Image
from lseg import LSeg
from lseg.data import ade20k_names
from lseg.data.synthetic import SyntheticStreetScenes
preset, folder, height, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
LSeg.from_config(preset, pretrained=False).save_pretrained(folder + "/model")
scene = SyntheticStreetScenes(1, size=(480, 640), seed=0)[0]["image"].permute(1, 2, 0).numpy()
Image.fromarray(scene).resize((width, height), Image.Resampling.BILINEAR).save(folder + "/photo.png")
open(folder + "/labels.txt", "w").write("\\n".join(ade20k_names()[:150]) + "\\n")
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="vit_b16")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--save-label-map", help="copy the label map PNG here (compare two versions' outputs with cmp)"
    )
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        prepare = [sys.executable, "-c", PREPARE, args.preset, tmp, str(args.height), str(args.width)]
        subprocess.run(prepare, check=True, env=env, stderr=subprocess.DEVNULL)
        command = [sys.executable, "-m", "lseg.cli.main", "segment", f"{tmp}/photo.png", "--checkpoint"]
        command += [f"{tmp}/model", "--labels-file", f"{tmp}/labels.txt", "--size", str(args.size)]
        command += ["--out", f"{tmp}/out", "--device", "cpu", "--dtype", args.dtype]
        started = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        if child.returncode != 0:
            raise SystemExit(f"lseg segment failed with exit code {child.returncode}")
        from PIL import Image

        label_map = Image.open(Path(tmp) / "out" / "photo.labels.png")
        if args.save_label_map:
            shutil.copyfile(Path(tmp) / "out" / "photo.labels.png", args.save_label_map)
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "image": [args.height, args.width],
                    "labels": 150,
                    "size": args.size,
                    "dtype": args.dtype,
                    "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # MiB (ru_maxrss is in KiB)
                    "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
                    "seconds": round(seconds, 1),
                    "label_map": [label_map.height, label_map.width],
                    "scores_would_need_gb": round(150 * args.height * args.width * 4 / 1e9, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
