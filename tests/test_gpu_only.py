"""Checks only a GPU can make, skipped without one; benchmarks/gpu_check.sh runs them:

- no op syncs with the device in forward or backward (``torch.cuda.set_sync_debug_mode("error")``);
- a CUDA graph captured around forward and backward, with the seed a 0-d int64 device tensor,
  draws fresh noise on every replay after a new value is written into that tensor;
- every op on every GPU backend at realistic shapes (CLIP's B=256, C=1000, D=512 and 768, and odd
  sizes), TF32 on and off, bf16/fp16 inputs, against the pure-PyTorch reference.
"""

import contextlib
import subprocess
import sys

import pytest
import torch
from conftest import FUSED_BACKENDS
from helpers import (
    assert_close,
    assert_probabilities_sum_to_one,
    loss_and_grads,
    record_backward_probabilities,
)

import pini_kernels
from pini_kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
GPU_BACKENDS = [name for name in FUSED_BACKENDS if name in ("triton", "cuda")]


@contextlib.contextmanager
def _sync_is_an_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def device_seed(value: int) -> torch.Tensor:
    """A 0-d int64 seed tensor on the GPU, written by a fill kernel (no host-to-device copy)."""
    return torch.full((), value, dtype=torch.int64, device=CUDA)


def _seed(kind: str, value: int):
    return device_seed(value) if kind == "device" else value


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=CUDA, dtype=dtype).requires_grad_(True)


def run_every_op(backend: str, seed) -> None:
    """Forward and backward of every op once (noise on both sides, every mode). Also what
    benchmarks/gpu_check.sh runs under compute-sanitizer."""
    pini_kernels.noise((3, 37), seed=seed, device=CUDA, backend=backend)
    for mode in ("add", "mul"):
        x, mu, sigma = _leaf(5, 37), _leaf(37), _leaf(37)
        out = pini_kernels.fused_inject(
            x, mu, sigma, mode=mode, num_samples=2, seed=seed, backend=backend
        )
        out.square().sum().backward()
    image, text, image_mu, image_sigma = _leaf(6, 48), _leaf(9, 48), _leaf(48), _leaf(48)
    text_mu, text_sigma = _leaf(9, 48), _leaf(9, 48)
    scale = torch.full((), 14.0, device=CUDA, requires_grad=True)
    kwargs = dict(
        image_noise=(image_mu, image_sigma),
        text_noise=(text_mu, text_sigma),
        num_samples=2,
        seed=seed,
        backend=backend,
    )
    logits = pini_kernels.noisy_cosine_logits(image, text, scale, **kwargs)
    logits.square().sum().backward()
    target = torch.randint(0, 9, (6,), device=CUDA)
    for reduction in ("mean", "none"):
        loss = pini_kernels.noisy_cross_entropy(
            image, text, scale, target, reduction=reduction, **kwargs
        )
        loss.sum().backward()


@pytest.mark.parametrize("seed_kind", ["int", "none", "device"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_op_syncs_in_forward_or_backward(backend, seed_kind):
    seed = None if seed_kind == "none" else _seed(seed_kind, 1234)
    run_every_op(backend, seed)  # compiles the kernels and creates the cuBLAS handle first
    torch.cuda.synchronize()
    with _sync_is_an_error():
        run_every_op(backend, seed)
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_out_of_range_target_fails_a_device_side_assert(backend):
    """A bad target on the GPU fails a device-side assert at the next sync, as F.cross_entropy
    does; that poisons the CUDA context, so it runs in a process of its own."""
    program = (
        "import torch, pini_kernels\n"
        "image, text = torch.randn(4, 16, device='cuda'), torch.randn(6, 16, device='cuda')\n"
        "target = torch.tensor([0, 1, 6, 2], device='cuda')\n"
        f"pini_kernels.noisy_cross_entropy(image, text, 10.0, target, backend={backend!r})\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "device-side assert" in result.stderr or "assert" in result.stderr.lower(), (
        result.stderr[-2000:]
    )


# --- CUDA graphs and torch.compile(mode="reduce-overhead") with a device seed tensor -----------

SEED_VALUES = (7, 2**40 + 3, 2**63 - 1, 12345)


def _inject_step(x, mu, sigma, seed, backend):
    out = pini_kernels.fused_inject(
        x, mu, sigma, mode="mul", num_samples=2, seed=seed, backend=backend
    )
    return (out, *torch.autograd.grad(out.square().sum(), (x, mu, sigma)))


def _loss_step(image, text, image_mu, image_sigma, text_mu, text_sigma, target, seed, backend):
    inputs = (image, text, image_mu, image_sigma, text_mu, text_sigma)
    options = {"num_samples": 2, "seed": seed, "backend": backend}
    return tuple(loss_and_grads(inputs, 30.0, target, **options))


def _step_inputs(name):
    if name == "inject":
        return _inject_step, (_leaf(33, 129), _leaf(129), _leaf(129))
    target = torch.randint(0, 77, (40,), device=CUDA)
    leaves = (_leaf(40, 96), _leaf(77, 96), _leaf(96), _leaf(96), _leaf(77, 96), _leaf(77, 96))
    return _loss_step, (*leaves, target)


@pytest.mark.parametrize("op", ["inject", "loss"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_replays_fresh_noise_from_the_seed_tensor(backend, op):
    """Capture forward and backward once; write a new value into the seed tensor before each
    replay: the replay must equal a direct call with that seed, and differ from the last one."""
    step, inputs = _step_inputs(op)
    seed = torch.zeros((), dtype=torch.int64, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compile the kernels, create the cuBLAS workspace
        for _ in range(2):
            step(*inputs, seed, backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*inputs, seed, backend)
    previous = None
    for value in SEED_VALUES:
        seed.fill_(value)
        graph.replay()
        direct = step(*inputs, value, backend)
        for index, (got, want) in enumerate(zip(captured, direct, strict=True)):
            assert_close(got, want, atol=1e-6, rtol=1e-6, name=f"{op} replay output {index}")
        if previous is not None:
            assert not torch.equal(captured[0], previous), "a replay drew the same noise again"
        previous = captured[0].clone()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_reduce_overhead_compile_draws_fresh_noise(backend):
    """torch.compile(mode="reduce-overhead") (CUDA graph trees) with the seed a device tensor."""
    image, text, image_mu, image_sigma = _leaf(40, 96), _leaf(77, 96), _leaf(96), _leaf(96)
    target = torch.randint(0, 77, (40,), device=CUDA)

    def loss_fn(image, text, image_mu, image_sigma, target, seed):
        return pini_kernels.noisy_cross_entropy(
            image,
            text,
            30.0,
            target,
            image_noise=(image_mu, image_sigma),
            seed=seed,
            backend=backend,
        )

    compiled = torch.compile(loss_fn, mode="reduce-overhead")
    seed = torch.zeros((), dtype=torch.int64, device=CUDA)
    losses = []
    for value in SEED_VALUES:
        seed.fill_(value)
        image_mu.grad = None
        loss = compiled(image, text, image_mu, image_sigma, target, seed)
        loss.backward()
        got = (loss.detach().clone(), image_mu.grad.clone())
        image_mu.grad = None
        want_loss = loss_fn(image, text, image_mu, image_sigma, target, value)
        want_loss.backward()
        assert_close(got[0], want_loss.detach(), atol=1e-5, rtol=1e-5, name="compiled loss")
        assert_close(got[1], image_mu.grad, atol=1e-5, rtol=1e-5, name="compiled mu grad")
        losses.append(float(got[0]))
    assert len(set(losses)) == len(losses), f"the same noise was drawn twice: {losses}"


# --- realistic shapes against the reference -----------------------------------------------

# CLIP's ViT-B/16 and ViT-L/14 widths with ImageNet's 1000 classes, and odd sizes.
REALISTIC_SHAPES = [(256, 1000, 512), (256, 1000, 768), (255, 999, 771)]
# Low precision by the relative rule (STYLE.md): the kernel's error against float64 is at most
# this many times plain PyTorch's error in the same dtype and matmul precision, plus a constant.
ERROR_FACTOR, ERROR_FLOOR = 4.0, 1e-5


@contextlib.contextmanager
def _matmul_precision(precision: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _loss_and_grads(backend, tensors, target, dtype, **kwargs):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    return loss_and_grads(leaves, 100.0, target, backend=backend, **kwargs)


def _max_error(got, want) -> float:
    return float((got.double() - want.double()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("shape", REALISTIC_SHAPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_realistic_loss_against_float64(backend, shape, precision, dtype):
    batch, classes, dim = shape
    generator = torch.Generator(device=CUDA).manual_seed(batch + classes + dim)
    rand = lambda *s: torch.randn(s, generator=generator, device=CUDA)
    tensors = [
        rand(batch, dim),
        rand(classes, dim),
        0.1 * rand(dim),
        0.05 * rand(dim).abs(),
        0.1 * rand(classes, dim),
        0.05 * rand(classes, dim).abs(),
    ]
    target = torch.randint(0, classes, (batch,), generator=generator, device=CUDA)
    kwargs = dict(num_samples=2, seed=99, mode="mul", label_smoothing=0.1)
    truth = _loss_and_grads("reference", tensors, target, torch.float64, **kwargs)
    with _matmul_precision(precision):
        plain = _loss_and_grads("reference", tensors, target, dtype, **kwargs)
        got = _loss_and_grads(backend, tensors, target, dtype, **kwargs)
    for index, (g, p, t) in enumerate(zip(got, plain, truth, strict=True)):
        allowed = ERROR_FACTOR * _max_error(p, t) + ERROR_FLOOR * max(1.0, float(t.abs().max()))
        error = _max_error(g, t)
        assert error <= allowed, (
            f"{backend} {shape} {precision} {dtype}: result {index} error {error:.3g} > "
            f"{allowed:.3g} ({ERROR_FACTOR} x plain PyTorch's {_max_error(p, t):.3g})"
        )


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backward_probabilities_sum_to_one_at_scale_100(backend, precision, monkeypatch):
    """Backward's recomputed cosines against forward's lse at CLIP's shapes, by the relative rule
    (a GPU's exp and log are approximate: ``assert_probabilities_sum_to_one``). The cuda backend
    is watched through the Python flow, which runs its kernels call for call."""
    seen = record_backward_probabilities(monkeypatch, backend)
    image, text = _leaf(256, 512), _leaf(1000, 512)
    target = torch.randint(0, 1000, (256,), device=CUDA)
    with _matmul_precision(precision):  # "none": the loss that recomputes in backward
        pini_kernels.noisy_cross_entropy(
            image, text, 100.0, target, reduction="none", backend=backend
        ).sum().backward()
    assert_probabilities_sum_to_one(seen, calls=1)


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inject_past_2_31_elements(backend, mode):
    """x of (2^25 + 3, 64) bf16 (2^31 + 192 elements, over 524,280 rows of a per-feature mu):
    the last rows forward and backward against the reference stream, mu's gradient against
    torch's sum."""
    rows, width = 2**25 + 3, 64
    x = torch.randn(rows, width, device=CUDA, dtype=torch.bfloat16).requires_grad_(True)
    mu, sigma = _leaf(width), (0.5 * torch.rand(width, device=CUDA)).requires_grad_(True)
    out = pini_kernels.fused_inject(x, mu, sigma, mode=mode, seed=5, backend=backend)
    tail = 1000
    start = (rows - tail) * width
    eps = reference.normal_stream(5, start, tail * width, device=CUDA).view(tail, width)
    noise = mu.detach() + sigma.detach() * eps
    x_tail = x.detach()[-tail:].float()
    want = x_tail * noise if mode == "mul" else x_tail + noise
    assert_close(out.detach()[-tail:].float(), want, atol=2e-2, rtol=2e-2, name="forward tail")
    out.backward(torch.ones_like(out))
    want_grad_x = noise if mode == "mul" else torch.ones_like(noise)
    assert_close(x.grad[-tail:].float(), want_grad_x, atol=2e-2, rtol=2e-2, name="grad x tail")
    want_grad_mu = x.detach().float().sum(0) if mode == "mul" else torch.full_like(mu, rows)
    assert_close(mu.grad, want_grad_mu, atol=1.0, rtol=1e-3, name="grad mu")


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("shape", REALISTIC_SHAPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_realistic_logits_and_inject_against_float64(backend, shape, precision):
    """The logits op (forward and every gradient) and fused_inject of CLIP features at realistic
    shapes, by the same relative rule."""
    batch, classes, dim = shape
    generator = torch.Generator(device=CUDA).manual_seed(batch * classes + dim)
    rand = lambda *s: torch.randn(s, generator=generator, device=CUDA)
    image, text, mu, sigma = rand(batch, dim), rand(classes, dim), rand(dim), rand(dim).abs()
    weights = rand(2, batch, classes)

    def logits_and_grads(backend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (image, text, mu, sigma)]
        logits = pini_kernels.noisy_cosine_logits(
            leaves[0],
            leaves[1],
            100.0,
            image_noise=(leaves[2], 0.1 * leaves[3]),
            num_samples=2,
            seed=8,
            backend=backend,
        )
        return [logits, *torch.autograd.grad((logits * weights.to(dtype)).sum(), leaves)]

    def inject_and_grads(backend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (image, mu, sigma)]
        out = pini_kernels.fused_inject(*leaves, mode="mul", num_samples=2, seed=8, backend=backend)
        return [out, *torch.autograd.grad(out.square().sum(), leaves)]

    for name, run in (("logits", logits_and_grads), ("inject", inject_and_grads)):
        truth = run("reference", torch.float64)
        with _matmul_precision(precision):
            plain, got = run("reference", torch.float32), run(backend, torch.float32)
        for index, (g, p, t) in enumerate(zip(got, plain, truth, strict=True)):
            scale = max(1.0, float(t.abs().max()))
            allowed = ERROR_FACTOR * _max_error(p, t) + ERROR_FLOOR * scale
            assert _max_error(g, t) <= allowed, (
                f"{name} {backend} {shape} {precision}: result {index} error "
                f"{_max_error(g, t):.3g} > {allowed:.3g}"
            )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_loss_stream_offsets_past_2_31(backend):
    """num_samples * B * D past 2^31: the last sample's image noise starts at stream element
    1366 * 2048 * 768 > 2^31 (64-bit offsets in the row kernels). Its per-row losses against a
    direct computation from the reference stream; backward runs and is finite."""
    batch, classes, dim = 2048, 100, 768
    samples = 2**31 // (batch * dim) + 2
    image, text = _leaf(batch, dim), _leaf(classes, dim)
    mu, sigma = _leaf(dim), (0.1 * torch.rand(dim, device=CUDA)).requires_grad_(True)
    target = torch.randint(0, classes, (batch,), device=CUDA)
    seed = 21
    losses = pini_kernels.noisy_cross_entropy(
        image,
        text,
        30.0,
        target,
        image_noise=(mu, sigma),
        num_samples=samples,
        seed=seed,
        reduction="none",
        backend=backend,
    )
    last = samples - 1
    assert last * batch * dim > 2**31
    eps = reference.normal_stream(seed, last * batch * dim, batch * dim, device=CUDA)
    noisy = image.detach() + mu.detach() + sigma.detach() * eps.view(batch, dim)
    logits = (
        30.0
        * torch.nn.functional.normalize(noisy)
        @ torch.nn.functional.normalize(text.detach()).t()
    )
    want = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert_close(losses.detach()[last], want, atol=1e-4, rtol=1e-4, name="last sample's losses")
    losses.mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in (image, text, mu, sigma))
