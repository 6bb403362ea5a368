"""Noisy cosine logits and PiNI's loss (Eq. 13): the Triton kernels.

The per-sample flow (noise and normalize both sides, logits or loss statistics, backward) lives
in ``pini_kernels/_cosine_host.py``; it hands the kernels one sample's rows at a time, so
``(num_samples, C, D)`` text features need nothing here. This file provides its kernels:

- ``_noisy_normalize_kernel`` / ``_noisy_normalize_backward_kernel``: tiles of whole feature rows,
  noise regenerated from the seed, L2 normalization and its gradient;
- ``_cosine_cross_entropy_kernel``: the logits tile by tile with ``tl.dot``, keeping only running
  row statistics (max, sum of exp, target logit, sum of logits) so no logits are stored;
- ``_cross_entropy_grad_kernel``: ``d loss / d cosine`` in place over one sample's cosine tile.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _cosine_host as host
from ..backends import triton_interpreting
from .launch import MIN_BLOCK, new_buffer
from .noise import normal_rows

# Features are normalized like F.normalize: v / max(|v|, NORM_FLOOR).
NORM_FLOOR = 1e-12
# One program holds a whole feature row; CLIP widths are 512-1024. Past this, a row no longer fits
# in registers and the kernel would need a loop over D.
MAX_FEATURE_DIM = 16384
# Row-wise kernels (noise + normalization) work on tiles of whole rows of about this many
# elements: 4 rows of a 512-wide CLIP feature per program with 4 warps on a GPU (a row per warp);
# under the interpreter, wide tiles cut the per-program overhead.
ROW_TILE_ELEMENTS = 16384 if triton_interpreting() else 2048
ROW_TILE_WARPS = 4
# Logits tiles for tl.dot: 64 x 64 outputs, 32-wide steps over D (fp32: 16 KB per operand tile).
BLOCK_ROWS = 64
BLOCK_CLASSES = 64
BLOCK_DIM = 32
# Row-wise loss gradient: classes per step.
BLOCK_GRAD_CLASSES = 1024
# Grid target for the loss kernel on a GPU: classes are split so about this many programs per SM
# run even for small batches; the splits' row statistics are merged after.
LOSS_PROGRAMS_PER_SM = 2
# Test hook: when set, the loss kernel uses this many class splits on any device. Under the
# interpreter it otherwise always uses one, and the merge of split statistics would never run.
FORCED_LOSS_SPLITS: int | None = None


@triton.jit
def _noisy_normalize_kernel(
    x_ptr, x_row_stride,
    mu_ptr, mu_row_stride, mu_col_stride, sigma_ptr, sigma_row_stride, sigma_col_stride,
    unit_ptr, norm_ptr, seed, stream_offset, rows, dim,
    HAS_NOISE: tl.constexpr, MULTIPLY: tl.constexpr, ALIGNED: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """For ROWS rows: unit = v / max(|v|, floor), v = x (+ or *) (mu + sigma * eps); norm = |v|."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = row < rows
    columns = tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (columns < dim)[None, :]
    x_offsets = row[:, None] * x_row_stride + columns[None, :]
    value = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        mu_offsets = row[:, None] * mu_row_stride + columns[None, :] * mu_col_stride
        sigma_offsets = row[:, None] * sigma_row_stride + columns[None, :] * sigma_col_stride
        mu = tl.load(mu_ptr + mu_offsets, mask=mask, other=0.0).to(tl.float32)
        sigma = tl.load(sigma_ptr + sigma_offsets, mask=mask, other=0.0).to(tl.float32)
        eps = normal_rows(seed, stream_offset + row * dim, ALIGNED, BLOCK)
        sample_noise = mu + sigma * eps
        value = value * sample_noise if MULTIPLY else value + sample_noise
        value = tl.where(mask, value, 0.0)
    norm = tl.sqrt(tl.sum(value * value, axis=1))
    unit = value / tl.maximum(norm, 1e-12)[:, None]
    tl.store(unit_ptr + row[:, None] * dim + columns[None, :], unit, mask=mask)
    tl.store(norm_ptr + row, norm, mask=row_mask)


@triton.jit
def _noisy_normalize_backward_kernel(
    x_ptr, x_row_stride,
    mu_ptr, mu_row_stride, mu_col_stride, sigma_ptr, sigma_row_stride, sigma_col_stride,
    unit_ptr, norm_ptr, grad_unit_ptr, grad_x_ptr, grad_mu_ptr, grad_sigma_ptr,
    seed, stream_offset, rows, dim,
    HAS_NOISE: tl.constexpr, MULTIPLY: tl.constexpr, ALIGNED: tl.constexpr,
    NEED_X_GRAD: tl.constexpr, NEED_PARAM_GRAD: tl.constexpr,
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
    divisor = tl.maximum(norm, 1e-12)
    grad_value = tl.where(norm > 1e-12, grad_unit - unit * radial, grad_unit) / divisor
    if HAS_NOISE and (MULTIPLY or NEED_PARAM_GRAD):
        eps = normal_rows(seed, stream_offset + row * dim, ALIGNED, BLOCK)
    if NEED_X_GRAD:
        if HAS_NOISE and MULTIPLY:
            mu_offsets = row[:, None] * mu_row_stride + columns[None, :] * mu_col_stride
            sigma_offsets = row[:, None] * sigma_row_stride + columns[None, :] * sigma_col_stride
            mu = tl.load(mu_ptr + mu_offsets, mask=mask, other=0.0).to(tl.float32)
            sigma = tl.load(sigma_ptr + sigma_offsets, mask=mask, other=0.0).to(tl.float32)
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


@triton.jit
def _cosine_cross_entropy_kernel(
    image_ptr, text_ptr, target_ptr, scale_ptr,
    partial_max_ptr, partial_sum_ptr, partial_target_ptr, partial_logit_sum_ptr,
    rows, classes, dim, classes_per_split,
    BLOCK_ROWS: tl.constexpr, BLOCK_CLASSES: tl.constexpr, BLOCK_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Row statistics of scale * image @ text^T over one split of the classes, for one sample:
    running max, sum of exp(logit - max), the target's logit and the sum of logits."""
    row_block = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_index = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_index < rows
    target = tl.load(target_ptr + row_index, mask=row_mask, other=-1)
    scale = tl.load(scale_ptr).to(tl.float32)
    running_max = tl.full((BLOCK_ROWS,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    class_start = split * classes_per_split
    class_end = tl.minimum(class_start + classes_per_split, classes)
    dim_index = tl.arange(0, BLOCK_DIM)
    for class_block in range(class_start, class_end, BLOCK_CLASSES):
        class_index = class_block + tl.arange(0, BLOCK_CLASSES)
        class_mask = class_index < class_end
        dots = tl.zeros((BLOCK_ROWS, BLOCK_CLASSES), dtype=tl.float32)
        for dim_start in range(0, dim, BLOCK_DIM):
            dim_mask = dim_start + dim_index < dim
            image = tl.load(
                image_ptr + row_index[:, None] * dim + dim_start + dim_index[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
            )  # fmt: skip
            text = tl.load(
                text_ptr + class_index[:, None] * dim + dim_start + dim_index[None, :],
                mask=class_mask[:, None] & dim_mask[None, :], other=0.0,
            )  # fmt: skip
            dots = tl.dot(image, tl.trans(text), dots, input_precision=INPUT_PRECISION)
        logits = tl.where(class_mask[None, :], dots * scale, float("-inf"))
        block_max = tl.max(logits, axis=1)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1
        )
        running_max = new_max
        is_target = class_index[None, :] == target[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        logit_sum += tl.sum(tl.where(class_mask[None, :], logits, 0.0), axis=1)
    offsets = split * rows + row_index
    tl.store(partial_max_ptr + offsets, running_max, mask=row_mask)
    tl.store(partial_sum_ptr + offsets, running_sum, mask=row_mask)
    tl.store(partial_target_ptr + offsets, target_logit, mask=row_mask)
    tl.store(partial_logit_sum_ptr + offsets, logit_sum, mask=row_mask)


@triton.jit
def _cross_entropy_grad_kernel(
    cosine_ptr, lse_ptr, target_ptr, row_grad_ptr, scale_ptr, scale_grad_ptr,
    classes, label_smoothing, BLOCK: tl.constexpr,
):  # fmt: skip
    """In place, per row: cosine -> d loss / d cosine; scale_grad[row] = sum(dlogits * cosine)."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    target = tl.load(target_ptr + row)
    row_grad = tl.load(row_grad_ptr + row)
    smoothing_share = label_smoothing / classes
    scale_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for class_start in range(0, classes, BLOCK):
        class_index = class_start + tl.arange(0, BLOCK)
        mask = class_index < classes
        cosine = tl.load(cosine_ptr + row * classes + class_index, mask=mask, other=0.0)
        probability = tl.exp(cosine * scale - lse)
        one_hot = tl.where(class_index == target, 1.0 - label_smoothing, 0.0)
        logit_grad = row_grad * (probability - one_hot - smoothing_share)
        scale_grad += tl.where(mask, logit_grad * cosine, 0.0)
        tl.store(cosine_ptr + row * classes + class_index, logit_grad * scale, mask=mask)
    tl.store(scale_grad_ptr + row, tl.sum(scale_grad, axis=0))


# --- host side --------------------------------------------------------------------------------


def _row_warps() -> int:
    return 1 if triton_interpreting() else ROW_TILE_WARPS


def _input_precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


class TritonCosineKernels:
    """The row kernels and loss kernels of this file, for pini_kernels/_cosine_host.py."""

    max_feature_dim = MAX_FEATURE_DIM
    new_buffer = staticmethod(new_buffer)

    @staticmethod
    def prepare_params(params: torch.Tensor) -> torch.Tensor:
        return params  # the kernels read any dtype and any strides

    @staticmethod
    def _tiling(side: host.Side) -> tuple[int, int]:
        block = max(triton.next_power_of_2(side.features.shape[1]), MIN_BLOCK)
        return block, max(1, ROW_TILE_ELEMENTS // block)

    @staticmethod
    def _param_args(side: host.Side):
        if not side.has_noise:
            return (side.features, 0, 0, side.features, 0, 0)
        return (
            side.mu, side.mu.stride(0), side.mu.stride(1),
            side.sigma, side.sigma.stride(0), side.sigma.stride(1),
        )  # fmt: skip

    def normalize(self, side: host.Side, sample: int) -> None:
        rows, dim = side.features.shape
        block, rows_per_program = self._tiling(side)
        _noisy_normalize_kernel[(triton.cdiv(rows, rows_per_program),)](
            side.features, side.features.stride(0), *self._param_args(side),
            side.unit, side.norm, side.seed, sample * rows * dim, rows, dim,
            HAS_NOISE=side.has_noise, MULTIPLY=side.multiply, ALIGNED=dim % 4 == 0,
            ROWS=rows_per_program, BLOCK=block, num_warps=_row_warps(),
        )  # fmt: skip

    def normalize_backward(self, side, sample, grad_unit, grads: host.SideGrads) -> None:
        rows, dim = side.features.shape
        block, rows_per_program = self._tiling(side)
        unused = side.unit
        _noisy_normalize_backward_kernel[(triton.cdiv(rows, rows_per_program),)](
            side.features, side.features.stride(0), *self._param_args(side),
            side.unit, side.norm, grad_unit,
            grads.x if grads.need_x else unused,
            grads.mu if grads.need_params else unused,
            grads.sigma if grads.need_params else unused,
            side.seed, sample * rows * dim, rows, dim,
            HAS_NOISE=side.has_noise, MULTIPLY=side.multiply, ALIGNED=dim % 4 == 0,
            NEED_X_GRAD=grads.need_x, NEED_PARAM_GRAD=grads.need_params,
            ROWS=rows_per_program, BLOCK=block, num_warps=_row_warps(),
        )  # fmt: skip

    def loss_stats(self, image, text, target, scale, lse, target_logit, logit_sum) -> None:
        rows, dim = image.features.shape
        classes = text.features.shape[0]
        splits = _loss_splits(rows, classes, image.features.device)
        classes_per_split = triton.cdiv(triton.cdiv(classes, splits), BLOCK_CLASSES) * BLOCK_CLASSES
        stats = new_buffer((4, splits, rows), torch.float32, image.features.device)
        _cosine_cross_entropy_kernel[(triton.cdiv(rows, BLOCK_ROWS), splits)](
            image.unit, text.unit, target, scale, stats[0], stats[1], stats[2], stats[3],
            rows, classes, dim, classes_per_split,
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_CLASSES=BLOCK_CLASSES, BLOCK_DIM=BLOCK_DIM,
            INPUT_PRECISION=_input_precision(), num_warps=4,
        )  # fmt: skip
        split_max, split_sum, split_target, split_logit_sum = stats.unbind(0)
        row_max = split_max.amax(dim=0)
        torch.log((split_sum * torch.exp(split_max - row_max)).sum(dim=0), out=lse)
        lse.add_(row_max)
        torch.sum(split_target, dim=0, out=target_logit)
        torch.sum(split_logit_sum, dim=0, out=logit_sum)

    def loss_grad(self, cosine, lse, target, row_grad, scale, label_smoothing, scale_grad) -> None:
        rows, classes = cosine.shape
        _cross_entropy_grad_kernel[(rows,)](
            cosine, lse, target, row_grad, scale, scale_grad, classes, label_smoothing,
            BLOCK=min(triton.next_power_of_2(classes), BLOCK_GRAD_CLASSES),
            num_warps=1 if triton_interpreting() else 4,
        )  # fmt: skip


def _loss_splits(rows: int, classes: int, device: torch.device) -> int:
    """Class splits of the loss kernel: enough programs to fill the GPU for small batches."""
    if FORCED_LOSS_SPLITS is not None:
        if FORCED_LOSS_SPLITS < 1:
            raise ValueError(f"FORCED_LOSS_SPLITS must be None or >= 1, got {FORCED_LOSS_SPLITS}")
        return FORCED_LOSS_SPLITS
    if device.type != "cuda" or triton_interpreting():
        return 1
    programs = LOSS_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(rows, BLOCK_ROWS)
    return max(1, min(triton.cdiv(programs, row_blocks), triton.cdiv(classes, BLOCK_CLASSES)))


KERNELS = TritonCosineKernels()
cosine_logits_forward = functools.partial(host.cosine_logits_forward, KERNELS)
cosine_logits_backward = functools.partial(host.cosine_logits_backward, KERNELS)
cross_entropy_forward = functools.partial(host.cross_entropy_forward, KERNELS)
cross_entropy_backward = functools.partial(host.cross_entropy_backward, KERNELS)
