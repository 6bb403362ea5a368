"""Noisy cosine logits and PiNI's loss (Eq. 13): the Triton kernels of ``pini_kernels/logits.py``
and ``pini_kernels/loss.py``, the table ``kernel_tables.LossKernels`` (which holds
``LogitsKernels``), with the same functions and arguments as the native backend (``native.py``).

The per-sample flow (``pini_kernels/per_sample.py``) hands these functions one sample's ``(N, D)``
rows at a time, so ``(num_samples, C, D)`` text features need nothing here:

- ``normalize`` / ``normalize_backward``: the row kernels, from ``triton/normalize.py``;
- ``loss_stats``: the logits tile by tile with ``tl.dot``, keeping only running row statistics
  (max, sum of exp, target logit, sum of logits) so no logits are stored
  (``_cosine_cross_entropy_kernel``);
- ``cosines``: the ``(B, C)`` cosine tile with the same ``tl.dot`` product and precision as
  ``loss_stats`` (``_cosine_kernel``), for the logits and for every backward recompute;
- ``loss_grad``: ``d loss / d cosine`` in place over one sample's cosine tile
  (``_cross_entropy_grad_kernel``); ``loss_stats_grad``: the same kernel computing the row
  statistics from the tile first (the loss's forward with its gradients).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._host import new_buffer
from ..backends import triton_interpreting
from .normalize import MAX_FEATURE_DIM, normalize, normalize_backward

__all__ = [
    "MAX_FEATURE_DIM",
    "cosines",
    "loss_grad",
    "loss_stats",
    "loss_stats_grad",
    "normalize",
    "normalize_backward",
]

# Logits tiles for tl.dot: 64 x 64 outputs, 32-wide steps over D (fp32: 8 KB per operand tile),
# over 8 warps: 16 accumulators per thread. At 4 warps (32 per thread) the IEEE loss kernel used
# 255 registers and spilled.
BLOCK_ROWS = 64
BLOCK_CLASSES = 64
BLOCK_DIM = 32
LOGITS_TILE_WARPS = 8
# Row-wise loss gradient: classes per step.
BLOCK_GRAD_CLASSES = 1024
# Grid target for the loss kernel on a GPU: classes are split so about this many programs per SM
# run even for small batches; the splits' row statistics are merged after.
LOSS_PROGRAMS_PER_SM = 2


@triton.jit
def _cosine_tile(
    image_ptr,
    text_ptr,
    row_index,
    row_mask,
    class_index,
    class_mask,
    dim,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """(BLOCK_ROWS, BLOCK_CLASSES) fp32 ``image @ text^T`` of unit rows: the one product both the
    loss's forward (``_cosine_cross_entropy_kernel``) and its backward (``_cosine_kernel``) use,
    so backward's probabilities are exactly those whose log-sum-exp forward saved."""
    dim_index = tl.arange(0, BLOCK_DIM)
    dots = tl.zeros((BLOCK_ROWS, BLOCK_CLASSES), dtype=tl.float32)
    for dim_start in range(0, dim, BLOCK_DIM):
        dim_mask = dim_start + dim_index < dim
        image = tl.load(
            image_ptr + row_index[:, None] * dim + dim_start + dim_index[None, :],
            mask=row_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        text = tl.load(
            text_ptr + class_index[:, None] * dim + dim_start + dim_index[None, :],
            mask=class_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        dots = tl.dot(image, tl.trans(text), dots, input_precision=INPUT_PRECISION)
    return dots


@triton.jit
def _cosine_kernel(
    image_ptr,
    text_ptr,
    out_ptr,
    rows,
    classes,
    dim,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out (rows, classes) fp32 = image @ text^T, one tile per program."""
    row_index = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    class_index = tl.program_id(1).to(tl.int64) * BLOCK_CLASSES + tl.arange(0, BLOCK_CLASSES)
    row_mask = row_index < rows
    class_mask = class_index < classes
    # The loss kernel makes the same call (# fmt: skip on both: one argument a line twice over).
    dots = _cosine_tile(
        image_ptr, text_ptr, row_index, row_mask, class_index, class_mask, dim,
        BLOCK_ROWS, BLOCK_CLASSES, BLOCK_DIM, INPUT_PRECISION,
    )  # fmt: skip
    tl.store(
        out_ptr + row_index[:, None] * classes + class_index[None, :],
        dots,
        mask=row_mask[:, None] & class_mask[None, :],
    )


@triton.jit
def _cosine_cross_entropy_kernel(
    image_ptr,
    text_ptr,
    target_ptr,
    scale_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    partial_target_ptr,
    partial_logit_sum_ptr,
    rows,
    classes,
    dim,
    classes_per_split,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
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
    for class_block in range(class_start, class_end, BLOCK_CLASSES):
        class_index = class_block + tl.arange(0, BLOCK_CLASSES)
        class_mask = class_index < class_end
        dots = _cosine_tile(
            image_ptr, text_ptr, row_index, row_mask, class_index, class_mask, dim,
            BLOCK_ROWS, BLOCK_CLASSES, BLOCK_DIM, INPUT_PRECISION,
        )  # fmt: skip
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
    cosine_ptr,
    lse_ptr,
    target_ptr,
    row_grad_ptr,
    scale_ptr,
    scale_grad_ptr,
    target_logit_ptr,
    logit_sum_ptr,
    classes,
    label_smoothing,
    BLOCK: tl.constexpr,
    COMPUTE_STATS: tl.constexpr,
):
    """In place, per row: cosine -> d loss / d cosine; scale_grad[row] = sum(dlogits * cosine).
    COMPUTE_STATS: first write the row's log-sum-exp, target logit and sum of logits (a pass over
    the row, which the second pass then finds in cache); else read the log-sum-exp."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    target = tl.load(target_ptr + row)
    if COMPUTE_STATS:
        # A finite start: a lane with no class yet then adds exp(-inf - finite) = 0, never nan.
        running_max = tl.full((BLOCK,), -3.0e38, dtype=tl.float32)
        running_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        target_logit = tl.zeros((BLOCK,), dtype=tl.float32)
        logit_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        for class_start in range(0, classes, BLOCK):
            class_index = class_start + tl.arange(0, BLOCK)
            mask = class_index < classes
            cosine = tl.load(cosine_ptr + row * classes + class_index, mask=mask, other=0.0)
            logits = tl.where(mask, cosine * scale, float("-inf"))
            new_max = tl.maximum(running_max, logits)
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(logits - new_max)
            running_max = new_max
            target_logit += tl.where(class_index == target, logits, 0.0)
            logit_sum += tl.where(mask, logits, 0.0)
        row_max = tl.max(running_max, axis=0)
        lse = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
        tl.store(lse_ptr + row, lse)
        tl.store(target_logit_ptr + row, tl.sum(target_logit, axis=0))
        tl.store(logit_sum_ptr + row, tl.sum(logit_sum, axis=0))
    else:
        lse = tl.load(lse_ptr + row)
    row_grad = tl.load(row_grad_ptr + row)
    smoothing_share = label_smoothing / classes
    scale_grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for class_start in range(0, classes, BLOCK):
        class_index = class_start + tl.arange(0, BLOCK)
        mask = class_index < classes
        cosine = tl.load(cosine_ptr + row * classes + class_index, mask=mask, other=0.0)
        # A positive exponent (an FMA's rounding at a huge logit scale) counts as 0; NaN stays.
        exponent = cosine * scale - lse
        probability = tl.exp(tl.where(exponent > 0.0, 0.0, exponent))
        one_hot = tl.where(class_index == target, 1.0 - label_smoothing, 0.0)
        logit_grad = row_grad * (probability - one_hot - smoothing_share)
        scale_grad += tl.where(mask, logit_grad * cosine, 0.0)
        tl.store(cosine_ptr + row * classes + class_index, logit_grad * scale, mask=mask)
    tl.store(scale_grad_ptr + row, tl.sum(scale_grad, axis=0))


# --- host side: kernel_tables.LossKernels ------------------------------------------------------


def loss_stats(image_unit, text_unit, target, scale, lse, target_logit, logit_sum) -> None:
    """Writes, per row of ``scale * image_unit @ text_unit^T`` (B, C), its log-sum-exp, the
    target's logit and the sum of logits into the (B,) fp32 ``lse``, ``target_logit`` and
    ``logit_sum``. image_unit: (B, D), text_unit: (C, D) fp32; target: (B,) int64; scale: 0-d."""
    rows, dim = image_unit.shape
    classes = text_unit.shape[0]
    splits = _loss_splits(rows, classes, image_unit.device)
    classes_per_split = triton.cdiv(triton.cdiv(classes, splits), BLOCK_CLASSES) * BLOCK_CLASSES
    stats = new_buffer((4, splits, rows), torch.float32, image_unit.device)
    _cosine_cross_entropy_kernel[(triton.cdiv(rows, BLOCK_ROWS), splits)](
        *(image_unit, text_unit, target, scale, *stats.unbind(0)),
        *(rows, classes, dim, classes_per_split),
        **_logits_tile_options(),
    )
    split_max, split_sum, split_target, split_logit_sum = stats.unbind(0)
    row_max = split_max.amax(dim=0)
    torch.log((split_sum * torch.exp(split_max - row_max)).sum(dim=0), out=lse)
    lse.add_(row_max)
    torch.sum(split_target, dim=0, out=target_logit)
    torch.sum(split_logit_sum, dim=0, out=logit_sum)


def cosines(
    image_unit: torch.Tensor, text_unit: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, C) fp32 ``image_unit @ text_unit^T`` for (B, D) and (C, D) fp32 unit rows, into the
    contiguous ``out`` when given, with the product and precision ``loss_stats`` takes its logits
    from (the logits and every backward recompute use it, so forward and backward agree to the
    last bit)."""
    rows, dim = image_unit.shape
    classes = text_unit.shape[0]
    if out is None:
        out = new_buffer((rows, classes), torch.float32, image_unit.device)
    _cosine_kernel[(triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(classes, BLOCK_CLASSES))](
        *(image_unit, text_unit, out, rows, classes, dim), **_logits_tile_options()
    )
    return out


def loss_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad) -> None:
    """In place: one sample's (B, C) fp32 ``cosine`` becomes d loss / d cosine for the rows' loss
    weights ``row_grad`` (B,); ``scale_grad`` (B,) gets each row's d loss / d scale."""
    _launch_cross_entropy_grad(
        cosine, lse, target, row_grad, scale, label_smoothing, scale_grad, None, None
    )


def loss_stats_grad(
    cosine, target, row_grad, scale, label_smoothing, lse, target_logit, logit_sum, scale_grad
) -> None:
    """``loss_stats`` of the logits ``scale * cosine`` (the rows' log-sum-exp, target logit and
    sum of logits), then ``loss_grad`` with that log-sum-exp, in one kernel: the loss's forward
    with its gradient (loss.gradients_in_forward)."""
    _launch_cross_entropy_grad(
        cosine, lse, target, row_grad, scale, label_smoothing, scale_grad, target_logit, logit_sum
    )


def _launch_cross_entropy_grad(
    cosine, lse, target, row_grad, scale, label_smoothing, scale_grad, target_logit, logit_sum
) -> None:
    rows, classes = cosine.shape
    compute_stats = target_logit is not None
    _cross_entropy_grad_kernel[(rows,)](
        cosine,
        lse,
        target,
        row_grad,
        scale,
        scale_grad,
        target_logit if compute_stats else lse,
        logit_sum if compute_stats else lse,
        classes,
        label_smoothing,
        BLOCK=min(triton.next_power_of_2(classes), BLOCK_GRAD_CLASSES),
        COMPUTE_STATS=compute_stats,
        num_warps=1 if triton_interpreting() else 4,
    )


def _logits_tile_options() -> dict:
    """The launch options of the two kernels on logits tiles (``_cosine_tile``)."""
    return {
        "BLOCK_ROWS": BLOCK_ROWS,
        "BLOCK_CLASSES": BLOCK_CLASSES,
        "BLOCK_DIM": BLOCK_DIM,
        "INPUT_PRECISION": _input_precision(),
        "num_warps": LOGITS_TILE_WARPS,
    }


def _input_precision() -> str:
    """tl.dot's precision, the caller's choice for float32 matmuls: IEEE by default, TF32 only
    where allowed, then in forward and backward alike. Read through the precision API of torch
    2.9 and later (``torch.backends.cuda.matmul.fp32_precision``, "none" inheriting
    ``torch.backends.fp32_precision``), which also reflects ``set_float32_matmul_precision`` and
    the legacy flag; reading the legacy ``allow_tf32`` after a caller used the new API raises."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch before 2.9: only the legacy flag exists
        return "tf32" if matmul.allow_tf32 else "ieee"
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if precision == "tf32" else "ieee"


def _loss_splits(rows: int, classes: int, device: torch.device) -> int:
    """Class splits of the loss kernel: enough programs to fill the GPU for small batches. Under
    the interpreter one (the tests force several, so that the merge of split statistics runs)."""
    if device.type != "cuda" or triton_interpreting():
        return 1
    programs = LOSS_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(rows, BLOCK_ROWS)
    return max(1, min(triton.cdiv(programs, row_blocks), triton.cdiv(classes, BLOCK_CLASSES)))
