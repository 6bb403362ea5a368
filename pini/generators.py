"""Noise generators: small networks that predict the mean and standard deviation of the noise.

Every generator returns ``(mu, sigma)``, broadcastable to the tensor its noise perturbs. Following
the authors' code, ``sigma`` comes out of ``abs()`` by default (``sigma_activation="softplus"`` is
the smooth alternative), and the cross-attention generators use one unscaled head by default
(``scaled=True`` divides the scores by sqrt(d)). Output layers (the ones that give mu and sigma)
keep PyTorch's default initialisation, as the authors' ``fc_mean``/``fc_variance`` and
``conv_mean``/``conv_variance``; ``head_init="small"`` starts them at N(0, 0.02^2) with zero
bias instead, so training begins near the frozen CLIP.

The image-level generators of the paper (Section 4.2): ``AuthorsImageCNN`` (the authors' 10-layer
residual CNN, 64 -> [64, 64] -> 128 -> 64 channels, its mu and sigma rescaled to a root mean
square of 0.1 per channel of each image, as their code does), ``ImageCNN`` (pini's narrower
variant: 32 channels, 4 identity blocks, rescaled per image) and ``ImageCrossAttention`` (CLIP's
patch tokens attending over the class text features, rescaled per image), all in CLIP's
normalized pixel space. ``LightImageCNN``, ``PixelCrossAttention`` and ``ImageMLP`` are lighter
variants whose noise is bounded by ``tanh`` / a clamp instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIGMA_ACTIVATIONS = ("abs", "softplus")
# Output layers: "default" keeps PyTorch's initialisation (the authors'), "small" draws the
# weights from N(0, INIT_STD^2) with zero bias. LearnableNoise starts at N(0, INIT_STD^2) either
# way (the authors' template_mu / template_var).
HEAD_INITS = ("default", "small")
INIT_STD = 0.02
PIXEL_NOISE_RMS = 0.1  # the paper's image generators: RMS of mu and of sigma (0.1, the authors')
RMS_FLOOR = 1e-12  # keeps an all-zero output at zero instead of dividing 0 by 0


def _sigma(raw: torch.Tensor, activation: str) -> torch.Tensor:
    return raw.abs() if activation == "abs" else F.softplus(raw)


def _head(layer: nn.Module, head_init: str) -> nn.Module:
    """An output layer with ``head_init``'s initialisation (see HEAD_INITS)."""
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    if head_init == "small":
        nn.init.normal_(layer.weight, std=INIT_STD)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return layer


def _check_activation(sigma_activation: str) -> None:
    if sigma_activation not in SIGMA_ACTIVATIONS:
        raise ValueError(
            f"sigma_activation must be one of {SIGMA_ACTIVATIONS}, got {sigma_activation!r}"
        )


def _pixel_noise_settings(generator: nn.Module, sigma_activation: str, rms: float) -> None:
    """What every raw-image generator keeps: its sigma activation and the noise's target RMS."""
    _check_activation(sigma_activation)
    generator.sigma_activation = sigma_activation
    generator.rms = rms


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

    def __init__(
        self,
        dim: int,
        hidden: int | None = None,
        sigma_activation: str = "abs",
        head_init: str = "default",
    ):
        super().__init__()
        _check_activation(sigma_activation)
        hidden = hidden or dim
        self.sigma_activation = sigma_activation
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        self.head = _head(nn.Linear(hidden, 2 * dim), head_init)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw_sigma = self.head(self.body(features.float())).chunk(2, dim=-1)
        return mu, _sigma(raw_sigma, self.sigma_activation)


class CrossAttention(nn.Module):
    """Single-head attention of queries (..., Q, query_dim) over text features (C, text_dim) as
    keys and values: (..., Q, dim). Text features (S, C, text_dim), one set per noise sample,
    give (S, ..., Q, dim)."""

    def __init__(self, query_dim: int, text_dim: int, dim: int, scaled: bool = False):
        super().__init__()
        self.query = nn.Linear(query_dim, dim)
        self.key = nn.Linear(text_dim, dim)
        self.value = nn.Linear(text_dim, dim)
        self.scale = 1.0 / math.sqrt(dim) if scaled else 1.0

    def forward(self, queries: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        keys, values = self.key(text_features), self.value(text_features)
        if text_features.dim() == 3:  # (S, C, dim) -> (S, 1, ..., 1, C, dim) against (..., Q, dim)
            per_sample = (text_features.shape[0],) + (1,) * (queries.dim() - 2)
            keys = keys.view(*per_sample, *keys.shape[1:])
            values = values.view(*per_sample, *values.shape[1:])
        elif text_features.dim() != 2:
            raise ValueError(
                "text_features must be (C, D) or (num_samples, C, D), got shape "
                f"{tuple(text_features.shape)}"
            )
        scores = self.query(queries) @ keys.transpose(-1, -2) * self.scale
        return scores.softmax(dim=-1) @ values


class FeatureCrossAttention(nn.Module):
    """Visual features: the image's global feature (B, D) attends over all class text features
    (C, D) -> per-row (mu, sigma) of shape (B, D); (S, B, D) for text features (S, C, D)."""

    def __init__(
        self,
        dim: int,
        scaled: bool = False,
        sigma_activation: str = "abs",
        head_init: str = "default",
    ):
        super().__init__()
        _check_activation(sigma_activation)
        self.sigma_activation = sigma_activation
        self.attention = CrossAttention(dim, dim, dim, scaled)
        self.head = _head(nn.Linear(dim, 2 * dim), head_init)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attended = self.attention(image_features.float(), text_features.float())
        mu, raw_sigma = self.head(attended).chunk(2, dim=-1)
        return mu, _sigma(raw_sigma, self.sigma_activation)


class ImageMLP(nn.Module):
    """Raw images (B, 3, H, W) -> per-pixel (mu, sigma): a pointwise MLP over the channels."""

    def __init__(
        self,
        hidden: int = 16,
        sigma_activation: str = "abs",
        bound: float = 1.0,
        head_init: str = "default",
    ):
        super().__init__()
        self.bound = bound  # tanh bound of mu and sigma
        _check_activation(sigma_activation)
        self.sigma_activation = sigma_activation
        self.body = nn.Sequential(nn.Conv2d(3, hidden, 1), nn.GELU())
        self.head = _head(nn.Conv2d(hidden, 6, 1), head_init)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw_sigma = self.head(self.body(images.float())).chunk(2, dim=1)
        return _bounded(mu, raw_sigma, self.bound, self.sigma_activation)


class ImageCNN(nn.Module):
    """The paper's image generator (Section 4.2, "a 10-layer convolutional network with residual
    connections"): raw images (B, 3, H, W) -> per-pixel (mu, sigma) of the same shape.

    Ten 3x3 convolutions at full resolution: a stem (convolution, BatchNorm, ReLU), ``blocks``
    residual blocks of two convolutions each (conv-BN-ReLU-conv-BN, plus the block's input, then
    ReLU), and an output convolution to (mu, sigma). mu and sigma are each rescaled to a root mean
    square of ``rms`` per image (0.1 in CLIP's normalized pixel space; the authors' network,
    ``AuthorsImageCNN``, rescales per channel), so the generator learns where the noise goes, not
    how strong it is. BatchNorm follows the module's train/eval mode.
    """

    def __init__(
        self,
        hidden: int = 32,
        blocks: int = 4,
        sigma_activation: str = "abs",
        head_init: str = "default",
        rms: float = PIXEL_NOISE_RMS,
    ):
        super().__init__()
        _pixel_noise_settings(self, sigma_activation, rms)
        self.stem = nn.Sequential(_conv_bn(3, hidden), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(_conv_bn(hidden, hidden), nn.ReLU(), _conv_bn(hidden, hidden))
            for _ in range(blocks)
        )
        self.head = _head(nn.Conv2d(hidden, 6, 3, padding=1), head_init)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.stem(images.float())
        for block in self.blocks:
            hidden = F.relu(hidden + block(hidden))
        mu, raw_sigma = self.head(hidden).chunk(2, dim=1)
        return _rescaled(mu, raw_sigma, self.rms, self.sigma_activation)


def _conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 3x3 convolution (no bias: BatchNorm follows) and BatchNorm, at the input's resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class AuthorsImageCNN(nn.Module):
    """The authors' image generator (``visual_generator="cnn-authors"``, their
    ``VPNGenerator``): raw images (B, 3, H, W) -> per-pixel (mu, sigma) of the same shape, at full
    resolution. A stem (3x3 convolution 3 -> 64, BatchNorm, ReLU), four residual blocks 64 -> 64,
    64 -> 64, 64 -> 128, 128 -> 64 (each conv-BN-ReLU-conv-BN plus its shortcut, then ReLU; the
    shortcut is the identity where the width stays, a 1x1 convolution and BatchNorm where it
    changes), and two 3x3 output convolutions without bias, one for mu and one for sigma: ten 3x3
    convolutions on the main path. mu and sigma are each rescaled to a root mean square of
    ``rms`` (0.1) per channel of each image, as their ``normalize(x, dim=2) * sqrt(H * W) * 0.1``
    over (B, 3, H * W) does; sigma is the activation of the raw output, rescaled.
    """

    WIDTHS = ((64, 64), (64, 64), (64, 128), (128, 64))  # (in, out) of each residual block

    def __init__(
        self,
        sigma_activation: str = "abs",
        rms: float = PIXEL_NOISE_RMS,
        head_init: str = "default",
    ):
        super().__init__()
        _pixel_noise_settings(self, sigma_activation, rms)
        self.stem = nn.Sequential(_conv_bn(3, 64), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(_conv_bn(width_in, width_out), nn.ReLU(), _conv_bn(width_out, width_out))
            for width_in, width_out in self.WIDTHS
        )
        self.shortcuts = nn.ModuleList(
            nn.Identity()
            if width_in == width_out
            else nn.Sequential(
                nn.Conv2d(width_in, width_out, 1, bias=False), nn.BatchNorm2d(width_out)
            )
            for width_in, width_out in self.WIDTHS
        )
        self.mean_head = _head(nn.Conv2d(64, 3, 3, padding=1, bias=False), head_init)
        self.sigma_head = _head(nn.Conv2d(64, 3, 3, padding=1, bias=False), head_init)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.stem(images.float())
        for block, shortcut in zip(self.blocks, self.shortcuts, strict=True):
            hidden = F.relu(block(hidden) + shortcut(hidden))
        mu = _to_rms_per_channel(self.mean_head(hidden), self.rms)
        sigma = _sigma(self.sigma_head(hidden), self.sigma_activation)
        return mu, _to_rms_per_channel(sigma, self.rms)


class LightImageCNN(nn.Module):
    """A lighter image generator (``visual_generator="cnn-light"``): raw images (B, 3, H, W) ->
    per-pixel (mu, sigma) of the same shape from a residual CNN at full resolution (a stem, two
    GELU blocks, an output convolution; no normalization); the noise magnitude is bounded
    (|mu| <= bound via tanh, sigma <= bound)."""

    def __init__(
        self,
        hidden: int = 16,
        blocks: int = 2,
        sigma_activation: str = "abs",
        bound: float = 1.0,
        head_init: str = "default",
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
        self.head = _head(nn.Conv2d(hidden, 6, 3, padding=1), head_init)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.stem(images.float())
        for block in self.blocks:
            hidden = hidden + block(hidden)
        mu, raw_sigma = self.head(F.gelu(hidden)).chunk(2, dim=1)
        return _bounded(mu, raw_sigma, self.bound, self.sigma_activation)


class ImageCrossAttention(nn.Module):
    """The paper's image cross-attention generator (Section 4.2): the image's spatial feature,
    CLIP's patch tokens (B, N, token_dim) from the frozen visual tower, is the query; the class
    text features (C, text_dim) are keys and values. Each attended token (plus its query, a
    residual connection) is projected to its patch of pixels, giving per-pixel (mu, sigma) of
    shape (B, 3, H, W), each rescaled to a root mean square of ``rms`` per image like
    ``ImageCNN``. Text features (S, C, text_dim), one set per noise sample, give (S, B, 3, H, W).
    """

    def __init__(
        self,
        token_dim: int,
        text_dim: int,
        patch_size: int,
        scaled: bool = False,
        sigma_activation: str = "abs",
        head_init: str = "default",
        rms: float = PIXEL_NOISE_RMS,
    ):
        super().__init__()
        _pixel_noise_settings(self, sigma_activation, rms)
        self.patch_size = patch_size
        self.attention = CrossAttention(token_dim, text_dim, token_dim, scaled)
        self.head = _head(nn.Linear(token_dim, 6 * patch_size * patch_size), head_init)

    def forward(
        self,
        patch_tokens: torch.Tensor,
        text_features: torch.Tensor,
        image_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """patch_tokens: (B, N, token_dim), row-major over the (H/p, W/p) grid of patches;
        text_features: (C, text_dim) or (S, C, text_dim); image_size: (H, W)."""
        height, width = image_size
        patch = self.patch_size
        tokens = patch_tokens.shape[-2]
        if height % patch or width % patch or tokens != (height // patch) * (width // patch):
            raise ValueError(
                f"patch_tokens must hold one token per {patch}x{patch} patch of a "
                f"{height}x{width} image ({(height // patch) * (width // patch)} tokens), "
                f"got {tokens}"
            )
        queries = patch_tokens.float()
        attended = queries + self.attention(queries, text_features.float())  # (..., B, N, dim)
        out = _fold_patches(self.head(attended), patch, (height, width))
        mu, raw_sigma = out.chunk(2, dim=-3)
        return _rescaled(mu, raw_sigma, self.rms, self.sigma_activation)


class PixelCrossAttention(nn.Module):
    """A lighter image cross-attention (``visual_generator="attention-pixels"``): raw images
    (B, 3, H, W) -> per-pixel (mu, sigma) of the same shape. A learned patchify of the pixels gives
    the queries (not CLIP's tokens), which attend over the class text features (C, D); each
    attended token is projected back to its patch of pixels. Bounded like ``LightImageCNN``."""

    def __init__(
        self,
        text_dim: int,
        patch_size: int = 8,
        dim: int = 64,
        scaled: bool = False,
        sigma_activation: str = "abs",
        head_init: str = "default",
        bound: float = 1.0,
    ):
        super().__init__()
        _check_activation(sigma_activation)
        self.sigma_activation = sigma_activation
        self.bound = bound
        self.patch_size = patch_size
        self.patches = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.attention = CrossAttention(dim, text_dim, dim, scaled)
        self.head = _head(nn.Linear(dim, 6 * patch_size * patch_size), head_init)

    def forward(
        self, images: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of patch_size={self.patch_size}"
            )
        tokens = self.patches(images.float()).flatten(2).transpose(1, 2)  # (B, N, dim)
        attended = tokens + self.attention(tokens, text_features.float())  # (..., B, N, dim)
        out = _fold_patches(self.head(attended), self.patch_size, (height, width))
        mu, raw_sigma = out.chunk(2, dim=-3)
        return _bounded(mu, raw_sigma, self.bound, self.sigma_activation)


def _fold_patches(values: torch.Tensor, patch: int, image_size: tuple[int, int]) -> torch.Tensor:
    """(..., B, N, channels * patch * patch) per-patch values, row-major over the patch grid ->
    (..., B, channels, H, W) pixels."""
    *leading, tokens, per_patch = values.shape
    columns = values.reshape(-1, tokens, per_patch).transpose(1, 2)
    pixels = F.fold(columns, image_size, patch, stride=patch)
    return pixels.view(*leading, *pixels.shape[1:])


def _bounded(mu, raw_sigma, bound: float, activation: str):
    return bound * torch.tanh(mu), torch.clamp(_sigma(raw_sigma, activation), max=bound)


def _rescaled(mu, raw_sigma, rms: float, activation: str):
    """mu and sigma (..., 3, H, W), each scaled to a root mean square of ``rms`` per image."""
    return _to_rms(mu, rms), _to_rms(_sigma(raw_sigma, activation), rms)


def _to_rms(values: torch.Tensor, rms: float) -> torch.Tensor:
    mean_square = values.square().mean(dim=(-3, -2, -1), keepdim=True)
    return values * (rms * torch.rsqrt(mean_square + RMS_FLOOR))


def _to_rms_per_channel(values: torch.Tensor, rms: float) -> torch.Tensor:
    """(B, C, H, W) scaled to a root mean square of ``rms`` over each (image, channel):
    ``F.normalize`` over the H * W pixels (norm floored at RMS_FLOOR) times sqrt(H * W) * rms."""
    pixels = values.shape[-2] * values.shape[-1]
    norm = values.flatten(-2).norm(dim=-1).clamp_min(RMS_FLOOR)[..., None, None]
    return values * (math.sqrt(pixels) * rms / norm)
