"""CLIP-Adapter (Gao et al., IJCV 2023): a residual MLP on the frozen image features."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..prompts import DEFAULT_ZERO_SHOT_TEMPLATE
from .base import Method, Training, on_frozen_clip
from .common import (
    FrozenCLIPMethod,
    check_fraction,
    check_positive_int,
    cosine_cross_entropy,
    cosine_logits,
)
from .coop import DASSL_CROP_SCALE, DASSL_SGD, DASSL_WARMUP


@dataclasses.dataclass(frozen=True)
class CLIPAdapterConfig:
    """CLIP-Adapter's defaults (Gao et al., IJCV 2024; ``clip_adapter.py`` of
    gaopengcuhk/CLIP-Adapter): the visual adapter with bottleneck ``reduction`` 4 and residual
    ``ratio`` 0.2 (the share of the adapted feature)."""

    reduction: int = 4
    ratio: float = 0.2

    def __post_init__(self):
        check_positive_int("reduction", self.reduction)
        check_fraction("ratio", self.ratio)


class VisualAdapter(nn.Module):
    """CLIP-Adapter's bottleneck: Linear(D, D/r) -> ReLU -> Linear(D/r, D) -> ReLU, no biases,
    PyTorch's default initialisation (as ``Adapter`` in ``clip_adapter.py``)."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(
                f"reduction must be at most the feature dimension {dim}, got {reduction}"
            )
        self.layers = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, dim, bias=False),
            nn.ReLU(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (..., D) -> (..., D)."""
        return self.layers(features)


class CLIPAdapter(FrozenCLIPMethod):
    """CLIP-Adapter, the visual variant the paper reports: the image feature f becomes
    ``ratio * adapter(f) + (1 - ratio) * f`` before CLIP's cosine logits against the frozen text
    features of the hand-written prompt.

    The prompt is CoOp's hand-written one per dataset: CLIP-Adapter's ``CUSTOM_TEMPLATES`` are
    the same table as CoOp's ``zsclip.py`` (e.g. "a photo of a {}, a type of pet." for
    OxfordPets), i.e. ``pini.prompts.zero_shot_template(dataset)``. The adapter's width follows
    the backbone's embedding dimension D (the released code hard-codes 1024, RN50's). The loss
    is the cross-entropy of the cosine logits, ``pini_kernels.noisy_cross_entropy`` without
    noise. The only trainable state is ``adapter``.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        classnames: list[str],
        zero_shot_template: str = DEFAULT_ZERO_SHOT_TEMPLATE,
        *,
        reduction: int = 4,
        ratio: float = 0.2,
    ):
        super().__init__(clip, tokenizer, classnames, zero_shot_template)
        self.config = CLIPAdapterConfig(reduction=reduction, ratio=ratio)
        self.register_buffer("token_ids", self.zero_shot_token_ids, persistent=False)
        dim = self.zero_shot_text.shape[-1]
        self.adapter = VisualAdapter(dim, self.config.reduction).to(self.zero_shot_text.device)

    def adapted_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, D): the residual blend of the adapted and the original image features."""
        ratio = self.config.ratio
        return ratio * self.adapter(image_features) + (1 - ratio) * image_features

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C) logits from raw CLIP image features (B, D)."""
        return cosine_logits(
            self.adapted_features(image_features),
            self.zero_shot_text,
            self._logit_scale(),
            self._logit_bias(),
        )

    def loss_on_features(self, image_features: torch.Tensor, labels: torch.Tensor):
        """Mean cross-entropy: image_features (B, D) raw CLIP features, labels (B,)."""
        return cosine_cross_entropy(
            self.adapted_features(image_features),
            self.zero_shot_text,
            self._logit_scale(),
            labels,
        )


# The released clip_adapter.py is a trainer for CoOp's code base and no configuration of its own
# was published: CoOp's ViT-B/16 settings, 200 epochs. On the demo, lr 100x CoOp's: at 0.002 the
# adapter barely moves (loss 1.41 -> 1.36 in 200 epochs).
TRAINING = Training(
    lambda shots, dataset, classes: dict(DASSL_SGD, **DASSL_WARMUP, epochs=200),
    demo=dict(epochs=200, lr=0.2),
)
BUILD = on_frozen_clip(CLIPAdapter)
METHOD = Method(
    "clip-adapter", "CLIP-Adapter", BUILD, CLIPAdapterConfig, DASSL_CROP_SCALE, TRAINING
)
