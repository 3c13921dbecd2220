"""`lseg train`: LightningCLI over LSegModule + LSegDataModule, driven by YAML configs in configs/."""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from lseg.train.callbacks import ExportPretrained, SignalCheckpoint
from lseg.train.datamodule import LSegDataModule
from lseg.train.module import LSegModule


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

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_progress_bar") is not False:
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def run_training(args: list[str]) -> None:
    """`lseg train ARGS` == `LightningCLI fit ARGS` with our defaults."""
    # sys.argv stays as typed so DDP's subprocess launcher re-runs `lseg train ...` on every rank.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # The frozen text encoder is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
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
