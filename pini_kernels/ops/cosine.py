"""Noisy cosine logits and PiNI's loss (Eq. 13) in Triton, one noise sample at a time.

For each sample ``s`` the image rows ``z (B, D)`` and the text rows ``t (C, D)`` get their noise
(image: stream of ``seed``, elements ``s*B*D + b*D + d``; text: stream of ``seed + 1``), and are
L2-normalized by ``_noisy_normalize_kernel`` into fp32 buffers of one sample, ``(B, D)`` and
``(C, D)``, reused across samples. Then:

- logits: ``logit_scale * z_hat @ t_hat^T`` for each sample, written to the ``(m, B, C)`` output;
- loss: ``_cosine_cross_entropy_kernel`` computes the logits tile by tile with ``tl.dot`` and
  keeps only running row statistics (max, sum of exp, target logit, sum of logits), so no logits
  are stored. Backward saves only the per-row log-sum-exp ``(m, B)`` and recomputes the rest from
  the seed, one sample at a time.

Memory: nothing of size ``m*B*C``, ``m*B*D`` or ``m*C*D`` is allocated; per sample, forward of the
loss needs ``(B + C) * D`` floats and backward adds one ``(B, C)`` gradient tile for the two
matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
    # d(v / max(|v|, floor)) / dv: project out the radial part, unless the floor was active.
    radial = tl.sum(unit * grad_unit, axis=1)[:, None]
    grad_value = tl.where(norm > 1e-12, (grad_unit - unit * radial) / norm, grad_unit / 1e-12)
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


@dataclass
class _Side:
    """One side (image or text) of the logits: its rows, optional noise and per-sample buffers."""

    features: torch.Tensor  # (N, D), unit stride along D
    mu: torch.Tensor | None  # expanded to (N, D) (stride 0 on broadcast dims)
    sigma: torch.Tensor | None
    seed: int
    multiply: bool
    unit: torch.Tensor  # (N, D) fp32: this sample's normalized rows
    norm: torch.Tensor  # (N,) fp32

    @property
    def has_noise(self) -> bool:
        return self.mu is not None

    @property
    def block(self) -> int:
        return max(triton.next_power_of_2(self.features.shape[1]), MIN_BLOCK)

    @property
    def rows_per_program(self) -> int:
        return max(1, ROW_TILE_ELEMENTS // self.block)

    def _param_args(self):
        if not self.has_noise:
            return (self.features, 0, 0, self.features, 0, 0)
        return (
            self.mu, self.mu.stride(0), self.mu.stride(1),
            self.sigma, self.sigma.stride(0), self.sigma.stride(1),
        )  # fmt: skip

    def normalize(self, sample: int) -> None:
        """Fill ``unit`` and ``norm`` for ``sample`` (noise-free sides: the same every sample)."""
        rows, dim = self.features.shape
        if rows == 0:
            return
        _noisy_normalize_kernel[(triton.cdiv(rows, self.rows_per_program),)](
            self.features, self.features.stride(0), *self._param_args(),
            self.unit, self.norm, self.seed, sample * rows * dim, rows, dim,
            HAS_NOISE=self.has_noise, MULTIPLY=self.multiply, ALIGNED=dim % 4 == 0,
            ROWS=self.rows_per_program, BLOCK=self.block, num_warps=_row_warps(),
        )  # fmt: skip

    def backward(self, sample: int, grad_unit: torch.Tensor, grads: _SideGrads) -> None:
        """Accumulate this sample's gradients given d loss / d unit (fp32 (N, D))."""
        rows, dim = self.features.shape
        if rows == 0 or not (grads.need_x or grads.need_params):
            return
        dummy = self.unit
        _noisy_normalize_backward_kernel[(triton.cdiv(rows, self.rows_per_program),)](
            self.features, self.features.stride(0), *self._param_args(),
            self.unit, self.norm, grad_unit,
            grads.x if grads.need_x else dummy,
            grads.mu if grads.need_params else dummy,
            grads.sigma if grads.need_params else dummy,
            self.seed, sample * rows * dim, rows, dim,
            HAS_NOISE=self.has_noise, MULTIPLY=self.multiply, ALIGNED=dim % 4 == 0,
            NEED_X_GRAD=grads.need_x, NEED_PARAM_GRAD=grads.need_params and self.has_noise,
            ROWS=self.rows_per_program, BLOCK=self.block, num_warps=_row_warps(),
        )  # fmt: skip


@dataclass
class _SideGrads:
    need_x: bool
    need_params: bool
    x: torch.Tensor | None = None  # fp32 (N, D) accumulators
    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    @classmethod
    def zeros(cls, side: _Side, need_x: bool, need_params: bool) -> _SideGrads:
        shape, device = side.features.shape, side.features.device
        make = lambda needed: (
            torch.zeros(shape, dtype=torch.float32, device=device) if needed else None
        )
        need_params = need_params and side.has_noise
        return cls(need_x, need_params, make(need_x), make(need_params), make(need_params))


def _row_warps() -> int:
    return 1 if triton_interpreting() else ROW_TILE_WARPS


def _make_side(features, mu, sigma, seed, multiply) -> _Side:
    rows, dim = features.shape
    if triton.next_power_of_2(dim) > MAX_FEATURE_DIM:
        raise ValueError(
            f"feature dimension D={dim} exceeds the supported maximum {MAX_FEATURE_DIM}"
        )
    if features.stride(1) != 1:
        features = features.contiguous()
    if mu is not None:
        mu, sigma = mu.expand(rows, dim), sigma.expand(rows, dim)
    unit = new_buffer((rows, dim), torch.float32, features.device)
    norm = new_buffer((rows,), torch.float32, features.device)
    return _Side(features, mu, sigma, seed, multiply, unit, norm)


def _sides(image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply):
    image_side = _make_side(image, image_mu, image_sigma, seed, multiply)
    text_side = _make_side(text, text_mu, text_sigma, seed + 1, multiply)
    return image_side, text_side


def _scale_on(device: torch.device, logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale.to(device=device, dtype=torch.float32)


def _out_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def cosine_logits_forward(
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed, num_samples,
    multiply,
) -> torch.Tensor:  # fmt: skip
    """image: (B, D), text: (C, D), logit_scale: 0-d. Returns (num_samples, B, C) logits."""
    image_side, text_side = _sides(
        image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply
    )
    dtype = _out_dtype(image, text, image_mu, image_sigma, text_mu, text_sigma)
    out = new_buffer((num_samples, image.shape[0], text.shape[0]), dtype, image.device)
    scale = _scale_on(image.device, logit_scale)
    for sample in range(num_samples):
        for side in (image_side, text_side):
            if side.has_noise or sample == 0:
                side.normalize(sample)
        out[sample] = torch.mm(image_side.unit, text_side.unit.t()).mul_(scale)
    return out


def cosine_logits_backward(
    grad_logits, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed,
    num_samples, multiply, needs,
):  # fmt: skip
    """Gradients (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma)."""
    scale = _scale_on(image.device, logit_scale)
    scale_grad = torch.zeros((), dtype=torch.float32, device=image.device) if needs[2] else None

    def cosine_grad(sample, cosine):
        grad = grad_logits[sample].to(torch.float32)
        if scale_grad is not None:
            scale_grad.add_((grad * cosine).sum())
        return grad * scale

    return _backward(
        cosine_grad, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed,
        num_samples, multiply, needs, scale_grad,
    )  # fmt: skip


def _input_precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _loss_splits(rows: int, classes: int, device: torch.device) -> int:
    if device.type != "cuda" or triton_interpreting():
        return 1
    programs = LOSS_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(rows, BLOCK_ROWS)
    return max(1, min(triton.cdiv(programs, row_blocks), triton.cdiv(classes, BLOCK_CLASSES)))


def _row_losses(lse, target_logit, logit_sum, classes, label_smoothing):
    """F.cross_entropy per row from its statistics: (1-e)(lse - x_t) + e(lse - mean(x))."""
    nll = lse - target_logit
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll + label_smoothing * (lse - logit_sum / classes)


def _reduce(row_losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_losses
    if reduction == "sum":
        return row_losses.sum()
    return row_losses.mean()


def cross_entropy_forward(
    image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma, seed,
    num_samples, multiply, reduction, label_smoothing,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns (loss, lse): the reduced float32 loss and the (num_samples, B) log-sum-exp."""
    rows, classes, dim = image.shape[0], text.shape[0], image.shape[1]
    device = image.device
    image_side, text_side = _sides(
        image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply
    )
    scale = _scale_on(device, logit_scale)
    splits = _loss_splits(rows, classes, device)
    classes_per_split = triton.cdiv(triton.cdiv(classes, splits), BLOCK_CLASSES) * BLOCK_CLASSES
    stats = new_buffer((4, num_samples, splits, rows), torch.float32, device)
    target = target.contiguous()
    for sample in range(num_samples):
        for side in (image_side, text_side):
            if side.has_noise or sample == 0:
                side.normalize(sample)
        if rows == 0:
            continue
        _cosine_cross_entropy_kernel[(triton.cdiv(rows, BLOCK_ROWS), splits)](
            image_side.unit, text_side.unit, target, scale,
            stats[0, sample], stats[1, sample], stats[2, sample], stats[3, sample],
            rows, classes, dim, classes_per_split,
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_CLASSES=BLOCK_CLASSES, BLOCK_DIM=BLOCK_DIM,
            INPUT_PRECISION=_input_precision(), num_warps=4,
        )  # fmt: skip
    split_max, split_sum, split_target, split_logit_sum = stats.unbind(0)
    row_max = split_max.amax(dim=1)
    lse = row_max + torch.log((split_sum * torch.exp(split_max - row_max[:, None])).sum(dim=1))
    row_losses = _row_losses(
        lse, split_target.sum(dim=1), split_logit_sum.sum(dim=1), classes, label_smoothing
    )
    return _reduce(row_losses, reduction), lse


def cross_entropy_backward(
    grad_loss, image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma,
    lse, seed, num_samples, multiply, reduction, label_smoothing, needs,
):  # fmt: skip
    """Gradients (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma)."""
    rows, classes = image.shape[0], text.shape[0]
    device = image.device
    scale = _scale_on(device, logit_scale)
    grad_loss = grad_loss.to(torch.float32)
    if reduction == "mean":
        grad_loss = grad_loss / (num_samples * rows)
    row_grads = grad_loss.expand(num_samples, rows).contiguous()  # "none": already (m, B)
    scale_grad_rows = new_buffer((num_samples, rows), torch.float32, device)
    target = target.contiguous()

    def cosine_grad(sample, cosine):
        _cross_entropy_grad_kernel[(rows,)](
            cosine, lse[sample], target, row_grads[sample], scale, scale_grad_rows[sample],
            classes, label_smoothing,
            BLOCK=min(triton.next_power_of_2(classes), BLOCK_GRAD_CLASSES),
            num_warps=1 if triton_interpreting() else 4,
        )  # fmt: skip
        return cosine

    grads = _backward(
        cosine_grad, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed,
        num_samples, multiply, needs, None,
    )  # fmt: skip
    scale_grad = scale_grad_rows.sum() if needs[2] else None
    return (grads[0], grads[1], scale_grad, *grads[3:])


def _backward(
    cosine_grad, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed,
    num_samples, multiply, needs, scale_grad,
):  # fmt: skip
    """Shared backward: for each sample, recompute the normalized rows and the cosines, turn them
    into d loss / d cosine with ``cosine_grad(sample, cosine)``, and backpropagate through the
    matrix product, the normalization and the noise of both sides."""
    image_side, text_side = _sides(
        image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply
    )
    image_grads = _SideGrads.zeros(image_side, needs[0], needs[3] or needs[4])
    text_grads = _SideGrads.zeros(text_side, needs[1], needs[5] or needs[6])
    sides = ((image_side, image_grads), (text_side, text_grads))
    # Noise-free sides are the same every sample: sum their unit gradients, backpropagate once.
    unit_grad_sums = {
        id(side): torch.zeros_like(side.unit) for side, _ in sides if not side.has_noise
    }
    for sample in range(num_samples):
        for side, _ in sides:
            if side.has_noise or sample == 0:
                side.normalize(sample)
        if image.shape[0] == 0:
            continue
        cosine = torch.mm(image_side.unit, text_side.unit.t())
        cosine = cosine_grad(sample, cosine)  # now d loss / d cosine, (B, C) fp32
        image_unit_grad = torch.mm(cosine, text_side.unit)
        text_unit_grad = torch.mm(cosine.t(), image_side.unit)
        for (side, side_grads), unit_grad in zip(
            sides, (image_unit_grad, text_unit_grad), strict=True
        ):
            if side.has_noise:
                side.backward(sample, unit_grad, side_grads)
            else:
                unit_grad_sums[id(side)].add_(unit_grad)
    for side, side_grads in sides:
        if not side.has_noise:
            side.backward(0, unit_grad_sums[id(side)], side_grads)
    return (
        _cast(image_grads.x, image),
        _cast(text_grads.x, text),
        None if scale_grad is None else scale_grad.to(logit_scale.dtype),
        _sum_to(image_grads.mu, image_mu, needs[3]),
        _sum_to(image_grads.sigma, image_sigma, needs[4]),
        _sum_to(text_grads.mu, text_mu, needs[5]),
        _sum_to(text_grads.sigma, text_sigma, needs[6]),
    )


def _cast(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


def _sum_to(grad: torch.Tensor | None, param: torch.Tensor | None, needed: bool):
    if not needed or grad is None or param is None:
        return None
    return grad.sum_to_size(param.shape).to(param.dtype)
