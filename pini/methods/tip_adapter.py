"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a key-value cache of the few-shot
features beside zero-shot CLIP, training-free or with the keys fine-tuned."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..prompts import DEFAULT_ZERO_SHOT_TEMPLATE
from .base import Fitting, Method, MethodSetup, Training, on_frozen_clip
from .common import (
    FrozenCLIPMethod,
    as_features,
    as_labels,
    check_classnames,
    check_positive_int,
    check_positive_number,
    frozen,
    hand_written_text,
)


@dataclasses.dataclass(frozen=True)
class TipAdapterConfig:
    """Tip-Adapter's defaults (Zhang et al., ECCV 2022; ``main.py``, ``utils.py`` and
    ``configs/imagenet.yaml`` / ``configs/oxford_pets.yaml`` of gaopengcuhk/Tip-Adapter).

    ``init_alpha`` 1.17 and ``init_beta`` 1 are used when the search is off (and to train
    Tip-Adapter-F). With ``search`` the validation split picks beta from
    ``search_grid(beta_max, beta_steps)`` and alpha from ``search_grid(alpha_max, alpha_steps)``:
    ``search_scale: [7, 3]``, ``search_step: [200, 20]`` in those configs. These are the defaults
    for every dataset: Tip-Adapter's own configs differ per dataset (``search_scale`` and
    ``init_alpha``: DTD [13, 13] and 2, EuroSAT [12, 10] and 2, FGVC-Aircraft [30, 30] and 5),
    and its code searches on the whole val split, not min(K, 4) shots per class (docs/baselines.md
    lists both differences). ``cache_views`` (for the caller, who encodes the
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
            check_positive_number(name, getattr(self, name))
        for name in ("beta_steps", "alpha_steps", "cache_views"):
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.search, bool):
            raise TypeError(f"search must be a bool, got {type(self.search).__name__}")


def search_grid(maximum: float, steps: int) -> list[float]:
    """Tip-Adapter's grid (``search_hp`` in its ``utils.py``): ``steps`` values
    ``0.1 + i * (maximum - 0.1) / steps`` for i = 0 .. steps - 1 (``maximum`` itself excluded)."""
    return [i * (maximum - 0.1) / steps + 0.1 for i in range(steps)]


def _cache_keys_and_values(features, labels, num_classes: int, dim: int):
    """Tip-Adapter's cache: keys (N, D), the few-shot features averaged over the augmented
    views then L2-normalized; values (N, C), the one-hot labels."""
    features = as_features("cache_features", features, dim, views=True)
    if features.dim() == 3:
        features = features.mean(dim=0)
    labels = as_labels("cache_labels", labels, features.shape[0], num_classes)
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
        classnames = check_classnames(classnames)
        self.config = TipAdapterConfig(**options)
        self.num_classes = len(classnames)
        _, text = hand_written_text(frozen(clip), tokenizer, classnames, zero_shot_template)
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
            features = F.normalize(as_features("val_features", val_features, dim), dim=-1)
            labels = as_labels("val_labels", val_labels, features.shape[0], self.num_classes)
            self.alpha, self.beta, self.validation_accuracy = _search_alpha_beta(
                features,
                self.text_features,
                self.cache_keys,
                self.cache_values,
                labels,
                self.logit_scale,
                self.config,
            )
        return self

    def logits(self, features) -> torch.Tensor:
        """(B, C) float32 logits from raw CLIP image features (B, D), on their device."""
        if self.cache_keys is None:
            raise RuntimeError("TipAdapter.logits before fit: the cache is empty")
        features = as_features("features", features, self.text_features.shape[-1])
        device = features.device
        return _tip_logits(
            F.normalize(features, dim=-1),
            self.text_features.to(device),
            self.cache_keys.to(device),
            self.cache_values.to(device),
            self.alpha,
            self.beta,
            self.logit_scale,
        )

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
        expected = {
            "text_features",
            "cache_keys",
            "cache_values",
            "alpha",
            "beta",
            "logit_scale",
            "validation_accuracy",
        }
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


class TipAdapterF(FrozenCLIPMethod):
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
            F.normalize(image_features, dim=-1),
            self.text_features,
            self.cache_keys,
            self.cache_values,
            self.alpha,
            self.beta,
            self._logit_scale(),
        )

    def loss_on_features(self, image_features: torch.Tensor, labels: torch.Tensor):
        """Mean cross-entropy of the logits: image_features (B, D) raw, labels (B,)."""
        return F.cross_entropy(self.logits(image_features), labels)

    @torch.no_grad()
    def search_hyperparameters(self, val_features, val_labels) -> tuple[float, float, float]:
        """Sets alpha and beta by Tip-Adapter's grid search on val_features (M, D) (raw CLIP
        features) and val_labels (M,) with the trained keys; returns (alpha, beta, validation
        accuracy in %)."""
        _needs_validation(val_features, val_labels)
        features = as_features("val_features", val_features, self.cache_keys.shape[-1])
        features = F.normalize(features.to(self.cache_keys.device), dim=-1)
        labels = as_labels("val_labels", val_labels, features.shape[0], self.num_classes)
        alpha, beta, accuracy = _search_alpha_beta(
            features,
            self.text_features,
            self.cache_keys,
            self.cache_values,
            labels,
            self._logit_scale(),
            self.config,
        )
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        return alpha, beta, accuracy


# Tip-Adapter's main.py and configs: AdamW (lr 0.001, eps 1e-4, its default weight decay 0.01),
# cosine over every step, no warm-up, batch 256, 20 epochs (TrainConfig(optimizer="adamw"); its
# schedule is cosine per epoch, not per step); its cache and training crops have scale (0.5, 1).
# On the demo lr 10x, epochs 5x: its 20 epochs at batch 256 are 20 steps there.
ADAMW = dict(epochs=20, lr=0.001, batch_size=256, weight_decay=0.01, optimizer="adamw")
TIP_CROP_SCALE = (0.5, 1.0)
CACHE_LEARNED = "a cache of labelled features"


def _chosen(adapter: TipAdapter) -> dict:
    return {
        "alpha": adapter.alpha,
        "beta": adapter.beta,
        "validation_accuracy": adapter.validation_accuracy,
    }


def _build_fine_tuned(setup: MethodSetup) -> TipAdapterF:
    cache = setup.cache
    if cache is None:  # rebuilt to load a checkpoint: keys of the stored shape
        shape = setup.stored_state["cache_keys"].shape
        cache = torch.zeros(shape), torch.zeros(shape[0], dtype=torch.long)
    device = setup.clip.logit_scale.device
    return TipAdapterF(
        setup.clip,
        setup.tokenizer,
        setup.classnames,
        *cache,
        setup.zero_shot_template,
        **setup.options,
    ).to(device)


METHOD = Method(
    "tip-adapter",
    "Tip-Adapter",
    on_frozen_clip(TipAdapter),
    TipAdapterConfig,
    TIP_CROP_SCALE,
    fitting=Fitting("cache", _chosen, learned=CACHE_LEARNED),
)
TRAINING = Training(
    lambda shots, dataset, classes: dict(ADAMW, warmup_epochs=0),
    demo=dict(epochs=100, lr=0.01),
    searches=True,
    cache=True,
    learned=lambda run: CACHE_LEARNED,
)
FINE_TUNED_METHOD = Method(
    "tip-adapter-f", "Tip-Adapter-F", _build_fine_tuned, TipAdapterConfig, TIP_CROP_SCALE, TRAINING
)
