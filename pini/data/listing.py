"""Listing a dataset's folders and reading its text files, shared by the loaders: images by suffix,
class folders (an empty one is a warning, not an error), one-line `InputError`s for unreadable
files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def class_folders(
    directory: Path, folders: list[str], labels: list[int] | None = None
) -> list[tuple]:
    """``(path, label)`` for the images in ``directory / folders[i]`` with label ``labels[i]``
    (``i`` without ``labels``), files sorted by name; one warning names the class folders that
    hold no image (they stay classes, with no samples here)."""
    labels = list(range(len(folders))) if labels is None else labels
    samples, empty = [], []
    for label, folder in zip(labels, folders, strict=True):
        path = directory / folder
        images = list_images(path) if path.is_dir() else []
        if path.is_dir() and not images:
            empty.append(folder)
        samples += [(image, label) for image in images]
    if empty:
        log.warning(
            "%d empty class folder%s in %s (kept as classes without images here): %s",
            len(empty),
            "s" if len(empty) > 1 else "",
            directory,
            first_names(empty),
        )
    return samples


def warn_hidden_folders(directory: Path) -> None:
    """Folders whose names start with "." are not classes (".git", ".ipynb_checkpoints"): one
    warning names them, so a class named ".NET" is not silently dropped."""
    with os.scandir(directory) as entries:
        hidden = sorted(e.name for e in entries if e.name.startswith(".") and e.is_dir())
    if hidden:
        log.warning(
            "%s: %d hidden folder%s (names starting with '.') skipped, not classes: %s",
            directory,
            len(hidden),
            "s" if len(hidden) > 1 else "",
            first_names(hidden),
        )


def refuse_same_class_names(directory: Path, folders: list[str]) -> None:
    """Folder names are class names with "_" read as a space: two folders that read the same
    ("big_cat", "big cat") would be two classes with one prompt."""
    seen: dict[str, str] = {}
    for folder in folders:
        name = folder.replace("_", " ")
        if name in seen:
            raise InputError(
                f"{directory}: class folders {seen[name]!r} and {folder!r} both read as class "
                f'{name!r} ("_" is read as a space); rename one'
            )
        seen[name] = folder


def warn_missing_classes(directory: Path, expected: list[str], found: list[str]) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        log.warning(
            "%s has no folder for %d of %d classes (no images of them here): %s",
            directory,
            len(missing),
            len(expected),
            first_names(missing),
        )


def first_names(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def list_images(folder: Path) -> list[str]:
    """Image files (by suffix, hidden files left out) in ``folder``, sorted by name."""
    with os.scandir(folder) as entries:
        return sorted(
            entry.path
            for entry in entries
            if not entry.name.startswith(".")
            and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
            and entry.is_file()
        )


def subfolders(directory: Path) -> list[str]:
    """Names of the folders (hidden ones left out) in ``directory``, sorted."""
    with os.scandir(directory) as entries:
        return sorted(
            entry.name for entry in entries if not entry.name.startswith(".") and entry.is_dir()
        )


def require_some_images(parts: dict[str, list], directory: Path, layout: str) -> None:
    if not any(parts.values()):
        raise InputError(f"no images in {directory}; expected {layout}")


def read_text(path: Path, expected: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; expected {expected}") from None
    except OSError as error:
        raise InputError(
            f"cannot read {path} ({error.strerror or error}); expected {expected}"
        ) from None
