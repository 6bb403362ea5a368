"""Few-shot data: CoOp/Dassl split files, ImageNet's class list, plain ImageFolder trees, the
bundled digits dataset, K-shot sampling cached per seed, CLIP preprocessing.

A sample is ``(source, label)``: a file path, or an in-memory PIL image for the bundled digits.
Unreadable images are reported by path and skipped (``collate_skipping`` counts them), never a
crash mid-epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclasses.dataclass
class Split:
    """Samples of one dataset: train / test lists of (source, label) and the class names."""

    classnames: list[str]
    train: list[tuple]
    test: list[tuple]
    name: str = "dataset"


# --- sources ----------------------------------------------------------------------------------


def load_coop_split(dataset_dir: str | Path) -> Split:
    """A CoOp/Dassl dataset folder: ``split_zhou_*.json`` with ``[relative_path, label,
    classname]`` entries under "train", "val" and "test"; images below the folder (or one of
    its subfolders, found from the first entry)."""
    dataset_dir = Path(dataset_dir)
    split_files = sorted(dataset_dir.glob("split_zhou_*.json"))
    if not split_files:
        raise FileNotFoundError(f"no split_zhou_*.json in {dataset_dir}")
    entries = json.loads(split_files[0].read_text())
    first = (entries.get("train") or entries.get("test"))[0][0]
    candidates = [dataset_dir, *sorted(p for p in dataset_dir.iterdir() if p.is_dir())]
    image_root = next((c for c in candidates if (c / first).exists()), dataset_dir)
    names: dict[int, str] = {}
    lists = {}
    for part in ("train", "test"):
        lists[part] = []
        for relative, label, classname in entries.get(part, []):
            names[int(label)] = classname
            lists[part].append((str(image_root / relative), int(label)))
    classnames = [names[i] for i in range(len(names))]
    return Split(classnames, lists["train"], lists["test"], dataset_dir.name)


def load_image_folder(root: str | Path) -> Split:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (``val`` if no ``test``), or
    ``root/<class>/*`` used for both; classes sorted by folder name."""
    root = Path(root)
    train_dir = root / "train"
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not train_dir.is_dir():
        train_dir = test_dir = root
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {train_dir}")
    classnames = [name.replace("_", " ") for name in classes]
    train, test = _class_folders(train_dir, classes), _class_folders(test_dir, classes)
    return Split(classnames, train, test, root.name)


def _class_folders(directory: Path, folders) -> list[tuple]:
    """(path, label) for the images in ``directory / folders[label]``."""
    return [
        (str(path), label)
        for label, folder in enumerate(folders)
        for path in sorted((directory / folder).glob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def load_imagenet(root: str | Path) -> Split:
    """ImageNet as CoOp lays it out: ``classnames.txt`` ("wnid class name" per line) and
    ``images/train/<wnid>/*``, ``images/val/<wnid>/*``."""
    root = Path(root)
    lines = (root / "classnames.txt").read_text().splitlines()
    wnids, classnames = zip(*(line.split(" ", 1) for line in lines if line.strip()), strict=True)
    images = root / "images"
    train = _class_folders(images / "train", wnids)
    test = _class_folders(images / "val", wnids)
    return Split(list(classnames), train, test, "imagenet")


# The bundled digits, shuffled once: a test part, a few-shot pool, and a disjoint part on which the
# demo's tiny CLIP is pre-trained (pini/demo.py).
DIGITS_TEST, DIGITS_POOL = 540, 600


def _digits(seed: int = 0) -> list[tuple]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    samples = []
    for pixels, label in zip(digits.images, digits.target, strict=True):
        array = (pixels * (255.0 / 16.0)).clip(0, 255).astype("uint8")
        samples.append((Image.fromarray(array).convert("RGB"), int(label)))
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


def load_dataset(root: str | Path | None, name: str | None) -> Split:
    """``root`` and ``name`` as the CLI takes them: no root -> the bundled digits; a folder with a
    split_zhou file -> CoOp layout; ``name="imagenet"`` -> ImageNet layout; else ImageFolder."""
    if root is None:
        return load_digits_split()
    directory = Path(root)
    if name and (directory / name).is_dir():
        directory = directory / name
    elif name and not _looks_like_dataset(directory):
        raise FileNotFoundError(f"dataset folder not found: {directory / name}")
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {directory}")
    if name == "imagenet" or (directory / "classnames.txt").is_file():
        return load_imagenet(directory)
    if any(directory.glob("split_zhou_*.json")):
        return load_coop_split(directory)
    return load_image_folder(directory)


def _looks_like_dataset(directory: Path) -> bool:
    """``--root`` may point at the dataset folder itself (then ``--dataset`` only names it)."""
    return directory.is_dir() and (
        any(directory.glob("split_zhou_*.json"))
        or (directory / "classnames.txt").is_file()
        or (directory / "train").is_dir()
    )


# --- few-shot sampling ------------------------------------------------------------------------


def few_shot(samples: list[tuple], shots: int, seed: int, cache: str | Path | None = None):
    """``shots`` samples per class, chosen by ``seed`` (fewer only where a class has fewer, with a
    warning). With ``cache``, the chosen indices are stored there and reused, so a split is
    reproducible across runs and machines."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    cache = Path(cache) if cache else None
    if cache is not None and cache.is_file():
        indices = json.loads(cache.read_text())["indices"]
        return [samples[i] for i in indices]
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, (_, label) in enumerate(samples):
        by_class[label].append(index)
    rng = random.Random(seed)
    indices = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < shots:
            log.warning("class %d has %d samples, fewer than %d shots", label, len(members), shots)
            indices += members
        else:
            indices += sorted(rng.sample(members, shots))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(".tmp")
        temporary.write_text(json.dumps({"shots": shots, "seed": seed, "indices": indices}))
        temporary.replace(cache)
    return [samples[i] for i in indices]


# --- images -----------------------------------------------------------------------------------


def clip_transforms(
    image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0)
) -> tuple[transforms.Compose, transforms.Compose]:
    """(train, test) preprocessing: random resized crop (Dassl's scale range by default) + flip,
    or resize + center crop; CLIP's mean and std."""
    normalize = transforms.Normalize(CLIP_MEAN, CLIP_STD)
    bicubic = transforms.InterpolationMode.BICUBIC
    train = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=crop_scale, interpolation=bicubic),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])  # fmt: skip
    test = transforms.Compose([
        transforms.Resize(image_size, interpolation=bicubic),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ])  # fmt: skip
    return train, test


class ImageList(Dataset):
    """(source, label) samples as (image tensor, label); an unreadable file gives None."""

    def __init__(self, samples: list[tuple], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        source, label = self.samples[index]
        try:
            image = source if isinstance(source, Image.Image) else Image.open(source)
            return self.transform(image.convert("RGB")), label
        except (OSError, ValueError) as error:
            log.warning("skipping unreadable image %s: %s", source, error)
            return None


def collate_skipping(batch):
    """(images, labels, skipped): unreadable samples (None) are dropped and counted; works in
    DataLoader workers too, since the count travels with the batch."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images, labels = zip(*kept, strict=True)
    return torch.stack(images), torch.tensor(labels), skipped
