"""Comparison helpers that say where and by how much two tensors differ."""

from __future__ import annotations

import torch

# (dtype, atol, rtol) for fused backends against the reference, which computes in float32 too:
# float32 differs by transcendental rounding in the noise; half types by one rounding at the cast.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

_worst_errors: dict[str, float] = {}


def record_error(key: str, error: float) -> None:
    """Track the largest error per key; conftest.py prints them in the terminal summary."""
    _worst_errors[key] = max(_worst_errors.get(key, 0.0), error)


def worst_errors() -> dict[str, float]:
    return dict(_worst_errors)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor"
) -> float:
    """Like torch.testing.assert_close, but reports the worst element and NaN/inf mismatches.

    Returns the largest absolute error (0 for empty tensors).
    """
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if actual.numel() == 0:
        return 0.0
    a = actual.detach().to(torch.float64).cpu().contiguous()
    e = expected.detach().to(torch.float64).cpu().contiguous()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    if nan_mismatch.any():
        index = tuple(int(i) for i in nan_mismatch.nonzero()[0])
        raise AssertionError(
            f"{name}: NaN mismatch at {index}: got {a[index].item()}, expected {e[index].item()} "
            f"({int(nan_mismatch.sum())} elements)"
        )
    inf_mismatch = torch.isinf(a) & (a != e)
    if inf_mismatch.any():
        index = tuple(int(i) for i in inf_mismatch.nonzero()[0])
        raise AssertionError(
            f"{name}: inf mismatch at {index}: got {a[index].item()}, expected {e[index].item()}"
        )
    finite = torch.isfinite(a) & torch.isfinite(e)
    error = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    allowed = atol + rtol * e.abs()
    excess = torch.where(finite, error - allowed, torch.full_like(a, -1.0))
    worst = int(excess.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    if excess.view(-1)[worst] > 0:
        bad = int((excess > 0).sum())
        raise AssertionError(
            f"{name}: {bad} of {a.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"worst at {index}: got {a[index].item()!r}, expected {e[index].item()!r}, "
            f"|diff|={error[index].item():.3g}"
        )
    return float(error.max())
