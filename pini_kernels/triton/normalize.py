"""Noise and L2-normalize feature rows in Triton: ``normalize`` / ``normalize_backward`` of
``kernel_tables.LogitsKernels`` (``triton/logits_loss.py`` holds the rest of the table and takes
them from here). Tiles of whole feature rows, the noise regenerated from the seed, normalized as
F.normalize does, and the gradient of that (``_noisy_normalize_kernel`` and its backward).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..seeds import triton_seed_args
from .launch import MIN_BLOCK
from .noise_stream import load_seed, normal_rows

# Features are normalized like F.normalize: v / max(|v|, NORM_FLOOR), its default eps.
NORM_FLOOR = tl.constexpr(1e-12)
# One program holds a whole feature row, 4 elements a thread (ROW_TILE_ELEMENTS_PER_THREAD) up to
# 16 warps: 2048 elements. CLIP's widths are 512-1280. Wider rows cost registers the memory-bound
# budget does not have: on sm_90 a 4096-wide row took up to 109 registers a thread and 8192 or
# 16384 spilled (32 to 3,224 bytes; ptxas -v, tests/gpu_compile_check.py --resources, which
# compiles this width). Wider rows would need a loop over D: the ops refuse them on this backend
# with one line (the "cpu" and "cuda" backends take them).
MAX_FEATURE_DIM = 2048
# Row-wise kernels (noise + normalization) work on tiles of whole rows, at least this many
# elements: one 512-wide CLIP row per program on a GPU; under the interpreter, wide tiles cut the
# per-program overhead.
ROW_TILE_ELEMENTS = 16384 if triton_interpreting() else 512
# Elements of a tile per GPU thread (warps = tile / (32 * this), at most ROW_TILE_MAX_WARPS): each
# element of noise keeps a Philox state and a Box-Muller pair live, so 4 keep the row kernels
# under ~96 registers (ptxas -v, tests/gpu_compile_check.py --resources); at 16 they took 224+.
ROW_TILE_ELEMENTS_PER_THREAD = 4
ROW_TILE_MAX_WARPS = 16


@triton.jit
def _load_noise_param(param_ptr, row_stride, col_stride, row, columns, mask):
    """mu or sigma of a (ROWS, BLOCK) tile in fp32, read through its strides (0 on broadcast
    dimensions)."""
    offsets = row[:, None] * row_stride + columns[None, :] * col_stride
    return tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


# The two kernels' signatures are written a few arguments to a line (# fmt: skip): backward takes
# forward's arguments, in the same order, plus its gradients (``_launch_row_kernel``).
@triton.jit(do_not_specialize=["seed"])
def _noisy_normalize_kernel(
    x_ptr, x_row_stride, mu_ptr, mu_row_stride, mu_col_stride,
    sigma_ptr, sigma_row_stride, sigma_col_stride, unit_ptr, norm_ptr,
    seed, stream_offset, rows, dim,
    SEED_IN_MEMORY: tl.constexpr, HAS_NOISE: tl.constexpr, MULTIPLY: tl.constexpr,
    ALIGNED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """For ROWS rows: unit = v / max(|v|, floor), v = x (+ or *) (mu + sigma * eps); norm = |v|."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = row < rows
    columns = tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (columns < dim)[None, :]
    x_offsets = row[:, None] * x_row_stride + columns[None, :]
    value = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        mu = _load_noise_param(mu_ptr, mu_row_stride, mu_col_stride, row, columns, mask)
        sigma = _load_noise_param(sigma_ptr, sigma_row_stride, sigma_col_stride, row, columns, mask)
        eps = normal_rows(
            load_seed(seed, SEED_IN_MEMORY), stream_offset + row * dim, ALIGNED, BLOCK
        )
        sample_noise = mu + sigma * eps
        value = value * sample_noise if MULTIPLY else value + sample_noise
        value = tl.where(mask, value, 0.0)
    norm = tl.sqrt(tl.sum(value * value, axis=1))
    # NaN-propagating: a NaN row stays NaN (as F.normalize's clamp_min), not NaN / floor.
    unit = value / tl.maximum(norm, NORM_FLOOR, propagate_nan=tl.PropagateNan.ALL)[:, None]
    tl.store(unit_ptr + row[:, None] * dim + columns[None, :], unit, mask=mask)
    tl.store(norm_ptr + row, norm, mask=row_mask)


@triton.jit(do_not_specialize=["seed"])
def _noisy_normalize_backward_kernel(
    x_ptr, x_row_stride, mu_ptr, mu_row_stride, mu_col_stride,
    sigma_ptr, sigma_row_stride, sigma_col_stride, unit_ptr, norm_ptr,
    grad_unit_ptr, grad_x_ptr, grad_mu_ptr, grad_sigma_ptr,
    seed, stream_offset, rows, dim,
    SEED_IN_MEMORY: tl.constexpr, HAS_NOISE: tl.constexpr, MULTIPLY: tl.constexpr,
    ALIGNED: tl.constexpr, NEED_X_GRAD: tl.constexpr, NEED_PARAM_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Adds this sample's gradients for x, mu, sigma (fp32 (rows, D) accumulators) given the
    gradient of the normalized rows."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = row < rows
    columns = tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (columns < dim)[None, :]
    offsets = row[:, None] * dim + columns[None, :]
    unit = tl.load(unit_ptr + offsets, mask=mask, other=0.0)
    grad_unit = tl.load(grad_unit_ptr + offsets, mask=mask, other=0.0)
    norm = tl.load(norm_ptr + row, mask=row_mask, other=1.0)[:, None]
    # d(v / max(|v|, floor)) / dv: project out the radial part, unless the floor was active (then
    # v / floor is linear in v). Both branches divide by max(|v|, floor): no inf at zero rows.
    radial = tl.sum(unit * grad_unit, axis=1)[:, None]
    divisor = tl.maximum(norm, NORM_FLOOR, propagate_nan=tl.PropagateNan.ALL)  # NaN rows stay NaN
    grad_value = tl.where(norm > NORM_FLOOR, grad_unit - unit * radial, grad_unit) / divisor
    if HAS_NOISE and (MULTIPLY or NEED_PARAM_GRAD):
        eps = normal_rows(
            load_seed(seed, SEED_IN_MEMORY), stream_offset + row * dim, ALIGNED, BLOCK
        )
    if NEED_X_GRAD:
        if HAS_NOISE and MULTIPLY:
            mu = _load_noise_param(mu_ptr, mu_row_stride, mu_col_stride, row, columns, mask)
            sigma = _load_noise_param(
                sigma_ptr, sigma_row_stride, sigma_col_stride, row, columns, mask
            )
            x_grad = grad_value * (mu + sigma * eps)
        else:
            x_grad = grad_value
        previous = tl.load(grad_x_ptr + offsets, mask=mask, other=0.0)
        tl.store(grad_x_ptr + offsets, previous + x_grad, mask=mask)
    if HAS_NOISE and NEED_PARAM_GRAD:
        if MULTIPLY:
            x_offsets = row[:, None] * x_row_stride + columns[None, :]
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
            mu_grad = grad_value * x
        else:
            mu_grad = grad_value
        previous_mu = tl.load(grad_mu_ptr + offsets, mask=mask, other=0.0)
        previous_sigma = tl.load(grad_sigma_ptr + offsets, mask=mask, other=0.0)
        tl.store(grad_mu_ptr + offsets, previous_mu + mu_grad, mask=mask)
        tl.store(grad_sigma_ptr + offsets, previous_sigma + mu_grad * eps, mask=mask)


# --- host side ----------------------------------------------------------------------------------


def _row_tiling(dim: int) -> tuple[int, int, int]:
    """(columns per row tile, rows per program, warps) of the row kernels for rows of ``dim``."""
    block = max(triton.next_power_of_2(dim), MIN_BLOCK)
    rows = max(1, ROW_TILE_ELEMENTS // block)
    if triton_interpreting():
        return block, rows, 1
    threads = rows * block // ROW_TILE_ELEMENTS_PER_THREAD
    return block, rows, max(1, min(ROW_TILE_MAX_WARPS, threads // 32))


def _noise_param_args(features, mu, sigma) -> tuple:
    """mu and sigma with their (row, column) strides; the features stand in (never read) when the
    side has no noise."""
    if mu is None:
        return (features, 0, 0, features, 0, 0)
    return (mu, mu.stride(0), mu.stride(1), sigma, sigma.stride(0), sigma.stride(1))


def _launch_row_kernel(kernel, row_args, buffers, **flags) -> None:
    """Launch one of the row kernels on the leading arguments both take (``row_args``: features,
    mu, sigma, seed, stream_offset, multiply) and its own ``buffers`` and ``flags``."""
    features, mu, sigma, seed, stream_offset, multiply = row_args
    rows, dim = features.shape
    block, rows_per_program, warps = _row_tiling(dim)
    seed, seed_in_memory = triton_seed_args(seed)
    kernel[(triton.cdiv(rows, rows_per_program),)](
        *(features, features.stride(0), *_noise_param_args(features, mu, sigma), *buffers),
        *(seed, stream_offset, rows, dim),
        SEED_IN_MEMORY=seed_in_memory,
        HAS_NOISE=mu is not None,
        MULTIPLY=multiply,
        ALIGNED=dim % 4 == 0,
        ROWS=rows_per_program,
        BLOCK=block,
        num_warps=warps,
        **flags,
    )


def normalize(features, mu, sigma, seed, stream_offset, multiply, unit, norm) -> None:
    """Writes ``unit`` (N, D) fp32, the noisy rows normalized, and ``norm`` (N,) fp32, their norms.

    features: (N, D) with unit stride along D; mu, sigma: None (no noise) or fp32 views expanded
    to (N, D); the noise of element (r, d) is stream element ``stream_offset + r * D + d`` of
    ``seed`` (an int, or a 0-d int64 tensor on the features' device, read by the kernel).
    """
    row_args = (features, mu, sigma, seed, stream_offset, multiply)
    _launch_row_kernel(_noisy_normalize_kernel, row_args, (unit, norm))


def normalize_backward(features, mu, sigma, seed, stream_offset, multiply, *buffers) -> None:
    """Adds this sample's gradients into the fp32 (N, D) accumulators ``grad_x``, ``grad_mu`` and
    ``grad_sigma`` (None: not needed), given ``grad_unit``, the gradient of ``unit``; ``buffers``:
    unit, norm, grad_unit, grad_x, grad_mu, grad_sigma (``normalize``'s arguments before)."""
    unit, norm, grad_unit, grad_x, grad_mu, grad_sigma = buffers
    writes = (grad_x, grad_mu, grad_sigma)  # unit stands in for what is not written
    _launch_row_kernel(
        _noisy_normalize_backward_kernel,
        (features, mu, sigma, seed, stream_offset, multiply),
        (unit, norm, grad_unit, *(unit if grad is None else grad for grad in writes)),
        NEED_X_GRAD=grad_x is not None,
        NEED_PARAM_GRAD=grad_mu is not None,
    )
