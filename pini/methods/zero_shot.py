"""Zero-shot CLIP, the paper's ZS row: the frozen CLIP on the dataset's hand-written prompt."""

from __future__ import annotations

import dataclasses

import torch

from .base import Method, on_frozen_clip
from .common import FrozenCLIPMethod, cosine_logits


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot CLIP has no option; its prompt comes from the dataset (``zero_shot_template``)."""


class ZeroShotCLIP(FrozenCLIPMethod):
    """Zero-shot CLIP, the paper's ZS row: the frozen CLIP on CoOp's hand-written prompt for the
    dataset (``pini.prompts.zero_shot_template``, from CoOp's ``trainers/zsclip.py``), e.g.
    "a photo of a {}, a type of pet." with class names' underscores read as spaces; logits
    ``exp(logit_scale) * <f/|f|, t/|t|>`` as CoOp computes them. Nothing is trained.
    """

    config = ZeroShotConfig()

    @property
    def token_ids(self) -> torch.Tensor:
        """(C, context): the token ids of the hand-written prompts."""
        return self.zero_shot_token_ids

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C) logits from raw CLIP image features (B, D)."""
        return cosine_logits(
            image_features, self.zero_shot_text, self._logit_scale(), self._logit_bias()
        )


METHOD = Method("zero-shot", "zero-shot CLIP", on_frozen_clip(ZeroShotCLIP), ZeroShotConfig)
