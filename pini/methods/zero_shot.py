"""Zero-shot CLIP, the paper's ZS row: the frozen CLIP on the dataset's hand-written prompt."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..prompts import DEFAULT_ZERO_SHOT_TEMPLATE
from .base import Method, MethodSetup
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

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        classnames: list[str],
        zero_shot_template: str = DEFAULT_ZERO_SHOT_TEMPLATE,
    ):
        super().__init__(clip, tokenizer, classnames, zero_shot_template)
        self.config = ZeroShotConfig()
        self.register_buffer("token_ids", self.zero_shot_token_ids, persistent=False)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C) logits from raw CLIP image features (B, D)."""
        return cosine_logits(image_features, self.zero_shot_text, self._logit_scale())


def _build(setup: MethodSetup) -> ZeroShotCLIP:
    return ZeroShotCLIP(setup.clip, setup.tokenizer, setup.classnames, setup.zero_shot_template)


METHOD = Method(
    name="zero-shot",
    display_name="zero-shot CLIP",
    build=_build,
    options=ZeroShotConfig,
    trains=False,
    crop_scale=None,
)
