"""What the baselines share: the frozen CLIP module they wrap, argument checks, CLIP's cosine
logits and loss (pini_kernels' ops with no noise), and image features encoded once."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

import pini_kernels

from ..backbone import encode_image, encode_text, logit_bias
from ..data.features import encode_samples
from ..errors import InputError
from ..prompts import DEFAULT_ZERO_SHOT_TEMPLATE as PROMPT
from ..prompts import build_zero_shot_prompts


def frozen(clip: nn.Module) -> nn.Module:
    return clip.eval().requires_grad_(False)


def check_classnames(classnames) -> list[str]:
    if isinstance(classnames, str) or not isinstance(classnames, (list, tuple)):
        raise TypeError(f"classnames must be a list of str, got {type(classnames).__name__}")
    if not classnames or not all(isinstance(name, str) and name.strip() for name in classnames):
        raise ValueError(
            f"classnames must be a non-empty list of non-empty str, got {classnames!r}"
        )
    return list(classnames)


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_positive_number(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def hand_written_text(
    clip: nn.Module, tokenizer, classnames: list[str], template: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_ids (C, context), text features (C, D)) of the frozen CLIP on ``template`` with
    "{}" replaced by each class name (CoOp's hand-written prompts)."""
    device = clip.logit_scale.device
    token_ids = tokenizer(build_zero_shot_prompts(classnames, template)).to(device)
    with torch.no_grad():
        text = encode_text(clip, token_ids).float()
    return token_ids, text


def encode_frozen(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, D) float32 image features of the frozen image tower; no graph is kept."""
    with torch.no_grad():
        return encode_image(clip, images).float()


def cosine_logits(image_features, text_features, logit_scale, bias=None) -> torch.Tensor:
    """(B, C) ``logit_scale * <f/|f|, t/|t|> + bias``: pini_kernels' logits op with no noise;
    ``bias`` is SigLIP's ``logit_bias`` (None: none, as CLIP's)."""
    logits = pini_kernels.noisy_cosine_logits(image_features, text_features, logit_scale, seed=0)
    return logits[0] if bias is None else logits[0] + bias.to(logits.dtype)


def cosine_cross_entropy(image_features, text_features, logit_scale, labels) -> torch.Tensor:
    """Mean cross-entropy of the cosine logits: ``noisy_cross_entropy`` with no noise (the seed
    is fixed so that no random number is drawn)."""
    return pini_kernels.noisy_cross_entropy(
        image_features, text_features, logit_scale, labels, seed=0
    )


def as_features(name: str, features, dim: int | None = None, *, views: bool = False):
    """``features`` as a float32 tensor (N, D), or (V, N, D) where ``views`` allows it."""
    if not isinstance(features, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a tensor (N, D), got {type(features).__name__}")
    features = torch.as_tensor(features)
    allowed = (2, 3) if views else (2,)
    if features.dim() not in allowed or not features.is_floating_point():
        shape = "(N, D) or (views, N, D)" if views else "(N, D)"
        raise ValueError(
            f"{name} must be a float tensor {shape}, got {features.dtype} {tuple(features.shape)}"
        )
    if dim is not None and features.shape[-1] != dim:
        raise ValueError(f"{name} must have {dim} features per row, got {features.shape[-1]}")
    if features.shape[-2] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    return features.float()


def as_labels(name: str, labels, count: int, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be an integer tensor (N,), got {type(labels).__name__}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"{name} must be an integer tensor (N,), got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.shape[0] != count:
        raise ValueError(f"{name} has {labels.shape[0]} labels for {count} feature rows")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()


class FrozenCLIPMethod(nn.Module):
    """What every module here shares: the frozen CLIP (kept in eval mode), the class count, the
    hand-written prompts' token ids and text features (zero-shot CLIP, not saved)."""

    perturbs_images = False  # every baseline sees the images as the frozen CLIP encodes them

    def __init__(self, clip: nn.Module, tokenizer, classnames, zero_shot_template: str = PROMPT):
        super().__init__()
        classnames = check_classnames(classnames)
        self.clip = frozen(clip)
        self.num_classes = len(classnames)
        self.zero_shot_template = zero_shot_template
        token_ids, text = hand_written_text(clip, tokenizer, classnames, zero_shot_template)
        self.register_buffer("zero_shot_token_ids", token_ids, persistent=False)
        self.register_buffer("zero_shot_text", text, persistent=False)

    def train(self, mode: bool = True):
        """The method's own modules follow ``mode``; CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    def _logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().detach()

    def _logit_bias(self) -> torch.Tensor | None:
        """SigLIP's ``logit_bias``, added to the logits reported (never needed by the loss: a
        constant shift of a row leaves its softmax unchanged); None for CLIP."""
        bias = logit_bias(self.clip)
        return None if bias is None else bias.detach()

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of zero-shot CLIP (the frozen CLIP on the hand-written prompts)."""
        image_features = encode_frozen(self.clip, images)
        return cosine_logits(
            image_features, self.zero_shot_text, self._logit_scale(), self._logit_bias()
        )

    # Every method defines ``logits(image_features)`` and, if it trains,
    # ``loss_on_features(image_features, labels)`` on raw CLIP features (B, D); these run them on
    # images through the frozen image tower.

    def loss(self, images: torch.Tensor, labels: torch.Tensor, seed: int | None = None):
        """The method's loss on a batch: images (B, 3, H, W), labels (B,); a float32 scalar.
        ``seed`` is ignored (no noise)."""
        return self.loss_on_features(encode_frozen(self.clip, images), labels)

    def forward(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """(B, C) logits of images (B, 3, H, W); ``seed`` is ignored (no noise)."""
        return self.logits(encode_frozen(self.clip, images))


@torch.no_grad()
def encode_images(
    clip: nn.Module,
    samples: list[tuple],
    transform,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,) int64), on the CPU: the frozen image tower's raw
    (not normalized) features of ``samples`` ((source, label) pairs) in their order, through
    ``transform`` (the test transform for plain features). Unreadable images are skipped (and
    logged) as ``data.image_list.ImageList`` and ``collate_skipping`` do, so N can be less than
    ``len(samples)``; none readable is an ``InputError``. ``clip`` is moved to ``device`` and
    left in eval mode."""
    check_positive_int("batch_size", batch_size)
    clip.to(device).eval()
    encoded = encode_samples(
        functools.partial(encode_image, clip), samples, transform, batch_size, device
    )
    return encoded.features, encoded.labels


def encode_augmented_views(
    clip: nn.Module,
    samples: list[tuple],
    transform,
    views: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (views, N, D), labels (N,)): ``views`` passes of ``encode_images`` through a
    random ``transform``, pass v with torch's generator seeded ``seed + v`` (the caller's
    random state is restored afterwards). Tip-Adapter's cache averages 10 such passes
    (``augment_epoch``) with random resized crops of scale (0.5, 1) and flips."""
    check_positive_int("views", views)
    passes, labels = [], None
    with torch.random.fork_rng(devices=[]):
        for view in range(views):
            torch.manual_seed(seed + view)
            features, view_labels = encode_images(clip, samples, transform, batch_size, device)
            if labels is not None and not torch.equal(labels, view_labels):
                raise InputError("the readable images changed between augmented passes")
            passes.append(features)
            labels = view_labels
    return torch.stack(passes), labels
