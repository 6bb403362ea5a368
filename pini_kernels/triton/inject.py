"""fused_inject in Triton: ``out[s] = x (+ or *) (mu + sigma * eps[s])`` for each noise sample.

Forward reads ``x``, ``mu`` and ``sigma`` once and writes every sample; ``eps`` is generated in
registers from the seed and never stored. Backward regenerates ``eps`` from the same seed and
element indices, writes ``grad_x`` (summed over samples) and one row of fp32 partial sums of the
parameter gradients per program, which ``pini_kernels/inject.py`` reduces (no atomics).

Data layout (``pini_kernels/inject.py``, ``BroadcastLayout``): ``x`` is viewed as
``rows x width``; the parameter of column ``c`` is ``c // inner``; sample ``s`` of flat element
``i`` is stream element ``s * N + i``. A program owns a block of columns and a chunk of rows,
which it walks a tile of rows at a time (``launch.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._host import new_buffer
from ..seeds import triton_seed_args
from .launch import elementwise_config
from .noise_stream import load_seed, normal_rows


@triton.jit
def _program_tile(
    mu_ptr,
    sigma_ptr,
    rows,
    width,
    inner,
    rows_per_program,
    HAS_INNER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """This program's block of columns and chunk of rows, and the columns' parameters in fp32:
    (first column, lanes, column mask, row chunk, first row, end row, mu, sigma)."""
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
    return column_start, lanes, mask, row_chunk, row_start, row_end, mu, sigma


# The two kernels' signatures are written a few arguments to a line (# fmt: skip): backward takes
# forward's settings, in the same order (``_launch``), after its own pointers. Both walk their
# chunk of rows ROWS rows at a time: a (ROWS, BLOCK) tile, its rows' stream indices and offsets.
@triton.jit(do_not_specialize=["seed"])
def _inject_forward_kernel(
    x_ptr, mu_ptr, sigma_ptr, out_ptr,
    seed, num_samples, numel, rows, width, inner, rows_per_program,
    SEED_IN_MEMORY: tl.constexpr, HAS_INNER: tl.constexpr, MULTIPLY: tl.constexpr,
    ALIGNED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    column_start, lanes, mask, _row_chunk, row_start, row_end, mu, sigma = _program_tile(
        mu_ptr, sigma_ptr, rows, width, inner, rows_per_program, HAS_INNER, BLOCK
    )
    seed = load_seed(seed, SEED_IN_MEMORY)
    for tile_start in range(row_start, row_end, ROWS):
        row = tile_start + tl.arange(0, ROWS)
        tile_mask = (row < row_end)[:, None] & mask[None, :]
        first = row * width + column_start  # int64 stream index of each row's first element
        x = tl.load(x_ptr + first[:, None] + lanes[None, :], mask=tile_mask, other=0.0)
        x = x.to(tl.float32)
        for _ in range(num_samples):
            eps = normal_rows(seed, first, ALIGNED, BLOCK)
            sample_noise = mu[None, :] + sigma[None, :] * eps
            out = x * sample_noise if MULTIPLY else x + sample_noise
            offsets = first[:, None] + lanes[None, :]
            tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=tile_mask)
            first += numel  # the next sample's elements


@triton.jit(do_not_specialize=["seed"])
def _inject_backward_kernel(
    grad_out_ptr, x_ptr, mu_ptr, sigma_ptr, grad_x_ptr, partial_mu_ptr, partial_sigma_ptr,
    seed, num_samples, numel, rows, width, inner, rows_per_program,
    SEED_IN_MEMORY: tl.constexpr, HAS_INNER: tl.constexpr, MULTIPLY: tl.constexpr,
    ALIGNED: tl.constexpr, NEED_X_GRAD: tl.constexpr, NEED_PARAM_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    column_start, lanes, mask, row_chunk, row_start, row_end, mu, sigma = _program_tile(
        mu_ptr, sigma_ptr, rows, width, inner, rows_per_program, HAS_INNER, BLOCK
    )
    seed = load_seed(seed, SEED_IN_MEMORY)
    mu_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    sigma_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile_start in range(row_start, row_end, ROWS):
        row = tile_start + tl.arange(0, ROWS)
        tile_mask = (row < row_end)[:, None] & mask[None, :]
        x_offsets = row[:, None] * width + column_start + lanes[None, :]
        x_grad = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        if MULTIPLY:
            x = tl.load(x_ptr + x_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        first = row * width + column_start  # int64 stream index of each row's first element
        for _ in range(num_samples):
            offsets = first[:, None] + lanes[None, :]
            grad = tl.load(grad_out_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
            if MULTIPLY:
                eps = normal_rows(seed, first, ALIGNED, BLOCK)
                x_grad += grad * (mu[None, :] + sigma[None, :] * eps)
                grad_x_product = grad * x
                mu_grad += tl.sum(grad_x_product, axis=0)
                sigma_grad += tl.sum(grad_x_product * eps, axis=0)
            else:
                x_grad += grad
                if NEED_PARAM_GRAD:
                    eps = normal_rows(seed, first, ALIGNED, BLOCK)
                    mu_grad += tl.sum(grad, axis=0)
                    sigma_grad += tl.sum(grad * eps, axis=0)
            first += numel  # the next sample's elements
        if NEED_X_GRAD:
            x_grad = x_grad.to(grad_x_ptr.dtype.element_ty)
            tl.store(grad_x_ptr + x_offsets, x_grad, mask=tile_mask)
    if NEED_PARAM_GRAD:
        partial_offsets = row_chunk * width + column_start + lanes
        tl.store(partial_mu_ptr + partial_offsets, mu_grad, mask=mask)
        tl.store(partial_sigma_ptr + partial_offsets, sigma_grad, mask=mask)


def _launch(kernel, pointers, config, x, seed, num_samples, multiply, rows, width, inner, **flags):
    """Launch one of the kernels on its ``pointers`` and the settings both take."""
    seed, seed_in_memory = triton_seed_args(seed)
    kernel[config.grid](
        *pointers,
        *(seed, num_samples, x.numel(), rows, width, inner, config.rows_per_program),
        SEED_IN_MEMORY=seed_in_memory,
        HAS_INNER=inner > 1,
        MULTIPLY=multiply,
        ALIGNED=width % 4 == 0,
        ROWS=config.rows_per_tile,
        BLOCK=config.block,
        **config.launch_options,
        **flags,
    )


def inject_forward(x, mu, sigma, seed, num_samples, multiply, rows, width, inner, out) -> None:
    """Writes ``out``: (num_samples, *S). x: contiguous (*S), viewed as rows x width; mu, sigma:
    contiguous (width // inner,), any float dtype; seed: an int or a 0-d int64 tensor on x's
    device."""
    config = elementwise_config(width, rows, x.device, aligned=width % 4 == 0)
    settings = (seed, num_samples, multiply, rows, width, inner)
    _launch(_inject_forward_kernel, (x, mu, sigma, out), config, x, *settings)


def inject_backward(
    grad_out, x, mu, sigma, seed, num_samples, multiply, rows, width, inner, grad_x, need_param_grad
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Writes ``grad_x`` (x's shape and dtype) unless it is None. grad_out: contiguous
    (num_samples, *S). Returns the (row_chunks, width) fp32 partial sums of mu's and sigma's
    gradients, one row per chunk of rows, when ``need_param_grad``."""
    config = elementwise_config(width, rows, x.device, aligned=width % 4 == 0)
    if need_param_grad:
        partial_mu = new_buffer((config.row_chunks, width), torch.float32, x.device)
        partial_sigma = new_buffer((config.row_chunks, width), torch.float32, x.device)
    else:
        partial_mu = partial_sigma = mu  # not written; any pointer will do
    x_data = x.contiguous() if multiply else grad_out  # add mode never reads x
    grad_x_data = x_data if grad_x is None else grad_x
    pointers = (grad_out, x_data, mu, sigma, grad_x_data, partial_mu, partial_sigma)
    _launch(
        *(_inject_backward_kernel, pointers, config, x),
        *(seed, num_samples, multiply, rows, width, inner),
        NEED_X_GRAD=grad_x is not None,
        NEED_PARAM_GRAD=need_param_grad,
    )
    return (partial_mu, partial_sigma) if need_param_grad else None
