"""The flags that shape a run: which run-record key, PiNIConfig field or TrainConfig field each
sets, how one is shown in a message, which methods take them, and which runs use PiNI's options
(``ROW_OPTIONS``; docs/spec.md §11). The run record itself is ``pini.runs``."""

from __future__ import annotations

from .config import TABLE1, PiNIConfig
from .errors import InputError
from .methods import METHODS

# PiNIConfig fields settable from the command line, with their flags.
CONFIG_FLAGS = {
    "visual": "--visual",
    "visual_generator": "--visual-generator",
    "text": "--text",
    "text_generator": "--text-generator",
    "mode": "--mode",
    "num_samples": "--num-samples",
    "inference": "--inference",
    "inference_samples": "--inference-samples",
    "precision": "--precision",
    "prompt_noise_draw": "--prompt-noise-draw",
    "prompt_noise_per_step": "--prompt-noise-per-step",
    "text_feature_noise_per_step": "--text-feature-noise-per-step",
    "fixed_prompt": "--fixed-prompt",
    "sigma_activation": "--sigma-activation",
    "scaled_attention": "--scaled-attention",
    "head_init": "--head-init",
}
# What else defines a run (its record's keys), with their flags.
RUN_FLAGS = {
    "model": "--model",
    "pretrained": "--pretrained",
    "root": "--root",
    "dataset": "--dataset",
    "template": "--template",
    "shots": "--shots",
    "seed": "--seed",
}
# TrainConfig fields settable from the command line, with their flags.
TRAIN_FLAGS = {
    "epochs": "--epochs",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "optimizer": "--optimizer",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "warmup_epochs": "--warmup-epochs",
    "warmup_lr": "--warmup-lr",
    "cosine_from": "--cosine-from",
    "drop_last": "--drop-last",
}
# The generators that --scaled-attention changes: (visual, visual_generator) pairs.
ATTENTION_GENERATORS = {
    ("feature", "attention"),
    ("image", "attention"),
    ("image", "attention-pixels"),
}


def _with_output_layers(config: dict) -> bool:
    """Whether a generator of the run has output layers (all but learnable mu and sigma)."""
    return config["visual"] != "none" or (
        config["text"] == "feature" and config["text_generator"] != "embedding"
    )


def _per_step_draw(text: str, noise: str) -> tuple:
    """``ROW_OPTIONS``' entry of the per-step draw of ``text`` noise: used with m > 1."""
    return (
        lambda c: c["text"] == text and c["num_samples"] > 1,
        lambda c: (
            f"shapes {noise} draws over --num-samples m > 1, and this run has none "
            f"(--text {c['text']}, --num-samples {c['num_samples']})"
        ),
    )


# PiNIConfig fields that some runs do not use: whether a run (its pini_config as a dict) uses
# it, and the message for its flag given to one that does not (a flag for an unused option is
# refused; a record reads it as the default, ``unused_defaults``).
ROW_OPTIONS = {
    "prompt_noise_draw": (
        lambda c: c["text"] == "prompt",
        lambda c: f"shapes the prompt noise, and this run has none (--text {c['text']})",
    ),
    "prompt_noise_per_step": _per_step_draw("prompt", "the prompt noise's"),
    "text_feature_noise_per_step": _per_step_draw("feature", "the text-feature noise's"),
    "fixed_prompt": (
        lambda c: c["text"] != "prompt",
        lambda c: (
            "is the prompt of the rows without prompt noise, and this run's prompt carries "
            "noise (--text prompt: PiNI's 16-placeholder prompt)"
        ),
    ),
    "head_init": (
        _with_output_layers,
        lambda c: (
            "initialises the generators' output layers, and this run has none (learnable "
            f"mu and sigma alone: --visual {c['visual']}, --text {c['text']} with "
            f"--text-generator {c['text_generator']})"
        ),
    ),
    "scaled_attention": (
        lambda c: (c["visual"], c["visual_generator"]) in ATTENTION_GENERATORS,
        lambda c: (
            "scales the cross-attention generators, and this run has none "
            f"(--visual {c['visual']}, --visual-generator {c['visual_generator']})"
        ),
    ),
}


READ_BY_ROW_OPTIONS = {"visual", "visual_generator", "text", "text_generator", "num_samples"}


def unused_options(pini_config: dict) -> list[str]:
    """The ``ROW_OPTIONS`` a run with ``pini_config`` (a dict of PiNIConfig's fields) does not
    use."""
    return [key for key, (uses, _) in ROW_OPTIONS.items() if not uses(pini_config)]


def unused_defaults(pini_config: dict) -> dict:
    """The options a run with ``pini_config`` does not use (``ROW_OPTIONS``), with the value a
    new record of that run holds (the default, since a flag for one is refused)."""
    defaults = PiNIConfig()
    return {key: getattr(defaults, key) for key in unused_options(pini_config)}


def given_options(args, keys) -> dict:
    """The options among ``keys`` that the user gave (not None)."""
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}


def config_request(args) -> dict:
    """PiNIConfig fields the user asked for: the ``--noise`` row's, then explicit flags."""
    request = dict(TABLE1[args.noise]) if args.noise else {}
    request.update(given_options(args, CONFIG_FLAGS))
    return request


def flag_for(key: str, args) -> str:
    """The flag that set ``key`` (a run-record key or a config field), e.g. ``--lr``, or
    ``--noise image (visual)`` where a ``--noise`` row did."""
    if key in CONFIG_FLAGS and getattr(args, key, None) is None and args.noise:
        return f"--noise {args.noise} ({key})"
    return CONFIG_FLAGS.get(key) or RUN_FLAGS.get(key) or TRAIN_FLAGS.get(key) or f"--{key}"


def shown(flag: str, value) -> str:
    """A flag as typed: ``--lr 0.01``; a switch as ``--scaled-attention`` or
    ``--no-scaled-attention``."""
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"


def _method_flags_given(args) -> list[str]:
    """The PiNI-only flags the user gave (noise options, --template, --precision)."""
    flags = [CONFIG_FLAGS[key] for key in given_options(args, CONFIG_FLAGS)]
    if getattr(args, "noise", None):
        flags.insert(0, "--noise")
    if getattr(args, "template", None) is not None:
        flags.append("--template")
    return flags


def check_method_flags(args, methods: list[str], *, sweep: bool = False) -> None:
    """PiNI's flags need a pini run, training flags a trained method (``methods``: the run's
    method, or the sweep's ``--methods``)."""
    pini_flags = _method_flags_given(args)
    if pini_flags and "pini" not in methods:
        flags = ", ".join(pini_flags)
        plural = len(pini_flags) > 1
        if sweep:
            raise InputError(
                f"{flags}: PiNI's option{'s' if plural else ''}, but --methods has no pini"
            )
        raise InputError(
            f"{flags} {'are' if plural else 'is'} PiNI's option{'s' if plural else ''}; "
            f"--method {methods[0]} has none"
        )
    train_flags = [TRAIN_FLAGS[key] for key in given_options(args, TRAIN_FLAGS)]
    if getattr(args, "eval_every", None):
        train_flags.append("--eval-every")
    if getattr(args, "tensorboard", False):
        train_flags.append("--tensorboard")
    if train_flags and not any(METHODS[method].trains for method in methods):
        raise InputError(
            f"{', '.join(train_flags)}: {', '.join(methods)} "
            f"{'is' if len(methods) == 1 else 'are'} not trained (fitted or zero-shot)"
        )
