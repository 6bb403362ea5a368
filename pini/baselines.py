"""The paper's baselines on PiNI's frozen open_clip backbone: zero-shot CLIP, the linear probe,
CoOp, CLIP-Adapter, Tip-Adapter and Tip-Adapter-F (issue 14).

Three kinds, so that every method runs on the same data, splits and evaluation as PiNI:

- ``ZeroShotCLIP``: nothing to learn; an ``nn.Module`` with PiNI's ``forward`` and
  ``zero_shot_logits``.
- Trained (``CoOp``, ``CLIPAdapter``, ``TipAdapterF``): ``nn.Module``\\ s with the surface of
  ``pini.PiNI`` that ``pini.train.train``, ``pini.train.evaluate`` and the checkpoint code use
  unchanged: ``clip`` (frozen, always in eval mode), ``config`` (a frozen dataclass, saved with
  ``dataclasses.asdict``), ``num_classes``, ``token_ids`` (the (C, context) token ids of the class
  prompts), ``loss(images, labels, seed=None)``, ``forward(images, seed=None)``,
  ``zero_shot_logits(images)``. Their trainable state is every state-dict entry outside ``clip.``.
  The ``seed`` argument is accepted and ignored: none of them draws noise.
- Fitted on precomputed features (``LinearProbe``, ``TipAdapter``): ``fit(train_features,
  train_labels, val_features, val_labels)`` then ``logits(features)``; ``state_dict()`` /
  ``load_state_dict()`` hold plain tensors and numbers (``torch.save`` with ``weights_only``).

Every method also has ``logits(image_features)`` on raw CLIP image features (B, D), as
``encode_images`` returns them: whatever does not backpropagate into the image tower can run on
features encoded once. Where a method's loss is the cross-entropy of CLIP's cosine logits (CoOp,
CLIP-Adapter) it is the noise-free case of ``pini_kernels.noisy_cross_entropy``.

Training settings (epochs, learning rate, batch, optimizer) are not part of the modules; the ones
of each method's paper and code are in ``training_defaults``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pini_kernels

from .backbone import encode_text_embeddings
from .data.features import encode_samples
from .errors import InputError
from .prompts import (
    DEFAULT_ZERO_SHOT_TEMPLATE,
    PLACEHOLDER,
    build_zero_shot_prompts,
)

# The names `pini train --method` will take (PiNI itself is "pini").
METHODS = (
    "zero-shot",
    "linear-probe",
    "coop",
    "clip-adapter",
    "tip-adapter",
    "tip-adapter-f",
)


# --- shared pieces ----------------------------------------------------------------------------


def _frozen(clip: nn.Module) -> nn.Module:
    return clip.eval().requires_grad_(False)


def _check_classnames(classnames) -> list[str]:
    if isinstance(classnames, str) or not isinstance(classnames, (list, tuple)):
        raise TypeError(f"classnames must be a list of str, got {type(classnames).__name__}")
    if not classnames or not all(isinstance(name, str) and name.strip() for name in classnames):
        raise ValueError(
            f"classnames must be a non-empty list of non-empty str, got {classnames!r}"
        )
    return list(classnames)


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_positive_number(name: str, value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _hand_written_text(
    clip: nn.Module, tokenizer, classnames: list[str], template: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_ids (C, context), text features (C, D)) of the frozen CLIP on ``template`` with
    "{}" replaced by each class name (CoOp's hand-written prompts)."""
    device = clip.token_embedding.weight.device
    token_ids = tokenizer(build_zero_shot_prompts(classnames, template)).to(device)
    with torch.no_grad():
        text = clip.encode_text(token_ids).float()
    return token_ids, text


def _encode_frozen(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, D) float32 image features of the frozen image tower; no graph is kept."""
    with torch.no_grad():
        return clip.encode_image(images).float()


def _cosine_logits(image_features, text_features, logit_scale) -> torch.Tensor:
    """(B, C) ``logit_scale * <f/|f|, t/|t|>``: pini_kernels' logits op with no noise."""
    return pini_kernels.noisy_cosine_logits(image_features, text_features, logit_scale, seed=0)[0]


def _cosine_cross_entropy(image_features, text_features, logit_scale, labels) -> torch.Tensor:
    """Mean cross-entropy of the cosine logits: ``noisy_cross_entropy`` with no noise (the seed
    is fixed so that no random number is drawn)."""
    return pini_kernels.noisy_cross_entropy(
        image_features, text_features, logit_scale, labels, seed=0
    )


def _as_features(name: str, features, dim: int | None = None, *, views: bool = False):
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


def _as_labels(name: str, labels, count: int, num_classes: int) -> torch.Tensor:
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


class _FrozenCLIPMethod(nn.Module):
    """What every module here shares: the frozen CLIP (kept in eval mode), the class count, the
    hand-written prompts' token ids and text features (zero-shot CLIP, not saved)."""

    def __init__(self, clip: nn.Module, tokenizer, classnames, zero_shot_template: str):
        super().__init__()
        classnames = _check_classnames(classnames)
        self.clip = _frozen(clip)
        self.num_classes = len(classnames)
        self.zero_shot_template = zero_shot_template
        token_ids, text = _hand_written_text(clip, tokenizer, classnames, zero_shot_template)
        self.register_buffer("zero_shot_token_ids", token_ids, persistent=False)
        self.register_buffer("zero_shot_text", text, persistent=False)

    def train(self, mode: bool = True):
        """The method's own modules follow ``mode``; CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    def _logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().detach()

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of zero-shot CLIP (the frozen CLIP on the hand-written prompts)."""
        image_features = _encode_frozen(self.clip, images)
        return _cosine_logits(image_features, self.zero_shot_text, self._logit_scale())

    # Every method defines ``logits(image_features)`` and, if it trains,
    # ``loss_on_features(image_features, labels)`` on raw CLIP features (B, D); these run them on
    # images through the frozen image tower.

    def loss(self, images: torch.Tensor, labels: torch.Tensor, seed: int | None = None):
        """The method's loss on a batch: images (B, 3, H, W), labels (B,); a float32 scalar.
        ``seed`` is ignored (no noise)."""
        return self.loss_on_features(_encode_frozen(self.clip, images), labels)

    def forward(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """(B, C) logits of images (B, 3, H, W); ``seed`` is ignored (no noise)."""
        return self.logits(_encode_frozen(self.clip, images))


# --- zero-shot CLIP ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot CLIP has no option; its prompt comes from the dataset (``zero_shot_template``)."""


class ZeroShotCLIP(_FrozenCLIPMethod):
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
        return _cosine_logits(image_features, self.zero_shot_text, self._logit_scale())


# --- CoOp -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoOpConfig:
    """CoOp's defaults (Zhou et al., IJCV 2022; ``trainers/coop.py`` and ``scripts/coop/main.sh``
    of KaiyangZhou/CoOp): 16 context vectors (``N_CTX``) shared by every class (``CSC=False``,
    "unified context"), the class token at the end, initialised from N(0, 0.02^2) (``std=0.02``)."""

    num_context: int = 16
    context_init_std: float = 0.02

    def __post_init__(self):
        _check_positive_int("num_context", self.num_context)
        _check_positive_number("context_init_std", self.context_init_std)


class CoOp(_FrozenCLIPMethod):
    """CoOp, context optimization: learnable word embeddings in place of the prompt's words.

    Each class's prompt is "X X ... X classname." (``num_context`` placeholders); as in CoOp's
    ``PromptLearner``, the placeholders' token embeddings are replaced by the learnable context
    (``context``, (num_context, width), one set shared by every class) between the start token
    and the class name, and the text tower encodes the result from embeddings
    (``pini.model.encode_text_embeddings``). Logits are CLIP's cosine logits; the loss is their
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
        device = clip.token_embedding.weight.device
        token_ids = tokenizer(build_zero_shot_prompts(classnames, prefix + " {}.")).to(device)
        placeholder_id = int(tokenizer([PLACEHOLDER])[0, 1])
        if not bool((token_ids[:, 1 : 1 + count] == placeholder_id).all()):
            raise ValueError(
                f"the tokenizer does not give one token per placeholder {PLACEHOLDER!r}: CoOp's "
                f"{count} context vectors need token positions 1..{count}"
            )
        self.register_buffer("token_ids", token_ids, persistent=False)
        with torch.no_grad():
            embeddings = clip.token_embedding(token_ids).float()
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
        return _cosine_logits(image_features, self.text_features(), self._logit_scale())

    def loss_on_features(self, image_features: torch.Tensor, labels: torch.Tensor):
        """Mean cross-entropy of the cosine logits: image_features (B, D), labels (B,)."""
        return _cosine_cross_entropy(
            image_features, self.text_features(), self._logit_scale(), labels
        )


# --- CLIP-Adapter -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CLIPAdapterConfig:
    """CLIP-Adapter's defaults (Gao et al., IJCV 2024; ``clip_adapter.py`` of
    gaopengcuhk/CLIP-Adapter): the visual adapter with bottleneck ``reduction`` 4 and residual
    ``ratio`` 0.2 (the share of the adapted feature)."""

    reduction: int = 4
    ratio: float = 0.2

    def __post_init__(self):
        _check_positive_int("reduction", self.reduction)
        _check_fraction("ratio", self.ratio)


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


class CLIPAdapter(_FrozenCLIPMethod):
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
        return _cosine_logits(
            self.adapted_features(image_features), self.zero_shot_text, self._logit_scale()
        )

    def loss_on_features(self, image_features: torch.Tensor, labels: torch.Tensor):
        """Mean cross-entropy: image_features (B, D) raw CLIP features, labels (B,)."""
        return _cosine_cross_entropy(
            self.adapted_features(image_features), self.zero_shot_text, self._logit_scale(),
            labels,
        )  # fmt: skip


# --- Tip-Adapter ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TipAdapterConfig:
    """Tip-Adapter's defaults (Zhang et al., ECCV 2022; ``main.py``, ``utils.py`` and
    ``configs/imagenet.yaml`` / ``configs/oxford_pets.yaml`` of gaopengcuhk/Tip-Adapter).

    ``init_alpha`` 1.17 and ``init_beta`` 1 are used when the search is off (and to train
    Tip-Adapter-F). With ``search`` the validation split picks beta from
    ``search_grid(beta_max, beta_steps)`` and alpha from ``search_grid(alpha_max, alpha_steps)``:
    ``search_scale: [7, 3]``, ``search_step: [200, 20]`` in those configs (others differ per
    dataset, e.g. DTD [13, 13], EuroSAT [12, 10]). ``cache_views`` (for the caller, who encodes the
    cache): the keys average the features of 10 augmented passes over the few-shot images
    (``augment_epoch``), see ``encode_augmented_views``.
    """

    init_alpha: float = 1.17
    init_beta: float = 1.0
    search: bool = True
    beta_max: float = 7.0
    beta_steps: int = 200
    alpha_max: float = 3.0
    alpha_steps: int = 20
    cache_views: int = 10

    def __post_init__(self):
        for name in ("init_alpha", "init_beta", "beta_max", "alpha_max"):
            _check_positive_number(name, getattr(self, name))
        for name in ("beta_steps", "alpha_steps", "cache_views"):
            _check_positive_int(name, getattr(self, name))
        if not isinstance(self.search, bool):
            raise TypeError(f"search must be a bool, got {type(self.search).__name__}")


def search_grid(maximum: float, steps: int) -> list[float]:
    """Tip-Adapter's grid (``search_hp`` in its ``utils.py``): ``steps`` values
    ``0.1 + i * (maximum - 0.1) / steps`` for i = 0 .. steps - 1 (``maximum`` itself excluded)."""
    return [i * (maximum - 0.1) / steps + 0.1 for i in range(steps)]


def _cache_keys_and_values(features, labels, num_classes: int, dim: int):
    """Tip-Adapter's cache: keys (N, D), the few-shot features averaged over the augmented
    views then L2-normalized; values (N, C), the one-hot labels."""
    features = _as_features("cache_features", features, dim, views=True)
    if features.dim() == 3:
        features = features.mean(dim=0)
    labels = _as_labels("cache_labels", labels, features.shape[0], num_classes)
    keys = F.normalize(features, dim=-1)
    values = F.one_hot(labels, num_classes).float()
    return keys, values


def _tip_logits(features, text, keys, values, alpha, beta, logit_scale) -> torch.Tensor:
    """(B, C) Tip-Adapter logits; features, text and keys already L2-normalized."""
    clip_logits = logit_scale * features @ text.t()
    affinity = features @ keys.t()
    return clip_logits + alpha * torch.exp(-beta * (1 - affinity)) @ values


def _search_alpha_beta(features, text, keys, values, labels, logit_scale, config):
    """(alpha, beta, validation accuracy in %) of Tip-Adapter's grid search: beta in the outer
    loop, alpha in the inner, the first setting with the highest accuracy wins (its strict ">").
    features, text and keys L2-normalized; computed in float64 so that the choice does not hang
    on rounding."""
    features, text, keys, values = (t.double() for t in (features, text, keys, values))
    labels = labels.to(features.device)
    clip_logits = float(logit_scale) * features @ text.t()
    affinity = features @ keys.t()
    alphas = torch.tensor(search_grid(config.alpha_max, config.alpha_steps), dtype=torch.float64)
    alphas = alphas.to(features.device)
    best_correct, best_alpha, best_beta = -1, None, None
    for beta in search_grid(config.beta_max, config.beta_steps):
        cache_logits = torch.exp(-beta * (1 - affinity)) @ values  # (N, C)
        logits = clip_logits + alphas[:, None, None] * cache_logits  # (alphas, N, C)
        correct = (logits.argmax(dim=-1) == labels).sum(dim=-1)  # (alphas,)
        index = int(correct.argmax())  # the first maximum
        if int(correct[index]) > best_correct:
            best_correct, best_alpha, best_beta = int(correct[index]), float(alphas[index]), beta
    return best_alpha, best_beta, 100.0 * best_correct / labels.shape[0]


def _needs_validation(val_features, val_labels) -> None:
    if val_features is None or val_labels is None:
        raise ValueError(
            "val_features and val_labels are needed for the alpha/beta search (search=True); "
            "pass the validation features, or search=False to keep init_alpha and init_beta"
        )


class TipAdapter:
    """Tip-Adapter, training-free: a key-value cache of the few-shot features beside zero-shot
    CLIP. For L2-normalized image features f (B, D):

        logits = logit_scale * f @ text.T + alpha * exp(-beta * (1 - f @ keys.T)) @ values

    with keys (N, D) the L2-normalized few-shot features (averaged over augmented views first),
    values (N, C) their one-hot labels and text (C, D) the L2-normalized features of the
    hand-written prompt. Tip-Adapter's code writes ``100.`` for the scale: the CLIP it uses has
    ``exp(logit_scale) = 100``; here it is the backbone's own ``exp(logit_scale)``, the same value
    for those weights. Its code builds the text side from the same hand-written prompts as
    CoOp's zero-shot CLIP (a prompt ensemble on ImageNet only, not done here).

    ``fit`` builds the cache and searches alpha and beta on the validation features
    (``TipAdapterConfig``). ``state_dict()``: ``text_features``, ``cache_keys``,
    ``cache_values`` (tensors), ``alpha``, ``beta``, ``logit_scale``, ``validation_accuracy``
    (floats; the last is None without a search).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        classnames: list[str],
        zero_shot_template: str = DEFAULT_ZERO_SHOT_TEMPLATE,
        **options,
    ):
        classnames = _check_classnames(classnames)
        self.config = TipAdapterConfig(**options)
        self.num_classes = len(classnames)
        _, text = _hand_written_text(_frozen(clip), tokenizer, classnames, zero_shot_template)
        self.text_features = F.normalize(text, dim=-1).cpu()
        self.logit_scale = float(clip.logit_scale.exp())
        self.cache_keys: torch.Tensor | None = None
        self.cache_values: torch.Tensor | None = None
        self.alpha = self.config.init_alpha
        self.beta = self.config.init_beta
        self.validation_accuracy: float | None = None

    def fit(self, train_features, train_labels, val_features=None, val_labels=None) -> TipAdapter:
        """Builds the cache from train_features (N, D), or (views, N, D) to average augmented
        views, and train_labels (N,); with ``search``, picks alpha and beta on val_features
        (M, D) and val_labels (M,). Features are raw CLIP features (normalized here)."""
        dim = self.text_features.shape[-1]
        self.cache_keys, self.cache_values = _cache_keys_and_values(
            train_features, train_labels, self.num_classes, dim
        )
        if self.config.search:
            _needs_validation(val_features, val_labels)
            features = F.normalize(_as_features("val_features", val_features, dim), dim=-1)
            labels = _as_labels("val_labels", val_labels, features.shape[0], self.num_classes)
            self.alpha, self.beta, self.validation_accuracy = _search_alpha_beta(
                features, self.text_features, self.cache_keys, self.cache_values, labels,
                self.logit_scale, self.config,
            )  # fmt: skip
        return self

    def logits(self, features) -> torch.Tensor:
        """(B, C) float32 logits from raw CLIP image features (B, D), on their device."""
        if self.cache_keys is None:
            raise RuntimeError("TipAdapter.logits before fit: the cache is empty")
        features = _as_features("features", features, self.text_features.shape[-1])
        device = features.device
        return _tip_logits(
            F.normalize(features, dim=-1), self.text_features.to(device),
            self.cache_keys.to(device), self.cache_values.to(device), self.alpha, self.beta,
            self.logit_scale,
        )  # fmt: skip

    def state_dict(self) -> dict:
        if self.cache_keys is None:
            raise RuntimeError("TipAdapter.state_dict before fit: nothing to save")
        return {
            "text_features": self.text_features.clone(),
            "cache_keys": self.cache_keys.clone(),
            "cache_values": self.cache_values.clone(),
            "alpha": float(self.alpha),
            "beta": float(self.beta),
            "logit_scale": float(self.logit_scale),
            "validation_accuracy": self.validation_accuracy,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what ``state_dict`` returned; the class count and feature size must match."""
        expected = {"text_features", "cache_keys", "cache_values", "alpha", "beta",
                    "logit_scale", "validation_accuracy"}  # fmt: skip
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a TipAdapter.state_dict(), got keys {got}")
        if tuple(state["text_features"].shape) != tuple(self.text_features.shape):
            raise ValueError(
                f"state's text_features have shape {tuple(state['text_features'].shape)}, this "
                f"model's {tuple(self.text_features.shape)} (another class list or backbone?)"
            )
        self.text_features = state["text_features"].float().cpu()
        self.cache_keys = state["cache_keys"].float().cpu()
        self.cache_values = state["cache_values"].float().cpu()
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
        self.logit_scale = float(state["logit_scale"])
        self.validation_accuracy = state["validation_accuracy"]


class TipAdapterF(_FrozenCLIPMethod):
    """Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (its ``run_tip_adapter_F``: the
    keys become a linear layer's weight initialised from the cache, affinities ``f @ keys.T``
    without renormalising the trained keys), trained with cross-entropy on its logits at
    ``init_alpha`` / ``init_beta``; afterwards ``search_hyperparameters`` picks alpha and beta
    on the validation features with the trained keys, as its code does.

    cache_features: (N, D) raw few-shot features, or (views, N, D) augmented views to average;
    cache_labels: (N,). The trainable state is ``cache_keys``; ``cache_values``, ``alpha`` and
    ``beta`` are saved buffers (so a checkpoint is self-contained). Tip-Adapter-F's code keeps
    the epoch with the best *test* accuracy; the harness keeps the last one instead.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        classnames: list[str],
        cache_features: torch.Tensor,
        cache_labels: torch.Tensor,
        zero_shot_template: str = DEFAULT_ZERO_SHOT_TEMPLATE,
        **options,
    ):
        super().__init__(clip, tokenizer, classnames, zero_shot_template)
        self.config = TipAdapterConfig(**options)
        self.register_buffer("token_ids", self.zero_shot_token_ids, persistent=False)
        device = self.zero_shot_text.device
        keys, values = _cache_keys_and_values(
            cache_features, cache_labels, self.num_classes, self.zero_shot_text.shape[-1]
        )
        self.cache_keys = nn.Parameter(keys.to(device))
        self.register_buffer("cache_values", values.to(device))
        self.register_buffer("alpha", torch.tensor(self.config.init_alpha, device=device))
        self.register_buffer("beta", torch.tensor(self.config.init_beta, device=device))
        self.register_buffer(
            "text_features", F.normalize(self.zero_shot_text, dim=-1), persistent=False
        )

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C) logits from raw CLIP image features (B, D)."""
        return _tip_logits(
            F.normalize(image_features, dim=-1), self.text_features, self.cache_keys,
            self.cache_values, self.alpha, self.beta, self._logit_scale(),
        )  # fmt: skip

    def loss_on_features(self, image_features: torch.Tensor, labels: torch.Tensor):
        """Mean cross-entropy of the logits: image_features (B, D) raw, labels (B,)."""
        return F.cross_entropy(self.logits(image_features), labels)

    @torch.no_grad()
    def search_hyperparameters(self, val_features, val_labels) -> tuple[float, float, float]:
        """Sets alpha and beta by Tip-Adapter's grid search on val_features (M, D) (raw CLIP
        features) and val_labels (M,) with the trained keys; returns (alpha, beta, validation
        accuracy in %)."""
        _needs_validation(val_features, val_labels)
        features = _as_features("val_features", val_features, self.cache_keys.shape[-1])
        features = F.normalize(features.to(self.cache_keys.device), dim=-1)
        labels = _as_labels("val_labels", val_labels, features.shape[0], self.num_classes)
        alpha, beta, accuracy = _search_alpha_beta(
            features, self.text_features, self.cache_keys, self.cache_values, labels,
            self._logit_scale(), self.config,
        )  # fmt: skip
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        return alpha, beta, accuracy


# --- linear probe -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """CoOp's linear-probe protocol (``lpclip/linear_probe.py`` of KaiyangZhou/CoOp): scikit-learn's
    ``LogisticRegression`` (lbfgs, L2 penalty, ``max_iter=1000``); its inverse regularization
    strength C is searched on held-out features, first over ``coarse_grid`` (powers of 10 from
    1e6 down to 1e-6), then by ``search_steps`` = 8 rounds of its binary search in log10 C
    (``num_step`` 8). ``C``: a fixed value instead of the search. ``normalize``: L2-normalize
    the features first (CoOp's feature extractor stores raw features; normalized features make
    the C grid mean the same for every backbone)."""

    coarse_grid: tuple[float, ...] = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
    search_steps: int = 8
    max_iter: int = 1000
    normalize: bool = True
    C: float | None = None  # scikit-learn's name

    def __post_init__(self):
        if not self.coarse_grid:
            raise ValueError("coarse_grid must hold at least one value of C")
        for value in self.coarse_grid:
            _check_positive_number("coarse_grid values", value)
        _check_positive_int("search_steps", self.search_steps)
        _check_positive_int("max_iter", self.max_iter)
        if self.C is not None:
            _check_positive_number("C", self.C)


class LinearProbe:
    """Logistic regression on frozen image features with C chosen as CoOp's linear probe does.

    ``fit(train_features, train_labels, val_features, val_labels)``: for each C of the coarse
    grid, fit on the training features and score on the held-out ones; the best (first on ties)
    C_peak opens the interval [C_peak / 10, C_peak * 10]; each of the ``search_steps`` rounds
    fits both ends, keeps the better (the right one only if strictly better) as the current
    classifier and halves the interval in log10 C towards it. The classifier of the last round
    is the result (CoOp reports that one, not the best round). The classifier is fitted on the
    training features only; the held-out features serve the search alone (CoOp's protocol).

    ``logits(features)``: (N, num_classes) float32, scikit-learn's decision function
    ``x @ coef.T + intercept``; a class absent from the training labels gets -inf; with two
    classes present, the first gets 0 and the second the binary decision value (the same
    softmax as scikit-learn's ``predict_proba``). ``state_dict()``: ``coef`` (K, D),
    ``intercept`` (K,), ``classes`` (the K trained labels), ``C``, ``num_classes``, ``normalize``
    and ``search`` (rows of [C, held-out accuracy in %] in the order tried).
    """

    def __init__(self, num_classes: int, **options):
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.config = LinearProbeConfig(**options)
        self.C: float | None = None
        self.coef: torch.Tensor | None = None
        self.intercept: torch.Tensor | None = None
        self.classes: torch.Tensor | None = None
        self.search: list[tuple[float, float]] = []

    def _prepare(self, name: str, features, dim: int | None = None) -> np.ndarray:
        features = _as_features(name, features, dim)
        if self.config.normalize:
            features = F.normalize(features, dim=-1)
        return features.detach().cpu().double().numpy()

    def _classifier(self, C: float, features: np.ndarray, labels: np.ndarray):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():
            # Extreme C (1e6) can stop at max_iter, as in CoOp's runs; the search judges it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(C=C, max_iter=self.config.max_iter).fit(features, labels)

    def fit(self, train_features, train_labels, val_features=None, val_labels=None) -> LinearProbe:
        """train_features (N, D), train_labels (N,); val_features (M, D), val_labels (M,) for
        the search of C (not needed with a fixed ``C``). Raw CLIP features; returns self."""
        train = self._prepare("train_features", train_features)
        labels = _as_labels("train_labels", train_labels, train.shape[0], self.num_classes)
        labels = labels.cpu().numpy()
        if len(np.unique(labels)) < 2:
            raise ValueError("train_labels must hold at least two classes to fit a classifier")
        self.search = []
        if self.config.C is not None:
            chosen, classifier = self.config.C, self._classifier(self.config.C, train, labels)
        else:
            if val_features is None or val_labels is None:
                raise ValueError(
                    "val_features and val_labels are needed for the search of C; pass held-out "
                    "features, or C=... to fix it"
                )
            held_out = self._prepare("val_features", val_features, train.shape[1])
            held_out_labels = _as_labels(
                "val_labels", val_labels, held_out.shape[0], self.num_classes
            ).cpu().numpy()  # fmt: skip
            chosen, classifier = self._search(train, labels, held_out, held_out_labels)
        self.C = float(chosen)
        coef, intercept = classifier.coef_, classifier.intercept_
        self.coef = torch.from_numpy(coef.copy())
        self.intercept = torch.from_numpy(intercept.copy())
        self.classes = torch.from_numpy(classifier.classes_.astype(np.int64))
        return self

    def _search(self, train, labels, held_out, held_out_labels):
        """CoOp's search: (C, classifier) of the last binary-search round."""
        fitted: dict[float, tuple] = {}

        def score(C: float):
            if C not in fitted:
                classifier = self._classifier(C, train, labels)
                accuracy = float(np.mean(classifier.predict(held_out) == held_out_labels))
                fitted[C] = (classifier, accuracy)
                self.search.append((C, 100.0 * accuracy))
            return fitted[C]

        accuracies = [score(C)[1] for C in self.config.coarse_grid]
        peak = self.config.coarse_grid[int(np.argmax(accuracies))]
        left, right = 0.1 * peak, 10.0 * peak
        chosen = None
        for _ in range(self.config.search_steps):
            (left_classifier, left_accuracy), (right_classifier, right_accuracy) = (
                score(left),
                score(right),
            )
            log_left, log_right = np.log10(left), np.log10(right)
            if left_accuracy < right_accuracy:
                chosen = (right, right_classifier)
                log_left = 0.5 * (log_right + log_left)
            else:
                chosen = (left, left_classifier)
                log_right = 0.5 * (log_right + log_left)
            left, right = float(np.power(10, log_left)), float(np.power(10, log_right))
        return chosen

    def logits(self, features) -> torch.Tensor:
        """(N, num_classes) float32 decision values of raw CLIP features (N, D), on their
        device."""
        if self.coef is None:
            raise RuntimeError("LinearProbe.logits before fit: no classifier")
        device = torch.as_tensor(features).device
        x = torch.from_numpy(self._prepare("features", features, self.coef.shape[1]))
        scores = x @ self.coef.t() + self.intercept  # (N, K), or (N, 1) for two classes
        if self.classes.numel() == 2:
            scores = torch.cat([torch.zeros_like(scores), scores], dim=1)
        logits = torch.full((x.shape[0], self.num_classes), -math.inf, dtype=torch.float64)
        logits[:, self.classes] = scores
        return logits.float().to(device)

    def state_dict(self) -> dict:
        if self.coef is None:
            raise RuntimeError("LinearProbe.state_dict before fit: nothing to save")
        return {
            "coef": self.coef.clone(),
            "intercept": self.intercept.clone(),
            "classes": self.classes.clone(),
            "C": self.C,
            "num_classes": self.num_classes,
            "normalize": self.config.normalize,
            "search": torch.tensor(self.search, dtype=torch.float64).reshape(-1, 2),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what ``state_dict`` returned; the class count must match."""
        expected = {"coef", "intercept", "classes", "C", "num_classes", "normalize", "search"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a LinearProbe.state_dict(), got keys {got}")
        if state["num_classes"] != self.num_classes:
            raise ValueError(
                f"state is for {state['num_classes']} classes, this probe has {self.num_classes}"
            )
        if bool(state["normalize"]) != self.config.normalize:
            raise ValueError(
                f"state was fitted with normalize={state['normalize']}, this probe has "
                f"normalize={self.config.normalize}"
            )
        self.coef = state["coef"].double()
        self.intercept = state["intercept"].double()
        self.classes = state["classes"].long()
        self.C = float(state["C"])
        self.search = [(float(c), float(a)) for c, a in state["search"].tolist()]


# --- features ---------------------------------------------------------------------------------


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
    _check_positive_int("batch_size", batch_size)
    clip.to(device).eval()
    encoded = encode_samples(clip.encode_image, samples, transform, batch_size, device)
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
    _check_positive_int("views", views)
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


# --- training settings ------------------------------------------------------------------------


def coop_epochs(shots: int, dataset_name: str | None = None) -> int:
    """CoOp's epochs by shots (its ``scripts/coop/main.sh`` runs with ``vit_b16_ep50`` for 1
    shot, ``_ep100`` for 2 and 4, ``vit_b16`` (200) for 8 and 16; ImageNet ``_ep50``): 50 for
    1 shot, 100 up to 4, 200 above; 50 on ImageNet."""
    _check_positive_int("shots", shots)
    if dataset_name is not None and dataset_name.strip().lower() == "imagenet":
        return 50
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def training_defaults(method: str, shots: int, dataset_name: str | None = None) -> dict:
    """The training settings of a trained baseline, as its paper's code sets them: fields of
    ``pini.train.TrainConfig`` (epochs, lr, batch_size, momentum, weight_decay, warmup_epochs,
    warmup_lr, optimizer "sgd" or "adamw"), plus ``crop_scale`` (the random resized crop's
    scale range).

    - "coop": CoOp's ``configs/trainers/CoOp/vit_b16*.yaml`` on Dassl: SGD lr 0.002 (momentum
      0.9, weight decay 5e-4: Dassl's defaults), batch 32, cosine, one warm-up epoch at a
      constant 1e-5, epochs by shots (``coop_epochs``), Dassl's crop scale (0.08, 1).
    - "clip-adapter": the released ``clip_adapter.py`` is a trainer for CoOp's code base and no
      configuration of its own was published, so CoOp's ViT-B/16 settings (200 epochs).
    - "tip-adapter-f": Tip-Adapter's ``main.py`` and configs: AdamW (lr 0.001, eps 1e-4, its
      default weight decay 0.01), cosine over every step, no warm-up, batch 256, 20 epochs,
      crops of scale (0.5, 1) (``TrainConfig(optimizer="adamw")``; its schedule is cosine
      per epoch, not per step).
    """
    _check_positive_int("shots", shots)
    if method == "coop" or method == "clip-adapter":
        epochs = coop_epochs(shots, dataset_name) if method == "coop" else 200
        return dict(
            epochs=epochs, lr=0.002, batch_size=32, momentum=0.9, weight_decay=5e-4,
            warmup_epochs=1, warmup_lr=1e-5, optimizer="sgd", crop_scale=(0.08, 1.0),
        )  # fmt: skip
    if method == "tip-adapter-f":
        return dict(
            epochs=20, lr=0.001, batch_size=256, momentum=0.9, weight_decay=0.01,
            warmup_epochs=0, warmup_lr=1e-5, optimizer="adamw", crop_scale=(0.5, 1.0),
        )  # fmt: skip
    raise ValueError(
        f"method must be one of ('coop', 'clip-adapter', 'tip-adapter-f') (the trained "
        f"baselines), got {method!r}"
    )
