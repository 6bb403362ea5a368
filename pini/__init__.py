"""PiNI on open_clip: every noise generator and injection point of the paper, on pini_kernels.

clip, tokenizer = pini.build_clip("ViT-B-16", pretrained="path/to/weights.pt")
model = pini.PiNI(clip, tokenizer, classnames, template, pini.PiNIConfig.table1("feature+prompt"))
loss = model.loss(images, labels)     # Eq. (13)
logits = model(images)                # (B, C)
"""

from .model import TABLE1, PiNI, PiNIConfig, build_clip, encode_text_embeddings
from .prompts import TEMPLATES, build_prompts

__all__ = [
    "TABLE1",
    "TEMPLATES",
    "PiNI",
    "PiNIConfig",
    "build_clip",
    "build_prompts",
    "encode_text_embeddings",
]
