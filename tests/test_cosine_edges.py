"""Edges of the cosine logits and loss that ordinary inputs never reach (issue 17, items 2-4):

- the Triton loss kernel's merge of per-split row statistics, forced on CPU with several splits;
- zero-norm feature rows (norm <= 1e-12, where F.normalize divides by the floor instead of the
  norm), on the image side and on the text side, with the other side's noise on;
- huge logits: logit_scale 100 with nearly equal features.

Shapes past one 64-row / 64-class tile, one 32-wide step over D and (for the row kernels under the
interpreter) one 256-row program, and a multiple of none of them.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED_BACKENDS, backend_device
from helpers import assert_close, record_error

import pini_kernels

GRAD_NAMES = ("image", "text", "logit_scale", "image_mu", "image_sigma", "text_mu", "text_sigma")
OPS = {"logits": pini_kernels.noisy_cosine_logits, "loss": pini_kernels.noisy_cross_entropy}
# (B, C, D): small; past every tile (rows past the interpreter's 256-row programs of the row
# kernels at D = 40, classes past five 64-class tiles).
SMALL = (5, 9, 12)
LARGE = (260, 300, 40)
needs_triton = pytest.mark.skipif(
    "triton" not in FUSED_BACKENDS, reason="the Triton backend is not available"
)


def _random(generator, *shape):
    return torch.randn(shape, generator=generator)


def _noise_pair(generator, dim):
    return (_random(generator, dim), _random(generator, dim).abs() + 0.1)


def _leaves(tensors, device):
    """Fresh leaves on ``device`` (never the given tensors: their .grad would be shared)."""
    return [None if t is None else t.detach().clone().to(device).requires_grad_(True)
            for t in tensors]  # fmt: skip


def _run(op, leaves, target, *, backend, **kwargs):
    """The op's output and the gradients of a random weighting of it."""
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


def _assert_rows_close(got, want, *, atol, rtol, name):
    """Compare row by row, each row against its own magnitude: zero-norm rows have gradients near
    1e12 that would otherwise swamp the tolerance of every other row."""
    magnitude = want.abs().amax(dim=-1, keepdim=True).clamp_min(1.0) if want.dim() else 1.0
    return assert_close(got / magnitude, want / magnitude, atol=atol, rtol=rtol, name=name)


def _compare(backend, op, tensors, target, *, label, atol=1e-5, rtol=1e-5, **kwargs):
    device = backend_device(backend)
    got_out, got_grads = _run(op, _leaves(tensors, device), target.to(device), backend=backend,
                              **kwargs)  # fmt: skip
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
    tensors, target = _nearly_equal_inputs(*LARGE[:2], LARGE[2], seed=1)
    tensors[3], tensors[4] = 0.01 * tensors[3], 0.01 * tensors[4]  # image noise small too
    # Logits near 100 carry float32's rounding of 100 (~1e-5) in every backend.
    _compare(fused_backend, OPS[op], tensors, target, label="huge logits", atol=1e-4, rtol=1e-5,
             num_samples=2, seed=3)  # fmt: skip


# --- the Triton loss kernel's split merge, forced on CPU --------------------------------------


@needs_triton
@pytest.mark.parametrize("inputs", ["random", "huge-logits"])
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_loss_split_merge_matches_reference(monkeypatch, splits, inputs):
    """Several class splits per row, merged with the exp(split_max - row_max) rescale. C = 300
    over 64-class tiles: 2 splits of 192 + 108, 3 of 128 + 128 + 44, 5 of 64 (the last 44)."""
    from pini_kernels.ops import cosine

    monkeypatch.setattr(cosine, "FORCED_LOSS_SPLITS", splits)
    batch, classes, dim = 70, 300, 40
    assert cosine._loss_splits(batch, classes, backend_device("triton")) == splits
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
        _compare("triton", pini_kernels.noisy_cross_entropy, tensors, target,
                 label=f"{splits} splits", atol=atol, num_samples=2, seed=9, mode="mul",
                 reduction=reduction, label_smoothing=0.1)  # fmt: skip


# --- zero-norm rows -------------------------------------------------------------------------

# (side with the zero rows, mode, noise on): the other side's noise is always on; in "mul" mode
# noise on the zero side too leaves its zero rows zero.
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
    tensors = [image, text, torch.tensor(14.0), *(image_pair or (None, None)),
               *(text_pair or (None, None))]  # fmt: skip
    target = torch.randint(0, classes, (batch,), generator=generator)
    return tensors, target, [0, rows // 2, rows - 1]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("zero_side", "mode", "noise_on"), ZERO_ROW_CASES)
def test_zero_norm_rows_backward(fused_backend, zero_side, mode, noise_on, op):
    shape = LARGE if (mode, noise_on) == ("add", "other") else SMALL
    tensors, target, zero_rows = _zero_row_inputs(*shape, zero_side, noise_on)
    want_grads = _compare(fused_backend, OPS[op], tensors, target, label=f"zero {zero_side} rows",
                          mode=mode, num_samples=2, seed=5)  # fmt: skip
    # The floor's 1/1e-12 shows in the rows at or below it: the case is the one it claims to be.
    side_grad = want_grads[0 if zero_side == "image" else 1]
    assert side_grad[zero_rows].abs().amax() > 1e8


@pytest.mark.parametrize(("zero_side", "mode", "noise_on"), ZERO_ROW_CASES)
def test_reference_zero_rows_follow_f_normalize(zero_side, mode, noise_on):
    """The reference's gradients at zero-norm rows are F.normalize's (v / max(|v|, 1e-12)), built
    here from pini_kernels.noise and torch.nn.functional."""
    tensors, target, _ = _zero_row_inputs(*SMALL, zero_side, noise_on)
    samples, seed = 2, 5
    want_out, want_grads = _run(pini_kernels.noisy_cross_entropy, _leaves(tensors, "cpu"), target,
                                backend="reference", mode=mode, num_samples=samples, seed=seed,
                                reduction="none")  # fmt: skip
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
