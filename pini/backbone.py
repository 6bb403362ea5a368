"""The frozen open_clip backbone: building it with its CLIP weights (a file, a pretrained tag or
an ``hf-hub:`` name), checking weights before any work, and encoding prompts from their token
embeddings."""

from __future__ import annotations

import functools
import logging
import pickle
from pathlib import Path

import open_clip
import torch
from torch import nn

from .errors import InputError

TINY_MODEL = "pini-tiny"


@functools.cache
def register_model_configs() -> None:
    """Makes open_clip know pini's own model configs (``pini-tiny``); idempotent."""
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
    register_model_configs()
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    return not vision.get("timm_model_name") and isinstance(vision.get("layers"), int)


def check_weights(name: str, pretrained: str | None) -> None:
    """``InputError`` unless ``name`` is an open_clip model and ``pretrained`` is None, a file, a
    pretrained tag of it or an ``hf-hub:`` name; fetches nothing."""
    register_model_configs()
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
