"""PiNI itself as a method of the registry: the noise model of ``pini.model`` with the run's
``PiNIConfig``, and the paper's training settings (appendix A.3)."""

from __future__ import annotations

import torch

from ..config import PiNIConfig
from ..model import PiNI
from .base import Method, MethodSetup, Training


def _build(setup: MethodSetup) -> PiNI:
    model = PiNI(
        setup.clip,
        setup.tokenizer,
        setup.classnames,
        setup.template,
        PiNIConfig(**setup.pini_config),
        zero_shot_template=setup.zero_shot_template,
    )
    return model.to(setup.clip.logit_scale.device)


def _train_settings(shots: int, dataset: str | None, classes: int) -> dict:
    """The paper's: SGD lr 0.002, batch 32, 200 epochs; ImageNet-sized class lists (1000 and
    more) 100 epochs at lr 0.001."""
    large = classes >= 1000
    return dict(epochs=100 if large else 200, lr=0.001 if large else 0.002, batch_size=32)


def _classes_learned(run: dict) -> str | None:
    config = run["pini_config"]
    if config["text"] == "feature" and config["text_generator"] == "embedding":
        return "noise per class (--text feature with --text-generator embedding)"
    return None


PER_CLASS_STATE = "text_generator."  # the (C, D) mu and sigma of per-class text noise


def _on_classes(trained_state: dict, run: dict, classes: list[int]) -> dict:
    """The trained state of a model built on ``classes`` of the run's: the per-class text
    noise's rows of those classes (row c is class c's (mu, sigma)), in order; the rest as it is."""
    index = torch.tensor(classes, dtype=torch.long)
    return {
        name: value.index_select(0, index) if name.startswith(PER_CLASS_STATE) else value
        for name, value in trained_state.items()
    }


TRAINING = Training(
    _train_settings,
    demo=dict(epochs=200, lr=0.01, batch_size=32),
    learned=_classes_learned,
    on_classes=_on_classes,
)
DASSL_CROP_SCALE = (0.08, 1.0)  # Dassl's default, the authors' code base
METHOD = Method(
    "pini",
    "PiNI",
    _build,
    None,
    DASSL_CROP_SCALE,
    TRAINING,
    baseline=False,
    edits_prompts=lambda pini_config: pini_config.text == "prompt",
)
