"""PiNI on open_clip: every noise generator and injection point of the paper, on pini_kernels.

clip, tokenizer = pini.build_clip("ViT-B-16", pretrained="path/to/weights.pt")
model = pini.PiNI(clip, tokenizer, classnames, pini.template_for("oxford_pets"),
                  pini.PiNIConfig.table1("feature+prompt"),
                  zero_shot_template=pini.zero_shot_template("oxford_pets"))
loss = model.loss(images, labels)     # Eq. (13)
logits = model(images)                # (B, C)
"""

from .backbone import build_clip, encode_text_embeddings
from .config import TABLE1, PiNIConfig
from .model import PiNI
from .prompts import (
    TEMPLATES,
    ZERO_SHOT_TEMPLATES,
    build_prompts,
    build_zero_shot_prompts,
    template_for,
    zero_shot_template,
)

__all__ = [
    "TABLE1",
    "TEMPLATES",
    "ZERO_SHOT_TEMPLATES",
    "PiNI",
    "PiNIConfig",
    "build_clip",
    "build_prompts",
    "build_zero_shot_prompts",
    "encode_text_embeddings",
    "template_for",
    "zero_shot_template",
]
