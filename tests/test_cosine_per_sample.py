"""Per-sample text features: ``text_features`` of shape (num_samples, C, D), sample s using
``text_features[s]`` (SPEC.md), on every backend, forward and every gradient against the
reference; the reference itself against a hand computation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED_BACKENDS, backend_device
from helpers import TOLERANCES, assert_close, record_error

import pini_kernels

NOISE_SIDES = ["none", "image", "text", "both"]
GRAD_NAMES = ("image", "text", "logit_scale", "image_mu", "image_sigma", "text_mu", "text_sigma")
# (B, C, D, num_samples): small; and one with B and C past a 64-row / 64-class tile, D past a
# 32-wide step, none a multiple of its tile.
SMALL = (5, 9, 12, 3)
LARGE = (67, 70, 40, 2)


def _make(batch, classes, dim, num_samples, sides, device, dtype=torch.float32):
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


def _leaves(image, text, scale, image_pair, text_pair):
    tensors = [image, text, scale, *(image_pair or (None, None)), *(text_pair or (None, None))]
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _run(op, leaves, *extra, backend, **kwargs):
    """The op's output and the gradients of a random weighting of it."""
    image, text, scale, image_mu, image_sigma, text_mu, text_sigma = leaves
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


def _compare(backend, op, inputs, *, dtype=torch.float32, **kwargs):
    image, text, scale, image_pair, text_pair, target = inputs
    extra = (target,) if op is pini_kernels.noisy_cross_entropy else ()
    got_out, got_grads = _run(
        op, _leaves(image, text, scale, image_pair, text_pair), *extra, backend=backend, **kwargs
    )
    want_out, want_grads = _run(
        op, _leaves(image, text, scale, image_pair, text_pair), *extra, backend="reference",
        **kwargs,
    )  # fmt: skip
    atol, rtol = TOLERANCES[dtype]
    name = f"{op.__name__} per-sample text"
    error = assert_close(got_out, want_out, atol=atol, rtol=rtol, name=f"{name} output")
    record_error(f"{name} {backend} out", error)
    for grad_name, got, want in zip(GRAD_NAMES, got_grads, want_grads, strict=True):
        if want is None:
            assert got is None, grad_name
            continue
        magnitude = max(1.0, want.abs().max().item())
        error = assert_close(
            got, want, atol=atol * magnitude, rtol=rtol, name=f"{name} {grad_name}"
        )
        record_error(f"{name} {backend} grad", error)
    return got_out, got_grads


OPS = {"logits": pini_kernels.noisy_cosine_logits, "loss": pini_kernels.noisy_cross_entropy}


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("sides", NOISE_SIDES)
@pytest.mark.parametrize("op", list(OPS))
def test_per_sample_text_matches_reference(fused_backend, op, sides, mode):
    inputs = _make(*SMALL, sides, backend_device(fused_backend))
    extra = {"label_smoothing": 0.1} if op == "loss" else {}
    _, grads = _compare(
        fused_backend, OPS[op], inputs, mode=mode, num_samples=SMALL[3], seed=2**33 + 5, **extra
    )
    assert grads[1].shape == inputs[1].shape  # per sample, not summed


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_sample_text_reductions(fused_backend, reduction, label_smoothing):
    inputs = _make(*SMALL, "both", backend_device(fused_backend))
    loss, _ = _compare(
        fused_backend,
        pini_kernels.noisy_cross_entropy,
        inputs,
        mode="mul",
        num_samples=SMALL[3],
        seed=4,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    assert loss.shape == ((SMALL[3], SMALL[0]) if reduction == "none" else ())


@pytest.mark.parametrize("op", list(OPS))
def test_per_sample_text_past_one_tile(fused_backend, op):
    inputs = _make(*LARGE, "both", backend_device(fused_backend))
    _compare(fused_backend, OPS[op], inputs, mode="add", num_samples=LARGE[3], seed=12)


def test_per_sample_text_non_contiguous(fused_backend):
    """(m, C, D) text features with stride along D != 1 (a transposed (m, D, C) tensor)."""
    image, text, scale, image_pair, text_pair, target = _make(*SMALL, "both", "cpu")
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
    inputs = _make(*SMALL, "both", backend_device(fused_backend), dtype=dtype)
    logits, _ = _compare(
        fused_backend, pini_kernels.noisy_cosine_logits, inputs, dtype=dtype, num_samples=3, seed=8
    )
    assert logits.dtype == dtype


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_reference_per_sample_text_by_hand(mode):
    """Sample s: image noise from the stream of seed over (m, B, D), text noise from seed + 1
    over (m, C, D) perturbing text_features[s]; F.normalize; logit_scale times the dot."""
    batch, classes, dim, samples = SMALL
    image, text, scale, image_pair, text_pair, target = _make(*SMALL, "both", "cpu")
    seed = 2**40 + 9
    image_eps = pini_kernels.noise((samples, batch, dim), seed=seed)
    text_eps = pini_kernels.noise((samples, classes, dim), seed=seed + 1)
    combine = torch.mul if mode == "mul" else torch.add
    noisy_image = combine(image, image_pair[0] + image_pair[1] * image_eps)
    noisy_text = combine(text, text_pair[0] + text_pair[1] * text_eps)
    expected = 14.0 * F.normalize(noisy_image, dim=-1) @ F.normalize(noisy_text, dim=-1).mT
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


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "reference"])
def test_shared_text_given_per_sample(backend):
    """(C, D) text expanded to (m, C, D) gives the (C, D) logits and loss; its per-sample text
    gradients sum to the (C, D) gradient. Also covers a stride-0 sample dimension."""
    device = backend_device(backend)
    _, classes, dim, samples = SMALL
    image, _, scale, image_pair, text_pair, target = _make(*SMALL, "both", device)
    shared = torch.randn(classes, dim, device=device)
    results = []
    for text in (shared, shared.expand(samples, classes, dim)):
        leaves = _leaves(image, text, scale, image_pair, text_pair)
        out, grads = _run(
            pini_kernels.noisy_cross_entropy, leaves, target, backend=backend, mode="mul",
            num_samples=samples, seed=3, reduction="none", label_smoothing=0.1,
        )  # fmt: skip
        results.append((out, grads))
    (shared_out, shared_grads), (expanded_out, expanded_grads) = results
    assert_close(expanded_out, shared_out, atol=1e-6, rtol=1e-6, name="loss")
    assert expanded_grads[1].shape == (samples, classes, dim)
    assert_close(expanded_grads[1].sum(0), shared_grads[1], atol=1e-5, rtol=1e-5, name="text")
    for name, got, want in zip(GRAD_NAMES, expanded_grads, shared_grads, strict=True):
        if name != "text":
            assert_close(got, want, atol=1e-5, rtol=1e-5, name=name)


def _per_sample_step(image, text, scale, image_mu, image_sigma, text_mu, text_sigma, target,
                     backend):  # fmt: skip
    loss = pini_kernels.noisy_cross_entropy(
        image, text, scale, target, image_noise=(image_mu, image_sigma),
        text_noise=(text_mu, text_sigma), num_samples=3, seed=6, backend=backend,
    )  # fmt: skip
    logits = pini_kernels.noisy_cosine_logits(
        image, text, scale, text_noise=(text_mu, text_sigma), num_samples=3, seed=7,
        backend=backend,
    )  # fmt: skip
    return loss + logits.logsumexp(-1).mean()


def test_per_sample_text_torch_compile(fused_backend):
    device = backend_device(fused_backend)
    image, text, scale, image_pair, text_pair, target = _make(*SMALL, "both", device)
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


@pytest.mark.parametrize("backend", [*FUSED_BACKENDS, "reference"])
@pytest.mark.parametrize("op", list(OPS))
def test_per_sample_text_shape_errors(backend, op):
    device = backend_device(backend)
    image, text, scale, _, _, target = _make(*SMALL, "none", device)
    extra = (target,) if op == "loss" else ()
    call = lambda text, **kwargs: OPS[op](image, text, scale, *extra, backend=backend, **kwargs)
    wrong_samples = r"text_features .*\(num_samples, C, D\) = \(2, 9, 12\), got shape \(3, 9, 12\)"
    with pytest.raises(ValueError, match=wrong_samples):
        call(text, num_samples=2)
    with pytest.raises(ValueError, match=r"text_features .*\(num_samples, C, D\) = \(1, 9, 12\)"):
        call(text)  # num_samples defaults to 1
    with pytest.raises(
        ValueError, match=r"text_features must be \(C, D\) or \(num_samples, C, D\)"
    ):
        call(text[None], num_samples=3)
    with pytest.raises(ValueError, match="same feature dimension D, got 12 and 11"):
        call(text[..., :11], num_samples=3)
    # Text noise is per class (C, D), shared by the samples: a per-sample mu is an error.
    per_sample_mu = torch.zeros(3, 9, 12, device=device)
    wrong_noise = r"text_noise\[0\] \(mu\) of shape \(3, 9, 12\) does not broadcast to "
    with pytest.raises(ValueError, match=wrong_noise + r"text_features\[s\]'s shape \(9, 12\)"):
        call(text, num_samples=3, text_noise=(per_sample_mu, 1.0))
