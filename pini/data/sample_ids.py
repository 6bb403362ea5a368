"""A sample's stable identity (`sample_id`) and a listing's fingerprint: what a few-shot split and a
run record say they were drawn from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from PIL import Image

from .digits import DIGITS_INDEX_KEY


def sample_id(source: str | os.PathLike | Image.Image, root: str | Path | None = None) -> str:
    """A stable identifier of a sample's source: its path (POSIX form, relative to ``root`` when
    it lies below it), ``"digits:<index>"`` for a bundled digit (its index in scikit-learn's
    dataset), ``"pixels:<sha256>"`` for another in-memory image (of its mode, size and bytes)."""
    if isinstance(source, Image.Image):
        index = source.info.get(DIGITS_INDEX_KEY)
        if index is not None:
            return f"digits:{index}"
        header = f"{source.mode} {source.size[0]}x{source.size[1]} ".encode()
        return "pixels:" + hashlib.sha256(header + source.tobytes()).hexdigest()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if root is not None and path.is_relative_to(root):
            path = path.relative_to(root)
        return path.as_posix()
    raise TypeError(
        f"a sample's source must be an image path or a PIL image, got {type(source).__name__}"
    )


def listing_fingerprint(samples: list[tuple], root: str | Path | None = None) -> str:
    """sha256 (hex) of a list of ``(source, label)`` samples, in order: of one line
    ``json.dumps([sample_id(source, root), label]) + "\\n"`` per sample (UTF-8). Any change of
    an image path, a label, the order or the count changes it; with ``root`` (e.g.
    ``Split.directory``) paths count relative to it, so a moved dataset folder keeps its
    fingerprint. For the few-shot cache: what a split was drawn from."""
    digest = hashlib.sha256()
    for source, label in samples:
        digest.update((json.dumps([sample_id(source, root), int(label)]) + "\n").encode())
    return digest.hexdigest()
