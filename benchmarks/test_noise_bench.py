"""noise (the seeded eps stream) against torch.randn and torch.compile of it; forward only.

The stream has no gradient. Its values cannot equal torch.randn's, so the check compares the fused
stream with the reference stream on its first and last elements, and its mean and standard
deviation with those of the eager draw.
"""

from __future__ import annotations

import pytest
import torch

import pini_kernels
from pini_kernels.reference import normal_stream

from .baselines import eager_noise
from .harness import (
    CHECK_SEED,
    DEVICE,
    FULL_SIZES,
    PROVIDERS,
    fused_backend_of,
    provider_function,
    run_case,
    skip_slow_reference,
    tensor_bytes,
)

# Elements compared with the reference stream at each end of the draw.
CHECKED_ELEMENTS = 1 << 14
# Mean and standard deviation of a draw of N >= 2^20 elements are within 0.005 of N(0, 1) with
# overwhelming probability (the standard error is 0.001); so the two draws are within 0.01.
MOMENT_TOLERANCE = 0.01

if FULL_SIZES:
    CASES = {
        "image-B8-m1": (1, 8, 3, 224, 224),
        "image-B32-m4": (4, 32, 3, 224, 224),
        "feature-B256-D768-m32": (32, 256, 768),
        "text-C1000-D512-m32": (32, 1000, 512),
    }
else:  # sized for a 2-core CPU
    CASES = {
        "image-B8-m1": (1, 8, 3, 224, 224),
        "feature-B256-D512-m8": (8, 256, 512),
    }


def fused_noise(shape: tuple[int, ...], *, device: torch.device, backend: str) -> torch.Tensor:
    return pini_kernels.noise(shape, seed=None, device=device, backend=backend)


def check_stream(shape: tuple[int, ...], backend: str) -> None:
    """The fused stream equals the reference at both ends; its moments match torch.randn's."""
    drawn = pini_kernels.noise(shape, seed=CHECK_SEED, device=DEVICE, backend=backend).flatten()
    count = min(CHECKED_ELEMENTS, drawn.numel())
    last_start = drawn.numel() - count
    for start in (0, last_start):
        expected = normal_stream(CHECK_SEED, start, count, device=DEVICE)
        torch.testing.assert_close(
            drawn[start : start + count],
            expected,
            atol=1e-5,
            rtol=1e-5,
            msg=lambda message, start=start: f"noise elements from {start}: {message}",
        )
    eager = eager_noise(shape, device=DEVICE).flatten()
    for moment in (torch.mean, torch.std):
        difference = abs(moment(drawn).item() - moment(eager).item())
        assert difference < MOMENT_TOLERANCE, (
            f"{moment.__name__} of the fused noise differs from torch.randn's by {difference:.4f}"
        )


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_noise(benchmark, machine_rates, case_name: str, provider: str):
    shape = CASES[case_name]
    skip_slow_reference(provider, noise_elements=torch.Size(shape).numel())
    function = provider_function(provider, fused_noise, eager_noise)
    backend = fused_backend_of(provider)
    run_case(
        benchmark,
        op="noise",
        case=case_name,
        provider=provider,
        call=lambda: function(shape, device=DEVICE),
        check=None if backend is None else lambda: check_stream(shape, backend),
        bytes_moved=tensor_bytes(torch.empty(shape, device="meta")),  # written once
        flops=0,
        machine_rates=machine_rates,
        description=f"eps {shape}",
    )
