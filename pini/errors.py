"""The one error type for what a user gave wrong: a flag, a file, a folder, a checkpoint.

``pini``'s command line prints its message as one line on stderr and exits with status 2 (no
traceback unless ``--debug``), so each message names the flag or file, what was expected and what
was found. It is a ``ValueError``, so library callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Something the user gave cannot be used as it is; the message says what and why."""


class RunDiverged(RuntimeError):
    """Training produced a non-finite loss or parameter and stopped before saving it: the last
    checkpoint on disk is the last finite one. The command line marks the run failed in its
    ``summary.json``, prints the message as one line and exits with status 3."""

    def __init__(self, message: str, *, epoch: int, step: int | None):
        super().__init__(message)
        self.epoch, self.step = epoch, step
