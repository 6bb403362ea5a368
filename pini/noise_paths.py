"""How PiNI computes its noise, noisy logits and loss: ``FusedNoisePath`` on pini_kernels' ops, or
``EagerNoisePath``, the same in plain PyTorch as the authors write it; the noise streams of one
step (docs/spec.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pini_kernels

# Noise streams of one step, all derived from one seed s (docs/spec.md §4): image and text
# features use s and s + 1 (drawn inside pini_kernels' logits/loss ops, or here from the same
# streams when each sample needs its own image features); prompt embeddings and raw images get
# their own.
IMAGE_FEATURE_STREAM = 0
TEXT_FEATURE_STREAM = 1
PROMPT_STREAM = 2
IMAGE_STREAM = 3


def step_seed(seed: int | None) -> int:
    """The step's seed: given, or drawn from torch's default CPU generator (no device sync)."""
    if seed is None:
        return int(torch.randint(0, 1 << 62, ()))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 62):
        raise ValueError(f"seed must be None or an int in [0, 2^62), got {seed!r}")
    return seed


NoisePair = tuple[torch.Tensor, torch.Tensor]


class FusedNoisePath:
    """The noise path on pini_kernels' fused ops (``noise_path="fused"``, the default).

    ``PiNI`` calls these four methods, never pini_kernels directly, so one object decides how
    every noise sample, noisy logit and loss of the model is computed; ``EagerNoisePath`` has the
    same methods in plain PyTorch.
    """

    def inject(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        *,
        mode: str = "add",
        num_samples: int | None = None,
        seed: int,
    ) -> torch.Tensor:
        """x (*S) with noise ``mu + sigma * eps``, eps = noise((num_samples, *S), seed) (or of
        shape S): (*S), or (num_samples, *S). mu, sigma: broadcastable to S."""
        return pini_kernels.fused_inject(
            x, mu, sigma, mode=mode, num_samples=num_samples, seed=seed
        )

    def sample_noise(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        shape: torch.Size,
        *,
        num_samples: int,
        seed: int,
    ) -> torch.Tensor:
        """(num_samples, *shape) draws of the noise itself, ``mu + sigma * eps`` with eps =
        noise((num_samples, *shape), seed); mu, sigma broadcastable to shape."""
        # Contiguous zeros (not an expanded 0-d one): the native backends' C++ autograd entry
        # point takes contiguous inputs (pini_kernels/inject.py), and noise shapes are small.
        zeros = mu.new_zeros(shape)
        return pini_kernels.fused_inject(zeros, mu, sigma, num_samples=num_samples, seed=seed)

    def noisy_cosine_logits(self, **call) -> torch.Tensor:
        """``pini_kernels.noisy_cosine_logits``: (num_samples, B, C) logits."""
        return pini_kernels.noisy_cosine_logits(**call)

    def noisy_cross_entropy(self, **call) -> torch.Tensor:
        """``pini_kernels.noisy_cross_entropy``: the mean loss of Eq. (13), a float32 scalar."""
        return pini_kernels.noisy_cross_entropy(**call)


class EagerNoisePath:
    """The same noise path in plain PyTorch, as the authors write it (``noise_path="eager"``):
    ``mu + sigma * eps`` added to (or multiplying) the tensor, ``F.normalize``, a matmul and
    ``F.cross_entropy`` over the m-times-repeated rows, every intermediate materialized.

    Only eps differs from the authors' ``torch.randn_like``: it is ``pini_kernels.noise`` on the
    streams the fused ops draw (docs/spec.md §4), so both paths give the same loss and gradients
    for the same seed, to float rounding.
    """

    def inject(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        *,
        mode: str = "add",
        num_samples: int | None = None,
        seed: int,
    ) -> torch.Tensor:
        """``FusedNoisePath.inject`` with eps materialized."""
        shape = x.shape if num_samples is None else (num_samples, *x.shape)
        noise = mu + sigma * pini_kernels.noise(shape, seed=seed, device=x.device)
        return x * noise if mode == "mul" else x + noise

    def sample_noise(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        shape: torch.Size,
        *,
        num_samples: int,
        seed: int,
    ) -> torch.Tensor:
        """``FusedNoisePath.sample_noise``: (num_samples, *shape)."""
        return mu + sigma * pini_kernels.noise((num_samples, *shape), seed=seed, device=mu.device)

    def _noisy(
        self,
        features: torch.Tensor,
        noise: NoisePair | None,
        mode: str,
        num_samples: int,
        seed: int,
    ) -> torch.Tensor:
        """features (N, D) or (num_samples, N, D) with noise of the stream ``seed`` over
        (num_samples, N, D); the features as given without noise."""
        if noise is None:
            return features
        samples = None if features.dim() == 3 else num_samples
        return self.inject(features, *noise, mode=mode, num_samples=samples, seed=seed)

    def noisy_cosine_logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        *,
        image_noise: NoisePair | None = None,
        text_noise: NoisePair | None = None,
        mode: str = "add",
        num_samples: int = 1,
        seed: int,
    ) -> torch.Tensor:
        """(num_samples, B, C) logits; image_features (B, D), text_features (C, D) or
        (num_samples, C, D). Image noise on the stream of ``seed``, text noise on ``seed + 1``.
        In float32 (the fused op's arithmetic), whatever the features' dtypes."""
        image = self._noisy(image_features, image_noise, mode, num_samples, seed)
        text = self._noisy(text_features, text_noise, mode, num_samples, seed + 1)
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        logits = logit_scale * (image @ text.transpose(-1, -2))
        return logits.expand(num_samples, *logits.shape[-2:])

    def noisy_cross_entropy(self, *, target: torch.Tensor, **call) -> torch.Tensor:
        """Eq. (13): ``F.cross_entropy`` (mean) over the (num_samples * B, C) logits of
        ``noisy_cosine_logits(**call)``, the (B,) ``target`` repeated per sample."""
        logits = self.noisy_cosine_logits(**call)
        samples, batch, classes = logits.shape
        return F.cross_entropy(logits.reshape(samples * batch, classes), target.repeat(samples))


NOISE_PATH_OPS = {"fused": FusedNoisePath(), "eager": EagerNoisePath()}
