"""fused_inject in Triton: ``out[s] = x (+ or *) (mu + sigma * eps[s])`` for each noise sample.

Forward reads ``x``, ``mu`` and ``sigma`` once and writes every sample; ``eps`` is generated in
registers from the seed and never stored. Backward regenerates ``eps`` from the same seed and
element indices, writes ``grad_x`` (summed over samples) and one row of fp32 partial sums of the
parameter gradients per program; a deterministic ``sum`` finishes the reduction (no atomics).

Data layout: see ``pini_kernels/_layout.py``. ``x`` is viewed as ``rows x width``; the parameter of
column ``c`` is ``c // inner``; sample ``s`` of flat element ``i`` is stream element ``s * N + i``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import result_dtype
from .._layout import BroadcastLayout, broadcast_layout, like_input, reduce_partial_sums
from .launch import elementwise_config, new_buffer
from .noise import normal_tile


@triton.jit
def _inject_forward_kernel(
    x_ptr, mu_ptr, sigma_ptr, out_ptr,
    seed, num_samples, numel, rows, width, inner, rows_per_program,
    HAS_INNER: tl.constexpr, MULTIPLY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    column_start = tl.program_id(0).to(tl.int64) * BLOCK
    row_start = tl.program_id(1).to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    lanes = tl.arange(0, BLOCK)
    columns = column_start + lanes
    mask = columns < width
    param_index = columns // inner if HAS_INNER else columns
    mu = tl.load(mu_ptr + param_index, mask=mask, other=0.0).to(tl.float32)
    sigma = tl.load(sigma_ptr + param_index, mask=mask, other=0.0).to(tl.float32)
    for row in range(row_start, row_end):
        base = row * width + column_start
        x = tl.load(x_ptr + base + lanes, mask=mask, other=0.0).to(tl.float32)
        first = base  # int64 stream index of this block's first element, sample by sample
        for _ in range(num_samples):
            eps = normal_tile(seed, first, ALIGNED, BLOCK)
            sample_noise = mu + sigma * eps
            out = x * sample_noise if MULTIPLY else x + sample_noise
            tl.store(out_ptr + first + lanes, out.to(out_ptr.dtype.element_ty), mask=mask)
            first += numel


@triton.jit
def _inject_backward_kernel(
    grad_out_ptr, x_ptr, mu_ptr, sigma_ptr, grad_x_ptr, partial_mu_ptr, partial_sigma_ptr,
    seed, num_samples, numel, rows, width, inner, rows_per_program,
    HAS_INNER: tl.constexpr, MULTIPLY: tl.constexpr, ALIGNED: tl.constexpr,
    NEED_X_GRAD: tl.constexpr, NEED_PARAM_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    column_start = tl.program_id(0).to(tl.int64) * BLOCK
    row_chunk = tl.program_id(1).to(tl.int64)
    row_start = row_chunk * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    lanes = tl.arange(0, BLOCK)
    columns = column_start + lanes
    mask = columns < width
    param_index = columns // inner if HAS_INNER else columns
    mu = tl.load(mu_ptr + param_index, mask=mask, other=0.0).to(tl.float32)
    sigma = tl.load(sigma_ptr + param_index, mask=mask, other=0.0).to(tl.float32)
    mu_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    sigma_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(row_start, row_end):
        base = row * width + column_start
        x_grad = tl.zeros((BLOCK,), dtype=tl.float32)
        if MULTIPLY:
            x = tl.load(x_ptr + base + lanes, mask=mask, other=0.0).to(tl.float32)
        first = base  # int64 stream index of this block's first element, sample by sample
        for _ in range(num_samples):
            grad = tl.load(grad_out_ptr + first + lanes, mask=mask, other=0.0).to(tl.float32)
            if MULTIPLY:
                eps = normal_tile(seed, first, ALIGNED, BLOCK)
                x_grad += grad * (mu + sigma * eps)
                grad_x_product = grad * x
                mu_grad += grad_x_product
                sigma_grad += grad_x_product * eps
            else:
                x_grad += grad
                if NEED_PARAM_GRAD:
                    eps = normal_tile(seed, first, ALIGNED, BLOCK)
                    mu_grad += grad
                    sigma_grad += grad * eps
            first += numel
        if NEED_X_GRAD:
            tl.store(grad_x_ptr + base + lanes, x_grad.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if NEED_PARAM_GRAD:
        partial_offsets = row_chunk * width + columns
        tl.store(partial_mu_ptr + partial_offsets, mu_grad, mask=mask)
        tl.store(partial_sigma_ptr + partial_offsets, sigma_grad, mask=mask)


def _flat_params(
    x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
) -> tuple[BroadcastLayout, torch.Size, torch.Tensor, torch.Tensor]:
    """The layout, the common parameter shape, and mu/sigma as contiguous flat tensors."""
    param_shape = torch.broadcast_shapes(mu.shape, sigma.shape)
    layout = broadcast_layout(x.shape, param_shape)
    if layout.expand:
        param_shape = x.shape
    mu_flat = mu.expand(param_shape).contiguous().view(-1)
    sigma_flat = sigma.expand(param_shape).contiguous().view(-1)
    return layout, param_shape, mu_flat, sigma_flat


def inject_forward(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    seed: int,
    num_samples: int,
    multiply: bool,
) -> torch.Tensor:
    """x: (*S); mu, sigma: broadcastable to S. Returns (num_samples, *S) in the promoted dtype."""
    out_dtype = result_dtype(x, mu, sigma)
    out = new_buffer((num_samples, *x.shape), out_dtype, x.device)
    numel = x.numel()
    if numel == 0:
        return out
    layout, _, mu_flat, sigma_flat = _flat_params(x, mu, sigma)
    config = elementwise_config(layout.width, layout.rows, x.device)
    _inject_forward_kernel[config.grid](
        x.contiguous(), mu_flat, sigma_flat, out,
        seed, num_samples, numel, layout.rows, layout.width, layout.inner,
        config.rows_per_program,
        HAS_INNER=layout.inner > 1, MULTIPLY=multiply, ALIGNED=layout.width % 4 == 0,
        BLOCK=config.block, num_warps=config.num_warps,
    )  # fmt: skip
    return out


def inject_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    seed: int,
    num_samples: int,
    multiply: bool,
    need_x_grad: bool,
    need_param_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """grad_out: (num_samples, *S). Returns (grad_x, grad_mu, grad_sigma) in the inputs' shapes
    and dtypes, None for the ones not asked for."""
    numel = x.numel()
    layout, param_shape, mu_flat, sigma_flat = _flat_params(x, mu, sigma)
    grad_x = new_buffer(x.shape, x.dtype, x.device) if need_x_grad else None
    if numel == 0:
        if grad_x is None and not need_param_grad:
            return None, None, None
        mu_grad = torch.zeros(param_shape, dtype=torch.float32, device=x.device)
        return _finish(grad_x, mu_grad, torch.zeros_like(mu_grad), x, mu, sigma, need_param_grad)
    config = elementwise_config(layout.width, layout.rows, x.device)
    if need_param_grad:
        partial_shape = (config.row_chunks, layout.width)
        partial_mu = new_buffer(partial_shape, torch.float32, x.device)
        partial_sigma = new_buffer(partial_shape, torch.float32, x.device)
    else:
        partial_mu = partial_sigma = mu_flat  # not written; any pointer will do
    grad_out = grad_out.contiguous()
    x_data = x.contiguous() if multiply else grad_out  # add mode never reads x
    _inject_backward_kernel[config.grid](
        grad_out, x_data, mu_flat, sigma_flat,
        grad_x if need_x_grad else x, partial_mu, partial_sigma,
        seed, num_samples, numel, layout.rows, layout.width, layout.inner,
        config.rows_per_program,
        HAS_INNER=layout.inner > 1, MULTIPLY=multiply, ALIGNED=layout.width % 4 == 0,
        NEED_X_GRAD=need_x_grad, NEED_PARAM_GRAD=need_param_grad,
        BLOCK=config.block, num_warps=config.num_warps,
    )  # fmt: skip
    if not need_param_grad:
        return like_input(grad_x, x), None, None
    mu_grad = reduce_partial_sums(partial_mu, layout).view(param_shape)
    sigma_grad = reduce_partial_sums(partial_sigma, layout).view(param_shape)
    return _finish(grad_x, mu_grad, sigma_grad, x, mu, sigma, need_param_grad)


def _finish(grad_x, mu_grad, sigma_grad, x, mu, sigma, need_param_grad):
    """Gradients in their inputs' shapes, dtypes and layouts."""
    grad_x = like_input(grad_x, x)
    if not need_param_grad:
        return grad_x, None, None
    return (
        grad_x,
        like_input(mu_grad.sum_to_size(mu.shape), mu),
        like_input(sigma_grad.sum_to_size(sigma.shape), sigma),
    )
