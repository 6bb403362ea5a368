"""noisy_cosine_logits and noisy_cross_entropy (PiNI's loss) against eager and torch.compile.

Feature-level shapes: B image features and C class text features of width D, noise on both sides
with a generator's per-row mu/sigma, num_samples noise samples, CLIP's logit scale of 100. Eager
materializes eps, the noisy features, their normalized copies and the (m, B, C) logits; the fused
loss keeps one log-sum-exp per row.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pini_kernels

from .baselines import eager_noisy_cosine_logits, eager_noisy_cross_entropy
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

LOGIT_SCALE = 100.0  # CLIP's exp(logit_scale) after training
# Logits reach +-100, so their float32 rounding (and a different summation order over D) is
# ~1e-5 relative; the loss gradients are averages over m*B rows.
OUTPUT_TOLERANCE = (1e-3, 1e-4)  # (atol, rtol)
GRADIENT_TOLERANCE = (1e-5, 1e-3)


@dataclasses.dataclass(frozen=True)
class FeatureCase:
    batch: int
    width: int
    classes: int
    num_samples: int
    sides: str = "both"  # which features get noise: "both", or "image" (clean class text rows)

    @property
    def noise_elements(self) -> int:
        """eps drawn per call: (m, B, D) image noise and (m, C, D) text noise."""
        rows = self.batch + (self.classes if self.sides == "both" else 0)
        return self.num_samples * rows * self.width

    @property
    def logits_flops(self) -> int:
        return 2 * self.num_samples * self.batch * self.classes * self.width

    def describe(self) -> str:
        return (
            f"image features ({self.batch}, {self.width}), text features ({self.classes}, "
            f"{self.width}), per-row noise on {self.sides_description}, "
            f"num_samples={self.num_samples}"
        )

    @property
    def sides_description(self) -> str:
        return "both sides" if self.sides == "both" else "the image features only"


def _name(case: FeatureCase) -> str:
    name = f"B{case.batch}-D{case.width}-C{case.classes}-m{case.num_samples}"
    return name if case.sides == "both" else f"{name}-{case.sides}"


if FULL_SIZES:
    _CASES = [
        FeatureCase(b, d, c, m)
        for b in (32, 256)
        for d in (512, 768)
        for c in (100, 1000)
        for m in (1, 8, 32)
    ]
else:  # sized for a 2-core CPU
    _CASES = [
        FeatureCase(32, 512, 100, 1),
        FeatureCase(32, 768, 1000, 1),
        FeatureCase(256, 512, 100, 8),
        # ImageNet's classes and PiNI's feature noise (the class text rows without noise).
        FeatureCase(256, 512, 1000, 8, sides="image"),
    ]
CASES = {_name(case): case for case in _CASES}


def make_inputs(case: FeatureCase, requires_grad: bool) -> dict[str, torch.Tensor]:
    """Features, the noise's mu/sigma on each side and the targets, the same for every provider."""
    torch.manual_seed(INPUT_SEED)
    image_shape, text_shape = (case.batch, case.width), (case.classes, case.width)
    differentiable = {
        "image_features": torch.randn(image_shape, device=DEVICE),
        "text_features": torch.randn(text_shape, device=DEVICE),
        "image_noise_mu": 0.1 * torch.randn(image_shape, device=DEVICE),
        "image_noise_sigma": 0.1 * torch.rand(image_shape, device=DEVICE) + 0.05,
        "text_noise_mu": 0.1 * torch.randn(text_shape, device=DEVICE),
        "text_noise_sigma": 0.1 * torch.rand(text_shape, device=DEVICE) + 0.05,
    }
    if case.sides == "image":
        del differentiable["text_noise_mu"], differentiable["text_noise_sigma"]
    inputs = {name: tensor.requires_grad_(requires_grad) for name, tensor in differentiable.items()}
    inputs["target"] = torch.randint(0, case.classes, (case.batch,), device=DEVICE)
    return inputs


def call_arguments(inputs: dict[str, torch.Tensor], with_target: bool) -> tuple[tuple, dict]:
    """(args, kwargs) of the public signature, shared by the fused ops and the eager baselines."""
    args = (inputs["image_features"], inputs["text_features"], LOGIT_SCALE)
    if with_target:
        args += (inputs["target"],)
    kwargs = {"image_noise": (inputs["image_noise_mu"], inputs["image_noise_sigma"])}
    if "text_noise_mu" in inputs:
        kwargs["text_noise"] = (inputs["text_noise_mu"], inputs["text_noise_sigma"])
    return args, kwargs


def _gradient_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in inputs.items() if tensor.is_floating_point()}


def least_work(
    case: FeatureCase, inputs: dict[str, torch.Tensor], with_target: bool, backward: bool
) -> tuple[int, int]:
    """(bytes moved, FLOPs): the least work of the op, the numerators of its floor.

    Forward reads each input of the op once (the target only for the loss) and writes the
    float32 logits (the loss: one float32) after the (m, B, D) x (D, C) products. Backward reads
    the output's gradient and the differentiable inputs again (kept for it, docs/spec.md
    section 6: the gradient of one side's features needs the other's), writes one gradient per
    differentiable input, and does the two products of the logits' gradient.
    """
    read = [tensor for name, tensor in inputs.items() if with_target or name != "target"]
    output_bytes = 4 if with_target else 4 * case.num_samples * case.batch * case.classes
    bytes_moved, flops = tensor_bytes(*read) + output_bytes, case.logits_flops
    if backward:
        differentiable_bytes = tensor_bytes(*_gradient_inputs(inputs).values())
        bytes_moved += output_bytes + 2 * differentiable_bytes
        flops += 2 * case.logits_flops
    return bytes_moved, flops


def _run(benchmark, machine_rates, *, op, case_name, provider, backward, fused, eager) -> None:
    case = CASES[case_name]
    skip_slow_reference(provider, noise_elements=case.noise_elements)
    with_target = op == "noisy_cross_entropy"
    inputs = make_inputs(case, requires_grad=backward)
    args, kwargs = call_arguments(inputs, with_target)
    kwargs["num_samples"] = case.num_samples
    function = provider_function(provider, fused, eager)
    gradient_inputs = _gradient_inputs(inputs)

    backend = fused_backend_of(provider)
    check = None
    if backend is not None:

        def check() -> None:
            image_eps = pini_kernels.noise(
                (case.num_samples, case.batch, case.width), seed=CHECK_SEED, device=DEVICE
            )
            text_eps = None
            if case.sides == "both":
                text_eps = pini_kernels.noise(
                    (case.num_samples, case.classes, case.width),
                    seed=CHECK_SEED + 1,
                    device=DEVICE,
                )
            check_against_eager(
                lambda: fused(*args, **kwargs, seed=CHECK_SEED, backend=backend),
                lambda: eager(*args, **kwargs, image_eps=image_eps, text_eps=text_eps),
                gradient_inputs=gradient_inputs,
                backward=backward,
                output_tolerance=OUTPUT_TOLERANCE,
                gradient_tolerance=GRADIENT_TOLERANCE,
            )

    bytes_moved, flops = least_work(case, inputs, with_target, backward)
    run_case(
        benchmark,
        op=op,
        case=case_name,
        provider=provider,
        call=lambda: function(*args, **kwargs),
        gradient_inputs=tuple(gradient_inputs.values()) if backward else (),
        check=check,
        bytes_moved=bytes_moved,
        flops=flops,
        machine_rates=machine_rates,
        description=case.describe(),
    )


DIRECTIONS = pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name", list(CASES))
@DIRECTIONS
def test_noisy_cosine_logits(benchmark, machine_rates, backward, case_name, provider):
    _run(
        benchmark,
        machine_rates,
        op="noisy_cosine_logits",
        case_name=case_name,
        provider=provider,
        backward=backward,
        fused=pini_kernels.noisy_cosine_logits,
        eager=eager_noisy_cosine_logits,
    )


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case_name", list(CASES))
@DIRECTIONS
def test_noisy_cross_entropy(benchmark, machine_rates, backward, case_name, provider):
    _run(
        benchmark,
        machine_rates,
        op="noisy_cross_entropy",
        case_name=case_name,
        provider=provider,
        backward=backward,
        fused=pini_kernels.noisy_cross_entropy,
        eager=eager_noisy_cross_entropy,
    )
