"""LightningModule for LSeg: per-pixel cross-entropy against each sample's own label set."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay

from lseg.data import IGNORE_INDEX
from lseg.errors import LSegError
from lseg.evaluate.metrics import SegmentationMetrics
from lseg.model import LSeg, LSegConfig, load_preset

REFERENCE_BATCH = 16  # base learning rates are quoted for this global batch size


class NonFiniteLossError(LSegError):
    """Training diverged: the loss became NaN or infinite."""


class LSegModule(L.LightningModule):
    """Trains an LSeg model; the frozen text encoder embeds every dataset's label words.

    Optimiser: the paper's SGD (momentum 0.9, weight decay 1e-4, poly decay 0.9 per step) or AdamW
    with linear warmup. Learning rates scale linearly with the global batch size (base values are
    for a batch of 16); the decoder and head learn `head_lr_multiplier` times faster than the
    (pretrained) image encoder.
    """

    def __init__(
        self,
        model: str | dict[str, Any] = "vit_l16",
        pretrained: bool = True,
        optimizer: str = "sgd",
        lr: float = 0.004,
        head_lr_multiplier: float = 10.0,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_steps: int = 0,
        poly_power: float = 0.9,
        scale_lr: bool = True,
        grad_checkpointing: bool = False,
        num_preview_images: int = 4,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise LSegError(f"optimizer must be 'sgd' or 'adamw', got '{optimizer}'")
        config = load_preset(model) if isinstance(model, str) else LSegConfig.from_dict(model)
        self.save_hyperparameters({"model_config": config.to_dict()})
        self.save_hyperparameters(ignore=["model"])
        self.model = LSeg(config, load_pretrained=pretrained)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.val_metrics: SegmentationMetrics | None = None
        self._preview: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # ----------------------------------------------------------------- data plumbing
    @property
    def label_sets(self) -> dict[str, list[str]]:
        return self.trainer.datamodule.label_sets

    def _text(self, key: str) -> torch.Tensor:
        return self.model.encode_text(self.label_sets[key])

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean CE over valid pixels; samples of different datasets use their own label sets."""
        images, masks = batch["image"], batch["mask"]
        pixels = self.model.pixel_embeddings(images)
        total = images.new_zeros(())
        valid = int((masks != IGNORE_INDEX).sum())
        for key in dict.fromkeys(batch["dataset"]):
            rows = [i for i, k in enumerate(batch["dataset"]) if k == key]
            logits = self.model.classify(pixels[rows], self._text(key), images.shape[-2:])
            total = total + F.cross_entropy(
                logits.float(), masks[rows], ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return total / max(valid, 1)

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}); "
                "lower the learning rate, enable gradient clipping, or check the labels"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(batch["image"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        key = self.trainer.datamodule.val_key
        self.val_metrics = SegmentationMetrics(len(self.label_sets[key]), IGNORE_INDEX).to(self.device)
        self._preview = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.model(batch["image"], self._text(batch["dataset"][0])).logits
        loss = F.cross_entropy(logits.float(), batch["mask"], ignore_index=IGNORE_INDEX)
        prediction = logits.argmax(dim=1)
        self.val_metrics.update(prediction, batch["mask"])
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch["image"]))
        if len(self._preview) < self.hparams.num_preview_images:
            self._preview.append((batch["image"][0].cpu(), batch["mask"][0].cpu(), prediction[0].cpu()))

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics.compute()
        self.log("val/miou", scores["miou"], prog_bar=True, sync_dist=False)
        self.log("val/pixel_accuracy", scores["pixel_accuracy"], sync_dist=False)
        self.log("val/mean_class_accuracy", scores["mean_class_accuracy"], sync_dist=False)
        self._log_preview()

    def _log_preview(self) -> None:
        """A grid of image | ground truth | prediction rows in TensorBoard."""
        experiment = getattr(self.logger, "experiment", None)
        if not self._preview or not hasattr(experiment, "add_image"):
            return
        from lseg.visualize import palette

        labels = self.label_sets[self.trainer.datamodule.val_key]
        colours = torch.from_numpy(palette(len(labels) + 1)).float() / 255
        colours[-1] = 0  # ignore -> black
        rows = []
        for image, mask, prediction in self._preview:
            mask = torch.where(mask == IGNORE_INDEX, len(labels), mask)
            rows.append(
                torch.cat(
                    [
                        self.model.processor.denormalize(image[None])[0],
                        colours[mask].permute(2, 0, 1),
                        colours[prediction].permute(2, 0, 1),
                    ],
                    dim=2,
                )
            )
        width = max(r.shape[-1] for r in rows)
        grid = torch.cat([F.pad(r, (0, width - r.shape[-1])) for r in rows], dim=1)
        experiment.add_image("val/preview", grid, self.global_step)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        world = self.trainer.world_size * self.trainer.accumulate_grad_batches
        batch = self.trainer.datamodule.batch_size * world
        lr = hp.lr * batch / REFERENCE_BATCH if hp.scale_lr else hp.lr
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self._param_groups(lr), lr=lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.AdamW(self._param_groups(lr), lr=lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total - 1)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return (1 - progress) ** hp.poly_power

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The image encoder at `lr`, the rest `head_lr_multiplier` times faster (text encoder: frozen).

        Weight decay as timm applies it: none on norms, biases, the logit scale (1-D and 0-D
        parameters) or what a timm backbone lists in `no_weight_decay()` (ViT position embeddings and
        class token); decaying those only pulls them towards zero.
        """
        exempt = {
            f"{prefix}.{name}" if prefix else name
            for prefix, module in self.model.named_modules()
            if callable(getattr(module, "no_weight_decay", None))
            for name in module.no_weight_decay()
        }
        encoder = {id(p) for p in self.model.image_encoder.parameters()}
        decay_groups = param_groups_weight_decay(
            self.model, self.hparams.weight_decay, no_weight_decay_list=exempt
        )
        groups = []
        for in_encoder, group_lr in ((True, lr), (False, lr * self.hparams.head_lr_multiplier)):
            for group in decay_groups:  # requires_grad only: the frozen text encoder is left out
                params = [p for p in group["params"] if (id(p) in encoder) == in_encoder]
                if params:
                    groups.append({"params": params, "weight_decay": group["weight_decay"], "lr": group_lr})
        return groups
