"""The noisy cosine logits and PiNI's loss (``noisy_cosine_logits``: pini_kernels/logits.py;
``noisy_cross_entropy``: pini_kernels/loss.py) on every backend, forward and every gradient
against the pure-PyTorch reference; then per-sample text features ``(num_samples, C, D)``; then
the edges ordinary inputs never reach:

- the Triton loss kernel's merge of per-split row statistics, forced on CPU with several splits;
- zero-norm feature rows (norm <= 1e-12, where F.normalize divides by the floor instead of the
  norm), on the image side and on the text side, with the other side's noise on;
- huge logits: logit_scale 100 with nearly equal features.

The edge shapes go past one 64-row / 64-class tile, one 32-wide step over D and (for the row
kernels under the interpreter) one 256-row program, and are a multiple of none of them.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_BACKENDS, FUSED_BACKENDS, backend_device
from helpers import (
    TOLERANCES,
    assert_close,
    assert_probabilities_sum_to_one,
    record_backward_probabilities,
    record_error,
    use_python_loss_flow,
)

import pini_kernels
from pini_kernels import reference

# (B, C, D): "odd": C past one 64-class tile and a multiple of none, D odd (the row kernels'
# unaligned noise path); "aligned": D a multiple of 4 (the aligned path); "single-row": B = 1.
# B past one 64-row tile: test_many_rows, and the per-sample and edge sections below.
SHAPES = {
    "odd": (5, 70, 37),
    "aligned": (6, 9, 48),
    "single-row": (1, 3, 8),
}
NOISE_SIDES = ["none", "image", "text", "both"]
GRAD_NAMES = ("image", "text", "logit_scale", "image_mu", "image_sigma", "text_mu", "text_sigma")
OPS = {"logits": pini_kernels.noisy_cosine_logits, "loss": pini_kernels.noisy_cross_entropy}


def _differentiable(image, text, scale, image_pair, text_pair) -> list:
    """The seven differentiable inputs in the ops' order (None for a side without noise)."""
    return [image, text, scale, *(image_pair or (None, None)), *(text_pair or (None, None))]


def _leaves(tensors, device=None):
    """Fresh leaves, on ``device`` when given (never the given tensors: their .grad would be
    shared)."""
    return [
        None if t is None else t.detach().clone().to(device or t.device).requires_grad_(True)
        for t in tensors
    ]


def _run(op, leaves, target, *, backend, **kwargs):
    """The op's output and the gradients of a random weighting of it (target: the loss's only)."""
    image, text, scale, image_mu, image_sigma, text_mu, text_sigma = leaves
    extra = (target,) if op is pini_kernels.noisy_cross_entropy else ()
    out = op(
        image,
        text,
        scale,
        *extra,
        image_noise=None if image_mu is None else (image_mu, image_sigma),
        text_noise=None if text_mu is None else (text_mu, text_sigma),
        backend=backend,
        **kwargs,
    )
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    (out.float() * weights).sum().backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _compare(backend, op, inputs, *, dtype=torch.float32, grad_dtype=None, label="", **kwargs):
    """The op on ``backend`` against the reference, output and every gradient, with the
    tolerances of ``dtype`` (the gradients': ``grad_dtype``'s, by default ``dtype``'s, scaled by
    the largest magnitude). inputs: as ``_make`` gives them. Returns the backend's output and
    gradients."""
    image, text, scale, image_pair, text_pair, target = inputs
    tensors = _differentiable(image, text, scale, image_pair, text_pair)
    got_out, got_grads = _run(op, _leaves(tensors), target, backend=backend, **kwargs)
    want_out, want_grads = _run(op, _leaves(tensors), target, backend="reference", **kwargs)
    atol, rtol = TOLERANCES[dtype]
    name = f"{op.__name__}{label}"
    error = assert_close(got_out, want_out, atol=atol, rtol=rtol, name=f"{name} output")
    record_error(f"{name} {backend} x:{image.dtype} out", error)
    atol, rtol = TOLERANCES[grad_dtype or dtype]
    for grad_name, got, want in zip(GRAD_NAMES, got_grads, want_grads, strict=True):
        if want is None:
            assert got is None, grad_name
            continue
        magnitude = max(1.0, want.abs().max().item())
        error = assert_close(
            got, want, atol=atol * magnitude, rtol=rtol, name=f"{name} grad {grad_name}"
        )
        record_error(f"{name} {backend} x:{image.dtype} grad", error)
    return got_out, got_grads


def _make(
    batch, classes, dim, sides, device, dtype=torch.float32, image_param=(None,), text_param=None
):
    generator = torch.Generator().manual_seed(batch * 1000 + classes * 10 + dim)
    rand = lambda *shape: torch.randn(shape, generator=generator).to(device, dtype)
    image, text = rand(batch, dim), rand(classes, dim)
    image_pair = text_pair = None
    if sides in ("image", "both"):
        shape = (dim,) if image_param == (None,) else image_param
        image_pair = (rand(*shape), rand(*shape).abs() + 0.1)
    if sides in ("text", "both"):
        shape = (classes, dim) if text_param is None else text_param
        text_pair = (rand(*shape), rand(*shape).abs() + 0.1)
    scale = torch.tensor(14.0, device=device)
    target = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return image, text, scale, image_pair, text_pair, target


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("num_samples", [1, 4])
@pytest.mark.parametrize("sides", NOISE_SIDES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_reference(fused_backend, shape, sides, num_samples, mode):
    inputs = _make(*SHAPES[shape], sides, backend_device(fused_backend))
    _compare(
        fused_backend,
        pini_kernels.noisy_cosine_logits,
        inputs,
        mode=mode,
        num_samples=num_samples,
        seed=11,
    )


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("num_samples", [1, 4])
@pytest.mark.parametrize("sides", NOISE_SIDES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_loss_matches_reference(fused_backend, shape, sides, num_samples, mode):
    inputs = _make(*SHAPES[shape], sides, backend_device(fused_backend))
    _compare(
        fused_backend,
        pini_kernels.noisy_cross_entropy,
        inputs,
        mode=mode,
        num_samples=num_samples,
        seed=11,
        label_smoothing=0.1,
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", ["odd", "single-row"])
def test_loss_reductions_and_smoothing(fused_backend, shape, reduction, label_smoothing):
    inputs = _make(*SHAPES[shape], "both", backend_device(fused_backend))
    _compare(
        fused_backend,
        pini_kernels.noisy_cross_entropy,
        inputs,
        mode="mul",
        num_samples=3,
        seed=2**35,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize(
    ("image_param", "text_param"),
    [((5, 16), (16,)), ((5, 1), ()), ((), (9, 1))],
    ids=["per-row-image", "per-sample-scalar", "scalar-image"],
)
def test_noise_parameter_broadcasting(fused_backend, image_param, text_param):
    inputs = _make(
        5,
        9,
        16,
        "both",
        backend_device(fused_backend),
        image_param=image_param,
        text_param=text_param,
    )
    for op in (pini_kernels.noisy_cosine_logits, pini_kernels.noisy_cross_entropy):
        _compare(fused_backend, op, inputs, mode="mul", num_samples=2, seed=3)


def test_many_rows(fused_backend):
    """More than one 64-row tile of image features."""
    inputs = _make(67, 5, 8, "both", backend_device(fused_backend))
    _compare(fused_backend, pini_kernels.noisy_cross_entropy, inputs, num_samples=2, seed=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(fused_backend, dtype):
    inputs = _make(4, 11, 16, "both", backend_device(fused_backend), dtype=dtype)
    logits, _ = _compare(
        fused_backend, pini_kernels.noisy_cosine_logits, inputs, dtype=dtype, num_samples=2, seed=8
    )
    assert logits.dtype == dtype
    # A float32 loss; its gradients come in the inputs' half dtype.
    loss, _ = _compare(
        fused_backend,
        pini_kernels.noisy_cross_entropy,
        inputs,
        dtype=torch.float32,
        grad_dtype=dtype,
        num_samples=2,
        seed=8,
    )
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_is_cross_entropy_of_logits(backend, reduction):
    """The loss equals F.cross_entropy over noisy_cosine_logits drawn with the same seed."""
    image, text, scale, image_pair, text_pair, target = _make(
        6, 13, 24, "both", backend_device(backend)
    )
    kwargs = dict(
        image_noise=image_pair,
        text_noise=text_pair,
        mode="mul",
        num_samples=3,
        seed=2**40 + 3,
        backend=backend,
    )
    logits = pini_kernels.noisy_cosine_logits(image, text, scale, **kwargs)
    loss = pini_kernels.noisy_cross_entropy(
        image, text, scale, target, reduction=reduction, label_smoothing=0.2, **kwargs
    )
    expected = F.cross_entropy(
        logits.reshape(18, 13), target.repeat(3), reduction=reduction, label_smoothing=0.2
    )
    assert_close(loss, expected.view(loss.shape), atol=1e-5, rtol=1e-5)


def test_noise_streams(fused_backend):
    """Image noise is the stream of seed over (m, B, D); text noise the stream of seed + 1."""
    device = backend_device(fused_backend)
    image, text = torch.randn(3, 8, device=device), torch.randn(4, 8, device=device)
    zero = torch.zeros(8, device=device)
    one = torch.ones(8, device=device)
    logits = pini_kernels.noisy_cosine_logits(
        image,
        text,
        1.0,
        image_noise=(zero, one),
        text_noise=(zero, one),
        num_samples=2,
        seed=21,
        backend=fused_backend,
    )
    image_eps = pini_kernels.noise((2, 3, 8), seed=21, device=device)
    text_eps = pini_kernels.noise((2, 4, 8), seed=22, device=device)
    noisy_image = F.normalize(image + image_eps, dim=-1)
    noisy_text = F.normalize(text + text_eps, dim=-1)
    assert_close(logits, noisy_image @ noisy_text.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch_like_cross_entropy(backend):
    device = backend_device(backend)
    image = torch.randn(0, 8, device=device, requires_grad=True)
    text = torch.randn(5, 8, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    logits = pini_kernels.noisy_cosine_logits(image, text, 10.0, num_samples=2, backend=backend)
    assert logits.shape == (2, 0, 5)
    for reduction in ("mean", "sum", "none"):
        loss = pini_kernels.noisy_cross_entropy(
            image, text, 10.0, target, num_samples=2, reduction=reduction, backend=backend
        )
        expected = F.cross_entropy(
            torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), reduction=reduction
        )
        if reduction == "mean":
            assert torch.isnan(loss)  # like F.cross_entropy: 0 / 0
        elif reduction == "sum":
            assert loss.item() == expected.item() == 0.0
        else:
            assert loss.shape == (2, 0)
        if reduction == "sum":
            loss.backward()
            assert torch.equal(text.grad, torch.zeros_like(text))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_targets(backend):
    image, text, scale, _, _, target = _make(4, 6, 8, "none", backend_device(backend))
    for bad in (6, -1, 100):
        wrong = target.clone()
        wrong[2] = bad
        with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 6\)"):
            pini_kernels.noisy_cross_entropy(image, text, scale, wrong, backend=backend)
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        pini_kernels.noisy_cross_entropy(image, text, scale, target.float(), backend=backend)
    with pytest.raises(ValueError, match=r"target must have shape \(B,\) = \(4,\)"):
        pini_kernels.noisy_cross_entropy(image, text, scale, target[:3], backend=backend)


def test_device_targets_checked_without_reading_them_back():
    """Off the CPU the range check is a device-side assert (no sync). A meta tensor has no values
    to read: reading one back (the old ``bool(flag)``) raises, a device-side assert does not."""
    from pini_kernels import _checks

    target = torch.tensor([0, 7, -1], device="meta")
    _checks.check_target_values(target, 6)  # would raise if the check read the flag back
    with pytest.raises(RuntimeError, match="meta"):
        bool(((target >= 0) & (target < 6)).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (dict(text=torch.randn(6, 9)), ValueError, "same feature dimension D, got 8 and 9"),
        (
            dict(image=torch.randn(1, 2, 4, 8)),
            ValueError,
            r"image_features must be \(B, D\) or \(num_samples, B, D\)",
        ),
        (dict(image_noise=(torch.randn(3),)), TypeError, "image_noise must be None or a"),
        (dict(text_noise=(torch.randn(5, 8), 1.0)), ValueError, r"text_noise\[0\] \(mu\) of shape"),
        (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale must be a scalar"),
        (dict(logit_scale="14"), TypeError, "logit_scale must be a float"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
        (dict(num_samples=0), ValueError, "num_samples must be >= 1"),
        (dict(num_samples=None), TypeError, "num_samples must be an int"),
        (dict(mode="sub"), ValueError, "mode must be 'add' or 'mul'"),
        (dict(seed=-3), ValueError, "seed must be in"),
    ],
)
def test_bad_arguments(backend, change, error, words):
    device = backend_device(backend)
    image, text, scale, _, _, target = _make(4, 6, 8, "none", device)
    kwargs = dict(
        image=image,
        text=text,
        logit_scale=scale,
        image_noise=None,
        text_noise=None,
        reduction="mean",
        label_smoothing=0.0,
        num_samples=1,
        mode="add",
        seed=1,
    )
    for name, value in change.items():
        kwargs[name] = value.to(device) if isinstance(value, torch.Tensor) else value
    if isinstance(kwargs["image_noise"], tuple):
        kwargs["image_noise"] = tuple(t.to(device) for t in kwargs["image_noise"])
    if isinstance(kwargs["text_noise"], tuple):
        kwargs["text_noise"] = tuple(
            t.to(device) if isinstance(t, torch.Tensor) else t for t in kwargs["text_noise"]
        )
    image, text, scale = kwargs.pop("image"), kwargs.pop("text"), kwargs.pop("logit_scale")
    with pytest.raises(error, match=words):
        pini_kernels.noisy_cross_entropy(image, text, scale, target, backend=backend, **kwargs)


def test_gradcheck_reference_float64():
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)
    leaves = [
        rand(3, 5),
        rand(4, 5),
        torch.tensor(3.0, dtype=torch.float64),
        rand(5),
        rand(5).abs() + 0.1,
        rand(4, 5),
        rand(1).abs() + 0.1,
    ]
    for leaf in leaves:
        leaf.requires_grad_(True)
    target = torch.tensor([0, 3, 1])

    def loss(image, text, scale, image_mu, image_sigma, text_mu, text_sigma):
        return reference.noisy_cross_entropy(
            image,
            text,
            scale,
            target,
            image_noise=(image_mu, image_sigma),
            text_noise=(text_mu, text_sigma),
            multiply=True,
            num_samples=2,
            seed=4,
            reduction="none",
            label_smoothing=0.1,
        )

    assert torch.autograd.gradcheck(loss, leaves)


# --- memory: what the loss keeps for backward ---------------------------------------------------


def saved_bytes_beyond_inputs(fn, inputs) -> int:
    """Bytes of the tensors autograd saves for backward, not counting storages of ``inputs``."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    seen: set[int] = set()
    total = 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in input_storages and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def _saved_bytes(backend, batch, classes, dim, num_samples, reduction="mean"):
    """(bytes the loss saves beyond its inputs, bytes of its differentiable inputs)."""
    device = backend_device(backend)
    image, text, scale, image_pair, text_pair, target = _make(batch, classes, dim, "both", device)
    leaves = _leaves(_differentiable(image, text, scale, image_pair, text_pair))
    image, text, scale, image_mu, image_sigma, text_mu, text_sigma = leaves
    fn = lambda: pini_kernels.noisy_cross_entropy(
        image,
        text,
        scale,
        target,
        image_noise=(image_mu, image_sigma),
        text_noise=(text_mu, text_sigma),
        num_samples=num_samples,
        seed=1,
        reduction=reduction,
        backend=backend,
    )
    input_bytes = sum(leaf.untyped_storage().nbytes() for leaf in leaves)
    return saved_bytes_beyond_inputs(fn, [*leaves, target]), input_bytes


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_loss_saves_no_logits(fused_backend, reduction):
    """Beyond its inputs, the fused loss saves at most gradients of its inputs' sizes ("mean" and
    "sum" compute them in forward) or the (m, B) log-sum-exp ("none"), plus the seed: nothing
    that grows with m * B * C. The eager reference saves m * B * C logits."""
    batch, dim = 4, 8
    saved = {}
    for classes, num_samples in ((5, 1), (40, 1), (40, 6)):
        fused, input_bytes = _saved_bytes(
            fused_backend, batch, classes, dim, num_samples, reduction
        )
        if reduction == "none":
            assert fused <= num_samples * batch * 4 + 64, (classes, num_samples, fused)
        else:
            assert fused <= input_bytes + 64, (classes, num_samples, fused, input_bytes)
        saved[classes, num_samples] = fused
        eager, _ = _saved_bytes("reference", batch, classes, dim, num_samples, reduction)
        assert eager >= num_samples * batch * classes * 4, (classes, num_samples, eager)
    if reduction != "none":  # the gradients do not grow with the samples
        assert saved[40, 6] == saved[40, 1], saved


def _check_native_flow_calls(monkeypatch, loss_of, tensors, reduction) -> None:
    """The native backends run the loss's flow as one op (csrc/loss_flow.cpp) under a C++
    autograd node: the profiler records each ``pini_native::cross_entropy_flow`` call with its
    inputs' shapes, among them the row weights (gradients computed) and a given lse (backward's
    recompute), empty when not passed."""

    def flow_calls(function) -> list[str]:
        with torch.profiler.profile(record_shapes=True) as profile:
            function()
        calls = []
        for event in profile.events():
            if event.name == "pini_native::cross_entropy_flow":
                lse_shape, row_grads_shape = event.input_shapes[13:15]
                calls.append("grad" if lse_shape else "stats+grad" if row_grads_shape else "stats")
        return calls

    leaves = _leaves(tensors)
    loss = None

    def forward():
        nonlocal loss
        loss = loss_of(*leaves)

    assert flow_calls(forward) == (["stats"] if reduction == "none" else ["stats+grad"])
    assert flow_calls(lambda: loss.sum().backward()) == (["grad"] if reduction == "none" else [])

    def without_gradients():
        loss_of(*tensors)
        with torch.no_grad():
            loss_of(*leaves)

    assert flow_calls(without_gradients) == ["stats", "stats"]


def _count_kernel_calls(monkeypatch, backend) -> dict[str, int]:
    """Counts of the backend's loss kernel calls, by name, from now on."""
    from pini_kernels import kernel_tables

    kernels = kernel_tables.loss_kernels(backend)
    calls: dict[str, int] = {}
    names = ("normalize", "normalize_backward", "loss_stats", "loss_stats_grad", "loss_grad")
    for name in names:
        function = getattr(kernels, name)

        def counted(*args, _function=function, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _function(*args)

        monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_gradients_in_forward_and_none_without_gradients(
    fused_backend, monkeypatch, reduction
):
    """A "mean" or "sum" loss with a gradient wanted runs its gradients' kernels in forward
    (Triton: loss_stats_grad per sample; native: the flow op with row weights) and none in
    backward; "none" keeps the recompute path; without a gradient wanted (no requires_grad, or
    no_grad) only the statistics are computed."""
    device = backend_device(fused_backend)
    image, text, scale, image_pair, _, target = _make(6, 7, 8, "image", device)
    samples = 3

    def loss_of(*tensors):
        image, text, mu, sigma = tensors
        return pini_kernels.noisy_cross_entropy(
            image,
            text,
            scale,
            target,
            image_noise=(mu, sigma),
            num_samples=samples,
            seed=4,
            reduction=reduction,
            backend=fused_backend,
        )

    if fused_backend != "triton":
        _check_native_flow_calls(monkeypatch, loss_of, [image, text, *image_pair], reduction)
        return
    calls = _count_kernel_calls(monkeypatch, fused_backend)
    leaves = _leaves([image, text, *image_pair])
    loss = loss_of(*leaves)
    forward_calls = dict(calls)
    calls.clear()
    loss.sum().backward()
    if reduction == "none":
        assert forward_calls == {"normalize": samples + 1, "loss_stats": samples}
        assert calls["loss_grad"] == samples and calls["normalize_backward"] == samples + 1
    else:
        assert forward_calls == {
            "normalize": samples + 1,
            "loss_stats_grad": samples,
            "normalize_backward": samples + 1,
        }
        assert calls == {}, calls
    calls.clear()
    loss_of(image, text, *image_pair)
    with torch.no_grad():
        loss_of(*leaves)
    assert calls == {"normalize": 2 * (samples + 1), "loss_stats": 2 * samples}, calls


def _pini_step(image, text, scale, image_mu, image_sigma, target, backend):
    loss = pini_kernels.noisy_cross_entropy(
        image,
        text,
        scale,
        target,
        image_noise=(image_mu, image_sigma),
        num_samples=2,
        seed=6,
        backend=backend,
    )
    logits = pini_kernels.noisy_cosine_logits(
        image, text, scale, text_noise=(image_mu, image_sigma), seed=7, backend=backend
    )
    return loss + logits.logsumexp(-1).mean()


def test_torch_compile_fullgraph(fused_backend):
    device = backend_device(fused_backend)
    image, text, scale, image_pair, _, target = _make(4, 6, 8, "image", device)
    leaves = [t.requires_grad_(True) for t in (image, text, scale, *image_pair)]
    compiled = torch.compile(_pini_step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves, target, fused_backend)
    grads = torch.autograd.grad(loss, leaves)
    eager = _pini_step(*leaves, target, fused_backend)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch.testing.assert_close(loss, eager)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


# --- per-sample text features: (num_samples, C, D), sample s using text_features[s] ----------

# (B, C, D, num_samples): small; and one with B and C past a 64-row / 64-class tile, D past a
# 32-wide step, none a multiple of its tile.
PER_SAMPLE_SMALL = (5, 9, 12, 3)
PER_SAMPLE_LARGE = (67, 70, 40, 2)


def _make_per_sample(batch, classes, dim, num_samples, sides, device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(batch * 1000 + classes * 10 + dim + num_samples)

    def rand(*shape):
        return torch.randn(shape, generator=generator).to(device, dtype)

    image, text = rand(batch, dim), rand(num_samples, classes, dim)
    image_pair = (rand(dim), rand(dim).abs() + 0.1) if sides in ("image", "both") else None
    text_pair = (
        (rand(classes, dim), rand(classes, 1).abs() + 0.1) if sides in ("text", "both") else None
    )
    scale = torch.tensor(14.0, device=device)
    target = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return image, text, scale, image_pair, text_pair, target


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("sides", NOISE_SIDES)
@pytest.mark.parametrize("op", list(OPS))
def test_per_sample_text_matches_reference(fused_backend, op, sides, mode):
    inputs = _make_per_sample(*PER_SAMPLE_SMALL, sides, backend_device(fused_backend))
    extra = {"label_smoothing": 0.1} if op == "loss" else {}
    _, grads = _compare(
        fused_backend,
        OPS[op],
        inputs,
        mode=mode,
        num_samples=PER_SAMPLE_SMALL[3],
        seed=2**33 + 5,
        **extra,
    )
    assert grads[1].shape == inputs[1].shape  # per sample, not summed


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_sample_text_reductions(fused_backend, reduction, label_smoothing):
    inputs = _make_per_sample(*PER_SAMPLE_SMALL, "both", backend_device(fused_backend))
    loss, _ = _compare(
        fused_backend,
        pini_kernels.noisy_cross_entropy,
        inputs,
        mode="mul",
        num_samples=PER_SAMPLE_SMALL[3],
        seed=4,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    assert loss.shape == ((PER_SAMPLE_SMALL[3], PER_SAMPLE_SMALL[0]) if reduction == "none" else ())


@pytest.mark.parametrize("op", list(OPS))
def test_per_sample_text_past_one_tile(fused_backend, op):
    inputs = _make_per_sample(*PER_SAMPLE_LARGE, "both", backend_device(fused_backend))
    _compare(fused_backend, OPS[op], inputs, mode="add", num_samples=PER_SAMPLE_LARGE[3], seed=12)


def test_per_sample_text_non_contiguous(fused_backend):
    """(m, C, D) text features with stride along D != 1 (a transposed (m, D, C) tensor)."""
    image, text, scale, image_pair, text_pair, target = _make_per_sample(
        *PER_SAMPLE_SMALL, "both", "cpu"
    )
    text = text.mT.contiguous().mT
    assert text.stride(-1) != 1
    inputs = [image, text, scale, image_pair, text_pair, target]
    device = backend_device(fused_backend)
    inputs = [
        tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device) for x in inputs
    ]
    _compare(fused_backend, pini_kernels.noisy_cross_entropy, inputs, num_samples=3, seed=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_sample_text_half(fused_backend, dtype):
    inputs = _make_per_sample(*PER_SAMPLE_SMALL, "both", backend_device(fused_backend), dtype=dtype)
    logits, _ = _compare(
        fused_backend, pini_kernels.noisy_cosine_logits, inputs, dtype=dtype, num_samples=3, seed=8
    )
    assert logits.dtype == dtype


def logits_by_hand(image, text, image_pair, text_pair, mode, samples, seed, scale=14.0):
    """(m, B, C) logits of docs/spec.md §2-§4 written out: image noise from the stream of seed
    over (m, B, D), text noise from seed + 1 over (m, C, D), each side's features (N, D) or
    (m, N, D); F.normalize; the scale times the dot."""
    batch, classes, dim = image.shape[-2], text.shape[-2], image.shape[-1]
    image_eps = pini_kernels.noise((samples, batch, dim), seed=seed)
    text_eps = pini_kernels.noise((samples, classes, dim), seed=seed + 1)
    combine = torch.mul if mode == "mul" else torch.add
    noisy_image = combine(image, image_pair[0] + image_pair[1] * image_eps)
    noisy_text = combine(text, text_pair[0] + text_pair[1] * text_eps)
    return scale * F.normalize(noisy_image, dim=-1) @ F.normalize(noisy_text, dim=-1).mT


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_reference_per_sample_text_by_hand(mode):
    """Sample s: image noise from the stream of seed over (m, B, D), text noise from seed + 1
    over (m, C, D) perturbing text_features[s]; F.normalize; logit_scale times the dot."""
    batch, classes, _, samples = PER_SAMPLE_SMALL
    image, text, scale, image_pair, text_pair, target = _make_per_sample(
        *PER_SAMPLE_SMALL, "both", "cpu"
    )
    seed = 2**40 + 9
    expected = logits_by_hand(image, text, image_pair, text_pair, mode, samples, seed)
    kwargs = dict(image_noise=image_pair, text_noise=text_pair, mode=mode, num_samples=samples)
    logits = pini_kernels.noisy_cosine_logits(
        image, text, scale, seed=seed, backend="reference", **kwargs
    )
    assert_close(logits, expected, atol=1e-5, rtol=1e-5, name="reference logits")
    loss = pini_kernels.noisy_cross_entropy(
        image, text, scale, target, seed=seed, backend="reference", reduction="none", **kwargs
    )
    want = F.cross_entropy(expected.reshape(-1, classes), target.repeat(samples), reduction="none")
    assert_close(loss, want.view(samples, batch), atol=1e-5, rtol=1e-5, name="reference loss")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_shared_text_given_per_sample(backend):
    """(C, D) text expanded to (m, C, D) gives the (C, D) logits and loss; its per-sample text
    gradients sum to the (C, D) gradient. Also covers a stride-0 sample dimension."""
    device = backend_device(backend)
    _, classes, dim, samples = PER_SAMPLE_SMALL
    image, _, scale, image_pair, text_pair, target = _make_per_sample(
        *PER_SAMPLE_SMALL, "both", device
    )
    shared = torch.randn(classes, dim, device=device)
    results = []
    for text in (shared, shared.expand(samples, classes, dim)):
        leaves = _leaves(_differentiable(image, text, scale, image_pair, text_pair))
        out, grads = _run(
            pini_kernels.noisy_cross_entropy,
            leaves,
            target,
            backend=backend,
            mode="mul",
            num_samples=samples,
            seed=3,
            reduction="none",
            label_smoothing=0.1,
        )
        results.append((out, grads))
    (shared_out, shared_grads), (expanded_out, expanded_grads) = results
    assert_close(expanded_out, shared_out, atol=1e-6, rtol=1e-6, name="loss")
    assert expanded_grads[1].shape == (samples, classes, dim)
    assert_close(expanded_grads[1].sum(0), shared_grads[1], atol=1e-5, rtol=1e-5, name="text")
    for name, got, want in zip(GRAD_NAMES, expanded_grads, shared_grads, strict=True):
        if name != "text":
            assert_close(got, want, atol=1e-5, rtol=1e-5, name=name)


def _per_sample_step(
    image, text, scale, image_mu, image_sigma, text_mu, text_sigma, target, backend
):
    loss = pini_kernels.noisy_cross_entropy(
        image,
        text,
        scale,
        target,
        image_noise=(image_mu, image_sigma),
        text_noise=(text_mu, text_sigma),
        num_samples=3,
        seed=6,
        backend=backend,
    )
    logits = pini_kernels.noisy_cosine_logits(
        image,
        text,
        scale,
        text_noise=(text_mu, text_sigma),
        num_samples=3,
        seed=7,
        backend=backend,
    )
    return loss + logits.logsumexp(-1).mean()


def test_per_sample_text_torch_compile(fused_backend):
    device = backend_device(fused_backend)
    image, text, scale, image_pair, text_pair, target = _make_per_sample(
        *PER_SAMPLE_SMALL, "both", device
    )
    leaves = [t.requires_grad_(True) for t in (image, text, scale, *image_pair, *text_pair)]
    compiled = torch.compile(_per_sample_step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves, target, fused_backend)
    grads = torch.autograd.grad(loss, leaves)
    want = _per_sample_step(*leaves, target, "reference")
    want_grads = torch.autograd.grad(want, leaves)
    assert_close(loss, want, atol=1e-5, rtol=1e-5, name="compiled loss")
    for name, got, expected in zip(GRAD_NAMES, grads, want_grads, strict=True):
        magnitude = max(1.0, expected.abs().max().item())
        assert_close(got, expected, atol=1e-5 * magnitude, rtol=1e-5, name=f"compiled {name}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("side", ["image", "text"])
def test_per_sample_shape_errors(backend, op, side):
    """A side's features given per sample, (num_samples, N, D), with the wrong sample count, too
    many dims, another D, or per-sample noise parameters (they are per row, shared by the
    samples): one clear ValueError each. Image: B = 5 rows; text: C = 9."""
    device = backend_device(backend)
    image, text, scale, _, _, target = _make_per_sample(*PER_SAMPLE_SMALL, "none", device)
    rows, letter = (5, "B") if side == "image" else (9, "C")
    extra = (target,) if op == "loss" else ()

    def call(features, **kwargs):  # the other side shared, (N, D)
        sides = (features, text[0]) if side == "image" else (image, features)
        return OPS[op](*sides, scale, *extra, backend=backend, **kwargs)

    features = image.expand(3, *image.shape) if side == "image" else text  # (3, N, 12)
    name = f"{side}_features"
    shape = rf"\(num_samples, {letter}, D\)"
    with pytest.raises(ValueError, match=rf"{name} .*{shape} = \(2, {rows}, 12\), got shape"):
        call(features, num_samples=2)
    with pytest.raises(ValueError, match=rf"{name} must be \({letter}, D\) or {shape}"):
        call(features[None], num_samples=3)
    dims = "11 and 12" if side == "image" else "12 and 11"
    with pytest.raises(ValueError, match=f"same feature dimension D, got {dims}"):
        call(features[..., :11], num_samples=3)
    per_sample_mu = torch.zeros(3, rows, 12, device=device)
    wrong_noise = rf"{side}_noise\[0\] \(mu\) of shape \(3, {rows}, 12\) does not broadcast to "
    with pytest.raises(ValueError, match=wrong_noise + rf"{name}\[s\]'s shape \({rows}, 12\)"):
        call(features, num_samples=3, **{f"{side}_noise": (per_sample_mu, 1.0)})


def test_per_sample_features_default_to_one_sample():
    """num_samples defaults to 1, so (m, N, D) features of either side need it said."""
    image, text, scale, _, _, _ = _make_per_sample(*PER_SAMPLE_SMALL, "none", "cpu")
    with pytest.raises(ValueError, match=r"text_features .*\(num_samples, C, D\) = \(1, 9, 12\)"):
        pini_kernels.noisy_cosine_logits(image, text, scale, backend="reference")
    with pytest.raises(ValueError, match=r"image_features .*\(num_samples, B, D\) = \(1, 5, 12\)"):
        pini_kernels.noisy_cosine_logits(image.expand(3, 5, 12), text[0], scale)


# --- edges: huge logits, the split merge, zero-norm rows ----------------------------------------

# (B, C, D): small; past every tile (rows past the interpreter's 256-row programs of the row
# kernels at D = 40, classes past five 64-class tiles).
EDGE_SMALL = (5, 9, 12)
EDGE_LARGE = (260, 300, 40)


needs_triton = pytest.mark.skipif(
    "triton" not in FUSED_BACKENDS, reason="the Triton backend is not available"
)


def _random(generator, *shape):
    return torch.randn(shape, generator=generator)


def _noise_pair(generator, dim):
    return (_random(generator, dim), _random(generator, dim).abs() + 0.1)


def _assert_rows_close(got, want, *, atol, rtol, name):
    """Compare row by row, each row against its own magnitude: zero-norm rows have gradients near
    1e12 that would otherwise swamp the tolerance of every other row."""
    magnitude = want.abs().amax(dim=-1, keepdim=True).clamp_min(1.0) if want.dim() else 1.0
    return assert_close(got / magnitude, want / magnitude, atol=atol, rtol=rtol, name=name)


def _compare_rows(backend, op, tensors, target, *, label, atol=1e-5, rtol=1e-5, **kwargs):
    """The op on ``backend`` (leaves on its device) against the reference (on the CPU), each
    gradient row against its own magnitude. Returns the reference's gradients."""
    device = backend_device(backend)
    got_out, got_grads = _run(
        op, _leaves(tensors, device), target.to(device), backend=backend, **kwargs
    )
    want_out, want_grads = _run(op, _leaves(tensors, "cpu"), target, backend="reference", **kwargs)
    name = f"{op.__name__} {label}"
    assert torch.isfinite(got_out).all(), f"{name}: non-finite output"
    error = assert_close(got_out.cpu(), want_out, atol=atol, rtol=rtol, name=f"{name} output")
    record_error(f"{name} {backend} out", error)
    for grad_name, got, want in zip(GRAD_NAMES, got_grads, want_grads, strict=True):
        if want is None:
            assert got is None, grad_name
            continue
        error = _assert_rows_close(
            got.cpu(), want, atol=atol, rtol=rtol, name=f"{name} {grad_name}"
        )
        record_error(f"{name} {backend} grad", error)
    return want_grads


# --- huge logits: logit_scale 100, nearly equal features --------------------------------------


def _nearly_equal_inputs(batch, classes, dim, seed):
    """Features within a few percent of one direction: every cosine is near 1, so every logit is
    near 100 (exp(100) overflows float32) and the softmax still has spread to get right."""
    generator = torch.Generator().manual_seed(seed)
    direction = _random(generator, dim)
    image = direction + 0.05 * _random(generator, batch, dim)
    text = direction + 0.05 * _random(generator, classes, dim)
    target = torch.randint(0, classes, (batch,), generator=generator)
    tensors = [image, text, torch.tensor(100.0), *_noise_pair(generator, dim)]
    # Small text noise keeps the text rows near the common direction.
    tensors += [0.01 * _random(generator, dim), 0.01 * _random(generator, dim).abs()]
    return tensors, target


@pytest.mark.parametrize("op", list(OPS))
def test_huge_logits(fused_backend, op):
    tensors, target = _nearly_equal_inputs(*EDGE_LARGE[:2], EDGE_LARGE[2], seed=1)
    tensors[3], tensors[4] = 0.01 * tensors[3], 0.01 * tensors[4]  # image noise small too
    # Logits near 100 carry float32's rounding of 100 (~1e-5) in every backend.
    _compare_rows(
        fused_backend,
        OPS[op],
        tensors,
        target,
        label="huge logits",
        atol=1e-4,
        rtol=1e-5,
        num_samples=2,
        seed=3,
    )


# --- the Triton loss kernel's split merge, forced on CPU --------------------------------------


@needs_triton
@pytest.mark.parametrize("inputs", ["random", "huge-logits"])
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_loss_split_merge_matches_reference(force_loss_splits, splits, inputs):
    """Several class splits per row, merged with the exp(split_max - row_max) rescale. C = 300
    over 64-class tiles: 2 splits of 192 + 108, 3 of 128 + 128 + 44, 5 of 64 (the last 44)."""
    seen = force_loss_splits(splits)
    batch, classes, dim = 70, 300, 40
    if inputs == "huge-logits":
        tensors, target = _nearly_equal_inputs(batch, classes, dim, seed=2)
        tensors[3], tensors[4] = 0.01 * tensors[3], 0.01 * tensors[4]
        atol = 1e-4
    else:
        generator = torch.Generator().manual_seed(splits)
        image, text = _random(generator, batch, dim), _random(generator, classes, dim)
        noise = [*_noise_pair(generator, dim), *_noise_pair(generator, dim)]
        tensors = [image, text, torch.tensor(14.0), *noise]
        target = torch.randint(0, classes, (batch,), generator=generator)
        atol = 1e-5
    for reduction in ("none", "mean"):
        _compare_rows(
            "triton",
            pini_kernels.noisy_cross_entropy,
            tensors,
            target,
            label=f"{splits} splits",
            atol=atol,
            num_samples=2,
            seed=9,
            mode="mul",
            reduction=reduction,
            label_smoothing=0.1,
        )
    assert seen and set(seen) == {(batch, classes)}  # the forced splits ran


# --- one precision for forward and backward ---------------------------------------------------


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_backward_recomputes_the_forward_cosines(monkeypatch, fused_backend, precision):
    """Backward's cosines must be the ones forward took its log-sum-exp from: at logit_scale 100
    a cosine off by 1e-7 moves a probability by 1e-5, so the probabilities backward computes from
    forward's lse no longer sum to 1. Sums checked per row (``assert_probabilities_sum_to_one``),
    in both precisions (TF32 when the caller allowed it for matmuls: then in both passes), on
    every backend (the native ones through the Python flow, which a test can watch)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        _check_backward_recomputes_forward(monkeypatch, fused_backend)
        if fused_backend == "triton":
            from pini_kernels.triton import logits_loss

            assert logits_loss._input_precision() == ("tf32" if precision == "high" else "ieee")
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def _fp32_precision(matmul: str, overall: str):
    """The float32 precision set through torch's newer API (torch 2.9 and later), restored after."""
    backends = torch.backends
    previous = (backends.cuda.matmul.fp32_precision, backends.fp32_precision)
    backends.fp32_precision = overall
    backends.cuda.matmul.fp32_precision = matmul
    try:
        yield
    finally:
        backends.fp32_precision, backends.cuda.matmul.fp32_precision = previous


@needs_triton
@pytest.mark.skipif(
    not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch before 2.9"
)
@pytest.mark.parametrize(
    ("matmul", "overall", "expected"),
    [
        ("tf32", "none", "tf32"),
        ("ieee", "none", "ieee"),
        ("none", "tf32", "tf32"),
        ("none", "ieee", "ieee"),
        ("ieee", "tf32", "ieee"),
    ],
)
def test_loss_runs_after_the_new_precision_api(monkeypatch, matmul, overall, expected):
    """A caller who sets TF32 through ``torch.backends.cuda.matmul.fp32_precision`` or
    ``torch.backends.fp32_precision``: reading the legacy ``allow_tf32`` then raises ("mix of the
    legacy and new APIs"), which failed every Triton loss call. The precision the kernels take
    follows the new setting ("none" inherits the overall one), and the loss runs."""
    from pini_kernels.triton import logits_loss

    with _fp32_precision(matmul, overall):
        assert logits_loss._input_precision() == expected
        _check_backward_recomputes_forward(monkeypatch, "triton")


def _check_backward_recomputes_forward(monkeypatch, backend):
    seen = record_backward_probabilities(monkeypatch, backend)
    generator = torch.Generator().manual_seed(5)
    batch, classes, dim = 70, 130, 300  # past one 64 x 64 tile and many 32-wide steps over D
    image = _random(generator, batch, dim).requires_grad_(True)
    text = _random(generator, classes, dim)
    target = torch.randint(0, classes, (batch,), generator=generator)
    device = backend_device(backend)
    loss = pini_kernels.noisy_cross_entropy(
        image.to(device),
        text.to(device),
        100.0,
        target.to(device),
        image_noise=_noise_pair(generator, dim),
        num_samples=2,
        seed=3,
        reduction="none",
        backend=backend,
    )
    loss.sum().backward()  # "none" recomputes in backward (a "mean" loss has no recompute)
    assert_probabilities_sum_to_one(seen, calls=2)


# --- zero-norm rows -------------------------------------------------------------------------

ZERO_ROW_CASES = [
    ("image", "add", "other"),
    ("image", "mul", "other"),
    ("image", "mul", "both"),
    ("text", "add", "other"),
    ("text", "mul", "other"),
    ("text", "mul", "both"),
]


def _zero_row_inputs(batch, classes, dim, zero_side, noise_on, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image, text = _random(generator, batch, dim), _random(generator, classes, dim)
    features = image if zero_side == "image" else text
    rows = features.shape[0]
    # A zero row, a row below the floor (norm ~ 4e-14 <= 1e-12), and one just above it (4e-11),
    # spread over the first and last tiles.
    features[0] = 0.0
    features[rows // 2] = 1e-14 * _random(generator, dim)
    features[rows - 1] = 0.0
    features[min(1, rows - 1)] = 1e-11 * _random(generator, dim)
    image_pair = _noise_pair(generator, dim)
    text_pair = _noise_pair(generator, dim)
    if noise_on == "other":
        if zero_side == "image":
            image_pair = None
        else:
            text_pair = None
    tensors = [
        image,
        text,
        torch.tensor(14.0),
        *(image_pair or (None, None)),
        *(text_pair or (None, None)),
    ]
    target = torch.randint(0, classes, (batch,), generator=generator)
    return tensors, target, [0, rows // 2, rows - 1]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("zero_side", "mode", "noise_on"), ZERO_ROW_CASES)
def test_zero_norm_rows_backward(fused_backend, zero_side, mode, noise_on, op):
    shape = EDGE_LARGE if (mode, noise_on) == ("add", "other") else EDGE_SMALL
    tensors, target, zero_rows = _zero_row_inputs(*shape, zero_side, noise_on)
    want_grads = _compare_rows(
        fused_backend,
        OPS[op],
        tensors,
        target,
        label=f"zero {zero_side} rows",
        mode=mode,
        num_samples=2,
        seed=5,
    )
    # The floor's 1/1e-12 shows in the rows at or below it: the case is the one it claims to be.
    side_grad = want_grads[0 if zero_side == "image" else 1]
    assert side_grad[zero_rows].abs().amax() > 1e8


@pytest.mark.parametrize(("zero_side", "mode", "noise_on"), ZERO_ROW_CASES)
def test_reference_zero_rows_follow_f_normalize(zero_side, mode, noise_on):
    """The reference's gradients at zero-norm rows are F.normalize's (v / max(|v|, 1e-12)), built
    here from pini_kernels.noise and torch.nn.functional."""
    tensors, target, _ = _zero_row_inputs(*EDGE_SMALL, zero_side, noise_on)
    samples, seed = 2, 5
    want_out, want_grads = _run(
        pini_kernels.noisy_cross_entropy,
        _leaves(tensors, "cpu"),
        target,
        backend="reference",
        mode=mode,
        num_samples=samples,
        seed=seed,
        reduction="none",
    )
    image, text, scale, image_mu, image_sigma, text_mu, text_sigma = _leaves(tensors, "cpu")
    combine = torch.mul if mode == "mul" else torch.add

    def noisy(features, mu, stream_seed):
        if mu is None:
            return features.expand(samples, *features.shape)
        sigma = image_sigma if mu is image_mu else text_sigma
        eps = pini_kernels.noise((samples, *features.shape), seed=stream_seed)
        return combine(features, mu + sigma * eps)

    image_unit = F.normalize(noisy(image, image_mu, seed), dim=-1)
    text_unit = F.normalize(noisy(text, text_mu, seed + 1), dim=-1)
    logits = scale * image_unit @ text_unit.mT
    out = F.cross_entropy(logits.flatten(0, 1), target.repeat(samples), reduction="none")
    out = out.view(samples, -1)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    assert_close(want_out, out.detach(), atol=1e-6, rtol=1e-6, name="loss")
    leaves = (image, text, scale, image_mu, image_sigma, text_mu, text_sigma)
    for name, want, leaf in zip(GRAD_NAMES, want_grads, leaves, strict=True):
        if leaf is not None:
            _assert_rows_close(want, leaf.grad, atol=2e-5, rtol=1e-5, name=name)


# --- the native backends' loss flow (csrc/loss_flow.cpp) against the Python flow ----------------

NATIVE_FLOW_CASES = {
    # name: (make inputs, keyword arguments)
    "both sides, add, mean": (lambda d: _make(67, 70, 40, "both", d), dict(num_samples=3)),
    "image side, mul, sum": (
        lambda d: _make(6, 13, 24, "image", d),
        dict(num_samples=2, mode="mul", reduction="sum"),
    ),
    "text side, none, smoothing": (
        lambda d: _make(6, 13, 24, "text", d),
        dict(num_samples=2, reduction="none", label_smoothing=0.2),
    ),
    "per-sample text": (
        lambda d: _make_per_sample(*PER_SAMPLE_LARGE, "both", d),
        dict(num_samples=PER_SAMPLE_LARGE[3]),
    ),
    "no noise, bfloat16": (
        lambda d: _make(5, 9, 12, "none", d, dtype=torch.bfloat16),
        dict(num_samples=2),
    ),
    "empty batch": (lambda d: _make(0, 9, 12, "both", d), dict(num_samples=2, reduction="sum")),
}


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("case", list(NATIVE_FLOW_CASES))
def test_native_loss_flow_equals_the_python_flow(monkeypatch, case, backend):
    """On the native backends the loss's per-sample flow is one C++ op; without it
    (``use_python_loss_flow``) the Python flow (the Triton backend's) runs the same kernels. Loss
    and every gradient agree (to a few float32 roundings: the products may sum in another
    order)."""
    if backend not in pini_kernels.available_backends():
        pytest.skip(f"needs the native {backend} kernels")
    make, kwargs = NATIVE_FLOW_CASES[case]
    image, text, scale, image_pair, text_pair, target = make(backend)
    tensors = _differentiable(image, text, scale, image_pair, text_pair)
    results = []
    for flow in ("native", "python"):
        if flow == "python":
            use_python_loss_flow(monkeypatch)
        results.append(
            _run(
                pini_kernels.noisy_cross_entropy,
                _leaves(tensors),
                target,
                backend=backend,
                seed=4,
                **kwargs,
            )
        )
    (native_out, native_grads), (python_out, python_grads) = results
    assert_close(native_out, python_out, atol=1e-6, rtol=1e-6, name=f"{case}: loss")
    for name, native, python in zip(GRAD_NAMES, native_grads, python_grads, strict=True):
        if python is None:
            assert native is None, name
            continue
        assert native.dtype == python.dtype and native.shape == python.shape, name
        magnitude = max(1.0, python.abs().max().item() if python.numel() else 0.0)
        assert_close(native, python, atol=1e-6 * magnitude, rtol=1e-5, name=f"{case}: {name}")


def test_logits_backward_without_a_scale_gradient(fused_backend):
    """Backward needs the cosines only for logit_scale's gradient; with a fixed scale (CLIP's,
    frozen) it skips recomputing them. Every other gradient still matches the reference."""
    device = backend_device(fused_backend)
    image, text, _, image_pair, text_pair, _ = _make(67, 70, 40, "both", device)
    tensors = [image, text, *image_pair, *text_pair]
    results = []
    for backend in (fused_backend, "reference"):
        leaves = _leaves(tensors)
        image, text, image_mu, image_sigma, text_mu, text_sigma = leaves
        logits = pini_kernels.noisy_cosine_logits(
            image,
            text,
            30.0,
            image_noise=(image_mu, image_sigma),
            text_noise=(text_mu, text_sigma),
            num_samples=3,
            seed=2,
            backend=backend,
        )
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((logits * weights.to(device)).sum(), leaves)
        results.append(grads)
    for name, got, want in zip(
        ("image", "text", "image_mu", "image_sigma", "text_mu", "text_sigma"), *results, strict=True
    ):
        magnitude = max(1.0, want.abs().max().item())
        assert_close(got, want, atol=1e-5 * magnitude, rtol=1e-4, name=name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_and_int32_targets_on_every_backend(fused_backend, reduction):
    """A target that is a strided view (a column of a label table) or int32: every backend takes
    it as the reference does (the cpu backend's C++ entry refused a strided one)."""
    device = backend_device(fused_backend)
    image, text, scale, image_pair, text_pair, target = _make(6, 7, 12, "both", device)
    strided = torch.stack([target, torch.zeros_like(target)], dim=1)[:, 0]
    assert not strided.is_contiguous()
    for given in (strided, target.to(torch.int32)):
        _compare(
            fused_backend,
            pini_kernels.noisy_cross_entropy,
            (image, text, scale, image_pair, text_pair, given),
            num_samples=2,
            seed=5,
            reduction=reduction,
        )
