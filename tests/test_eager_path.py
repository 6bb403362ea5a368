"""``PiNIConfig(noise_path="eager")``: the fused path's loss and gradients, in eager PyTorch.

The fused path runs pini_kernels' ops; the eager path the authors' plain PyTorch (materialized
noise, ``F.normalize``, matmul, ``F.cross_entropy``) with eps from ``pini_kernels.noise`` on the
same streams. Two independent computations of Eq. (13): for one seed they must agree to float
rounding, loss and every generator gradient.
"""

import pytest
import torch

import pini
import pini_kernels
from pini import TABLE1, PiNI, PiNIConfig

CLASSES = ["cat", "dog", "bird", "fish", "horse", "sheep", "cow"]
SEED = 4321
# float32 throughout: the two paths differ only in summation order.
LOSS_TOLERANCE = dict(atol=1e-5, rtol=1e-5)
GRADIENT_TOLERANCE = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return pini.build_clip()


def _model_pair(backbone, row: str, **overrides) -> tuple[PiNI, PiNI]:
    """(fused, eager) models of a Table 1 row with the same generator weights, in train mode."""
    clip, tokenizer = backbone
    models = []
    for noise_path in ("fused", "eager"):
        torch.manual_seed(5)  # the same generator initialization for both
        config = PiNIConfig.table1(row, noise_path=noise_path, **overrides)
        models.append(PiNI(clip, tokenizer, CLASSES, "a photo of a", config).train())
    fused, eager = models
    for (name, fused_parameter), eager_parameter in zip(
        fused.named_parameters(), eager.parameters(), strict=True
    ):
        assert torch.equal(fused_parameter, eager_parameter), name
    return fused, eager


def _batch(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, len(CLASSES), (batch,), generator=generator)
    return images, labels


def _loss_and_gradients(model: PiNI, images, labels, seed: int):
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    loss = model.loss(images, labels, seed=seed)
    gradients = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
    return loss.detach(), dict(zip(trainable, gradients, strict=True))


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("num_samples", [1, 2])
@pytest.mark.parametrize("row", ["feature+prompt", "image", "feature+text-feature"])
def test_eager_path_gives_the_fused_loss_and_gradients(backbone, row, num_samples, mode):
    fused, eager = _model_pair(backbone, row, num_samples=num_samples, mode=mode)
    images, labels = _batch()
    fused_loss, fused_gradients = _loss_and_gradients(fused, images, labels, SEED)
    eager_loss, eager_gradients = _loss_and_gradients(eager, images, labels, SEED)
    torch.testing.assert_close(eager_loss, fused_loss, **LOSS_TOLERANCE)
    assert set(fused_gradients) == set(eager_gradients)
    for name, fused_gradient in fused_gradients.items():
        assert fused_gradient is not None, f"{name} got no gradient"
        assert fused_gradient.abs().sum() > 0, f"{name}: all-zero gradient"
        torch.testing.assert_close(
            eager_gradients[name],
            fused_gradient,
            **GRADIENT_TOLERANCE,
            msg=lambda message, name=name: f"gradient of {name}: {message}",
        )
    # The agreement is about the noise: another seed gives another loss on both paths.
    other_loss, _ = _loss_and_gradients(eager, images, labels, SEED + 10)
    assert not torch.allclose(other_loss, eager_loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("row", ["feature+prompt", "image"])
def test_eager_path_gives_the_fused_logits(backbone, row):
    fused, eager = _model_pair(backbone, row)
    images, _ = _batch()
    with torch.no_grad():
        expected = fused.sample_logits(images, num_samples=3, seed=SEED)
        logits = eager.sample_logits(images, num_samples=3, seed=SEED)
    assert logits.shape == (3, images.shape[0], len(CLASSES))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("prompt_noise_draw", ["shared", "per-class"])
def test_eager_prompt_noise_is_the_documented_stream(backbone, prompt_noise_draw):
    """Sample j's shared prompt noise is mu + sigma * noise((m, L, W), seed + 2)[j]
    (docs/spec.md §4), computed here by hand; per-class draws one (m, C, L, W) tensor from the
    same stream."""
    _, eager = _model_pair(backbone, "prompt", prompt_noise_draw=prompt_noise_draw)
    mu, sigma = (tensor.detach() for tensor in eager.prompt_noise())
    length, width = mu.shape
    samples, seed = 2, SEED
    captured = {}
    ops = eager.noise_ops

    def capture(method):
        def call(*args, **kwargs):
            captured["noise"] = method(*args, **kwargs)
            return captured["noise"]

        return call

    name = "sample_noise" if prompt_noise_draw == "shared" else "inject"
    original = getattr(ops, name)
    setattr(ops, name, capture(original))
    try:
        with torch.no_grad():
            eager.text_features(samples, seed=seed)
    finally:
        delattr(ops, name)
    if prompt_noise_draw == "shared":
        eps = pini_kernels.noise((samples, length, width), seed=seed + 2)
        torch.testing.assert_close(captured["noise"], mu + sigma * eps, atol=0, rtol=0)
    else:
        eps = pini_kernels.noise((samples, len(CLASSES), length, width), seed=seed + 2)
        prefix = eager.clip.token_embedding(eager.token_ids)[:, 1 : 1 + length]
        torch.testing.assert_close(captured["noise"], prefix + (mu + sigma * eps), atol=0, rtol=0)


@pytest.mark.parametrize("row", ["feature+prompt", "image"])
def test_eager_path_calls_no_fused_op(backbone, row, monkeypatch):
    """The switch switches: with noise_path="eager" no pini_kernels op but ``noise`` runs."""
    _, eager = _model_pair(backbone, row, num_samples=2)

    def forbidden(*args, **kwargs):
        raise AssertionError("the eager noise path called a fused pini_kernels op")

    for op in ("inject", "noisy_cosine_logits", "noisy_cross_entropy"):
        monkeypatch.setattr(pini_kernels, op, forbidden)
    images, labels = _batch()
    eager.loss(images, labels, seed=SEED).backward()
    with torch.no_grad():
        eager(images, seed=SEED)


def test_noise_path_is_checked():
    with pytest.raises(ValueError, match=r"noise_path must be one of .*'fused', 'eager'.*'jit'"):
        PiNIConfig(noise_path="jit")
    assert PiNIConfig().noise_path == "fused"
    assert all("noise_path" not in values for values in TABLE1.values())


@pytest.mark.parametrize(
    "row, overrides",
    [(row, {}) for row in TABLE1]
    + [
        ("feature+prompt", {"visual_generator": "mlp"}),
        ("image+prompt", {"visual_generator": "attention"}),
    ],
)
def test_one_op_call_covers_every_noise_sample(backbone, row, overrides, monkeypatch):
    """Eq. (13) with m = 3 samples is one call of the loss op (and sampled logits one call of
    the logits op) on every row, per-sample image features and per-sample text features
    included; the loss and gradients are the eager path's, which materializes every sample."""
    fused, eager = _model_pair(backbone, row, num_samples=3, **overrides)
    calls = []
    for name in ("noisy_cross_entropy", "noisy_cosine_logits"):
        op = getattr(pini_kernels, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls.append(_name)
            return _op(*args, **kwargs)

        monkeypatch.setattr(pini_kernels, name, counted)
    images, labels = _batch()
    fused_loss, fused_gradients = _loss_and_gradients(fused, images, labels, SEED)
    assert calls == ["noisy_cross_entropy"]
    logits = fused.sample_logits(images, num_samples=3, seed=SEED)
    assert calls == ["noisy_cross_entropy", "noisy_cosine_logits"]
    assert logits.shape == (3, len(images), len(CLASSES))
    eager_loss, eager_gradients = _loss_and_gradients(eager, images, labels, SEED)
    torch.testing.assert_close(eager_loss, fused_loss, **LOSS_TOLERANCE)
    for name, fused_gradient in fused_gradients.items():
        torch.testing.assert_close(eager_gradients[name], fused_gradient, **GRADIENT_TOLERANCE)
    torch.testing.assert_close(
        eager.sample_logits(images, num_samples=3, seed=SEED), logits, **LOSS_TOLERANCE
    )
