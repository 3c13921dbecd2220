"""What training prints: the warnings it leaves out, and its progress (a live bar on a terminal, plain
lines in a log file, CI or a batch job, where a live bar shows nothing until it ends)."""

from __future__ import annotations

import warnings

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
