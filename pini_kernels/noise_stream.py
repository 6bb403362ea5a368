"""The noise op: the ``eps`` stream of docs/spec.md §3, drawn by a fused backend.

Element ``k`` of a draw with seed ``s`` (row-major, samples first) is lane ``k % 4`` of Triton's
``tl.randn4x(s, k // 4)``: Philox4x32-10 keyed by ``s`` with counter ``k // 4``, then Box-Muller.
Every backend computes the same values, with the same function,
``noise_forward(numel, seed, device, dtype, start=0)``: ``triton/noise_stream.py`` (whose
``@triton.jit`` helpers also draw the noise inside the other ops' kernels), ``native.py`` (the
compiled ``csrc/philox.h``), and ``reference.py`` (integer tensor ops; the definition the others
are tested against). The fused ops never store ``eps``: their backward draws it again.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import _checks
from ._host import on_device


def _kernels(backend: str) -> ModuleType:
    """The module with ``noise_forward`` for a fused backend, imported on first use."""
    if backend == "triton":
        from .triton import noise_stream

        return noise_stream
    from . import native  # "cpu" and "cuda"

    return native


def noise(
    shape: torch.Size, seed: torch.Tensor, device: torch.device, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """The stream of ``seed`` (a 0-d int64 tensor on the CPU or on ``device``) as a tensor of
    ``shape`` and ``dtype`` on ``device``."""
    seed_arg = _checks.kernel_seed(seed, device)
    with on_device(device):
        return _kernels(backend).noise_forward(shape.numel(), seed_arg, device, dtype).view(shape)
