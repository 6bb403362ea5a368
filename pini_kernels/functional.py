"""The public functions of SPEC.md: argument checks, backend choice, then the op."""

from __future__ import annotations

import torch

from . import _checks, reference
from ._library import inject as _inject_op
from .backends import resolve_backend

__all__ = ["fused_inject", "noise"]


def noise(
    shape,
    *,
    seed: int | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """The ``eps`` stream of ``seed`` as a tensor of ``shape`` (row-major), N(0, 1) per element.

    Element ``k`` of the flattened tensor is lane ``k % 4`` of Triton's ``tl.randn4x(seed, k // 4)``
    on every backend, so ``fused_inject(x, mu, sigma, num_samples=m, seed=s)`` equals
    ``x + mu + sigma * noise((m, *x.shape), seed=s)``.
    """
    try:
        shape = torch.Size(shape)
    except (TypeError, ValueError):
        raise TypeError(
            f"shape must be a sequence of ints, got {_checks.describe(shape)}"
        ) from None
    if any(size < 0 for size in shape):
        raise ValueError(f"shape must have non-negative sizes, got {tuple(shape)}")
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    seed = _checks.check_seed(seed)
    if seed is None:
        seed = int(_checks.seed_tensor(None))
    device = torch.device("cpu") if device is None else torch.device(device)
    chosen = resolve_backend(backend, device)
    if chosen == "triton" and dtype != torch.float64:
        from .ops.noise import noise_forward

        return noise_forward(shape.numel(), seed, device, dtype).view(shape)
    return reference.noise(shape, seed=seed, device=device, dtype=dtype)


def fused_inject(
    x: torch.Tensor,
    mu: torch.Tensor | float,
    sigma: torch.Tensor | float,
    *,
    mode: str = "add",
    num_samples: int | None = None,
    seed: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Inject reparameterized Gaussian noise: ``x + (mu + sigma*eps)`` or ``x * (mu + sigma*eps)``.

    x: (*S) float tensor. mu, sigma: tensors (or numbers) broadcastable to S, e.g. a per-feature
    (D,), a per-row (B, D), or embeddings (L, D) shared by every leading index.
    mode: "add" or "mul". num_samples: None gives (*S); an int m gives (m, *S), m noise samples
    of the same x in one pass. seed: the noise stream's seed (None draws one from torch's default
    CPU generator). backend: see ``pini_kernels.available_backends()``.

    Differentiable in x, mu and sigma; gradients come back in their own shapes, summed over
    broadcast dimensions and samples. ``eps`` is regenerated in backward, never stored.
    """
    _checks.check_float_tensor("x", x, allow_float64=True)
    mu = _checks.as_tensor_like("mu", mu, x)
    sigma = _checks.as_tensor_like("sigma", sigma, x)
    _checks.check_float_tensor("mu", mu, allow_float64=True)
    _checks.check_float_tensor("sigma", sigma, allow_float64=True)
    multiply = _checks.check_mode(mode)
    samples = _checks.check_num_samples(num_samples, allow_none=True)
    _checks.check_same_device(x=x, mu=mu, sigma=sigma)
    _checks.check_broadcast_to("mu", mu, x.shape, "x")
    _checks.check_broadcast_to("sigma", sigma, x.shape, "x")
    _checks.check_total_elements(samples or 1, x.numel())
    seed = _checks.check_seed(seed)
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        if seed is None:
            seed = int(_checks.seed_tensor(None))
        return reference.fused_inject(
            x, mu, sigma, seed=seed, num_samples=samples, multiply=multiply
        )
    for name, tensor in (("x", x), ("mu", mu), ("sigma", sigma)):
        _checks.check_float_tensor(name, tensor, allow_float64=False)
    out = _inject_op(x, mu, sigma, _checks.seed_tensor(seed), samples or 1, multiply, chosen)
    return out.view(x.shape) if samples is None else out
