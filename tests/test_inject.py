"""The fused_inject op (pini_kernels/inject.py) on every backend: forward and backward against the
pure-PyTorch reference, argument errors (docs/spec.md §7), seeds, torch.compile without graph
breaks, and sizes past one block, chunk and tile.

What each backend splits its work into, and so what a size must cross:
- Triton (pini_kernels/triton/launch.py): a program owns ``block`` columns, 16384 under the
  interpreter and 1024 on a GPU, and a chunk of rows: one chunk under the interpreter, several on
  a GPU. ``small_triton_programs`` below forces small blocks and several row chunks on CPU.
- CPU (csrc/cpu/): inject tiles are 2048 columns by ``ROWS_PER_CHUNK["cpu"]`` = 64 rows in
  backward.
- CUDA: ``ROWS_PER_CHUNK["cuda"]`` = 8 rows per backward chunk.
Every output is poisoned with NaN (conftest.py), so an element no program writes fails.
"""

import ctypes
import mmap

import pytest
import torch
from conftest import ALL_BACKENDS, FUSED_BACKENDS, backend_device
from helpers import assert_close, compare_inject_with_reference, inject_forward_backward

import pini_kernels
from pini_kernels import reference
from pini_kernels.inject import broadcast_layout
from pini_kernels.native import ROWS_PER_CHUNK
from pini_kernels.triton import launch

# (x shape, mu shape, sigma shape): every broadcasting pattern of pini_kernels/inject.py.
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
    """docs/spec.md §3: fused_inject(x, mu, sigma, num_samples=m, seed=s) equals
    x + mu + sigma * noise(...)."""
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
    kwargs = dict(mode="mul", num_samples=3, seed=4, backend=fused_backend)
    first = inject_forward_backward(pini_kernels.fused_inject, x, mu, sigma, weights, **kwargs)
    second = inject_forward_backward(pini_kernels.fused_inject, x, mu, sigma, weights, **kwargs)
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


# --- argument errors, numbers as parameters, seeds ---------------------------------------------


def _valid(device="cpu"):
    return (
        torch.randn(4, 8, device=device),
        torch.randn(8, device=device),
        torch.rand(8, device=device),
    )


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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_python_number_parameters_keep_the_input_dtype(backend):
    """Like x + 0.5 in torch: numbers and 0-d tensors do not raise a half input to float32."""
    x = torch.randn(4, 8, device=backend_device(backend)).half()
    assert pini_kernels.fused_inject(x, 0.5, 0.1, seed=1, backend=backend).dtype == torch.float16
    mu = torch.tensor(0.5, device=x.device)
    assert pini_kernels.fused_inject(x, mu, 0.1, seed=1, backend=backend).dtype == torch.float16
    sigma = torch.rand(8, device=x.device)  # a float32 tensor with dimensions promotes, as in torch
    assert pini_kernels.fused_inject(x, mu, sigma, seed=1, backend=backend).dtype == torch.float32


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


# --- what backward keeps, torch.compile ---------------------------------------------------------


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


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="needs the native CPU kernels")
@pytest.mark.parametrize("mode", ["add", "mul"])
def test_eager_call_runs_the_kernels_without_custom_op_or_copies(mode):
    """Outside torch.compile, forward+backward runs one forward and one backward kernel: no
    custom-op dispatch (host time that small tensors feel) and no copy of grad_x (add mode's
    stand-in for x is not contiguous; its gradient must not be copied into another layout)."""
    x, mu, sigma = (
        t.requires_grad_() for t in _inputs((4, 3, 5), (3, 5), (3, 5), torch.float32, "cpu")
    )
    with _RecordOps() as recorded:
        out = pini_kernels.fused_inject(
            x, mu, sigma, mode=mode, num_samples=2, seed=5, backend="cpu"
        )
        grads = torch.autograd.grad(out, (x, mu, sigma), torch.ones_like(out))
    names = recorded.names
    assert names.count("pini_native::inject_forward") == 1, names
    assert names.count("pini_native::inject_backward") == 1, names
    assert not any(name.startswith("pini_kernels::") for name in names), names
    assert "aten::copy_" not in names, names
    eps = pini_kernels.noise((2, 4, 3, 5), seed=5, backend="cpu")
    noise = mu.detach() + sigma.detach() * eps
    expected_x = (noise.sum(0) if mode == "mul" else torch.full_like(x, 2.0)).detach()
    factor = x.detach() if mode == "mul" else torch.ones_like(x)
    assert_close(grads[0], expected_x, atol=1e-5, rtol=1e-5, name="grad_x")
    assert_close(grads[1], (factor * 2).sum(0), atol=1e-5, rtol=1e-5, name="grad_mu")
    assert_close(grads[2], (factor * eps).sum((0, 1)), atol=1e-5, rtol=1e-5, name="grad_sigma")


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="needs the native CPU kernels")
@pytest.mark.parametrize("x_shape", [(32, 512), (16, 3, 32, 32)], ids=["one-thread", "threads"])
def test_cpu_results_do_not_depend_on_thread_count(x_shape):
    """Small work runs on one thread, larger work on several: same bits either way."""
    x, mu, sigma = (
        t.requires_grad_() for t in _inputs(x_shape, x_shape[1:], x_shape[1:], torch.float32, "cpu")
    )
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 4):
            torch.set_num_threads(count)
            out = pini_kernels.fused_inject(
                x, mu, sigma, mode="mul", num_samples=3, seed=8, backend="cpu"
            )
            results.append((out, *torch.autograd.grad(out, (x, mu, sigma), out.detach())))
    finally:
        torch.set_num_threads(threads)
    for single, several in zip(*results, strict=True):
        assert torch.equal(single, several)


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
        out = pini_kernels.fused_inject(
            x, mu, sigma, mode="mul", num_samples=2, seed=3, backend=backend
        )
        return (out * out).sum()

    expected = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want)
        assert have.stride() == want.stride()


# --- sizes past one block, chunk and tile (and a multiple of none) -----------------------------

CPU_COLUMN_TILE = 2048
CPU_ROWS_PER_CHUNK = ROWS_PER_CHUNK["cpu"]

# (x shape, mu/sigma shape) wider than two interpreter blocks and many GPU blocks and CPU tiles.
WIDE_PATTERNS = {
    # rows 2 x width 40001 (odd: the unaligned stream path), one parameter per column.
    "per-feature": ((2, 40_001), (40_001,)),
    # rows 1 x width 40008 (a multiple of 4: the aligned stream path), parameters like x.
    "per-row": ((3, 13_336), (3, 13_336)),
    # rows 1 x width 40004, 10001 consecutive elements share a parameter.
    "leading": ((4, 10_001), (4, 1)),
    # rows 2 x width 16800, runs of 7 elements share a parameter: CPU tiles (2048 = 7 * 292 + 4)
    # start inside a run.
    "middle": ((2, 2400, 7), (2400, 1)),
}


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("pattern", list(WIDE_PATTERNS))
def test_inject_spans_several_blocks(fused_backend, pattern, mode):
    """fused_inject forward and backward past one block/tile, against the reference."""
    device = backend_device(fused_backend)
    x_shape, param_shape = WIDE_PATTERNS[pattern]
    x, mu, sigma = _inputs(x_shape, param_shape, param_shape, torch.float32, device)
    assert x.numel() > 2 * launch.MAX_BLOCK_INTERPRETER
    compare_inject_with_reference(fused_backend, x, mu, sigma, mode=mode, num_samples=2, seed=77)


@pytest.fixture
def small_triton_programs(monkeypatch):
    """Triton under the interpreter launched like a GPU: 32-column blocks, tiles of 2 rows (64
    elements), 8 programs wanted, so rows split into several chunks each walked in several tiles,
    the last cut short (no effect on a real GPU, which splits and tiles them anyway)."""
    monkeypatch.setattr(launch, "MAX_BLOCK_INTERPRETER", 32)
    monkeypatch.setattr(launch, "TILE_ELEMENTS_INTERPRETER", 64)
    monkeypatch.setattr(launch, "INTERPRETER_TARGET_PROGRAMS", 8)


def _many_rows(backend: str) -> int:
    """Two backward row chunks and 3 rows more: 131 rows on CPU, 19 on CUDA and Triton. Triton's
    chunks follow the grid (launch.py): with small_triton_programs, 19 rows of 2 column blocks
    give 4 row chunks of 5 rows, the last cut to 4."""
    return 2 * ROWS_PER_CHUNK.get(backend, 8) + 3


# rows -> (x shape, mu/sigma shape); none of the widths is a multiple of a block or tile.
MANY_ROW_PATTERNS = {
    "per-feature": lambda rows: ((rows, 37), (37,)),  # (D,): rows x 37
    "shared-embeddings": lambda rows: ((rows, 5, 9), (5, 9)),  # (L, D): rows x 45
    # (B, D): one row of rows x 35 columns, on CPU 4585 = two 2048-column tiles and 489.
    "per-row": lambda rows: ((rows, 35), (rows, 35)),
    "per-channel": lambda rows: ((rows, 3, 4, 5), (3, 1, 1)),  # (C, 1, 1): 20 columns each
}


@pytest.mark.usefixtures("small_triton_programs")
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("pattern", list(MANY_ROW_PATTERNS))
def test_inject_more_rows_than_one_chunk(fused_backend, pattern, mode):
    """Forward and backward with the last row chunk (and column tile or block) cut short."""
    device = backend_device(fused_backend)
    x_shape, param_shape = MANY_ROW_PATTERNS[pattern](_many_rows(fused_backend))
    x, mu, sigma = _inputs(x_shape, param_shape, param_shape, torch.float32, device)
    layout = broadcast_layout(x.shape, mu.shape)
    if fused_backend == "cpu":
        assert layout.rows > CPU_ROWS_PER_CHUNK or layout.width > CPU_COLUMN_TILE
    elif fused_backend == "triton" and device.type == "cpu":
        config = launch.elementwise_config(layout.width, layout.rows, device)
        assert config.column_blocks > 1 and (config.row_chunks > 1 or layout.rows == 1)
        assert config.rows_per_tile == min(2, layout.rows)
    compare_inject_with_reference(fused_backend, x, mu, sigma, mode=mode, num_samples=2, seed=5)


@pytest.mark.usefixtures("small_triton_programs")
@pytest.mark.parametrize("needs", ["x-only", "params-only"])
def test_inject_backward_partial_grads_many_rows(fused_backend, needs):
    """Backward kernels' x-only and parameter-only paths past one row chunk (add mode)."""
    device = backend_device(fused_backend)
    rows = _many_rows(fused_backend)
    x, mu, sigma = _inputs((rows, 37), (37,), (37,), torch.float32, device)
    x.requires_grad_(needs == "x-only")
    mu.requires_grad_(needs == "params-only")
    sigma.requires_grad_(needs == "params-only")
    leaves = [t for t in (x, mu, sigma) if t.requires_grad]
    grad_weights = torch.randn(2, rows, 37, device=device)
    kwargs = dict(num_samples=2, seed=8)
    got = pini_kernels.fused_inject(x, mu, sigma, backend=fused_backend, **kwargs)
    want = pini_kernels.fused_inject(x, mu, sigma, backend="reference", **kwargs)
    got_grads = torch.autograd.grad((got * grad_weights).sum(), leaves)
    want_grads = torch.autograd.grad((want * grad_weights).sum(), leaves)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        scale = max(1.0, want_grad.abs().max().item())
        assert_close(got_grad, want_grad, atol=1e-5 * scale, rtol=1e-5, name="grad")


# --- add mode's backward never reads x --------------------------------------------------------


def _float_before_unreadable_page() -> tuple[torch.Tensor, mmap.mmap]:
    """A one-element float32 CPU tensor followed by an unreadable page: a kernel that reads one
    element past it dies of a segmentation fault instead of reading stray memory. Returns the
    tensor and the mapping that holds it (keep both alive)."""
    page = mmap.PAGESIZE
    region = mmap.mmap(-1, 2 * page)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    protection_none = 0  # PROT_NONE (the mmap module does not name it)
    if libc.mprotect(address + page, page, protection_none) != 0:
        pytest.skip(f"mprotect failed: errno {ctypes.get_errno()}")
    value = torch.frombuffer(region, dtype=torch.float32, count=1, offset=page - 4)
    value.fill_(float("nan"))
    return value, region


@pytest.mark.parametrize("need_param_grad", [True, False])
@pytest.mark.parametrize("x_shape", [(5, 37), (3, 64)])
def test_add_backward_with_stand_in_x(fused_backend, x_shape, need_param_grad):
    """Autograd keeps a one-element expanded stand-in for x in add mode; each backend's
    inject_backward must not read it. On the CPU the stand-in's one element sits right before an
    unreadable page (a read past it crashes); on a GPU, compute-sanitizer's memcheck in
    benchmarks/gpu_check.sh flags the read. The gradients are checked against a hand
    computation from the reference noise stream."""
    from pini_kernels.kernel_tables import inject_kernels

    device = backend_device(fused_backend)
    rows, width = x_shape
    num_samples, seed = 2, 21
    if device.type == "cpu":
        one_element, _region = _float_before_unreadable_page()
    else:
        one_element = torch.full((), float("nan"), device=device)
    stand_in = one_element.reshape(()).expand(rows, width)
    mu = torch.randn(width, device=device)
    sigma = torch.rand(width, device=device) + 0.1
    grad_out = torch.randn(num_samples, rows, width, device=device)
    grad_x = torch.full((rows, width), float("nan"), device=device)
    partial_sums = inject_kernels(fused_backend).inject_backward(
        grad_out,
        stand_in,
        mu,
        sigma,
        seed,
        num_samples,
        False,
        rows,
        width,
        1,
        grad_x,
        need_param_grad,
    )
    assert_close(grad_x, grad_out.sum(0), atol=1e-5, rtol=1e-5, name="grad_x")
    if not need_param_grad:
        assert partial_sums is None
        return
    eps = reference.normal_stream(seed, 0, num_samples * rows * width, device=device)
    eps = eps.view(num_samples, rows, width)
    partial_mu, partial_sigma = (partial.sum(0) for partial in partial_sums)
    assert_close(partial_mu, grad_out.sum((0, 1)), atol=1e-5, rtol=1e-5, name="grad_mu")
    want_sigma = (grad_out * eps).sum((0, 1))
    assert_close(partial_sigma, want_sigma, atol=1e-4, rtol=1e-5, name="grad_sigma")


# --- the two eager entry points of the native backends -------------------------------------------

NATIVE_FAST_PATH_CASES = {
    # x shape, mu/sigma shape, dtype
    "per-element": ((32, 512), (32, 512), torch.float32),
    "per-feature": ((7, 130), (130,), torch.float32),
    "middle run, half": ((3, 4, 5, 6), (4, 1, 1), torch.bfloat16),
    "empty x": ((0, 8), (8,), torch.float32),
}


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("case", list(NATIVE_FAST_PATH_CASES))
def test_native_autograd_op_equals_the_python_function(case, mode):
    """On the native backends, contiguous calls go through ``pini_native::inject``, whose autograd
    node is C++ (csrc/autograd.cpp); the others through ``InjectFunction``. Both must give the
    same output and gradients, bit for bit, in the same dtypes."""
    from pini_kernels import inject, kernel_tables, seeds

    if "cpu" not in pini_kernels.available_backends():
        pytest.skip("needs the native CPU kernels")
    x_shape, param_shape, dtype = NATIVE_FAST_PATH_CASES[case]
    generator = torch.Generator().manual_seed(11)
    tensors = [
        torch.randn(x_shape, generator=generator).to(dtype),
        torch.randn(param_shape, generator=generator).to(dtype),
        torch.rand(param_shape, generator=generator).to(dtype) + 0.1,
    ]
    seed = seeds.seed_tensor(9)
    multiply = mode == "mul"
    assert inject._native_fast_path(*tensors)
    results = []
    for entry in ("native", "python"):
        leaves = [tensor.clone().requires_grad_(True) for tensor in tensors]
        if entry == "native":
            native = kernel_tables.inject_autograd_kernels("cpu")
            out = inject._inject_with_autograd(native, *leaves, seed, 3, multiply, True)
            assert type(out.grad_fn).__name__ == "CppFunction"  # backward runs no Python
        else:
            out = inject.InjectFunction.apply(*leaves, seed, 3, multiply, "cpu")
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        grads = torch.autograd.grad(out, leaves, grad_out)
        results.append((out, *grads))
    for name, native, python in zip(("out", "x", "mu", "sigma"), *results, strict=True):
        assert native.dtype == python.dtype and native.shape == python.shape, name
        assert torch.equal(native, python), f"{case} {mode}: {name} differs"


@pytest.mark.parametrize("param_shape", [(32, 48), (48,)], ids=["per-row", "per-feature"])
def test_one_sample_on_the_native_path_is_one_autograd_node(param_shape):
    """fused_inject without num_samples on contiguous CPU tensors: the C++ node gives x's shape
    itself and takes mu and sigma in their own shapes, so no view node sits before or after it
    (each costs microseconds forward and backward, which a (32, 512) tensor feels). Output and
    gradients equal the reference's."""
    if "cpu" not in pini_kernels.available_backends():
        pytest.skip("needs the native CPU kernels")
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(32, 48, generator=generator)
    mu = torch.randn(param_shape, generator=generator)
    sigma = torch.rand(param_shape, generator=generator) + 0.1
    grad_out = torch.randn(32, 48, generator=generator)
    results = []
    for backend in ("cpu", "reference"):
        leaves = [tensor.clone().requires_grad_(True) for tensor in (x, mu, sigma)]
        out = pini_kernels.fused_inject(*leaves, seed=5, backend=backend)
        if backend == "cpu":
            assert type(out.grad_fn).__name__ == "CppFunction"
            inputs = [edge[0] for edge in out.grad_fn.next_functions if edge[0] is not None]
            assert all(type(node).__name__ == "AccumulateGrad" for node in inputs), inputs
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for name, got, want in zip(("out", "x", "mu", "sigma"), *results, strict=True):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_native_fast_path_leaves_layouts_and_expansions_to_the_python_function():
    """Non-contiguous inputs (whose gradients keep their layouts) and parameters that must be
    expanded (whose gradients are summed in fp32) stay on ``InjectFunction``."""
    from pini_kernels import inject

    x = torch.randn(4, 6)
    assert inject._native_fast_path(x, torch.randn(6), torch.rand(6))
    assert not inject._native_fast_path(x.t().contiguous().t(), torch.randn(6), torch.rand(6))
    assert not inject._native_fast_path(x, torch.randn(6, 4).t(), torch.rand(4, 6))
    assert not inject._native_fast_path(x, torch.randn(6), torch.rand(4, 6))  # shapes differ
    assert not inject._native_fast_path(
        torch.randn(4, 5, 6), torch.randn(4, 1, 6), torch.rand(4, 1, 6)
    )
