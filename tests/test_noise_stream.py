"""The noise op (``pini_kernels.noise``, pini_kernels/noise_stream.py) on every backend: Philox
known answers, agreement with Triton's randn4x and docs/spec.md §3, draws past one block,
statistics.

What each backend splits a draw into, and so what a size must cross: Triton a block of 16384
elements under the interpreter and 1024 on a GPU (pini_kernels/triton/launch.py); the CPU kernels
(csrc/cpu/) 4096-element chunks in 256-element batches. Every output is poisoned with NaN
(conftest.py), so an element no program writes fails.
"""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import ALL_BACKENDS, DEVICE, FUSED_BACKENDS, backend_device
from helpers import assert_close, loss_and_grads, record_error, stream_generator
from scipy import stats

import pini_kernels
from pini_kernels import reference
from pini_kernels.triton import launch

# Random123's known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 + 7, 0xDEADBEEFCAFE, 2**63 - 1]
STREAM_ATOL, STREAM_RTOL = 1e-5, 1e-5


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    words = reference.philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


@triton.jit
def _randn4x_probe_kernel(out_ptr, seed, first_quad, num_quads, BLOCK: tl.constexpr):
    """Writes lanes 0..3 of tl.randn4x(seed, first_quad + q) to out[4q .. 4q + 3]."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = q < num_quads
    n0, n1, n2, n3 = tl.randn4x(seed, first_quad + q)
    tl.store(out_ptr + 4 * q, n0, mask=mask)
    tl.store(out_ptr + 4 * q + 1, n1, mask=mask)
    tl.store(out_ptr + 4 * q + 2, n2, mask=mask)
    tl.store(out_ptr + 4 * q + 3, n3, mask=mask)


def _triton_randn4x(seed: int, first_quad: int, num_quads: int) -> torch.Tensor:
    out = torch.full((4 * num_quads,), float("nan"), device=DEVICE)
    _randn4x_probe_kernel[(triton.cdiv(num_quads, 64),)](out, seed, first_quad, num_quads, BLOCK=64)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("first_quad", [0, 1000, 2**32 - 3, 2**40 + 5])
def test_reference_stream_matches_triton_randn4x(seed, first_quad):
    """The integer-op reference equals tl.randn4x, including counters whose high word is set."""
    num_quads = 37
    expected = _triton_randn4x(seed, first_quad, num_quads)
    actual = reference.normal_stream(seed, 4 * first_quad, 4 * num_quads, device=DEVICE)
    error = assert_close(actual, expected, atol=STREAM_ATOL, rtol=STREAM_RTOL, name="stream")
    record_error("stream: reference vs tl.randn4x", error)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_stream_across_counter_2_32(backend):
    """Quads 2^32 - 1 and 2^32, whose counters differ in both words, equal tl.randn4x."""
    seed, first_quad = 99, 2**32 - 1
    expected = _triton_randn4x(seed, first_quad, 2)
    # A backend that dropped the counter's high word would give quad 0 for quad 2^32.
    assert not torch.equal(expected[4:], _triton_randn4x(seed, 0, 1))
    device = backend_device(backend)
    actual = stream_generator(backend)(8, seed, device, torch.float32, start=4 * first_quad)
    error = assert_close(
        actual, expected.to(device), atol=STREAM_ATOL, rtol=STREAM_RTOL, name="stream"
    )
    record_error(f"stream: {backend} vs tl.randn4x", error)


# Quads whose Box-Muller radius uniform (u0 for lanes 0-1, u2 for lanes 2-3) is tiny, where the
# floor max(u, 1e-7) decides the value: (seed, quad, Philox words c0..c3), found once by a search
# over seeds and quads 0..15 with a separate C implementation of Philox4x32-10. A word 0 or
# 0xFFFFFFFF gives u = 0 exactly; otherwise u = magnitude * 4.6566127342e-10.
TINY_UNIFORM_QUADS = {
    "u0=0": (155288883, 6, (0x00000000, 0x1A5BB43E, 0x3661B471, 0x9EDCC909)),
    "u2=0-from-0xFFFFFFFF": (40222668, 9, (0x4BDF3BD4, 0x06E691EE, 0xFFFFFFFF, 0x0C6A1FA8)),
    "u2=8.3e-8-floored": (96227, 8, (0x4DD60FAF, 0xD22207BC, 0xFFFFFF4D, 0x6753A890)),
    "u0=1.6e-7": (75465, 0, (0x0000014E, 0xAC5B24D7, 0xF946D797, 0x0B18D6E7)),
    "u2=1.7e-7": (47437, 13, (0x5155B0D2, 0x4B8AAD9A, 0x00000165, 0x3435BB4C)),
}


def _spec_uniforms(words: tuple[int, int, int, int]) -> list[float]:
    """docs/spec.md §3, step 3: int32 view, ~v for negative v, times 4.6566127342e-10 in float32."""
    magnitudes = [0xFFFFFFFF - word if word >= 2**31 else word for word in words]
    return [float(np.float32(m) * np.float32(4.6566127342e-10)) for m in magnitudes]


def _spec_normals_float64(words: tuple[int, int, int, int]) -> torch.Tensor:
    """(4,) float64: lanes 0..3 of a quad by docs/spec.md §3, step 4, Box-Muller in float64."""
    u0, u1, u2, u3 = _spec_uniforms(words)
    normals = []
    for radius_uniform, angle_uniform in ((u0, u1), (u2, u3)):
        radius = math.sqrt(-2.0 * math.log(max(radius_uniform, 1e-7)))
        angle = 2.0 * math.pi * angle_uniform
        normals += [radius * math.cos(angle), radius * math.sin(angle)]
    return torch.tensor(normals, dtype=torch.float64)


@pytest.mark.parametrize("case", list(TINY_UNIFORM_QUADS))
def test_tiny_uniform_quads_have_tiny_uniforms(case):
    """The project's Philox gives the searched words, and their radius uniform is < 1e-6."""
    seed, quad, words = TINY_UNIFORM_QUADS[case]
    counter = (torch.tensor([quad]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    got = reference.philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32))
    assert tuple(int(w) for w in got) == words
    u0, _, u2, _ = _spec_uniforms(words)
    assert min(u0, u2) < 1e-6


@pytest.mark.parametrize("case", list(TINY_UNIFORM_QUADS))
def test_tiny_uniform_spec_matches_triton_randn4x(case):
    """The formula of docs/spec.md §3 in float64 is what tl.randn4x computes, at the floor too."""
    seed, quad, words = TINY_UNIFORM_QUADS[case]
    expected = _spec_normals_float64(words).float().to(DEVICE)
    actual = _triton_randn4x(seed, quad, 1)
    error = assert_close(actual, expected, atol=STREAM_ATOL, rtol=STREAM_RTOL, name="randn4x")
    record_error("stream: tl.randn4x vs spec float64 at tiny u", error)


@pytest.mark.parametrize("case", list(TINY_UNIFORM_QUADS))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tiny_uniform_noise(backend, case):
    """noise() at a quad with a tiny radius uniform equals docs/spec.md §3 (float64) and
    tl.randn4x."""
    seed, quad, words = TINY_UNIFORM_QUADS[case]
    device = backend_device(backend)
    draw = pini_kernels.noise((4 * quad + 7,), seed=seed, device=device, backend=backend)
    actual = draw[4 * quad : 4 * quad + 4]
    spec = _spec_normals_float64(words).float().to(device)
    error = assert_close(actual, spec, atol=STREAM_ATOL, rtol=STREAM_RTOL, name="vs the spec")
    record_error(f"stream: {backend} vs spec float64 at tiny u", error)
    randn4x = _triton_randn4x(seed, quad, 1).to(device)
    assert_close(actual, randn4x, atol=STREAM_ATOL, rtol=STREAM_RTOL, name="vs tl.randn4x")


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("case", list(TINY_UNIFORM_QUADS))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tiny_uniform_fused_inject(backend, case, mode):
    """fused_inject forward, and backward's regenerated eps (in grad_sigma), at a tiny u."""
    seed, quad, words = TINY_UNIFORM_QUADS[case]
    device = backend_device(backend)
    shape = (4 * quad + 7,)  # odd: the unaligned stream path
    x = torch.randn(shape, device=device)
    mu = torch.randn(shape, device=device)
    sigma = (torch.rand(shape, device=device) + 0.5).requires_grad_(True)
    out = pini_kernels.fused_inject(x, mu, sigma, mode=mode, seed=seed, backend=backend)
    (sigma_grad,) = torch.autograd.grad(out.sum(), sigma)
    quad_elements = slice(4 * quad, 4 * quad + 4)
    x, mu, sigma = (t.detach()[quad_elements].double() for t in (x, mu, sigma))
    eps = _spec_normals_float64(words).to(device)
    expected_out = x * (mu + sigma * eps) if mode == "mul" else x + (mu + sigma * eps)
    expected_sigma_grad = x * eps if mode == "mul" else eps  # d out / d sigma, one sample
    tolerance = dict(atol=4 * STREAM_ATOL, rtol=STREAM_RTOL)
    assert_close(out[quad_elements], expected_out.float(), **tolerance, name="out")
    assert_close(sigma_grad[quad_elements], expected_sigma_grad.float(), **tolerance, name="grad")


@pytest.mark.parametrize("start", [0, 3, 4 * 2**32 - 6, 2**45 + 1])
@pytest.mark.parametrize("seed", [5, 2**33 + 1])
@pytest.mark.parametrize("fused", FUSED_BACKENDS)
def test_fused_stream_matches_reference(fused, seed, start):
    """The kernels' stream generator (aligned and unaligned starts) equals the reference."""
    device = backend_device(fused)
    count = 203
    actual = stream_generator(fused)(count, seed, device, torch.float32, start=start)
    expected = reference.normal_stream(seed, start, count, device=device)
    error = assert_close(actual, expected, atol=STREAM_ATOL, rtol=STREAM_RTOL, name="stream")
    record_error(f"stream: {fused} vs reference", error)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_noise_api(backend, dtype):
    shape = (3, 5, 7)
    out = pini_kernels.noise(shape, seed=2024, device=DEVICE, dtype=dtype, backend=backend)
    assert out.shape == shape and out.dtype == dtype and out.device.type == DEVICE.type
    expected = reference.normal_stream(2024, 0, 105, device=DEVICE).view(shape).to(dtype)
    assert_close(out, expected, atol=STREAM_ATOL, rtol=STREAM_RTOL * 1000, name="noise")


def test_noise_seed_none_follows_torch_manual_seed():
    torch.manual_seed(7)
    first = pini_kernels.noise((64,), seed=None)
    torch.manual_seed(7)
    second = pini_kernels.noise((64,), seed=None)
    third = pini_kernels.noise((64,), seed=None)
    assert torch.equal(first, second)
    assert not torch.equal(second, third)


def test_noise_accepts_an_int_shape_and_rejects_odd_dtypes():
    assert pini_kernels.noise(5, seed=1).shape == (5,)
    with pytest.raises(TypeError, match="dtype must be float32, float16, bfloat16 or float64"):
        pini_kernels.noise(5, seed=1, dtype=torch.float8_e4m3fn)


def test_noise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        pini_kernels.noise((4,), seed=-1)
    with pytest.raises(ValueError, match="seed"):
        pini_kernels.noise((4,), seed=2**63)
    with pytest.raises(TypeError, match="seed"):
        pini_kernels.noise((4,), seed=1.5)
    with pytest.raises(TypeError, match="dtype"):
        pini_kernels.noise((4,), seed=1, dtype=torch.int32)
    with pytest.raises(ValueError, match="shape"):
        pini_kernels.noise((4, -1), seed=1)
    with pytest.raises(ValueError, match="backend"):
        pini_kernels.noise((4,), seed=1, backend="tpu")


# --- the seed as a 0-d int64 tensor (docs/spec.md §4) -----------------------------------------


def _every_op_with_seed(backend, seed):
    """Every op's output and gradients for one seed (noise on every side, mul mode, 2 samples)."""
    device = backend_device(backend)
    generator = torch.Generator().manual_seed(3)
    leaf = lambda *shape: torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    results = [pini_kernels.noise((3, 37), seed=seed, device=device, backend=backend)]
    x, mu, sigma = leaf(5, 37), leaf(37), leaf(37)
    out = pini_kernels.fused_inject(
        x, mu, sigma, mode="mul", num_samples=2, seed=seed, backend=backend
    )
    results += [out, *torch.autograd.grad(out.square().sum(), (x, mu, sigma))]
    image, text, image_mu, image_sigma = leaf(6, 12), leaf(9, 12), leaf(12), leaf(12)
    text_mu, text_sigma = leaf(9, 12), leaf(9, 12)
    target = torch.randint(0, 9, (6,), generator=generator).to(device)
    inputs = (image, text, image_mu, image_sigma, text_mu, text_sigma)
    options = {"num_samples": 2, "seed": seed, "backend": backend}
    results += loss_and_grads(inputs, 14.0, target, **options)
    return results


@pytest.mark.parametrize("seed", [5, 2**63 - 1])  # 2^63 - 1: the text stream's seed + 1 wraps
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_int_and_tensor_seeds_give_identical_results(backend, seed):
    by_int = _every_op_with_seed(backend, seed)
    by_tensor = _every_op_with_seed(backend, torch.tensor(seed, dtype=torch.int64))
    for index, (got, want) in enumerate(zip(by_tensor, by_int, strict=True)):
        assert torch.equal(got, want), f"result {index} differs between an int and a tensor seed"
    other = _every_op_with_seed(backend, torch.tensor(seed - 1, dtype=torch.int64))
    assert not torch.equal(other[0], by_int[0]), "a new seed value must draw new noise"


@pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="the Triton backend is not available")
def test_triton_kernels_read_a_tensor_seed_in_the_kernel(monkeypatch):
    """A seed tensor on the data's device reaches the Triton kernels as a pointer (read there,
    so a CUDA graph replays it; no .item()), in forward and backward. (Int seeds arrive as CPU
    tensors: on a GPU they become int arguments, which the stream tests launch directly.)"""
    from pini_kernels import seeds
    from pini_kernels.triton import inject, noise_stream, normalize

    seen = []
    triton_seed_args = seeds.triton_seed_args

    def spy(seed):
        seen.append(type(seed))
        return triton_seed_args(seed)

    for module in (normalize, inject, noise_stream):
        monkeypatch.setattr(module, "triton_seed_args", spy)
    _every_op_with_seed("triton", torch.tensor(11, dtype=torch.int64))
    assert seen and set(seen) == {torch.Tensor}


@pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="the Triton backend is not available")
@pytest.mark.parametrize("seed", [0, 2**32 + 7, 2**63 - 1, 2**63])
def test_triton_noise_from_a_seed_in_memory_matches_reference(seed):
    """The kernel's in-memory seed path, keys past 2^63 (a text stream's seed + 1) given as the
    wrapped int64 that a device-side ``seed + 1`` produces."""
    from pini_kernels.triton import noise_stream

    device = backend_device("triton")
    wrapped = seed - (1 << 64) if seed >= (1 << 63) else seed
    seed_tensor = torch.tensor(wrapped, dtype=torch.int64, device=device)
    got = noise_stream.noise_forward(1001, seed_tensor, device, torch.float32, start=6)
    want = reference.normal_stream(seed, 6, 1001, device=device)
    assert_close(got, want, atol=STREAM_ATOL, rtol=STREAM_RTOL, name="in-memory seed stream")


def test_tensor_seed_errors():
    x = torch.randn(4)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^63\), got -3"):
        pini_kernels.noise((4,), seed=torch.tensor(-3))
    with pytest.raises(ValueError, match="0-d CPU tensor"):
        pini_kernels.fused_inject(x, 0.0, 1.0, seed=torch.tensor(1, device="meta"))
    with pytest.raises(TypeError, match="seed must be an integer tensor"):
        pini_kernels.noise((4,), seed=torch.tensor(True))


# --- draws past one block, chunk and tile ------------------------------------------------------

# More than two interpreter blocks (16384), 4096-element CPU chunks and 1024-element GPU blocks,
# and a multiple of none of them (nor of 4, so the last quad is cut).
STREAM_LENGTH = 40_005


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


# --- statistics of eps (on the reference stream, which every backend equals element-wise) ---

STATS_COUNT = 1 << 20


@pytest.fixture(scope="module")
def stream():
    return reference.normal_stream(20241128, 0, STATS_COUNT).double()


def test_stream_mean_and_variance(stream):
    tolerance = 5 / math.sqrt(STATS_COUNT)
    assert abs(stream.mean().item()) < tolerance
    assert abs(stream.var().item() - 1) < 5 * math.sqrt(2 / STATS_COUNT)
    assert stream.abs().max().item() < 6.0  # Box-Muller with u >= 1e-7 is bounded by 5.68


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 1])
def test_stream_is_normal_kolmogorov_smirnov(seed):
    sample = reference.normal_stream(seed, 0, 1 << 16).double().numpy()
    result = stats.kstest(sample, "norm")
    assert result.pvalue > 1e-3, f"KS statistic {result.statistic:.4g}, p={result.pvalue:.3g}"


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5])
def test_stream_neighbours_uncorrelated(stream, lag):
    correlation = torch.corrcoef(torch.stack((stream[:-lag], stream[lag:])))[0, 1].item()
    assert abs(correlation) < 5 / math.sqrt(STATS_COUNT)


@pytest.mark.parametrize("other_seed", [20241129, 20241128 + 2**32, 0])
def test_streams_of_different_seeds_uncorrelated(stream, other_seed):
    other = reference.normal_stream(other_seed, 0, STATS_COUNT).double()
    correlation = torch.corrcoef(torch.stack((stream, other)))[0, 1].item()
    assert abs(correlation) < 5 / math.sqrt(STATS_COUNT)
    assert not torch.equal(stream, other)
