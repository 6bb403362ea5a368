"""The noise stream in Triton: element ``k`` is lane ``k % 4`` of ``tl.randn4x(seed, k // 4)``.

Two ways to produce a block of the stream, chosen per launch by a constexpr:
- ``normal_block``: the block starts at a multiple of 4, so each ``randn4x`` call feeds four
  consecutive elements (one Philox call and two Box-Muller pairs per quad);
- ``normal_at``: arbitrary element indices; one Philox call per element, lane picked after.
Both give identical values; the first does a quarter of the work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._host import new_buffer
from .launch import elementwise_config


@triton.jit
def normal_block(seed, first, BLOCK: tl.constexpr):
    """Stream elements ``first .. first + BLOCK - 1`` (``first % 4 == 0``, int64), float32."""
    quad = first // 4 + tl.arange(0, BLOCK // 4)
    n0, n1, n2, n3 = tl.randn4x(seed, quad)
    # interleave(interleave(n0, n2), interleave(n1, n3)) = n0[0], n1[0], n2[0], n3[0], n0[1], ...
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def normal_at(seed, index):
    """Stream elements at int64 ``index`` (any block of indices), float32."""
    n0, n1, n2, n3 = tl.randn4x(seed, index // 4)
    lane = index % 4
    low = tl.where(lane == 0, n0, n1)
    high = tl.where(lane == 2, n2, n3)
    return tl.where(lane < 2, low, high)


@triton.jit
def normal_tile(seed, first, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Stream elements ``first .. first + BLOCK - 1``; ``ALIGNED`` promises ``first % 4 == 0``."""
    if ALIGNED:
        return normal_block(seed, first, BLOCK)
    else:
        return normal_at(seed, first + tl.arange(0, BLOCK))


@triton.jit
def normal_rows(seed, first, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """(ROWS, BLOCK) stream elements ``first[r] .. first[r] + BLOCK - 1`` for an int64 (ROWS,)
    tensor ``first``; ``ALIGNED`` promises every ``first[r] % 4 == 0``."""
    if ALIGNED:
        quad = first[:, None] // 4 + tl.arange(0, BLOCK // 4)[None, :]
        n0, n1, n2, n3 = tl.randn4x(seed, quad)
        return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))
    else:
        return normal_at(seed, first[:, None] + tl.arange(0, BLOCK)[None, :])


@triton.jit
def _noise_kernel(out_ptr, seed, start, numel, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    block_start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = block_start + tl.arange(0, BLOCK)
    values = normal_tile(seed, start + block_start, ALIGNED, BLOCK)
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=offsets < numel)


def noise_forward(
    numel: int, seed: int, device: torch.device, dtype: torch.dtype, start: int = 0
) -> torch.Tensor:
    """Stream elements ``start .. start + numel - 1`` of ``seed`` as a flat tensor of ``dtype``.

    ``start`` exists for tests of the counter arithmetic past 2^32 without a huge tensor.
    """
    out = new_buffer(numel, dtype, device)
    if numel == 0:
        return out
    config = elementwise_config(width=numel, rows=1, device=device)
    grid = (config.column_blocks,)
    _noise_kernel[grid](
        out, seed, start, numel, ALIGNED=start % 4 == 0, BLOCK=config.block,
        num_warps=config.num_warps,
    )  # fmt: skip
    return out
