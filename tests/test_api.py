"""Backend selection (docs/spec.md §2): which backends a process has, which one a call uses,
and an error that says why when the one asked for cannot run. Each op's tests are in its own
module (test_noise_stream.py, test_inject.py, test_cosine.py), run on every backend.
"""

import pytest
import torch
from conftest import FUSED_BACKENDS

import pini_kernels
from pini_kernels import backends


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


@pytest.mark.parametrize("op", ["fused_inject", "noisy_cosine_logits", "noisy_cross_entropy"])
def test_second_order_gradients_raise_instead_of_missing_terms(fused_backend, op):
    """The ops' backward runs kernels autograd cannot see. With create_graph=True the gradients
    still come (a first-order use works), but differentiating them again must raise: a silently
    missing second-order term would be a wrong result."""
    from conftest import backend_device

    device = backend_device(fused_backend)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=generator).to(device).requires_grad_(True)
    mu = torch.randn(8, generator=generator).to(device).requires_grad_(True)
    sigma = torch.rand(8, generator=generator).to(device).requires_grad_(True)
    if op == "fused_inject":
        out = pini_kernels.fused_inject(
            x, mu, sigma, mode="mul", num_samples=2, seed=1, backend=fused_backend
        )
        value = out.square().sum()
    elif op == "noisy_cosine_logits":
        text = torch.randn(5, 8, generator=generator).to(device).requires_grad_(True)
        logits = pini_kernels.noisy_cosine_logits(
            x, text, 10.0, image_noise=(mu, sigma), seed=1, backend=fused_backend
        )
        value = logits.square().sum()
    else:
        text = torch.randn(5, 8, generator=generator).to(device).requires_grad_(True)
        target = torch.randint(0, 5, (6,), generator=generator).to(device)
        value = pini_kernels.noisy_cross_entropy(
            x, text, 10.0, target, image_noise=(mu, sigma), seed=1, backend=fused_backend
        )
    grads = torch.autograd.grad(value, (x, mu, sigma), create_graph=True)
    assert all(torch.isfinite(grad).all() for grad in grads)
    with pytest.raises(RuntimeError, match="differentiat"):
        torch.autograd.grad(sum(grad.square().sum() for grad in grads), (x, mu, sigma))


def test_signature_checks_are_kept_but_value_checks_run_every_call(monkeypatch):
    """The public functions check a call's signature (types, shapes, dtypes, devices, settings)
    once and reuse the verdict; what depends on values (the seed, the targets) is checked on every
    call, and the backend environment is part of the signature."""
    from pini_kernels import functional

    x, mu, sigma = torch.randn(4, 6), torch.randn(6), torch.rand(6)
    pini_kernels.fused_inject(x, mu, sigma, seed=1)
    with pytest.raises(ValueError, match="seed must be in"):
        pini_kernels.fused_inject(x, mu, sigma, seed=-1)
    with pytest.raises(ValueError, match="does not broadcast"):
        pini_kernels.fused_inject(x, torch.randn(5), sigma, seed=1)
    with pytest.raises(TypeError, match="num_samples"):  # True is not 1
        pini_kernels.fused_inject(x, mu, sigma, num_samples=True, seed=1)
    image, text, target = torch.randn(3, 6), torch.randn(5, 6), torch.tensor([0, 4, 2])
    pini_kernels.noisy_cross_entropy(image, text, 10.0, target, seed=1)
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        pini_kernels.noisy_cross_entropy(image, text, 10.0, torch.tensor([0, 5, 2]), seed=1)
    with pytest.raises(ValueError, match="label_smoothing"):
        pini_kernels.noisy_cross_entropy(image, text, 10.0, target, seed=1, label_smoothing=1.5)
    calls = []
    check = functional._check_inject
    monkeypatch.setattr(functional, "_check_inject", lambda *a: calls.append(a) or check(*a))
    for _ in range(3):
        pini_kernels.fused_inject(x, mu, sigma, seed=2)
    assert len(calls) == 0  # the signature was checked above
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    pini_kernels.fused_inject(x, mu, sigma, seed=2)
    assert len(calls) == 1  # another backend environment: checked again


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_noise_on_device_cuda_takes_a_seed_tensor_on_the_current_gpu(monkeypatch, device):
    """``noise(shape, seed=<0-d int64 tensor on cuda:0>, device="cuda")``: "cuda" is the current
    GPU, cuda:0 here, so the seed is on the op's device and the kernels read it there (no host
    read, which would sync and break CUDA-graph capture). Without the index, the seed check
    compared cuda:0 with cuda and raised. A fake GPU: a FakeTensor is the cuda:0 seed tensor,
    the backend is stubbed where the kernels would launch."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from pini_kernels import functional, noise_stream

    meta = torch.empty((), dtype=torch.int64, device="meta")
    seed = FakeTensor(FakeTensorMode(), meta, torch.device("cuda", 0))  # before CUDA "exists"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(functional, "resolve_backend", lambda backend, device: "triton")
    launched = []
    monkeypatch.setattr(
        noise_stream, "noise", lambda *arguments: launched.append(arguments) or "drawn"
    )
    assert pini_kernels.noise((3, 5), seed=seed, device=device) == "drawn"
    ((shape, seed_given, device_given, dtype, backend),) = launched
    assert device_given == torch.device("cuda", 0) and seed_given.device == device_given
    assert (shape, dtype, backend) == (torch.Size((3, 5)), torch.float32, "triton")
    with pytest.raises(ValueError, match="seed must be a 0-d CPU tensor or a 0-d tensor on cuda:1"):
        pini_kernels.noise((3, 5), seed=seed, device="cuda:1")


def _misaligned(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf holding ``tensor``'s values at storage offset 1 (4 bytes for float32, 2 for half
    types: no 8- or 16-byte vector access is aligned), and the contiguous view of them."""
    base = torch.full((tensor.numel() + 1,), float("nan"), dtype=tensor.dtype, device=tensor.device)
    base[1:] = tensor.reshape(-1)
    base.requires_grad_(True)
    return base, base[1:].view(tensor.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views_on_every_backend(fused_backend, dtype):
    """Inputs that are contiguous views at an odd storage offset (slices of a larger buffer, as a
    user's own code makes them): fused_inject and noisy_cross_entropy give the reference's
    results and gradients. On a GPU a vectorized load from such a pointer would fault or read the
    wrong elements; odd widths (37, 771) keep rows misaligned too."""
    from conftest import backend_device
    from helpers import TOLERANCES, assert_close

    device = backend_device(fused_backend)
    generator = torch.Generator().manual_seed(11)
    rand = lambda *shape: torch.randn(shape, generator=generator).to(device, dtype)
    atol, rtol = TOLERANCES[dtype]
    inject_inputs = [rand(3, 37), rand(37), rand(37).abs() + 0.1]
    image, text = rand(5, 771), rand(7, 771)
    loss_inputs = [image, text, rand(771), rand(771).abs() + 0.1]
    target = torch.randint(0, 7, (5,), generator=generator).to(device)

    def inject(x, mu, sigma, backend):
        return pini_kernels.fused_inject(
            x, mu, sigma, mode="mul", num_samples=2, seed=4, backend=backend
        )

    def loss(image, text, mu, sigma, backend):
        return pini_kernels.noisy_cross_entropy(
            image,
            text,
            20.0,
            target,
            image_noise=(mu, sigma),
            num_samples=2,
            seed=4,
            backend=backend,
        )

    for name, op, inputs in (("inject", inject, inject_inputs), ("loss", loss, loss_inputs)):
        bases, views = zip(*(_misaligned(t) for t in inputs), strict=True)
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        got, want = op(*views, fused_backend), op(*leaves, "reference")
        weights = torch.randn(got.shape, generator=generator).to(device)
        (got.float() * weights).sum().backward()
        (want.float() * weights).sum().backward()
        assert_close(got, want, atol=atol, rtol=rtol, name=f"{name} output")
        for index, (base, leaf) in enumerate(zip(bases, leaves, strict=True)):
            magnitude = max(1.0, float(leaf.grad.abs().max()))
            assert_close(
                base.grad[1:].view(leaf.shape),
                leaf.grad,
                atol=atol * magnitude,
                rtol=rtol,
                name=f"{name} gradient {index}",
            )


# --- torch.library.opcheck on every custom op ---------------------------------------------------


def _opcheck_cases(backend: str) -> dict[str, list[tuple]]:
    """Arguments of every ``pini_kernels::`` custom op on ``backend``: tiny, odd shapes, random
    values, every differentiable tensor requiring grad (so the autograd registration is checked
    too), both modes, and for the loss both of what it may save (gradients or the lse)."""
    generator = torch.Generator().manual_seed(3)

    def random(*shape, grad=True):
        return torch.randn(shape, generator=generator).requires_grad_(grad)

    def positive(*shape):
        return (torch.rand(shape, generator=generator) + 0.1).requires_grad_(True)

    def detached(arguments: tuple) -> tuple:
        """The backward ops are not differentiable (docs/spec.md §2): their inputs take no grad."""
        return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in arguments)

    seed = torch.tensor(7)
    cases: dict[str, list[tuple]] = {"inject": [], "inject_backward": []}
    for multiply in (False, True):
        x, mu, sigma = random(3, 5), random(5), positive(5)
        cases["inject"].append((x, mu, sigma, seed, 2, multiply, backend))
        grad_out = random(2, 3, 5, grad=False)
        cases["inject_backward"].append(
            detached((grad_out, x, mu, sigma, seed, 2, multiply, backend, True, True))
        )
    image, text, scale = random(3, 6), random(4, 6), torch.tensor(5.0, requires_grad=True)
    image_mu, image_sigma = random(6), positive(6)
    text_mu, text_sigma = random(4, 6), positive(1)
    inputs = (image, text, scale, image_mu, image_sigma, text_mu, text_sigma)
    image_only = (image, text, scale, image_mu, image_sigma, None, None)
    per_sample_text = (image, random(2, 4, 6), scale, None, None, text_mu, text_sigma)
    per_sample_image = (random(2, 3, 6), text, scale, image_mu, image_sigma, None, None)
    needs = [True] * 7
    image_needs = [True] * 5 + [False] * 2
    text_needs = [True] * 3 + [False] * 2 + [True] * 2
    cases["noisy_cosine_logits"] = [
        (*inputs, seed, 2, False, backend),
        (*image_only, seed, 2, True, backend),
        (*per_sample_text, seed, 2, False, backend),
        (*per_sample_image, seed, 2, True, backend),
    ]
    grad_logits = random(2, 3, 4, grad=False)
    cases["noisy_cosine_logits_backward"] = [
        detached((grad_logits, *inputs, seed, 2, False, backend, needs)),
        detached((grad_logits, *image_only, seed, 2, True, backend, image_needs)),
    ]
    target = torch.tensor([3, 0, 2])
    cases["noisy_cross_entropy"] = [
        (*inputs, target, seed, 2, False, "mean", 0.0, backend, needs),
        (*image_only, target, seed, 2, True, "sum", 0.1, backend, image_needs),
        (*per_sample_text, target, seed, 2, False, "none", 0.0, backend, text_needs),
        (*per_sample_image, target, seed, 2, True, "mean", 0.0, backend, image_needs),
    ]
    lse = torch.randn(2, 3, generator=generator).abs() + 2.0
    none_loss = (torch.randn(2, 3), *inputs, target, lse, seed, 2, False, "none", 0.0)
    mean_loss = (torch.tensor(1.5), *image_only, target, lse, seed, 2, True, "mean", 0.1)
    cases["noisy_cross_entropy_backward"] = [
        detached((*none_loss, backend, needs)),
        detached((*mean_loss, backend, image_needs)),
    ]
    cases["reference_noise"] = [(seed, 11, torch.device("cpu"))]
    return cases


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "reference"])
def test_opcheck_every_custom_op(backend):
    """``torch.library.opcheck`` (schema, autograd registration, fake tensor, AOT dispatch with
    dynamic shapes) on every ``pini_kernels::`` custom op: what torch.compile relies on. The fused
    ops run on each fused backend available here; ``reference_noise`` is the reference's op."""
    import pini_kernels.logits  # noqa: F401  (registers its ops, as importing pini_kernels does)

    registered = {
        name.split("::")[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("pini_kernels::")
    }
    cases = _opcheck_cases(backend)
    assert registered == set(cases), "an op without opcheck cases (or a case without an op)"
    for name, arguments_list in cases.items():
        if (backend == "reference") != (name == "reference_noise"):
            continue
        op = getattr(torch.ops.pini_kernels, name).default
        for arguments in arguments_list:
            torch.library.opcheck(op, arguments)
