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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_python_number_parameters_keep_the_input_dtype(backend):
    """Like x + 0.5 in torch: numbers and 0-d tensors do not raise a half input to float32."""
    x = torch.randn(4, 8, device=backend_device(backend)).half()
    assert pini_kernels.fused_inject(x, 0.5, 0.1, seed=1, backend=backend).dtype == torch.float16
    mu = torch.tensor(0.5, device=x.device)
    assert pini_kernels.fused_inject(x, mu, 0.1, seed=1, backend=backend).dtype == torch.float16
    sigma = torch.rand(8, device=x.device)  # a float32 tensor with dimensions promotes, as in torch
    assert pini_kernels.fused_inject(x, mu, sigma, seed=1, backend=backend).dtype == torch.float32


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_add_mode_keeps_no_reference_to_x(backend):
    """Backward of add mode needs only the seed: x may change in place after the call."""
    device = backend_device(backend)
    leaf = torch.randn(4, 8, device=device, requires_grad=True)
    mu = torch.randn(8, device=device, requires_grad=True)
    hidden = leaf * 2
    out = pini_kernels.fused_inject(hidden, mu, 0.1, seed=1, backend=backend)
    hidden.add_(1.0)
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.full_like(leaf, 2.0))
    torch.testing.assert_close(mu.grad, torch.full_like(mu, 4.0))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tensor_seed(backend):
    x, mu, sigma = _valid(backend_device(backend))
    by_int = pini_kernels.fused_inject(x, mu, sigma, seed=77, backend=backend)
    by_tensor = pini_kernels.fused_inject(x, mu, sigma, seed=torch.tensor(77), backend=backend)
    torch.testing.assert_close(by_int, by_tensor, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^63\), got -5"):
        pini_kernels.fused_inject(x, mu, sigma, seed=torch.tensor(-5), backend=backend)
    with pytest.raises(TypeError, match="seed must be an integer tensor"):
        pini_kernels.fused_inject(x, mu, sigma, seed=torch.tensor(1.0), backend=backend)
    with pytest.raises(ValueError, match="0-d CPU tensor"):
        pini_kernels.fused_inject(x, mu, sigma, seed=torch.tensor([1, 2]), backend=backend)


def test_new_seed_each_step_does_not_recompile_each_step():
    """An int seed that changes every step becomes dynamic after one recompile, not eight."""
    from torch._dynamo.utils import counters

    backend = FUSED_BACKENDS[0] if FUSED_BACKENDS else "reference"
    x, mu, sigma = _valid(backend_device(backend))
    fn = lambda x, seed: pini_kernels.fused_inject(x, mu, sigma, seed=seed, backend=backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    for step in range(6):
        torch.testing.assert_close(compiled(x, step), fn(x, step))
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inductor_backward_with_channels_last_and_transposed_inputs(backend):
    """The fake gradients promise the inputs' layouts and the real ones keep that promise."""
    device = backend_device(backend)
    images = torch.randn(2, 3, 4, 4, device=device).to(memory_format=torch.channels_last)
    mu = torch.randn(4, 4, 3, device=device).permute(2, 0, 1)  # dense, not contiguous
    sigma = torch.rand(3, 4, 4, device=device)
    leaves = [t.detach().requires_grad_(True) for t in (images, mu, sigma)]

    def loss(x, mu, sigma):
        out = pini_kernels.fused_inject(x, mu, sigma, mode="mul", num_samples=2, seed=3,
                                        backend=backend)  # fmt: skip
        return (out * out).sum()

    expected = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want)
        assert have.stride() == want.stride()


def test_noise_accepts_an_int_shape_and_rejects_odd_dtypes():
    assert pini_kernels.noise(5, seed=1).shape == (5,)
    with pytest.raises(TypeError, match="dtype must be float32, float16, bfloat16 or float64"):
        pini_kernels.noise(5, seed=1, dtype=torch.float8_e4m3fn)
