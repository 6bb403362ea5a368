"""The two baselines every benchmark runs against, written once: eager PyTorch and torch.compile.

The eager functions are the PiNI reference code path as users write it: draw ``eps`` with
``torch.randn``, then ``mu + sigma * eps`` added to (or multiplied with) the features, normalize,
matmul, and ``F.cross_entropy`` over the ``m``-times-repeated rows. Their signatures mirror the
public functions of ``pini_kernels`` (minus ``seed`` and ``backend``) so that every provider is
called with the same keyword arguments. Each one also takes the ``eps`` it would draw: fed
``pini_kernels.noise(..., seed=s)`` (and ``seed + 1`` for the text side, docs/spec.md §4), it
computes what the fused op computes with ``seed=s``, which is how each benchmark checks the
fused result once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "compile_baseline",
    "eager_fused_inject",
    "eager_noise",
    "eager_noisy_cosine_logits",
    "eager_noisy_cross_entropy",
]

NoisePair = tuple[torch.Tensor, torch.Tensor]


def eager_noise(
    shape: tuple[int, ...],
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``eps ~ N(0, I)`` of ``shape``, as PiNI draws it."""
    return torch.randn(shape, device=device, dtype=dtype)


def eager_fused_inject(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    *,
    mode: str = "add",
    num_samples: int | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + (mu + sigma*eps)`` or ``x * (mu + sigma*eps)``: (*S), or (num_samples, *S).

    x: (*S); mu, sigma: broadcastable to S. eps: (num_samples, *S) (or S), drawn when None.
    """
    sample_shape = x.shape if num_samples is None else (num_samples, *x.shape)
    if eps is None:
        eps = torch.randn(sample_shape, device=x.device, dtype=x.dtype)
    sample_noise = mu + sigma * eps
    return x * sample_noise if mode == "mul" else x + sample_noise


def _eager_unit_features(
    features: torch.Tensor,
    noise_params: NoisePair | None,
    *,
    mode: str,
    num_samples: int,
    eps: torch.Tensor | None,
) -> torch.Tensor:
    """(num_samples, N, D) normalized noisy copies of ``features`` (N, D); without noise the
    (N, D) rows normalized once, as CLIP code does with its class text features (the matrix
    product broadcasts them over the samples)."""
    if noise_params is None:
        return F.normalize(features, dim=-1)
    mu, sigma = noise_params
    noisy = eager_fused_inject(features, mu, sigma, mode=mode, num_samples=num_samples, eps=eps)
    return F.normalize(noisy, dim=-1)


def eager_noisy_cosine_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    image_noise: NoisePair | None = None,
    text_noise: NoisePair | None = None,
    mode: str = "add",
    num_samples: int = 1,
    image_eps: torch.Tensor | None = None,
    text_eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """(num_samples, B, C) logits ``logit_scale * <z/|z|, t/|t|>`` of noisy features.

    image_features: (B, D); text_features: (C, D); image_eps: (num_samples, B, D) and text_eps:
    (num_samples, C, D), drawn when None.
    """
    image = _eager_unit_features(
        image_features, image_noise, mode=mode, num_samples=num_samples, eps=image_eps
    )
    text = _eager_unit_features(
        text_features, text_noise, mode=mode, num_samples=num_samples, eps=text_eps
    )
    logits = logit_scale * (image @ text.transpose(-1, -2))
    return logits.expand(num_samples, *logits.shape[-2:])


def eager_noisy_cross_entropy(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    target: torch.Tensor,
    *,
    image_noise: NoisePair | None = None,
    text_noise: NoisePair | None = None,
    mode: str = "add",
    num_samples: int = 1,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    image_eps: torch.Tensor | None = None,
    text_eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """PiNI's loss (Eq. 13): ``F.cross_entropy`` over the logits of every noise sample.

    target: (B,). The (num_samples, B, C) logits are flattened to rows and ``target`` is repeated
    per sample, as the PiNI code does.
    """
    logits = eager_noisy_cosine_logits(
        image_features,
        text_features,
        logit_scale,
        image_noise=image_noise,
        text_noise=text_noise,
        mode=mode,
        num_samples=num_samples,
        image_eps=image_eps,
        text_eps=text_eps,
    )
    samples, batch, classes = logits.shape
    loss = F.cross_entropy(
        logits.reshape(samples * batch, classes),
        target.repeat(samples),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.view(samples, batch) if reduction == "none" else loss


def compile_baseline(eager_function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of an eager baseline, specialized to the shapes it first sees.

    Dynamo's caches are cleared first, so each benchmark case gets its own static compilation (as
    a user running fixed shapes would) and no case runs into the recompilation limit.
    """
    torch._dynamo.reset()
    return torch.compile(eager_function, dynamic=False)
