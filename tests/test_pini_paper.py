"""PiNI as the paper defines it (docs/spec.md §1): prompt noise shared by every class and drawn
per noise sample on its documented stream, Eq. (13) over m samples with every noise source
resampled, the paper's image generators, and zero-shot CLIP on CoOp's hand-written prompts.

Expected values are built by hand from ``pini_kernels.noise`` on the streams docs/spec.md §4
documents and from open_clip's own modules, never from the model's code paths under test.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import pini
import pini.backbone
import pini_kernels
from pini import PiNI, PiNIConfig
from pini import generators as gen

CLASSES = ["cat", "dog", "bird", "golden_retriever"]
SEED = 4321


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return pini.build_clip()


def _model(backbone, classes=CLASSES, **config) -> PiNI:
    clip, tokenizer = backbone
    return PiNI(clip, tokenizer, classes, "a photo of a", PiNIConfig(**config))


def _batch(batch=3, size=32):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, len(CLASSES), (batch,), generator=generator)
    return images, labels


def _encode_text_by_hand(clip, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text after its token lookup, written out: (N, context, width)
    embeddings -> (N, D) (the tiny model pools at the end-of-text token, the largest id)."""
    x = embeddings + clip.positional_embedding
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    x = x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)]
    return x @ clip.text_projection


def _prompt_text_by_hand(model: PiNI, num_samples: int, seed: int) -> torch.Tensor:
    """(num_samples, C, D) text features of the prompt noise, from the stream of docs/spec.md §4:
    sample j adds (mul: multiplies by) mu + sigma * eps_j on the placeholder and template tokens,
    eps_j = noise((m, L, W), seed + 2)[j] shared by every class ("shared"), or
    noise((m, C, L, W), seed + 2)[j, c] for class c ("per-class")."""
    clip, cfg = model.clip, model.config
    token_ids = model.token_ids
    base = clip.token_embedding(token_ids)  # (C, context, W)
    classes, _, width = base.shape
    length = model.prefix_length
    mu = model.prompt_noise.mu
    sigma = model.prompt_noise.raw_sigma.abs()
    if cfg.prompt_noise_draw == "shared":
        eps = pini_kernels.noise((num_samples, length, width), seed=seed + 2)[:, None]
    else:
        eps = pini_kernels.noise((num_samples, classes, length, width), seed=seed + 2)
    prefix = base[:, 1 : 1 + length]
    # "mul": the generators predict mu - 1
    noisy = prefix + (mu + sigma * eps) if cfg.mode == "add" else prefix * (1 + mu + sigma * eps)
    embeddings = base.repeat(num_samples, 1, 1, 1)
    embeddings[:, :, 1 : 1 + length] = noisy
    text = _encode_text_by_hand(clip, embeddings.flatten(0, 1), token_ids.repeat(num_samples, 1))
    return text.view(num_samples, classes, -1)


def _logits_by_hand(clip, image_features, text_features):
    """scale * <z/|z|, t/|t|>: (B, D) x (C, D) -> (B, C)."""
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    return clip.logit_scale.exp() * image @ text.t()


def test_text_by_hand_matches_open_clip(backbone):
    clip, tokenizer = backbone
    ids = tokenizer(pini.build_prompts(CLASSES))
    with torch.no_grad():
        assert_close(
            _encode_text_by_hand(clip, clip.token_embedding(ids), ids),
            clip.encode_text(ids),
            atol=1e-6,
            rtol=1e-6,
            name="text by hand",
        )


# --- prompt noise ---------------------------------------------------------------------------


def _recorded_prompt_embeddings(model: PiNI, monkeypatch, num_samples: int, seed: int):
    """(num_samples, C, context, width): the embeddings the text tower receives in one call."""
    recorded = []
    encode = pini.backbone.encode_text_embeddings

    def recording(clip, embeddings, token_ids):
        recorded.append(embeddings.detach().clone())
        return encode(clip, embeddings, token_ids)

    monkeypatch.setattr(pini.model, "encode_text_embeddings", recording)
    with torch.no_grad():
        model.text_features(num_samples, seed=seed)
    assert len(recorded) == 1, "the text tower must encode every sample's prompts in one call"
    return recorded[0].view(num_samples, len(CLASSES), *recorded[0].shape[1:])


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("draw", ["shared", "per-class"])
def test_prompt_noise_shared_by_every_class_or_per_class(backbone, monkeypatch, draw, mode):
    model = _model(backbone, visual="none", text="prompt", mode=mode, prompt_noise_draw=draw)
    embeddings = _recorded_prompt_embeddings(model, monkeypatch, 1, SEED)[0]
    clean = model.clip.token_embedding(model.token_ids).detach()
    end = 1 + model.prefix_length
    # Placeholders and template are the same tokens in every class's prompt ...
    assert torch.equal(clean[0, 1:end], clean[1, 1:end])
    # ... so the noisy ones are equal exactly when the noise is one draw shared by every class.
    noisy = embeddings[:, 1:end]
    assert not torch.equal(noisy[0], clean[0, 1:end])
    assert torch.equal(noisy[0], noisy[1]) == (draw == "shared")
    assert torch.equal(noisy[1], noisy[3]) == (draw == "shared")
    # The start token, class names, full stop and padding are not perturbed.
    assert torch.equal(embeddings[:, :1], clean[:, :1])
    assert torch.equal(embeddings[:, end:], clean[:, end:])


def test_three_samples_draw_three_different_prompt_noises(backbone, monkeypatch):
    model = _model(backbone, visual="none", text="prompt", num_samples=3)
    embeddings = _recorded_prompt_embeddings(model, monkeypatch, 3, SEED)
    prefix = embeddings[:, :, 1 : 1 + model.prefix_length]
    for first, second in ((0, 1), (0, 2), (1, 2)):
        assert not torch.allclose(prefix[first], prefix[second])
    for sample in range(3):  # each draw is still shared by every class
        assert torch.equal(prefix[sample, 0], prefix[sample, 2])


@pytest.mark.parametrize(
    "mode, draw, num_samples",
    [("add", "shared", 3), ("mul", "shared", 2), ("add", "per-class", 2), ("mul", "shared", 1)],
)
def test_prompt_text_features_by_value_on_the_documented_stream(backbone, mode, draw, num_samples):
    model = _model(backbone, visual="none", text="prompt", mode=mode, prompt_noise_draw=draw)
    with torch.no_grad():
        text, text_noise = model.text_features(num_samples, seed=SEED)
        expected = _prompt_text_by_hand(model, num_samples, SEED)
    assert text_noise is None
    if num_samples == 1:  # one sample: (C, D), shared by the op's only sample
        expected = expected[0]
    assert_close(text, expected, atol=1e-5, rtol=1e-5, name="prompt text features")


@pytest.mark.parametrize("per_step", [False, True])
def test_prompt_row_loss_and_logits_use_each_samples_text(backbone, per_step):
    """Eq. (13) with m = 3 on the prompt row: sample j's logits pair the clean image features
    with sample j's prompt text; the loss averages over samples and batch. With
    prompt_noise_per_step the loss's samples all read sample 0's prompt text (one draw per step);
    the logits (inference) are per sample either way."""
    model = _model(
        backbone, visual="none", text="prompt", num_samples=3, prompt_noise_per_step=per_step
    )
    images, labels = _batch()
    loss = model.loss(images, labels, seed=SEED)
    with torch.no_grad():
        logits = model.sample_logits(images, 3, seed=SEED)
        clip = model.clip
        text = _prompt_text_by_hand(model, 3, SEED)
        image = clip.encode_image(images)
        expected_logits = torch.stack([_logits_by_hand(clip, image, text[j]) for j in range(3)])
        loss_logits = expected_logits[:1].expand(3, -1, -1) if per_step else expected_logits
        expected_loss = F.cross_entropy(loss_logits.flatten(0, 1), labels.repeat(3))
    assert_close(logits, expected_logits, atol=1e-4, rtol=1e-5, name="logits")
    assert_close(loss.detach(), expected_loss, atol=1e-5, rtol=1e-5, name="loss")


def test_prompt_noise_gradients_reach_mu_and_sigma(backbone):
    for draw in ("shared", "per-class"):
        model = _model(
            backbone, visual="none", text="prompt", num_samples=2, prompt_noise_draw=draw
        )
        images, labels = _batch()
        model.loss(images, labels, seed=SEED).backward()
        for parameter in (model.prompt_noise.mu, model.prompt_noise.raw_sigma):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, draw


# --- Eq. (13) with every noise source resampled ----------------------------------------------


@pytest.mark.parametrize("per_step", [False, True])
def test_feature_prompt_row_by_hand_with_three_samples(backbone, per_step):
    """The default row with m = 3: the cross-attention generator reads sample j's text, and the
    feature noise of sample j is noise((m, B, D), seed)[j]; with prompt_noise_per_step (the
    default) sample j's text is sample 0's, one prompt noise draw for the step."""
    model = _model(backbone, num_samples=3, prompt_noise_per_step=per_step)
    images, labels = _batch()
    loss = model.loss(images, labels, seed=SEED)
    with torch.no_grad():
        clip = model.clip
        text = _prompt_text_by_hand(model, 3, SEED)
        if per_step:
            text = text[:1].expand(3, -1, -1)
        image = clip.encode_image(images)
        eps = pini_kernels.noise((3, *image.shape), seed=SEED)
        logits = []
        for j in range(3):
            mu, sigma = model.visual_generator(image, text[j])
            logits.append(_logits_by_hand(clip, image + mu + sigma * eps[j], text[j]))
        expected = F.cross_entropy(torch.cat(logits), labels.repeat(3))
    assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5, name="loss")


@pytest.mark.parametrize(
    "visual_generator, text, mode",
    [("cnn", "feature", "mul"), ("attention", "prompt", "add"), ("cnn-light", "feature", "add")],
)
def test_image_rows_by_hand_with_two_samples(backbone, visual_generator, text, mode):
    """Raw-image noise of sample j is noise((m, B, 3, H, W), seed + 3)[j]; text-feature noise
    noise((m, C, D), seed + 1)[j]; prompt noise as documented; both drawn per sample in the
    loss too (prompt_noise_per_step=False, text_feature_noise_per_step=False)."""
    samples = 2
    model = _model(
        backbone,
        visual="image",
        visual_generator=visual_generator,
        text=text,
        text_generator="mlp" if text == "feature" else "embedding",
        mode=mode,
        num_samples=samples,
        prompt_noise_per_step=False,
        text_feature_noise_per_step=False,
    ).eval()
    images, labels = _batch()
    logits = model.sample_logits(images, samples, seed=SEED)
    loss = model.loss(images, labels, seed=SEED)

    def inject(x, noise):  # "mul": the generators predict mu - 1
        return x + noise if mode == "add" else x * (1.0 + noise)

    with torch.no_grad():
        clip = model.clip
        if text == "prompt":
            text_features = _prompt_text_by_hand(model, samples, SEED)
        else:
            clean_text = model.zero_shot_text  # the hand-written prompt (docs/spec.md §9)
            text_mu, text_sigma = model.text_generator(clean_text)
            text_eps = pini_kernels.noise((samples, *clean_text.shape), seed=SEED + 1)
            text_features = inject(clean_text, text_mu + text_sigma * text_eps)
        image_eps = pini_kernels.noise((samples, *images.shape), seed=SEED + 3)
        expected = []
        for j in range(samples):
            if visual_generator == "attention":
                visual = clip.visual
                visual.output_tokens = True
                try:
                    _, tokens = visual(images)
                finally:
                    visual.output_tokens = False
                mu, sigma = model.visual_generator(
                    tokens @ visual.proj, text_features[j], images.shape[-2:]
                )
            else:
                mu, sigma = model.visual_generator(images)
            noisy = inject(images, mu + sigma * image_eps[j])
            expected.append(_logits_by_hand(clip, clip.encode_image(noisy), text_features[j]))
        expected = torch.stack(expected)
        expected_loss = F.cross_entropy(expected.flatten(0, 1), labels.repeat(samples))
    assert_close(logits.detach(), expected, atol=1e-4, rtol=1e-5, name="logits")
    assert_close(loss.detach(), expected_loss, atol=1e-5, rtol=1e-5, name="loss")


def test_average_inference_is_the_log_of_the_mean_probabilities(backbone):
    """inference="average": log((1/k) sum_j softmax(logits_j)) over k samples of every noise
    source, not the mean of the logits."""
    samples = 4
    model = _model(backbone, inference="average", inference_samples=samples)
    images, _ = _batch()
    with torch.no_grad():
        logits = model.sample_logits(images, samples, seed=SEED).double()
        probabilities = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
        expected = (probabilities.sum(dim=0) / samples).log().float()
        actual = model(images, seed=SEED)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5, name="average inference")
    # Both sides are resampled: the samples' logits differ, even with noise on the text only.
    assert not torch.allclose(logits[0], logits[1])
    text_only = _model(backbone, visual="none", text="prompt")
    with torch.no_grad():
        text_logits = text_only.sample_logits(images, 2, seed=SEED)
    assert not torch.allclose(text_logits[0], text_logits[1])


# --- the paper's image generators ---------------------------------------------------------------


def _rms_per_image(values: torch.Tensor) -> torch.Tensor:
    return values.square().mean(dim=(-3, -2, -1)).sqrt()


def test_image_cnn_is_the_papers_ten_layer_residual_network():
    torch.manual_seed(0)
    generator = gen.ImageCNN()
    convolutions = [m for m in generator.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convolutions) == 10 and len(norms) == 9
    images = torch.randn(2, 3, 20, 28)  # odd, non-square size
    mu, sigma = generator(images)
    assert mu.shape == sigma.shape == images.shape
    assert (sigma >= 0).all()
    assert_close(_rms_per_image(mu), torch.full((2,), 0.1), atol=1e-5, rtol=1e-4, name="mu rms")
    assert_close(_rms_per_image(sigma), torch.full((2,), 0.1), atol=1e-5, rtol=1e-4, name="rms")


def test_image_cross_attention_shapes_and_per_sample_text():
    torch.manual_seed(0)
    generator = gen.ImageCrossAttention(token_dim=12, text_dim=10, patch_size=4)
    tokens = torch.randn(2, 15, 12)  # a 3 x 5 grid of 4 x 4 patches: a 12 x 20 image
    text = torch.randn(3, 6, 10)  # three samples of six classes
    mu, sigma = generator(tokens, text[0], (12, 20))
    assert mu.shape == sigma.shape == (2, 3, 12, 20)
    assert_close(_rms_per_image(mu), torch.full((2,), 0.1), atol=1e-5, rtol=1e-4, name="mu rms")
    per_sample_mu, per_sample_sigma = generator(tokens, text, (12, 20))
    assert per_sample_mu.shape == (3, 2, 3, 12, 20)
    for j in range(3):
        expected_mu, expected_sigma = generator(tokens, text[j], (12, 20))
        assert_close(per_sample_mu[j], expected_mu, atol=1e-6, rtol=1e-5, name="mu")
        assert_close(per_sample_sigma[j], expected_sigma, atol=1e-6, rtol=1e-5, name="sigma")
    # Token t of the row-major grid owns its patch of pixels: moving token 6 (grid row 1,
    # column 1: pixels [4:8, 4:8]) changes mu there; elsewhere only the per-image RMS factor.
    moved = tokens.clone()
    moved[:, 6] += 1.0
    moved_mu = generator(moved, text[0], (12, 20))[0]
    inside = torch.zeros(12, 20, dtype=torch.bool)
    inside[4:8, 4:8] = True
    ratio = moved_mu / mu
    for image in range(2):
        outside = ratio[image][:, ~inside]
        assert torch.allclose(outside, outside.mean().expand_as(outside), rtol=1e-4)
        patch = ratio[image][:, inside]
        assert not torch.allclose(patch, outside.mean().expand_as(patch), rtol=1e-2)
    with pytest.raises(ValueError, match="one token per 4x4 patch"):
        generator(tokens, text[0], (12, 24))


def test_feature_cross_attention_reads_per_sample_text():
    torch.manual_seed(0)
    generator = gen.FeatureCrossAttention(8)
    image, text = torch.randn(5, 8), torch.randn(3, 4, 8)
    mu, sigma = generator(image, text)
    assert mu.shape == sigma.shape == (3, 5, 8)
    for j in range(3):
        expected_mu, expected_sigma = generator(image, text[j])
        assert_close(mu[j], expected_mu, atol=1e-6, rtol=1e-5, name="mu")
        assert_close(sigma[j], expected_sigma, atol=1e-6, rtol=1e-5, name="sigma")


def test_patch_tokens_are_the_vits_projected_spatial_feature(backbone):
    model = _model(backbone, visual="image", visual_generator="attention", text="none")
    images, _ = _batch()
    visual = model.clip.visual
    with torch.no_grad():
        visual.output_tokens = True
        try:
            _, tokens = visual(images)
        finally:
            visual.output_tokens = False
        expected = tokens @ visual.proj
        actual = model._patch_tokens(images)
    assert actual.shape == (3, 16, 32)  # a 4 x 4 grid of 8 x 8 patches, CLIP's 32-d joint space
    assert_close(actual, expected, atol=1e-6, rtol=1e-6, name="patch tokens")


@pytest.mark.parametrize("visual_generator", ["cnn", "attention"])
def test_image_generators_train_only_their_parameters(backbone, visual_generator):
    model = _model(
        backbone, visual="image", visual_generator=visual_generator, text="prompt", num_samples=2
    )
    model.train()
    assert model.visual_generator.training and not model.clip.training
    images, labels = _batch()
    model.loss(images, labels, seed=SEED).backward()
    assert all(p.grad is None for p in model.clip.parameters())
    generator_parameters = list(model.visual_generator.parameters()) + list(
        model.prompt_noise.parameters()
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in generator_parameters}
    for name, parameter in model.visual_generator.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_image_cnn_batchnorm_follows_train_and_eval(backbone):
    model = _model(backbone, visual="image", visual_generator="cnn", text="none")
    images, labels = _batch()
    norm = next(m for m in model.visual_generator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model.train()
    before = norm.running_mean.clone()
    model.loss(images, labels, seed=SEED)
    assert not torch.equal(norm.running_mean, before)
    model.eval()
    assert not model.visual_generator.training
    before = norm.running_mean.clone()
    with torch.no_grad():
        model(images, seed=SEED)
    assert torch.equal(norm.running_mean, before)


def test_attention_on_patch_tokens_needs_a_vit(backbone):
    clip, tokenizer = backbone

    class ResNetTower(torch.nn.Module):
        pass

    visual = clip.visual
    clip.visual = ResNetTower()
    try:
        with pytest.raises(TypeError, match='"attention-pixels" works on any tower'):
            PiNI(
                clip,
                tokenizer,
                CLASSES,
                config=PiNIConfig.table1("image", visual_generator="attention"),
            )
    finally:
        clip.visual = visual


# --- zero-shot CLIP on CoOp's prompts -----------------------------------------------------------

# CoOp's trainers/zsclip.py (CUSTOM_TEMPLATES), by the dataset folder names of its DATASETS.md.
COOP_ZERO_SHOT = {
    "imagenet": "a photo of a {}.",
    "caltech-101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food-101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}
# The paper's Table 6 (docs/spec.md §9), PiNI's templates, by the same names and the ImageNet
# variants.
PINI_TEMPLATES = {
    "imagenet": "a photo of a",
    "caltech-101": "a photo of a",
    "oxford_pets": "a type of pet, a photo of a",
    "stanford_cars": "a photo of a",
    "oxford_flowers": "a type of flower, a photo of a",
    "food-101": "a type of food, a photo of",
    "fgvc_aircraft": "a type of aircraft, a photo of a",
    "sun397": "a photo of a",
    "dtd": "texture",
    "eurosat": "a centered satellite photo of",
    "ucf101": "a photo of a person doing",
    "imagenetv2": "a photo of a",
    "imagenet-sketch": "a photo of a",
    "imagenet-adversarial": "a photo of a",
    "imagenet-rendition": "a photo of a",
}


@pytest.mark.parametrize("dataset", list(COOP_ZERO_SHOT))
def test_zero_shot_logits_use_coops_prompt(backbone, dataset):
    clip, tokenizer = backbone
    classes = ["golden_retriever", "tabby cat", "annual crop land"]
    template = pini.zero_shot_template(dataset)
    assert template == COOP_ZERO_SHOT[dataset]
    model = PiNI(clip, tokenizer, classes, pini.template_for(dataset), zero_shot_template=template)
    images, _ = _batch()
    prompts = [COOP_ZERO_SHOT[dataset].format(name.replace("_", " ")) for name in classes]
    with torch.no_grad():
        expected = _logits_by_hand(
            clip, clip.encode_image(images), clip.encode_text(tokenizer(prompts))
        )
        actual = model.zero_shot_logits(images)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5, name=f"zero-shot logits of {dataset}")


def test_templates_by_coop_folder_name_and_alias():
    for dataset, template in PINI_TEMPLATES.items():
        assert pini.template_for(dataset) == template, dataset
        expected = COOP_ZERO_SHOT.get(dataset, "a photo of a {}.")
        assert pini.zero_shot_template(dataset) == expected, dataset
    aliases = {
        "flowers102": "oxford_flowers",
        "food101": "food-101",
        "caltech101": "caltech-101",
        "imagenet_v2": "imagenetv2",
        "imagenet_sketch": "imagenet-sketch",
        "imagenet_a": "imagenet-adversarial",
        "imagenet_r": "imagenet-rendition",
    }
    for alias, name in aliases.items():
        assert pini.template_for(alias) == PINI_TEMPLATES[name], alias
        assert pini.zero_shot_template(alias) == pini.zero_shot_template(name), alias
    assert pini.template_for("Oxford_Pets") == "a type of pet, a photo of a"
    assert pini.template_for("my_folder") == "a photo of a"
    assert pini.zero_shot_template("my_folder") == "a photo of a {}."


def test_zero_shot_template_needs_one_placeholder(backbone):
    clip, tokenizer = backbone
    with pytest.raises(ValueError, match="zero_shot_template must be a str with exactly one"):
        PiNI(clip, tokenizer, CLASSES, zero_shot_template="a photo of a")


def test_placeholder_prompt_logits_are_the_frozen_clip_on_pinis_prompts(backbone):
    clip, tokenizer = backbone
    model = _model(backbone)
    images, _ = _batch()
    with torch.no_grad():
        text = clip.encode_text(tokenizer(pini.build_prompts(CLASSES, "a photo of a")))
        expected = _logits_by_hand(clip, clip.encode_image(images), text)
        actual = model.placeholder_prompt_logits(images)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5, name="placeholder-prompt logits")
