"""fused_inject against what users would otherwise run: eager PyTorch and torch.compile of it.

Eager is PiNI's reference code path: draw ``eps`` with torch.randn, then ``x + mu + sigma * eps``
for ``num_samples`` samples. Each case checks the fused result once against the eager formula fed
with the same ``eps``, so a fast wrong kernel cannot pass.
"""

import pytest
import torch
from conftest import DEVICE, FULL_SIZES

import pini_kernels

FUSED = pini_kernels.backends.resolve_backend(None, DEVICE)

# name -> (x shape, parameter shape, num_samples); PINI_BENCH_FULL=1 adds the large GPU sizes.
CASES = {
    "image-B8-m1": ((8, 3, 224, 224), (3, 224, 224), 1),
    "image-B8-m4": ((8, 3, 224, 224), (3, 224, 224), 4),
    "prompt-C100": ((100, 77, 512), (77, 512), 1),
    "feature-B256-D512-m8": ((256, 512), (512,), 8),
}
if FULL_SIZES:
    CASES["image-B32-m4"] = ((32, 3, 224, 224), (3, 224, 224), 4)
    CASES["prompt-C1000"] = ((1000, 77, 512), (77, 512), 1)


def eager_inject(x, mu, sigma, num_samples):
    eps = torch.randn((num_samples, *x.shape), device=x.device, dtype=x.dtype)
    return x + mu + sigma * eps


def fused_inject(x, mu, sigma, num_samples):
    return pini_kernels.fused_inject(x, mu, sigma, num_samples=num_samples, backend=FUSED)


PROVIDERS = {
    f"fused-{FUSED}": fused_inject,
    "eager": eager_inject,
    "compiled": torch.compile(eager_inject),
}


def _inputs(x_shape, param_shape, requires_grad):
    x = torch.randn(x_shape, device=DEVICE, requires_grad=requires_grad)
    mu = torch.randn(param_shape, device=DEVICE, requires_grad=requires_grad)
    sigma = torch.rand(param_shape, device=DEVICE, requires_grad=requires_grad)
    return x, mu, sigma


def _synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _check_once(x, mu, sigma, num_samples):
    fused = pini_kernels.fused_inject(x, mu, sigma, num_samples=num_samples, seed=5, backend=FUSED)
    eps = pini_kernels.noise((num_samples, *x.shape), seed=5, device=DEVICE)
    torch.testing.assert_close(fused, x + (mu + sigma * eps), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", list(CASES))
def test_forward(benchmark, case, provider):
    x_shape, param_shape, num_samples = CASES[case]
    benchmark.group = f"inject-forward {case}"
    x, mu, sigma = _inputs(x_shape, param_shape, requires_grad=False)
    if provider.startswith("fused"):
        _check_once(x, mu, sigma, num_samples)
    fn = PROVIDERS[provider]
    fn(x, mu, sigma, num_samples)  # compile / warm up outside the timing

    def run():
        out = fn(x, mu, sigma, num_samples)
        _synchronize()
        return out

    benchmark.extra_info.update(provider=provider, device=str(DEVICE), elements=x.numel())
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(benchmark, case, provider):
    x_shape, param_shape, num_samples = CASES[case]
    benchmark.group = f"inject-forward-backward {case}"
    x, mu, sigma = _inputs(x_shape, param_shape, requires_grad=True)
    fn = PROVIDERS[provider]
    grad_out = torch.randn((num_samples, *x_shape), device=DEVICE)

    def run():
        out = fn(x, mu, sigma, num_samples)
        grads = torch.autograd.grad(out, (x, mu, sigma), grad_out)
        _synchronize()
        return grads

    run()
    benchmark.extra_info.update(provider=provider, device=str(DEVICE), elements=x.numel())
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
