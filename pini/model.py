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
import dataclasses
import functools
import logging
import pickle
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

import pini_kernels

from . import generators as gen
from .errors import InputError
from .prompts import (
    DEFAULT_TEMPLATE,
    DEFAULT_ZERO_SHOT_TEMPLATE,
    build_prompts,
    build_zero_shot_prompts,
    prompt_prefix,
)

VISUAL_LOCATIONS = ("none", "image", "feature")
TEXT_LOCATIONS = ("none", "prompt", "feature")
# The paper's generators first: for raw images its 10-layer residual CNN ("cnn") and the
# cross-attention of CLIP's patch tokens over the class text features ("attention"); "mlp",
# "cnn-light" and "attention-pixels" (a learned patchify of the pixels as queries) are lighter.
VISUAL_GENERATORS = {
    "image": ("cnn", "attention", "mlp", "cnn-light", "attention-pixels"),
    "feature": ("attention", "mlp"),
}
TEXT_GENERATORS = {"prompt": ("embedding",), "feature": ("embedding", "mlp")}
INFERENCE_MODES = ("sample", "mean", "average")
# "shared": one (L, width) prompt noise draw per sample added to every class's prompt (the paper:
# the template is the random variable); "per-class": each class's prompt gets its own draw.
PROMPT_NOISE_DRAWS = ("shared", "per-class")
# "fused": every noise path on pini_kernels' ops; "eager": the same noise and loss in plain
# PyTorch as the authors write it (EagerNoisePath), e.g. to measure what the kernels gain.
NOISE_PATHS = ("fused", "eager")
TINY_MODEL = "pini-tiny"


@dataclasses.dataclass(frozen=True)
class PiNIConfig:
    """Which noise goes where. The defaults are the paper's: visual features with the
    cross-attention generator, and prompt word embeddings with learnable (mu, sigma), one prompt
    noise draw per sample shared by every class, one noise sample (m = 1).

    visual_generator for "image" noise: "cnn" (the paper's 10-layer residual CNN) or "attention"
    (the paper's: CLIP's patch tokens attend over the class text features), or the lighter
    "mlp", "cnn-light", "attention-pixels"; for "feature" noise: "attention" or "mlp".
    prompt_noise_draw: "shared" (the paper) or "per-class" (each class its own draw).
    noise_path: "fused" (pini_kernels' ops) or "eager" (plain PyTorch as the authors write it,
    eps drawn from the same streams: the same loss and gradients for the same seed).
    """

    visual: str = "feature"
    visual_generator: str = "attention"
    text: str = "prompt"
    text_generator: str = "embedding"
    mode: str = "add"
    num_samples: int = 1
    inference: str = "sample"  # one sample (the paper), "mean" (sigma = 0), "average" of k
    inference_samples: int = 8
    prompt_noise_draw: str = "shared"  # or "per-class"
    scaled_attention: bool = False
    sigma_activation: str = "abs"
    precision: str = "fp32"  # the frozen towers: "fp32", or autocast "bf16" / "fp16"
    noise_path: str = "fused"  # or "eager": the same noise and loss in plain PyTorch

    def __post_init__(self):
        _choice("visual", self.visual, VISUAL_LOCATIONS)
        _choice("text", self.text, TEXT_LOCATIONS)
        if self.visual != "none":
            _choice("visual_generator", self.visual_generator, VISUAL_GENERATORS[self.visual])
        if self.text != "none":
            _choice("text_generator", self.text_generator, TEXT_GENERATORS[self.text])
        _choice("mode", self.mode, ("add", "mul"))
        _choice("inference", self.inference, INFERENCE_MODES)
        _choice("prompt_noise_draw", self.prompt_noise_draw, PROMPT_NOISE_DRAWS)
        _choice("sigma_activation", self.sigma_activation, gen.SIGMA_ACTIVATIONS)
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("noise_path", self.noise_path, NOISE_PATHS)
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


# Noise streams of one step, all derived from one seed s (docs/spec.md §4): image and text
# features use s and s + 1 (drawn inside pini_kernels' logits/loss ops, or here from the same
# streams when each sample needs its own image features); prompt embeddings and raw images get
# their own.
IMAGE_FEATURE_STREAM = 0
TEXT_FEATURE_STREAM = 1
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


# --- the noise path: pini_kernels, or the same in eager PyTorch --------------------------------

NoisePair = tuple[torch.Tensor, torch.Tensor]


class FusedNoisePath:
    """The noise path on pini_kernels' fused ops (``noise_path="fused"``, the default).

    ``PiNI`` calls these four methods, never pini_kernels directly, so one object decides how
    every noise sample, noisy logit and loss of the model is computed; ``EagerNoisePath`` has the
    same methods in plain PyTorch.
    """

    def fused_inject(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        *,
        mode: str = "add",
        num_samples: int | None = None,
        seed: int,
    ) -> torch.Tensor:
        """x (*S) with noise ``mu + sigma * eps``, eps = noise((num_samples, *S), seed) (or of
        shape S): (*S), or (num_samples, *S). mu, sigma: broadcastable to S."""
        return pini_kernels.fused_inject(
            x, mu, sigma, mode=mode, num_samples=num_samples, seed=seed
        )

    def sample_noise(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        shape: torch.Size,
        *,
        num_samples: int,
        seed: int,
    ) -> torch.Tensor:
        """(num_samples, *shape) draws of the noise itself, ``mu + sigma * eps`` with eps =
        noise((num_samples, *shape), seed); mu, sigma broadcastable to shape."""
        # Contiguous zeros (not an expanded 0-d one): the native backends' C++ autograd entry
        # point takes contiguous inputs (pini_kernels/inject.py), and noise shapes are small.
        zeros = mu.new_zeros(shape)
        return pini_kernels.fused_inject(zeros, mu, sigma, num_samples=num_samples, seed=seed)

    def noisy_cosine_logits(self, **call) -> torch.Tensor:
        """``pini_kernels.noisy_cosine_logits``: (num_samples, B, C) logits."""
        return pini_kernels.noisy_cosine_logits(**call)

    def noisy_cross_entropy(self, **call) -> torch.Tensor:
        """``pini_kernels.noisy_cross_entropy``: the mean loss of Eq. (13), a float32 scalar."""
        return pini_kernels.noisy_cross_entropy(**call)


class EagerNoisePath:
    """The same noise path in plain PyTorch, as the authors write it (``noise_path="eager"``):
    ``mu + sigma * eps`` added to (or multiplying) the tensor, ``F.normalize``, a matmul and
    ``F.cross_entropy`` over the m-times-repeated rows, every intermediate materialized.

    Only eps differs from the authors' ``torch.randn_like``: it is ``pini_kernels.noise`` on the
    streams the fused ops draw (docs/spec.md §4), so both paths give the same loss and gradients
    for the same seed, to float rounding.
    """

    def fused_inject(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        *,
        mode: str = "add",
        num_samples: int | None = None,
        seed: int,
    ) -> torch.Tensor:
        """``FusedNoisePath.fused_inject`` with eps materialized."""
        shape = x.shape if num_samples is None else (num_samples, *x.shape)
        noise = mu + sigma * pini_kernels.noise(shape, seed=seed, device=x.device)
        return x * noise if mode == "mul" else x + noise

    def sample_noise(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        shape: torch.Size,
        *,
        num_samples: int,
        seed: int,
    ) -> torch.Tensor:
        """``FusedNoisePath.sample_noise``: (num_samples, *shape)."""
        return mu + sigma * pini_kernels.noise((num_samples, *shape), seed=seed, device=mu.device)

    def _noisy(
        self,
        features: torch.Tensor,
        noise: NoisePair | None,
        mode: str,
        num_samples: int,
        seed: int,
    ) -> torch.Tensor:
        """features (N, D) or (num_samples, N, D) with noise of the stream ``seed`` over
        (num_samples, N, D); the features as given without noise."""
        if noise is None:
            return features
        samples = None if features.dim() == 3 else num_samples
        return self.fused_inject(features, *noise, mode=mode, num_samples=samples, seed=seed)

    def noisy_cosine_logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        *,
        image_noise: NoisePair | None = None,
        text_noise: NoisePair | None = None,
        mode: str = "add",
        num_samples: int = 1,
        seed: int,
    ) -> torch.Tensor:
        """(num_samples, B, C) logits; image_features (B, D), text_features (C, D) or
        (num_samples, C, D). Image noise on the stream of ``seed``, text noise on ``seed + 1``."""
        image = self._noisy(image_features, image_noise, mode, num_samples, seed)
        text = self._noisy(text_features, text_noise, mode, num_samples, seed + 1)
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        logits = logit_scale * (image @ text.transpose(-1, -2))
        return logits.expand(num_samples, *logits.shape[-2:])

    def noisy_cross_entropy(self, *, target: torch.Tensor, **call) -> torch.Tensor:
        """Eq. (13): ``F.cross_entropy`` (mean) over the (num_samples * B, C) logits of
        ``noisy_cosine_logits(**call)``, the (B,) ``target`` repeated per sample."""
        logits = self.noisy_cosine_logits(**call)
        samples, batch, classes = logits.shape
        return F.cross_entropy(logits.reshape(samples * batch, classes), target.repeat(samples))


NOISE_PATH_OPS = {"fused": FusedNoisePath(), "eager": EagerNoisePath()}


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
    """(model, tokenizer) for an open_clip model and its CLIP weights.

    ``pretrained`` is what open_clip users type:

    - a local file: an open_clip state dict (loaded with ``weights_only=True``) or, only with
      ``trusted=True``, OpenAI's TorchScript archive;
    - an open_clip pretrained tag of ``name`` (``"openai"``, ``"laion2b_s34b_b88k"``, ...) or
      ``"hf-hub:org/name"`` (a Hugging Face repository holding open_clip weights): downloaded and
      cached by open_clip / huggingface_hub when online, read from that cache offline
      (``HF_HUB_OFFLINE=1``). A tag whose weights were trained with QuickGELU (OpenAI's) builds
      the model with QuickGELU, as open_clip's ``-quickgelu`` model names do;
    - ``None``: random weights (``name="pini-tiny"`` is a random-weight model for tests).

    A value that is none of these, or weights that cannot be fetched, is an ``InputError``.
    """
    check_weights(name, pretrained)
    options = {}
    if pretrained is not None:
        pretrained, options = _weights_source(name, str(pretrained))
    # open_clip warns that a model without weights is random: pini-tiny is random by design.
    quiet = pretrained is None and name == TINY_MODEL
    try:
        if quiet:
            logging.disable(logging.WARNING)
        model = open_clip.create_model(
            name,
            pretrained=pretrained,
            weights_only=not trusted,
            device=device,
            pretrained_text=False,
            pretrained_image=False,
            **options,
        )
    except pickle.UnpicklingError as error:
        if pretrained is None or "unsupported global" not in str(error).lower():
            raise
        raise InputError(
            f"--pretrained {pretrained} holds pickled objects beyond tensors (OpenAI's TorchScript "
            "archive, or code), which load only with --trusted: give it only for a file from a "
            "source you trust"
        ) from None
    except RuntimeError as error:
        message = str(error)
        if pretrained is not None and ("size mismatch" in message or "state_dict" in message):
            markers = ("size mismatch", "Missing key", "Unexpected key")
            lines = [line.strip() for line in message.splitlines()]
            detail = next((line for line in lines if any(m in line for m in markers)), "")
            raise InputError(
                f"--pretrained {pretrained} holds weights of another model than {name} "
                f"({detail[:160] or message.splitlines()[0][:160]})"
            ) from None
        if pretrained is None or "download" not in message.lower():
            raise
        raise InputError(
            f"--pretrained {pretrained}: the weights could not be fetched for {name} "
            f"({str(error).splitlines()[0][:160]}); offline, only weights already in the "
            "Hugging Face cache load"
        ) from None
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    if not hasattr(model, "token_embedding"):
        raise TypeError(
            f"{name} builds a {type(model).__name__} (a text tower of its own, e.g. an HF text "
            "encoder): PiNI's prompt-embedding noise needs open_clip's CLIP class"
        )
    return model, open_clip.get_tokenizer(name)


def has_vit_image_tower(name: str) -> bool:
    """Whether open_clip builds ``name``'s image tower as its own VisionTransformer, whose patch
    tokens the "attention" image-noise generator reads (not a ResNet, not a timm tower)."""
    _register_configs()
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    return not vision.get("timm_model_name") and isinstance(vision.get("layers"), int)


def check_weights(name: str, pretrained: str | None) -> None:
    """``InputError`` unless ``name`` is an open_clip model and ``pretrained`` is None, a file, a
    pretrained tag of it or an ``hf-hub:`` name; fetches nothing."""
    _register_configs()
    if name not in open_clip.list_models():
        raise InputError(f"unknown open_clip model {name!r} (open_clip.list_models() has them)")
    if pretrained is not None and not str(pretrained).startswith("hf-hub:"):
        _weights_source(name, str(pretrained))


def _weights_source(name: str, pretrained: str) -> tuple[str, dict]:
    """(what to pass to open_clip as ``pretrained``, extra create_model options)."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}
    if pretrained.startswith("hf-hub:"):
        repository = pretrained[len("hf-hub:") :]
        try:
            return open_clip.pretrained.download_pretrained_from_hf(repository), {}
        except Exception as error:
            raise InputError(
                f"--pretrained {pretrained}: no open_clip weights could be fetched from that "
                f"repository ({str(error).splitlines()[0][:160]})"
            ) from None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags or pretrained.lower() in tags:
        tag = pretrained if pretrained in tags else pretrained.lower()
        quick_gelu = open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False)
        return tag, ({"force_quick_gelu": True} if quick_gelu else {})
    if path.suffix or "/" in pretrained or path.parent != Path("."):
        raise InputError(f"--pretrained {pretrained}: no such weights file")
    raise InputError(
        f"--pretrained {pretrained} is neither a file nor a pretrained tag of {name} "
        f"(tags: {', '.join(tags) if tags else 'none'})"
    )


class PiNI(nn.Module):
    """PiNI around a frozen open_clip ``CLIP``.

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
        device = clip.token_embedding.weight.device
        zero_shot_ids = tokenizer(build_zero_shot_prompts(classnames, zero_shot_template))
        token_ids = tokenizer(build_prompts(classnames, template)).to(device)
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
        with torch.no_grad(), self._tower_precision():
            # (C, D): the frozen CLIP on PiNI's prompts (placeholders, template, class name), no
            # noise. The text side when no prompt noise is configured, and the diagnostic baseline.
            placeholder_text = self._encode_prompts(None)[0]
            # (C, D): the frozen CLIP on CoOp's hand-written prompts, the paper's zero-shot row.
            zero_shot_text = clip.encode_text(zero_shot_ids.to(device)).float()
        self.register_buffer("placeholder_prompt_text", placeholder_text, persistent=False)
        self.register_buffer("zero_shot_text", zero_shot_text, persistent=False)

    @property
    def noise_ops(self) -> FusedNoisePath | EagerNoisePath:
        """What computes every noise sample, noisy logit and loss: ``config.noise_path``'s."""
        return NOISE_PATH_OPS[self.config.noise_path]

    @property
    def num_classes(self) -> int:
        return int(self.token_ids.shape[0])

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

    def _encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with self._tower_precision():
            return self.clip.encode_image(images).float()

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
        return self.noise_ops.fused_inject(
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
        embeddings = clip.token_embedding(self.token_ids).unsqueeze(0)  # (1, C, context, width)
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
                self.prompt_noise(), num_samples, sigma_scale, _step_seed(seed)
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
        return self._encode_image(noisy.flatten(0, 1)).view(num_samples, images.shape[0], -1)

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

    def _logits_op_calls(self, images, num_samples: int, sigma_scale: float, seed: int):
        """Keyword arguments of the pini_kernels logits/loss calls that cover ``num_samples``
        noise samples of the batch ``images`` (B, 3, H, W), in sample order.

        One call with ``num_samples`` when every sample shares the image features and the image
        noise's (mu, sigma): the op draws the feature noise of both sides (streams ``seed`` and
        ``seed + 1``) and takes per-sample text features (num_samples, C, D) as they are. One
        call per sample when each sample has its own image features (raw-image noise) or its own
        image noise (mu, sigma) (a cross-attention generator reading per-sample text features):
        the feature noise is then injected here from the same streams, and each call gets sample
        j's noisy features with nothing left to draw.
        """
        text, text_noise = self.text_features(num_samples, sigma_scale=sigma_scale, seed=seed)
        common = dict(logit_scale=self.clip.logit_scale.exp(), mode=self.config.mode, seed=seed)
        visual = self.config.visual
        per_sample_text = text.dim() == 3
        if visual == "image":
            features = self._noisy_image_features(images, text, num_samples, sigma_scale, seed)
        else:
            features = self._encode_image(images)
            image_noise = None
            if visual == "feature":
                image_noise = self._feature_noise(features, text, sigma_scale)
            if not (per_sample_text and self._reads_text()):
                return [
                    dict(
                        image_features=features,
                        text_features=text,
                        image_noise=image_noise,
                        text_noise=text_noise,
                        num_samples=num_samples,
                        **common,
                    )
                ]
            features = self._inject_samples(
                features, *image_noise, num_samples, seed + IMAGE_FEATURE_STREAM
            )
        if not per_sample_text:
            text = text.expand(num_samples, *text.shape)
        if text_noise is not None:  # the stream the op would draw: (num_samples, C, D) of seed + 1
            text = self.noise_ops.fused_inject(
                text, *text_noise, mode=self.config.mode, seed=seed + TEXT_FEATURE_STREAM
            )
        return [
            dict(image_features=features[j], text_features=text[j], num_samples=1, **common)
            for j in range(num_samples)
        ]

    def loss(
        self, images: torch.Tensor, labels: torch.Tensor, seed: int | None = None
    ) -> torch.Tensor:
        """Eq. (13): cross-entropy of the noisy cosine logits, averaged over the batch and over
        ``num_samples`` noise samples per image, each sample with all its noise drawn anew.
        images: (B, 3, H, W); labels: (B,). Returns a float32 scalar."""
        calls = self._logits_op_calls(images, self.config.num_samples, 1.0, _step_seed(seed))
        losses = [self.noise_ops.noisy_cross_entropy(target=labels, **call) for call in calls]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def sample_logits(
        self,
        images: torch.Tensor,
        num_samples: int = 1,
        sigma_scale: float = 1.0,
        seed: int | None = None,
    ) -> torch.Tensor:
        """(num_samples, B, C) logits, each sample with its own draw of every noise source."""
        calls = self._logits_op_calls(images, num_samples, sigma_scale, _step_seed(seed))
        return torch.cat([self.noise_ops.noisy_cosine_logits(**call) for call in calls])

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
        image = F.normalize(self._encode_image(images), dim=-1)
        return self.clip.logit_scale.exp() * image @ F.normalize(text, dim=-1).t()


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
