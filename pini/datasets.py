"""Every dataset of the paper's protocol in CoOp's layout, plain ImageFolder trees, and the bundled
digits, each read into a `Split`.

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

import dataclasses
import hashlib
import json
import logging
import os
import random
from pathlib import Path

from PIL import Image

from .errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# CoOp's folder names, in the order of its DATASETS.md: the names `Split.name` takes and the
# prompt templates are keyed on.
DATASET_NAMES = (
    "imagenet",
    "caltech-101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food-101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
    "imagenetv2",
    "imagenet-sketch",
    "imagenet-adversarial",
    "imagenet-rendition",
)
# Datasets used for testing only (CoOp's domain-generalization targets): their `Split.train` is
# empty.
TEST_ONLY_DATASETS = frozenset(DATASET_NAMES[11:])

# Datasets with a CoOp split file: (split file, folder the file's image paths are relative to,
# "" for the dataset folder itself), from CoOp's datasets/*.py.
SPLIT_FILE_LAYOUTS = {
    "caltech-101": ("split_zhou_Caltech101.json", "101_ObjectCategories"),
    "oxford_pets": ("split_zhou_OxfordPets.json", "images"),
    "stanford_cars": ("split_zhou_StanfordCars.json", ""),
    "oxford_flowers": ("split_zhou_OxfordFlowers.json", "jpg"),
    "food-101": ("split_zhou_Food101.json", "images"),
    "sun397": ("split_zhou_SUN397.json", "SUN397"),
    "dtd": ("split_zhou_DescribableTextures.json", "images"),
    "eurosat": ("split_zhou_EuroSAT.json", "2750"),
    "ucf101": ("split_zhou_UCF101.json", "UCF-101-midframes"),
}
FGVC_CLASS_FILE = "variants.txt"
FGVC_PART_FILES = {part: f"images_variant_{part}.txt" for part in ("train", "val", "test")}
IMAGENET_CLASS_FILE = "classnames.txt"
IMAGENETV2_FOLDER = "imagenetv2-matched-frequency-format-val"
# ImageNet variants whose folders are named by wnid: the folder holding them.
WNID_FOLDER_VARIANTS = {
    "imagenet-sketch": "images",
    "imagenet-adversarial": "imagenet-a",
    "imagenet-rendition": "imagenet-r",
}

# Other spellings users type (the paper's and Dassl's names, torchvision's), compared after
# `_alias_key`. Bare words such as "pets" or "flowers" are left out: they would claim a user's
# own ImageFolder tree of that name.
_EXTRA_ALIASES = {
    "flowers102": "oxford_flowers",
    "oxfordflowers102": "oxford_flowers",
    "describabletextures": "dtd",
    "imageneta": "imagenet-adversarial",
    "imagenetr": "imagenet-rendition",
}


def _alias_key(name: str) -> str:
    return "".join(character for character in name.lower() if character.isalnum())


_ALIASES = {_alias_key(name): name for name in DATASET_NAMES} | _EXTRA_ALIASES


def canonical_name(name: str | None) -> str | None:
    """CoOp's folder name for ``name`` or one of its aliases (case, ``-``, ``_`` and spaces
    ignored: ``flowers102``, ``Food101``, ``caltech101``, ``ImageNet-A``, ``imagenet_v2`` ...);
    None for a name that is none of the protocol's datasets."""
    return _ALIASES.get(_alias_key(name)) if name else None


class DatasetNotFoundError(InputError, FileNotFoundError):
    """A dataset folder that does not exist (an `InputError`, and still a ``FileNotFoundError``
    for callers that catch that)."""


@dataclasses.dataclass
class Split:
    """One dataset's samples and classes.

    - ``train``, ``val``, ``test``: lists of ``(source, label)``; ``source`` is an image path
      (``str``) or, for the bundled digits, an in-memory PIL image; ``label`` indexes
      ``classnames``. ``val`` is CoOp's validation part where the dataset has one (split files,
      FGVC-Aircraft, an ImageFolder tree with both ``test/`` and ``val/``), else empty (ImageNet:
      CoOp evaluates on its ``val`` folder, which is ``test`` here). The test-only datasets
      (`TEST_ONLY_DATASETS`) have an empty ``train``.
    - ``name``: CoOp's folder name (`DATASET_NAMES`) for the protocol's datasets, the folder's
      own name for an ImageFolder tree, ``"digits"`` for the bundled digits.
    - ``class_subset``: None where every class of ``classnames`` is evaluated; else the sorted
      indices into ``classnames`` of the classes the dataset holds (ImageNet-A and -R: 200 of
      ImageNet's 1000; ImageNet-Sketch with folders missing). Labels stay indices into the full
      ``classnames``, so an ImageNet-trained model's classes apply unchanged; evaluate as CoOp
      does by restricting the logits to these columns:
      ``prediction = class_subset[logits[:, class_subset].argmax(-1)]``.
    - ``directory``: the dataset folder that was read (None for the digits).
    """

    classnames: list[str]
    train: list[tuple]
    test: list[tuple]
    name: str = "dataset"
    val: list[tuple] = dataclasses.field(default_factory=list)
    class_subset: list[int] | None = None
    directory: str | None = None

    def require(self, *parts: str) -> None:
        """Raise `InputError` if one of ``parts`` ("train", "val", "test") has no samples: a
        command that trains needs "train", one that evaluates needs "test"."""
        for part in parts:
            if part not in ("train", "val", "test"):
                raise ValueError(f"parts must be 'train', 'val' or 'test', got {part!r}")
            if getattr(self, part):
                continue
            where = f"{self.name} ({self.directory})" if self.directory else self.name
            label = {"train": "training", "val": "validation", "test": "test"}[part]
            if part == "train" and self.name in TEST_ONLY_DATASETS:
                hint = "it is a test-only dataset: evaluate an ImageNet-trained model on it"
            else:
                hint = f"expected {part} images in the dataset's layout"
            raise InputError(f"dataset {where} has no {label} images; {hint}")


# --- the dataset folder -----------------------------------------------------------------------

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
            root / child for child in _subfolders(root) if canonical_name(child) == canonical
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


# --- CoOp split files -------------------------------------------------------------------------

_SPLIT_FILE_FORMAT = (
    'CoOp\'s split JSON {"train": [[image path, label, class name], ...], "val": [...], '
    '"test": [...]}'
)


def load_coop_split(dataset_dir: str | Path, name: str | None = None) -> Split:
    """A dataset with a CoOp split file: ``split_zhou_*.json`` holding ``[image path, label,
    class name]`` entries under "train", "val" and "test", the paths relative to the image
    folder CoOp uses for ``name`` (`SPLIT_FILE_LAYOUTS`). Without ``name`` the split file's name
    says which dataset it is; an unknown split file (the only one in the folder) is read with
    its images below the folder or one of its subfolders, found from its first entry.

    Class names are the file's, label ``i`` the name its entries give it (CoOp's and Dassl's
    rule); the labels must run from 0 without a gap. ``Split.name`` is CoOp's folder name (the
    folder's own name for an unknown split file).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetNotFoundError(f"dataset folder not found: {dataset_dir}")
    kind = canonical_name(name)
    present = sorted(path.name for path in dataset_dir.glob("split_zhou_*.json"))
    if kind is None:
        known = [k for k, (file, _) in SPLIT_FILE_LAYOUTS.items() if file in present]
        kind = known[0] if len(known) == 1 and len(present) == 1 else None
    if kind in SPLIT_FILE_LAYOUTS:
        split_name, image_folder = SPLIT_FILE_LAYOUTS[kind]
        split_path = dataset_dir / split_name
        if not split_path.exists():
            found = f" (found {', '.join(present)})" if present else ""
            raise InputError(
                f"no {split_name} in {dataset_dir}{found}; expected CoOp's {kind} layout: "
                f"{split_name} (linked from CoOp's DATASETS.md) beside the images"
            )
        image_dirs = [dataset_dir / image_folder]
    else:
        if len(present) != 1:
            what = f"{len(present)} split files ({', '.join(present)})" if present else "none"
            raise InputError(
                f"expected one split_zhou_*.json in {dataset_dir}, found {what}; name the dataset "
                f"to say which ({', '.join(SPLIT_FILE_LAYOUTS)})"
            )
        split_path = dataset_dir / present[0]
        image_dirs = []
    parts = _read_split_file(split_path)
    classnames = _classnames_from_labels(
        {
            part: [(label, classname) for _, label, classname in entries]
            for part, entries in parts.items()
        },
        split_path,
    )
    first = next(entries[0][0] for entries in parts.values() if entries)
    image_dirs += [dataset_dir, *(dataset_dir / child for child in _subfolders(dataset_dir))]
    image_root = next((folder for folder in image_dirs if (folder / first).exists()), None)
    if image_root is None:
        raise InputError(
            f"{split_path} lists {first}, which is not in {image_dirs[0]} nor in any folder of "
            f"{dataset_dir}; expected the images where CoOp's layout puts them"
        )
    samples = {
        part: [(str(image_root / relative), label) for relative, label, _ in entries]
        for part, entries in parts.items()
    }
    return Split(
        classnames,
        samples["train"],
        samples["test"],
        kind or dataset_dir.name,
        val=samples["val"],
        directory=str(dataset_dir),
    )


def _read_split_file(path: Path) -> dict[str, list[tuple[str, int, str]]]:
    """The "train", "val" and "test" entries of a CoOp split file, checked: each a
    ``(relative path, label, class name)``; "val" may be missing."""
    text = _read_text(path, _SPLIT_FILE_FORMAT)
    if not text.strip():
        raise InputError(f"{path} is empty; expected {_SPLIT_FILE_FORMAT}")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno}); "
            f"expected {_SPLIT_FILE_FORMAT}"
        ) from None
    if not isinstance(content, dict) or not all(part in content for part in ("train", "test")):
        raise InputError(f'{path} has no "train" and "test" lists; expected {_SPLIT_FILE_FORMAT}')
    parts = {}
    for part in ("train", "val", "test"):
        entries = content.get(part, [])
        if not isinstance(entries, list):
            raise InputError(f'{path}: "{part}" is not a list; expected {_SPLIT_FILE_FORMAT}')
        parts[part] = [
            _split_entry(entry, path, part, index) for index, entry in enumerate(entries)
        ]
    if not any(parts.values()):
        raise InputError(f"{path} lists no images; expected {_SPLIT_FILE_FORMAT}")
    return parts


def _split_entry(entry, path: Path, part: str, index: int) -> tuple[str, int, str]:
    if isinstance(entry, list) and len(entry) == 3:
        relative, label, classname = entry
        if (
            isinstance(relative, str)
            and isinstance(classname, str)
            and isinstance(label, int)
            and not isinstance(label, bool)
            and label >= 0
        ):
            return relative, label, classname
    raise InputError(
        f'{path}: entry {index} of "{part}" is {json.dumps(entry)[:80]}; expected '
        "[image path, label >= 0, class name]"
    )


def _classnames_from_labels(pairs: dict[str, list[tuple[int, str]]], path: Path) -> list[str]:
    """Class names by label from ``(label, class name)`` pairs: one name per label, labels
    0..N-1 without a gap (Dassl counts max(label) + 1 classes, so a gap would shift nothing
    but leave a class without a name)."""
    names: dict[int, str] = {}
    for pairs_of_part in pairs.values():
        for label, classname in pairs_of_part:
            if names.setdefault(label, classname) != classname:
                raise InputError(
                    f"{path}: label {label} is both {names[label]!r} and {classname!r}; expected "
                    "one class name per label"
                )
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise InputError(
            f"{path}: labels skip {shown} (labels found: {len(names)}, largest {max(names)}); "
            f"expected every label from 0 to {max(names)}, one per class"
        )
    return [names[label] for label in range(len(names))]


# --- FGVC-Aircraft ----------------------------------------------------------------------------


def load_fgvc_aircraft(dataset_dir: str | Path) -> Split:
    """FGVC-Aircraft as CoOp reads it (its ``data/`` folder, renamed ``fgvc_aircraft``): the
    classes are the lines of ``variants.txt`` in order, each ``images_variant_<part>.txt`` line
    is ``<image id> <variant>`` with the image at ``images/<image id>.jpg``."""
    dataset_dir = Path(dataset_dir)
    class_path = dataset_dir / FGVC_CLASS_FILE
    expected = "one variant name per line"
    if not class_path.is_file():
        raise InputError(
            f"no {FGVC_CLASS_FILE} in {dataset_dir}; expected FGVC-Aircraft's data/ folder "
            f"(CoOp's fgvc_aircraft/: images/, {FGVC_CLASS_FILE}, images_variant_*.txt)"
        )
    classnames = [line.strip() for line in _read_text(class_path, expected).splitlines()]
    classnames = [name for name in classnames if name]
    if not classnames:
        raise InputError(f"{class_path} is empty; expected {expected}")
    label_of: dict[str, int] = {}
    for name in classnames:
        if name in label_of:
            raise InputError(f"{class_path} lists {name!r} twice; expected {expected}")
        label_of[name] = len(label_of)
    samples = {}
    for part, file_name in FGVC_PART_FILES.items():
        samples[part] = _read_fgvc_part(dataset_dir / file_name, dataset_dir / "images", label_of)
    if not any(samples.values()):
        raise InputError(f"{dataset_dir}: images_variant_*.txt list no images")
    return Split(
        classnames,
        samples["train"],
        samples["test"],
        "fgvc_aircraft",
        val=samples["val"],
        directory=str(dataset_dir),
    )


def _read_fgvc_part(path: Path, image_dir: Path, label_of: dict[str, int]) -> list[tuple]:
    expected = "'<image id> <variant>' per line, the variant one of variants.txt"
    if not path.is_file():
        raise InputError(f"no {path.name} in {path.parent}; expected {expected}")
    samples = []
    for number, line in enumerate(_read_text(path, expected).splitlines(), start=1):
        if not line.strip():
            continue
        image_id, space, variant = line.strip().partition(" ")
        if not space or variant not in label_of:
            problem = "has no space" if not space else f"names {variant!r}, not in variants.txt"
            raise InputError(
                f"{path} line {number}: {line.strip()!r} {problem}; expected {expected}"
            )
        samples.append((str(image_dir / f"{image_id}.jpg"), label_of[variant]))
    if samples and not Path(samples[0][0]).exists():
        raise InputError(
            f"{path} lists {samples[0][0]}, which does not exist; expected the images in "
            f"{image_dir}"
        )
    return samples


# --- ImageNet and its variants ----------------------------------------------------------------

_IMAGENET_CLASS_FORMAT = "'<wnid> <class name>' per line (CoOp's ImageNet classnames.txt)"


def read_imagenet_classnames(path: str | Path) -> list[tuple[str, str]]:
    """``(wnid, class name)`` pairs of a ``classnames.txt``, sorted by wnid: ImageNet's label
    ``i`` is the ``i``-th wnid in sorted order (CoOp labels its sorted class folders; its
    ``classnames.txt`` is in that order already; ImageNetV2's folder ``i`` is that class)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no {path.name} in {path.parent}; expected {_IMAGENET_CLASS_FORMAT}")
    pairs = {}
    for number, line in enumerate(_read_text(path, _IMAGENET_CLASS_FORMAT).splitlines(), start=1):
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
    _require_some_images(parts, dataset_dir, layout)
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
    _require_some_images({"test": test}, dataset_dir, layout)
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
    folders = _subfolders(image_dir)
    for folder in folders:
        if not folder.isdigit() or int(folder) >= len(wnids):
            raise InputError(f"{image_dir / folder} is not a label of {layout}")
    labels = sorted(int(folder) for folder in folders)
    test = _class_folders(image_dir, [str(label) for label in labels], labels)
    _warn_missing_classes(image_dir, [str(label) for label in range(len(wnids))], folders)
    _require_some_images({"test": test}, dataset_dir, layout)
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
    folders = _subfolders(directory)
    for folder in folders:
        if folder not in label_of:
            raise InputError(
                f"{directory / folder} is not a wnid of {dataset_dir / IMAGENET_CLASS_FILE}; "
                "expected one folder per class, named by its wnid"
            )
    if not subset:
        _warn_missing_classes(directory, wnids, folders)
    labels = sorted(label_of[folder] for folder in folders)
    return labels, _class_folders(directory, [wnids[label] for label in labels], labels)


# --- ImageFolder trees ------------------------------------------------------------------------


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
    classes = _subfolders(class_dir)
    _warn_hidden_folders(class_dir)
    if not classes:
        raise InputError(f"no class folders in {class_dir}; expected {layout}")
    _refuse_same_class_names(class_dir, classes)
    for directory in folders.values():
        extra = sorted(set(_subfolders(directory)) - set(classes))
        if extra:
            raise InputError(
                f"{directory / extra[0]} is a class that {class_dir} does not have; expected the "
                "same class folders in train/ and test/"
            )
    parts = {}
    for part, directory in folders.items():
        _warn_missing_classes(directory, classes, _subfolders(directory))
        parts[part] = _class_folders(directory, classes)
    _require_some_images(parts, root, layout)
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


# --- listing helpers --------------------------------------------------------------------------


def _class_folders(
    directory: Path, folders: list[str], labels: list[int] | None = None
) -> list[tuple]:
    """``(path, label)`` for the images in ``directory / folders[i]`` with label ``labels[i]``
    (``i`` without ``labels``), files sorted by name; one warning names the class folders that
    hold no image (they stay classes, with no samples here)."""
    labels = list(range(len(folders))) if labels is None else labels
    samples, empty = [], []
    for label, folder in zip(labels, folders, strict=True):
        path = directory / folder
        images = _list_images(path) if path.is_dir() else []
        if path.is_dir() and not images:
            empty.append(folder)
        samples += [(image, label) for image in images]
    if empty:
        log.warning(
            "%d empty class folder%s in %s (kept as classes without images here): %s",
            len(empty),
            "s" if len(empty) > 1 else "",
            directory,
            _first_names(empty),
        )
    return samples


def _warn_hidden_folders(directory: Path) -> None:
    """Folders whose names start with "." are not classes (".git", ".ipynb_checkpoints"): one
    warning names them, so a class named ".NET" is not silently dropped."""
    with os.scandir(directory) as entries:
        hidden = sorted(e.name for e in entries if e.name.startswith(".") and e.is_dir())
    if hidden:
        log.warning(
            "%s: %d hidden folder%s (names starting with '.') skipped, not classes: %s",
            directory, len(hidden), "s" if len(hidden) > 1 else "", _first_names(hidden),
        )  # fmt: skip


def _refuse_same_class_names(directory: Path, folders: list[str]) -> None:
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


def _warn_missing_classes(directory: Path, expected: list[str], found: list[str]) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        log.warning(
            "%s has no folder for %d of %d classes (no images of them here): %s",
            directory,
            len(missing),
            len(expected),
            _first_names(missing),
        )


def _first_names(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _list_images(folder: Path) -> list[str]:
    """Image files (by suffix, hidden files left out) in ``folder``, sorted by name."""
    with os.scandir(folder) as entries:
        return sorted(
            entry.path
            for entry in entries
            if not entry.name.startswith(".")
            and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
            and entry.is_file()
        )


def _subfolders(directory: Path) -> list[str]:
    """Names of the folders (hidden ones left out) in ``directory``, sorted."""
    with os.scandir(directory) as entries:
        return sorted(
            entry.name for entry in entries if not entry.name.startswith(".") and entry.is_dir()
        )


def _require_some_images(parts: dict[str, list], directory: Path, layout: str) -> None:
    if not any(parts.values()):
        raise InputError(f"no images in {directory}; expected {layout}")


def _read_text(path: Path, expected: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; expected {expected}") from None
    except OSError as error:
        raise InputError(
            f"cannot read {path} ({error.strerror or error}); expected {expected}"
        ) from None


# --- the bundled digits -----------------------------------------------------------------------

# The bundled digits, shuffled once: a test part, a few-shot pool, and a disjoint part on which the
# demo's tiny CLIP is pre-trained (pini/demo.py).
DIGITS_TEST, DIGITS_POOL = 540, 600
# Each digit image carries its index in scikit-learn's dataset in ``image.info`` under this key:
# its stable identity for `sample_id` (the image stays a plain PIL image for `ImageList`).
DIGITS_INDEX_KEY = "digits_index"


def _digits(seed: int = 0) -> list[tuple]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    samples = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        array = (pixels * (255.0 / 16.0)).clip(0, 255).astype("uint8")
        image = Image.fromarray(array).convert("RGB")
        image.info[DIGITS_INDEX_KEY] = index
        samples.append((image, int(label)))
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in order]


def load_digits_split() -> Split:
    """scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with the package): the
    embedded dataset of the default run and the tests. 600 form the few-shot pool, 540 the test
    set."""
    samples = _digits()
    test = samples[:DIGITS_TEST]
    pool = samples[DIGITS_TEST : DIGITS_TEST + DIGITS_POOL]
    return Split(list(DIGIT_NAMES), pool, test, "digits")


def digits_pretraining_samples() -> list[tuple]:
    """The digits outside the test set and the few-shot pool (657 images)."""
    return _digits()[DIGITS_TEST + DIGITS_POOL :]


# --- fingerprints -----------------------------------------------------------------------------


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
