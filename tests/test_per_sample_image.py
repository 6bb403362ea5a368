"""Per-sample image features ``(num_samples, B, D)`` in the logits and loss ops: sample ``s``
uses ``image_features[s]`` (the features of noisy images, or of per-sample feature noise drawn
by the caller), so Eq. (13)'s m samples are one call. Every backend against the reference,
forward and every gradient; both native loss flows (csrc/loss_flow.cpp and the Python one); a
case past one 64-row / 64-class tile and a multiple of none; shared features given per sample;
``test_cosine.py`` covers per-sample text features the same way, and the shape errors of
both sides.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_BACKENDS, backend_device
from helpers import assert_close, use_python_loss_flow
from test_cosine import (
    GRAD_NAMES,
    NOISE_SIDES,
    OPS,
    _compare,
    _differentiable,
    _leaves,
    _run,
    logits_by_hand,
)

import pini_kernels

# (B, C, D, num_samples): small; and one with B and C past a 64-row / 64-class tile, D past a
# 32-wide step, none a multiple of its tile.
SMALL = (5, 9, 12, 3)
NOISE_ARGUMENTS = ("image_noise", "text_noise")
LARGE = (67, 70, 40, 2)


def _make(batch, classes, dim, num_samples, sides, device, text_per_sample=False):
    """Inputs as ``test_cosine._make`` gives them, the image features (num_samples, B, D)."""
    generator = torch.Generator().manual_seed(batch * 1000 + classes * 10 + dim + num_samples)

    def rand(*shape):
        return torch.randn(shape, generator=generator).to(device)

    image = rand(num_samples, batch, dim)
    text = rand(num_samples, classes, dim) if text_per_sample else rand(classes, dim)
    image_pair = (rand(batch, 1), rand(dim).abs() + 0.1) if sides in ("image", "both") else None
    text_pair = (rand(dim), rand(classes, dim).abs() + 0.1) if sides in ("text", "both") else None
    scale = torch.tensor(14.0, device=device)
    target = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return image, text, scale, image_pair, text_pair, target


@pytest.fixture(params=["one-op flow", "python flow"])
def loss_flow(request, monkeypatch):
    """The native backends' loss runs csrc/loss_flow.cpp, or the Python flow on their kernels."""
    if request.param == "python flow":
        use_python_loss_flow(monkeypatch)
    return request.param


@pytest.mark.parametrize("text_per_sample", [False, True], ids=["shared-text", "per-sample-text"])
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("sides", NOISE_SIDES)
@pytest.mark.parametrize("op", list(OPS))
def test_per_sample_image_matches_reference(fused_backend, op, sides, mode, text_per_sample):
    inputs = _make(*SMALL, sides, backend_device(fused_backend), text_per_sample)
    extra = {"label_smoothing": 0.1} if op == "loss" else {}
    out, grads = _compare(
        fused_backend, OPS[op], inputs, mode=mode, num_samples=SMALL[3], seed=2**33 + 5, **extra
    )
    assert out.shape == ((SMALL[3], SMALL[0], SMALL[1]) if op == "logits" else ())
    assert grads[0].shape == inputs[0].shape  # per sample, not summed
    assert grads[1].shape == inputs[1].shape


def test_per_sample_image_reductions(fused_backend, loss_flow):
    """Every reduction, with and without label smoothing, per-sample image and text features."""
    inputs = _make(*SMALL, "both", backend_device(fused_backend), text_per_sample=True)
    for reduction, smoothing in itertools.product(("mean", "sum", "none"), (0.0, 0.25)):
        options = dict(reduction=reduction, label_smoothing=smoothing, mode="mul", seed=4)
        op = pini_kernels.noisy_cross_entropy
        loss, _ = _compare(fused_backend, op, inputs, num_samples=SMALL[3], **options)
        assert loss.shape == ((SMALL[3], SMALL[0]) if reduction == "none" else ())


@pytest.mark.parametrize("op", list(OPS))
def test_per_sample_image_past_one_tile(fused_backend, loss_flow, op):
    inputs = _make(*LARGE, "both", backend_device(fused_backend), text_per_sample=True)
    _compare(fused_backend, OPS[op], inputs, mode="add", num_samples=LARGE[3], seed=12)


def test_per_sample_image_non_contiguous(fused_backend):
    """(m, B, D) image features with stride along D != 1 (a transposed (m, D, B) tensor)."""
    device = backend_device(fused_backend)
    image, text, scale, image_pair, text_pair, target = _make(*SMALL, "both", device)
    image = image.mT.contiguous().mT
    assert image.stride(-1) != 1
    inputs = (image, text, scale, image_pair, text_pair, target)
    _compare(fused_backend, pini_kernels.noisy_cross_entropy, inputs, num_samples=3, seed=2)


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_reference_per_sample_image_by_hand(mode):
    """Sample s: image_features[s] with the image noise of the stream of seed over (m, B, D)
    (the same elements as for shared image features), text noise from seed + 1; F.normalize;
    logit_scale times the dot; the loss is F.cross_entropy over the m*B rows."""
    batch, classes, _, samples = SMALL
    image, text, scale, image_pair, text_pair, target = _make(*SMALL, "both", "cpu")
    seed = 2**40 + 9
    expected = logits_by_hand(image, text, image_pair, text_pair, mode, samples, seed)
    kwargs = dict(image_noise=image_pair, text_noise=text_pair, mode=mode, num_samples=samples)
    for backend in ALL_BACKENDS:
        device = backend_device(backend)
        moved = [t.to(device) for t in (image, text, scale, target)]
        pairs = {side: tuple(t.to(device) for t in kwargs[side]) for side in NOISE_ARGUMENTS}
        options = {**kwargs, **pairs}
        logits = pini_kernels.noisy_cosine_logits(*moved[:3], seed=seed, backend=backend, **options)
        assert_close(logits.cpu(), expected, atol=1e-5, rtol=1e-5, name=f"{backend} logits")
        loss = pini_kernels.noisy_cross_entropy(
            *moved, seed=seed, backend=backend, reduction="none", **options
        )
        rows = expected.reshape(-1, classes)
        want = F.cross_entropy(rows, target.repeat(samples), reduction="none")
        assert_close(loss.cpu(), want.view(samples, batch), atol=1e-5, rtol=1e-5, name=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_call_equals_a_call_per_sample(backend):
    """What PiNI's loss did before the ops took (m, B, D) image features: one call a sample
    with sample j's features and no noise left to draw, the losses averaged. One call for all m
    gives the same loss and gradients."""
    device = backend_device(backend)
    image, text, scale, _, _, target = _make(*SMALL, "none", device, text_per_sample=True)
    samples = SMALL[3]
    leaves = _leaves([image, text, scale])
    one = pini_kernels.noisy_cross_entropy(
        *leaves, target, num_samples=samples, seed=1, backend=backend
    )
    one_grads = torch.autograd.grad(one, leaves)
    leaves = _leaves([image, text, scale])
    each = [
        pini_kernels.noisy_cross_entropy(
            leaves[0][j], leaves[1][j], leaves[2], target, seed=1, backend=backend
        )
        for j in range(samples)
    ]
    loop = torch.stack(each).mean()
    loop_grads = torch.autograd.grad(loop, leaves)
    assert_close(one, loop, atol=1e-6, rtol=1e-6, name="loss")
    for name, got, want in zip(GRAD_NAMES[:3], one_grads, loop_grads, strict=True):
        assert_close(got, want, atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_shared_image_given_per_sample(backend, loss_flow):
    """(B, D) image features expanded to (m, B, D) (stride 0 over the samples) give the shared
    ones' loss; their per-sample gradients sum to the shared gradient."""
    device = backend_device(backend)
    image, text, scale, image_pair, text_pair, target = _make(
        *SMALL, "both", device, text_per_sample=True
    )
    shared = image[0]
    results = []
    for features in (shared, shared.expand_as(image)):
        leaves = _leaves(_differentiable(features, text, scale, image_pair, text_pair))
        results.append(
            _run(
                pini_kernels.noisy_cross_entropy,
                leaves,
                target,
                backend=backend,
                mode="mul",
                num_samples=SMALL[3],
                seed=3,
                reduction="none",
                label_smoothing=0.1,
            )
        )
    (shared_out, shared_grads), (expanded_out, expanded_grads) = results
    assert_close(expanded_out, shared_out, atol=1e-6, rtol=1e-6, name="loss")
    assert expanded_grads[0].shape == image.shape
    assert_close(expanded_grads[0].sum(0), shared_grads[0], atol=1e-5, rtol=1e-5, name="image")
    for name, got, want in zip(GRAD_NAMES[1:], expanded_grads[1:], shared_grads[1:], strict=True):
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=name)
