"""Writing files so that a failure (disk full, a read-only folder, Ctrl-C) leaves the previous
version whole: the new content goes to ``NAME.tmp``, which then replaces ``NAME``; a failed write
removes its temporary file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then ``temporary`` replaces ``path``; on any error, ``path`` is as it
    was and no temporary file is left."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    replace_atomically(path, lambda temporary: temporary.write_text(text))
