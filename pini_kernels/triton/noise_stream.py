"""The noise stream in Triton: element ``k`` is lane ``k % 4`` of ``tl.randn4x(seed, k // 4)``.

Two ways to produce a block of the stream, chosen per launch by a constexpr:
- ``normal_block``: the block starts at a multiple of 4, so each ``randn4x`` call feeds four
  consecutive elements (one Philox call and two Box-Muller pairs per quad);
- ``normal_at``: arbitrary element indices; one Philox call and one Box-Muller pair per
  element (the pair of its lane).
Both give identical values; the first runs a quarter of the Philox calls and half the Box-Muller.

Every kernel that draws noise takes its ``seed`` either as an int (``do_not_specialize``: a new seed
per call reuses the compiled kernel) or as a pointer to a 0-d int64 tensor on the GPU, read inside
the kernel (``SEED_IN_MEMORY``; a captured CUDA graph then draws the value written before each
replay). ``seeds.triton_seed_args`` gives both from the kernel seed the op modules pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

from .._host import new_buffer
from ..seeds import triton_seed_args
from .launch import elementwise_config


@triton.jit
def load_seed(seed, SEED_IN_MEMORY: tl.constexpr):
    """The stream's 64-bit seed: the int argument, or the int64 that ``seed`` points to. Keys
    past 2^63 (a text stream's ``seed + 1``) arrive wrapped to negative int64 and have the same
    64 bits, which is all ``tl.randn4x`` uses."""
    return tl.load(seed) if SEED_IN_MEMORY else seed


@triton.jit
def normal_block(seed, first, BLOCK: tl.constexpr):
    """Stream elements ``first .. first + BLOCK - 1`` (``first % 4 == 0``, int64), float32."""
    quad = first // 4 + tl.arange(0, BLOCK // 4)
    n0, n1, n2, n3 = tl.randn4x(seed, quad)
    # interleave(interleave(n0, n2), interleave(n1, n3)) = n0[0], n1[0], n2[0], n3[0], n0[1], ...
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def normal_at(seed, index):
    """Stream elements at int64 ``index`` (any block of indices), float32.

    The same operations as ``tl.randn4x`` (its Philox words, uniforms and Box-Muller), but only
    the Box-Muller pair of each element's lane: half the transcendentals and live values of
    drawing all four lanes and picking one after (224 -> fewer registers in the row kernels).
    """
    c0, c1, c2, c3 = tl.randint4x(seed, index // 4)
    lane = index % 4
    first_pair = lane < 2
    u_radius = uint_to_uniform_float(tl.where(first_pair, c0, c2))
    u_angle = uint_to_uniform_float(tl.where(first_pair, c1, c3))
    by_cos, by_sin = pair_uniform_to_normal(u_radius, u_angle)
    return tl.where(lane % 2 == 0, by_cos, by_sin)


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


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(
    out_ptr,
    seed,
    start,
    numel,
    SEED_IN_MEMORY: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    block_start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = block_start + tl.arange(0, BLOCK)
    values = normal_tile(load_seed(seed, SEED_IN_MEMORY), start + block_start, ALIGNED, BLOCK)
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=offsets < numel)


def noise_forward(
    numel: int, seed: int | torch.Tensor, device: torch.device, dtype: torch.dtype, start: int = 0
) -> torch.Tensor:
    """Stream elements ``start .. start + numel - 1`` of ``seed`` (an int, or a 0-d int64 tensor
    on ``device``, read by the kernel) as a flat tensor of ``dtype``.

    ``start`` exists for tests of the counter arithmetic past 2^32 without a huge tensor.
    """
    out = new_buffer(numel, dtype, device)
    if numel == 0:
        return out
    config = elementwise_config(width=numel, rows=1, device=device, aligned=start % 4 == 0)
    grid = (config.column_blocks,)
    seed, seed_in_memory = triton_seed_args(seed)
    _noise_kernel[grid](
        out,
        seed,
        start,
        numel,
        SEED_IN_MEMORY=seed_in_memory,
        ALIGNED=start % 4 == 0,
        BLOCK=config.block,
        **config.launch_options,
    )
    return out
