"""Fast, actionable failures when weights come from (or go to) the Hugging Face Hub.

huggingface_hub retries unreachable hosts for ~50 s before giving up. We probe the endpoint once
(a 3 s TCP connect) and, when it is unreachable, switch the hub client to offline mode so a
missing cache entry fails at once with a message that says how to supply the weights; an upload
fails at once instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lseg.errors import LSegError, first_line

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

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
        reason = (
            "the Hugging Face Hub is unreachable and they are not cached" if not online else first_line(error)
        )
        raise LSegError(f"cannot load {what}: {reason}; {OFFLINE_HELP}") from error
    finally:
        constants.HF_HUB_OFFLINE = previous


def push_folder(
    write: Callable[[Path], object],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload LSeg model",
    revision: str | None = None,
) -> CommitInfo:
    """`write(folder)` fills a temporary folder that becomes one commit on `repo_id` (made if missing).

    A `revision` branch is created from main if it does not exist. Offline or unreachable, this
    fails at once (LSegError) instead of retrying.
    """
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise LSegError(
            f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it on a machine with internet"
        )
    if not hub_reachable():
        raise LSegError(f"cannot push to {repo_id}: the Hugging Face Hub is unreachable from this machine")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="lseg-push-") as folder:
        write(Path(folder))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
            )
        except (OSError, ValueError) as error:
            raise LSegError(
                f"cannot push to {repo_id}: {first_line(error)} "
                "(a write token: `hf auth login`, HF_TOKEN or token=)"
            ) from error
