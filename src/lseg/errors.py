"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class LSegError(Exception):
    """An error caused by user input (bad file, label list, checkpoint, device).

    The message must say what is wrong and how to fix it; the CLI prints it without a traceback.
    """


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first line of a library's error message (fit for one of ours), else `default` or its type."""
    return (str(error).strip().splitlines() or [default or type(error).__name__])[0]
