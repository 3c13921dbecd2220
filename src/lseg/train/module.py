"""LightningModule for LSeg: per-pixel cross-entropy against each sample's own label set."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from timm.optim import param_groups_weight_decay

from lseg.data import IGNORE_INDEX, negative_words
from lseg.errors import LSegError
from lseg.evaluate.metrics import SegmentationMetrics
from lseg.evaluate.runner import image_shape, mask_logits
from lseg.inference import PROTOCOLS
from lseg.labels import label_key
from lseg.model import LSeg, LSegConfig, load_preset
from lseg.model.image_encoder import early_stage_parameters
from lseg.precision import cpu_has_native_bfloat16
from lseg.predictor import same_size_runs

REFERENCE_BATCH = 16  # base learning rates are quoted for this global batch size


class NonFiniteLossError(LSegError):
    """Training diverged: the loss became NaN or infinite."""


def class_balanced_weights(pixel_counts: torch.Tensor, power: float) -> torch.Tensor:
    """Per-class loss weights proportional to frequency**-power, scaled so that the pixel-weighted mean
    is 1 (the loss keeps its scale, so the learning rate keeps its meaning). A class with no pixels
    gets the weight of one pixel; it never appears as a target, so its weight never counts."""
    total = pixel_counts.sum().clamp(min=1).double()
    frequency = pixel_counts.double() / total
    weights = frequency.clamp(min=1 / total).pow(-power)
    return (weights / (frequency * weights).sum()).float()


class LSegModule(L.LightningModule):
    """Trains an LSeg model; the frozen text encoder embeds every dataset's label words.

    Optimiser: the paper's SGD (momentum 0.9, weight decay 1e-4, poly decay 0.9 per step) or AdamW
    with linear warmup. Learning rates scale linearly with the global batch size (base values are
    for a batch of 16); the decoder and head learn `head_lr_multiplier` times faster than the
    (pretrained) image encoder.

    Open-vocabulary options (off by default): `label_augmentation` asks each class through one of
    the model's `prompt_templates` drawn per step; `negatives` adds that many words per step from the
    MSeg universal names that cannot name a labelled pixel (`lseg.data.negative_words` of
    `negatives_column`, minus `negatives_exclude_parents`). `hard_pixel_fraction` < 1 averages the
    loss over only the hardest pixels, which favours thin and rare classes. `class_balance` > 0 weighs
    each class's pixels by its training-pixel frequency to the power `-class_balance` (0.5: inverse
    square root, 1: inverse frequency), scaled so that an average pixel still weighs 1.
    `anchor_alignment` adds that multiple of the mean 1 - cosine between each labelled pixel's
    embedding and its class word's: cross-entropy only separates the training words from each other,
    and a pixel on its word would score highest with that word's nearest synonym (on CamVid it kept
    the training-word score and lowered the unseen-synonym score; docs/results.md).
    `channels_last` keeps convolution weights and inputs in that memory layout (faster on CPU and on
    tensor cores). `frozen_stages` (0-4) freezes the pretrained backbone up to its first that many
    feature maps (strides 4, 8, 16, 32; stem and embeddings included), as mmsegmentation's backbones
    do: those stages keep their ImageNet features, their BatchNorm statistics and drop paths stay in
    eval mode, and no gradients are computed for them. `feature_consistency` adds
    that multiple of the mean 1 - cosine between the image encoder's four maps and those of a frozen
    copy of it as built (its pretrained weights, eval mode), averaged over the maps: the ImageNet
    features are pulled back wherever the seen classes' loss moves them (for a ViT the copy includes
    the DPT reassembly as initialised).

    `self_training` (weight, default 0) is transductive zero-shot training (ZS5Net's self-training):
    from step `self_training_start` on, each ignored pixel of a dataset that holds classes out is
    given the unseen class whose word scores highest there, and the `self_training_fraction` of those
    pixels that each unseen class scores most confidently in the batch (its softmax probability over
    every asked word) become targets of a second cross-entropy term, asked against the seen and the
    unseen words together. It uses the unseen classes' words and the unlabelled pixels of the training
    images, never their labels: a setting apart from the inductive protocol (docs/evaluation.md).
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
        label_augmentation: bool = False,
        negatives: int = 0,
        negatives_column: str | None = None,
        negatives_exclude_parents: list[str] | None = None,
        hard_pixel_fraction: float = 1.0,
        class_balance: float = 0.0,
        anchor_alignment: float = 0.0,
        channels_last: bool = False,
        frozen_stages: int = 0,
        feature_consistency: float = 0.0,
        self_training: float = 0.0,
        self_training_start: int = 0,
        self_training_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise LSegError(f"optimizer must be 'sgd' or 'adamw', got '{optimizer}'")
        if not 0 < hard_pixel_fraction <= 1:
            raise LSegError(f"hard_pixel_fraction must be in (0, 1], got {hard_pixel_fraction}")
        if min(class_balance, anchor_alignment, feature_consistency) < 0:
            raise LSegError(
                "class_balance, anchor_alignment and feature_consistency must be >= 0, got "
                f"{class_balance}, {anchor_alignment}, {feature_consistency}"
            )
        if self_training < 0 or self_training_start < 0 or not 0 < self_training_fraction <= 1:
            raise LSegError(
                "self_training and self_training_start must be >= 0 and self_training_fraction in "
                f"(0, 1], got {self_training}, {self_training_start}, {self_training_fraction}"
            )
        if negatives < 0 or (negatives and negatives_column is None):
            raise LSegError(
                "negatives needs a count >= 0 and negatives_column (the training classes' MSeg column)"
            )
        self.negative_vocabulary = (
            negative_words(negatives_column, negatives_exclude_parents or ()) if negatives else []
        )
        config = load_preset(model) if isinstance(model, str) else LSegConfig.from_dict(model)
        self.save_hyperparameters({"model_config": config.to_dict()})
        self.save_hyperparameters(ignore=["model"])
        self.model = LSeg(config, load_pretrained=pretrained)
        for parameter in early_stage_parameters(self.model.image_encoder, frozen_stages):
            parameter.requires_grad_(False)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if channels_last:  # oneDNN's fast convolution layout: a CPU training step of resnet18d takes ~0.6x
            self.model.to(memory_format=torch.channels_last)
        self.reference_encoder = None
        if feature_consistency:  # a submodule: moved with the model, and kept in checkpoints for resuming
            self.reference_encoder = copy.deepcopy(self.model.image_encoder).requires_grad_(False).eval()
        self.class_weights: dict[str, torch.Tensor] = {}
        self.val_metrics: SegmentationMetrics | None = None
        self._preview: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def train(self, mode: bool = True) -> LSegModule:
        super().train(mode)
        if mode:
            self._fixed_modules_to_eval()
        return self

    def on_train_start(self) -> None:
        # Lightning keeps each module's mode at fit start instead of calling train().
        self._fixed_modules_to_eval()

    def _fixed_modules_to_eval(self) -> None:
        """Backbone modules whose parameters are all frozen (`frozen_stages`) and the reference encoder
        (`feature_consistency`) run in eval mode."""
        for module in self.model.image_encoder.modules():
            parameters = list(module.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()
        if self.reference_encoder is not None:
            self.reference_encoder.eval()

    def setup(self, stage: str) -> None:
        """Class weights of every training dataset, from its labels' pixel counts (`class_balance`),
        computed once and placed on the training device (Lightning sets `self.device` for setup).
        Warns when bf16 training runs on a CPU that would emulate bfloat16 (the CamVid recipe's default)."""
        if stage != "fit":
            return
        bf16 = str(self.trainer.precision).startswith("bf16")
        if bf16 and self.device.type == "cpu" and not cpu_has_native_bfloat16():
            rank_zero_warn(
                "this CPU has neither AVX512-BF16 nor AMX: bf16-mixed training may run slower than "
                "float32 here; --trainer.precision 32-true avoids that"
            )
        if not self.hparams.class_balance:
            return
        for key, dataset in self.trainer.datamodule.train_datasets.items():
            weights = class_balanced_weights(dataset.pixel_counts(), self.hparams.class_balance)
            self.class_weights[key] = weights.to(self.device)

    # ----------------------------------------------------------------- data plumbing
    @property
    def label_sets(self) -> dict[str, list[str]]:
        return self.trainer.datamodule.label_sets

    @property
    def unseen_labels(self) -> dict[str, list[str]]:
        """Per label set, the words of the classes it holds out (none from a data module without them)."""
        return getattr(self.trainer.datamodule, "unseen_labels", {})

    @property
    def word_alternatives(self) -> dict[str, list[list[str]]]:
        """Per label set, each class's alternative words (none from a data module without them)."""
        return getattr(self.trainer.datamodule, "word_alternatives", {})

    def _training_text(self, key: str) -> torch.Tensor:
        """Label embeddings for one training step: the dataset's words, each asked through one of the
        model's prompt templates drawn at random (`label_augmentation`; inference averages them all),
        then `negatives` words drawn from the negative vocabulary, which no pixel is labelled as.
        With `label_augmentation` a class with alternative words (its dataset spec's synonyms file) is
        asked as its word or one of them, drawn at random (`_drawn_words`); evaluation asks its word.

        Draws are seeded by the global step, so a resumed run asks the same words as an unbroken one.
        """
        labels = self.label_sets[key]
        generator = torch.Generator().manual_seed(self.global_step)
        templates = self.model.text_encoder.prompt_templates
        words = self._drawn_words(key, generator) if self.hparams.label_augmentation else labels
        if self.hparams.label_augmentation and len(templates) > 1:
            picks = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
            embeds = torch.cat([self.model.encode_text([w], [templates[i]]) for w, i in zip(words, picks)])
        else:
            embeds = self.model.encode_text(words)
        if not self.hparams.negatives:
            return embeds
        named = {label_key(w) for w in labels}
        named |= {label_key(w) for others in self.word_alternatives.get(key, []) for w in others}
        vocabulary = [w for w in self.negative_vocabulary if label_key(w) not in named]
        if vocabulary:
            order = torch.randperm(len(vocabulary), generator=generator)[: self.hparams.negatives]
            embeds = torch.cat([embeds, self.model.encode_text([vocabulary[i] for i in order.tolist()])])
        return embeds

    def _drawn_words(self, key: str, generator: torch.Generator) -> list[str]:
        """Each class's word or one of its alternatives, uniformly. An alternative that another class
        drew first this step (a shared parent word) falls back to the class's own word: two targets
        asked with one word could not be told apart. No alternatives: the words, and no draw."""
        labels = self.label_sets[key]
        alternatives = self.word_alternatives.get(key)
        if not alternatives or not any(alternatives):
            return labels
        draws = torch.rand(len(labels), generator=generator).tolist()
        words, taken = [], set()
        for word, others, draw in zip(labels, alternatives, draws):
            choice = [word, *others][int(draw * (1 + len(others)))]
            words.append(word if label_key(choice) in taken else choice)
            taken.add(label_key(words[-1]))
        return words

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.hparams.channels_last:
            return batch["image"].contiguous(memory_format=torch.channels_last)
        return batch["image"]

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """CE over labelled pixels (the hardest `hard_pixel_fraction` of them, online hard-example
        mining), plus `anchor_alignment`, `feature_consistency` and `self_training`; samples of
        different datasets use their own label sets.

        Logits come from the decoder's map through `classify_decoded`, never through the D-channel
        embedding map, and ignored pixels (CE 0) stay in the sums, which spares a boolean index."""
        images, masks = self._images(batch), batch["mask"]
        encoded = []  # the encoder's (padded input, maps), for feature_consistency
        hook = None
        if self.reference_encoder is not None:
            hook = self.model.image_encoder.register_forward_hook(
                lambda _, args, maps: encoded.append((args[0], maps))
            )
        try:
            decoded = self.model.decoded_features(images)
        finally:
            if hook is not None:
                hook.remove()
        losses, distances, pseudo, labelled = [], [], [], 0
        self_training = self.hparams.self_training and self.global_step >= self.hparams.self_training_start
        for key in dict.fromkeys(batch["dataset"]):
            rows = [i for i, k in enumerate(batch["dataset"]) if k == key]
            if len(rows) == len(images):  # one dataset: a view, not an indexed copy (and its backward)
                rows = slice(None)
            text = self._training_text(key)
            unseen = self.unseen_labels.get(key) if self_training else None
            words = torch.cat([text, self.model.encode_text(unseen)]) if unseen else text
            logits, cosines = self.model.classify_decoded(decoded[rows], words, images.shape[-2:])
            if unseen:  # one pass for both terms; the seen-class CE reads the first columns only
                pseudo.append(self._pseudo_label_losses(logits.float(), len(text), masks[rows]))
                logits, cosines = logits[:, : len(text)], cosines[:, : len(text)]
            weight = self.class_weights.get(key)
            if weight is not None and len(weight) < len(text):  # negatives are never a target
                weight = F.pad(weight, (0, len(text) - len(weight)), value=1.0)
            loss = F.cross_entropy(
                logits.float(),
                masks[rows],
                weight=weight,
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            losses.append(loss.flatten())
            labelled = labelled + (masks[rows] != IGNORE_INDEX).sum()
            if self.hparams.anchor_alignment:
                distances.append(self._anchor_distances(cosines, masks[rows]))
        losses = torch.cat(losses)
        if self.hparams.hard_pixel_fraction < 1:  # ignored pixels (CE 0) are never harder than labelled ones
            hardest = max(1, int(labelled * self.hparams.hard_pixel_fraction))
            loss = losses.topk(hardest).values.mean()
        else:
            loss = losses.sum() / labelled.clamp(min=1)
        if distances and len(distances := torch.cat(distances)):
            loss = loss + self.hparams.anchor_alignment * distances.mean()
        if encoded:
            loss = loss + self.hparams.feature_consistency * self._feature_drift(*encoded[0])
        if pseudo and len(pseudo := torch.cat(pseudo)):
            loss = loss + self.hparams.self_training * pseudo.mean()
        return loss

    def _pseudo_label_losses(self, logits: torch.Tensor, seen: int, masks: torch.Tensor) -> torch.Tensor:
        """CE of the pixels `self_training` labels (one value each, unweighted) over all of `logits`'
        columns: this step's words (the first `seen`) and then the unseen words, asked as inference
        asks them (every prompt template).

        An ignored pixel is not of a seen class (it would be labelled), so its pseudo-label is the
        best-scoring unseen word; per unseen class, its most confident `self_training_fraction` of
        those pixels count. Labels come from this step's own logits without gradient, as ZS5Net's."""
        with torch.no_grad():
            confidence, choice = logits.softmax(dim=1)[:, seen:].max(dim=1)
            choice = choice + seen
            candidates = masks == IGNORE_INDEX
            targets = torch.full_like(masks, IGNORE_INDEX)
            for word in range(seen, logits.shape[1]):
                chosen = candidates & (choice == word)
                count = int(chosen.sum())
                if count:
                    kept = max(1, int(count * self.hparams.self_training_fraction))
                    threshold = confidence[chosen].topk(kept).values[-1]
                    targets[chosen & (confidence >= threshold)] = word
        pixels = targets != IGNORE_INDEX
        return F.cross_entropy(logits.permute(0, 2, 3, 1)[pixels], targets[pixels], reduction="none")

    def _feature_drift(self, padded: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        """Mean over the encoder's maps of the mean per-pixel 1 - cosine to the reference encoder's."""
        with torch.no_grad():
            reference = self.reference_encoder(padded)
        drifts = [
            (1 - F.cosine_similarity(m.float(), r.float(), dim=1)).mean() for m, r in zip(maps, reference)
        ]
        return torch.stack(drifts).mean()

    @staticmethod
    def _anchor_distances(cosines: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """1 - cosine between each labelled pixel's embedding (stride-2 grid) and its class's label
        embedding (the first channels of `cosines`; negatives follow them)."""
        grid = masks[:, ::2, ::2]
        labelled = grid != IGNORE_INDEX
        return 1 - cosines.permute(0, 2, 3, 1)[labelled].gather(1, grid[labelled][:, None])[:, 0]

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

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        """Score untransformed samples exactly as `lseg evaluate --protocol single --size val_size`:
        same-size images per forward pass, logits resized to each original mask (`mask_logits`)."""
        text = self.model.encode_text(self.label_sets[batch[0]["dataset"]])
        size = self.trainer.datamodule.val_size
        for group in same_size_runs(batch, key=image_shape):
            logits = mask_logits(
                lambda pixel_values: self.model(pixel_values, text).logits,
                group,
                self.model.processor,
                PROTOCOLS["single"],
                size,
                device=self.device,
                model_dtype=self.model.dtype,
            )
            for sample, image_logits in zip(group, logits, strict=True):
                mask = sample["mask"].as_subclass(torch.Tensor).to(self.device)
                loss = F.cross_entropy(image_logits[None], mask[None], ignore_index=IGNORE_INDEX)
                prediction = image_logits.argmax(dim=0)
                self.val_metrics.update(prediction, mask)
                self.log("val/loss", loss, sync_dist=True, batch_size=1)
                if len(self._preview) < self.hparams.num_preview_images:
                    image = sample["image"].as_subclass(torch.Tensor).float().cpu() / 255
                    self._preview.append((image, mask.cpu(), prediction.cpu()))

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
            maps = colours[torch.stack([torch.where(mask == IGNORE_INDEX, len(labels), mask), prediction])]
            rows.append(torch.cat([image, *maps.permute(0, 3, 1, 2)], dim=2))
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
