"""The one error type for what a user gave wrong: a flag, a file, a folder, a checkpoint.

``pini``'s command line prints its message as one line on stderr and exits with status 2 (no
traceback unless ``--debug``), so each message names the flag or file, what was expected and what
was found. It is a ``ValueError``, so library callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Something the user gave cannot be used as it is; the message says what and why."""
