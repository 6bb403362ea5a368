"""Noise generators: small networks that predict the mean and standard deviation of the noise.

Every generator returns ``(mu, sigma)``, broadcastable to the tensor its noise perturbs. Following
the authors' code, ``sigma`` comes out of ``abs()`` by default (``sigma_activation="softplus"`` is
the smooth alternative), and the cross-attention generators use one unscaled head by default
(``scaled=True`` divides the scores by sqrt(d)). Final layers start small (std 0.02) so training
begins close to zero-shot CLIP without freezing ``sigma`` at a kink of ``abs``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIGMA_ACTIVATIONS = ("abs", "softplus")
INIT_STD = 0.02


def _sigma(raw: torch.Tensor, activation: str) -> torch.Tensor:
    return raw.abs() if activation == "abs" else F.softplus(raw)


def _small_init(layer: nn.Module) -> nn.Module:
    nn.init.normal_(layer.weight, std=INIT_STD)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _check_activation(sigma_activation: str) -> None:
    if sigma_activation not in SIGMA_ACTIVATIONS:
        raise ValueError(
            f"sigma_activation must be one of {SIGMA_ACTIVATIONS}, got {sigma_activation!r}"
        )


class LearnableNoise(nn.Module):
    """mu, sigma as free parameters of a fixed shape, e.g. (L, width) for prompt embeddings shared
    by every class or (C, D) for text features; initialised N(0, 0.02^2)."""

    def __init__(self, shape: tuple[int, ...], sigma_activation: str = "abs"):
        super().__init__()
        _check_activation(sigma_activation)
        self.sigma_activation = sigma_activation
        self.mu = nn.Parameter(torch.randn(shape) * INIT_STD)
        self.raw_sigma = nn.Parameter(torch.randn(shape) * INIT_STD)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu, _sigma(self.raw_sigma, self.sigma_activation)


class FeatureMLP(nn.Module):
    """(N, D) features -> per-row (mu, sigma) of shape (N, D)."""

    def __init__(self, dim: int, hidden: int | None = None, sigma_activation: str = "abs"):
        super().__init__()
        _check_activation(sigma_activation)
        hidden = hidden or dim
        self.sigma_activation = sigma_activation
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        self.head = _small_init(nn.Linear(hidden, 2 * dim))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw_sigma = self.head(self.body(features.float())).chunk(2, dim=-1)
        return mu, _sigma(raw_sigma, self.sigma_activation)


class CrossAttention(nn.Module):
    """Single-head attention of queries (..., Q, d_query) over text features (C, D)."""

    def __init__(self, query_dim: int, text_dim: int, dim: int, scaled: bool = False):
        super().__init__()
        self.query = nn.Linear(query_dim, dim)
        self.key = nn.Linear(text_dim, dim)
        self.value = nn.Linear(text_dim, dim)
        self.scale = 1.0 / math.sqrt(dim) if scaled else 1.0

    def forward(self, queries: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        scores = self.query(queries) @ self.key(text_features).t() * self.scale
        return scores.softmax(dim=-1) @ self.value(text_features)


class FeatureCrossAttention(nn.Module):
    """Visual features: the image's global feature attends over all class text features."""

    def __init__(self, dim: int, scaled: bool = False, sigma_activation: str = "abs"):
        super().__init__()
        _check_activation(sigma_activation)
        self.sigma_activation = sigma_activation
        self.attention = CrossAttention(dim, dim, dim, scaled)
        self.head = _small_init(nn.Linear(dim, 2 * dim))

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attended = self.attention(image_features.float(), text_features.float())
        mu, raw_sigma = self.head(attended).chunk(2, dim=-1)
        return mu, _sigma(raw_sigma, self.sigma_activation)


class ImageMLP(nn.Module):
    """Raw images (B, 3, H, W) -> per-pixel (mu, sigma): a pointwise MLP over the channels."""

    def __init__(self, hidden: int = 16, sigma_activation: str = "abs", bound: float = 1.0):
        super().__init__()
        _check_activation(sigma_activation)
        self.sigma_activation = sigma_activation
        self.bound = bound
        self.body = nn.Sequential(nn.Conv2d(3, hidden, 1), nn.GELU())
        self.head = _small_init(nn.Conv2d(hidden, 6, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw_sigma = self.head(self.body(images.float())).chunk(2, dim=1)
        return _bounded(mu, raw_sigma, self.bound, self.sigma_activation)


class ImageCNN(nn.Module):
    """Raw images -> per-pixel (mu, sigma): a residual CNN at full resolution; the noise magnitude
    is bounded (|mu| <= bound via tanh, sigma <= bound)."""

    def __init__(
        self, hidden: int = 16, blocks: int = 2, sigma_activation: str = "abs", bound: float = 1.0
    ):
        super().__init__()
        _check_activation(sigma_activation)
        self.sigma_activation = sigma_activation
        self.bound = bound
        self.stem = nn.Conv2d(3, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.GELU(),
                nn.Conv2d(hidden, hidden, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(hidden, hidden, 3, padding=1),
            )
            for _ in range(blocks)
        )
        self.head = _small_init(nn.Conv2d(hidden, 6, 3, padding=1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.stem(images.float())
        for block in self.blocks:
            hidden = hidden + block(hidden)
        mu, raw_sigma = self.head(F.gelu(hidden)).chunk(2, dim=1)
        return _bounded(mu, raw_sigma, self.bound, self.sigma_activation)


class ImageCrossAttention(nn.Module):
    """Raw images -> per-pixel (mu, sigma): the image's patch tokens attend over the class text
    features, and each attended token is projected back to its patch of pixels."""

    def __init__(
        self,
        text_dim: int,
        patch_size: int = 8,
        dim: int = 64,
        scaled: bool = False,
        sigma_activation: str = "abs",
        bound: float = 1.0,
    ):
        super().__init__()
        _check_activation(sigma_activation)
        self.sigma_activation = sigma_activation
        self.bound = bound
        self.patch_size = patch_size
        self.patches = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.attention = CrossAttention(dim, text_dim, dim, scaled)
        self.head = _small_init(nn.Linear(dim, 6 * patch_size * patch_size))

    def forward(
        self, images: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of patch_size={self.patch_size}"
            )
        tokens = self.patches(images.float()).flatten(2).transpose(1, 2)  # (B, N, dim)
        attended = tokens + self.attention(tokens, text_features.float())
        pixels = self.head(attended).transpose(1, 2)  # (B, 6 * p * p, N)
        out = F.fold(pixels, (height, width), self.patch_size, stride=self.patch_size)
        mu, raw_sigma = out.chunk(2, dim=1)
        return _bounded(mu, raw_sigma, self.bound, self.sigma_activation)


def _bounded(mu, raw_sigma, bound: float, activation: str):
    return bound * torch.tanh(mu), torch.clamp(_sigma(raw_sigma, activation), max=bound)
