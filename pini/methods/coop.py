"""CoOp (Zhou et al., IJCV 2022): learnable context vectors in place of the prompt's words."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..backbone import encode_text_embeddings, token_embedding
from ..prompts import DEFAULT_ZERO_SHOT_TEMPLATE, PLACEHOLDER, build_zero_shot_prompts
from .base import Method, Training, on_frozen_clip
from .common import (
    FrozenCLIPMethod,
    check_positive_int,
    check_positive_number,
    cosine_cross_entropy,
    cosine_logits,
)


@dataclasses.dataclass(frozen=True)
class CoOpConfig:
    """CoOp's defaults (Zhou et al., IJCV 2022; ``trainers/coop.py`` and ``scripts/coop/main.sh``
    of KaiyangZhou/CoOp): 16 context vectors (``N_CTX``) shared by every class (``CSC=False``,
    "unified context"), the class token at the end, initialised from N(0, 0.02^2) (``std=0.02``)."""

    num_context: int = 16
    context_init_std: float = 0.02

    def __post_init__(self):
        check_positive_int("num_context", self.num_context)
        check_positive_number("context_init_std", self.context_init_std)


class CoOp(FrozenCLIPMethod):
    """CoOp, context optimization: learnable word embeddings in place of the prompt's words.

    Each class's prompt is "X X ... X classname." (``num_context`` placeholders); as in CoOp's
    ``PromptLearner``, the placeholders' token embeddings are replaced by the learnable context
    (``context``, (num_context, width), one set shared by every class) between the start token
    and the class name, and the text tower encodes the result from embeddings
    (``pini.backbone.encode_text_embeddings``). Logits are CLIP's cosine logits; the loss is their
    cross-entropy, computed by ``pini_kernels.noisy_cross_entropy`` without noise.

    Not implemented: class-specific contexts (CoOp's ``CSC=True``), the class token in the middle
    or front, and initialising the context from words (``CTX_INIT``); the paper's CoOp row uses
    none of them. The only trainable state is ``context``.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        classnames: list[str],
        *,
        num_context: int = 16,
        context_init_std: float = 0.02,
        zero_shot_template: str = DEFAULT_ZERO_SHOT_TEMPLATE,
    ):
        super().__init__(clip, tokenizer, classnames, zero_shot_template)
        self.config = CoOpConfig(num_context=num_context, context_init_std=context_init_std)
        count = self.config.num_context
        prefix = " ".join([PLACEHOLDER] * count)
        device = clip.logit_scale.device
        token_ids = tokenizer(build_zero_shot_prompts(classnames, prefix + " {}.")).to(device)
        placeholder_id = int(tokenizer([PLACEHOLDER])[0, 1])
        if not bool((token_ids[:, 1 : 1 + count] == placeholder_id).all()):
            raise ValueError(
                f"the tokenizer does not give one token per placeholder {PLACEHOLDER!r}: CoOp's "
                f"{count} context vectors need token positions 1..{count}"
            )
        self.register_buffer("token_ids", token_ids, persistent=False)
        with torch.no_grad():
            embeddings = token_embedding(clip)(token_ids).float()
        # The fixed parts of every prompt: the start token, and the class name, full stop, end
        # token and padding after the context. Rebuilt from the class names, never saved.
        self.register_buffer("token_start", embeddings[:, :1], persistent=False)
        self.register_buffer("token_rest", embeddings[:, 1 + count :], persistent=False)
        width = embeddings.shape[-1]
        context = torch.empty(count, width, device=device)
        nn.init.normal_(context, std=self.config.context_init_std)
        self.context = nn.Parameter(context)

    def text_features(self) -> torch.Tensor:
        """(C, D) text features of the prompts with the current context (differentiable)."""
        context = self.context.unsqueeze(0).expand(self.num_classes, -1, -1)
        embeddings = torch.cat([self.token_start, context, self.token_rest], dim=1)
        return encode_text_embeddings(self.clip, embeddings, self.token_ids).float()

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C) cosine logits from raw CLIP image features (B, D)."""
        return cosine_logits(
            image_features, self.text_features(), self._logit_scale(), self._logit_bias()
        )

    def loss_on_features(self, image_features: torch.Tensor, labels: torch.Tensor):
        """Mean cross-entropy of the cosine logits: image_features (B, D), labels (B,)."""
        return cosine_cross_entropy(
            image_features, self.text_features(), self._logit_scale(), labels
        )


def coop_epochs(shots: int, dataset_name: str | None = None) -> int:
    """CoOp's epochs by shots (its ``scripts/coop/main.sh`` runs with ``vit_b16_ep50`` for 1
    shot, ``_ep100`` for 2 and 4, ``vit_b16`` (200) for 8 and 16; ImageNet ``_ep50``): 50 for
    1 shot, 100 up to 4, 200 above; 50 on ImageNet."""
    check_positive_int("shots", shots)
    if dataset_name is not None and dataset_name.strip().lower() == "imagenet":
        return 50
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


# CoOp's configs/trainers/CoOp/vit_b16*.yaml on Dassl: SGD lr 0.002 (momentum 0.9, weight decay
# 5e-4: Dassl's defaults), batch 32, cosine, one warm-up epoch at a constant 1e-5.
DASSL_SGD = dict(lr=0.002, batch_size=32, momentum=0.9, weight_decay=5e-4, optimizer="sgd")
DASSL_WARMUP = dict(warmup_epochs=1, warmup_lr=1e-5)
DASSL_CROP_SCALE = (0.08, 1.0)  # Dassl's random resized crop


def _settings(shots: int, dataset: str | None, classes: int) -> dict:
    return dict(DASSL_SGD, **DASSL_WARMUP, epochs=coop_epochs(shots, dataset))


TRAINING = Training(_settings)
METHOD = Method(
    "coop",
    "CoOp",
    on_frozen_clip(CoOp),
    CoOpConfig,
    DASSL_CROP_SCALE,
    TRAINING,
    edits_prompts=lambda pini_config: True,
)
