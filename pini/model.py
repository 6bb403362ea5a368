"""PiNI on a frozen open_clip model: injection points, generators, the loss and inference.

One ``PiNIConfig`` names a combination of the paper's Table 1: where visual noise goes (none, the
raw image, the visual features) and with which generator, where text noise goes (none, the prompt
word embeddings, the text features), the mode and the number of samples. Only the generators
train; CLIP is frozen and kept in eval mode. Every noise path calls ``pini_kernels``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

import pini_kernels

from . import generators as gen
from .prompts import DEFAULT_TEMPLATE, build_prompts, prompt_prefix

VISUAL_LOCATIONS = ("none", "image", "feature")
TEXT_LOCATIONS = ("none", "prompt", "feature")
VISUAL_GENERATORS = {"image": ("mlp", "cnn", "attention"), "feature": ("attention", "mlp")}
TEXT_GENERATORS = {"prompt": ("embedding",), "feature": ("embedding", "mlp")}
INFERENCE_MODES = ("sample", "mean", "average")
TINY_MODEL = "pini-tiny"


@dataclasses.dataclass(frozen=True)
class PiNIConfig:
    """Which noise goes where. The defaults are the paper's: visual features with the
    cross-attention generator, and prompt word embeddings with learnable (mu, sigma)."""

    visual: str = "feature"
    visual_generator: str = "attention"
    text: str = "prompt"
    text_generator: str = "embedding"
    mode: str = "add"
    num_samples: int = 1
    inference: str = "sample"  # one sample (the paper), "mean" (sigma = 0), "average" of k
    inference_samples: int = 8
    scaled_attention: bool = False
    sigma_activation: str = "abs"
    precision: str = "fp32"  # the frozen towers: "fp32", or autocast "bf16" / "fp16"

    def __post_init__(self):
        _choice("visual", self.visual, VISUAL_LOCATIONS)
        _choice("text", self.text, TEXT_LOCATIONS)
        if self.visual != "none":
            _choice("visual_generator", self.visual_generator, VISUAL_GENERATORS[self.visual])
        if self.text != "none":
            _choice("text_generator", self.text_generator, TEXT_GENERATORS[self.text])
        _choice("mode", self.mode, ("add", "mul"))
        _choice("inference", self.inference, INFERENCE_MODES)
        _choice("sigma_activation", self.sigma_activation, gen.SIGMA_ACTIVATIONS)
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        for name in ("num_samples", "inference_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @classmethod
    def table1(cls, row: str, **overrides) -> PiNIConfig:
        """A row of the paper's Table 1 by its flag, e.g. ``table1("feature+prompt")``."""
        if row not in TABLE1:
            raise ValueError(f"unknown Table 1 row {row!r}; expected one of {list(TABLE1)}")
        return cls(**{**TABLE1[row], **overrides})


# The paper's Table 1: each injection location alone and every visual x text pair.
TABLE1 = {
    "image": dict(visual="image", visual_generator="cnn", text="none"),
    "feature": dict(visual="feature", visual_generator="attention", text="none"),
    "prompt": dict(visual="none", text="prompt", text_generator="embedding"),
    "text-feature": dict(visual="none", text="feature", text_generator="mlp"),
    "image+prompt": dict(visual="image", visual_generator="cnn", text="prompt"),
    "image+text-feature": dict(
        visual="image", visual_generator="cnn", text="feature", text_generator="mlp"
    ),
    "feature+prompt": dict(visual="feature", visual_generator="attention", text="prompt"),
    "feature+text-feature": dict(
        visual="feature", visual_generator="attention", text="feature", text_generator="mlp"
    ),
}


# Noise streams of one step, all derived from one seed: image and text features use the seed and
# seed + 1 (pini_kernels' logits/loss ops); prompt embeddings and raw images get their own.
PROMPT_STREAM = 2
IMAGE_STREAM = 3


def _step_seed(seed: int | None) -> int:
    """The step's seed: given, or drawn from torch's default CPU generator (no device sync)."""
    if seed is None:
        return int(torch.randint(0, 1 << 62, ()))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 62):
        raise ValueError(f"seed must be None or an int in [0, 2^62), got {seed!r}")
    return seed


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


# --- the frozen backbone ----------------------------------------------------------------------


@functools.cache
def _register_configs() -> None:
    open_clip.add_model_config(Path(__file__).parent / "model_configs")


def build_clip(
    name: str = TINY_MODEL,
    pretrained: str | None = None,
    *,
    trusted: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, object]:
    """(model, tokenizer) for an open_clip model, with weights from a local file or none.

    ``pretrained``: a path to an open_clip state dict (loaded with ``weights_only=True``) or,
    only with ``trusted=True``, OpenAI's TorchScript archive. Nothing is downloaded.
    ``name="pini-tiny"`` is a random-weight model from this package's config, for tests.
    """
    _register_configs()
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained}")
    model = open_clip.create_model(
        name,
        pretrained=pretrained,
        weights_only=not trusted,
        device=device,
        pretrained_text=False,
        pretrained_image=False,
    )
    if not hasattr(model, "token_embedding"):
        raise TypeError(
            f"{name} builds a {type(model).__name__} (a text tower of its own, e.g. an HF text "
            "encoder): PiNI's prompt-embedding noise needs open_clip's CLIP class"
        )
    return model, open_clip.get_tokenizer(name)


class PiNI(nn.Module):
    """PiNI around a frozen open_clip ``CLIP``.

    classnames: the C class names; template: the dataset's prompt template (prompts.TEMPLATES).
    ``loss(images, labels)`` is Eq. (13) for one batch; ``forward(images)`` gives (B, C) logits
    with the configured inference noise.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        classnames: list[str],
        template: str = DEFAULT_TEMPLATE,
        config: PiNIConfig | None = None,
    ):
        super().__init__()
        self.config = config or PiNIConfig()
        self.clip = clip.eval().requires_grad_(False)
        token_ids = tokenizer(build_prompts(classnames, template))
        self.register_buffer("token_ids", token_ids, persistent=False)
        # Positions 1 .. prefix_length hold placeholders and template: the same for every class.
        prefix_ids = tokenizer([prompt_prefix(template)])[0]
        self.prefix_length = int((prefix_ids != 0).sum()) - 2  # minus start and end tokens
        width = clip.token_embedding.weight.shape[1]
        dim = clip.text_projection.shape[1] if clip.text_projection is not None else width
        cfg = self.config
        self.prompt_noise = (
            gen.LearnableNoise((self.prefix_length, width), cfg.sigma_activation)
            if cfg.text == "prompt"
            else None
        )
        self.text_generator = None
        if cfg.text == "feature":
            self.text_generator = (
                gen.LearnableNoise((len(classnames), dim), cfg.sigma_activation)
                if cfg.text_generator == "embedding"
                else gen.FeatureMLP(dim, sigma_activation=cfg.sigma_activation)
            )
        self.visual_generator = _visual_generator(cfg, dim, clip)
        with torch.no_grad():
            self.register_buffer("zero_shot_text", self._encode_prompts(None), persistent=False)

    def train(self, mode: bool = True) -> PiNI:
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

    def _encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with self._tower_precision():
            return self.clip.encode_image(images).float()

    def _centered(self, mu: torch.Tensor) -> torch.Tensor:
        """In "mul" mode the generators predict mu - 1: noise starts near 1, i.e. near CLIP."""
        return mu + 1.0 if self.config.mode == "mul" else mu

    # --- text side --------------------------------------------------------------------------

    def _encode_prompts(
        self, prompt_noise: tuple | None, sigma_scale: float = 1.0, seed=None
    ) -> torch.Tensor:
        """(C, D) text features of the prompts, with noise on placeholder and template tokens."""
        clip = self.clip
        embeddings = clip.token_embedding(self.token_ids)
        if prompt_noise is not None:
            mu, sigma = prompt_noise
            mu = self._centered(mu)
            end = 1 + self.prefix_length
            prefix = pini_kernels.fused_inject(
                embeddings[:, 1:end],
                mu,
                sigma * sigma_scale,
                mode=self.config.mode,
                seed=None if seed is None else seed + PROMPT_STREAM,
            )
            embeddings = torch.cat([embeddings[:, :1], prefix, embeddings[:, end:]], dim=1)
        with self._tower_precision():
            return encode_text_embeddings(clip, embeddings, self.token_ids).float()

    def text_features(self, sigma_scale: float = 1.0, seed=None):
        """(C, D) text features and the feature-level text noise pair (or None)."""
        if self.prompt_noise is not None:
            text = self._encode_prompts(self.prompt_noise(), sigma_scale, seed)
        else:
            text = self.zero_shot_text
        text_noise = None
        if self.text_generator is not None:
            if isinstance(self.text_generator, gen.LearnableNoise):
                mu, sigma = self.text_generator()
            else:
                mu, sigma = self.text_generator(text)
            text_noise = (self._centered(mu), sigma * sigma_scale)
        return text, text_noise

    # --- image side -------------------------------------------------------------------------

    def _noisy_images(self, images, text, num_samples, sigma_scale, seed):
        """(num_samples * B, D) features of noisy images (raw-image injection)."""
        generator = self.visual_generator
        if isinstance(generator, gen.ImageCrossAttention):
            mu, sigma = generator(images, text)
        else:
            mu, sigma = generator(images)
        noisy = pini_kernels.fused_inject(
            images,
            self._centered(mu),
            sigma * sigma_scale,
            mode=self.config.mode,
            num_samples=num_samples,
            seed=seed + IMAGE_STREAM,
        )
        return self._encode_image(noisy.flatten(0, 1))

    def _feature_noise(self, image_features, text, sigma_scale):
        generator = self.visual_generator
        if isinstance(generator, gen.FeatureCrossAttention):
            mu, sigma = generator(image_features, text)
        else:
            mu, sigma = generator(image_features)
        return self._centered(mu), sigma * sigma_scale

    # --- loss and inference -----------------------------------------------------------------

    def _image_side(self, images, text, num_samples: int, sigma_scale: float, seed: int):
        """(features, image_noise, samples left to the logits op). Raw-image noise is applied
        here, its samples becoming rows (sample-major); feature noise is left to the op."""
        if self.config.visual == "image":
            features = self._noisy_images(images, text, num_samples, sigma_scale, seed)
            return features, None, 1
        features = self._encode_image(images)
        image_noise = None
        if self.config.visual == "feature":
            image_noise = self._feature_noise(features, text, sigma_scale)
        return features, image_noise, num_samples

    def loss(self, images: torch.Tensor, labels: torch.Tensor, seed=None) -> torch.Tensor:
        """Eq. (13): cross-entropy of the noisy cosine logits, averaged over the batch and over
        ``num_samples`` noise samples per image. images: (B, 3, H, W); labels: (B,)."""
        samples = self.config.num_samples
        seed = _step_seed(seed)
        text, text_noise = self.text_features(seed=seed)
        features, image_noise, op_samples = self._image_side(images, text, samples, 1.0, seed)
        return pini_kernels.noisy_cross_entropy(
            features,
            text,
            self.clip.logit_scale.exp(),
            labels.repeat(samples // op_samples),
            image_noise=image_noise,
            text_noise=text_noise,
            mode=self.config.mode,
            num_samples=op_samples,
            seed=seed,
        )

    def sample_logits(
        self, images: torch.Tensor, num_samples: int = 1, sigma_scale: float = 1.0, seed=None
    ) -> torch.Tensor:
        """(num_samples, B, C) logits, each sample with its own noise draw on the image side."""
        seed = _step_seed(seed)
        text, text_noise = self.text_features(sigma_scale, seed)
        features, image_noise, op_samples = self._image_side(
            images, text, num_samples, sigma_scale, seed
        )
        logits = pini_kernels.noisy_cosine_logits(
            features,
            text,
            self.clip.logit_scale.exp(),
            image_noise=image_noise,
            text_noise=text_noise,
            mode=self.config.mode,
            num_samples=op_samples,
            seed=seed,
        )
        return logits.view(num_samples, images.shape[0], -1)

    def forward(self, images: torch.Tensor, seed=None) -> torch.Tensor:
        """(B, C) logits for classification with the configured inference noise: one sample
        (the paper), the mean (sigma = 0), or log of the class probabilities averaged over
        ``inference_samples`` samples."""
        mode = self.config.inference
        if mode == "sample":
            return self.sample_logits(images, 1, seed=seed)[0]
        if mode == "mean":
            return self.sample_logits(images, 1, sigma_scale=0.0, seed=seed)[0]
        logits = self.sample_logits(images, self.config.inference_samples, seed=seed)
        return logits.float().softmax(dim=-1).mean(dim=0).log()

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of the frozen CLIP on the same prompts, without any noise."""
        image = F.normalize(self._encode_image(images), dim=-1)
        text = F.normalize(self.zero_shot_text, dim=-1)
        return self.clip.logit_scale.exp() * image @ text.t()


def encode_text_embeddings(
    clip: nn.Module, embeddings: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """open_clip's encode_text from token embeddings (C, L, width) instead of token ids: positional
    embedding, causal transformer, ln_final, pooling at the end-of-text token, projection."""
    cast_dtype = clip.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + clip.positional_embedding.to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = open_clip.transformer.text_global_pool(
        x, token_ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None)
    )
    if clip.text_projection is not None:
        x = (
            clip.text_projection(x)
            if isinstance(clip.text_projection, nn.Linear)
            else (x @ clip.text_projection)
        )
    return x


def _visual_generator(cfg: PiNIConfig, dim: int, clip: nn.Module) -> nn.Module | None:
    if cfg.visual == "none":
        return None
    options = dict(sigma_activation=cfg.sigma_activation)
    if cfg.visual == "feature":
        if cfg.visual_generator == "attention":
            return gen.FeatureCrossAttention(dim, scaled=cfg.scaled_attention, **options)
        return gen.FeatureMLP(dim, **options)
    if cfg.visual_generator == "mlp":
        return gen.ImageMLP(**options)
    if cfg.visual_generator == "cnn":
        return gen.ImageCNN(**options)
    patch = getattr(clip.visual, "patch_size", (16, 16))
    patch = patch[0] if isinstance(patch, tuple) else patch
    return gen.ImageCrossAttention(dim, patch_size=patch, scaled=cfg.scaled_attention, **options)
