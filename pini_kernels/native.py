"""The "cpu" and "cuda" backends: glue to the compiled kernels of csrc/ (the ``pini_native`` op
library, ``pini_kernels._C``), one module for both (the dispatcher runs the kernels of the tensors'
device).

It provides every kernel table of ``kernel_tables.py`` (the same functions, taking the same
arguments, as the Triton backend), and two the Triton backend has not: ``LossFlowKernels`` and
``InjectAutogradKernels``, whole flows as single C++ ops. The compiled ops write into buffers
allocated here or by the op modules, so the tests' NaN poisoning covers them too, and check their
arguments (``csrc/checks.h``). Seeds become the 0-d int64 tensors the compiled ops read with
``seeds.native_seed``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._host import new_buffer
from .kernel_tables import FlowSettings, LossSettings, OpInputs
from .seeds import KernelSeed, native_seed, text_seed

# Rows per chunk of the CPU backward's parameter partial sums: each chunk adds one row of `width`
# floats to reduce; a task is a 2048-column tile (csrc/cpu/kernels.cpp) times these rows. CUDA
# scales its chunks with the problem instead (cuda_inject_launch).
ROWS_PER_CHUNK = {"cpu": 64}
# The CPU row kernels keep a row's noise in a heap buffer: any width works.
MAX_FEATURE_DIM = 1 << 20


@functools.cache  # once: an import statement per kernel call costs microseconds
def _ops():
    from . import _C  # noqa: F401  (registers torch.ops.pini_native)

    return torch.ops.pini_native


@dataclass(frozen=True)
class CudaInjectLaunch:
    """The grid of the CUDA inject kernels (csrc/inject_launch.h): blocks of column_threads x
    row_lanes threads, each owning column_threads * 4 columns and a chunk of rows_per_chunk rows;
    the grid is column_blocks x row_chunks, and backward writes one row of partial sums per
    chunk."""

    column_threads: int
    row_lanes: int
    column_blocks: int
    rows_per_chunk: int
    row_chunks: int


def cuda_inject_launch(rows: int, width: int, multiprocessors: int) -> CudaInjectLaunch:
    """The CUDA inject kernels' grid for a ``rows x width`` problem on a GPU with
    ``multiprocessors`` SMs: the compiled arithmetic the CUDA launcher itself uses (so it runs and
    is tested on machines without a GPU). Rows per chunk grow with the problem, so the row chunks
    stay within CUDA's grid limit of 65535 for any row count."""
    return CudaInjectLaunch(*_ops().cuda_inject_launch(rows, width, multiprocessors))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows_per_chunk(rows: int, width: int, device: torch.device) -> int:
    """Rows per chunk of the backward's partial sums on ``device``."""
    if device.type != "cuda":
        return ROWS_PER_CHUNK["cpu"]
    device_index = torch.cuda.current_device() if device.index is None else device.index
    return cuda_inject_launch(rows, width, _multiprocessors(device_index)).rows_per_chunk


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """The compiled kernels read fp32 parameters (no call when they already are: small tensors
    pay for every host-side call)."""
    return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)


def noise_forward(
    numel: int, seed: int | torch.Tensor, device: torch.device, dtype: torch.dtype, start: int = 0
) -> torch.Tensor:
    """See kernel_tables.NoiseKernels."""
    out = new_buffer(numel, torch.float32, device)
    if numel:
        _ops().noise(native_seed(seed, device), start, out)
    return out if dtype == torch.float32 else out.to(dtype)


def inject_forward(x, mu, sigma, seed, num_samples, multiply, rows, width, inner, out) -> None:
    """See kernel_tables.InjectKernels; the compiled kernels read fp32 parameters."""
    parameters = (_float32(mu), _float32(sigma), native_seed(seed, x.device))
    _ops().inject_forward(x, *parameters, num_samples, multiply, rows, width, inner, out)


def inject_backward(
    grad_out, x, mu, sigma, seed, num_samples, multiply, rows, width, inner, grad_x, need_param_grad
):
    """See kernel_tables.InjectKernels; here a chunk is ROWS_PER_CHUNK rows on the CPU and
    cuda_inject_launch's rows_per_chunk on a GPU."""
    rows_per_chunk = _rows_per_chunk(rows, width, x.device)
    row_chunks = -(-rows // rows_per_chunk)
    partial_mu = partial_sigma = None
    if need_param_grad:
        partial_mu = new_buffer((row_chunks, width), torch.float32, x.device)
        partial_sigma = new_buffer((row_chunks, width), torch.float32, x.device)
    # In add mode x may be autograd's one-element stand-in: no kernel reads it there.
    x_data = x.contiguous() if multiply else x
    parameters = (_float32(mu), _float32(sigma), native_seed(seed, grad_out.device))
    layout = (num_samples, multiply, rows, width, inner, rows_per_chunk)
    _ops().inject_backward(
        grad_out, x_data, *parameters, *layout, grad_x, partial_mu, partial_sigma
    )
    return (partial_mu, partial_sigma) if need_param_grad else None


def normalize(features, mu, sigma, seed, stream_offset, multiply, unit, norm) -> None:
    """See kernel_tables.LogitsKernels."""
    seed = native_seed(seed, features.device)
    _ops().noisy_normalize(features, mu, sigma, seed, stream_offset, multiply, unit, norm)


def normalize_backward(features, mu, sigma, seed, *after_seed) -> None:
    """See kernel_tables.LogitsKernels (``after_seed``: stream_offset, multiply, unit, norm,
    grad_unit, grad_x, grad_mu, grad_sigma, passed on as they are)."""
    seed = native_seed(seed, features.device)
    _ops().noisy_normalize_backward(features, mu, sigma, seed, *after_seed)


def cosines(
    image_unit: torch.Tensor, text_unit: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """See kernel_tables.LogitsKernels: torch.mm, the product ``loss_stats`` uses."""
    if out is None:
        return torch.mm(image_unit, text_unit.t())
    return torch.mm(image_unit, text_unit.t(), out=out)


def loss_stats(image_unit, text_unit, target, scale, lse, target_logit, logit_sum) -> None:
    """See kernel_tables.LossKernels: here one BLAS product, then the row statistics."""
    cosine = torch.mm(image_unit, text_unit.t())
    _ops().cross_entropy_stats(cosine, target, scale, lse, target_logit, logit_sum)


def loss_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad) -> None:
    """See kernel_tables.LossKernels."""
    _ops().cross_entropy_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad)


def loss_stats_grad(
    cosine, target, row_grad, scale, label_smoothing, lse, target_logit, logit_sum, scale_grad
) -> None:
    """See kernel_tables.LossKernels: the row statistics, then the gradient, each row still in
    cache from the first pass."""
    ops = _ops()
    ops.cross_entropy_stats(cosine, target, scale, lse, target_logit, logit_sum)
    ops.cross_entropy_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad)


# --- whole flows as single C++ ops: LossFlowKernels and InjectAutogradKernels -------------------

_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}  # csrc/loss_flow.cpp's Reduction


def cross_entropy_flow(
    inputs: OpInputs, target: torch.Tensor, seed: KernelSeed, settings: FlowSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """See kernel_tables.LossFlowKernels (``pini_native::cross_entropy_flow``)."""
    device = inputs[0].device
    need_bits = sum(1 << index for index, need in enumerate(settings.needs) if need)
    seeds = (native_seed(seed, device), native_seed(text_seed(seed), device))
    lse, target_logit, logit_sum, *grads = _ops().cross_entropy_flow(
        *inputs, target, *seeds, *settings[:-1], need_bits
    )
    grads = [grad if need else None for grad, need in zip(grads, settings.needs, strict=True)]
    return lse, target_logit, logit_sum, grads


def cross_entropy_autograd(
    inputs: OpInputs, target: torch.Tensor, seed: KernelSeed, settings: LossSettings
) -> torch.Tensor:
    """See kernel_tables.LossFlowKernels (``pini_native::cross_entropy``, csrc/loss_flow.cpp)."""
    device = inputs[0].device
    seeds = (native_seed(seed, device), native_seed(text_seed(seed), device))
    num_samples, multiply, reduction, label_smoothing = settings
    reduction_code = _REDUCTION_CODES[reduction]
    return _ops().cross_entropy(
        *inputs, target, *seeds, num_samples, multiply, reduction_code, label_smoothing
    )


def inject_autograd(
    x, mu, sigma, seed: KernelSeed, num_samples, multiply, rows, width, inner, dtype, sample_dim
) -> torch.Tensor:
    """See kernel_tables.InjectAutogradKernels (``pini_native::inject``, csrc/autograd.cpp)."""
    rows_per_chunk = _rows_per_chunk(rows, width, x.device)
    seed = native_seed(seed, x.device)
    layout = (rows, width, inner, rows_per_chunk)
    return _ops().inject(x, mu, sigma, seed, num_samples, multiply, *layout, dtype, sample_dim)
