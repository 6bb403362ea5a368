"""The noise op: the ``eps`` stream of docs/spec.md §3, drawn by a fused backend.

Element ``k`` of a draw with seed ``s`` (row-major, samples first) is lane ``k % 4`` of Triton's
``tl.randn4x(s, k // 4)``: Philox4x32-10 keyed by ``s`` with counter ``k // 4``, then Box-Muller.
Every backend computes the same values with ``kernel_tables.NoiseKernels``'s ``noise_forward``:
``triton/noise_stream.py`` (whose ``@triton.jit`` helpers also draw the noise inside the other
ops' kernels), ``native.py`` (the compiled ``csrc/philox.h``), and ``reference.py`` (integer
tensor ops; the definition the others are tested against). The fused ops never store ``eps``:
their backward draws it again.
"""

from __future__ import annotations

import torch

from . import kernel_tables
from ._host import on_device
from .seeds import kernel_seed


def noise(
    shape: torch.Size, seed: torch.Tensor, device: torch.device, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """The stream of ``seed`` (the op's 0-d int64 seed tensor, on the CPU or on ``device``) as a
    tensor of ``shape`` and ``dtype`` on ``device``."""
    kernels = kernel_tables.noise_kernels(backend)
    seed_arg = kernel_seed(seed, device)
    with on_device(device):
        return kernels.noise_forward(shape.numel(), seed_arg, device, dtype).view(shape)
