"""ImageFolder trees, ``train/<class>/`` and ``test/<class>/`` (or ``val/``): any dataset folder
that is none of CoOp's layouts.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .listing import (
    class_folders,
    refuse_same_class_names,
    require_some_images,
    subfolders,
    warn_hidden_folders,
    warn_missing_classes,
)
from .split import DatasetNotFoundError, Split


def load_image_folder(root: str | Path, name: str | None = None) -> Split:
    """An ImageFolder tree: ``root/train/<class>/*`` and ``root/test/<class>/*`` (``val/``
    where there is no ``test/``; both: ``val`` is `Split.val`). Classes are the folders of
    ``train/`` (of the test folder when there is no ``train/``), sorted; a class name is its
    folder's name with ``_`` read as a space. ``Split.name`` is ``name`` or the folder's name."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset folder not found: {root}")
    layout = f"an ImageFolder tree {root}/train/<class>/<image> and {root}/test/<class>/ (or val/)"
    folders = {part: root / part for part in ("train", "test", "val") if (root / part).is_dir()}
    if not folders:
        raise InputError(f"{root} has no train/, test/ or val/ folder; expected {layout}")
    class_dir = next(iter(folders.values()))
    classes = subfolders(class_dir)
    warn_hidden_folders(class_dir)
    if not classes:
        raise InputError(f"no class folders in {class_dir}; expected {layout}")
    refuse_same_class_names(class_dir, classes)
    for directory in folders.values():
        extra = sorted(set(subfolders(directory)) - set(classes))
        if extra:
            raise InputError(
                f"{directory / extra[0]} is a class that {class_dir} does not have; expected the "
                "same class folders in train/ and test/"
            )
    parts = {}
    for part, directory in folders.items():
        warn_missing_classes(directory, classes, subfolders(directory))
        parts[part] = class_folders(directory, classes)
    require_some_images(parts, root, layout)
    test = parts.get("test", parts.get("val", []))
    val = parts.get("val", []) if "test" in parts else []
    return Split(
        [folder.replace("_", " ") for folder in classes],
        parts.get("train", []),
        test,
        name or root.resolve().name,
        val=val,
        directory=str(root),
    )
