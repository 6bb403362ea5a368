"""Fused kernels for PiNI: reparameterized Gaussian noise injection and noisy CLIP logits/loss.

Public API (docs/spec.md §2): ``noise``, ``fused_inject``, ``noisy_cosine_logits``,
``noisy_cross_entropy``, ``available_backends``.
"""

from .backends import available_backends
from .functional import fused_inject, noise, noisy_cosine_logits, noisy_cross_entropy

__all__ = [
    "available_backends",
    "fused_inject",
    "noise",
    "noisy_cosine_logits",
    "noisy_cross_entropy",
]
__version__ = "0.1.0"
