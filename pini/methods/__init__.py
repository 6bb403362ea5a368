"""The methods ``pini train --method`` runs, one module each, behind one registry.

``METHODS`` maps each ``--method`` name to its ``Method`` (``base.py``): how to build it, its
options, whether it trains, its display name. PiNI is ``pini.py``; the paper's baselines run on
the same backbone, data, splits and evaluation: ``zero_shot.py`` (zero-shot CLIP),
``linear_probe.py``, ``coop.py``, ``clip_adapter.py``, ``tip_adapter.py`` (Tip-Adapter and
Tip-Adapter-F); ``common.py`` holds what the baselines share.

Three kinds of model, so that every method runs through the same trainer and evaluation:

- ``ZeroShotCLIP``: nothing to learn; an ``nn.Module`` with PiNI's ``forward`` and
  ``zero_shot_logits``.
- Trained (PiNI, ``CoOp``, ``CLIPAdapter``, ``TipAdapterF``): ``nn.Module``\\ s with the surface
  ``pini.train`` types against (``base.TrainableModel``). The baselines accept a ``seed`` and
  ignore it: none of them draws noise.
- Fitted on precomputed features (``LinearProbe``, ``TipAdapter``): ``fit(train_features,
  train_labels, val_features, val_labels)`` then ``logits(features)``; ``state_dict()`` /
  ``load_state_dict()`` hold plain tensors and numbers (``torch.save`` with ``weights_only``).

Every baseline also has ``logits(image_features)`` on raw CLIP image features (B, D), as
``encode_images`` returns them: whatever does not backpropagate into the image tower can run on
features encoded once. Where a baseline's loss is the cross-entropy of CLIP's cosine logits
(CoOp, CLIP-Adapter) it is the noise-free case of ``pini_kernels.noisy_cross_entropy``.
"""

from __future__ import annotations

from . import clip_adapter, coop, linear_probe, pini, tip_adapter, zero_shot
from .base import Method, MethodSetup, TrainableModel
from .common import check_positive_int

__all__ = [
    "METHODS",
    "PAPER_METHODS",
    "Method",
    "MethodSetup",
    "TrainableModel",
    "training_defaults",
]

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        pini.METHOD,
        zero_shot.METHOD,
        linear_probe.METHOD,
        coop.METHOD,
        clip_adapter.METHOD,
        tip_adapter.METHOD,
        tip_adapter.FINE_TUNED_METHOD,
    )
}

# The methods of the paper's Table 2 (``pini sweep``'s default); Tip-Adapter and Tip-Adapter-F are
# extras, not among the paper's baselines.
PAPER_METHODS = ("pini", "zero-shot", "linear-probe", "coop", "clip-adapter")


def training_defaults(method: str, shots: int, dataset_name: str | None = None) -> dict:
    """The training settings of a trained baseline, as its paper's code sets them: fields of
    ``pini.train.TrainConfig`` (epochs, lr, batch_size, momentum, weight_decay, warmup_epochs,
    warmup_lr, optimizer "sgd" or "adamw"), plus ``crop_scale`` (the random resized crop's
    scale range). The settings and their sources are in each method's module."""
    trained = [name for name, spec in METHODS.items() if spec.trains and spec.baseline]
    if method not in trained:
        raise ValueError(
            f"method must be one of {tuple(trained)} (the trained baselines), got {method!r}"
        )
    check_positive_int("shots", shots)
    spec = METHODS[method]
    return dict(spec.training.settings(shots, dataset_name, 0), crop_scale=spec.crop_scale)
