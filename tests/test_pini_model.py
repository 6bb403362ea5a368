"""The PiNI model on a tiny random-weight open_clip model (CPU, no downloads)."""

import pytest
import torch
import torch.nn.functional as F

import pini
import pini_kernels
from pini import TABLE1, PiNI, PiNIConfig
from pini import generators as gen

CLASSES = ["cat", "dog", "bird", "fish", "horse"]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return pini.build_clip()


def _model(backbone, **config) -> PiNI:
    clip, tokenizer = backbone
    return PiNI(clip, tokenizer, CLASSES, "a photo of a", PiNIConfig(**config))


def _batch(batch=4):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, len(CLASSES), (batch,), generator=generator)
    return images, labels


def _zero_noise(model: PiNI) -> None:
    """mu = sigma = 0 from every generator (mu = 1 in "mul" mode): the noise is switched off."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, gen.LearnableNoise):
                module.mu.zero_()
                module.raw_sigma.zero_()
            elif hasattr(module, "head") and isinstance(
                module.head, (torch.nn.Linear, torch.nn.Conv2d)
            ):
                module.head.weight.zero_()
                module.head.bias.zero_()


def test_prompt_embeddings_path_reproduces_encode_text(backbone):
    clip, tokenizer = backbone
    ids = tokenizer(pini.build_prompts(CLASSES))
    with torch.no_grad():
        direct = clip.encode_text(ids)
        via_embeddings = pini.encode_text_embeddings(clip, clip.token_embedding(ids), ids)
    torch.testing.assert_close(via_embeddings, direct, atol=0, rtol=0)


def test_prompt_layout(backbone):
    model = _model(backbone)
    # 16 placeholders and "a photo of a" (4 tokens) are perturbed, nothing else.
    assert model.prefix_length == 20
    assert model.prompt_noise.mu.shape == (20, model.clip.token_embedding.weight.shape[1])
    assert pini.build_prompts(["golden_retriever"])[0] == (
        "X X X X X X X X X X X X X X X X a photo of a golden retriever."
    )


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize(
    "visual, visual_generator",
    [("none", "attention"), ("feature", "attention"), ("image", "cnn"), ("image", "attention")],
)
@pytest.mark.parametrize("text", ["none", "prompt", "feature"])
def test_noise_off_reproduces_the_frozen_clip_on_the_rows_prompt(
    backbone, text, visual, visual_generator, mode
):
    """With every noise off: the placeholder prompt's logits for a row with prompt noise, the
    hand-written (zero-shot) prompt's for any other (docs/spec.md §9)."""
    model = _model(
        backbone,
        text=text,
        text_generator="mlp" if text == "feature" else "embedding",
        visual=visual,
        visual_generator=visual_generator,
        mode=mode,
    )
    _zero_noise(model)
    model.eval()
    images, _ = _batch()
    frozen = model.placeholder_prompt_logits if text == "prompt" else model.zero_shot_logits
    with torch.no_grad():
        torch.testing.assert_close(model(images), frozen(images), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_loss_is_equation_13_by_hand(backbone, num_samples, per_step):
    """With text_feature_noise_per_step (the authors') every sample reads the text-feature
    noise's sample 0; without, sample j reads its own."""
    model = _model(
        backbone,
        visual="feature",
        text="feature",
        text_generator="mlp",
        num_samples=num_samples,
        mode="mul",
        text_feature_noise_per_step=per_step,
    )
    images, labels = _batch()
    seed = 1234
    loss = model.loss(images, labels, seed=seed)
    with torch.no_grad():
        text = model.zero_shot_text  # the hand-written prompt (docs/spec.md §9)
        text_mu, text_sigma = model.text_generator(text)
        image = model.clip.encode_image(images)
        image_mu, image_sigma = model.visual_generator(image, text)
        batch, classes, dim = image.shape[0], text.shape[0], image.shape[1]
        image_eps = pini_kernels.noise((num_samples, batch, dim), seed=seed)
        text_eps = pini_kernels.noise((num_samples, classes, dim), seed=seed + 1)
        if per_step:
            text_eps = text_eps[:1].expand_as(text_eps)
        noisy_image = image * (image_mu + 1 + image_sigma * image_eps)  # "mul": noise around 1
        noisy_text = text * (text_mu + 1 + text_sigma * text_eps)
        logits = model.clip.logit_scale.exp() * (
            F.normalize(noisy_image, dim=-1) @ F.normalize(noisy_text, dim=-1).transpose(1, 2)
        )
        expected = F.cross_entropy(logits.reshape(-1, classes), labels.repeat(num_samples))
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", list(TABLE1))
def test_every_table1_row_trains_only_its_generators(backbone, row):
    model = _model(backbone, **TABLE1[row], num_samples=2)
    clip_before = {name: p.clone() for name, p in model.clip.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in model.clip.parameters())
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    assert not model.clip.training
    images, labels = _batch()
    loss = model.loss(images, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    generators_before = [p.clone() for p in trainable]
    optimizer.step()
    for name, p in model.clip.named_parameters():
        assert torch.equal(p, clip_before[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(generators_before, trainable, strict=True))
    model.eval()
    with torch.no_grad():
        for inference in ("sample", "mean", "average"):
            model.config = PiNIConfig(
                **{**TABLE1[row], "inference": inference, "inference_samples": 3}
            )
            assert model(images).shape == (4, len(CLASSES))


def test_fixed_seed_gives_identical_losses(backbone):
    model = _model(
        backbone, visual="image", visual_generator="attention", text="prompt", num_samples=2
    )
    images, labels = _batch()
    torch.manual_seed(7)
    first = model.loss(images, labels)
    torch.manual_seed(7)
    second = model.loss(images, labels)
    third = model.loss(images, labels)
    assert torch.equal(first, second)
    assert not torch.equal(second, third)


def test_mean_inference_is_deterministic(backbone):
    model = _model(backbone, inference="mean")
    images, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images), atol=0, rtol=0)


def test_config_errors():
    with pytest.raises(ValueError, match="visual must be one of"):
        PiNIConfig(visual="pixels")
    with pytest.raises(ValueError, match="visual_generator must be one of"):
        PiNIConfig(visual="feature", visual_generator="cnn")
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        PiNIConfig(num_samples=0)
    with pytest.raises(ValueError, match="prompt_noise_draw must be one of"):
        PiNIConfig(prompt_noise_draw="per-sample")
    with pytest.raises(ValueError, match="visual_generator must be one of"):
        PiNIConfig(visual="image", visual_generator="resnet")
    with pytest.raises(ValueError, match="unknown Table 1 row"):
        PiNIConfig.table1("everything")
    assert PiNIConfig.table1("image+prompt").visual == "image"


def test_build_clip_needs_an_existing_weights_file(tmp_path):
    # build_clip raises pini.errors.InputError, a ValueError naming the flag and the file.
    with pytest.raises(ValueError, match="no such weights file"):
        pini.build_clip("pini-tiny", pretrained=str(tmp_path / "missing.pt"))


def test_bf16_towers_with_float32_generators(backbone):
    images, labels = _batch()
    torch.manual_seed(3)
    full = _model(backbone, visual="feature", text="prompt")
    state = {k: v.clone() for k, v in full.state_dict().items()}
    half = _model(backbone, visual="feature", text="prompt", precision="bf16")
    half.load_state_dict(state)
    loss_full = full.loss(images, labels, seed=9)
    loss_half = half.loss(images, labels, seed=9)
    loss_half.backward()
    assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad)
    assert torch.isfinite(loss_half) and abs(loss_half.item() - loss_full.item()) < 0.1


def test_build_clip_loads_a_local_state_dict(backbone, tmp_path):
    clip, _ = backbone
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    loaded, _ = pini.build_clip("pini-tiny", pretrained=str(path))
    for (name, original), (_, restored) in zip(
        clip.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(original, restored), name
