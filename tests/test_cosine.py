"""noisy_cosine_logits and noisy_cross_entropy against the reference, forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED_BACKENDS, backend_device
from helpers import TOLERANCES, assert_close, record_error

import pini_kernels
from pini_kernels import reference

# (B, C, D): C above one 64-class tile and not a multiple of it; D odd-sized (unaligned noise)
# and a multiple of 4 (aligned); B = 1; B above one 64-row tile.
SHAPES = {
    "odd": (5, 70, 40),
    "aligned": (6, 9, 48),
    "single-row": (1, 3, 8),
}
NOISE_SIDES = ["none", "image", "text", "both"]
GRAD_NAMES = ("image", "text", "logit_scale", "image_mu", "image_sigma", "text_mu", "text_sigma")


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


def _leaves(image, text, scale, image_pair, text_pair):
    tensors = [image, text, scale, *(image_pair or (None, None)), *(text_pair or (None, None))]
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _run(op, leaves, *extra, backend, weight_seed=7, **kwargs):
    image, text, scale, image_mu, image_sigma, text_mu, text_sigma = leaves
    image_noise = None if image_mu is None else (image_mu, image_sigma)
    text_noise = None if text_mu is None else (text_mu, text_sigma)
    out = op(
        image,
        text,
        scale,
        *extra,
        image_noise=image_noise,
        text_noise=text_noise,
        backend=backend,
        **kwargs,
    )
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(weight_seed))
    (out.float() * weights.to(out.device)).sum().backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _compare(backend, op, inputs, *extra, dtype=torch.float32, label="", **kwargs):
    image, text, scale, image_pair, text_pair, target = inputs
    args = (target, *extra) if op is pini_kernels.noisy_cross_entropy else extra
    got_out, got_grads = _run(
        op, _leaves(image, text, scale, image_pair, text_pair), *args, backend=backend, **kwargs
    )
    want_out, want_grads = _run(
        op, _leaves(image, text, scale, image_pair, text_pair), *args, backend="reference", **kwargs
    )
    atol, rtol = TOLERANCES[dtype]
    name = op.__name__
    error = assert_close(got_out, want_out, atol=atol, rtol=rtol, name=f"{name} output")
    record_error(f"{name} {backend} x:{image.dtype} out", error)
    for grad_name, got, want in zip(GRAD_NAMES, got_grads, want_grads, strict=True):
        if want is None:
            assert got is None
            continue
        scale_of = max(1.0, want.abs().max().item())
        error = assert_close(
            got, want, atol=atol * scale_of, rtol=rtol, name=f"{name} grad {grad_name}"
        )
        record_error(f"{name} {backend} x:{image.dtype} grad", error)
    return got_out


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
    logits = _compare(
        fused_backend, pini_kernels.noisy_cosine_logits, inputs, dtype=dtype, num_samples=2, seed=8
    )
    assert logits.dtype == dtype
    loss = _compare(
        fused_backend,
        pini_kernels.noisy_cross_entropy,
        inputs,
        dtype=torch.float32,
        num_samples=2,
        seed=8,
    )
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "reference"])
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


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "reference"])
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


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "reference"])
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


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "reference"])
@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (dict(text=torch.randn(6, 9)), ValueError, "same feature dimension D, got 8 and 9"),
        (dict(image=torch.randn(2, 4, 8)), ValueError, r"image_features must be 2-D \(B, D\)"),
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


def _saved_bytes(backend, batch, classes, dim, num_samples):
    device = backend_device(backend)
    image, text, scale, image_pair, text_pair, target = _make(batch, classes, dim, "both", device)
    leaves = _leaves(image, text, scale, image_pair, text_pair)
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
        backend=backend,
    )
    return saved_bytes_beyond_inputs(fn, [*leaves, target])


def test_fused_loss_saves_only_row_statistics(fused_backend):
    """Beyond its inputs, the fused loss saves the (m, B) log-sum-exp and the seed: nothing that
    grows with C, and only m * B with the samples. The eager reference saves m * B * C logits."""
    batch, dim = 4, 8
    for classes, num_samples in ((5, 1), (40, 1), (40, 6)):
        fused = _saved_bytes(fused_backend, batch, classes, dim, num_samples)
        assert fused <= num_samples * batch * 4 + 64, (classes, num_samples, fused)
        eager = _saved_bytes("reference", batch, classes, dim, num_samples)
        assert eager >= num_samples * batch * classes * 4, (classes, num_samples, eager)


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
