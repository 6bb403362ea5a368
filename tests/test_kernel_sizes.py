"""Sizes past one block, chunk and tile (and a multiple of none), on every fused backend.

What each kernel splits its work into, and so what a size must cross:
- Triton (pini_kernels/ops/launch.py): a program owns ``block`` columns, 16384 under the
  interpreter and 1024 on a GPU, and a chunk of rows: one chunk under the interpreter, several on
  a GPU. ``small_triton_programs`` below forces small blocks and several row chunks on CPU.
- CPU (csrc/cpu/kernels.cpp): ``noise`` fills 4096-element chunks in 256-element batches; inject
  tiles are 2048 columns by ``ROWS_PER_CHUNK["cpu"]`` = 64 rows in backward.
- CUDA: ``ROWS_PER_CHUNK["cuda"]`` = 8 rows per backward chunk.
Every output is poisoned with NaN (conftest.py), so an element no program writes fails.
"""

import pytest
import torch
from conftest import backend_device
from helpers import assert_close, compare_inject_with_reference, record_error, stream_generator

import pini_kernels
from pini_kernels import reference
from pini_kernels._layout import broadcast_layout
from pini_kernels.native import ROWS_PER_CHUNK
from pini_kernels.ops import launch

# More than two interpreter blocks (16384), 4096-element CPU chunks and 1024-element GPU blocks,
# and a multiple of none of them (nor of 4, so the last quad is cut).
STREAM_LENGTH = 40_005
STREAM_ATOL, STREAM_RTOL = 1e-5, 1e-5
CPU_COLUMN_TILE = 2048
CPU_ROWS_PER_CHUNK = ROWS_PER_CHUNK["cpu"]


@pytest.mark.parametrize("shape", [(STREAM_LENGTH,), (3, 5, 2667)])
def test_noise_spans_several_blocks(fused_backend, shape):
    """Every element of a draw of several blocks/chunks equals the reference stream."""
    device = backend_device(fused_backend)
    seed = 2**33 + 17
    actual = pini_kernels.noise(shape, seed=seed, device=device, backend=fused_backend)
    numel = actual.numel()
    assert numel > 2 * launch.MAX_BLOCK_INTERPRETER and numel % 4 != 0
    expected = reference.normal_stream(seed, 0, numel, device=device).view(shape)
    error = assert_close(actual, expected, atol=STREAM_ATOL, rtol=STREAM_RTOL, name="noise")
    record_error(f"stream: {fused_backend} {STREAM_LENGTH} elements vs reference", error)


@pytest.mark.parametrize("start", [3, 4 * 2**32 - 20_002])
def test_noise_unaligned_start_spans_several_blocks(fused_backend, start):
    """The unaligned-start path over several blocks/chunks, across counter 2^32 for one start."""
    device = backend_device(fused_backend)
    seed = 31337
    actual = stream_generator(fused_backend)(
        STREAM_LENGTH, seed, device, torch.float32, start=start
    )
    expected = reference.normal_stream(seed, start, STREAM_LENGTH, device=device)
    error = assert_close(actual, expected, atol=STREAM_ATOL, rtol=STREAM_RTOL, name="stream")
    record_error(f"stream: {fused_backend} {STREAM_LENGTH} elements vs reference", error)


def _inputs(x_shape, param_shape, device):
    x = torch.randn(x_shape, device=device)
    mu = torch.randn(param_shape, device=device)
    sigma = torch.rand(param_shape, device=device) + 0.1
    return x, mu, sigma


# (x shape, mu/sigma shape) wider than two interpreter blocks and many GPU blocks and CPU tiles.
WIDE_PATTERNS = {
    # rows 2 x width 40001 (odd: the unaligned stream path), one parameter per column.
    "per-feature": ((2, 40_001), (40_001,)),
    # rows 1 x width 40008 (a multiple of 4: the aligned stream path), parameters like x.
    "per-row": ((3, 13_336), (3, 13_336)),
    # rows 1 x width 40004, 10001 consecutive elements share a parameter.
    "leading": ((4, 10_001), (4, 1)),
}


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("pattern", list(WIDE_PATTERNS))
def test_inject_spans_several_blocks(fused_backend, pattern, mode):
    """fused_inject forward and backward past one block/tile, against the reference."""
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs(*WIDE_PATTERNS[pattern], device)
    assert x.numel() > 2 * launch.MAX_BLOCK_INTERPRETER
    compare_inject_with_reference(fused_backend, x, mu, sigma, mode=mode, num_samples=2, seed=77)


@pytest.fixture
def small_triton_programs(monkeypatch):
    """Triton under the interpreter launched like a GPU: 32-column blocks, 8 programs wanted, so
    rows split into several chunks (no effect on a real GPU, which splits them anyway)."""
    monkeypatch.setattr(launch, "MAX_BLOCK_INTERPRETER", 32)
    monkeypatch.setattr(launch, "INTERPRETER_TARGET_PROGRAMS", 8)


def _many_rows(backend: str) -> int:
    """Two backward row chunks and 3 rows more: 131 rows on CPU, 19 on CUDA and Triton. Triton's
    chunks follow the grid (launch.py): with small_triton_programs, 19 rows of 2 column blocks
    give 4 row chunks of 5 rows, the last cut to 4."""
    return 2 * ROWS_PER_CHUNK.get(backend, 8) + 3


# rows -> (x shape, mu/sigma shape); none of the widths is a multiple of a block or tile.
MANY_ROW_PATTERNS = {
    "per-feature": lambda rows: ((rows, 37), (37,)),  # (D,): rows x 37
    "shared-embeddings": lambda rows: ((rows, 5, 9), (5, 9)),  # (L, D): rows x 45
    # (B, D): one row of rows x 35 columns, on CPU 4585 = two 2048-column tiles and 489.
    "per-row": lambda rows: ((rows, 35), (rows, 35)),
    "per-channel": lambda rows: ((rows, 3, 4, 5), (3, 1, 1)),  # (C, 1, 1): 20 columns each
}


@pytest.mark.usefixtures("small_triton_programs")
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("pattern", list(MANY_ROW_PATTERNS))
def test_inject_more_rows_than_one_chunk(fused_backend, pattern, mode):
    """Forward and backward with the last row chunk (and column tile or block) cut short."""
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs(*MANY_ROW_PATTERNS[pattern](_many_rows(fused_backend)), device)
    layout = broadcast_layout(x.shape, mu.shape)
    if fused_backend == "cpu":
        assert layout.rows > CPU_ROWS_PER_CHUNK or layout.width > CPU_COLUMN_TILE
    elif fused_backend == "triton" and device.type == "cpu":
        config = launch.elementwise_config(layout.width, layout.rows, device)
        assert config.column_blocks > 1 and (config.row_chunks > 1 or layout.rows == 1)
    compare_inject_with_reference(fused_backend, x, mu, sigma, mode=mode, num_samples=2, seed=5)


@pytest.mark.usefixtures("small_triton_programs")
@pytest.mark.parametrize("needs", ["x-only", "params-only"])
def test_inject_backward_partial_grads_many_rows(fused_backend, needs):
    """Backward kernels' x-only and parameter-only paths past one row chunk (add mode)."""
    device = backend_device(fused_backend)
    rows = _many_rows(fused_backend)
    x, mu, sigma = _inputs((rows, 37), (37,), device)
    x.requires_grad_(needs == "x-only")
    mu.requires_grad_(needs == "params-only")
    sigma.requires_grad_(needs == "params-only")
    leaves = [t for t in (x, mu, sigma) if t.requires_grad]
    grad_weights = torch.randn(2, rows, 37, device=device)
    kwargs = dict(num_samples=2, seed=8)
    got = pini_kernels.fused_inject(x, mu, sigma, backend=fused_backend, **kwargs)
    want = pini_kernels.fused_inject(x, mu, sigma, backend="reference", **kwargs)
    got_grads = torch.autograd.grad((got * grad_weights).sum(), leaves)
    want_grads = torch.autograd.grad((want * grad_weights).sum(), leaves)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        scale = max(1.0, want_grad.abs().max().item())
        assert_close(got_grad, want_grad, atol=1e-5 * scale, rtol=1e-5, name="grad")
