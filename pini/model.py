"""PiNI on a frozen open_clip model: injection points, generators, the loss and inference.

One ``PiNIConfig`` names a combination of the paper's Table 1: where visual noise goes (none, the
raw image, the visual features) and with which generator, where text noise goes (none, the prompt
word embeddings, the text features), the mode and the number of samples. Only the generators
train; CLIP is frozen and kept in eval mode. Every noise path calls ``pini_kernels`` through
``FusedNoisePath``; ``noise_path="eager"`` swaps in ``EagerNoisePath``, the same noise and loss in
plain PyTorch as the authors write it.

Eq. (13) averages over ``num_samples`` = m noise samples, and every noise source is drawn anew for
each sample: the prompt noise (one (L, width) draw per sample, shared by every class), the image
or feature noise, and the text-feature noise. One step's seed s drives them all (docs/spec.md
§4): image features s, text features s + 1, prompt embeddings s + 2, raw images s + 3.
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
    baseline (``prompts.zero_shot_template``), "{}" standing for the class name.

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
        self.clip = clip.eval().requires_grad_(False)
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
            zero_shot_text = encode_text(clip, zero_shot_ids.to(device)).float()
            # (C, D): the frozen CLIP on PiNI's prompts (placeholders, template, class name), no
            # noise. The text side when no prompt noise is configured, and the diagnostic baseline.
            placeholder_text = encode_text(clip, self.token_ids).float()
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
        """Autocast for the frozen towers ("bf16" / "fp16"); the generators stay in float32."""
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        device_type = self.token_ids.device.type
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type, dtype=dtype)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 features of the frozen image tower, in the configured precision."""
        with self._tower_precision():
            return encode_image(self.clip, images).float()

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D): the image's spatial feature, the frozen ViT's patch tokens after its last
        block and ``ln_post``, projected into CLIP's joint space like the pooled feature."""
        visual = self.clip.visual
        with torch.no_grad(), self._tower_precision():
            tokens = visual.forward_intermediates(
                images,
                indices=1,
                normalize_intermediates=True,
                intermediates_only=True,
                output_fmt="NLC",
            )["image_intermediates"][-1]
            if visual.proj is not None:
                tokens = tokens @ visual.proj
        return tokens.float()

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
            text = encode_text_embeddings(clip, embeddings.flatten(0, 1), token_ids).float()
        return text.view(embeddings.shape[0], self.token_ids.shape[0], -1)

    def text_features(
        self, num_samples: int = 1, *, sigma_scale: float = 1.0, seed: int | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Text features for ``num_samples`` noise samples, and the feature-level text noise.

        With prompt noise: (num_samples, C, D), sample j encoding its own prompt noise (stream
        of ``seed + 2``, see ``_encode_prompts``), or (C, D) for one sample. Without: the (C, D)
        features of PiNI's prompts, shared by every sample. The text noise is None or a
        (mu, sigma) pair broadcastable to (C, D), whose eps the caller draws (stream of
        ``seed + 1``). ``sigma_scale`` multiplies every sigma (0 gives the mean).
        """
        if self.prompt_noise is not None:
            text = self._encode_prompts(
                self.prompt_noise(), num_samples, sigma_scale, step_seed(seed)
            )
            text = text[0] if num_samples == 1 else text
        else:
            text = self.placeholder_prompt_text
        text_noise = None
        if self.text_generator is not None:
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
            mu, sigma = generator(self._patch_tokens(images), text, images.shape[-2:])
        elif isinstance(generator, gen.PixelCrossAttention):
            mu, sigma = generator(images, text)
        else:
            mu, sigma = generator(images)
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
        if isinstance(generator, gen.FeatureCrossAttention):
            mu, sigma = generator(image_features, text)
        else:
            mu, sigma = generator(image_features)
        return self._centered(mu), sigma * sigma_scale

    # --- loss and inference -----------------------------------------------------------------

    def _logits_op_call(self, images, num_samples: int, sigma_scale: float, seed: int) -> dict:
        """Keyword arguments of the one pini_kernels logits/loss call that covers
        ``num_samples`` noise samples of the batch ``images`` (B, 3, H, W), every Table 1 row.

        The op draws the text features' noise (stream ``seed + 1`` over (num_samples, C, D)) and
        takes per-sample text features (num_samples, C, D) as they are. It draws the image
        features' noise (stream ``seed``) too when every sample shares the image noise's
        (mu, sigma); when each sample has its own (a cross-attention generator reading
        per-sample text features), that noise is injected here from the same stream, and the op
        gets the (num_samples, B, D) noisy features, as it does for raw-image noise.
        """
        text, text_noise = self.text_features(num_samples, sigma_scale=sigma_scale, seed=seed)
        call = dict(
            text_features=text,
            text_noise=text_noise,
            logit_scale=self.clip.logit_scale.exp(),
            mode=self.config.mode,
            seed=seed,
            num_samples=num_samples,
        )
        visual = self.config.visual
        if visual == "image":
            features = self._noisy_image_features(images, text, num_samples, sigma_scale, seed)
            return dict(image_features=features, **call)
        features = self.encode_image(images)
        image_noise = None
        if visual == "feature":
            image_noise = self._feature_noise(features, text, sigma_scale)
        if text.dim() == 3 and self._reads_text():  # (mu, sigma) of each sample's text
            features = self._inject_samples(
                features, *image_noise, num_samples, seed + IMAGE_FEATURE_STREAM
            )
            image_noise = None
        return dict(image_features=features, image_noise=image_noise, **call)

    def loss(
        self, images: torch.Tensor, labels: torch.Tensor, seed: int | None = None
    ) -> torch.Tensor:
        """Eq. (13): cross-entropy of the noisy cosine logits, averaged over the batch and over
        ``num_samples`` noise samples per image, each sample with all its noise drawn anew, in
        one op call. images: (B, 3, H, W); labels: (B,). Returns a float32 scalar."""
        call = self._logits_op_call(images, self.config.num_samples, 1.0, step_seed(seed))
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
        without any noise: a diagnostic, what PiNI computes with every noise switched off."""
        return self._frozen_logits(images, self.placeholder_prompt_text)

    def _frozen_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.encode_image(images), dim=-1)
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
