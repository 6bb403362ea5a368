"""Block sizes, warps and grids for the row-by-column kernels, chosen from the problem size.

The elementwise kernels view their data as ``rows x width`` (row-major). A program owns one block
of ``block`` columns and a chunk of ``rows_per_program`` rows: it loads the per-column noise
parameters once, walks its rows, and (in backward) writes one row of partial parameter sums.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from ..backends import triton_interpreting

# 1024 columns = 8 warps x 4 elements per thread: enough bytes in flight per SM for a
# bandwidth-bound loop, while each element's Philox state and Box-Muller pair stay in registers
# (at 8 elements per thread, 4 warps, the unaligned kernels took 112-168 registers and spilled;
# ptxas -v, tests/gpu_compile_check.py --resources).
MAX_BLOCK_GPU = 1024
NUM_WARPS_GPU = 8
# The interpreter pays per program and per op, not per element: fewer, wider programs.
MAX_BLOCK_INTERPRETER = 16384
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
    rows_per_program: int
    row_chunks: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.column_blocks, self.row_chunks)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def elementwise_config(width: int, rows: int, device: torch.device) -> ElementwiseConfig:
    """Launch configuration for a ``rows x width`` problem on ``device``."""
    on_gpu = device.type == "cuda" and not triton_interpreting()
    max_block = MAX_BLOCK_GPU if on_gpu else MAX_BLOCK_INTERPRETER
    block = min(max(triton.next_power_of_2(width), MIN_BLOCK), max_block)
    column_blocks = triton.cdiv(width, block)
    if column_blocks > MAX_COLUMN_BLOCKS:
        raise ValueError(
            f"a row of {width} elements needs {column_blocks} blocks of {block}, more than the "
            f"grid limit of {MAX_COLUMN_BLOCKS}"
        )
    if on_gpu:
        target_programs = PROGRAMS_PER_SM * _multiprocessor_count(device.index or 0)
    else:
        target_programs = INTERPRETER_TARGET_PROGRAMS
    wanted_chunks = max(1, min(rows, triton.cdiv(target_programs, column_blocks)))
    rows_per_program = max(triton.cdiv(rows, wanted_chunks), triton.cdiv(rows, MAX_ROW_CHUNKS))
    row_chunks = triton.cdiv(rows, rows_per_program)
    return ElementwiseConfig(
        block=block,
        num_warps=NUM_WARPS_GPU if on_gpu else 1,
        column_blocks=column_blocks,
        rows_per_program=rows_per_program,
        row_chunks=row_chunks,
    )
