"""Argument errors (SPEC.md, "Errors"), backend selection, torch.compile without graph breaks."""

import pytest
import torch
from conftest import FUSED_BACKENDS, backend_device

import pini_kernels
from pini_kernels import backends


def _valid(device="cpu"):
    return (
        torch.randn(4, 8, device=device),
        torch.randn(8, device=device),
        torch.rand(8, device=device),
    )


ALL_BACKENDS = [*FUSED_BACKENDS, "reference"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (
            dict(mu=torch.randn(5)),
            ValueError,
            r"mu of shape \(5,\) does not broadcast to x's shape",
        ),
        (dict(sigma=torch.rand(2, 4, 8)), ValueError, "sigma of shape"),
        (dict(mode="multiply"), ValueError, "mode must be 'add' or 'mul', got 'multiply'"),
        (dict(num_samples=0), ValueError, "num_samples must be >= 1, got 0"),
        (dict(num_samples=-2), ValueError, "num_samples must be >= 1"),
        (dict(num_samples=2.0), TypeError, "num_samples must be None or an int"),
        (dict(num_samples=True), TypeError, "num_samples"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\^63\), got -1"),
        (dict(seed=2**63), ValueError, "seed must be in"),
        (dict(seed="7"), TypeError, "seed must be None or an int"),
        (dict(x=torch.arange(32).view(4, 8)), TypeError, "x must have dtype in"),
        (dict(mu=torch.zeros(8, dtype=torch.int32)), TypeError, "mu must have dtype in"),
        (dict(sigma=[0.1] * 8), TypeError, "sigma must be a float tensor or a Python number"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (dict(backend="tpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(backend, change, error, words):
    x, mu, sigma = _valid(backend_device(backend) if backend != "reference" else "cpu")
    kwargs = dict(x=x, mu=mu, sigma=sigma, mode="add", num_samples=None, seed=1, backend=backend)
    for name, value in change.items():
        kwargs[name] = value.to(x.device) if isinstance(value, torch.Tensor) else value
    with pytest.raises(error, match=words):
        pini_kernels.fused_inject(**kwargs)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_float64_only_on_reference(backend):
    x, mu, sigma = (t.double() for t in _valid(backend_device(backend)))
    with pytest.raises(TypeError, match="float64 is accepted by backend='reference' only"):
        pini_kernels.fused_inject(x, mu, sigma, seed=1, backend=backend)
    out = pini_kernels.fused_inject(x, mu, sigma, seed=1, backend="reference")
    assert out.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
def test_tensors_on_different_devices():
    x, mu, sigma = _valid("cuda")
    with pytest.raises(ValueError, match="mu is on cpu but x is on cuda"):
        pini_kernels.fused_inject(x, mu.cpu(), sigma, seed=1)


def test_tensors_on_different_devices_meta():
    """The same check without a GPU: a meta tensor is another device."""
    x, mu, sigma = _valid("cpu")
    with pytest.raises(ValueError, match="sigma is on meta but x is on cpu"):
        pini_kernels.fused_inject(x, mu, sigma.to("meta"), seed=1)


def test_python_numbers_as_parameters():
    x = torch.randn(3, 4)
    out = pini_kernels.fused_inject(x, 0.5, 0.0, seed=3)
    torch.testing.assert_close(out, x + 0.5)


def test_available_backends_lists_reference_last():
    names = pini_kernels.available_backends()
    assert names[-1] == "reference"
    assert set(names) <= set(backends.BACKENDS)


def test_auto_backend_and_environment_variable(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected_cpu = "cpu" if "cpu" in pini_kernels.available_backends() else "reference"
    assert backends.resolve_backend(None, cpu) == expected_cpu
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve_backend(None, cpu) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=f"{backends.ENV_VAR} must be one of"):
        backends.resolve_backend(None, cpu)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        RuntimeError, match=r"backend 'triton' is not available: .*TRITON_INTERPRET"
    ):
        backends.resolve_backend("triton", torch.device("cpu"))
    if "cpu" not in pini_kernels.available_backends():
        with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available: .*not built"):
            backends.resolve_backend("cpu", torch.device("cpu"))


def _inject_twice(x, mu, sigma, backend):
    first = pini_kernels.fused_inject(x, mu, sigma, num_samples=2, seed=3, backend=backend)
    second = pini_kernels.fused_inject(first, mu, sigma, mode="mul", seed=4, backend=backend)
    return second.square().mean()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(backend):
    """The custom ops trace without graph breaks (fullgraph=True would raise on one)."""
    device = backend_device(backend)
    x, mu, sigma = (t.requires_grad_(True) for t in _valid(device))
    compiled = torch.compile(_inject_twice, fullgraph=True, backend="aot_eager")
    loss = compiled(x, mu, sigma, backend)
    grads = torch.autograd.grad(loss, (x, mu, sigma))
    eager_loss = _inject_twice(x, mu, sigma, backend)
    eager_grads = torch.autograd.grad(eager_loss, (x, mu, sigma))
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_torch_compile_inductor(backend):
    device = backend_device(backend)
    x, mu, sigma = _valid(device)
    compiled = torch.compile(_inject_twice, fullgraph=True)
    torch.testing.assert_close(
        compiled(x, mu, sigma, backend), _inject_twice(x, mu, sigma, backend)
    )


def test_torch_compile_seed_none_does_not_recompile():
    """A drawn seed is a tensor, not a guarded constant: new seeds reuse the compiled graph."""
    from torch._dynamo.utils import counters

    backend = FUSED_BACKENDS[0] if FUSED_BACKENDS else "reference"
    device = backend_device(backend)
    x, mu, sigma = _valid(device)
    fn = lambda x, mu, sigma: pini_kernels.fused_inject(x, mu, sigma, backend=backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    outs = [compiled(x, mu, sigma) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1])
    assert counters["stats"]["unique_graphs"] == 1
