"""`load_dataset`: a dataset folder found under a root and read by its layout into a `Split`, for
every dataset of the paper's protocol in CoOp's layout, plain ImageFolder trees, and the bundled
digits.

``load_dataset(root, name)`` finds the dataset folder (``root/name``, ``root`` itself, or a
folder named by an alias of the same dataset) and reads the layout CoOp's ``DATASETS.md``
describes (folder and file names as in CoOp's ``datasets/*.py``)::

    imagenet/              classnames.txt ("<wnid> <class name>" per line),
                           images/train/<wnid>/*, images/val/<wnid>/* (val is the test set)
    caltech-101/           split_zhou_Caltech101.json, 101_ObjectCategories/
    oxford_pets/           split_zhou_OxfordPets.json, images/
    stanford_cars/         split_zhou_StanfordCars.json, cars_train/, cars_test/
    oxford_flowers/        split_zhou_OxfordFlowers.json, jpg/
    food-101/              split_zhou_Food101.json, images/
    fgvc_aircraft/         variants.txt, images_variant_{train,val,test}.txt, images/<id>.jpg
    sun397/                split_zhou_SUN397.json, SUN397/
    dtd/                   split_zhou_DescribableTextures.json, images/
    eurosat/               split_zhou_EuroSAT.json, 2750/
    ucf101/                split_zhou_UCF101.json, UCF-101-midframes/
    imagenetv2/            classnames.txt, imagenetv2-matched-frequency-format-val/<label>/*
    imagenet-sketch/       classnames.txt, images/<wnid>/*
    imagenet-adversarial/  classnames.txt, imagenet-a/<wnid>/*   (200 of ImageNet's classes)
    imagenet-rendition/    classnames.txt, imagenet-r/<wnid>/*   (200 of ImageNet's classes)

Labels and class names follow CoOp: a split file's labels and names as written (Caltech101's
file already leaves out ``BACKGROUND_Google`` and ``Faces_easy``), FGVC-Aircraft's labels in the
order of ``variants.txt``, ImageNet's (and its variants') labels in sorted-wnid order, which is
the order of CoOp's ``classnames.txt`` and the meaning of ImageNetV2's numbered folders. Any
other folder is an ImageFolder tree ``train/<class>/``, ``test/<class>/`` (or ``val/``).

What a user gave wrong (a missing folder or file, a split file that is empty, not JSON, or whose
labels skip a value, a ``classnames.txt`` line without a space, a layout without images) raises
`InputError` with one line naming the file or folder and what was expected. An empty class
folder is a warning that names it, not an error: the class stays in the class list (so every
other label keeps its meaning and a checkpoint's classes still line up) and has no samples
there; real datasets ship such folders, and refusing them would block evaluation on the rest.
A part a command needs but that has no images (no test images for ``pini eval``, no training
images in a test-only dataset) is for the caller to refuse, with `Split.require`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .coop_split_file import SPLIT_FILE_LAYOUTS, load_coop_split
from .digits import load_digits_split
from .fgvc_aircraft import FGVC_CLASS_FILE, load_fgvc_aircraft
from .image_folder import load_image_folder
from .imagenet import (
    IMAGENET_CLASS_FILE,
    IMAGENETV2_FOLDER,
    WNID_FOLDER_VARIANTS,
    load_imagenet,
    load_imagenet_variant,
    load_imagenetv2,
)
from .listing import subfolders
from .names import canonical_name
from .split import DatasetNotFoundError, Split

# `_detect_layout`'s answer for a split file that is none of CoOp's.
_GENERIC_SPLIT_FILE = "split file"


def load_dataset(root: str | Path | None, name: str | None = None) -> Split:
    """The dataset ``name`` under ``root`` (``root/name``, ``root/<CoOp's folder name>``, a
    subfolder named by another alias), or ``root`` itself when it is that dataset's folder; with
    no ``name``, ``root`` is the dataset folder. No ``root``: the bundled digits.

    The layout is chosen by ``name`` (or the folder's name) when it is one of `DATASET_NAMES`
    or their aliases, else by the folder's contents (a ``split_zhou_*.json``, ``variants.txt``,
    ``classnames.txt``), else it is an ImageFolder tree. Raises `InputError` (one line) for a
    missing folder, a bad file, or a folder with no images at all.
    """
    if root is None:
        if name is not None and name.lower() != "digits":
            raise InputError(
                f"dataset {name!r} needs a root folder (--root) that holds it; without one the "
                "bundled digits are used"
            )
        return load_digits_split()
    root = Path(root).expanduser()
    if not root.is_dir():
        kind = "is a file" if root.exists() else "does not exist"
        raise DatasetNotFoundError(f"dataset folder not found: {root} {kind}")
    # Resolved through symlinks, as a run stores its --root: the same images listed through
    # another spelling of the folder are the same listing (else a resume saw "other data").
    directory = _find_dataset_folder(root, name).resolve()
    kind = canonical_name(name) or canonical_name(directory.name) or _detect_layout(directory)
    if kind in SPLIT_FILE_LAYOUTS:
        split_file = SPLIT_FILE_LAYOUTS[kind][0]
        if not (directory / split_file).is_file() and _has_image_folder_tree(directory):
            return load_image_folder(directory, kind)
        return load_coop_split(directory, kind)
    if kind == "fgvc_aircraft":
        if not (directory / FGVC_CLASS_FILE).is_file() and _has_image_folder_tree(directory):
            return load_image_folder(directory, kind)
        return load_fgvc_aircraft(directory)
    if kind == "imagenet":
        return load_imagenet(directory)
    if kind == "imagenetv2":
        return load_imagenetv2(directory)
    if kind in WNID_FOLDER_VARIANTS:
        return load_imagenet_variant(directory, kind)
    if kind == _GENERIC_SPLIT_FILE:
        return load_coop_split(directory)
    return load_image_folder(directory)


def _find_dataset_folder(root: Path, name: str | None) -> Path:
    if name is None:
        return root
    canonical = canonical_name(name)
    if (canonical and canonical_name(root.name) == canonical) or _looks_like_dataset(root):
        return root
    candidates = [root / name]
    if canonical:
        candidates.append(root / canonical)
        candidates += [
            root / child for child in subfolders(root) if canonical_name(child) == canonical
        ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    also = f" or {root / canonical}" if canonical and canonical != name else ""
    raise DatasetNotFoundError(
        f"dataset folder not found: no {root / name}{also}, and {root} is not itself a dataset "
        "folder; expected the dataset's folder under the root (CoOp's layout) or the root to be it"
    )


def _looks_like_dataset(directory: Path) -> bool:
    """``root`` may point at the dataset folder itself (then ``name`` only names it)."""
    return directory.is_dir() and (
        any(directory.glob("split_zhou_*.json"))
        or (directory / IMAGENET_CLASS_FILE).is_file()
        or (directory / FGVC_CLASS_FILE).is_file()
        or _has_image_folder_tree(directory)
    )


def _has_image_folder_tree(directory: Path) -> bool:
    return any((directory / part).is_dir() for part in ("train", "test", "val"))


def _detect_layout(directory: Path) -> str | None:
    """The layout of a folder whose name is none of the protocol's: from its files."""
    split_files = {path.name for path in directory.glob("split_zhou_*.json")}
    if split_files:
        known = [kind for kind, (file, _) in SPLIT_FILE_LAYOUTS.items() if file in split_files]
        return known[0] if len(known) == 1 and len(split_files) == 1 else _GENERIC_SPLIT_FILE
    if (directory / FGVC_CLASS_FILE).is_file():
        return "fgvc_aircraft"
    if (directory / IMAGENET_CLASS_FILE).is_file():
        if (directory / IMAGENETV2_FOLDER).is_dir():
            return "imagenetv2"
        for kind in ("imagenet-adversarial", "imagenet-rendition"):
            if (directory / WNID_FOLDER_VARIANTS[kind]).is_dir():
                return kind
        images = directory / "images"
        if images.is_dir() and not (images / "train").is_dir() and not (images / "val").is_dir():
            return "imagenet-sketch"
        return "imagenet"
    return None
