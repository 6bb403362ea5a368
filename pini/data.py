"""Few-shot data: K-shot sampling cached per seed, CLIP preprocessing, images for the trainer. The
dataset loaders (CoOp's layouts, ImageFolder trees, the bundled digits) are in `pini.datasets`.

A sample is ``(source, label)``: a file path, or an in-memory PIL image for the bundled digits.
Unreadable images are reported by path and skipped (``collate_skipping`` counts them), never a
crash mid-epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

# Re-exported: the dataset loaders lived here before pini/datasets.py.
from .datasets import (  # noqa: F401
    DIGIT_NAMES,
    DIGITS_POOL,
    DIGITS_TEST,
    IMAGE_SUFFIXES,
    Split,
    digits_pretraining_samples,
    load_coop_split,
    load_dataset,
    load_digits_split,
    load_image_folder,
    load_imagenet,
)
from .errors import InputError
from .files import write_text_atomically

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- few-shot sampling ------------------------------------------------------------------------


def few_shot(
    samples: list[tuple],
    shots: int,
    seed: int,
    cache: str | Path | None = None,
    source: dict | None = None,
) -> list[tuple]:
    """``shots`` samples per class, chosen by ``seed`` (fewer only where a class has fewer, with a
    warning).

    With ``cache``, the split is stored there with what it was drawn from: ``source`` (e.g. the
    dataset name and root), ``shots``, ``seed``, a fingerprint of the whole listing (paths and
    labels) and the chosen samples. A later call reuses it only if all of these still match, and
    otherwise raises ``InputError`` saying what differs: a split is never silently reused for
    other images."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise InputError(f"shots must be an integer >= 1, got {shots!r}")
    from .datasets import listing_fingerprint, sample_id

    source = dict(source or {})
    fingerprint = listing_fingerprint(samples)
    record = {"source": source, "shots": shots, "seed": seed, "listing": fingerprint}
    cache = Path(cache) if cache else None
    stored = cache is not None and cache.is_file()
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, (_, label) in enumerate(samples):
        by_class[label].append(index)
    rng = random.Random(seed)
    indices = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < shots:
            if not stored:
                log.warning(
                    "class %d has %d samples, fewer than %d shots", label, len(members), shots
                )
            indices += members
        else:
            indices += sorted(rng.sample(members, shots))
    if stored:
        return _cached_split(cache, samples, record, indices, sample_id)
    chosen = [samples[i] for i in indices]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        stored = {
            "format": SPLIT_FORMAT,
            **record,
            "indices": indices,
            "samples": [[sample_id(item), label] for item, label in chosen],
        }
        write_text_atomically(cache, json.dumps(stored, indent=1))
    return chosen


SPLIT_FORMAT = "pini-few-shot-split/2"


def _cached_split(
    cache: Path, samples: list[tuple], record: dict, redrawn: list[int], sample_id
) -> list[tuple]:
    """The split stored in ``cache``, after checking it was drawn from the same listing with the
    same options (``record``) and is what its seed draws from that listing (``redrawn``);
    ``InputError`` naming every difference otherwise."""
    try:
        stored = json.loads(cache.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"few-shot split {cache} cannot be read ({error}); delete it") from None
    if not isinstance(stored, dict) or stored.get("format") != SPLIT_FORMAT:
        raise InputError(
            f"few-shot split {cache} is not one this version wrote (no record of the images it "
            "was drawn from); delete it or use another --output"
        )
    names = {"source": "dataset", "shots": "shots", "seed": "seed", "listing": "image listing"}
    differences = [
        f"{names[key]} {stored.get(key)!r} -> {record[key]!r}"
        if key != "listing"
        else "the image listing (files or labels were added, removed or renamed)"
        for key in record
        if stored.get(key) != record[key]
    ]
    if differences:
        raise InputError(
            f"few-shot split {cache} was drawn from other data: {'; '.join(differences)}; "
            "use another --output (or --overwrite) for a new run"
        )
    indices = stored.get("indices")
    chosen_ids = stored.get("samples")
    if (
        not isinstance(indices, list)
        or not isinstance(chosen_ids, list)
        or len(indices) != len(chosen_ids)
        or not all(isinstance(i, int) and 0 <= i < len(samples) for i in indices)
        or [[sample_id(samples[i][0]), samples[i][1]] for i in indices] != chosen_ids
    ):
        raise InputError(f"few-shot split {cache} is damaged (its samples do not match); delete it")
    if indices != redrawn:
        raise InputError(
            f"few-shot split {cache}: its images are not the ones seed {record['seed']} draws "
            f"from this listing ({sum(a != b for a, b in zip(indices, redrawn, strict=False))} "
            "differ; was it edited?); delete it to draw it again, or use another --output"
        )
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
        except Exception as error:  # any decode failure (incl. PIL's DecompressionBombError)
            log.warning("skipping unreadable image %s: %s: %s", source, type(error).__name__, error)
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


# --- frozen image features --------------------------------------------------------------------


@dataclasses.dataclass
class EncodedImages:
    """The frozen image tower's features of a sample list, grouped as a ``DataLoader`` of
    ``batch_size`` over the list groups the images (unreadable ones skipped), so that working
    from the features repeats batch for batch what working from the images does (the same
    images in batch i, hence the same per-batch noise seed in ``pini.train.evaluate``).

    features: (N, D) float32 on the CPU; labels: (N,) int64; batch_index: (N,) the loader
    batch each row was in; skipped: the unreadable images; N + skipped is the sample count."""

    features: torch.Tensor
    labels: torch.Tensor
    batch_index: torch.Tensor
    skipped: int
    batch_size: int

    def batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(batch index, features (b, D), labels (b,)) of each batch that kept an image."""
        for index in torch.unique(self.batch_index).tolist():
            rows = self.batch_index == index
            yield index, self.features[rows], self.labels[rows]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.features, self.labels))


@torch.no_grad()
def encode_samples(
    encode: Callable[[torch.Tensor], torch.Tensor],
    samples: list[tuple],
    transform,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> EncodedImages:
    """``encode`` (images (B, 3, H, W) on ``device`` -> features (B, D), e.g. a frozen CLIP's
    ``encode_image``) over ``samples`` ((source, label) pairs) through ``transform``, in
    loader batches of ``batch_size``; unreadable images are skipped and counted as
    ``ImageList`` and ``collate_skipping`` do. No readable image at all is an ``InputError``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    loader = DataLoader(
        ImageList(samples, transform), batch_size=batch_size, collate_fn=collate_skipping
    )
    features, labels, batch_index, skipped = [], [], [], 0
    for index, (images, batch_labels, batch_skipped) in enumerate(loader):
        skipped += batch_skipped
        if images is None:
            continue
        features.append(encode(images.to(device)).float().cpu())
        labels.append(batch_labels.long())
        batch_index.append(torch.full((len(batch_labels),), index, dtype=torch.long))
    if not features:
        raise InputError(f"no image could be encoded: {len(samples)} samples, {skipped} unreadable")
    return EncodedImages(
        torch.cat(features), torch.cat(labels), torch.cat(batch_index), skipped, batch_size
    )


class FeatureCache:
    """Frozen image features kept in memory for this process, by key: what a key names must
    determine the features exactly (the backbone and its weights, the sample listing, the
    transform, the batching), so that a hit returns what encoding again would. Up to
    ``max_bytes`` in all; the least recently used entries are dropped first, and an entry
    larger than that is computed but not kept. Image files are identified by path, not
    content: a file rewritten in place during one process is not noticed."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], object]):
        """The entry of ``key``, from ``compute()`` on a miss: an ``EncodedImages`` or a tuple
        of tensors."""
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        value = compute()
        if _nbytes(value) <= self.max_bytes:
            self._entries[key] = value
            while sum(_nbytes(entry) for entry in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


def _nbytes(value) -> int:
    if isinstance(value, EncodedImages):
        return value.nbytes
    return sum(t.numel() * t.element_size() for t in value if isinstance(t, torch.Tensor))
