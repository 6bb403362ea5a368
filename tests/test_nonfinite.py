"""Non-finite values (docs/spec.md §8): a NaN or infinity in any input reaches exactly the
outputs and gradients it reaches in the reference, on every backend, element by element; nothing
non-finite comes back finite, and nothing finite comes back NaN. A table of cases: NaN rows on
either side, NaN noise parameters, a NaN logit scale, an infinite feature, a zero row, each with
the noise on neither, one or both sides, at logit scale 14 and 1e10 (where a rounded log-sum-exp
used to overflow)."""

import pytest
import torch
from conftest import FUSED_BACKENDS, backend_device

import pini_kernels

BATCH, CLASSES, DIM = 4, 5, 8
NAN, INF = float("nan"), float("inf")
NAMES = ("output", "image", "text", "image mu", "image sigma", "text mu", "text sigma", "scale")


def _set(name, index, value):
    def mutate(tensors):
        tensors[name][index] = value

    return mutate


CASES = {
    "NaN text row": _set("text", 4, NAN),
    "NaN image row": _set("image", 3, NAN),
    "NaN image sigma": _set("image_sigma", 2, NAN),
    "NaN text sigma": _set("text_sigma", (1, 2), NAN),
    "NaN logit scale": _set("scale", (), NAN),
    "inf image element": _set("image", (0, 0), INF),
    "zero image row": _set("image", 1, 0.0),
}
SIDES = ("none", "image", "text", "both")


def _inputs(case: str, scale: float, device) -> dict:
    generator = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(shape, generator=generator)
    tensors = {
        "image": rand(BATCH, DIM),
        "text": rand(CLASSES, DIM),
        "image_mu": 0.1 * rand(DIM),
        "image_sigma": 0.1 * rand(DIM).abs(),
        "text_mu": 0.1 * rand(CLASSES, DIM),
        "text_sigma": 0.1 * rand(CLASSES, DIM).abs(),
        "scale": torch.tensor(scale),
    }
    CASES[case](tensors)
    return {name: tensor.to(device).requires_grad_(True) for name, tensor in tensors.items()}


def _run(op: str, backend: str, case: str, side: str, scale: float, reduction: str):
    """(output, every gradient) of the op on ``backend``; None for a gradient never asked."""
    device = backend_device(backend)
    t = _inputs(case, scale, device)
    kwargs = dict(
        image_noise=(t["image_mu"], t["image_sigma"]) if side in ("image", "both") else None,
        text_noise=(t["text_mu"], t["text_sigma"]) if side in ("text", "both") else None,
        num_samples=2,
        seed=3,
        backend=backend,
    )
    if op == "loss":
        target = torch.tensor([0, 1, 2, 1], device=device)
        out = pini_kernels.noisy_cross_entropy(
            t["image"], t["text"], t["scale"], target, reduction=reduction, **kwargs
        )
    else:
        out = pini_kernels.noisy_cosine_logits(t["image"], t["text"], t["scale"], **kwargs)
    out.sum().backward()
    return [out.detach(), *(tensor.grad for tensor in t.values())]


def _check_same_pattern(got, want, label):
    for name, actual, expected in zip(NAMES, got, want, strict=True):
        if expected is None:
            assert actual is None or not actual.any(), f"{label}: {name}"
            continue
        actual, expected = actual.cpu(), expected.cpu()
        for kind, test in (
            ("NaN", torch.isnan),
            ("+inf", torch.isposinf),
            ("-inf", torch.isneginf),
        ):
            mismatch = test(actual) != test(expected)
            if mismatch.any():
                index = tuple(int(i) for i in mismatch.nonzero()[0])
                raise AssertionError(
                    f"{label}: {name} has {kind} where the reference has not, or the reverse, "
                    f"at {index}: got {actual[index].item()}, reference {expected[index].item()} "
                    f"({int(mismatch.sum())} elements)"
                )


@pytest.mark.parametrize("scale", [14.0, 1e10])
@pytest.mark.parametrize(("op", "reduction"), [("loss", "mean"), ("loss", "none"), ("logits", "")])
@pytest.mark.parametrize("case", list(CASES))
def test_non_finite_values_reach_what_they_reach_in_the_reference(
    fused_backend, case, op, reduction, scale
):
    for side in SIDES:
        want = _run(op, "reference", case, side, scale, reduction)
        got = _run(op, fused_backend, case, side, scale, reduction)
        _check_same_pattern(got, want, f"{op} {reduction} noise on {side}, {case}, scale {scale}")


@pytest.mark.parametrize("scale", [1e10, 1e12, 3e30])
def test_huge_logit_scales_stay_finite_and_match_the_loss(fused_backend, scale):
    """At logit scale 1e10 and beyond, cosine * scale - max, contracted to an FMA, reached
    +-512 and the row's exp-sum overflowed (NaN) or vanished (-inf log-sum-exp) on the cpu
    backend. The loss stays finite and equal to the reference's to float32 rounding of its size;
    the gradients stay finite."""
    want = _run("loss", "reference", "zero image row", "both", scale, "none")
    got = _run("loss", fused_backend, "zero image row", "both", scale, "none")
    _check_same_pattern(got, want, f"scale {scale}")
    finite = torch.isfinite(want[0])
    assert torch.allclose(got[0][finite].cpu(), want[0][finite].cpu(), rtol=1e-5, atol=1e-5 * scale)
    for name, gradient in zip(NAMES[1:], got[1:], strict=True):
        assert gradient is None or torch.isfinite(gradient).all() or name == "image", name


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("where", ["x", "mu", "sigma"])
def test_fused_inject_propagates_non_finite_values(fused_backend, where, mode):
    device = backend_device(fused_backend)
    results = []
    for backend in (fused_backend, "reference"):
        generator = torch.Generator().manual_seed(2)
        t = {
            "x": torch.randn(6, 9, generator=generator),
            "mu": torch.randn(9, generator=generator),
            "sigma": torch.rand(9, generator=generator),
        }
        t[where].view(-1)[3] = NAN
        t[where].view(-1)[5] = INF
        leaves = {name: value.to(device).requires_grad_(True) for name, value in t.items()}
        out = pini_kernels.fused_inject(
            *leaves.values(), mode=mode, num_samples=2, seed=5, backend=backend
        )
        out.sum().backward()
        results.append([out.detach(), *(leaf.grad for leaf in leaves.values())])
    names = ("output", "x", "mu", "sigma")
    for name, got, want in zip(names, *results, strict=True):
        assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want).cpu()), name
        assert torch.equal(torch.isinf(got).cpu(), torch.isinf(want).cpu()), name


def test_every_fused_backend_is_covered():
    assert FUSED_BACKENDS, "no fused backend to check"
