"""`Split`: one dataset's samples and classes, as every loader returns them."""

from __future__ import annotations

import dataclasses

from ..errors import InputError
from .names import TEST_ONLY_DATASETS


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
      ``prediction = class_subset[logits[:, class_subset].argmax(-1)]`` (a model with a
      per-class state that cannot be cut to the subset: the linear probe, Tip-Adapter), or build
      the model on ``on_class_subset()`` (any other; ``Method.builds_on_class_subsets``).
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

    def on_class_subset(self) -> Split:
        """This split with only the classes of ``class_subset``: ``classnames`` theirs, in
        order, every label its position there, ``class_subset`` None. A model built on it
        carries those classes alone (the authors' 200-class ImageNet-A and -R models: the text
        features, and what reads them, over the 200); itself where ``class_subset`` is None."""
        if self.class_subset is None:
            return self
        position = {label: index for index, label in enumerate(self.class_subset)}

        def relabelled(samples: list[tuple]) -> list[tuple]:
            outside = sorted({label for _, label in samples} - set(position))
            if outside:
                raise ValueError(f"labels {outside[:4]} of {self.name} are not in class_subset")
            return [(source, position[label]) for source, label in samples]

        return dataclasses.replace(
            self,
            classnames=[self.classnames[label] for label in self.class_subset],
            train=relabelled(self.train),
            val=relabelled(self.val),
            test=relabelled(self.test),
            class_subset=None,
        )
