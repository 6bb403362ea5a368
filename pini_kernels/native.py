"""The "cpu" and "cuda" backends: glue to the compiled kernels of csrc/ (the ``pini_native`` op
library, ``pini_kernels._C``), one module for both (the dispatcher runs the kernels of the tensors'
device).

The same functions, taking the same arguments, as the Triton backend: ``noise_forward``
(``triton/noise_stream.py``), ``inject_forward`` / ``inject_backward`` (``triton/inject.py``),
``normalize`` / ``normalize_backward`` / ``loss_stats`` / ``loss_stats_grad`` / ``loss_grad``
(``triton/cosine.py``);
the op modules (``noise_stream.py``, ``inject.py``, ``cosine.py``) say what each must do. The
compiled ops write into buffers allocated here or by the op modules, so the tests' NaN poisoning
covers them too, and check their arguments (``csrc/checks.h``).

Every function takes ``seed`` as a Python int or as a 0-d int64 tensor (``_seed_tensor``): on a
GPU the CUDA kernels read a seed tensor on the device, without a sync, so CUDA graphs replay with
fresh noise; the CPU kernels read a CPU tensor on the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._host import new_buffer

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


def _seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The seed as the compiled ops take it: a 0-d int64 tensor where their kernels read it, on
    ``device`` (the data's). The CUDA kernels read it on the GPU, so a CUDA graph captured around
    them draws the noise of the value written into it before each replay; the CPU kernels read it
    on the host. ``seed`` is an int in [0, 2^64) (a uint64 key: text seeds may reach 2^63, stored
    as the int64 of the same bits) or a one-element int64 tensor: on ``device`` it is used as it
    is (no copy, no sync); a CPU tensor for a GPU is read on the host (no sync) and written there
    by a fill kernel, as an int is (no host-to-device copy, so graph capture works too)."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() == 0 and seed.dtype == torch.int64 and seed.device == device:
            return seed  # the common case first: small tensors feel every host-side check
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(
                f"seed must be an int or a one-element int64 tensor, got a {seed.dtype} tensor "
                f"of shape {tuple(seed.shape)}"
            )
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if seed.device == device:
            return seed.reshape(())
        if seed.device.type != "cpu":
            raise ValueError(
                f"seed must be a CPU tensor or on the data's device {device}, got one on "
                f"{seed.device}"
            )
        seed = int(seed)  # a CPU read: no device sync
    key = seed - (1 << 64) if seed >= (1 << 63) else seed
    return torch.full((), key, dtype=torch.int64, device=device)


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """The compiled kernels read fp32 parameters (no call when they already are: small tensors
    pay for every host-side call)."""
    return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)


def noise_forward(
    numel: int, seed: int | torch.Tensor, device: torch.device, dtype: torch.dtype, start: int = 0
) -> torch.Tensor:
    """Stream elements ``start .. start + numel - 1`` of ``seed`` as a flat tensor of ``dtype``.
    Every function here takes ``seed`` as an int or a 0-d int64 tensor (``_seed_tensor``)."""
    out = new_buffer(numel, torch.float32, device)
    if numel:
        _ops().noise(_seed_tensor(seed, device), start, out)
    return out if dtype == torch.float32 else out.to(dtype)


def inject_forward(x, mu, sigma, seed, num_samples, multiply, rows, width, inner, out) -> None:
    """See triton/inject.py's inject_forward; the compiled kernels read fp32 parameters."""
    _ops().inject_forward(
        x, _float32(mu), _float32(sigma), _seed_tensor(seed, x.device),
        num_samples, multiply, rows, width, inner, out,
    )  # fmt: skip


def inject_backward(
    grad_out, x, mu, sigma, seed, num_samples, multiply, rows, width, inner, grad_x,
    need_param_grad,
):  # fmt: skip
    """See triton/inject.py's inject_backward; here a chunk is ROWS_PER_CHUNK rows on the CPU
    and cuda_inject_launch's rows_per_chunk on a GPU."""
    rows_per_chunk = _rows_per_chunk(rows, width, x.device)
    row_chunks = -(-rows // rows_per_chunk)
    partial_mu = partial_sigma = None
    if need_param_grad:
        partial_mu = new_buffer((row_chunks, width), torch.float32, x.device)
        partial_sigma = new_buffer((row_chunks, width), torch.float32, x.device)
    # In add mode x may be autograd's one-element stand-in (inject.py): no kernel reads it there.
    x_data = x.contiguous() if multiply else x
    _ops().inject_backward(
        grad_out, x_data, _float32(mu), _float32(sigma),
        _seed_tensor(seed, grad_out.device), num_samples, multiply, rows, width, inner,
        rows_per_chunk, grad_x, partial_mu, partial_sigma,
    )  # fmt: skip
    return (partial_mu, partial_sigma) if need_param_grad else None


def normalize(features, mu, sigma, seed, stream_offset, multiply, unit, norm) -> None:
    """See triton/cosine.py's normalize."""
    _ops().noisy_normalize(
        features, mu, sigma, _seed_tensor(seed, features.device), stream_offset, multiply, unit,
        norm,
    )  # fmt: skip


def normalize_backward(
    features, mu, sigma, seed, stream_offset, multiply, unit, norm, grad_unit, grad_x, grad_mu,
    grad_sigma,
) -> None:  # fmt: skip
    """See triton/cosine.py's normalize_backward."""
    _ops().noisy_normalize_backward(
        features, mu, sigma, _seed_tensor(seed, features.device), stream_offset, multiply, unit,
        norm, grad_unit, grad_x, grad_mu, grad_sigma,
    )  # fmt: skip


def loss_stats(image_unit, text_unit, target, scale, lse, target_logit, logit_sum) -> None:
    """See triton/cosine.py's loss_stats: here one BLAS product, then the row statistics."""
    cosine = torch.mm(image_unit, text_unit.t())
    _ops().cross_entropy_stats(cosine, target, scale, lse, target_logit, logit_sum)


def loss_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad) -> None:
    """See triton/cosine.py's loss_grad."""
    _ops().cross_entropy_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad)


def loss_stats_grad(
    cosine, target, row_grad, scale, label_smoothing, lse, target_logit, logit_sum, scale_grad
) -> None:
    """See triton/cosine.py's loss_stats_grad: the row statistics, then the gradient, each row
    still in cache from the first pass."""
    ops = _ops()
    ops.cross_entropy_stats(cosine, target, scale, lse, target_logit, logit_sum)
    ops.cross_entropy_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad)
