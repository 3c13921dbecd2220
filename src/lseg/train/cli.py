"""`lseg train`: LightningCLI over LSegModule + LSegDataModule, driven by YAML configs in configs/."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lseg.errors import LSegError
from lseg.model.weights import read_lightning_checkpoint
from lseg.train.callbacks import ExportPretrained, SignalCheckpoint
from lseg.train.console import ignore_known_noise, progress_bar
from lseg.train.datamodule import LSegDataModule
from lseg.train.module import LSegModule

CKPT_KEYWORDS = ("last", "best", "hpc")  # resolved by Lightning itself


def check_ckpt_path(value: str | None) -> None:
    """Refuse a checkpoint that cannot resume, before the Trainer creates any folder.

    Lightning would otherwise fail with a traceback after writing logs, and torch's refusal of a
    pickle that runs code advises `weights_only=False`, which must never be repeated to a user.
    """
    if value is None or value in CKPT_KEYWORDS:
        return
    path = Path(value)
    if not path.is_file():
        raise LSegError(
            f"--ckpt_path {value}: no such checkpoint file; give a local .ckpt file or one of "
            f"{', '.join(CKPT_KEYWORDS)}"
        )
    try:
        read_lightning_checkpoint(path)
    except LSegError as error:
        raise LSegError(f"--ckpt_path {value}: {error}") from None


def newest_checkpoint(root: Path, checkpoints: Path) -> tuple[Path, int] | None:
    """The checkpoint of `root`'s run with the most training steps, and that number of steps.

    Candidates: `checkpoints/last.ckpt` (written on a signal, and by the checkpoint callback) and Lightning's
    `root/hpc_ckpt_N.ckpt` (its SLURM requeue save). They are ranked by the global step they record,
    not by file time, which a copy, a restore from backup or clocks differing between nodes change.
    """
    candidates = [checkpoints / "last.ckpt", *root.glob("hpc_ckpt_*.ckpt")]
    steps = [
        (read_lightning_checkpoint(path, mmap=True)["global_step"], path)
        for path in candidates
        if path.is_file()
    ]
    if not steps:
        return None
    step, path = max(steps, key=lambda found: found[0])  # first of a tie: last.ckpt
    return path, step


class LSegCLI(LightningCLI):
    """Adds always-on callbacks whose settings are still configurable (`--checkpoint.*`, `--export.*`)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/miou",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-miou{val/miou:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments(
            "trainer.default_root_dir", "checkpoint.dirpath", compute_fn=lambda root: f"{root}/checkpoints"
        )
        parser.add_lightning_class_args(ExportPretrained, "export")

    def parse_arguments(self, parser, args) -> None:
        """Once the command line and --config files are merged, before seeding or creating anything.

        A SLURM job without --ckpt_path resumes its run's newest checkpoint (as Lightning resumes its
        hpc checkpoints there): a requeued job, after preemption, time limit or node failure, continues
        from the last save. Outside SLURM a run starts fresh unless told.
        """
        super().parse_arguments(parser, args)
        config = self.config[self.config["subcommand"]]
        check_ckpt_path(config.get("ckpt_path"))
        self.resumed_step: int | None = None
        if config.get("ckpt_path") is None and SLURMEnvironment.detect():
            root = Path(config["trainer"]["default_root_dir"])
            newest = newest_checkpoint(root, Path(config["checkpoint"]["dirpath"] or root / "checkpoints"))
            if newest is not None:
                config["ckpt_path"], self.resumed_step = str(newest[0]), newest[1]

    def before_fit(self) -> None:
        """One line from rank 0: where this run trains and what it resumes."""
        trainer, ckpt_path = self.trainer, self.config["fit"].get("ckpt_path")
        step = f" (step {self.resumed_step})" if self.resumed_step is not None else ""
        rank_zero_info(
            f"lseg train: rank {trainer.global_rank} of world size {trainer.world_size}, node "
            f"{socket.gethostname()} ({trainer.num_nodes} node(s)): "
            + (f"resuming from {ckpt_path}{step}" if ckpt_path else "fresh start")
        )

    def _parse_ckpt_path(self) -> None:
        """Resume with the model arguments given, not the checkpoint's hyper-parameters.

        LightningCLI >= 2.5 re-parses those as model arguments, which rejects `model_config` (stored
        for `LSeg.from_pretrained`) and so broke every `--ckpt_path FILE`; the weights and the
        training state are restored by `Trainer.fit` either way.
        """

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_progress_bar") is not False:
            callbacks = [*callbacks, progress_bar()]
        return super()._instantiate_trainer(config, callbacks)


def run_training(args: list[str]) -> None:
    """`lseg train ARGS` == `LightningCLI fit ARGS` with our defaults."""
    # sys.argv stays as typed so DDP's subprocess launcher re-runs `lseg train ...` on every rank.
    with warnings.catch_warnings():
        ignore_known_noise()
        LSegCLI(
            LSegModule,
            LSegDataModule,
            args=["fit", *args],
            trainer_defaults={
                "callbacks": [SignalCheckpoint()],
                "default_root_dir": "runs/lseg",
            },
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"fit": {"default_config_files": []}},
        )
