"""Fast, actionable failures when pretrained weights must come from the Hugging Face Hub.

huggingface_hub retries unreachable hosts for ~50 s before giving up. We probe the endpoint once
(a 3 s TCP connect) and, when it is unreachable, switch the hub client to offline mode so a
missing cache entry fails at once with a message that says how to supply the weights.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from functools import cache
from urllib.parse import urlparse

from lseg.errors import LSegError

OFFLINE_HELP = (
    "supply the weights from a local path, pre-populate the Hugging Face cache (HF_HOME) on a machine "
    "with internet access, or build the model without pretrained weights"
)


@cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint accepts a TCP connection (False when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    parsed = urlparse(os.environ.get("HF_ENDPOINT", constants.ENDPOINT))
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_access(what: str) -> Iterator[None]:
    """Run a hub download; offline, use only the cache and raise an LSegError naming `what`."""
    from huggingface_hub import constants

    online = hub_reachable()
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or not online
    try:
        yield
    except LSegError:
        raise
    except (OSError, RuntimeError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = "the Hugging Face Hub is unreachable and they are not cached" if not online else first_line
        raise LSegError(f"cannot load {what}: {reason}; {OFFLINE_HELP}") from error
    finally:
        constants.HF_HUB_OFFLINE = previous
