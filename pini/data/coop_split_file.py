"""The datasets CoOp reads from a split file ``split_zhou_<Name>.json``: Caltech101, OxfordPets,
StanfordCars, Flowers102, Food101, SUN397, DTD, EuroSAT, UCF101.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .listing import read_text, subfolders
from .names import canonical_name
from .split import DatasetNotFoundError, Split

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
    image_dirs += [dataset_dir, *(dataset_dir / child for child in subfolders(dataset_dir))]
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
    text = read_text(path, _SPLIT_FILE_FORMAT)
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
