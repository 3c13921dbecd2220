"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class LSegError(Exception):
    """An error caused by user input (bad file, label list, checkpoint, device).

    The message must say what is wrong and how to fix it; the CLI prints it without a traceback.
    """
