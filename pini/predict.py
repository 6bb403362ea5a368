"""Predicting with a trained run: the top-k classes of new images with their probabilities
(``pini predict``; docs/spec.md §11).

``load_run(checkpoint)`` rebuilds the method a run's checkpoint stores (as ``pini eval`` does,
from its record alone: no dataset is read) and gives it with the run's class names and the
backbone's test transform; ``predict(model, images, transform, classnames=...)`` gives one dict
per image; ``write_predictions`` writes them as ``predictions.csv`` and ``predictions.json``.

    model, classnames, transform = load_run("runs/pets-16-1/checkpoint.pt")
    for row in predict(model, ["cat.jpg"], transform, top_k=3, classnames=classnames):
        print(row["image"], row["top_k"][0])
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .backbone import encode_image, preprocessing_of
from .data.listing import IMAGE_SUFFIXES
from .data.transforms import clip_transforms
from .errors import InputError
from .files import write_text_atomically
from .model import PiNI
from .runner import load_stored_model

PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSON = "predictions.json"
CSV_COLUMNS = ("image", "rank", "class", "probability")


class OnImages(nn.Module):
    """A method fitted on frozen features (``LinearProbe``, ``TipAdapter``: only
    ``logits(features)``) as a model of images: ``forward(images (B, 3, H, W), seed)`` gives
    ``fitted.logits`` of the frozen CLIP's raw features (B, D) in float32, as ``pini eval``
    computes them; ``seed`` is ignored (no noise)."""

    perturbs_images = False

    def __init__(self, clip: nn.Module, fitted):
        super().__init__()
        self.clip = clip.eval()
        self.fitted = fitted
        self.num_classes = fitted.num_classes

    def forward(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return self.fitted.logits(encode_image(self.clip, images).float())


def load_run(
    checkpoint: str | Path,
    device: str = "cpu",
    *,
    inference: str | None = None,
    inference_samples: int | None = None,
    trusted: bool = False,
    pretrained: str | None = None,
    progress: bool = False,
) -> tuple[nn.Module, list[str], object]:
    """(model, classnames, transform) of the run whose ``checkpoint`` (``RUN/checkpoint.pt``) is
    given: the stored method with its trained or fitted state on ``device`` in eval mode, its C
    class names in label order, and the test transform of the weights' own preprocessing (a PIL
    image to a (3, H, W) tensor, docs/spec.md §13). ``model(images (B, 3, H, W), seed)`` gives
    (B, C) logits for every method: PiNI with its inference noise, a baseline module, or a
    fitted method (``OnImages``).

    ``inference`` ("sample", "mean", "average") and ``inference_samples`` replace the run's
    inference noise options; PiNI only (they change nothing else), an ``InputError`` for any
    other method. ``trusted``: allow an OpenAI TorchScript weights file (runs code from it).
    ``pretrained``: the run's weights file where it lies now, if it moved (its SHA-256 must be
    the run's)."""
    run, model, clip = load_stored_model(
        checkpoint,
        device,
        progress=progress,
        trusted=trusted,
        pretrained=pretrained,
        inference=inference,
        inference_samples=inference_samples,
    )
    if not isinstance(model, nn.Module):
        model = OnImages(clip, model)
    transform = clip_transforms(preprocessing_of(clip))[1]  # the test transform, as eval's
    return model.to(device).eval(), list(run["classnames"]), transform


def image_files(paths: list[str | Path]) -> list[str]:
    """The images named by ``paths``, in order and each once: a file as given (read whatever
    its suffix), a folder's image files (by suffix, ``IMAGE_SUFFIXES``; hidden files and
    folders left out) recursively, sorted. A path that does not exist is an ``InputError``."""
    found: dict[str, None] = {}
    for path in map(Path, paths):
        if path.is_dir():
            for folder, subfolders, files in os.walk(path):
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
                for name in sorted(files):
                    suffix = os.path.splitext(name)[1].lower()
                    if not name.startswith(".") and suffix in IMAGE_SUFFIXES:
                        found[os.path.join(folder, name)] = None
        elif path.exists():
            found[str(path)] = None
        else:
            raise InputError(f"{path}: no such file or folder (expected an image or a folder)")
    return list(found)


def probabilities(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """(B, C) float32 class probabilities of ``model``'s ``logits`` (B, C): the softmax, except
    for PiNI's ``--inference average``, whose logits are already the log of the averaged
    probabilities (``PiNI.forward``)."""
    if isinstance(model, PiNI) and model.config.inference == "average":
        return logits.float().exp()
    return logits.float().softmax(dim=-1)


def _read(source, transform) -> tuple[torch.Tensor | None, str | None]:
    """(image tensor (3, H, W), None), or (None, why) where the image cannot be read (any
    decode error, PIL's DecompressionBombError included)."""
    try:
        if isinstance(source, Image.Image):
            return transform(source.convert("RGB")), None
        with Image.open(source) as image:
            return transform(image.convert("RGB")), None
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"


def _name(image: Image.Image, number: int) -> str:
    """An in-memory image's name in the predictions: its file, else its place in the list."""
    return getattr(image, "filename", "") or f"image {number}"


@torch.no_grad()
def predict(
    model: nn.Module,
    images: list,
    transform,
    top_k: int = 5,
    *,
    classnames: list[str],
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict]:
    """One dict per image of ``images`` (paths, or PIL images: named by their file, else
    ``"image N"``, N counted from 0), in order: ``{"image": path,
    "top_k": [{"class": name, "probability": p}, ...]}`` with the ``min(top_k, C)`` most
    probable classes, most probable first (``probabilities``), or ``{"image": path, "error":
    why}`` for an image that cannot be read. ``model`` and ``transform`` as ``load_run`` gives
    them; ``classnames``: its C class names. Images go through the model ``batch_size`` at a
    time; batch i's inference noise (PiNI) is drawn with seed ``seed + i``, as ``pini eval``
    draws it, so the same call gives the same probabilities."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if len(classnames) != model.num_classes:
        raise ValueError(f"classnames has {len(classnames)} names, the model {model.num_classes}")
    device = next(model.parameters()).device  # the frozen CLIP's, in every method
    keep = min(top_k, len(classnames))
    rows: list[dict] = []
    for batch_index, start in enumerate(range(0, len(images), batch_size)):
        batch = images[start : start + batch_size]
        tensors, readable = [], []
        for number, source in enumerate(batch, start):
            name = str(source) if not isinstance(source, Image.Image) else _name(source, number)
            tensor, error = _read(source, transform)
            rows.append({"image": name, "error": error} if error else {"image": name})
            if tensor is not None:
                tensors.append(tensor)
                readable.append(rows[-1])
        if not tensors:
            continue
        logits = model(torch.stack(tensors).to(device), seed=(seed + batch_index) % (1 << 62))
        chosen = probabilities(model, logits).cpu().topk(keep, dim=-1)
        for row, values, indices in zip(readable, chosen.values, chosen.indices, strict=True):
            row["top_k"] = [
                {"class": classnames[int(index)], "probability": float(value)}
                for value, index in zip(values, indices, strict=True)
            ]
    return rows


def write_predictions(rows: list[dict], folder: str | Path) -> list[Path]:
    """``predictions.csv`` (one row per image and rank: image, rank from 1, class, probability;
    unreadable images have none) and ``predictions.json`` (``rows`` as they are) in ``folder``
    (created), each written atomically; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        for rank, entry in enumerate(row.get("top_k", ()), 1):
            writer.writerow([row["image"], rank, entry["class"], repr(entry["probability"])])
    csv_path, json_path = folder / PREDICTIONS_CSV, folder / PREDICTIONS_JSON
    write_text_atomically(csv_path, table.getvalue())
    write_text_atomically(json_path, json.dumps(rows, indent=2) + "\n")
    return [csv_path, json_path]
