"""Frozen image features: a sample list encoded once (`encode_samples`, batch for batch as the
images would be), and the in-process `FeatureCache` that keeps them.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator

import torch
from torch.utils.data import DataLoader

from ..errors import InputError
from .image_list import ImageList, collate_skipping


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
