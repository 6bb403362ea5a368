"""fused_inject on every fused backend against the pure-PyTorch reference, forward and backward."""

import pytest
import torch
from conftest import FUSED_BACKENDS, backend_device
from helpers import assert_close, compare_inject_with_reference, inject_forward_backward

import pini_kernels
from pini_kernels import reference

# (x shape, mu shape, sigma shape): every broadcasting pattern of pini_kernels/_layout.py.
PATTERNS = {
    "per-feature": ((3, 5, 7), (7,), (7,)),
    "per-feature-aligned": ((4, 6, 8), (8,), (8,)),
    "per-row": ((6, 9), (6, 9), (6, 9)),
    "shared-embeddings": ((3, 5, 7), (5, 7), (5, 7)),
    "per-pixel-image": ((2, 3, 4, 4), (3, 4, 4), (3, 4, 4)),
    "scalar": ((3, 5, 7), (), ()),
    "leading": ((3, 5, 7), (3, 1, 1), (3, 1, 1)),
    "middle": ((3, 5, 7), (5, 1), (5, 1)),
    "irregular": ((3, 5, 7), (3, 1, 7), (3, 1, 7)),
    "mixed-shapes": ((3, 5, 7), (7,), ()),
    "size-one-dims": ((3, 1, 7), (1, 7), (7,)),
    "zero-dim-x": ((), (), ()),
}


def _inputs(x_shape, mu_shape, sigma_shape, dtype, device, param_dtype=None):
    param_dtype = param_dtype or dtype
    x = torch.randn(x_shape, device=device).to(dtype)
    mu = torch.randn(mu_shape, device=device).to(param_dtype)
    sigma = (torch.rand(sigma_shape, device=device) + 0.1).to(param_dtype)
    return x, mu, sigma


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("num_samples", [None, 1, 3])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_matches_reference_float32(fused_backend, pattern, num_samples, mode):
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs(*PATTERNS[pattern], torch.float32, device)
    compare_inject_with_reference(fused_backend, x, mu, sigma, mode=mode, num_samples=num_samples)


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["per-feature", "per-feature-aligned", "leading"])
def test_matches_reference_half(fused_backend, pattern, dtype, mode):
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs(*PATTERNS[pattern], dtype, device)
    out = compare_inject_with_reference(fused_backend, x, mu, sigma, mode=mode, num_samples=2)[0]
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_float32_parameters_promote(fused_backend, dtype):
    """Like x + mu in torch: bf16 activations with fp32 parameters give fp32 outputs."""
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs((4, 6, 8), (8,), (8,), dtype, device, param_dtype=torch.float32)
    out, grad_x, grad_mu, _ = compare_inject_with_reference(
        fused_backend, x, mu, sigma, mode="add", num_samples=None
    )
    assert out.dtype == torch.float32 and grad_x.dtype == dtype and grad_mu.dtype == torch.float32


def test_equals_x_plus_mu_plus_sigma_times_noise(fused_backend):
    """SPEC: fused_inject(x, mu, sigma, num_samples=m, seed=s) == x + mu + sigma * noise(...)."""
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs((5, 12), (12,), (12,), torch.float32, device)
    eps = pini_kernels.noise((4, 5, 12), seed=77, device=device, backend=fused_backend)
    added = pini_kernels.fused_inject(x, mu, sigma, num_samples=4, seed=77, backend=fused_backend)
    multiplied = pini_kernels.fused_inject(
        x, mu, sigma, mode="mul", num_samples=4, seed=77, backend=fused_backend
    )
    assert_close(added, x + (mu + sigma * eps), atol=1e-6, rtol=1e-6, name="add")
    assert_close(multiplied, x * (mu + sigma * eps), atol=1e-6, rtol=1e-6, name="mul")


def test_samples_are_independent_and_seeded(fused_backend):
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs((4, 8), (8,), (8,), torch.float32, device)
    out = pini_kernels.fused_inject(x, mu, sigma, num_samples=3, seed=9, backend=fused_backend)
    again = pini_kernels.fused_inject(x, mu, sigma, num_samples=3, seed=9, backend=fused_backend)
    other = pini_kernels.fused_inject(x, mu, sigma, num_samples=3, seed=10, backend=fused_backend)
    assert torch.equal(out, again)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out, other)
    # Sample 0 of m samples is the single-sample draw of the same seed.
    single = pini_kernels.fused_inject(x, mu, sigma, seed=9, backend=fused_backend)
    assert torch.equal(out[0], single)


def test_seed_none_follows_torch_manual_seed(fused_backend):
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs((4, 8), (8,), (8,), torch.float32, device)
    torch.manual_seed(3)
    first = pini_kernels.fused_inject(x, mu, sigma, backend=fused_backend)
    second = pini_kernels.fused_inject(x, mu, sigma, backend=fused_backend)
    torch.manual_seed(3)
    assert torch.equal(first, pini_kernels.fused_inject(x, mu, sigma, backend=fused_backend))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("layout", ["transposed", "expanded", "sliced-params"])
def test_non_contiguous_inputs(fused_backend, layout):
    device = backend_device(fused_backend)
    if layout == "transposed":
        x = torch.randn(7, 5, device=device).t()
        mu, sigma = torch.randn(7, device=device), torch.rand(7, device=device)
    elif layout == "expanded":
        x = torch.randn(1, 6, device=device).expand(4, 6)
        mu, sigma = torch.randn(6, device=device), torch.rand(6, device=device)
    else:
        x = torch.randn(4, 6, device=device)
        mu = torch.randn(6, 3, device=device)[:, 1]
        sigma = torch.rand(12, device=device)[::2]
    assert not (x.is_contiguous() and mu.is_contiguous())
    for mode in ("add", "mul"):
        compare_inject_with_reference(fused_backend, x, mu, sigma, mode=mode, num_samples=2)


def test_backward_is_deterministic(fused_backend):
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs((16, 8), (8,), (8,), torch.float32, device)
    weights = torch.randn(3, 16, 8, device=device)
    first = inject_forward_backward(
        pini_kernels.fused_inject,
        x,
        mu,
        sigma,
        weights,
        mode="mul",
        num_samples=3,
        seed=4,
        backend=fused_backend,
    )
    second = inject_forward_backward(
        pini_kernels.fused_inject,
        x,
        mu,
        sigma,
        weights,
        mode="mul",
        num_samples=3,
        seed=4,
        backend=fused_backend,
    )
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("needs", ["x-only", "params-only", "mu-only"])
def test_partial_requires_grad(fused_backend, needs):
    device = backend_device(fused_backend)
    x, mu, sigma = _inputs((3, 8), (8,), (8,), torch.float32, device)
    x.requires_grad_(needs == "x-only")
    mu.requires_grad_(needs in ("params-only", "mu-only"))
    sigma.requires_grad_(needs == "params-only")
    for mode in ("add", "mul"):
        out = pini_kernels.fused_inject(
            x, mu, sigma, mode=mode, num_samples=2, seed=1, backend=fused_backend
        )
        grads = torch.autograd.grad(out.sum(), [t for t in (x, mu, sigma) if t.requires_grad])
        want_out = reference.fused_inject(
            x, mu, sigma, seed=1, num_samples=2, multiply=mode == "mul"
        )
        want = torch.autograd.grad(want_out.sum(), [t for t in (x, mu, sigma) if t.requires_grad])
        for got, expected in zip(grads, want, strict=True):
            assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_samples", [None, 2])
def test_empty_batch(fused_backend, num_samples):
    """Like torch: an empty x gives an empty output and zero parameter gradients."""
    device = backend_device(fused_backend)
    x = torch.randn(0, 8, device=device, requires_grad=True)
    mu = torch.randn(8, device=device, requires_grad=True)
    sigma = torch.rand(8, device=device, requires_grad=True)
    out = pini_kernels.fused_inject(
        x, mu, sigma, num_samples=num_samples, seed=1, backend=fused_backend
    )
    assert out.shape == ((0, 8) if num_samples is None else (2, 0, 8))
    out.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.equal(mu.grad, torch.zeros(8, device=device))
    assert torch.equal(sigma.grad, torch.zeros(8, device=device))


def test_gradcheck_reference_float64():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(4, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(3, 1, dtype=torch.float64, requires_grad=True)
    for multiply in (False, True):
        fn = lambda x, mu, sigma, m=multiply: reference.fused_inject(
            x, mu, sigma, seed=5, num_samples=2, multiply=m
        )
        assert torch.autograd.gradcheck(fn, (x, mu, sigma))
        assert torch.autograd.gradcheck(
            lambda x, mu, sigma, m=multiply: pini_kernels.fused_inject(
                x, mu, sigma, seed=5, mode="mul" if m else "add", backend="reference"
            ),
            (x, mu, sigma),
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with >= 24 GB free")
def test_more_than_2_31_elements():
    """64-bit indexing: the last elements of a 2^31 + 1028-element tensor match the stream."""
    numel = 2**31 + 1028
    x = torch.zeros(numel, dtype=torch.float16, device="cuda")
    mu = torch.zeros((), dtype=torch.float16, device="cuda")
    sigma = torch.ones((), dtype=torch.float16, device="cuda")
    out = pini_kernels.fused_inject(x, mu, sigma, seed=11, backend=FUSED_BACKENDS[0])
    tail = 4096
    expected = reference.normal_stream(11, numel - tail, tail, device="cuda").half()
    assert_close(out[-tail:], expected, atol=2e-3, rtol=2e-3, name="tail")
