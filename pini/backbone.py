"""The frozen open_clip backbone: building it with its CLIP weights (a file, a pretrained tag or
an ``hf-hub:`` name), checking weights before any work, and encoding prompts from their token
embeddings."""

from __future__ import annotations

import functools
import json
import logging
import pickle
from pathlib import Path

import open_clip
import torch
from torch import nn

from .data.transforms import Preprocessing
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
            weights = open_clip.pretrained.download_pretrained_from_hf(repository)
        except Exception as error:
            raise InputError(
                f"--pretrained {pretrained}: no open_clip weights could be fetched from that "
                f"repository ({str(error).splitlines()[0][:160]})"
            ) from None
        preprocessing = _hub_preprocessing(repository, pretrained)
        return weights, ({"force_preprocess_cfg": preprocessing} if preprocessing else {})
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


def _hub_preprocessing(repository: str, pretrained: str) -> dict:
    """The image preprocessing an ``hf-hub:`` repository's ``open_clip_config.json`` gives its
    weights (mean, std, interpolation, resize mode, fill; the size is the model's), or {} where
    it has no such file (OpenAI's then, docs/spec.md §13)."""
    try:
        path = open_clip.pretrained.download_pretrained_from_hf(
            repository, filename="open_clip_config.json"
        )
    except Exception:  # no config in the repository (or not cached offline): OpenAI's
        return {}
    try:
        config = json.loads(Path(path).read_text())
        given = config.get("preprocess_cfg") or {}
        keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
        return {key: given[key] for key in keys if given.get(key) is not None}
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(
            f"--pretrained {pretrained}: the repository's open_clip_config.json cannot be read "
            f"({str(error)[:160]})"
        ) from None


def hf_text_encoder(name: str) -> str | None:
    """The Hugging Face text encoder that open_clip builds as ``name``'s text tower (e.g.
    ``"xlm-roberta-base"``), or None where the tower is open_clip's own ``TextTransformer``; read
    from the model's config, so before any weights load."""
    register_model_configs()
    text = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    return text.get("hf_model_name") or None


def text_tower(clip: nn.Module) -> nn.Module | None:
    """The module holding the text transformer's parts (``token_embedding``,
    ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``, ``attn_mask``):
    the ``CLIP`` itself, or the ``TextTransformer`` of a ``CustomTextCLIP`` (SigLIP, EVA02,
    MobileCLIP, ...) or ``CoCa`` (``clip.text``). None for a tower that takes no token
    embeddings (an HF text encoder)."""
    tower = getattr(clip, "text", None)
    if isinstance(tower, open_clip.transformer.TextTransformer):
        return tower
    return clip if hasattr(clip, "token_embedding") else None


def token_embedding(clip: nn.Module) -> nn.Embedding:
    """The text tower's token embedding (vocabulary, width); a ``TypeError`` for a tower that
    takes no token embeddings."""
    tower = text_tower(clip)
    if tower is None:
        raise TypeError(
            f"{type(clip).__name__}'s text tower ({type(clip.text).__name__}) takes no token "
            "embeddings: prompt noise and CoOp's context need open_clip's TextTransformer"
        )
    return tower.token_embedding


def logit_bias(clip: nn.Module) -> torch.Tensor | None:
    """SigLIP's learned logit bias (logits are ``exp(logit_scale) * cos + logit_bias``), or None
    for a model without one (CLIP's logits are ``exp(logit_scale) * cos``)."""
    return getattr(clip, "logit_bias", None)


def preprocessing_of(clip: nn.Module) -> Preprocessing:
    """The image preprocessing ``clip``'s weights expect: open_clip's ``preprocess_cfg`` (set by
    ``create_model`` per pretrained tag: mean, std, interpolation, resize mode), or OpenAI's at
    the image tower's size for a model that carries none."""
    config = getattr(clip.visual, "preprocess_cfg", None)
    if config is None:
        return Preprocessing(size=clip.visual.image_size)
    return Preprocessing.from_config(config)


def encode_image(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, D) raw image features of ``images`` (B, 3, H, W): the image tower's pooled output, as
    ``encode_image(normalize=False)`` gives it (CoCa's tower also returns its tokens, and CoCa's
    ``encode_image`` normalizes). Calls ``clip.visual``, so that a tower replaced by the identity
    (``evaluation.features_in_place_of_images``) passes features through on every family."""
    features = clip.visual(images)
    return features[0] if isinstance(features, tuple) else features


def encode_text(clip: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """(C, D) raw text features of ``token_ids`` (C, context) by the tower's own ``encode_text``,
    not normalized (CoCa's normalizes unless told not to)."""
    return clip.encode_text(token_ids, normalize=False)


def encode_text_embeddings(
    clip: nn.Module, embeddings: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """The text tower's ``encode_text`` from token embeddings (C, context, width) instead of token
    ids (C, context), as open_clip's ``TextTransformer.forward`` (or ``CLIP.encode_text``) does
    it: CoCa's class token appended, the positional embedding, the causal mask (none with
    ``no_causal_mask``) plus the padding mask where the tower uses one, the transformer,
    ``ln_final`` and pooling by ``pool_type`` ("argmax", "eos", "last", "first"; CoCa: its class
    token, then ``ln_final``), the projection (a matrix or a Linear). Returns (C, D)."""
    tower = text_tower(clip)
    if tower is None:
        token_embedding(clip)  # the TypeError naming the tower
    if tower is clip:
        pool_type, eos_id = clip.text_pool_type, getattr(clip, "text_eos_id", None)
    else:
        pool_type, eos_id = tower.pool_type, tower.eos_id
    class_embedding = getattr(tower, "cls_emb", None)
    cast_dtype = tower.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype)
    if class_embedding is not None:
        x = torch.cat([x, class_embedding.to(cast_dtype).expand(x.shape[0], 1, -1)], dim=1)
    attn_mask = tower.attn_mask
    if getattr(tower, "use_pad_mask", False) or class_embedding is not None:
        pad_mask = tower._build_additive_mask(token_ids, x.shape[1], x.dtype)
        if attn_mask is None:
            attn_mask = pad_mask
        else:
            attn_mask = attn_mask[: x.shape[1], : x.shape[1]].unsqueeze(0) + pad_mask
    positions = tower.positional_embedding
    if positions.shape[0] != x.shape[1]:
        positions = positions[: x.shape[1]]
    x = x + positions.to(cast_dtype)
    x = tower.transformer(x, attn_mask=attn_mask)
    if class_embedding is not None:
        x = tower.ln_final(x[:, -1])
    else:
        x = tower.ln_final(x)
        x = open_clip.transformer.text_global_pool(x, token_ids, pool_type, eos_token_id=eos_id)
    projection = tower.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else (x @ projection)
    return x
