"""The "cpu" and "cuda" backends: glue to the compiled kernels of csrc/ (the ``pini_native`` op
library, ``pini_kernels._C``), one module for both (the dispatcher runs the kernels of the tensors'
device).

The same functions, taking the same arguments, as the Triton backend: ``noise_forward``
(``triton/noise_stream.py``), ``inject_forward`` / ``inject_backward`` (``triton/inject.py``),
``normalize`` / ``normalize_backward`` / ``loss_stats`` / ``loss_grad`` (``triton/cosine.py``);
the op modules (``noise_stream.py``, ``inject.py``, ``cosine.py``) say what each must do. The
compiled ops write into buffers allocated here or by the op modules, so the tests' NaN poisoning
covers them too, and check their arguments (``csrc/checks.h``).
"""

from __future__ import annotations

import torch

from ._host import new_buffer

# Rows per chunk of the backward's parameter partial sums: each chunk adds one row of `width`
# floats to reduce. CPU: a task is a 2048-column tile (csrc/cpu/kernels.cpp) times these rows;
# CUDA: a thread owns 4 columns of a chunk, so smaller chunks give more threads.
ROWS_PER_CHUNK = {"cpu": 64, "cuda": 8}
# The CPU row kernels keep a row's noise in a heap buffer: any width works.
MAX_FEATURE_DIM = 1 << 20


def _ops():
    from . import _C  # noqa: F401  (registers torch.ops.pini_native)

    return torch.ops.pini_native


def _seed_arg(seed: int) -> int:
    """The seed as the int64 the op schema takes (a uint64 key: text seeds may reach 2^63)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def noise_forward(
    numel: int, seed: int, device: torch.device, dtype: torch.dtype, start: int = 0
) -> torch.Tensor:
    """Stream elements ``start .. start + numel - 1`` of ``seed`` as a flat tensor of ``dtype``."""
    out = new_buffer(numel, torch.float32, device)
    if numel:
        _ops().noise(_seed_arg(seed), start, out)
    return out if dtype == torch.float32 else out.to(dtype)


def inject_forward(x, mu, sigma, seed, num_samples, multiply, rows, width, inner, out) -> None:
    """See triton/inject.py's inject_forward; the compiled kernels read fp32 parameters."""
    _ops().inject_forward(
        x, mu.to(torch.float32), sigma.to(torch.float32), _seed_arg(seed), num_samples, multiply,
        rows, width, inner, out,
    )  # fmt: skip


def inject_backward(
    grad_out, x, mu, sigma, seed, num_samples, multiply, rows, width, inner, grad_x,
    need_param_grad,
):  # fmt: skip
    """See triton/inject.py's inject_backward; here a chunk is ROWS_PER_CHUNK rows."""
    rows_per_chunk = ROWS_PER_CHUNK[x.device.type]
    row_chunks = -(-rows // rows_per_chunk)
    partial_mu = partial_sigma = None
    if need_param_grad:
        partial_mu = new_buffer((row_chunks, width), torch.float32, x.device)
        partial_sigma = new_buffer((row_chunks, width), torch.float32, x.device)
    x_data = x.contiguous() if multiply else x  # add mode never reads x (maybe a stand-in)
    _ops().inject_backward(
        grad_out, x_data, mu.to(torch.float32), sigma.to(torch.float32), _seed_arg(seed),
        num_samples, multiply, rows, width, inner, rows_per_chunk, grad_x, partial_mu,
        partial_sigma,
    )  # fmt: skip
    return (partial_mu, partial_sigma) if need_param_grad else None


def normalize(features, mu, sigma, seed, stream_offset, multiply, unit, norm) -> None:
    """See triton/cosine.py's normalize."""
    _ops().noisy_normalize(
        features, mu, sigma, _seed_arg(seed), stream_offset, multiply, unit, norm
    )


def normalize_backward(
    features, mu, sigma, seed, stream_offset, multiply, unit, norm, grad_unit, grad_x, grad_mu,
    grad_sigma,
) -> None:  # fmt: skip
    """See triton/cosine.py's normalize_backward."""
    _ops().noisy_normalize_backward(
        features, mu, sigma, _seed_arg(seed), stream_offset, multiply, unit, norm, grad_unit,
        grad_x, grad_mu, grad_sigma,
    )  # fmt: skip


def loss_stats(image_unit, text_unit, target, scale, lse, target_logit, logit_sum) -> None:
    """See triton/cosine.py's loss_stats: here one BLAS product, then the row statistics."""
    cosine = torch.mm(image_unit, text_unit.t())
    _ops().cross_entropy_stats(cosine, target, scale, lse, target_logit, logit_sum)


def loss_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad) -> None:
    """See triton/cosine.py's loss_grad."""
    _ops().cross_entropy_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad)
