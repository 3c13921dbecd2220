"""Plot a training run's curves (train loss, validation mIoU) from its TensorBoard log.

    python benchmarks/training_curves.py runs/camvid/lightning_logs/version_0 docs/figures/camvid_curves.png

Writes the figure and, beside it, the same numbers as JSON (step, value per scalar), so docs can
quote them. Validation here is the training-time protocol (`lseg train`'s val loop, long side
`val_size`), scored at the resolution the data module feeds it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lseg.files import write_atomic, write_json_atomic

SCALARS = ("train/loss", "val/miou")


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(log_dir.glob("events.out.tfevents.*")):
        raise SystemExit(f"error: no TensorBoard event file in {log_dir}")
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in SCALARS if tag in tags}


def plot(curves: dict[str, list[tuple[int, float]]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for axis, (tag, points) in zip([axes] if len(curves) == 1 else axes, curves.items()):
        steps, values = zip(*points)
        if tag == "val/miou":
            axis.plot(steps, [v * 100 for v in values], marker="o")
            axis.set_ylabel("val mIoU (%)")
        else:
            axis.plot(steps, values)
            axis.set_ylabel(tag)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    write_atomic(out, lambda file: figure.savefig(file, format="png", dpi=100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=Path, help="a Lightning log folder (lightning_logs/version_N)")
    parser.add_argument("out", type=Path, help="the figure (.png); the JSON goes beside it")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    curves = read_scalars(args.log_dir)
    if not curves:
        sys.exit(f"error: {args.log_dir} has none of {', '.join(SCALARS)}")
    plot(curves, args.out, args.title or str(args.log_dir))
    data = {tag: [{"step": s, "value": v} for s, v in points] for tag, points in curves.items()}
    write_json_atomic(args.out.with_suffix(".json"), data)
    for tag, points in curves.items():
        print(f"{tag}: {len(points)} points, last {points[-1][1]:.4f} at step {points[-1][0]}")


if __name__ == "__main__":
    main()
