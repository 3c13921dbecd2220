"""Callbacks: save-and-stop on preemption signals, and export of the final model."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lseg.train.console import epoch_of_last_step


class SignalCheckpoint(L.Callback):
    """On SIGTERM (and SIGUSR1 outside SLURM) save `last.ckpt` after the current step, then stop.

    Our handler chains to Lightning's, which ends `fit` with a `SIGTERMException` right after the step
    (so all DDP ranks stop together); the checkpoint is written before that.
    Under SLURM, Lightning's own SIGUSR1 handler saves and requeues the job (see
    scripts/slurm/train.sbatch); we leave that signal to it.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame) -> None:
        self.received = signum
        previous = self._previous.get(signum)
        if callable(previous):  # Lightning's handler: it stops all ranks together
            previous(signum, frame)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Installed after Lightning's own handlers (registered when fit starts), chaining to them."""
        signals = [signal.SIGTERM]
        if hasattr(signal, "SIGUSR1") and not SLURMEnvironment.detect():
            signals.append(signal.SIGUSR1)
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.received is None:
            return
        checkpoint = next((c for c in trainer.checkpoint_callbacks if c.dirpath), None)
        directory = Path(checkpoint.dirpath) if checkpoint else Path(trainer.default_root_dir) / "checkpoints"
        trainer.save_checkpoint(directory / "last.ckpt")
        rank_zero_info(
            f"signal {self.received}: saved {directory / 'last.ckpt'}; resume with --ckpt_path last"
        )
        trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class ExportPretrained(L.Callback):
    """After fitting, write the best (by the checkpoint monitor) or last weights with `save_pretrained`.

    The model card records the training label sets and the validation scores of the exported weights.
    Training that ends between validations (a step budget, `check_val_every_n_epoch` > 1, a resumed
    run) is validated once more at its last step, so the final weights are scored.
    """

    def __init__(self, dirname: str = "model") -> None:
        self.dirname = dirname
        self.validations: list[dict[str, Any]] = []  # this process's validation runs: epoch, step, scores

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        scores = {
            key.removeprefix("val/"): float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("val/") and key != "val/loss"
        }
        run = {"epoch": epoch_of_last_step(trainer), "step": trainer.global_step, "metrics": scores}
        self.validations.append(run)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate the final weights unless the last validation ran at the last step.

        Through the fit loop's own validation loop, as Lightning runs it between epochs: the scores are
        logged and checkpointed like every other validation (and recorded by `on_validation_end`).
        """
        if self._interrupted(trainer) or not trainer.enable_validation:
            return
        if self.validations and self.validations[-1]["step"] == trainer.global_step:
            return
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._interrupted(trainer):
            return  # the run is not finished, resume it instead
        checkpoint = next(  # without a monitor there is no "best": the final weights are exported
            (
                c
                for c in trainer.checkpoint_callbacks
                if isinstance(c, ModelCheckpoint) and c.monitor and c.best_model_path
            ),
            None,
        )
        if checkpoint is not None:
            saved = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
            pl_module.load_state_dict(saved["state_dict"])
        if trainer.is_global_zero:
            target = Path(trainer.default_root_dir) / self.dirname
            pl_module.model.save_pretrained(target, metrics=self._report(trainer, checkpoint))
            rank_zero_info(f"exported {'best' if checkpoint else 'final'} model to {target}")

    @staticmethod
    def _interrupted(trainer: L.Trainer) -> bool:
        return any(isinstance(c, SignalCheckpoint) and c.received for c in trainer.callbacks)

    def _report(self, trainer: L.Trainer, checkpoint: ModelCheckpoint | None) -> dict[str, Any]:
        """The exported weights' validation scores and the label sets they were trained with."""
        run = self.validations[-1] if self.validations else {"metrics": {}}
        if checkpoint is not None and checkpoint.best_model_score is not None:
            key, best = checkpoint.monitor.removeprefix("val/"), float(checkpoint.best_model_score)
            matching = [v for v in self.validations if math.isclose(v["metrics"].get(key, math.nan), best)]
            run = matching[0] if matching else {"metrics": {key: best}}  # resumed: earlier runs unseen
        datamodule = trainer.datamodule
        spec = getattr(datamodule, "val_spec", None)
        label_sets = getattr(datamodule, "label_sets", {})
        val_key = getattr(datamodule, "val_key", None)
        training = {
            "checkpoint": "best" if checkpoint else "final",
            **{key: run[key] for key in ("epoch", "step") if key in run},
            "label_sets": {key: labels for key, labels in label_sets.items() if key != val_key},
        }
        dataset = {}
        if spec is not None:  # the root names a `folder` dataset on the card, as for lseg evaluate
            root = {"root": str(Path(spec.root).resolve())} if spec.root else {}
            dataset = {"name": spec.name, **root, "split": spec.split}
        return {"command": "train", "dataset": dataset, "metrics": run["metrics"], "training": training}
