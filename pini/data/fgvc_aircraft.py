"""FGVC-Aircraft as CoOp reads it: ``variants.txt`` and ``images_variant_{train,val,test}.txt``."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .listing import read_text
from .split import Split

FGVC_CLASS_FILE = "variants.txt"
FGVC_PART_FILES = {part: f"images_variant_{part}.txt" for part in ("train", "val", "test")}


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
    classnames = [line.strip() for line in read_text(class_path, expected).splitlines()]
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
    for number, line in enumerate(read_text(path, expected).splitlines(), start=1):
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
