"""The CUDA backend's launch arithmetic and the properties of its kernels that a CPU can check.

The grid of the CUDA inject kernels comes from ``csrc/inject_launch.h``, compiled into every build
and reached through ``pini_kernels.native.cuda_inject_launch`` (the same function the CUDA glue and
launcher use), so it is tested here without a GPU. The kernels of ``csrc/cuda/kernels.cu`` run
here too, on the CPU, under a small emulator (below). Tests marked ``needs_gpu`` run them on a GPU
(``benchmarks/gpu_check.sh`` runs them on a GPU machine).
"""

import ctypes
import math
import mmap
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FUSED_BACKENDS
from helpers import assert_close

import pini_kernels
from pini_kernels import native, reference

CSRC = Path(__file__).parents[1] / "csrc"

needs_native = pytest.mark.skipif(
    "cpu" not in pini_kernels.available_backends(), reason="native extension not built"
)
needs_gpu = pytest.mark.skipif(
    "cuda" not in FUSED_BACKENDS, reason="needs a CUDA GPU and the CUDA kernels"
)

THREADS_PER_BLOCK = 256
MAX_ROW_CHUNKS = 65535  # CUDA's limit on grid dimension y
H100_MULTIPROCESSORS = 132


@needs_native
def test_launch_for_2_20_rows_of_64():
    """x of shape (2^20, 64) with a per-feature mu: the fixed 8 rows per chunk this replaces
    needed 131,072 row chunks, past the grid's 65,535. Now: 16 column threads (64 columns, 4
    each) x 16 row lanes, and about 8 blocks per SM: ceil(2^20 / 1056) = 993 rows per chunk."""
    launch = native.cuda_inject_launch(2**20, 64, H100_MULTIPROCESSORS)
    assert launch == native.CudaInjectLaunch(
        column_threads=16, row_lanes=16, column_blocks=1, rows_per_chunk=993, row_chunks=1056
    )
    old_fixed_chunks = -(-(2**20) // 8)  # 8 rows per chunk, the old fixed size
    assert old_fixed_chunks > MAX_ROW_CHUNKS


@needs_native
@pytest.mark.parametrize(
    ("width", "multiprocessors", "expected"),
    [
        # 8 blocks per SM wanted: ceil(2^31 / 1056) = 2,033,602 rows per chunk.
        (64, H100_MULTIPROCESSORS, (16, 16, 1, 2_033_602, 1056)),
        # One column per row: one column thread, 256 row lanes.
        (1, H100_MULTIPROCESSORS, (1, 256, 1, 2_033_602, 1056)),
        # 1024 column blocks of a 2^20-wide row already fill the GPU: 2 chunks of 2^30 rows.
        (2**20, H100_MULTIPROCESSORS, (256, 1, 1024, 2**30, 2)),
        # A GPU wanting 800,000 blocks: the grid's limit binds, ceil(2^31 / 65535) = 32,769 rows.
        (4, 100_000, (1, 256, 1, 32_769, 65_535)),
    ],
)
def test_launch_for_2_31_rows(width, multiprocessors, expected):
    launch = native.cuda_inject_launch(2**31, width, multiprocessors)
    assert launch == native.CudaInjectLaunch(*expected)


@needs_native
@pytest.mark.parametrize("rows", [0, 1, 3, 15, 17, 1000, 524_281, 2**20 + 7, 2**31, 2**40 + 1])
@pytest.mark.parametrize("width", [1, 3, 4, 7, 64, 100, 1023, 1024, 1025, 40_001])
@pytest.mark.parametrize("multiprocessors", [1, 108, 132])
def test_launch_covers_every_element_within_the_grid_limits(rows, width, multiprocessors):
    """Every row and column has a thread, within CUDA's grid limits, and no block is mostly idle:
    at least half of a block's column threads have columns (narrow rows get more row lanes)."""
    launch = native.cuda_inject_launch(rows, width, multiprocessors)
    assert launch.column_threads * launch.row_lanes == THREADS_PER_BLOCK
    assert launch.column_threads & (launch.column_threads - 1) == 0  # a power of two
    quads = math.ceil(width / 4)  # a thread owns 4 consecutive columns
    assert launch.column_blocks == math.ceil(quads / launch.column_threads)
    assert launch.column_blocks <= 2**31 - 1
    if launch.column_blocks == 1:  # every block has at least half its column threads busy
        assert 2 * quads > launch.column_threads
    assert 1 <= launch.row_chunks <= MAX_ROW_CHUNKS or (rows == 0 and launch.row_chunks == 0)
    assert launch.row_chunks * launch.rows_per_chunk >= rows  # every row in a chunk
    assert (launch.row_chunks - 1) * launch.rows_per_chunk < max(rows, 1)  # no empty chunk
    assert launch.rows_per_chunk >= launch.row_lanes  # every row lane has a row
    # About 8 blocks per SM: no more row chunks than that asks for.
    assert launch.row_chunks <= max(1, math.ceil(8 * multiprocessors / launch.column_blocks))


@needs_native
def test_cuda_inject_launch_checks_its_arguments():
    with pytest.raises(RuntimeError, match="rows and width must be >= 0, got -1 and 4"):
        native.cuda_inject_launch(-1, 4, 132)


# --- on a GPU ----------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("mode", ["add", "mul"])
def test_cuda_backward_with_more_rows_than_fixed_chunks_allowed(mode):
    """(2^20, 64) with a per-feature mu raised "too many row chunks" with 8 rows per chunk; now
    it runs, and matches the reference."""
    x = torch.randn(2**20, 64, device="cuda")
    mu = torch.randn(64, device="cuda")
    sigma = torch.rand(64, device="cuda") + 0.1
    grad_weights = torch.randn(2**20, 64, device="cuda")
    results = {}
    for backend in ("cuda", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (x, mu, sigma)]
        out = pini_kernels.fused_inject(*leaves, mode=mode, seed=3, backend=backend)
        (out * grad_weights).sum().backward()
        results[backend] = [out, *(leaf.grad for leaf in leaves)]
    for name, got, want in zip(("out", "x", "mu", "sigma"), *results.values(), strict=True):
        scale = max(1.0, want.abs().max().item())
        assert_close(
            got,
            want,
            atol=1e-5 * scale * (1 if name in ("out", "x") else 100),
            rtol=1e-4,
            name=name,
        )


# --- the CUDA kernels themselves, run on the CPU -------------------------------------------------
#
# Without a GPU, csrc/cuda/kernels.cu still runs here under a small emulator: the file is compiled
# by the host C++ compiler with one std::thread per CUDA thread (a block at a time, all its threads
# at once), __syncthreads and warp shuffles through barriers, and __shared__ arrays as statics.
# Its `kernel<<<grid, threads, 0, stream>>>(...)` launches become calls of the emulator. This runs
# the kernels' own index arithmetic, aligned and unaligned paths, half conversions and the
# backward's shared-memory reduction against the reference; what it cannot show (the GPU's memory
# model, speed) the GPU check covers.

EMULATOR_SHIM = r"""
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> exchange;
};
inline Block* block = nullptr;
inline thread_local uint3 thread_index, block_index;
inline thread_local dim3 block_dim;

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid;
  unsigned threads;
  template <typename... Args>
  void operator()(Args... args) const {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block state;
        state.all = std::make_unique<std::barrier<>>(threads);
        for (unsigned w = 0; w < threads / 32; ++w)
          state.warps.push_back(std::make_unique<std::barrier<>>(32));
        state.exchange.resize(threads);
        block = &state;
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            thread_index = {t, 0, 0};
            block_index = {x, y, 0};
            block_dim = dim3(threads);
            kernel(args...);
            state.all->arrive_and_drop();  // an exited thread no longer holds barriers up
            state.warps[t / 32]->arrive_and_drop();
          });
        }
        for (auto& thread : pool) thread.join();
      }
    }
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, unsigned threads) {
  return {kernel, grid, threads};
}
}  // namespace emu

#define threadIdx ::emu::thread_index
#define blockIdx ::emu::block_index
#define blockDim ::emu::block_dim
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

inline void __syncthreads() { emu::block->all->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int offset) {
  const unsigned thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  emu::block->exchange[thread] = value;
  emu::block->warps[warp]->arrive_and_wait();
  const float other = emu::block->exchange[warp * 32 + (lane ^ offset)];
  emu::block->warps[warp]->arrive_and_wait();
  return other;
}

template <typename T>
T __ldg(const T* pointer) { return *pointer; }
using std::max;
using std::min;
"""

EMULATOR_ENTRY_POINTS = r"""
using namespace pini;
using cuda::Dtype;

extern "C" {
void emu_noise(const int64_t* seed, int64_t start, int64_t count, float* out) {
  cuda::normal_fill(seed, start, count, out, nullptr);
}

void emu_inject_forward(const void* x, int x_dtype, const float* mu, const float* sigma, void* out,
                        int out_dtype, const int64_t* seed, int64_t rows, int64_t width,
                        int64_t inner, int64_t num_samples, bool multiply,
                        int64_t multiprocessors) {
  const cuda::InjectShape shape{rows, width, inner, num_samples, multiply};
  cuda::inject_forward(x, Dtype(x_dtype), mu, sigma, out, Dtype(out_dtype), seed, shape,
                       launch::inject_launch(rows, width, multiprocessors), nullptr);
}

void emu_inject_backward(const void* grad_out, int out_dtype, const void* x, int x_dtype,
                         const float* mu, const float* sigma, void* grad_x, float* partial_mu,
                         float* partial_sigma, const int64_t* seed, int64_t rows, int64_t width,
                         int64_t inner, int64_t num_samples, bool multiply,
                         int64_t rows_per_chunk) {
  const cuda::InjectShape shape{rows, width, inner, num_samples, multiply};
  cuda::inject_backward(grad_out, Dtype(out_dtype), x, Dtype(x_dtype), mu, sigma, grad_x,
                        partial_mu, partial_sigma, seed, shape,
                        launch::inject_launch_for_chunks(rows, width, rows_per_chunk), nullptr);
}

cuda::FeatureRows rows_of(const void* x, int x_dtype, int64_t x_row_stride, const float* mu,
                          const float* sigma, const int64_t* strides, int64_t rows, int64_t dim,
                          bool multiply) {
  return {{x, Dtype(x_dtype)}, x_row_stride, mu, sigma, strides[0], strides[1], strides[2],
          strides[3], rows, dim, multiply};
}

void emu_normalize(const void* x, int x_dtype, int64_t x_row_stride, const float* mu,
                   const float* sigma, const int64_t* strides, int64_t rows, int64_t dim,
                   bool multiply, const int64_t* seed, int64_t stream_offset, float* unit,
                   float* norm) {
  cuda::noisy_normalize(rows_of(x, x_dtype, x_row_stride, mu, sigma, strides, rows, dim, multiply),
                        seed, stream_offset, unit, norm, nullptr);
}

void emu_normalize_backward(const void* x, int x_dtype, int64_t x_row_stride, const float* mu,
                            const float* sigma, const int64_t* strides, int64_t rows, int64_t dim,
                            bool multiply, const int64_t* seed, int64_t stream_offset,
                            const float* unit, const float* norm, const float* grad_unit,
                            float* grad_x, float* grad_mu, float* grad_sigma) {
  cuda::noisy_normalize_backward(
      rows_of(x, x_dtype, x_row_stride, mu, sigma, strides, rows, dim, multiply), seed,
      stream_offset, unit, norm, grad_unit, grad_x, grad_mu, grad_sigma, nullptr);
}
}
"""

CXX = shutil.which("c++") or shutil.which("g++")
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cuda::Dtype


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    """csrc/cuda/kernels.cu compiled for the CPU emulator, as a ctypes library."""
    if CXX is None or not (CUDA_INCLUDE / "cuda_fp16.h").exists():
        pytest.skip("needs a C++ compiler and the CUDA toolkit's headers")
    source = (CSRC / "cuda" / "kernels.cu").read_text()
    launches = re.compile(r"(\w+)<<<(.+?), (\w+), 0, stream>>>\(")
    rewritten, count = launches.subn(r"::emu::launch(\1, \2, \3)(", source)
    assert count >= 7, "the emulator no longer recognizes kernels.cu's launches"
    folder = tmp_path_factory.mktemp("cuda_emulator")
    harness = folder / "harness.cpp"
    harness.write_text(
        f'{EMULATOR_SHIM}\n#line 1 "kernels.cu"\n{rewritten}\n{EMULATOR_ENTRY_POINTS}'
    )
    library = folder / "kernels_emulated.so"
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas"]
    includes = [f"-I{CSRC / 'cuda'}", f"-I{CUDA_INCLUDE}"]
    command = [CXX, *flags, *includes, str(harness), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if "<barrier>" in result.stderr or "barrier: No such file" in result.stderr:
        pytest.skip("the C++ compiler lacks C++20's <barrier> (GCC 11 or later has it)")
    assert result.returncode == 0, result.stderr[-6000:]
    return ctypes.CDLL(str(library))


def _address(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())


def _nan(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize(("start", "count", "offset"), [(0, 1001, 0), (3, 1001, 0), (8, 64, 1)])
def test_emulated_noise_kernel(emulated_kernels, start, count, offset):
    """normal_fill: aligned (one Philox call, a float4 store) and unaligned starts and buffers."""
    seed = torch.tensor(2**63 + 9 - 2**64)
    buffer = _nan(count + offset)
    out = buffer[offset:]
    emulated_kernels.emu_noise(
        _address(seed), ctypes.c_int64(start), ctypes.c_int64(count), _address(out)
    )
    want = reference.normal_stream(2**63 + 9, start, count)
    assert_close(out, want, atol=1e-5, rtol=1e-5, name="noise")


# (rows, width, inner): aligned narrow rows, unaligned rows, one column, shared parameters.
INJECT_LAYOUTS = [(37, 64, 1), (19, 37, 1), (300, 1, 1), (6, 40, 10), (3, 1030, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("multiply", [False, True])
@pytest.mark.parametrize(("rows", "width", "inner"), INJECT_LAYOUTS)
def test_emulated_inject_kernels(emulated_kernels, rows, width, inner, multiply, dtype):
    """inject forward and backward (grad_x and every chunk's partial sums) against hand-computed
    gradients from the reference stream, with several row chunks (3 rows each) in backward."""
    samples, seed_value = 2, 41
    seed = torch.tensor(seed_value)
    x = torch.randn(rows, width).to(dtype)
    mu, sigma = torch.randn(width // inner), torch.rand(width // inner) + 0.1
    out = _nan(samples, rows, width, dtype=dtype)
    code = DTYPE_CODES[dtype]
    emulated_kernels.emu_inject_forward(
        _address(x),
        code,
        _address(mu),
        _address(sigma),
        _address(out),
        code,
        _address(seed),
        *(ctypes.c_int64(v) for v in (rows, width, inner, samples)),
        ctypes.c_bool(multiply),
        ctypes.c_int64(1),
    )
    eps = reference.normal_stream(seed_value, 0, samples * rows * width).view(samples, rows, width)
    mu_full, sigma_full = mu.repeat_interleave(inner), sigma.repeat_interleave(inner)
    noise = mu_full + sigma_full * eps
    x32 = x.float()
    want = x32 * noise if multiply else x32 + noise
    atol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert_close(out.float(), want, atol=atol, rtol=atol, name="out")

    rows_per_chunk = 3
    chunks = -(-rows // rows_per_chunk)
    grad_out = torch.randn(samples, rows, width).to(dtype)
    grad_x, partial_mu, partial_sigma = (
        _nan(rows, width, dtype=dtype),
        _nan(chunks, width),
        _nan(chunks, width),
    )
    emulated_kernels.emu_inject_backward(
        _address(grad_out),
        code,
        _address(x),
        code,
        _address(mu),
        _address(sigma),
        _address(grad_x),
        _address(partial_mu),
        _address(partial_sigma),
        _address(seed),
        *(ctypes.c_int64(v) for v in (rows, width, inner, samples)),
        ctypes.c_bool(multiply),
        ctypes.c_int64(rows_per_chunk),
    )
    g = grad_out.float()
    want_grad_x = (g * noise).sum(0) if multiply else g.sum(0)
    assert_close(grad_x.float(), want_grad_x, atol=atol * 4, rtol=atol, name="grad_x")
    factor = x32 if multiply else torch.ones_like(x32)
    per_row_mu = (g * factor).sum(0)  # (rows, width)
    per_row_sigma = (g * factor * eps).sum(0)
    padded = chunks * rows_per_chunk - rows
    for name, got, per_row in (
        ("mu", partial_mu, per_row_mu),
        ("sigma", partial_sigma, per_row_sigma),
    ):
        want_partial = (
            torch.cat([per_row, per_row.new_zeros(padded, width)])
            .view(chunks, rows_per_chunk, width)
            .sum(1)
        )
        assert_close(got, want_partial, atol=1e-4, rtol=1e-4, name=f"partial_{name}")


@pytest.mark.parametrize("multiply", [False, True])
@pytest.mark.parametrize(
    ("rows", "dim", "stream_offset", "with_noise"),
    [(9, 64, 9 * 64, True), (9, 37, 5, True), (3, 300, 0, True), (10, 68, 0, False)],
)
def test_emulated_normalize_kernels(
    emulated_kernels, rows, dim, stream_offset, with_noise, multiply
):
    """noisy_normalize and its backward (which adds to its accumulators) against float64 autograd
    of the same computation, for rows spanning two blocks of 8 warps, aligned and unaligned D,
    rows of x 4 elements further apart than D, and parameters broadcast by strides."""
    seed_value = 77
    seed = torch.tensor(seed_value)
    storage = torch.randn(rows, dim + 4)
    x = storage[:, :dim]  # rows dim + 4 elements apart
    mu, sigma = torch.randn(dim), torch.rand(rows, 1) + 0.1  # per column, per row
    strides = torch.tensor([0, 1, 1, 0], dtype=torch.int64)  # mu (row, col), sigma (row, col)
    unit, norm = _nan(rows, dim), _nan(rows)
    shape_args = (ctypes.c_int64(rows), ctypes.c_int64(dim), ctypes.c_bool(multiply))
    noise_args = (_address(mu), _address(sigma)) if with_noise else (_address(None),) * 2
    emulated_kernels.emu_normalize(
        _address(x),
        0,
        ctypes.c_int64(dim + 4),
        *noise_args,
        _address(strides),
        *shape_args,
        _address(seed),
        ctypes.c_int64(stream_offset),
        _address(unit),
        _address(norm),
    )
    leaves = [x.double(), mu.expand(rows, dim).double(), sigma.expand(rows, dim).double()]
    leaves = [leaf.clone().requires_grad_(True) for leaf in leaves]
    features, mu_full, sigma_full = leaves
    values = features
    if with_noise:
        eps = reference.normal_stream(seed_value, stream_offset, rows * dim).view(rows, dim)
        noise = mu_full + sigma_full * eps.double()
        values = features * noise if multiply else features + noise
    want_norm = values.norm(dim=1)
    want_unit = values / want_norm.clamp_min(1e-12).unsqueeze(1)
    assert_close(unit, want_unit.float().detach(), atol=1e-5, rtol=1e-5, name="unit")
    assert_close(norm, want_norm.float().detach(), atol=1e-5, rtol=1e-5, name="norm")

    grad_unit = torch.randn(rows, dim)
    bases = [torch.randn(rows, dim) for _ in range(3)]  # the kernel adds to what is there
    accumulators = [base.clone() for base in bases]
    grad_noise_args = (
        (_address(accumulators[1]), _address(accumulators[2]))
        if with_noise
        else (_address(None),) * 2
    )
    emulated_kernels.emu_normalize_backward(
        _address(x),
        0,
        ctypes.c_int64(dim + 4),
        *noise_args,
        _address(strides),
        *shape_args,
        _address(seed),
        ctypes.c_int64(stream_offset),
        _address(unit),
        _address(norm),
        _address(grad_unit),
        _address(accumulators[0]),
        *grad_noise_args,
    )
    needed = leaves if with_noise else leaves[:1]
    grads = torch.autograd.grad((want_unit * grad_unit.double()).sum(), needed)
    names = ("x", "mu", "sigma")[: len(grads)]
    for name, accumulator, base, grad in zip(names, accumulators, bases, grads, strict=False):
        assert_close(accumulator, base + grad.float(), atol=1e-5, rtol=1e-4, name=f"grad_{name}")


def _float_before_unreadable_page() -> tuple[torch.Tensor, mmap.mmap]:
    """A one-element float32 tensor followed by an unreadable page (a read past it crashes), and
    the mapping that holds it (keep both alive)."""
    page = mmap.PAGESIZE
    region = mmap.mmap(-1, 2 * page)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    protection_none = 0  # PROT_NONE
    if libc.mprotect(address + page, page, protection_none) != 0:
        pytest.skip(f"mprotect failed: errno {ctypes.get_errno()}")
    return torch.frombuffer(region, dtype=torch.float32, count=1, offset=page - 4), region


@pytest.mark.parametrize("width", [64, 37])
def test_emulated_add_backward_never_reads_x(emulated_kernels, width):
    """In add mode autograd passes a one-element stand-in for x; the CUDA
    backward read x[base + j] regardless, past its end. Here the stand-in's element sits right
    before an unreadable page, so a kernel that reads x crashes the test."""
    rows, samples, seed = 20, 2, torch.tensor(4)
    stand_in, _region = _float_before_unreadable_page()
    mu, sigma = torch.randn(width), torch.rand(width)
    grad_out = torch.randn(samples, rows, width)
    grad_x, partial_mu, partial_sigma = _nan(rows, width), _nan(7, width), _nan(7, width)
    emulated_kernels.emu_inject_backward(
        _address(grad_out),
        0,
        _address(stand_in),
        0,
        _address(mu),
        _address(sigma),
        _address(grad_x),
        _address(partial_mu),
        _address(partial_sigma),
        _address(seed),
        *(ctypes.c_int64(v) for v in (rows, width, 1, samples)),
        ctypes.c_bool(False),
        ctypes.c_int64(3),
    )
    assert_close(grad_x, grad_out.sum(0), atol=1e-5, rtol=1e-5, name="grad_x")
    assert_close(partial_mu.sum(0), grad_out.sum((0, 1)), atol=1e-4, rtol=1e-5, name="grad_mu")
