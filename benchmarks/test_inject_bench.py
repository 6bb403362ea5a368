"""fused_inject against eager PyTorch and torch.compile of it, forward and forward+backward.

Shapes users run: raw images (B, 3, 224, 224) with per-pixel mu/sigma, CoOp prompt embeddings
(C, 77, 512) with noise shared over classes (L, D), and features (B, D) with a generator's per-row
mu/sigma.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pini_kernels

from .baselines import eager_fused_inject
from .harness import (
    CHECK_SEED,
    DEVICE,
    FULL_SIZES,
    INPUT_SEED,
    PROVIDERS,
    check_against_eager,
    fused_backend_of,
    provider_function,
    run_case,
    skip_slow_reference,
    tensor_bytes,
)

# Inputs and gradients are float32: x + mu + sigma*eps has one rounding per element.
OUTPUT_TOLERANCE = (1e-5, 1e-5)  # (atol, rtol)
GRADIENT_TOLERANCE = (1e-4, 1e-4)  # mu/sigma gradients are sums over samples and rows


@dataclasses.dataclass(frozen=True)
class InjectCase:
    x_shape: tuple[int, ...]
    noise_shape: tuple[int, ...]  # the shape of mu and sigma, broadcast to x_shape
    num_samples: int | None  # None: one draw shaped like x (no sample dimension)
    x_grad: bool = True  # forward+backward: whether x needs a gradient too (a frozen CLIP's
    # features do not: only the generator's mu and sigma train)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.num_samples is None:
            return self.x_shape
        return (self.num_samples, *self.x_shape)

    def describe(self) -> str:
        frozen = "" if self.x_grad else " (x without gradient)"
        return (
            f"x {self.x_shape}{frozen}, mu/sigma {self.noise_shape}, num_samples={self.num_samples}"
        )


def _image(batch: int, num_samples: int) -> InjectCase:
    return InjectCase((batch, 3, 224, 224), (3, 224, 224), num_samples)


def _prompt(classes: int) -> InjectCase:
    return InjectCase((classes, 77, 512), (77, 512), None)


def _feature(batch: int, width: int, num_samples: int) -> InjectCase:
    return InjectCase((batch, width), (batch, width), num_samples)


# The paper's feature noise as a user times it: frozen features x (B, D), a generator's per-row
# or per-feature mu/sigma, one draw shaped like x, against ``x + mu + sigma * torch.randn(B, D)``.
SMALL_FEATURE_CASES = {
    "feature-B32-D512-per-row": InjectCase((32, 512), (32, 512), None, x_grad=False),
    "feature-B32-D512-per-feature": InjectCase((32, 512), (512,), None, x_grad=False),
}


if FULL_SIZES:
    CASES = {f"image-B{b}-m{m}": _image(b, m) for b in (8, 32) for m in (1, 4)}
    CASES |= {f"prompt-C{c}": _prompt(c) for c in (100, 1000)}
    CASES |= {
        f"feature-B{b}-D{d}-m{m}": _feature(b, d, m)
        for b in (32, 256)
        for d in (512, 768)
        for m in (1, 8, 32)
    }
else:  # sized for a 2-core CPU
    CASES = {
        "image-B8-m1": _image(8, 1),
        "image-B8-m4": _image(8, 4),
        "prompt-C100": _prompt(100),
        "feature-B32-D512-m1": _feature(32, 512, 1),
        "feature-B256-D768-m8": _feature(256, 768, 8),
    }
CASES |= SMALL_FEATURE_CASES


def make_inputs(case: InjectCase, requires_grad: bool) -> dict[str, torch.Tensor]:
    """x, mu and sigma (positive) of the case, the same for every provider."""
    torch.manual_seed(INPUT_SEED)
    inputs = {
        "x": torch.randn(case.x_shape, device=DEVICE),
        "mu": torch.randn(case.noise_shape, device=DEVICE),
        "sigma": torch.rand(case.noise_shape, device=DEVICE) + 0.1,
    }
    for name, tensor in inputs.items():
        tensor.requires_grad_(requires_grad and (case.x_grad or name != "x"))
    return inputs


def least_bytes_moved(case: InjectCase, inputs: dict[str, torch.Tensor], backward: bool) -> int:
    """Read x, mu, sigma and write the samples; backward reads their gradient and writes the
    gradients of the inputs that need one (all three, or mu and sigma for a frozen x).

    eps is regenerated from the seed, never read or written.
    """
    output_bytes = tensor_bytes(inputs["x"]) * (case.num_samples or 1)
    forward = tensor_bytes(*inputs.values()) + output_bytes
    if not backward:
        return forward
    trained = [tensor for name, tensor in inputs.items() if case.x_grad or name != "x"]
    return forward + output_bytes + tensor_bytes(*trained)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_fused_inject(benchmark, machine_rates, backward: bool, case_name: str, provider: str):
    case = CASES[case_name]
    skip_slow_reference(provider, noise_elements=torch.Size(case.sample_shape).numel())
    inputs = make_inputs(case, requires_grad=backward)
    trained = {name: tensor for name, tensor in inputs.items() if tensor.requires_grad}
    function = provider_function(provider, pini_kernels.fused_inject, eager_fused_inject)

    backend = fused_backend_of(provider)
    check = None
    if backend is not None:

        def check() -> None:
            eps = pini_kernels.noise(case.sample_shape, seed=CHECK_SEED, device=DEVICE)
            check_against_eager(
                lambda: pini_kernels.fused_inject(
                    **inputs, num_samples=case.num_samples, seed=CHECK_SEED, backend=backend
                ),
                lambda: eager_fused_inject(**inputs, num_samples=case.num_samples, eps=eps),
                gradient_inputs=trained,
                backward=backward,
                output_tolerance=OUTPUT_TOLERANCE,
                gradient_tolerance=GRADIENT_TOLERANCE,
            )

    run_case(
        benchmark,
        op="fused_inject",
        case=case_name,
        provider=provider,
        call=lambda: function(**inputs, num_samples=case.num_samples),
        gradient_inputs=tuple(trained.values()),
        check=check,
        bytes_moved=least_bytes_moved(case, inputs, backward),
        flops=0,
        machine_rates=machine_rates,
        description=case.describe(),
    )
