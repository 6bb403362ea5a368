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
class Training:
    """How a trained method trains (with ``pini.train.train``). ``settings(shots, dataset,
    classes)``: the ``TrainConfig`` fields as the method's paper sets them; ``demo``: what the
    embedded demo (tiny model, digits) overrides, chosen from the training loss on the demo
    (docs/baselines.md); ``searches``: alpha and beta are searched on a validation split after
    training (Tip-Adapter-F); ``cache``: the model starts from Tip-Adapter's cache of augmented
    views; ``learned``: what a run learned per class, from its record (``Method.learned``);
    ``on_classes(trained_state, run, classes)``: that state cut to some of the run's classes
    (their positions in its class list, in order), for a model built on those classes alone
    (``Method.state_on_classes``); None where it cannot be cut."""

    settings: Callable[[int, str | None, int], dict]
    demo: dict = dataclasses.field(default_factory=dict)
    searches: bool = False
    cache: bool = False
    learned: Callable[[dict], str | None] | None = None
    on_classes: Callable[[dict, dict, list[int]], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Fitting:
    """How a method fitted on frozen features is fitted, always with a search on a validation
    split: ``on`` "shots" (the plain features of the few-shot images) or "cache" (Tip-Adapter's
    augmented views); ``chosen(model)``: what the search chose, for the summary; ``learned``:
    what the fit learned per class."""

    on: str
    chosen: Callable[[Any], dict]
    learned: str | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of ``--method``: everything the parser, the runner and the sweep need of it.

    ``build(setup)`` gives the model, not yet trained or fitted. ``options``: the dataclass of
    the method's options (its defaults are the run record's ``method_config``); None for PiNI,
    whose options are the run's ``pini_config``. ``crop_scale``: the random resized crop's
    scale range of the training images (or Tip-Adapter's augmented cache); None where no image
    is augmented. A method is trained (``training``), fitted (``fitting``) or neither
    (zero-shot CLIP). ``baseline``: one of the paper's comparison methods (all but PiNI).
    ``edits_prompts(pini_config)``: whether the run changes the prompts' token embeddings (CoOp's
    context, PiNI's prompt noise), so that its text tower must take token embeddings (open_clip's
    ``TextTransformer``, not an HF text encoder); ``pini_config`` is the run's ``PiNIConfig`` or
    None.
    """

    name: str
    display_name: str
    build: Callable[[MethodSetup], Any]
    options: type | None
    crop_scale: tuple[float, float] | None = None
    training: Training | None = None
    fitting: Fitting | None = None
    baseline: bool = True
    edits_prompts: Callable[[Any], bool] = lambda pini_config: False

    @property
    def trains(self) -> bool:
        return self.training is not None

    @property
    def needs_cache(self) -> bool:
        """Whether the model is built on Tip-Adapter's cache of augmented views."""
        fitted_on_cache = self.fitting is not None and self.fitting.on == "cache"
        return fitted_on_cache or (self.training is not None and self.training.cache)

    def learned(self, run: dict) -> str | None:
        """What ``run`` learned per class (words for an error), or None: such a run cannot be
        evaluated on other classes, which would silently pair class c's state with another."""
        if self.fitting is not None:
            return self.fitting.learned
        if self.training is not None and self.training.learned is not None:
            return self.training.learned(run)
        return None

    def builds_on_class_subsets(self, run: dict) -> bool:
        """Whether ``run``'s model can be built on some of its classes alone: it learned
        nothing per class, or what it learned can be cut to them (``Training.on_classes``)."""
        if not self.learned(run):
            return True
        return self.training is not None and self.training.on_classes is not None

    def state_on_classes(self, trained_state: dict, run: dict, classes: list[int]) -> dict:
        """``run``'s trained state for its model built on ``classes`` (positions in its class
        list) alone; only where ``builds_on_class_subsets``."""
        if not self.learned(run):
            return trained_state
        if not self.builds_on_class_subsets(run):
            raise ValueError(f"a {self.name} run's per-class state cannot be cut to a class subset")
        return self.training.on_classes(trained_state, run, classes)

    def default_options(self) -> dict:
        """The run record's ``method_config``: the options' defaults as JSON values ({} for
        PiNI)."""
        if self.options is None:
            return {}
        return json.loads(json.dumps(dataclasses.asdict(self.options())))


def on_frozen_clip(model_class: type) -> Callable[[MethodSetup], Any]:
    """``build`` for a baseline module around the frozen CLIP that takes the class names, the
    hand-written prompt and its options (zero-shot CLIP, CoOp, CLIP-Adapter, Tip-Adapter)."""

    def build(setup: MethodSetup):
        return model_class(
            setup.clip,
            setup.tokenizer,
            setup.classnames,
            zero_shot_template=setup.zero_shot_template,
            **setup.options,
        )

    return build
