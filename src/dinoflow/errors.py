"""Errors a user can act on: the CLI prints them without a traceback and exits non-zero."""


class DinoflowError(RuntimeError):
    """A stage cannot go on; the message names the file, row or parameter and the reason."""
