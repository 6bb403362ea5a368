"""What a PiNI model is: ``PiNIConfig`` (which noise goes where, with which generator) and the
paper's Table 1 rows by name (docs/spec.md §1)."""

from __future__ import annotations

import dataclasses

from . import generators as gen

VISUAL_LOCATIONS = ("none", "image", "feature")
TEXT_LOCATIONS = ("none", "prompt", "feature")
# The paper's generators first: for raw images its 10-layer residual CNN, as the authors built it
# ("cnn-authors") or pini's narrower one ("cnn"), and the cross-attention of CLIP's patch tokens
# over the class text features ("attention"); "mlp", "cnn-light" and "attention-pixels" (a
# learned patchify of the pixels as queries) are lighter.
VISUAL_GENERATORS = {
    "image": ("cnn-authors", "cnn", "attention", "mlp", "cnn-light", "attention-pixels"),
    "feature": ("attention", "mlp"),
}
TEXT_GENERATORS = {"prompt": ("embedding",), "feature": ("embedding", "mlp")}
# The generators the paper gives each location (Section 4.2, Fig. 3), as pini builds them: the
# rows of its Table 1 (noise location x generator), `pini sweep --noise-rows table1`. For raw
# images its residual CNN (the authors' build) and the patch tokens' cross-attention; for the
# visual features the cross-attention and an MLP; learnable (mu, sigma) for the prompt; an MLP
# and learnable (mu, sigma) for the text features.
PAPER_GENERATORS = {
    "visual": {"image": ("cnn-authors", "attention"), "feature": ("attention", "mlp")},
    "text": {"prompt": ("embedding",), "feature": ("mlp", "embedding")},
}
INFERENCE_MODES = ("sample", "mean", "average")
# "shared": one (L, width) prompt noise draw per sample added to every class's prompt (the paper:
# the template is the random variable); "per-class": each class's prompt gets its own draw.
PROMPT_NOISE_DRAWS = ("shared", "per-class")
# The prompt of the rows without prompt noise: "hand-written", the dataset's zero-shot prompt (the
# authors', CLIP's default prompts); "placeholder", PiNI's 16-placeholder prompt without noise.
FIXED_PROMPTS = ("hand-written", "placeholder")
# "fp32": everything in float32; "bf16" / "fp16": autocast for the frozen towers, generators in
# float32; "fp16-all": CLIP and the generators in float16 (the authors' PREC="fp16").
PRECISIONS = ("fp32", "bf16", "fp16", "fp16-all")
# "fused": every noise path on pini_kernels' ops; "eager": the same noise and loss in plain
# PyTorch as the authors write it (EagerNoisePath), e.g. to measure what the kernels gain.
NOISE_PATHS = ("fused", "eager")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class PiNIConfig:
    """Which noise goes where. The defaults are the paper's: visual features with the
    cross-attention generator, and prompt word embeddings with learnable (mu, sigma), one prompt
    noise draw shared by every class, one noise sample (m = 1).

    visual_generator for "image" noise: "cnn-authors" (the paper's 10-layer residual CNN as the
    authors built it), "cnn" (pini's narrower one, rescaled per image) or "attention"
    (the paper's: CLIP's patch tokens attend over the class text features), or the lighter
    "mlp", "cnn-light", "attention-pixels"; for "feature" noise: "attention" or "mlp".
    prompt_noise_draw: "shared" (the paper) or "per-class" (each class its own draw).
    prompt_noise_per_step: in training, one prompt noise draw per step that all m samples share
    (the authors'), or with False one per sample; inference draws one per sample either way.
    text_feature_noise_per_step: the same for the text-feature noise (``text="feature"``).
    fixed_prompt: the text of the rows without prompt noise, "hand-written" (the dataset's
    zero-shot prompt, the authors') or "placeholder" (PiNI's prompt without noise).
    precision: "fp32"; "bf16" / "fp16" autocast the frozen towers; "fp16-all" casts CLIP and the
    generators to float16 (the authors' setting).
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
    prompt_noise_per_step: bool = True  # training: m samples share one prompt noise draw
    text_feature_noise_per_step: bool = True  # training: ... and one text-feature noise draw
    fixed_prompt: str = "hand-written"  # rows without prompt noise; or "placeholder"
    scaled_attention: bool = False
    sigma_activation: str = "abs"
    precision: str = "fp32"  # or autocast "bf16" / "fp16" (towers), "fp16-all" (everything)
    noise_path: str = "fused"  # or "eager": the same noise and loss in plain PyTorch
    head_init: str = "default"  # generators' output layers: PyTorch's (the authors') or "small"

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
        _choice("precision", self.precision, PRECISIONS)
        _choice("fixed_prompt", self.fixed_prompt, FIXED_PROMPTS)
        for name in ("prompt_noise_per_step", "text_feature_noise_per_step"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _choice("noise_path", self.noise_path, NOISE_PATHS)
        _choice("head_init", self.head_init, gen.HEAD_INITS)
        for name in ("num_samples", "inference_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @classmethod
    def table1(cls, row: str, **overrides) -> PiNIConfig:
        """A ``TABLE1`` row by its flag, e.g. ``table1("feature+prompt")``: a location of the
        paper's Table 1, or a pair of them."""
        if row not in TABLE1:
            raise ValueError(f"unknown Table 1 row {row!r}; expected one of {list(TABLE1)}")
        return cls(**{**TABLE1[row], **overrides})


# The --noise rows: the paper's Table 1 (each injection location alone: image, feature, prompt,
# text-feature) and every visual x text pair of them, which Table 1 does not report.
TABLE1 = {
    "image": dict(visual="image", visual_generator="cnn-authors", text="none"),
    "feature": dict(visual="feature", visual_generator="attention", text="none"),
    "prompt": dict(visual="none", text="prompt", text_generator="embedding"),
    "text-feature": dict(visual="none", text="feature", text_generator="mlp"),
    "image+prompt": dict(visual="image", visual_generator="cnn-authors", text="prompt"),
    "image+text-feature": dict(
        visual="image", visual_generator="cnn-authors", text="feature", text_generator="mlp"
    ),
    "feature+prompt": dict(visual="feature", visual_generator="attention", text="prompt"),
    "feature+text-feature": dict(
        visual="feature", visual_generator="attention", text="feature", text_generator="mlp"
    ),
}
