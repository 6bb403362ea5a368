"""Pure-PyTorch reference of every op, with the same semantics and noise stream as the kernels.

Everything here is written with plain tensor ops so it runs on any device and any float dtype
(float64 included, for ``gradcheck``). The noise stream is computed with integer tensor ops so
that each fused backend can be compared with it element by element (docs/spec.md §3). The
reference stores what autograd needs, ``eps`` included; the fused backends do not.
"""

from __future__ import annotations

import torch

from ._checks import result_dtype
from .seeds import stream_key, stream_key_value

__all__ = [
    "fused_inject",
    "noise",
    "noise_forward",
    "noisy_cosine_logits",
    "noisy_cross_entropy",
    "normal_stream",
    "philox4x32",
]

# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), exactly as
# Triton's tl.randint4x runs it.
PHILOX_ROUNDS = 10
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
MASK32 = 0xFFFFFFFF
# Triton's uint_to_uniform_float: the largest scale with (2^31 - 1) * scale < 1 in float32.
UINT32_TO_UNIFORM = 4.6566127342e-10
# Box-Muller clamps u away from 0 so that log(u) stays finite.
UNIFORM_FLOOR = 1.0e-7
TWO_PI = 6.283185307179586
# Features are normalized like F.normalize: v / max(|v|, NORM_FLOOR) (its default eps).
NORM_FLOOR = 1e-12

# Quads generated per step of `normal_stream`, to bound the int64 temporaries (~100 MB).
_QUADS_PER_CHUNK = 1 << 20


def _mul_hi_lo(constant: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit halves of ``constant * word`` for 32-bit words held in int64.

    The 64-bit product does not fit in a signed int64, so ``word`` is split into 16-bit halves
    whose partial products (< 2^48) do.
    """
    partial_low = constant * (word & 0xFFFF)
    partial_high = constant * (word >> 16)
    high = (partial_high + (partial_low >> 16)) >> 16
    low = (((partial_high & 0xFFFF) << 16) + partial_low) & MASK32
    return high, low


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds on int64 tensors holding uint32 words.

    counter: four int64 tensors of one shape, each element in [0, 2^32).
    key: two Python ints in [0, 2^32).
    Returns the four output words as int64 tensors in [0, 2^32).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(PHILOX_ROUNDS):
        high_b, low_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        high_a, low_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """A uint32 word (in int64) to a float32 uniform in [0, 1) (Triton's uint_to_uniform_float)."""
    # Reinterpreted as int32, a word >= 2^31 is negative and is replaced by its complement ~v.
    magnitude = torch.where(word >= (1 << 31), MASK32 - word, word)
    scale = torch.tensor(UINT32_TO_UNIFORM, dtype=torch.float32, device=word.device)
    return magnitude.to(torch.float32) * scale


def _box_muller(u_radius: torch.Tensor, u_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    floor = torch.tensor(UNIFORM_FLOOR, dtype=torch.float32, device=u_radius.device)
    two_pi = torch.tensor(TWO_PI, dtype=torch.float32, device=u_radius.device)
    radius = torch.sqrt(-2.0 * torch.log(torch.maximum(floor, u_radius)))
    angle = two_pi * u_angle
    return radius * torch.cos(angle), radius * torch.sin(angle)


def _normal_quads(seed: int, first_quad: int, num_quads: int, device) -> torch.Tensor:
    """(num_quads, 4) float32: lanes 0..3 of tl.randn4x(seed, q) for num_quads q from first_quad."""
    quad = torch.arange(first_quad, first_quad + num_quads, dtype=torch.int64, device=device)
    zero = torch.zeros_like(quad)
    words = philox4x32((quad & MASK32, quad >> 32, zero, zero), (seed & MASK32, seed >> 32))
    u0, u1, u2, u3 = (_uniform(w) for w in words)
    n0, n1 = _box_muller(u0, u1)
    n2, n3 = _box_muller(u2, u3)
    return torch.stack((n0, n1, n2, n3), dim=1)


def normal_stream(seed: int, start: int, count: int, device=None) -> torch.Tensor:
    """Elements ``k`` in ``[start, start + count)`` of the noise stream of ``seed`` (float32).

    Element ``k`` is lane ``k % 4`` of ``tl.randn4x(seed, k // 4)`` (docs/spec.md §3).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count == 0:
        return out
    first_quad, last_quad = start // 4, (start + count - 1) // 4
    written = 0
    for chunk_first in range(first_quad, last_quad + 1, _QUADS_PER_CHUNK):
        num_quads = min(_QUADS_PER_CHUNK, last_quad + 1 - chunk_first)
        values = _normal_quads(seed, chunk_first, num_quads, device).reshape(-1)
        skip = max(start - 4 * chunk_first, 0)
        take = min(values.numel() - skip, count - written)
        out[written : written + take] = values[skip : skip + take]
        written += take
    return out


def noise_forward(
    numel: int, seed: int, device: torch.device, dtype: torch.dtype, start: int = 0
) -> torch.Tensor:
    """Stream elements ``start .. start + numel - 1`` of ``seed`` as a flat tensor of ``dtype``:
    the fused backends' ``noise_forward``, in integer tensor ops."""
    return normal_stream(seed, start, numel, device=device).to(dtype)


@torch.library.custom_op("pini_kernels::reference_noise", mutates_args=())
def _reference_noise(seed: torch.Tensor, count: int, device: torch.device) -> torch.Tensor:
    """normal_stream as an op: opaque to torch.compile, which would otherwise inline (and take
    minutes to compile) the ten Philox rounds, and keyed by a tensor so seeds are not guarded."""
    return normal_stream(stream_key_value(seed), 0, count, device)


@_reference_noise.register_fake
def _reference_noise_fake(seed, count, device):
    return torch.empty(count, dtype=torch.float32, device=device)


def noise(
    shape, *, seed: int | torch.Tensor, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ``eps`` stream of ``seed`` as a tensor of ``shape`` (row-major)."""
    shape = torch.Size(shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    stream = _reference_noise(stream_key(seed), shape.numel(), device)
    return stream.view(shape).to(dtype)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fused_inject(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    *,
    seed: int | torch.Tensor,
    num_samples: int | None = None,
    multiply: bool = False,
) -> torch.Tensor:
    """``x + (mu + sigma * eps)`` or ``x * (mu + sigma * eps)``, differentiable by autograd.

    x: (*S); mu, sigma: broadcastable to S. Returns (*S), or (num_samples, *S) when
    ``num_samples`` is an int; the dtype is the promotion of the inputs' dtypes.
    """
    samples = 1 if num_samples is None else num_samples
    compute = _compute_dtype(x, mu, sigma)
    out_dtype = result_dtype(x, mu, sigma)
    eps = noise((samples, *x.shape), seed=seed, device=x.device).to(compute)
    sample_noise = mu.to(compute) + sigma.to(compute) * eps
    out = x.to(compute) * sample_noise if multiply else x.to(compute) + sample_noise
    out = out.to(out_dtype)
    return out[0] if num_samples is None else out


def _noisy_features(
    features: torch.Tensor,
    noise_params: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    seed: int | torch.Tensor,
    num_samples: int,
    multiply: bool,
    compute: torch.dtype,
) -> torch.Tensor:
    """(num_samples, N, D) noisy features in ``compute`` dtype (a broadcast view without noise).

    features: (N, D), shared by every sample, or (num_samples, N, D), one set per sample. The
    noise is drawn over (num_samples, N, D) either way; mu and sigma broadcast to (N, D).
    """
    rows_shape = features.shape[-2:]
    if noise_params is None:
        return features.to(compute).expand(num_samples, *rows_shape)
    mu, sigma = noise_params
    eps = noise((num_samples, *rows_shape), seed=seed, device=features.device).to(compute)
    sample_noise = mu.to(compute) + sigma.to(compute) * eps
    return features.to(compute) * sample_noise if multiply else features.to(compute) + sample_noise


def _normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalize the last dim like F.normalize: v / max(|v|, 1e-12)."""
    return features / features.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)


def noisy_cosine_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    image_noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    text_noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    multiply: bool = False,
    num_samples: int = 1,
    seed: int | torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(num_samples, B, C) logits ``logit_scale * <z/|z|, t/|t|>`` of noisy features.

    image_features: (B, D), noise broadcastable to (B, D), drawn from the stream of ``seed``.
    text_features: (C, D) shared by every sample, or (num_samples, C, D) with sample ``s`` using
    ``text_features[s]``; noise broadcastable to (C, D), drawn from the stream of ``seed + 1``
    over (num_samples, C, D).
    Computed in float32 (float64 if any input is), returned in ``out_dtype``.
    """
    tensors = [image_features, text_features]
    for pair in (image_noise, text_noise):
        tensors += list(pair or ())
    compute = _compute_dtype(*tensors)
    image = _noisy_features(
        image_features,
        image_noise,
        seed=seed,
        num_samples=num_samples,
        multiply=multiply,
        compute=compute,
    )
    text = _noisy_features(
        text_features,
        text_noise,
        seed=seed + 1,
        num_samples=num_samples,
        multiply=multiply,
        compute=compute,
    )
    if isinstance(logit_scale, torch.Tensor):
        logit_scale = logit_scale.to(compute)
    logits = logit_scale * (_normalize(image) @ _normalize(text).transpose(-1, -2))
    return logits.to(out_dtype or image_features.dtype)


def noisy_cross_entropy(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    target: torch.Tensor,
    *,
    image_noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    text_noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    multiply: bool = False,
    num_samples: int = 1,
    seed: int | torch.Tensor,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """PiNI's loss (Eq. 13): F.cross_entropy over the noisy cosine logits of every sample.

    target: (B,) class indices. Returns a float32 scalar for "mean" (over samples and batch) and
    "sum", or (num_samples, B) for "none" (float64 if any input is float64).
    """
    logits = noisy_cosine_logits(
        image_features,
        text_features,
        logit_scale,
        image_noise=image_noise,
        text_noise=text_noise,
        multiply=multiply,
        num_samples=num_samples,
        seed=seed,
        out_dtype=torch.float64 if image_features.dtype == torch.float64 else torch.float32,
    )
    samples, batch, classes = logits.shape
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(samples * batch, classes),
        target.long().repeat(samples),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.view(samples, batch) if reduction == "none" else loss
