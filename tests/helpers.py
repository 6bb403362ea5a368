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


def inject_forward_backward(
    fn, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, grad_weights: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``out = fn(x, mu, sigma, **kwargs)``, then backward of ``sum(out * grad_weights)``.

    Returns ``out`` and the gradients of ``x``, ``mu`` and ``sigma`` (fresh leaves, so the
    caller's tensors are left alone).
    """
    x, mu, sigma = (t.detach().clone().requires_grad_(True) for t in (x, mu, sigma))
    out = fn(x, mu, sigma, **kwargs)
    (out.float() * grad_weights).sum().backward()
    return out, x.grad, mu.grad, sigma.grad


def compare_inject_with_reference(
    backend: str,
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    *,
    mode: str,
    num_samples: int | None,
    seed: int = 1234,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_inject on ``backend`` against the reference: the output and all three gradients.

    x: (*S); mu, sigma: broadcastable to S. Returns the backend's (out, grad_x, grad_mu,
    grad_sigma); out is (*S), or (num_samples, *S) when num_samples is an int.
    """
    import pini_kernels  # here, not at the top: conftest.py must set the environment first

    dtype = torch.promote_types(torch.promote_types(x.dtype, mu.dtype), sigma.dtype)
    atol, rtol = TOLERANCES[max((x.dtype, dtype), key=lambda d: TOLERANCES[d][0])]
    out_shape = x.shape if num_samples is None else (num_samples, *x.shape)
    grad_weights = torch.randn(out_shape, device=x.device)
    kwargs = dict(mode=mode, num_samples=num_samples, seed=seed)
    got = inject_forward_backward(
        pini_kernels.fused_inject, x, mu, sigma, grad_weights, backend=backend, **kwargs
    )
    want = inject_forward_backward(
        pini_kernels.fused_inject, x, mu, sigma, grad_weights, backend="reference", **kwargs
    )
    assert got[0].shape == out_shape
    names = ("out", "grad_x", "grad_mu", "grad_sigma")
    for name, actual, expected in zip(names, got, want, strict=True):
        # Gradients sum over samples and broadcast dims: allow rounding to grow with the count.
        scale = 1.0 if name == "out" else max(1.0, (expected.abs().max().item()))
        error = assert_close(actual, expected, atol=atol * scale, rtol=rtol, name=name)
        record_error(f"inject {backend} x:{x.dtype} {name}", error)
    return got


def loss_and_grads(tensors, logit_scale, target, **options) -> list[torch.Tensor]:
    """``noisy_cross_entropy`` of ``tensors`` (image, text, image_mu, image_sigma, text_mu,
    text_sigma: noise on both sides) with ``options``, and its gradients: [loss, *six grads]."""
    import pini_kernels  # here, not at the top: conftest.py must set the environment first

    image, text, image_mu, image_sigma, text_mu, text_sigma = tensors
    noise = {"image_noise": (image_mu, image_sigma), "text_noise": (text_mu, text_sigma)}
    loss = pini_kernels.noisy_cross_entropy(image, text, logit_scale, target, **noise, **options)
    return [loss, *torch.autograd.grad(loss, tensors)]


def stream_generator(backend: str):
    """A backend's ``noise_forward(count, seed, device, dtype, start=0)``: stream elements
    ``start .. start + count - 1`` of ``seed`` as a flat (count,) tensor of ``dtype``."""
    # Imported here, not at the top: conftest.py must set the environment first.
    if backend == "triton":
        from pini_kernels.triton.noise_stream import noise_forward
    elif backend in ("cpu", "cuda"):
        from pini_kernels.native import noise_forward
    elif backend == "reference":
        from pini_kernels.reference import noise_forward
    else:
        raise ValueError(f"backend must be triton, cpu, cuda or reference, got {backend!r}")
    return noise_forward


def record_backward_probabilities(monkeypatch, backend: str) -> list[torch.Tensor]:
    """Records, for every call of ``backend``'s ``loss_grad`` kernel (backward's recompute of a
    "none" loss), the probabilities ``exp(cosine * scale - lse)`` it works from: one (B, C)
    tensor per noise sample, in the returned list. On the native backends the loss's flow is one
    C++ op that calls the kernels itself; the Python flow runs the same kernels call for call
    (``test_native_loss_flow_equals_the_python_flow``) and is the one a test can watch."""
    from pini_kernels import kernel_tables

    kernels = kernel_tables.loss_kernels(backend)
    use_python_loss_flow(monkeypatch)
    seen: list[torch.Tensor] = []
    loss_grad = kernels.loss_grad

    def recording_loss_grad(cosines, lse, target, row_grad, scale, *rest):
        seen.append((cosines.clone(), lse.clone(), scale.clone()))
        loss_grad(cosines, lse, target, row_grad, scale, *rest)

    monkeypatch.setattr(kernels, "loss_grad", recording_loss_grad)
    return seen


def use_python_loss_flow(monkeypatch) -> None:
    """Runs the native backends' loss through the Python per-sample flow (Triton's) on their own
    kernels, instead of their one-op flow (csrc/loss_flow.cpp): the same kernels, call for call,
    which a test can watch or compare with the one-op flow."""
    from pini_kernels import kernel_tables

    monkeypatch.setattr(kernel_tables, "loss_flow_kernels", lambda backend: None)


def assert_probabilities_sum_to_one(seen, calls: int, *, factor: float = 4.0, floor: float = 1e-6):
    """Backward's probabilities (``record_backward_probabilities``) sum to one per row, by the
    relative rule of STYLE.md: their error is at most ``factor`` times that of plain PyTorch
    (float32 logsumexp of the same cosines), plus ``floor``. A GPU's approximate exp and log move
    the sums by a few float32 roundings; backward cosines that differ from forward's by 1e-7 at
    logit scale 100 move them by 1e-5, past the floor."""
    assert len(seen) == calls, f"loss_grad ran {len(seen)} times, expected {calls} (one a sample)"
    for sample, (cosines, lse, scale) in enumerate(seen):
        logits = cosines * scale
        sums = torch.exp(logits - lse[:, None]).sum(dim=1).double()
        plain = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True)).sum(dim=1)
        plain_error = float((plain.double() - 1).abs().max())
        error = float((sums - 1).abs().max())
        allowed = factor * plain_error + floor
        record_error("probability sums in backward", error)
        assert error <= allowed, (
            f"sample {sample}: probabilities sum to 1 within {error:.3g} > {allowed:.3g} "
            f"({factor} x plain PyTorch's {plain_error:.3g} + {floor})"
        )
