"""What training prints: the warnings it leaves out, and its progress (a live bar on a terminal, plain
lines in a log file, CI or a batch job, where a live bar shows nothing until it ends)."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

LINE_INTERVAL_S = 30.0  # the longest a log goes without a progress line (when steps take less)

# (message regex, category, module regex of the code that warns): notes a user can do nothing about,
# shown on every run otherwise.
KNOWN_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    # Our frozen text encoder is in eval mode on purpose.
    (r"Found \d+ module\(s\) in eval mode", Warning, r"lightning\."),
    # `lseg train` hands LightningCLI its arguments so that DDP relaunches the command as typed.
    (r"LightningCLI's args parameter is intended", Warning, r"lightning\."),
    # The model summary cannot size mixed-precision weights and says so on every bf16 run.
    (r"Precision \S+ is not supported by the model summary", UserWarning, r"lightning\."),
    # Lightning's pytree helper builds torch's deprecated LeafSpec (torch >= 2.10).
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
)


def ignore_known_noise() -> None:
    """Ignore exactly the `KNOWN_NOISE` warnings (call inside `warnings.catch_warnings()` to scope it)."""
    for message, category, module in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def progress_bar() -> ProgressBar:
    """A live bar where rich draws one as it goes (a terminal, Jupyter), else a line every
    `LINE_INTERVAL_S`: elsewhere rich prints the bar once, when it ends."""
    from rich.console import Console

    console = Console()  # fresh: reads TTY_COMPATIBLE, FORCE_COLOR, TERM and the current sys.stdout
    live = console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal)
    return StepProgressBar() if live else LineProgress(LINE_INTERVAL_S)


def budgeted_in_steps(trainer: L.Trainer) -> bool:
    """Training ends at `max_steps`, its epochs unbounded (`max_epochs: -1`, as the CamVid recipe)."""
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


def epoch_of_last_step(trainer: L.Trainer) -> int:
    """The epoch (0-based) the last step ran in; once training ends `current_epoch` counts it as done."""
    return max(0, trainer.fit_loop.epoch_progress.current.started - 1)


def position(trainer: L.Trainer) -> str:
    """Where training is: steps out of `max_steps` when budgeted in steps, else epochs (0-based, as
    Lightning and the checkpoint names count them) out of `max_epochs`."""
    epoch = epoch_of_last_step(trainer)
    if budgeted_in_steps(trainer):
        return f"step {trainer.global_step}/{trainer.max_steps} (epoch {epoch})"
    last = f"/{trainer.max_epochs - 1}" if trainer.max_epochs is not None and trainer.max_epochs > 0 else ""
    return f"epoch {epoch}{last}, step {trainer.global_step}"


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar; budgeted in steps, its training bar counts steps out of `max_steps`
    (Lightning's counts the epoch's batches under the title "Epoch 18/-2")."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if budgeted_in_steps(self.trainer) else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not budgeted_in_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch}, step"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The bar advances to `batch_idx + 1`: the steps so far, when it counts steps.
        done = trainer.global_step - 1 if budgeted_in_steps(trainer) else batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, done)


class LineProgress(ProgressBar):
    """Plain progress lines on stdout, for a log file, CI or a batch job: one when training starts, then
    one at the first step or validation batch `interval` seconds after the last line, one after each
    validation and one at the end."""

    def __init__(
        self, interval: float = LINE_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval, self.clock = interval, clock
        self._enabled = True
        self._started = self._last = 0.0
        self._first_step = 0

    def disable(self) -> None:  # Lightning disables the bars of all ranks but the first
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._first_step = self.clock(), trainer.global_step
        if budgeted_in_steps(trainer):
            budget = f"{trainer.max_steps} steps"
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            budget = f"{trainer.max_epochs} epochs"
        else:
            budget = "until stopped"
        start = f"from step {trainer.global_step}; a line every {self.interval:g} s"
        self._print(f"training for {budget}, {start}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._due():
            self._print(f"{position(trainer)}: {self._metrics(trainer, pl_module)}{self._times(trainer)}")

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking and self._due():
            total = trainer.num_val_batches[dataloader_idx]
            self._print(f"validating at {position(trainer)}: batch {batch_idx + 1}/{total}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._print(f"validated at {position(trainer)}: {self._metrics(trainer, pl_module)}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = timedelta(seconds=round(self.clock() - self._started))
        self._print(f"training ended at {position(trainer)} after {elapsed}")

    def _due(self) -> bool:
        return self.clock() - self._last >= self.interval

    def _print(self, line: str) -> None:
        if self._enabled:
            print(line, file=sys.stdout, flush=True)  # flushed: a log file shows it now, not at exit
        self._last = self.clock()

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())

    def _times(self, trainer: L.Trainer) -> str:
        """Elapsed, and when budgeted in steps the time left at this run's pace."""
        elapsed = self.clock() - self._started
        text = f" ({timedelta(seconds=round(elapsed))} elapsed"
        done = trainer.global_step - self._first_step
        if budgeted_in_steps(trainer) and done > 0:
            left = elapsed / done * (trainer.max_steps - trainer.global_step)
            text += f", about {timedelta(seconds=round(left))} left"
        return text + ")"
