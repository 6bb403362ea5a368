"""What a method is to the rest of pini: ``Method``, the one record the registry holds per
``--method`` name, and ``TrainableModel``, what ``pini.train`` needs of a model it trains."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


class TrainableModel(Protocol):
    """What ``pini.train.train``, ``pini.train.evaluate`` and the checkpoints use of a trained
    method (PiNI, CoOp, CLIP-Adapter, Tip-Adapter-F): an ``nn.Module`` around the frozen
    ``clip`` (kept in eval mode) whose trainable state is every state-dict entry outside
    ``clip.``."""

    clip: nn.Module
    config: Any  # a frozen dataclass, saved with dataclasses.asdict
    num_classes: int
    perturbs_images: bool  # whether raw images change (then no precomputed features)

    def loss(
        self, images: torch.Tensor, labels: torch.Tensor, seed: int | None = None
    ) -> torch.Tensor:
        """The training loss of a batch: images (B, 3, H, W), labels (B,); a float32 scalar."""
        ...

    def forward(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """(B, C) logits of images (B, 3, H, W)."""
        ...

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of zero-shot CLIP on the same backbone."""
        ...


@dataclasses.dataclass
class MethodSetup:
    """What building a method needs: the frozen backbone, the classes and prompts, the run's
    options, and for Tip-Adapter its cache (a new run) or the stored state (a resumed one)."""

    clip: nn.Module
    tokenizer: Any
    classnames: list[str]
    template: str  # PiNI's prompt template for the dataset
    zero_shot_template: str  # CoOp's hand-written prompt for the dataset
    options: dict  # the run's method_config
    pini_config: dict | None = None  # the run's PiNIConfig fields (PiNI only)
    cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (features (V, N, D), labels (N,))
    stored_state: dict | None = None  # a checkpoint's trained state, to size what it loads into


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of ``--method``, everything the parser, the runner and the sweep need of it.

    ``build(setup)`` gives the model, not yet trained or fitted. ``options``: the dataclass of
    the method's options (its defaults are the run record's ``method_config``); None for PiNI,
    whose options are the run's ``pini_config``. ``train_settings(shots, dataset, classes)``:
    the ``pini.train.TrainConfig`` fields of a trained method, as its paper sets them;
    ``demo_training`` overrides them on the embedded demo (tiny model, digits), chosen from
    the training loss on the demo (docs/baselines.md). ``crop_scale``: the random resized
    crop's scale range of the training images (or Tip-Adapter's augmented cache); None where no
    image is augmented. ``fits_on``: for a method fitted rather than trained, what it is fitted
    on: "shots" (the plain features of the few-shot images) or "cache" (Tip-Adapter's augmented
    views). ``searches``: chooses hyper-parameters on a validation split.
    """

    name: str
    display_name: str
    build: Callable[[MethodSetup], Any]
    options: type | None
    trains: bool
    crop_scale: tuple[float, float] | None
    baseline: bool = True
    train_settings: Callable[[int, str | None, int], dict] | None = None
    demo_training: dict = dataclasses.field(default_factory=dict)
    fits_on: str | None = None
    searches: bool = False
    needs_cache: bool = False
    chosen: Callable[[Any], dict] | None = None  # what a fit or search chose, for the summary
    # What a run learned per class (the run record -> words for an error, or None): such a run
    # cannot be evaluated on other classes, which would silently pair class c's learned state
    # with another class.
    classes_learned: Callable[[dict], str | None] = lambda run: None

    def default_options(self) -> dict:
        """The run record's ``method_config``: the options' defaults as JSON values ({} for
        PiNI)."""
        if self.options is None:
            return {}
        return json.loads(json.dumps(dataclasses.asdict(self.options())))
