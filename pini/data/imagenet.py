"""ImageNet and its test-only variants (ImageNetV2, -Sketch, -A, -R) as CoOp lays them out, each
beside ImageNet's ``classnames.txt``; labels are ImageNet's, in sorted-wnid order.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .listing import (
    class_folders,
    read_text,
    require_some_images,
    subfolders,
    warn_missing_classes,
)
from .names import canonical_name
from .split import DatasetNotFoundError, Split

IMAGENET_CLASS_FILE = "classnames.txt"
IMAGENETV2_FOLDER = "imagenetv2-matched-frequency-format-val"
# ImageNet variants whose folders are named by wnid: the folder holding them.
WNID_FOLDER_VARIANTS = {
    "imagenet-sketch": "images",
    "imagenet-adversarial": "imagenet-a",
    "imagenet-rendition": "imagenet-r",
}

# Other spellings users type (the paper's and Dassl's names, torchvision's), compared after

_IMAGENET_CLASS_FORMAT = "'<wnid> <class name>' per line (CoOp's ImageNet classnames.txt)"


def read_imagenet_classnames(path: str | Path) -> list[tuple[str, str]]:
    """``(wnid, class name)`` pairs of a ``classnames.txt``, sorted by wnid: ImageNet's label
    ``i`` is the ``i``-th wnid in sorted order (CoOp labels its sorted class folders; its
    ``classnames.txt`` is in that order already; ImageNetV2's folder ``i`` is that class)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no {path.name} in {path.parent}; expected {_IMAGENET_CLASS_FORMAT}")
    pairs = {}
    for number, line in enumerate(read_text(path, _IMAGENET_CLASS_FORMAT).splitlines(), start=1):
        if not line.strip():
            continue
        wnid, space, classname = line.strip().partition(" ")
        if not space or not classname.strip():
            raise InputError(
                f"{path} line {number}: {line.strip()!r} has no space between wnid and class "
                f"name; expected {_IMAGENET_CLASS_FORMAT}"
            )
        if pairs.setdefault(wnid, classname.strip()) != classname.strip():
            raise InputError(f"{path} line {number}: wnid {wnid} listed twice")
    if not pairs:
        raise InputError(f"{path} is empty; expected {_IMAGENET_CLASS_FORMAT}")
    return sorted(pairs.items())


def load_imagenet(dataset_dir: str | Path) -> Split:
    """ImageNet as CoOp lays it out: ``classnames.txt`` and ``images/train/<wnid>/*``,
    ``images/val/<wnid>/*``; the validation set is the test set (CoOp's and the paper's), so
    ``Split.val`` is empty. Either part may be missing (an evaluation needs only ``val``)."""
    dataset_dir = Path(dataset_dir)
    wnids, classnames = _imagenet_classes(dataset_dir)
    layout = "CoOp's ImageNet layout: images/train/<wnid>/ and images/val/<wnid>/"
    if not any((dataset_dir / "images" / folder).is_dir() for folder in ("train", "val")):
        raise InputError(f"no images/train/ or images/val/ in {dataset_dir}; expected {layout}")
    parts = {}
    for part, folder in (("train", "train"), ("test", "val")):
        directory = dataset_dir / "images" / folder
        parts[part] = _wnid_folders(directory, wnids, dataset_dir)[1] if directory.is_dir() else []
    require_some_images(parts, dataset_dir, layout)
    return Split(classnames, parts["train"], parts["test"], "imagenet", directory=str(dataset_dir))


def load_imagenet_variant(dataset_dir: str | Path, name: str) -> Split:
    """ImageNet-Sketch (``images/<wnid>/``), ImageNet-A (``imagenet-a/<wnid>/``) or ImageNet-R
    (``imagenet-r/<wnid>/``) beside ImageNet's ``classnames.txt``: test only. ``classnames``
    is ImageNet's full list, labels index it, and ``class_subset`` lists the classes that have
    a folder (A and R: 200) when that is not all of them."""
    kind = canonical_name(name)
    if kind not in WNID_FOLDER_VARIANTS:
        raise ValueError(f"name must be one of {sorted(WNID_FOLDER_VARIANTS)}, got {name!r}")
    dataset_dir = Path(dataset_dir)
    wnids, classnames = _imagenet_classes(dataset_dir)
    image_dir = dataset_dir / WNID_FOLDER_VARIANTS[kind]
    layout = f"CoOp's {kind} layout: {image_dir.name}/<wnid>/ and {IMAGENET_CLASS_FILE}"
    if not image_dir.is_dir():
        raise InputError(f"no {image_dir.name}/ in {dataset_dir}; expected {layout}")
    present, test = _wnid_folders(image_dir, wnids, dataset_dir, subset=True)
    require_some_images({"test": test}, dataset_dir, layout)
    subset = present if len(present) < len(wnids) else None
    return Split(classnames, [], test, kind, class_subset=subset, directory=str(dataset_dir))


def load_imagenetv2(dataset_dir: str | Path) -> Split:
    """ImageNetV2 matched-frequency as CoOp lays it out: ``classnames.txt`` and
    ``imagenetv2-matched-frequency-format-val/<label>/*`` with ``<label>`` ImageNet's label
    (0..999); test only, every ImageNet class evaluated."""
    dataset_dir = Path(dataset_dir)
    wnids, classnames = _imagenet_classes(dataset_dir)
    image_dir = dataset_dir / IMAGENETV2_FOLDER
    layout = f"CoOp's imagenetv2 layout: {IMAGENETV2_FOLDER}/<label 0..{len(wnids) - 1}>/"
    if not image_dir.is_dir():
        raise InputError(f"no {IMAGENETV2_FOLDER}/ in {dataset_dir}; expected {layout}")
    folders = subfolders(image_dir)
    for folder in folders:
        if not folder.isdigit() or int(folder) >= len(wnids):
            raise InputError(f"{image_dir / folder} is not a label of {layout}")
    labels = sorted(int(folder) for folder in folders)
    test = class_folders(image_dir, [str(label) for label in labels], labels)
    warn_missing_classes(image_dir, [str(label) for label in range(len(wnids))], folders)
    require_some_images({"test": test}, dataset_dir, layout)
    return Split(classnames, [], test, "imagenetv2", directory=str(dataset_dir))


def _imagenet_classes(dataset_dir: Path) -> tuple[list[str], list[str]]:
    if not dataset_dir.is_dir():
        raise DatasetNotFoundError(f"dataset folder not found: {dataset_dir}")
    pairs = read_imagenet_classnames(dataset_dir / IMAGENET_CLASS_FILE)
    return [wnid for wnid, _ in pairs], [classname for _, classname in pairs]


def _wnid_folders(
    directory: Path, wnids: list[str], dataset_dir: Path, subset: bool = False
) -> tuple[list[int], list[tuple]]:
    """(labels present, samples) of ``directory/<wnid>/*``, each wnid's label its index in
    ``wnids``; a folder that is no wnid of classnames.txt is an error, a class without a folder
    a warning (unless ``subset``: a variant holds only some classes)."""
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    folders = subfolders(directory)
    for folder in folders:
        if folder not in label_of:
            raise InputError(
                f"{directory / folder} is not a wnid of {dataset_dir / IMAGENET_CLASS_FILE}; "
                "expected one folder per class, named by its wnid"
            )
    if not subset:
        warn_missing_classes(directory, wnids, folders)
    labels = sorted(label_of[folder] for folder in folders)
    return labels, class_folders(directory, [wnids[label] for label in labels], labels)
