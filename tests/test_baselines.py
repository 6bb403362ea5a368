"""The baselines (pini/methods/) on the tiny random-weight open_clip model (CPU, no
downloads): each against a computation written out here, from CLIP's own encoders, scikit-learn
or the formula of the method's paper."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from PIL import Image
from sklearn.linear_model import LogisticRegression

import pini
from pini.checkpoint import load_checkpoint
from pini.data.transforms import clip_transforms
from pini.errors import InputError
from pini.evaluation import evaluate
from pini.methods import training_defaults
from pini.methods.clip_adapter import CLIPAdapter
from pini.methods.common import encode_augmented_views, encode_images
from pini.methods.coop import CoOp, coop_epochs
from pini.methods.linear_probe import LinearProbe
from pini.methods.tip_adapter import TipAdapter, TipAdapterF, search_grid
from pini.methods.zero_shot import ZeroShotCLIP
from pini.train import TrainConfig, train

CLASSES = ["cat", "golden_retriever", "bird", "fish", "horse"]
TEMPLATE = "a photo of a {}, a type of pet."
DIM = 32  # pini-tiny's embedding dimension


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return pini.build_clip()


def _images(batch: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _labels(batch: int = 6) -> torch.Tensor:
    return torch.arange(batch) % len(CLASSES)


def _random(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hand_written_text(clip, tokenizer) -> torch.Tensor:
    """(C, D): the frozen CLIP on TEMPLATE with each class name, underscores read as spaces."""
    prompts = [TEMPLATE.format(name.replace("_", " ")) for name in CLASSES]
    assert prompts[1] == "a photo of a golden retriever, a type of pet."
    with torch.no_grad():
        return clip.encode_text(tokenizer(prompts))


def _cosine_logits(clip, image, text) -> torch.Tensor:
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp().detach() * image @ text.t()


def _close(actual, expected, name, tolerance=1e-5):
    assert_close(actual, expected, atol=tolerance, rtol=tolerance, name=name)


# --- zero-shot CLIP -----------------------------------------------------------------------------


def test_zero_shot_equals_the_frozen_clip_on_the_hand_written_prompts(backbone):
    clip, tokenizer = backbone
    model = ZeroShotCLIP(clip, tokenizer, CLASSES, TEMPLATE)
    images = _images()
    with torch.no_grad():
        image_features = clip.encode_image(images)
        expected = _cosine_logits(clip, image_features, _hand_written_text(clip, tokenizer))
        _close(model(images), expected, "forward")
        _close(model.zero_shot_logits(images), expected, "zero_shot_logits")
        _close(model.logits(image_features), expected, "logits of features")
    assert model.num_classes == len(CLASSES) and model.token_ids.shape[0] == len(CLASSES)
    assert dataclasses.asdict(model.config) == {}
    assert not any(name.split(".")[0] != "clip" for name in model.state_dict())


# --- CoOp ---------------------------------------------------------------------------------------


def _coop_prompts() -> list[str]:
    return [" ".join(["X"] * 16) + f" {name.replace('_', ' ')}." for name in CLASSES]


def test_coop_context_replaces_the_placeholder_embeddings(backbone):
    clip, tokenizer = backbone
    torch.manual_seed(3)
    model = CoOp(clip, tokenizer, CLASSES, zero_shot_template=TEMPLATE)
    assert model.context.shape == (16, clip.token_embedding.weight.shape[1])
    assert 0.015 < float(model.context.detach().std()) < 0.025  # N(0, 0.02^2)
    assert dataclasses.asdict(model.config) == {"num_context": 16, "context_init_std": 0.02}
    token_ids = tokenizer(_coop_prompts())
    assert torch.equal(model.token_ids, token_ids)
    with torch.no_grad():
        # With the context set to the embedding of "X", CoOp's prompts are the plain text.
        model.context.copy_(clip.token_embedding(tokenizer(["X"]))[0, 1].expand(16, -1))
        _close(model.text_features(), clip.encode_text(token_ids), "text of 'X X ... X name.'")
        zero_shot = _cosine_logits(
            clip, clip.encode_image(_images()), _hand_written_text(clip, tokenizer)
        )
        _close(model.zero_shot_logits(_images()), zero_shot, "zero_shot_logits")


def test_coop_fused_loss_equals_cross_entropy_over_explicit_logits(backbone):
    clip, tokenizer = backbone
    torch.manual_seed(4)
    model = CoOp(clip, tokenizer, CLASSES, zero_shot_template=TEMPLATE)
    images, labels = _images(7), torch.tensor([0, 1, 2, 3, 4, 1, 3])
    loss = model.loss(images, labels)
    loss.backward()

    # By hand: the token embeddings of "X X ... X name." with positions 1..16 replaced.
    token_ids = tokenizer(_coop_prompts())
    context = model.context.detach().clone().requires_grad_(True)
    with torch.no_grad():
        embeddings = clip.token_embedding(token_ids)
        image_features = clip.encode_image(images)
    prompts = torch.cat(
        [embeddings[:, :1], context.expand(len(CLASSES), -1, -1), embeddings[:, 17:]], dim=1
    )
    text = pini.encode_text_embeddings(clip, prompts, token_ids)
    logits = _cosine_logits(clip, image_features, text)
    expected = F.cross_entropy(logits, labels)
    expected.backward()

    _close(loss, expected, "loss")
    _close(model.context.grad, context.grad, "grad of the context")
    assert float(context.grad.abs().max()) > 0
    with torch.no_grad():
        _close(model(images), logits.detach(), "forward")
    assert all(p.grad is None for p in clip.parameters())


# --- every trained method -----------------------------------------------------------------------

TRAINED = ("coop", "clip-adapter", "tip-adapter-f")
TRAINABLE = {
    "coop": {"context"},
    "clip-adapter": {"adapter.layers.0.weight", "adapter.layers.2.weight"},
    "tip-adapter-f": {"cache_keys"},
}
SAVED = {**TRAINABLE, "tip-adapter-f": {"cache_keys", "cache_values", "alpha", "beta"}}


def _trained_method(name, clip, tokenizer, seed=0):
    torch.manual_seed(seed)
    if name == "coop":
        return CoOp(clip, tokenizer, CLASSES, zero_shot_template=TEMPLATE)
    if name == "clip-adapter":
        return CLIPAdapter(clip, tokenizer, CLASSES, TEMPLATE)
    cache_features = _random(2 * len(CLASSES), DIM, seed=5)
    return TipAdapterF(clip, tokenizer, CLASSES, cache_features, _labels(10), TEMPLATE)


@pytest.mark.parametrize("method", TRAINED)
def test_sgd_lowers_the_loss_and_touches_only_the_method(backbone, method):
    clip, tokenizer = backbone
    model = _trained_method(method, clip, tokenizer)
    model.train()
    assert not model.clip.training
    frozen = {name: value.clone() for name, value in clip.state_dict().items()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == TRAINABLE[method]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    images, labels = _images(), _labels()
    losses = []
    for _ in range(5):
        loss = model.loss(images, labels, seed=123)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for name, value in clip.state_dict().items():
        assert torch.equal(value, frozen[name]), f"CLIP's {name} changed"
    assert all(p.grad is None for p in clip.parameters())
    assert {name for name in model.state_dict() if not name.startswith("clip.")} == SAVED[method]
    assert model(images).shape == (6, len(CLASSES))
    dataclasses.asdict(model.config)  # what the checkpoint stores


def _digit_samples(count: int = 10) -> list[tuple]:
    generator = np.random.default_rng(0)
    return [
        (Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)), i % 5)
        for i in range(count)
    ]


@pytest.mark.parametrize("method", TRAINED)
def test_the_trainer_and_its_checkpoint_run_every_trained_method(backbone, method, tmp_path):
    clip, tokenizer = backbone
    model = _trained_method(method, clip, tokenizer, seed=0)
    train_transform, test_transform = clip_transforms(32)
    samples = _digit_samples()
    config = TrainConfig(epochs=2, batch_size=4, lr=0.5, progress=False)
    metrics = train(model, samples, train_transform, config, tmp_path)
    assert metrics["epoch"] == 2
    fresh = _trained_method(method, clip, tokenizer, seed=1)
    load_checkpoint(tmp_path / "checkpoint.pt", fresh)
    trained_state, loaded_state = model.state_dict(), fresh.state_dict()
    for name in SAVED[method]:
        assert torch.equal(loaded_state[name], trained_state[name]), name
    result = evaluate(fresh, samples, test_transform, progress=False)
    assert result["samples"] == len(samples) and 0 <= result["accuracy"] <= 100


# --- Tip-Adapter --------------------------------------------------------------------------------


def _hand_tip_logits(features, text, keys, labels, alpha, beta, logit_scale):
    """Tip-Adapter's cache model as its paper writes it, every normalization spelled out."""
    features = features / features.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    values = torch.eye(len(CLASSES), dtype=features.dtype)[labels]
    affinity = features @ keys.t()
    return logit_scale * features @ text.t() + alpha * torch.exp(-beta * (1 - affinity)) @ values


def test_tip_adapter_logits_are_the_cache_model_formula(backbone, tmp_path):
    clip, tokenizer = backbone
    views, labels = _random(3, 10, DIM, seed=6), _labels(10)
    test_features = _random(8, DIM, seed=7)
    scale = clip.logit_scale.exp().detach()
    text = _hand_written_text(clip, tokenizer)
    mean = views.mean(dim=0)
    keys = mean / mean.norm(dim=-1, keepdim=True)
    expected = _hand_tip_logits(test_features, text, keys, labels, 1.17, 1.0, scale)

    adapter = TipAdapter(clip, tokenizer, CLASSES, TEMPLATE, search=False)
    adapter.fit(views, labels)
    _close(adapter.logits(test_features), expected, "Tip-Adapter logits")
    torch.save(adapter.state_dict(), tmp_path / "tip.pt")
    restored = TipAdapter(clip, tokenizer, CLASSES, TEMPLATE, search=False)
    restored.load_state_dict(torch.load(tmp_path / "tip.pt", weights_only=True))
    assert torch.equal(restored.logits(test_features), adapter.logits(test_features))

    # Tip-Adapter-F starts from the same cache at init_alpha and init_beta.
    tuned = TipAdapterF(clip, tokenizer, CLASSES, views, labels, TEMPLATE)
    with torch.no_grad():
        _close(tuned.logits(test_features), expected, "Tip-Adapter-F logits at init")


def test_search_grid_is_tip_adapters():
    grid = search_grid(7, 200)
    assert len(grid) == 200 and grid[0] == pytest.approx(0.1)
    assert grid[1] == pytest.approx(0.1 + 6.9 / 200) and grid[-1] == pytest.approx(7 - 6.9 / 200)


def _hand_search(features, text, keys, cache_labels, labels, logit_scale, betas, alphas):
    """Tip-Adapter's ``search_hp`` on features (M, D) with labels (M,): beta outer, alpha
    inner, the first best accuracy."""
    best = (0.0, None, None)
    accuracies = set()
    for beta in betas:
        for alpha in alphas:
            logits = _hand_tip_logits(features, text, keys, cache_labels, alpha, beta, logit_scale)
            accuracy = 100.0 * float((logits.argmax(dim=-1) == labels).double().mean())
            accuracies.add(accuracy)
            if accuracy > best[0]:
                best = (accuracy, alpha, beta)
    return best, accuracies


def _val_split(seed: int):
    """Features in class clusters, so that the cache's weight and sharpness matter."""
    means = _random(len(CLASSES), DIM, seed=seed)
    cache = means.repeat_interleave(2, dim=0) + 0.9 * _random(10, DIM, seed=seed + 1)
    cache_labels = torch.arange(len(CLASSES)).repeat_interleave(2)
    val_labels = torch.arange(len(CLASSES)).repeat(6)
    val = means[val_labels] + 0.9 * _random(30, DIM, seed=seed + 2)
    return cache.double(), cache_labels, val.double(), val_labels


def test_tip_adapter_search_returns_the_best_grid_point(backbone):
    clip, tokenizer = backbone
    cache, cache_labels, val, val_labels = _val_split(seed=8)
    grid = dict(beta_max=7.0, beta_steps=14, alpha_max=3.0, alpha_steps=6)
    adapter = TipAdapter(clip, tokenizer, CLASSES, TEMPLATE, **grid)
    adapter.fit(cache.float(), cache_labels, val.float(), val_labels)

    text = _hand_written_text(clip, tokenizer).double()
    keys = cache.float() / cache.float().norm(dim=-1, keepdim=True)
    (accuracy, alpha, beta), seen = _hand_search(
        val.float().double(),
        text,
        keys.double(),
        cache_labels,
        val_labels,
        float(clip.logit_scale.exp()),
        search_grid(7.0, 14),
        search_grid(3.0, 6),
    )
    assert len(seen) > 1, "every grid point scores the same: the test could not fail"
    assert (adapter.alpha, adapter.beta) == pytest.approx((alpha, beta))
    assert adapter.validation_accuracy == pytest.approx(accuracy)


def test_tip_adapter_f_search_uses_the_trained_keys(backbone):
    clip, tokenizer = backbone
    cache, cache_labels, val, val_labels = _val_split(seed=9)
    grid = dict(beta_max=7.0, beta_steps=14, alpha_max=3.0, alpha_steps=6)
    tuned = TipAdapterF(clip, tokenizer, CLASSES, cache.float(), cache_labels, TEMPLATE, **grid)
    with torch.no_grad():  # as if trained: keys moved and no longer of unit norm
        tuned.cache_keys.mul_(1.3).add_(0.2 * _random(10, DIM, seed=10))
    keys = tuned.cache_keys.detach().double()
    alpha, beta, accuracy = tuned.search_hyperparameters(val.float(), val_labels)
    text = _hand_written_text(clip, tokenizer).double()
    (expected_accuracy, expected_alpha, expected_beta), seen = _hand_search(
        val.float().double(),
        text,
        keys,
        cache_labels,
        val_labels,
        float(clip.logit_scale.exp()),
        search_grid(7.0, 14),
        search_grid(3.0, 6),
    )
    assert len(seen) > 1
    assert (alpha, beta, accuracy) == pytest.approx(
        (expected_alpha, expected_beta, expected_accuracy)
    )
    assert (float(tuned.alpha), float(tuned.beta)) == pytest.approx((alpha, beta))


# --- linear probe -------------------------------------------------------------------------------


def _clusters(per_class: int, seed: int, classes: int = 4, dim: int = 16, spread: float = 1.2):
    means = _random(classes, dim, seed=100)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return means[labels] + spread * _random(len(labels), dim, seed=seed), labels


def _normalized(features: torch.Tensor) -> np.ndarray:
    x = features.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _coop_linear_probe_search(x, y, x_val, y_val) -> float:
    """CoOp's lpclip/linear_probe.py, transcribed: the C it ends with (num_step = 8)."""

    def accuracy(c):
        classifier = LogisticRegression(C=c, max_iter=1000).fit(x, y)
        return float(np.mean(classifier.predict(x_val) == y_val))

    search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    acc_list = [accuracy(c) for c in search_list]
    c_peak = search_list[int(np.argmax(acc_list))]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    for _ in range(8):
        acc_left, acc_right = accuracy(c_left), accuracy(c_right)
        if acc_left < acc_right:
            c_final = c_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            c_final = c_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return c_final


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_linear_probe_agrees_with_scikit_learn_and_coops_search(tmp_path):
    train_features, train_labels = _clusters(4, seed=11)
    val_features, val_labels = _clusters(3, seed=12)
    test_features, _ = _clusters(5, seed=13)
    probe = LinearProbe(4).fit(train_features, train_labels, val_features, val_labels)
    assert len({accuracy for _, accuracy in probe.search}) > 1, "a flat search cannot fail"
    x, x_val, x_test = (_normalized(f) for f in (train_features, val_features, test_features))
    expected_c = _coop_linear_probe_search(x, train_labels.numpy(), x_val, val_labels.numpy())
    assert math.isclose(probe.C, expected_c, rel_tol=1e-12), (probe.C, expected_c)

    direct = LogisticRegression(C=probe.C, max_iter=1000).fit(x, train_labels.numpy())
    logits = probe.logits(test_features)
    expected = torch.from_numpy(direct.decision_function(x_test)).float()
    _close(logits, expected, "decision function", tolerance=1e-5)
    assert np.array_equal(logits.argmax(dim=-1).numpy(), direct.predict(x_test))

    torch.save(probe.state_dict(), tmp_path / "probe.pt")
    restored = LinearProbe(4)
    restored.load_state_dict(torch.load(tmp_path / "probe.pt", weights_only=True))
    assert torch.equal(restored.logits(test_features), logits) and restored.C == probe.C


def test_linear_probe_classes_missing_from_the_shots():
    features, labels = _clusters(3, seed=14, classes=4)
    test_features, _ = _clusters(2, seed=15, classes=4)
    x, x_test = _normalized(features), _normalized(test_features)
    # Classes 0..3 of 5 trained: class 4 can never be predicted.
    probe = LinearProbe(5, C=0.7).fit(features, labels)
    direct = LogisticRegression(C=0.7, max_iter=1000).fit(x, labels.numpy())
    logits = probe.logits(test_features)
    assert torch.isinf(logits[:, 4]).all() and (logits[:, 4] < 0).all()
    _close(logits[:, :4], torch.from_numpy(direct.decision_function(x_test)).float(), "4 of 5")
    # Two classes (1 and 3) of 4: the binary decision value is the second one's logit.
    two = (labels == 1) | (labels == 3)
    probe = LinearProbe(4, C=0.7).fit(features[two], labels[two])
    direct = LogisticRegression(C=0.7, max_iter=1000).fit(x[two.numpy()], labels[two].numpy())
    logits = probe.logits(test_features)
    assert torch.isinf(logits[:, [0, 2]]).all() and (logits[:, 1] == 0).all()
    _close(logits[:, 3], torch.from_numpy(direct.decision_function(x_test)).float(), "binary")
    assert np.array_equal(logits.argmax(dim=-1).numpy(), direct.predict(x_test))


# --- features, settings, errors -----------------------------------------------------------------


def test_encode_images_skips_unreadable_images(backbone, tmp_path, caplog):
    clip, _ = backbone
    _, test_transform = clip_transforms(32)
    samples = _digit_samples(3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    features, labels = encode_images(
        clip, [*samples[:2], (broken, 4), samples[2]], test_transform, batch_size=2
    )
    assert "skipping unreadable image" in caplog.text
    with torch.no_grad():
        expected = clip.encode_image(torch.stack([test_transform(image) for image, _ in samples]))
    _close(features, expected, "features")
    assert labels.tolist() == [label for _, label in samples] and labels.dtype == torch.int64
    with pytest.raises(InputError, match="no image could be encoded"):
        encode_images(clip, [(broken, 0)], test_transform)


def test_augmented_views_are_seeded_and_leave_the_caller_random_state(backbone):
    clip, _ = backbone
    train_transform, _ = clip_transforms(32, (0.5, 1.0))
    samples = _digit_samples(3)
    state = torch.get_rng_state()
    first, labels = encode_augmented_views(clip, samples, train_transform, views=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again, _ = encode_augmented_views(clip, samples, train_transform, views=2, seed=3)
    assert first.shape == (2, 3, DIM) and torch.equal(first, again)
    assert not torch.equal(first[0], first[1]) and labels.tolist() == [0, 1, 2]


def test_training_defaults_are_the_papers():
    assert [coop_epochs(shots) for shots in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert coop_epochs(16, "imagenet") == 50
    coop = training_defaults("coop", 16, "oxford_pets")
    assert (coop["lr"], coop["batch_size"], coop["epochs"]) == (0.002, 32, 200)
    tip = training_defaults("tip-adapter-f", 16)
    assert (tip["optimizer"], tip["lr"], tip["epochs"], tip["batch_size"]) == (
        "adamw",
        1e-3,
        20,
        256,
    )
    for method in TRAINED:
        settings = training_defaults(method, 4)
        TrainConfig(**{k: v for k, v in settings.items() if k not in ("optimizer", "crop_scale")})
    with pytest.raises(ValueError, match="method must be one of"):
        training_defaults("pini", 16)


def test_bad_arguments_name_themselves(backbone):
    clip, tokenizer = backbone
    with pytest.raises(TypeError, match="classnames must be a list"):
        ZeroShotCLIP(clip, tokenizer, "cat")
    with pytest.raises(ValueError, match="ratio must be a number in"):
        CLIPAdapter(clip, tokenizer, CLASSES, ratio=1.5)
    with pytest.raises(ValueError, match="num_context must be an int"):
        CoOp(clip, tokenizer, CLASSES, num_context=0)
    adapter = TipAdapter(clip, tokenizer, CLASSES)
    with pytest.raises(ValueError, match="val_features and val_labels are needed"):
        adapter.fit(_random(5, DIM, seed=1), _labels(5))
    with pytest.raises(ValueError, match=r"cache_labels must lie in \[0, 5\)"):
        adapter.fit(_random(5, DIM, seed=1), torch.tensor([0, 1, 2, 3, 5]))
    with pytest.raises(ValueError, match="must have 32 features per row"):
        adapter.fit(_random(5, 7, seed=1), _labels(5))
    with pytest.raises(ValueError, match="val_features and val_labels are needed for the search"):
        LinearProbe(5).fit(_random(5, DIM, seed=1), _labels(5))
    with pytest.raises(ValueError, match="train_labels has 4 labels for 5 feature rows"):
        LinearProbe(5, C=1.0).fit(_random(5, DIM, seed=1), _labels(4))
