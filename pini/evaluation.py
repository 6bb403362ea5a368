"""Evaluation: accuracy, macro-F1 and per-class accuracy of any method on a test set, from images
or from frozen features encoded once."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data.features import EncodedImages
from .data.image_list import ImageList, collate_skipping
from .errors import InputError
from .progress import show_bars


@contextlib.contextmanager
def features_in_place_of_images(clip: nn.Module):
    """While active, ``clip.encode_image(x)`` returns ``x``: the image tower is replaced by the
    identity, so a model that encodes its images with the frozen CLIP (PiNI without image-level
    noise, the baselines' modules) can be given their precomputed features (B, D) instead."""
    visual = clip.visual
    clip.visual = nn.Identity()
    try:
        yield
    finally:
        clip.visual = visual


@torch.no_grad()
def evaluate(
    model,
    samples: list[tuple],
    transform,
    *,
    batch_size: int = 64,
    zero_shot: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
    class_subset: list[int] | None = None,
    features: EncodedImages | None = None,
) -> dict:
    """Accuracy, macro-F1 and per-class accuracy (in %) of ``model`` (or of zero-shot CLIP) on
    ``samples``; unreadable images are skipped and counted. The inference noise of batch ``i``
    is drawn with seed ``seed + i``, so an evaluation is exactly repeatable. ``class_subset``
    (indices into the model's classes, e.g. ImageNet-A's 200 of ImageNet's 1000) restricts the
    prediction to those classes. No readable image at all is an ``InputError``. Macro-F1 is
    over the classes that have test images (``macro_f1``).

    ``model``: PiNI, a baseline module of ``pini.methods`` (``forward(images, seed)``,
    ``zero_shot_logits``), or a fitted method with only ``logits(features)`` and
    ``num_classes`` (``LinearProbe``, ``TipAdapter``; needs ``features``). ``features``: the
    frozen image features of ``samples`` (``data.features.encode_samples`` with this ``transform``
    and ``batch_size``), used instead of the images; batch i then holds the same images with the
    same noise seed, so the result is the one the images give. Not for PiNI with image-level
    noise, which perturbs the images themselves.
    """
    module = isinstance(model, nn.Module)
    if features is None and not module:
        raise ValueError(
            f"a {type(model).__name__} predicts from features: pass features=encode_samples(...)"
        )
    if features is not None:
        if getattr(model, "perturbs_images", False):
            raise ValueError("features cannot stand in for images under image-level noise")
        if features.batch_size != batch_size:
            raise ValueError(
                f"features were encoded in batches of {features.batch_size}, batch_size is "
                f"{batch_size}: the per-batch noise seeds would not match"
            )
        if features.features.shape[0] + features.skipped != len(samples):
            raise ValueError(
                f"features hold {features.features.shape[0]} rows and {features.skipped} "
                f"skipped images, samples has {len(samples)}"
            )
    if module:
        model.to(device).eval()
    classes = model.num_classes
    subset = None if class_subset is None else torch.tensor(class_subset, dtype=torch.long)
    if features is not None:
        batches = ((index, rows, labels, 0) for index, rows, labels in features.batches())
        skipped = features.skipped
        bypass = features_in_place_of_images(model.clip) if module else contextlib.nullcontext()
    else:
        loader = DataLoader(
            ImageList(samples, transform), batch_size=batch_size, collate_fn=collate_skipping
        )
        batches, skipped, bypass = _image_batches(loader), 0, contextlib.nullcontext()
    all_labels, all_predictions = [], []
    with bypass:
        for batch_index, inputs, labels, batch_skipped in tqdm(
            batches, desc="evaluate", leave=False, disable=not show_bars(progress)
        ):
            skipped += batch_skipped
            if inputs is None:
                continue
            inputs = inputs.to(device)
            if zero_shot:
                logits = model.zero_shot_logits(inputs)
            elif module:
                logits = model(inputs, seed=(seed + batch_index) % (1 << 62))
            else:
                logits = model.logits(inputs)
            if subset is None:
                predictions = logits.argmax(dim=-1).cpu()
            else:
                predictions = subset[logits[:, subset.to(logits.device)].argmax(dim=-1).cpu()]
            all_labels.append(labels.cpu())
            all_predictions.append(predictions)
    if not all_labels:
        raise InputError(f"no image to evaluate: {len(samples)} test samples, {skipped} unreadable")
    confusion = confusion_matrix(torch.cat(all_labels), torch.cat(all_predictions), classes)
    support = confusion.sum(dim=1)
    recall = [
        100.0 * int(confusion[label, label]) / int(support[label]) if support[label] else 0.0
        for label in range(classes)
    ]
    return {
        "accuracy": 100.0 * int(confusion.trace()) / int(support.sum()),
        "macro_f1": 100.0 * macro_f1(confusion),
        "per_class_accuracy": recall,
        "skipped_images": skipped,
        "samples": int(support.sum()),
    }


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts: row = true label, column = predicted label.
    labels, predictions: (N,) class indices in [0, classes)."""
    pairs = labels.to(torch.int64) * classes + predictions.to(torch.int64)
    return torch.bincount(pairs, minlength=classes * classes).view(classes, classes)


def macro_f1(confusion: torch.Tensor) -> float:
    """The unweighted mean over the classes that have test images of F1 = 2 TP / (support +
    predicted), i.e. 2PR / (P + R), 0 where a class was never predicted right (scikit-learn's
    ``f1_score(labels=<classes with support>, average="macro", zero_division=0)``)."""
    support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    present = support > 0
    true_positives = confusion.diagonal().to(torch.float64)
    scores = 2 * true_positives[present] / (support[present] + predicted[present])
    return float(scores.mean()) if scores.numel() else 0.0


def _image_batches(loader: DataLoader):
    """(batch index, images, labels, skipped images) per loader batch."""
    for index, (images, labels, skipped) in enumerate(loader):
        yield index, images, labels, skipped
