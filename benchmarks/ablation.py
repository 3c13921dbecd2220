"""Why the earlier reimplementation stalled: the same CamVid training budget for the correct model and
for two bugs it had.

    python benchmarks/ablation.py --minutes 7 --out docs/figures

Variants (everything else identical: configs/camvid.yaml, same seed, same time budget):
  correct   pixel embeddings L2-normalised over channels, logit scale 1/0.07
  width     pixel embeddings normalised along the WIDTH axis (dim=-1 of B x D x H x W)
  exp007    logit scale exp(0.07) = 1.07 instead of 1/0.07 = 14.3

Writes ablation.json (curves and final validation metrics) and ablation.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import warnings
from pathlib import Path

import lightning as L
import torch.nn.functional as F
import yaml

from lseg.files import write_json_atomic
from lseg.model.head import LSegHead
from lseg.train.datamodule import LSegDataModule
from lseg.train.module import LSegModule
from lseg.train.quickstart import History

REPO = Path(__file__).resolve().parents[1]


class WidthNormalisedHead(LSegHead):
    """The bug: F.normalize(..., dim=-1) on B x D x H x W normalises over image columns."""

    def embed(self, decoded):
        return F.normalize(self.project(decoded), dim=-1)


def run_variant(name: str, config: dict, minutes: float, seed: int) -> dict:
    L.seed_everything(seed, verbose=False)
    model_cfg = copy.deepcopy(config["model"])
    if name == "exp007":
        model_cfg["model"]["logit_scale"] = math.exp(0.07)
    module = LSegModule(**model_cfg)
    if name == "width":
        old = module.model.head
        new = WidthNormalisedHead(old.project.in_channels, old.project.out_channels, logit_scale=1 / 0.07)
        new.load_state_dict(old.state_dict())
        module.model.head = new
    data = LSegDataModule(**{**copy.deepcopy(config["data"]), "seed": seed})
    history = History()
    trainer = L.Trainer(
        max_epochs=100,
        max_time={"seconds": int(minutes * 60)},
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=2,
        callbacks=[history],
        default_root_dir=f"/tmp/lseg-ablation-{name}",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
        final = trainer.validate(module, datamodule=data, verbose=False)[0]
    return {
        "variant": name,
        "seed": seed,
        "steps": trainer.global_step,
        "loss": history.loss,
        "miou": history.miou,
        "final": {k: float(v) for k, v in final.items()},
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, miou_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        steps, losses = zip(*result["loss"])
        window = 10
        smooth = [
            sum(losses[max(0, i - window) : i + 1]) / len(losses[max(0, i - window) : i + 1])
            for i in range(len(losses))
        ]
        loss_axis.plot(steps, smooth, label=result["variant"])
        if result["miou"]:
            steps, values = zip(*result["miou"])
            miou_axis.plot(steps, [100 * v for v in values], "o-", label=result["variant"])
    loss_axis.set(xlabel="step", ylabel="train loss (smoothed)", title="CamVid train loss")
    miou_axis.set(xlabel="step", ylabel="val mIoU (%)", title="CamVid val mIoU (half resolution)")
    loss_axis.legend()
    miou_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "camvid.yaml"))
    parser.add_argument("--minutes", type=float, default=7.0, help="training budget per variant")
    parser.add_argument("--variants", nargs="+", default=["correct", "width", "exp007"])
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    parser.add_argument("--out", default=str(REPO / "docs" / "figures"))
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.variants:
        results.append(run_variant(name, config, args.minutes, args.seed))
        print(json.dumps({k: results[-1][k] for k in ("variant", "seed", "steps", "final")}), flush=True)
    suffix = "" if args.seed == 0 else f"_seed{args.seed}"
    write_json_atomic(out / f"ablation{suffix}.json", results)
    plot(results, out / f"ablation{suffix}.png")


if __name__ == "__main__":
    main()
