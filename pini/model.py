"""PiNI on a frozen open_clip model: injection points, generators, the loss and inference.

One ``PiNIConfig`` names a combination of the paper's Table 1: where visual noise goes (none, the
raw image, the visual features) and with which generator, where text noise goes (none, the prompt
word embeddings, the text features), the mode and the number of samples. Only the generators
train; CLIP is frozen and kept in eval mode. Every noise path calls ``pini_kernels`` through
``FusedNoisePath``; ``noise_path="eager"`` swaps in ``EagerNoisePath``, the same noise and loss in
plain PyTorch as the authors write it.

Eq. (13) averages over ``num_samples`` = m noise samples. The image or feature noise is drawn
anew for each sample; the prompt noise (one (L, width) draw shared by every class) and the
text-feature noise once per training step, shared by the m samples as in the authors' code, which
repeats only the visual noise, or with ``prompt_noise_per_step=False`` /
``text_feature_noise_per_step=False`` once per sample (inference always draws them per sample). One
step's seed s drives them all (docs/spec.md §4): image features s, text features s + 1, prompt
embeddings s + 2, raw images s + 3.

Rows without prompt noise score the images against the dataset's hand-written prompt (the
zero-shot prompt, as the authors' code does), or with ``fixed_prompt="placeholder"`` against
PiNI's 16-placeholder prompt without noise. ``precision="fp16-all"`` casts the frozen CLIP (in
place) and the generators to float16, the authors' ``PREC="fp16"``.
"""

from __future__ import annotations

import contextlib

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import generators as gen
from .backbone import (
    encode_image,
    encode_text,
    encode_text_embeddings,
    logit_bias,
    token_embedding,
)
from .config import PiNIConfig
from .noise_paths import (
    IMAGE_FEATURE_STREAM,
    IMAGE_STREAM,
    NOISE_PATH_OPS,
    PROMPT_STREAM,
    TEXT_FEATURE_STREAM,
    EagerNoisePath,
    FusedNoisePath,
    step_seed,
)
from .prompts import (
    DEFAULT_TEMPLATE,
    DEFAULT_ZERO_SHOT_TEMPLATE,
    build_prompts,
    build_zero_shot_prompts,
    prompt_prefix,
)


class PiNI(nn.Module):
    """PiNI around a frozen open_clip model: ``CLIP``, ``CustomTextCLIP`` (SigLIP, EVA02,
    MobileCLIP, ...) or ``CoCa`` (its contrastive towers). Prompt noise needs a text tower that
    takes token embeddings (open_clip's ``TextTransformer``, not an HF text encoder); SigLIP's
    ``logit_bias`` is added to every logit reported (docs/spec.md §1).

    classnames: the C class names. template: PiNI's prompt template for the dataset
    (``prompts.template_for``). zero_shot_template: CoOp's hand-written prompt for the zero-shot
    baseline (``prompts.zero_shot_template``), "{}" standing for the class name; also the prompt
    of the rows without prompt noise (``fixed_prompt="hand-written"``).

    ``loss(images, labels)`` is Eq. (13) for one batch; ``forward(images)`` gives (B, C) logits
    with the configured inference noise; ``zero_shot_logits(images)`` is the paper's zero-shot
    CLIP; ``placeholder_prompt_logits(images)`` is the frozen CLIP on PiNI's own prompts without
    noise (a diagnostic: what PiNI computes with its noise switched off).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        classnames: list[str],
        template: str = DEFAULT_TEMPLATE,
        config: PiNIConfig | None = None,
        *,
        zero_shot_template: str = DEFAULT_ZERO_SHOT_TEMPLATE,
    ):
        super().__init__()
        self.config = config or PiNIConfig()
        # float16 for "fp16-all" (the frozen CLIP, in place, and the generators), else float32.
        self.compute_dtype = torch.float16 if self.config.precision == "fp16-all" else torch.float32
        self.clip = clip.eval().requires_grad_(False).to(self.compute_dtype)
        self.zero_shot_template = zero_shot_template
        device = clip.logit_scale.device
        zero_shot_ids = tokenizer(build_zero_shot_prompts(classnames, zero_shot_template))
        token_ids = tokenizer(build_prompts(classnames, template)).to(device)
        self.register_buffer("token_ids", token_ids, persistent=False)
        # Positions 1 .. prefix_length hold placeholders and template: the same for every class.
        prefix_ids = tokenizer([prompt_prefix(template)])[0]
        self.prefix_length = int((prefix_ids != 0).sum()) - 2  # minus start and end tokens
        cfg = self.config
        with torch.no_grad(), self._tower_precision():
            # (C, D): the frozen CLIP on CoOp's hand-written prompts, the paper's zero-shot row.
            # The text side of the rows without prompt noise (fixed_prompt="hand-written").
            zero_shot_text = encode_text(clip, zero_shot_ids.to(device)).to(self.compute_dtype)
            # (C, D): the frozen CLIP on PiNI's prompts (placeholders, template, class name), no
            # noise: the rows without prompt noise with fixed_prompt="placeholder", a diagnostic.
            placeholder_text = encode_text(clip, self.token_ids).to(self.compute_dtype)
        dim = zero_shot_text.shape[-1]
        self.prompt_noise = None
        if cfg.text == "prompt":
            width = token_embedding(clip).weight.shape[1]  # a TypeError for an HF text tower
            self.prompt_noise = gen.LearnableNoise(
                (self.prefix_length, width), cfg.sigma_activation
            )
        self.text_generator = None
        if cfg.text == "feature":
            self.text_generator = (
                gen.LearnableNoise((len(classnames), dim), cfg.sigma_activation)
                if cfg.text_generator == "embedding"
                else gen.FeatureMLP(
                    dim, sigma_activation=cfg.sigma_activation, head_init=cfg.head_init
                )
            )
        self.visual_generator = _visual_generator(cfg, dim, clip)
        for generator in (self.prompt_noise, self.text_generator, self.visual_generator):
            if generator is not None:
                generator.to(self.compute_dtype)
        self.register_buffer("placeholder_prompt_text", placeholder_text, persistent=False)
        self.register_buffer("zero_shot_text", zero_shot_text, persistent=False)

    @property
    def noise_ops(self) -> FusedNoisePath | EagerNoisePath:
        """What computes every noise sample, noisy logit and loss: ``config.noise_path``'s."""
        return NOISE_PATH_OPS[self.config.noise_path]

    @property
    def num_classes(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def perturbs_images(self) -> bool:
        """Whether the raw images get noise: then no precomputed image features can stand in."""
        return self.config.visual == "image"

    def train(self, mode: bool = True) -> PiNI:
        """Generators follow ``mode`` (BatchNorm in the image CNN); CLIP stays in eval mode."""
        super().train(mode)
        self.clip.eval()  # frozen: no dropout, no statistics updates
        return self

    def _tower_precision(self):
        """Autocast for the frozen towers ("bf16" / "fp16"); the generators stay in float32.
        None for "fp32" and "fp16-all" (CLIP's weights are already in ``compute_dtype``)."""
        if self.config.precision in ("fp32", "fp16-all"):
            return contextlib.nullcontext()
        device_type = self.token_ids.device.type
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type, dtype=dtype)

    def _generator_precision(self):
        """For "fp16-all", float16 autocast around the generators (their weights are float16):
        their matrix products and convolutions run in float16, whatever dtype a generator casts
        its inputs to; a null context otherwise."""
        if self.config.precision != "fp16-all":
            return contextlib.nullcontext()
        return torch.autocast(self.token_ids.device.type, dtype=torch.float16)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) features of the frozen image tower in ``compute_dtype`` (float32, or float16
        for "fp16-all"), computed in the configured precision."""
        with self._tower_precision():
            return encode_image(self.clip, images.to(self.compute_dtype)).to(self.compute_dtype)

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D): the image's spatial feature, the frozen ViT's patch tokens after its last
        block and ``ln_post``, projected into CLIP's joint space like the pooled feature."""
        visual = self.clip.visual
        with torch.no_grad(), self._tower_precision():
            tokens = visual.forward_intermediates(
                images.to(self.compute_dtype),
                indices=1,
                normalize_intermediates=True,
                intermediates_only=True,
                output_fmt="NLC",
            )["image_intermediates"][-1]
            if visual.proj is not None:
                tokens = tokens @ visual.proj
        return tokens.to(self.compute_dtype)

    def _centered(self, mu: torch.Tensor) -> torch.Tensor:
        """In "mul" mode the generators predict mu - 1: noise starts near 1, i.e. near CLIP."""
        return mu + 1.0 if self.config.mode == "mul" else mu

    def _inject_samples(self, x, mu, sigma, num_samples: int, seed: int) -> torch.Tensor:
        """(num_samples, *x.shape): sample j is x with the noise of
        ``noise((num_samples, *x.shape), seed)[j]``, the stream pini_kernels' ops draw for the
        same seed. mu, sigma: broadcastable to x (shared by every sample) or to
        (num_samples, *x.shape) (one pair per sample)."""
        if max(mu.dim(), sigma.dim()) > x.dim():
            x, num_samples = x.expand(num_samples, *x.shape), None
        return self.noise_ops.inject(
            x, mu, sigma, mode=self.config.mode, num_samples=num_samples, seed=seed
        )

    # --- text side --------------------------------------------------------------------------

    def _encode_prompts(
        self,
        prompt_noise: tuple[torch.Tensor, torch.Tensor] | None,
        num_samples: int = 1,
        sigma_scale: float = 1.0,
        seed: int = 0,
    ) -> torch.Tensor:
        """(num_samples, C, D) text features of the prompts; (1, C, D) without noise.

        prompt_noise: (mu, sigma) of shape (L, width) for the placeholder and template tokens.
        With ``prompt_noise_draw="shared"`` sample j adds (or multiplies by) mu + sigma * eps_j
        with eps_j = noise((num_samples, L, width), seed + 2)[j], the same for every class; with
        "per-class", class c gets noise((num_samples, C, L, width), seed + 2)[j, c]. The text
        tower encodes the num_samples * C prompts in one call.
        """
        clip = self.clip
        embeddings = token_embedding(clip)(self.token_ids).unsqueeze(0)  # (1, C, context, width)
        token_ids = self.token_ids
        if prompt_noise is not None:
            mu, sigma = self._centered(prompt_noise[0]), prompt_noise[1] * sigma_scale
            end = 1 + self.prefix_length
            prefix = embeddings[0, :, 1:end]  # (C, L, width)
            if self.config.prompt_noise_draw == "per-class":
                noisy = self._inject_samples(prefix, mu, sigma, num_samples, seed + PROMPT_STREAM)
            else:
                # The noise itself, mu + sigma * eps, added to (or multiplying) every class.
                noise = self.noise_ops.sample_noise(
                    mu, sigma, prefix.shape[1:], num_samples=num_samples, seed=seed + PROMPT_STREAM
                ).unsqueeze(1)  # (num_samples, 1, L, width)
                noisy = prefix + noise if self.config.mode == "add" else prefix * noise
            rest = (num_samples, *embeddings.shape[1:2])
            embeddings = torch.cat(
                [
                    embeddings[:, :, :1].expand(*rest, -1, -1),
                    noisy,
                    embeddings[:, :, end:].expand(*rest, -1, -1),
                ],
                dim=2,
            )
            token_ids = token_ids.repeat(num_samples, 1)
        with self._tower_precision():
            text = encode_text_embeddings(clip, embeddings.flatten(0, 1), token_ids)
        text = text.to(self.compute_dtype)
        return text.view(embeddings.shape[0], self.token_ids.shape[0], -1)

    @property
    def fixed_text(self) -> torch.Tensor:
        """(C, D): the text features of the rows without prompt noise, the frozen CLIP on the
        hand-written prompt (``fixed_prompt="hand-written"``) or on PiNI's placeholder prompt."""
        if self.config.fixed_prompt == "hand-written":
            return self.zero_shot_text
        return self.placeholder_prompt_text

    def text_features(
        self,
        num_samples: int = 1,
        *,
        sigma_scale: float = 1.0,
        seed: int | None = None,
        one_prompt_draw: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Text features for ``num_samples`` noise samples, and the feature-level text noise.

        With prompt noise: (num_samples, C, D), sample j encoding its own prompt noise (stream
        of ``seed + 2``, see ``_encode_prompts``), or (C, D) for one sample or with
        ``one_prompt_draw`` (one draw, sample 0 of that stream, shared by every sample). Without:
        ``fixed_text`` (C, D), shared by every sample. The text noise is None or a (mu, sigma)
        pair broadcastable to (C, D), whose eps the caller draws (stream of ``seed + 1``).
        ``sigma_scale`` multiplies every sigma (0 gives the mean).
        """
        if one_prompt_draw:
            num_samples = 1
        if self.prompt_noise is not None:
            with self._generator_precision():
                prompt_noise = self.prompt_noise()
            text = self._encode_prompts(prompt_noise, num_samples, sigma_scale, step_seed(seed))
            text = text[0] if num_samples == 1 else text
        else:
            text = self.fixed_text
        text_noise = None
        if self.text_generator is not None:
            with self._generator_precision():
                if isinstance(self.text_generator, gen.LearnableNoise):
                    mu, sigma = self.text_generator()
                else:
                    mu, sigma = self.text_generator(text)
            text_noise = (self._centered(mu), sigma * sigma_scale)
        return text, text_noise

    # --- image side -------------------------------------------------------------------------

    def _reads_text(self) -> bool:
        """Whether the visual generator attends over the class text features."""
        return isinstance(
            self.visual_generator,
            (gen.FeatureCrossAttention, gen.ImageCrossAttention, gen.PixelCrossAttention),
        )

    def image_noise(self, images: torch.Tensor, text: torch.Tensor) -> tuple:
        """(mu, sigma) of the raw-image noise for ``images`` (B, 3, H, W), as injected (in
        "mul" mode mu is centred at 1); text: (C, D) or (num_samples, C, D), read by the
        cross-attention generators. Only for ``visual="image"``."""
        generator = self.visual_generator
        if self.config.visual != "image":
            raise ValueError(f"image_noise needs visual='image', got {self.config.visual!r}")
        if isinstance(generator, gen.ImageCrossAttention):
            tokens = self._patch_tokens(images)
            with self._generator_precision():
                mu, sigma = generator(tokens, text, images.shape[-2:])
        else:
            with self._generator_precision():
                is_pixel_attention = isinstance(generator, gen.PixelCrossAttention)
                mu, sigma = generator(images, text) if is_pixel_attention else generator(images)
        return self._centered(mu), sigma

    def _noisy_image_features(self, images, text, num_samples, sigma_scale, seed):
        """(num_samples, B, D) features of noisy images: raw-image injection, sample j from
        noise((num_samples, B, 3, H, W), seed + 3)[j]. text: (C, D) or (num_samples, C, D)."""
        mu, sigma = self.image_noise(images, text)
        noisy = self._inject_samples(
            images, mu, sigma * sigma_scale, num_samples, seed + IMAGE_STREAM
        )
        return self.encode_image(noisy.flatten(0, 1)).view(num_samples, images.shape[0], -1)

    def _feature_noise(self, image_features, text, sigma_scale):
        """(mu, sigma) of the visual-feature noise: (B, D), or (num_samples, B, D) when a
        cross-attention generator reads per-sample text features (num_samples, C, D)."""
        generator = self.visual_generator
        with self._generator_precision():
            if isinstance(generator, gen.FeatureCrossAttention):
                mu, sigma = generator(image_features, text)
            else:
                mu, sigma = generator(image_features)
        return self._centered(mu), sigma * sigma_scale

    # --- loss and inference -----------------------------------------------------------------

    def _logits_op_call(
        self,
        images,
        num_samples: int,
        sigma_scale: float,
        seed: int,
        training: bool = False,
    ) -> dict:
        """Keyword arguments of the one pini_kernels logits/loss call that covers
        ``num_samples`` noise samples of the batch ``images`` (B, 3, H, W), every Table 1 row.
        ``training``: the samples share one prompt noise draw (``prompt_noise_per_step``, see
        ``text_features``) and one text-feature noise draw (``text_feature_noise_per_step``:
        sample 0 of the stream below, injected here after the visual generator has read the
        text features without it; the op then gets noisy (C, D) text features and no text
        noise), as the config says.

        The op draws the text features' noise (stream ``seed + 1`` over (num_samples, C, D)) and
        takes per-sample text features (num_samples, C, D) as they are. It draws the image
        features' noise (stream ``seed``) too when every sample shares the image noise's
        (mu, sigma); when each sample has its own (a cross-attention generator reading
        per-sample text features), that noise is injected here from the same stream, and the op
        gets the (num_samples, B, D) noisy features, as it does for raw-image noise.
        """
        images = images.to(self.compute_dtype)
        one_prompt_draw = training and self.config.prompt_noise_per_step
        text, text_noise = self.text_features(
            num_samples, sigma_scale=sigma_scale, seed=seed, one_prompt_draw=one_prompt_draw
        )
        call = dict(
            logit_scale=self.clip.logit_scale.exp(),
            mode=self.config.mode,
            seed=seed,
            num_samples=num_samples,
        )
        visual = self.config.visual
        image_noise = None
        if visual == "image":
            features = self._noisy_image_features(images, text, num_samples, sigma_scale, seed)
        else:
            features = self.encode_image(images)
            if visual == "feature":
                image_noise = self._feature_noise(features, text, sigma_scale)
            if text.dim() == 3 and self._reads_text():  # (mu, sigma) of each sample's text
                features = self._inject_samples(
                    features, *image_noise, num_samples, seed + IMAGE_FEATURE_STREAM
                )
                image_noise = None
        one_text_feature_draw = training and self.config.text_feature_noise_per_step
        if one_text_feature_draw and text_noise is not None and num_samples > 1:
            # noise((C, D)) is sample 0 of noise((m, C, D)); in float32, as the op injects it
            # (fp16-all: no rounding to float16 in between)
            mu, sigma = (value.float() for value in text_noise)
            text = self.noise_ops.inject(
                text.float(), mu, sigma, mode=self.config.mode, seed=seed + TEXT_FEATURE_STREAM
            )
            text_noise = None
        return dict(
            image_features=features,
            image_noise=image_noise,
            text_features=text,
            text_noise=text_noise,
            **call,
        )

    def loss(
        self, images: torch.Tensor, labels: torch.Tensor, seed: int | None = None
    ) -> torch.Tensor:
        """Eq. (13): cross-entropy of the noisy cosine logits, averaged over the batch and over
        ``num_samples`` noise samples per image, in one op call: each sample with its own image
        (or feature) noise, the prompt or text-feature noise drawn once for the step
        (``prompt_noise_per_step``, ``text_feature_noise_per_step``: the authors') or per
        sample. images: (B, 3, H, W); labels: (B,). Returns a float32 scalar."""
        call = self._logits_op_call(
            images, self.config.num_samples, 1.0, step_seed(seed), training=True
        )
        return self.noise_ops.noisy_cross_entropy(target=labels, **call)

    def sample_logits(
        self,
        images: torch.Tensor,
        num_samples: int = 1,
        sigma_scale: float = 1.0,
        seed: int | None = None,
    ) -> torch.Tensor:
        """(num_samples, B, C) logits, each sample with its own draw of every noise source."""
        call = self._logits_op_call(images, num_samples, sigma_scale, step_seed(seed))
        return self._with_bias(self.noise_ops.noisy_cosine_logits(**call))

    def _with_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` plus SigLIP's ``logit_bias`` where the model has one. The loss needs none:
        a constant shift of a row's logits leaves its softmax, so its cross-entropy, unchanged."""
        bias = logit_bias(self.clip)
        return logits if bias is None else logits + bias.detach().to(logits.dtype)

    def forward(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """(B, C) logits for classification with the configured inference noise: one sample
        (the paper), the mean (sigma = 0), or log of the class probabilities averaged over
        ``inference_samples`` samples (both sides resampled)."""
        mode = self.config.inference
        if mode == "sample":
            return self.sample_logits(images, 1, seed=seed)[0]
        if mode == "mean":
            return self.sample_logits(images, 1, sigma_scale=0.0, seed=seed)[0]
        logits = self.sample_logits(images, self.config.inference_samples, seed=seed)
        return logits.float().softmax(dim=-1).mean(dim=0).log()

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of zero-shot CLIP, the paper's ZS row: the frozen CLIP on CoOp's
        hand-written prompts (``zero_shot_template``), without any noise."""
        return self._frozen_logits(images, self.zero_shot_text)

    def placeholder_prompt_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of the frozen CLIP on PiNI's own prompts (placeholders and template),
        without any noise: a diagnostic, what a prompt row computes with its noise switched off
        (and a row without prompt noise with ``fixed_prompt="placeholder"``)."""
        return self._frozen_logits(images, self.placeholder_prompt_text)

    def _frozen_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.encode_image(images), dim=-1)  # casts to compute_dtype
        return self._with_bias(self.clip.logit_scale.exp() * image @ F.normalize(text, dim=-1).t())


def _visual_generator(cfg: PiNIConfig, dim: int, clip: nn.Module) -> nn.Module | None:
    if cfg.visual == "none":
        return None
    options = dict(sigma_activation=cfg.sigma_activation, head_init=cfg.head_init)
    if cfg.visual == "feature":
        if cfg.visual_generator == "attention":
            return gen.FeatureCrossAttention(dim, scaled=cfg.scaled_attention, **options)
        return gen.FeatureMLP(dim, **options)
    if cfg.visual_generator == "cnn-authors":
        return gen.AuthorsImageCNN(**options)
    if cfg.visual_generator == "cnn":
        return gen.ImageCNN(**options)
    if cfg.visual_generator == "cnn-light":
        return gen.LightImageCNN(**options)
    if cfg.visual_generator == "mlp":
        return gen.ImageMLP(**options)
    patch = getattr(clip.visual, "patch_size", (16, 16))
    patch = patch[0] if isinstance(patch, tuple) else patch
    if cfg.visual_generator == "attention-pixels":
        return gen.PixelCrossAttention(
            dim, patch_size=patch, scaled=cfg.scaled_attention, **options
        )
    visual = clip.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise TypeError(
            'visual_generator="attention" for image noise reads the patch tokens of a ViT image '
            f"tower (open_clip's VisionTransformer), got {type(visual).__name__}; "
            'visual_generator="attention-pixels" works on any tower'
        )
    token_dim = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
    return gen.ImageCrossAttention(
        token_dim, dim, patch_size=patch, scaled=cfg.scaled_attention, **options
    )
