"""The noise stream: Philox known answers, agreement with Triton's randn4x, statistics."""

import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, FUSED_BACKENDS, backend_device
from helpers import assert_close, record_error
from scipy import stats

import pini_kernels
from pini_kernels import reference

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


def test_stream_counter_words_split_at_2_32():
    """Quads 2^32 - 1 and 2^32 differ in both counter words, and the reference splits them so."""
    quads = torch.tensor([2**32 - 1, 2**32, 2**33 + 1], dtype=torch.int64)
    low, high = quads & reference.MASK32, quads >> 32
    assert low.tolist() == [2**32 - 1, 0, 1]
    assert high.tolist() == [0, 1, 2]
    # The same quad reached through normal_stream's start offset and through a direct call.
    direct = reference._normal_quads(99, 2**32, 1, "cpu").view(-1)
    via_start = reference.normal_stream(99, 4 * 2**32, 4)
    assert torch.equal(direct, via_start)
    assert not torch.equal(direct, reference._normal_quads(99, 0, 1, "cpu").view(-1))


@pytest.mark.parametrize("start", [0, 3, 4 * 2**32 - 6, 2**45 + 1])
@pytest.mark.parametrize("seed", [5, 2**33 + 1])
@pytest.mark.parametrize("fused", FUSED_BACKENDS)
def test_fused_stream_matches_reference(fused, seed, start):
    """The kernels' stream generator (aligned and unaligned starts) equals the reference."""
    if fused == "triton":
        from pini_kernels.ops.noise import noise_forward
    else:
        from pini_kernels.native import noise_forward
    device = backend_device(fused)
    count = 203
    actual = noise_forward(count, seed, device, torch.float32, start=start)
    expected = reference.normal_stream(seed, start, count, device=device)
    error = assert_close(actual, expected, atol=STREAM_ATOL, rtol=STREAM_RTOL, name="stream")
    record_error(f"stream: {fused} vs reference", error)


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "reference"])
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
