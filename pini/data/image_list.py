"""Images for the trainer: ``(source, label)`` samples as tensors, unreadable ones reported by
path and skipped (``collate_skipping`` counts them), never a crash mid-epoch.

A sample's source is a file path, or an in-memory PIL image for the bundled digits.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


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
