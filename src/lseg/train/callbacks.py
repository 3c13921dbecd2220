"""Callbacks: save-and-stop on preemption signals, and export of the final model."""

from __future__ import annotations

import math
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lseg.train.console import epoch_of_last_step


class SignalCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1 save `last.ckpt` after the current step, then stop; under SLURM SIGUSR1
    (sent before the time limit, `--signal=SIGUSR1@N`) also requeues the job.

    The handler only records the signal. After every training step all ranks ask whether any of them
    was signalled (one all-reduce, in the same hook on every rank), so they save and stop together
    even when the signal reached a single rank. Lightning's own handlers are replaced, not chained:
    its SIGTERM handler broadcasts from inside the handler and then stops each rank on its own flag,
    and its SLURM SIGUSR1 handler saves (a barrier) wherever the signal lands, mid-step included; both
    mismatch the ranks' collectives (a hang) when the ranks are not signalled at the same point, and a
    mid-step save does not resume exactly.
    """

    def __init__(self) -> None:
        self.received: int | None = None  # the signal this process received

    def _handler(self, signum: int, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Installed after Lightning's own handlers (registered when fit starts), replacing them until
        the trainer's teardown puts back the handlers from before fit. Never Lightning's in between: a
        requeue's kill lands while the ranks shut down, and its handler's broadcast then fails or hangs."""
        for signum in [signal.SIGTERM, *([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])]:
            signal.signal(signum, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        requeue = SLURMEnvironment.detect() and strategy.reduce_boolean_decision(
            self.received == getattr(signal, "SIGUSR1", None), all=False
        )
        checkpoint = next((c for c in trainer.checkpoint_callbacks if c.dirpath), None)
        directory = Path(checkpoint.dirpath) if checkpoint else Path(trainer.default_root_dir) / "checkpoints"
        trainer.save_checkpoint(directory / "last.ckpt")
        rank_zero_info(
            f"signal {self.received or 'on another rank'}: saved {directory / 'last.ckpt'} at step "
            f"{trainer.global_step}; "
            + ("requeueing the job, which resumes from it" if requeue else "resume with --ckpt_path last")
        )
        if requeue and trainer.is_global_zero:
            requeue_slurm_job()
        raise SIGTERMException  # on every rank at once: fit ends without `on_fit_end` (no export)


def requeue_slurm_job() -> None:
    """`scontrol requeue` this job (or array task), as Lightning's SLURM plugin does; warn if refused."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        problem = result.stderr.strip() if result.returncode else None
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = str(error)
    if problem:
        rank_zero_warn(f"could not requeue SLURM job {job} ({problem}); resubmit it to resume")


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
        if not trainer.enable_validation:  # a signal never gets here: SignalCheckpoint ends fit on every rank
            return
        if self.validations and self.validations[-1]["step"] == trainer.global_step:
            return
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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

    def _report(self, trainer: L.Trainer, checkpoint: ModelCheckpoint | None) -> dict[str, Any]:
        """The exported weights' validation scores and the label sets they were trained with (and the
        held-out words that `self_training` asked)."""
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
        hparams = getattr(getattr(trainer, "lightning_module", None), "hparams", {})
        if hparams.get("self_training"):  # transductive: the held-out classes' words were asked
            held_out = getattr(datamodule, "unseen_labels", {})
            training["self_training_labels"] = {key: words for key, words in held_out.items() if words}
        dataset = {}
        if spec is not None:  # the root names a `folder` dataset on the card, as for lseg evaluate
            root = {"root": str(Path(spec.root).resolve())} if spec.root else {}
            dataset = {"name": spec.name, **root, "split": spec.split}
        return {"command": "train", "dataset": dataset, "metrics": run["metrics"], "training": training}
