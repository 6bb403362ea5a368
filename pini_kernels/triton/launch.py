"""Block sizes, warps and grids for the row-by-column kernels, chosen from the problem size.

The elementwise kernels view their data as ``rows x width`` (row-major). A program owns one block
of ``block`` columns and a chunk of ``rows_per_program`` rows: it loads the per-column noise
parameters once, walks its rows a tile of ``rows_per_tile`` rows at a time (several for narrow
widths, so a tile holds about ``MAX_BLOCK_GPU`` elements), and (in backward) writes one row of
partial parameter sums. Warps follow the tile: ``ELEMENTS_PER_THREAD`` elements a thread.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from ..backends import triton_interpreting

# 1024 elements a tile = 8 warps x 4 elements per thread: enough bytes in flight per SM for a
# bandwidth-bound loop, while each element's Philox state and Box-Muller pair stay in registers
# (at 8 elements per thread, 4 warps, the unaligned kernels took 112-168 registers and spilled;
# ptxas -v, tests/gpu_compile_check.py --resources). A narrower tile gets fewer warps (a 64-wide
# row, one row a tile, would leave 240 of 256 threads idle), a narrow width more rows a tile.
MAX_BLOCK_GPU = 1024
NUM_WARPS_GPU = 8
ELEMENTS_PER_THREAD = 4
# A register cap for these kernels on a GPU: left to itself, ptxas gave the aligned fp32 kernels
# with a seed in memory 32 registers and spilled 8 bytes; capped at 64 they take 34-58 and do not
# spill (tests/gpu_compile_check.py --resources compiles them with the same cap). Unaligned rows
# draw one Philox block per element instead of per four: their backward needs up to 80.
MAX_REGISTERS_GPU = 64
MAX_REGISTERS_UNALIGNED_GPU = 96
# The interpreter pays per program and per op, not per element: fewer, wider programs and tiles.
MAX_BLOCK_INTERPRETER = 16384
TILE_ELEMENTS_INTERPRETER = 16384
# At least 16 so that a block holds whole quads of the noise stream (and a power of two).
MIN_BLOCK = 16
# Grid target on a GPU: about this many programs per SM hide memory latency; more only adds
# partial-sum rows for backward to reduce.
PROGRAMS_PER_SM = 8
# Grid target under the interpreter, which runs programs one by one: one program per column block
# is enough. Tests raise it to split the rows into several chunks, the path a GPU takes.
INTERPRETER_TARGET_PROGRAMS = 1
# CUDA caps grid dimension 1 at 65535.
MAX_ROW_CHUNKS = 65535
MAX_COLUMN_BLOCKS = 2**31 - 1


@dataclass(frozen=True)
class ElementwiseConfig:
    block: int
    num_warps: int
    column_blocks: int
    rows_per_program: int  # a multiple of rows_per_tile
    row_chunks: int
    rows_per_tile: int  # a power of two
    max_registers: int | None  # ptxas's register cap (maxnreg) on a GPU

    @property
    def launch_options(self) -> dict:
        """Triton's launch options: the warps, and on a GPU the register cap."""
        options = {"num_warps": self.num_warps}
        if self.max_registers is not None:
            options["maxnreg"] = self.max_registers
        return options

    @property
    def grid(self) -> tuple[int, int]:
        return (self.column_blocks, self.row_chunks)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def warps_for(tile_elements: int) -> int:
    """Warps of a GPU program whose tile holds ``tile_elements`` (a power of two) elements."""
    return max(1, min(NUM_WARPS_GPU, tile_elements // (32 * ELEMENTS_PER_THREAD)))


def elementwise_config(
    width: int,
    rows: int,
    device: torch.device,
    multiprocessors: int | None = None,
    aligned: bool = True,
) -> ElementwiseConfig:
    """Launch configuration for a ``rows x width`` problem on ``device`` (``multiprocessors``:
    the GPU's SM count, read from the device when None; ``aligned``: every row's first stream
    element is a multiple of 4, the kernels' ALIGNED)."""
    on_gpu = device.type == "cuda" and not triton_interpreting()
    max_block = MAX_BLOCK_GPU if on_gpu else MAX_BLOCK_INTERPRETER
    block = min(max(triton.next_power_of_2(width), MIN_BLOCK), max_block)
    column_blocks = triton.cdiv(width, block)
    if column_blocks > MAX_COLUMN_BLOCKS:
        raise ValueError(
            f"a row of {width} elements needs {column_blocks} blocks of {block}, more than the "
            f"grid limit of {MAX_COLUMN_BLOCKS}"
        )
    tile_elements = MAX_BLOCK_GPU if on_gpu else TILE_ELEMENTS_INTERPRETER
    rows_per_tile = min(triton.next_power_of_2(max(rows, 1)), max(1, tile_elements // block))
    if on_gpu:
        if multiprocessors is None:
            multiprocessors = _multiprocessor_count(device.index or 0)
        target_programs = PROGRAMS_PER_SM * multiprocessors
    else:
        target_programs = INTERPRETER_TARGET_PROGRAMS
    wanted_chunks = max(1, min(rows, triton.cdiv(target_programs, column_blocks)))
    rows_per_program = max(triton.cdiv(rows, wanted_chunks), triton.cdiv(rows, MAX_ROW_CHUNKS))
    rows_per_program = triton.cdiv(rows_per_program, rows_per_tile) * rows_per_tile
    return ElementwiseConfig(
        block=block,
        num_warps=warps_for(rows_per_tile * block) if on_gpu else 1,
        column_blocks=column_blocks,
        rows_per_program=rows_per_program,
        row_chunks=triton.cdiv(rows, rows_per_program),
        rows_per_tile=rows_per_tile,
        max_registers=(MAX_REGISTERS_GPU if aligned else MAX_REGISTERS_UNALIGNED_GPU)
        if on_gpu
        else None,
    )
