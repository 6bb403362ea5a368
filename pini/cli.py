"""``pini train``, ``pini eval`` and ``pini sweep`` (also ``python -m pini``).

With no dataset arguments, ``pini train`` trains the tiny model on the bundled digits dataset on
the CPU and prints zero-shot vs PiNI accuracy. The paper's protocol, for a user with CLIP weights
and the CoOp datasets:

    pini train --model ViT-B-16 --pretrained openai --root DATA --dataset oxford_pets \\
        --shots 16 --seed 1 --noise feature+prompt --output runs/pets-16-1

``--method`` runs one of the paper's baselines instead (``pini.baselines``) on the same backbone,
split, preprocessing, evaluation and run folder; ``pini sweep`` runs methods x datasets x shots
x seeds and writes the paper's Table 2 and Fig. 5 (``pini.sweep``).

A run folder holds one run: ``run.json`` (what the run is: method, model, data, every resolved
option), the few-shot split with a fingerprint of the images it was drawn from, ``metrics.jsonl``,
``checkpoint.pt`` and ``summary.json``. A new run never writes into a folder that holds
something (``--overwrite`` replaces a run), ``--resume`` continues exactly the stored run (a flag
that differs is an error), and ``eval`` rebuilds the model from the checkpoint. Every problem
with what the user gave is one line on stderr and exit status 2 (``--debug`` shows the
traceback).

Frozen image features are encoded once per process where that is exact (``FEATURES``): the test
set of every method except PiNI with image-level noise, and the few-shot, validation and
augmented cache images of the linear probe and Tip-Adapter. Training with augmentations
encodes each epoch's crops anew.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import baselines, demo
from .backbone import build_clip, check_weights, has_vit_image_tower, register_model_configs
from .config import INFERENCE_MODES, TABLE1, PiNIConfig
from .data import FeatureCache, clip_transforms, encode_samples, few_shot, load_dataset
from .datasets import listing_fingerprint, sample_id
from .errors import InputError, RunDiverged
from .files import write_text_atomically
from .model import PiNI
from .sweep import METHOD_NAMES, mean_and_interval  # noqa: F401 (cli.mean_and_interval)
from .train import (
    CHECKPOINT,
    METRICS,
    TrainConfig,
    distributed_rank_world,
    evaluate,
    load_checkpoint,
    read_checkpoint,
    save_fitted_checkpoint,
    train,
    update_checkpoint_state,
)

# `--method`: PiNI and the paper's baselines (pini/baselines.py).
METHODS = ("pini", *baselines.METHODS)
# Trained with pini.train.train (epochs, lr, batch size, checkpoints per epoch, exact resume);
# the others are built (zero-shot CLIP) or fitted on frozen features.
TRAINED_METHODS = ("pini", "coop", "clip-adapter", "tip-adapter-f")
# Methods that choose hyper-parameters on a validation split (C; alpha and beta).
VALIDATED_METHODS = ("linear-probe", "tip-adapter", "tip-adapter-f")
# The validation split: CoOp's datasets draw min(K, 4) shots per class from the val part.
VALIDATION_SHOTS = 4

# The embedded default run: tiny model, digits. Each trained method's epochs and lr on the demo
# come from its training loss (the final model's, over 5 seeded augmented passes of its shots;
# seeds 1 and 2, 4 and 16 shots, 50 to 400 epochs, a grid of lr; README, "Baselines and the
# paper's comparison"): the paper's epochs where the loss is then within about 2.5% of that of
# twice as many, at the lr with the lowest loss. CoOp is flat from 50 epochs at any lr, so it
# keeps its own settings; Tip-Adapter-F's loss has no plateau (its keys memorize the shots);
# every other setting is the method's own (``training_defaults``).
DEFAULT_EPOCHS_EMBEDDED = 200
DEFAULT_LR_EMBEDDED = 0.01
DEMO_TRAINING = {
    "pini": dict(epochs=DEFAULT_EPOCHS_EMBEDDED, lr=DEFAULT_LR_EMBEDDED, batch_size=32),
    # lr 100x CoOp's: at 0.002 the adapter barely moves (loss 1.41 -> 1.36 in 200 epochs)
    "clip-adapter": dict(epochs=200, lr=0.2),
    # lr 10x, epochs 5x Tip-Adapter-F's: its 20 epochs at batch 256 are 20 steps on the demo
    "tip-adapter-f": dict(epochs=100, lr=0.01),
}
DEFAULT_ROW = "feature+prompt"
RUN_FILE = "run.json"
SUMMARY = "summary.json"
RUN_FORMAT = "pini-run/1"
MAX_SEED = 1 << 62

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
    "sigma_activation": "--sigma-activation",
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
TRAIN_FLAGS = {"epochs": "--epochs", "lr": "--lr", "batch_size": "--batch-size"}


# --- arguments --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(convert, accept, expected: str):
    """An argparse ``type``: ``convert`` the text, then ``accept`` the value, else one error
    line saying what was ``expected`` and what came."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda value: value >= 0, "an integer >= 0")
_positive_float = _checked(
    float, lambda value: math.isfinite(value) and value > 0, "a positive number"
)
_seed = _checked(int, lambda value: 0 <= value < MAX_SEED, "a seed in [0, 2^62)")


# How long a rank waits in a collective (gloo's and NCCL's defaults are 30 and 10 minutes): a
# rank that died or hangs stops the others this soon. Rank 0 alone evaluates (zero-shot before
# training, --eval-every during it) while the others wait, so it must cover those evaluations.
DISTRIBUTED_TIMEOUT_MINUTES = 15.0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pini", description="PiNI few-shot fine-tuning of CLIP")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    general = _Parser(add_help=False)
    general.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    general.add_argument("--per-class", action="store_true", help="print per-class accuracy")
    general.add_argument("--no-progress", action="store_true", help="no progress bars")
    general.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    data = _Parser(add_help=False)
    data.add_argument("--root", default=None, help="datasets folder (none: bundled digits)")
    data.add_argument("--dataset", default=None, help="dataset folder name, e.g. oxford_pets")

    model = _Parser(add_help=False)
    model.add_argument(
        "--model",
        default=None,
        help="open_clip model name (default: the demo's tiny CLIP on the bundled digits, "
        "else ViT-B-16)",
    )
    model.add_argument(
        "--pretrained",
        default=None,
        help="CLIP weights: a local file, an open_clip pretrained tag (openai, "
        "laion2b_s34b_b88k, ...) or hf-hub:org/name; tags are downloaded and cached by "
        "open_clip (offline: read from the cache)",
    )
    model.add_argument(
        "--trusted",
        action="store_true",
        help="allow OpenAI TorchScript archives (runs code from the file)",
    )
    model.add_argument("--template", default=None, help="prompt template (default by dataset)")
    model.add_argument(
        "--noise",
        default=None,
        choices=list(TABLE1),
        help=f"a row of the paper's Table 1, filling --visual, --visual-generator, --text and "
        f"--text-generator (default {DEFAULT_ROW}); explicit flags override it",
    )
    model.add_argument("--visual", default=None, choices=["none", "image", "feature"])
    model.add_argument(
        "--visual-generator",
        default=None,
        help="image: cnn (the paper's residual CNN), attention (the paper's, on CLIP's patch "
        "tokens), mlp, cnn-light, attention-pixels; feature: attention (the paper's), mlp",
    )
    model.add_argument("--text", default=None, choices=["none", "prompt", "feature"])
    model.add_argument(
        "--text-generator", default=None, help="prompt: embedding; feature: embedding, mlp"
    )
    model.add_argument("--mode", default=None, choices=["add", "mul"], help="default add")
    model.add_argument(
        "--num-samples", type=_positive_int, default=None, help="noise samples m (default 1)"
    )
    model.add_argument(
        "--inference", default=None, choices=INFERENCE_MODES, help="default sample (the paper)"
    )
    model.add_argument(
        "--inference-samples",
        type=_positive_int,
        default=None,
        help="draws averaged by --inference average (default 8)",
    )
    model.add_argument(
        "--prompt-noise-draw",
        default=None,
        choices=["shared", "per-class"],
        help="prompt noise: one draw per sample shared by every class (the paper, default) or "
        "one per class",
    )
    model.add_argument(
        "--sigma-activation",
        default=None,
        choices=["abs", "softplus"],
        help="sigma from the generators' output: abs (the authors', default) or softplus",
    )
    model.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="the frozen towers' precision (autocast); the generators stay fp32",
    )

    run = _Parser(add_help=False)
    run.add_argument("--epochs", type=_positive_int, default=None)
    run.add_argument("--lr", type=_positive_float, default=None)
    run.add_argument("--batch-size", type=_positive_int, default=None, help="default 32")
    run.add_argument("--workers", type=_non_negative_int, default=0, help="data loader workers")
    run.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="also evaluate on the test set every N epochs, recorded in metrics.jsonl",
    )
    run.add_argument(
        "--timeout",
        type=_positive_float,
        default=DISTRIBUTED_TIMEOUT_MINUTES,
        help="under torchrun: minutes a rank waits for the others before the run stops with an "
        f"error (default {DISTRIBUTED_TIMEOUT_MINUTES:g}; raise it when rank 0's evaluations "
        "take longer)",
    )
    run.add_argument("--output", default=None, help="run folder (default runs/<dataset>-...)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --output")
    again.add_argument(
        "--overwrite", action="store_true", help="replace the run in --output (its files are lost)"
    )

    one = _Parser(add_help=False)
    one.add_argument("--shots", type=_positive_int, default=None, help="shots per class (16)")
    one.add_argument("--seed", type=_seed, default=None, help="run seed (default 1)")

    train_parser = commands.add_parser(
        "train", parents=[general, data, model, one, run], help="train and evaluate one run"
    )
    train_parser.add_argument(
        "--method",
        default=None,
        choices=METHODS,
        help="pini (default) or one of the paper's baselines on the same backbone, split and "
        "evaluation; --noise and the other noise flags are PiNI's",
    )
    # eval, visualize and interpret rebuild the model a run's checkpoint stores.
    stored = _Parser(add_help=False)
    stored.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt")
    commands.add_parser(
        "eval",
        parents=[general, data, model, stored],
        help="evaluate a run's checkpoint (on its own data, or another dataset via --root and "
        "--dataset)",
    )
    draw = commands.add_parser(
        "visualize",
        parents=[general, data, model, stored],
        help="draw a run's learned noise (PNGs in its run folder)",
        description="Draw a run's learned noise into its run folder: image-level noise (the "
        "paper's Fig. 4: image, |mu|, |sigma|, a noise sample, the noisy image), feature-level "
        "mu and sigma, and prompt noise per template position.",
    )
    draw.add_argument("--images", type=_positive_int, default=4, help="test images (4)")
    draw.add_argument("--seed", type=_seed, default=0, help="the noise draw shown (0)")
    words = commands.add_parser(
        "interpret",
        parents=[general, model, stored],
        help="the vocabulary words nearest to a run's noisy prompts (the paper's Table 8)",
        description="For --draws noise samples, the --top vocabulary tokens nearest to the noisy "
        "prompt embedding at each template position, with how often each appears; printed and "
        "written to RUN/interpretation.md.",
    )
    words.add_argument("--draws", type=_positive_int, default=100, help="noise draws (100)")
    words.add_argument("--top", type=_positive_int, default=5, help="tokens per position (5)")
    words.add_argument("--seed", type=_seed, default=0, help="seed of the draws (0)")
    curves = commands.add_parser(
        "plot",
        parents=[general],
        help="loss, learning rate and accuracy of runs against the epoch (a PNG)",
    )
    curves.add_argument("runs", nargs="+", help="run folders")
    curves.add_argument("--output", default=None, help="the PNG (default FIRST_RUN/curves.png)")
    sweep = commands.add_parser(
        "sweep",
        parents=[general, data, model, run],
        help="methods x datasets x shots x seeds: the paper's Table 2 and Fig. 5, mean and 95%% "
        "interval",
        description="Train and evaluate one run per method, dataset, shot count and seed (run "
        "folders OUTPUT/<dataset>/<method>/<K>shot-seed<S>, default OUTPUT runs/sweep); a run "
        "already finished with the same configuration is skipped, an unfinished one resumed, "
        "one with another configuration is an error (--overwrite replaces every run). Writes "
        "OUTPUT/sweep.md (mean accuracy and its 95% interval over seeds per method and dataset, "
        "PiNI's gain over each baseline), sweep.png (accuracy against shots) and sweep.json. "
        "Noise flags apply to the pini runs; --epochs, --lr and --batch-size to every trained "
        "method. With no --root: every method on the bundled digits.",
    )
    sweep.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="methods (default: all)",
    )
    sweep.add_argument(
        "--datasets", nargs="+", default=None, help="dataset folder names under --root"
    )
    sweep.add_argument(
        "--shot-list",
        type=_positive_int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="shots per class (default 1 2 4 8 16)",
    )
    sweep.add_argument(
        "--seeds", type=_seed, nargs="+", default=[1, 2, 3], help="seeds (default 1 2 3)"
    )
    return parser


def _given(args, keys) -> dict:
    """The options among ``keys`` that the user gave (not None)."""
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}


# --- resolving what a run is ------------------------------------------------------------------


def _config_request(args) -> dict:
    """PiNIConfig fields the user asked for: the ``--noise`` row's, then explicit flags."""
    request = dict(TABLE1[args.noise]) if args.noise else {}
    request.update(_given(args, CONFIG_FLAGS))
    return request


def _flag_for(key: str, args) -> str:
    if key in CONFIG_FLAGS and getattr(args, key, None) is None and args.noise:
        return f"--noise {args.noise} ({key})"
    return CONFIG_FLAGS.get(key) or RUN_FLAGS.get(key) or TRAIN_FLAGS.get(key) or f"--{key}"


def _pini_config(request: dict) -> PiNIConfig:
    base = dict(TABLE1[DEFAULT_ROW])
    base.update(request)
    try:
        return PiNIConfig(**base)
    except ValueError as error:
        raise InputError(str(error)) from None


def _row_name(config: PiNIConfig) -> str:
    """The Table 1 row this configuration is, or "custom"."""
    fields = dataclasses.asdict(config)
    for row, values in TABLE1.items():
        if all(fields[key] == value for key, value in values.items()) and all(
            fields[key] == "none" for key in ("visual", "text") if key not in values
        ):
            return row
    return "custom"


def _resolve_root(root: str | None) -> str | None:
    return None if root is None else str(Path(root).expanduser().resolve())


def _resolve_pretrained(pretrained: str | None) -> str | None:
    """A local file as its absolute path; a tag or hf-hub name as given."""
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    return str(path.resolve()) if path.is_file() else pretrained


def _check_data_args(args) -> None:
    if args.root is None and args.dataset not in (None, "digits"):
        raise InputError(
            f"--dataset {args.dataset} needs --root, the folder that holds the datasets "
            "(without both, pini uses the bundled digits)"
        )
    if args.root is not None and not Path(args.root).expanduser().is_dir():
        raise InputError(f"--root {args.root}: no such folder")


def _load_split(root: str | None, dataset: str | None, *parts: str):
    """The dataset, with images in each of ``parts`` ("train", "test") or an ``InputError``."""
    split = load_dataset(root, dataset)
    split.require(*parts)
    if "train" in parts and len(split.classnames) < 2:
        raise InputError(
            f"dataset {split.name} has one class ({split.classnames[0]}): training a classifier "
            "needs at least two (every prediction would be right)"
        )
    return split


def _template(run: dict, split) -> str:
    from .prompts import template_for

    return run["template"] or template_for(split.name)


def _zero_shot_template(split) -> str:
    from .prompts import zero_shot_template

    return zero_shot_template(split.name)


def _random_weights(run: dict) -> bool:
    """A backbone without CLIP weights: pini-tiny at random, seeded by the run's seed."""
    return run["pretrained"] is None and not run["demo_backbone"]


def _backbone(run: dict, device: str, progress: bool, trusted: bool):
    """(clip, tokenizer): the run's frozen backbone; a random-weight one is seeded by the run's
    seed, so it is the same in every process, cached demo backbone or not. A weights file must
    be the one the run started with (its SHA-256); ``trusted`` is the current command's
    ``--trusted``, never the run's."""
    torch.manual_seed(run["seed"])
    if run["demo_backbone"]:
        clip, tokenizer = demo.digits_clip(demo.DEFAULT_CACHE, progress=progress)
    else:
        expected = run.get("pretrained_sha256")
        if expected is not None:
            found = _weights_digest(run["pretrained"])
            if found != expected:
                now = "is gone" if found is None else f"has SHA-256 {found[:16]}..."
                raise InputError(
                    f"the weights file {run['pretrained']} {now}, but the run was made with "
                    f"SHA-256 {expected[:16]}...: it was replaced since. Put the original back, "
                    "or start a new run with these weights"
                )
        clip, tokenizer = build_clip(run["model"], run["pretrained"], trusted=trusted,
                                     device=device)  # fmt: skip
    return clip.to(device), tokenizer


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> SHA-256, hashed once per process


def _weights_digest(pretrained: str | None) -> str | None:
    """The SHA-256 of a local weights file (None for a tag, an hf-hub name or a missing file)."""
    if pretrained is None or not Path(pretrained).is_file():
        return None
    path = Path(pretrained)
    status = path.stat()
    key = (str(path), status.st_size, status.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as weights:
            for block in iter(lambda: weights.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _build_method(run: dict, split, clip, tokenizer, cache=None, stored=None):
    """The run's method on the backbone: PiNI with the run's configuration, a baseline module,
    or a fitted method (``LinearProbe``, ``TipAdapter``), not yet fitted. The method's own
    initialisation is seeded by the run's seed. Tip-Adapter-F needs its cache: ``cache``
    (features (views, N, D), labels (N,)) for a new run, else a checkpoint's state ``stored``
    to size it (its keys are then loaded from that state)."""
    method, classnames = run["method"], list(split.classnames)
    options = dict(run["method_config"])
    zero_shot_template = _zero_shot_template(split)
    device = clip.token_embedding.weight.device
    torch.manual_seed(run["seed"])  # the method's initialisation: independent of the backbone
    if method == "pini":
        model = PiNI(
            clip,
            tokenizer,
            classnames,
            _template(run, split),
            PiNIConfig(**run["pini_config"]),
            zero_shot_template=zero_shot_template,
        )
        return model.to(device)
    if method == "zero-shot":
        return baselines.ZeroShotCLIP(clip, tokenizer, classnames, zero_shot_template)
    if method == "coop":
        return baselines.CoOp(
            clip, tokenizer, classnames, zero_shot_template=zero_shot_template, **options
        )
    if method == "clip-adapter":
        return baselines.CLIPAdapter(clip, tokenizer, classnames, zero_shot_template, **options)
    if method == "linear-probe":
        options["coarse_grid"] = tuple(options["coarse_grid"])
        return baselines.LinearProbe(len(classnames), **options)
    if method == "tip-adapter":
        return baselines.TipAdapter(clip, tokenizer, classnames, zero_shot_template, **options)
    if cache is None:  # Tip-Adapter-F rebuilt to load a checkpoint: keys of the stored shape
        shape = stored["generators"]["cache_keys"].shape
        cache = torch.zeros(shape), torch.zeros(shape[0], dtype=torch.long)
    return baselines.TipAdapterF(
        clip, tokenizer, classnames, *cache, zero_shot_template, **options
    ).to(device)


def _build_model(run: dict, split, device: str, progress: bool) -> PiNI:
    """The frozen backbone and PiNI (or the run's baseline module) with the run's
    configuration; seeded by the run's seed so a random-weight backbone and the generators'
    initialisation are the same in every process, cached demo backbone or not."""
    clip, tokenizer = _backbone(run, device, progress, trusted=False)
    return _build_method(run, split, clip, tokenizer)


def _method_flags_given(args) -> list[str]:
    """The PiNI-only flags the user gave (noise options, --template, --precision)."""
    flags = [CONFIG_FLAGS[key] for key in _given(args, CONFIG_FLAGS)]
    if getattr(args, "noise", None):
        flags.insert(0, "--noise")
    if getattr(args, "template", None) is not None:
        flags.append("--template")
    return flags


def _check_method_flags(args, methods: list[str], *, sweep: bool = False) -> None:
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
    train_flags = [TRAIN_FLAGS[key] for key in _given(args, TRAIN_FLAGS)]
    if getattr(args, "eval_every", None):
        train_flags.append("--eval-every")
    if train_flags and not any(method in TRAINED_METHODS for method in methods):
        raise InputError(
            f"{', '.join(train_flags)}: {', '.join(methods)} "
            f"{'is' if len(methods) == 1 else 'are'} not trained (fitted or zero-shot)"
        )


def _train_config(args, method: str, shots: int, seed: int, split) -> dict | None:
    """The run's TrainConfig fields (None for a method that is not trained): the flags, else
    the demo's settings (DEMO_TRAINING) on the embedded default, else the method's paper's."""
    if method not in TRAINED_METHODS:
        return None
    embedded = args.root is None
    if method == "pini":
        large = len(split.classnames) >= 1000
        defaults = dict(epochs=100 if large else 200, lr=0.001 if large else 0.002, batch_size=32)
    else:
        defaults = baselines.training_defaults(method, shots, split.name)
        defaults.pop("crop_scale")
    if embedded:
        defaults.update(DEMO_TRAINING.get(method, {}))
    defaults.update(_given(args, TRAIN_FLAGS))
    config = TrainConfig(**defaults, seed=seed)
    return {
        key: value
        for key, value in dataclasses.asdict(config).items()
        if key not in ("num_workers", "progress")
    }


def _crop_scale(method: str, embedded: bool) -> list[float] | None:
    """The random resized crop's scale range of the run's training images (or Tip-Adapter's
    augmented cache); None where no image is augmented."""
    if method in ("zero-shot", "linear-probe"):
        return None
    if embedded:  # the demo's 32-pixel digits keep at least half of each image in a crop
        return list(demo.CROP_SCALE)
    if method == "pini":
        return [0.08, 1.0]  # Dassl's default, the authors' code base
    trained_like = "tip-adapter-f" if method == "tip-adapter" else method
    return list(baselines.training_defaults(trained_like, 1)["crop_scale"])


def _method_config(method: str) -> dict:
    """The method's options (its dataclass's defaults); PiNI's are its pini_config."""
    configs = {
        "zero-shot": baselines.ZeroShotConfig,
        "linear-probe": baselines.LinearProbeConfig,
        "coop": baselines.CoOpConfig,
        "clip-adapter": baselines.CLIPAdapterConfig,
        "tip-adapter": baselines.TipAdapterConfig,
        "tip-adapter-f": baselines.TipAdapterConfig,
    }
    if method == "pini":
        return {}
    return json.loads(json.dumps(dataclasses.asdict(configs[method]())))


def _new_run(args, shots: int | None, seed: int | None, split, method: str | None = None) -> dict:
    """The record of a new run from the arguments and the defaults (PiNI, 16 shots, seed 1).
    ``method``: the sweep's (else ``--method``); PiNI's flags only shape a pini run."""
    method = method or getattr(args, "method", None) or "pini"
    shots = 16 if shots is None else shots
    seed = 1 if seed is None else seed
    embedded = args.root is None
    config = _pini_config(_config_request(args)) if method == "pini" else None
    demo_backbone = embedded and args.model is None and args.pretrained is None
    model_name = args.model or ("pini-tiny" if embedded else "ViT-B-16")
    if args.pretrained is None and model_name != "pini-tiny":
        raise InputError(
            f"--pretrained is needed for {model_name}: without CLIP weights the model is random "
            "and its accuracy meaningless (e.g. --pretrained openai, or a weights file)"
        )
    check_weights(model_name, args.pretrained)
    reads_patches = config and (config.visual, config.visual_generator) == ("image", "attention")
    if reads_patches and not has_vit_image_tower(model_name):
        raise InputError(
            f"--visual-generator attention (image noise) reads the patch tokens of a ViT image "
            f"tower, and {model_name}'s is not one: use --visual-generator attention-pixels (any "
            "tower), cnn, cnn-light or mlp"
        )
    return {
        "format": RUN_FORMAT,
        "method": method,
        "model": model_name,
        "pretrained": _resolve_pretrained(args.pretrained),
        "pretrained_sha256": _weights_digest(_resolve_pretrained(args.pretrained)),
        "demo_backbone": demo_backbone,
        "root": _resolve_root(args.root),
        "dataset": split.name,
        "template": args.template if method == "pini" else None,
        "classnames": list(split.classnames),
        "shots": shots,
        "seed": seed,
        "noise": _row_name(config) if config else None,
        "pini_config": dataclasses.asdict(config) if config else None,
        "method_config": _method_config(method),
        "crop_scale": _crop_scale(method, embedded),
        "train_config": _train_config(args, method, shots, seed, split),
    }


def _check_record(run: dict, source) -> None:
    """A stored run record against its schema: one ``InputError`` naming the file, the key and
    what was expected (a record edited by hand gave tracebacks, or silently a run of other
    options: a missing key taking its default, a fractional or negative seed)."""

    def fail(key: str, expected: str) -> None:
        value = run.get(key, "<missing>") if "." not in key else "<see the key>"
        raise InputError(f"run record {source}: {key!r} must be {expected}, got {value!r}")

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def text_or_none(key: str) -> None:
        if key not in run or not (run[key] is None or isinstance(run[key], str)):
            fail(key, "a string or null")

    if run.get("method") not in METHODS:
        fail("method", f"one of {', '.join(METHODS)}")
    if not isinstance(run.get("model"), str):
        fail("model", "an open_clip model name")
    for key in ("pretrained", "pretrained_sha256", "root", "template", "noise"):
        text_or_none(key)
    if not isinstance(run.get("demo_backbone"), bool):
        fail("demo_backbone", "true or false")
    try:
        check_weights(run["model"], None)
    except InputError:
        fail("model", "an open_clip model name")
    if run["pretrained"] is None and run["model"] != "pini-tiny" and not run["demo_backbone"]:
        fail("pretrained", f"CLIP weights for {run['model']} (without them it is random)")
    if not isinstance(run.get("dataset"), str):
        fail("dataset", "a dataset name")
    classes = run.get("classnames")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        fail("classnames", "a non-empty list of class names")
    if not integer(run.get("shots")) or run["shots"] < 1:
        fail("shots", "an integer >= 1")
    if not integer(run.get("seed")) or not 0 <= run["seed"] < MAX_SEED:
        fail("seed", "an integer in [0, 2^62)")
    crop = run.get("crop_scale")
    if crop is not None and not (
        isinstance(crop, list) and len(crop) == 2
        and all(isinstance(v, (int, float)) and 0 < v <= 1 for v in crop) and crop[0] <= crop[1]
    ):  # fmt: skip
        fail("crop_scale", "null or [low, high] with 0 < low <= high <= 1")
    if not isinstance(run.get("method_config"), dict):
        fail("method_config", "an object")
    sections = (("pini_config", PiNIConfig, run["method"] == "pini", ()),
                ("train_config", TrainConfig, run["method"] in TRAINED_METHODS,
                 ("num_workers", "progress")))  # fmt: skip
    for key, config, needed, runtime in sections:
        section = run.get(key)
        if not needed:
            if section is not None:
                fail(key, f"null for a {run['method']} run")
            continue
        fields = {field.name for field in dataclasses.fields(config)} - set(runtime)
        if not isinstance(section, dict) or set(section) != fields:
            given = set(section) if isinstance(section, dict) else set()
            missing, extra = sorted(fields - given), sorted(given - fields)
            fail(key, f"an object with every option of the run (missing {missing or 'none'}, "
                      f"unknown {extra or 'none'})")  # fmt: skip
        try:
            config(**section)
        except (InputError, TypeError, ValueError) as error:
            raise InputError(f"run record {source}: {key!r}: {error}") from None


def _normalized_run(run: dict, source=None) -> dict:
    """A stored run record with the keys this version added filled as that run had them: runs
    before ``--method`` were PiNI runs with Dassl's crops (the demo's on the digits) and SGD.
    ``source``: the file it was read from; the record is then checked (``_check_record``)."""
    run = dict(run)
    run.pop("trusted", None)  # runs before the weights' hash stored --trusted; now per command
    run.setdefault("pretrained_sha256", None)
    run.setdefault("method", "pini")
    run.setdefault("method_config", {})
    if "crop_scale" not in run:
        run["crop_scale"] = _crop_scale(run["method"], run.get("root") is None)
    if source is not None:
        _check_record(run, source)
    if run.get("train_config") is not None:
        stored = {**run["train_config"], "num_workers": 0, "progress": False}
        run["train_config"] = {
            key: value
            for key, value in dataclasses.asdict(TrainConfig(**stored)).items()
            if key not in ("num_workers", "progress")
        }
    return json.loads(json.dumps(run))


def _requested(args, shots: int | None, seed: int | None) -> dict:
    """What the user asked for explicitly, normalised like a run record's values."""
    request = {}
    for key in RUN_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            request[key] = value
    if "root" in request:
        request["root"] = _resolve_root(request["root"])
    if "pretrained" in request:
        request["pretrained"] = _resolve_pretrained(request["pretrained"])
    if shots is not None:
        request["shots"] = shots
    if seed is not None:
        request["seed"] = seed
    return request


def _differences(stored: dict, args, shots=None, seed=None, keys=None) -> list[str]:
    """``--flag given`` vs the stored run, for every option the user gave that differs."""
    found = []
    method = stored.get("method", "pini")
    if getattr(args, "method", None) and args.method != method:
        found.append(f"--method {args.method} (the run has {method})")
    requested = _requested(args, shots, seed)
    for key, value in requested.items():
        if keys is not None and key not in keys:
            continue
        if key == "dataset":
            continue  # compared through the loaded split's canonical name
        if key == "template" and method != "pini":
            found.append(f"--template {value} (the run is {method}, which has no template)")
        elif stored.get(key) != value:
            found.append(f"{_flag_for(key, args)} {value} (the run has {stored.get(key)})")
    for key, value in _config_request(args).items():
        if method != "pini":
            found.append(f"{_flag_for(key, args)} {value} (the run is {method}: no PiNI options)")
        elif stored["pini_config"].get(key) != value:
            found.append(
                f"{_flag_for(key, args)} {value} (the run has {stored['pini_config'].get(key)})"
            )
    if keys is None:
        train_config = stored.get("train_config")
        for key in TRAIN_FLAGS:
            value = getattr(args, key, None)
            if value is None:
                continue
            if train_config is None:
                found.append(f"{TRAIN_FLAGS[key]} {value} (the run is {method}, not trained)")
            elif train_config.get(key) != value:
                found.append(f"{TRAIN_FLAGS[key]} {value} (the run has {train_config.get(key)})")
    return found


def _record_differences(stored: dict, requested: dict) -> list[str]:
    """What differs between two run records, one short item per key."""
    found = []
    for key in sorted(set(stored) | set(requested)):
        old, new = stored.get(key), requested.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            for field in sorted(set(old) | set(new)):
                if old.get(field) != new.get(field):
                    found.append(f"{key}.{field} {old.get(field)} -> {new.get(field)}")
        elif key == "classnames":
            found.append("the class list")
        else:
            found.append(f"{key} {old} -> {new}")
    return found


def _stored_run(folder: Path) -> dict | None:
    """The record of the run in ``folder``: from its checkpoint, else from run.json."""
    checkpoint = folder / CHECKPOINT
    if checkpoint.exists():
        run = read_checkpoint(checkpoint).get("run")
        if isinstance(run, dict) and run.get("format") == RUN_FORMAT:
            return _normalized_run(run, checkpoint)
        raise InputError(f"checkpoint {checkpoint} has no run record; it cannot be resumed")
    record = folder / RUN_FILE
    if record.exists():
        try:
            run = json.loads(record.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{record} cannot be read ({error})") from None
        if isinstance(run, dict) and run.get("format") == RUN_FORMAT:
            return _normalized_run(run, record)
        raise InputError(f"{record} is not a run record this version wrote")
    return None


# --- run folders ------------------------------------------------------------------------------

OWN_FILES = (RUN_FILE, CHECKPOINT, METRICS, SUMMARY)
# Every file pini writes goes first to NAME.tmp, then replaces NAME: a write that failed (disk
# full, Ctrl-C) leaves at most these, which are pini's own and hold nothing worth keeping.
TEMPORARY_FILES = (*(name + ".tmp" for name in OWN_FILES), ".write-test-*")


def _own_files(folder: Path) -> list[Path]:
    return [folder / name for name in OWN_FILES if (folder / name).exists()] + sorted(
        [*folder.glob("split-*shot-seed*.json*"), *_leftovers(folder)]
    )


def _leftovers(folder: Path) -> list[Path]:
    """pini's temporary files in ``folder``, left by a write that failed."""
    return sorted({path for pattern in TEMPORARY_FILES for path in folder.glob(pattern)} |
                  set(folder.glob("split-*shot-seed*.json.tmp")))  # fmt: skip


# Held (flock) by the process writing a run folder, or a sweep's folder, for as long as it runs;
# holds that process's pid. Not part of the run: an otherwise empty folder is still empty.
LOCK_FILE = ".pini-lock"
_LOCKS: dict[Path, object] = {}  # folder -> its open, locked lock file


def _entries(folder: Path) -> list[Path]:
    """What a folder holds, less pini's lock file and the temporary files of failed writes (a
    folder holding only those is as good as empty)."""
    leftovers = set(_leftovers(folder))
    return [path for path in folder.iterdir() if path.name != LOCK_FILE and path not in leftovers]


def _lock(folder: Path) -> None:
    """Takes the folder's exclusive lock for this process (creating the folder): a second pini
    process writing the same run or sweep would interleave its files. The lock goes with the
    process (or ``_unlock``)."""
    import fcntl

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 (held until _unlock)
    except OSError as error:
        raise InputError(f"run folder {folder} is not writable ({error.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise InputError(
            f"{folder} is in use by another pini process (pid {holder}); wait for it to finish, "
            "or use another --output"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCKS[folder] = handle


def _unlock(folder: Path) -> None:
    handle = _LOCKS.pop(Path(folder), None)
    if handle is not None:
        handle.close()  # closing releases the flock


def _check_folder(folder: Path, *, overwrite: bool) -> None:
    """Without side effects: a new run needs an empty (or new) folder, unless ``--overwrite``;
    the folder (or the nearest existing parent) must be a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--output {folder} is a file, not a folder")
    if folder.is_dir() and _entries(folder):
        foreign = sorted(set(_entries(folder)) - set(_own_files(folder)))
        if not overwrite:
            raise InputError(
                f"run folder {folder} is not empty; use --resume to continue its run, "
                "--overwrite to replace it, or another --output"
            )
        if foreign:
            raise InputError(
                f"--overwrite replaces a run, but {folder} also holds other files "
                f"({', '.join(path.name for path in foreign[:3])}); use another --output"
            )
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"run folder {folder} cannot be created: {existing} is not writable")


def _prepare_folder(folder: Path, *, overwrite: bool) -> None:
    """Deletes a replaced run's files (``--overwrite``) and the temporary files of failed
    writes, and creates the folder."""
    if folder.is_dir():
        for path in _own_files(folder) if overwrite else _leftovers(folder):
            path.unlink()
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
    except OSError as error:
        raise InputError(f"run folder {folder} is not writable ({error.strerror})") from None
    finally:
        probe.unlink(missing_ok=True)


def _write_json(path: Path, value: dict) -> None:
    write_text_atomically(path, json.dumps(value, indent=2))


def _default_output(args, shots: int, seed: int) -> Path:
    if args.output:
        return Path(args.output)
    if args.dataset:
        name = args.dataset
    elif args.root is not None:
        name = Path(args.root).expanduser().resolve().name or "data"
    else:
        name = "digits"
    if args.method not in (None, "pini"):
        row = args.method
    else:
        row = args.noise or ("custom" if _given(args, CONFIG_FLAGS) else DEFAULT_ROW)
    return Path("runs") / f"{name}-{row}-{shots}shot-seed{seed}"


# --- the commands -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """One run, checked and ready: its folder, its record, its data; ``finished``: the summary
    of a sweep's run that is already done (skipped)."""

    folder: Path
    run: dict
    split: object
    resume: bool
    finished: dict | None = None


def _plan(args, shots: int | None, seed: int | None, folder: Path, split) -> _Plan:
    """Checks one run before any work: the folder, and on --resume that every flag matches.
    ``shots``/``seed``: as given (None: the stored run's on --resume, else the defaults)."""
    resume = bool(args.resume)
    stored = _stored_run(folder) if resume and folder.is_dir() else None
    if resume and stored is None:
        print(f"pini: nothing to resume in {folder}: starting a new run", file=sys.stderr)
        resume = False
        if folder.is_dir() and _entries(folder):
            raise InputError(
                f"run folder {folder} holds files but no run record; use --overwrite or "
                "another --output"
            )
    if resume:
        differences = _differences(stored, args, shots, seed)
        if split.name != stored["dataset"]:
            differences.append(f"--dataset {split.name} (the run has {stored['dataset']})")
        elif list(split.classnames) != stored["classnames"]:
            differences.append(
                f"the classes of {split.name} ({', '.join(split.classnames[:3])}, ...) differ "
                f"from the run's ({', '.join(stored['classnames'][:3])}, ...)"
            )
        if differences:
            raise InputError(
                f"--resume continues the run in {folder} exactly, but "
                + "; ".join(differences)
                + ". For a new run use another --output, or --overwrite to replace this one"
            )
        run = stored
    else:
        _check_method_flags(args, [args.method or "pini"])
        run = _new_run(args, shots, seed, split)  # checks the options before the folder
        _check_folder(folder, overwrite=bool(args.overwrite))
    return _Plan(folder, run, split, resume)


def _sweep_plan(args, method: str, shots: int, seed: int, folder: Path, split) -> _Plan:
    """One run of a sweep, checked before any work: new (an empty or missing folder, or any
    folder with --overwrite), finished (its summary exists: skipped), or unfinished (resumed);
    a stored run of another configuration is an error naming what differs."""
    requested = _normalized_run(_new_run(args, shots, seed, split, method))
    stored = None if args.overwrite or not folder.is_dir() else _stored_run(folder)
    if stored is None:
        _check_folder(folder, overwrite=bool(args.overwrite))
        return _Plan(folder, requested, split, resume=False)
    differences = _record_differences(stored, requested)
    if differences:
        raise InputError(
            f"run folder {folder} holds a run of another configuration ("
            + "; ".join(differences[:4])
            + "); use another --output, or --overwrite to replace the sweep's runs"
        )
    summary = folder / SUMMARY
    if summary.is_file():
        try:
            return _Plan(folder, stored, split, True, json.loads(summary.read_text()))
        except (OSError, ValueError) as error:
            raise InputError(f"{summary} cannot be read ({error}); delete it to rerun") from None
    return _Plan(folder, stored, split, resume=True)


# Frozen image features of this process, shared by a run's evaluations and a sweep's runs.
FEATURES = FeatureCache()


def _features(run: dict, part: str, samples: list[tuple], transform_key: tuple, compute):
    """``compute()``'s features of ``samples``, from ``FEATURES`` when the same backbone (model,
    weights, seed of random weights, precision) already encoded the same listing through the
    same transform (``transform_key``)."""
    precision = (run["pini_config"] or {}).get("precision", "fp32")
    demo_version = (demo.CACHE_VERSION, demo.PRETRAIN_STEPS) if run["demo_backbone"] else None
    backbone = (
        run["model"],
        run["pretrained"],
        run["pretrained_sha256"],
        demo_version,
        run["seed"] if _random_weights(run) else None,
        precision,
    )
    key = (backbone, part, listing_fingerprint(samples), transform_key)
    return FEATURES.get(key, compute)


def _image_encoder(model, clip):
    """images (B, 3, H, W) -> (B, D) float32 frozen features, as ``model`` encodes them."""
    if isinstance(model, PiNI):
        return model.encode_image  # in the run's precision
    return lambda images: clip.encode_image(images).float()


def _test_features(run: dict, model, clip, split, test_transform, device: str):
    """The frozen features of the test images, or None where the model perturbs the images
    (PiNI's image-level noise) and must see them."""
    if run["method"] == "pini" and run["pini_config"]["visual"] == "image":
        return None
    size = _image_size(clip)

    def compute():
        return encode_samples(_image_encoder(model, clip), split.test, test_transform, 64, device)

    return _features(run, "test", split.test, ("test", size, 64, str(device)), compute)


def _plain_features(run, part: str, samples, clip, test_transform, device: str):
    """(features (N, D), labels (N,)) of ``samples`` through the test transform."""
    size = _image_size(clip)

    def compute():
        return encode_samples(_image_encoder(None, clip), samples, test_transform, 64, device)

    encoded = _features(run, part, samples, ("test", size, 64, str(device)), compute)
    return encoded.features, encoded.labels


def _cache_views(run: dict, samples, clip, train_transform, device: str):
    """Tip-Adapter's cache: (features (views, N, D), labels (N,)) of ``cache_views`` augmented
    passes over the few-shot images (pass v seeded by the run's seed + v)."""
    views = run["method_config"]["cache_views"]
    key = ("views", _image_size(clip), tuple(run["crop_scale"]), views, run["seed"], str(device))

    def compute():
        return baselines.encode_augmented_views(
            clip, samples, train_transform, views=views, seed=run["seed"], device=device
        )

    return _features(run, "few-shot", samples, key, compute)


def _validation_samples(run: dict, split, samples: list[tuple], folder: Path) -> list[tuple]:
    """The validation split of the methods that search hyper-parameters: min(K, 4) images per
    class (CoOp's few-shot val), drawn by the run's seed from the dataset's val part, or where
    it has none from the training images outside the K shots; stored in the run folder like
    the few-shot split."""
    if split.val:
        pool, part = split.val, "val"
    else:
        chosen = {sample_id(source) for source, _ in samples}
        pool = [item for item in split.train if sample_id(item[0]) not in chosen]
        part = "train outside the shots"
    if not pool:
        raise InputError(
            f"dataset {split.name} has no images left for {run['method']}'s validation split "
            "(no val part, and every training image is one of the shots)"
        )
    shots = min(run["shots"], VALIDATION_SHOTS)
    source = {"dataset": run["dataset"], "root": run["root"], "part": part}
    cache = folder / f"split-val-{shots}shot-seed{run['seed']}.json"
    return few_shot(pool, shots, run["seed"], cache=cache, source=source)


def _image_size(clip) -> int:
    size = clip.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


def _execute(args, plan: _Plan) -> dict | None:
    """Runs a checked plan; rank 0 holds the run folder's lock throughout."""
    rank, world = distributed_rank_world()
    if world > 1:
        # Every rank has checked the run (its folder empty, or resumable) before rank 0 writes
        # into it: a slower rank would otherwise find rank 0's run.json and refuse the folder.
        torch.distributed.barrier()
    if rank != 0:
        return _execute_locked(args, plan)
    _lock(plan.folder)
    try:
        return _execute_locked(args, plan)
    finally:
        _unlock(plan.folder)


def _execute_locked(args, plan: _Plan) -> dict | None:
    run, split, folder = plan.run, plan.split, plan.folder
    method = run["method"]
    progress = not args.no_progress
    rank, world = distributed_rank_world()
    # The backbone first: weights that cannot be loaded leave a new run's folder as it was.
    needed = rank == 0 or method in TRAINED_METHODS  # fitting and evaluating is rank 0's
    if needed:
        clip, tokenizer = _backbone(run, args.device, progress, bool(args.trusted))
    if rank == 0 and not plan.resume:
        _prepare_folder(folder, overwrite=bool(args.overwrite))
        _write_json(folder / RUN_FILE, run)
    if world > 1:
        torch.distributed.barrier()  # the folder exists before any rank uses it
    if not needed:
        return None
    crop_scale = run["crop_scale"] or (0.08, 1.0)
    train_transform, test_transform = clip_transforms(_image_size(clip), tuple(crop_scale))
    cache = folder / f"split-{run['shots']}shot-seed{run['seed']}.json"
    source = {"dataset": run["dataset"], "root": run["root"]}
    if rank == 0:
        few_shot(split.train, run["shots"], run["seed"], cache=cache, source=source)
    if world > 1:
        torch.distributed.barrier()  # every rank then reads the split rank 0 wrote
    samples = few_shot(split.train, run["shots"], run["seed"], cache=cache, source=source)
    checkpoint = folder / CHECKPOINT
    stored = read_checkpoint(checkpoint) if plan.resume and checkpoint.is_file() else None
    tip_cache = None
    if method in ("tip-adapter", "tip-adapter-f") and stored is None:
        tip_cache = _cache_views(run, samples, clip, train_transform, args.device)
    model = _build_method(run, split, clip, tokenizer, tip_cache, stored)
    subset = getattr(split, "class_subset", None)
    test_features = None
    if rank == 0:
        test_features = _test_features(run, model, clip, split, test_transform, args.device)
    evaluation = dict(
        device=args.device, class_subset=subset, features=test_features, progress=progress
    )
    if rank == 0:
        zero_shot_model = (
            model
            if isinstance(model, nn.Module)
            else baselines.ZeroShotCLIP(
                clip, tokenizer, split.classnames, _zero_shot_template(split)
            )
        )
        zero_shot = evaluate(
            zero_shot_model, split.test, test_transform, zero_shot=True, **evaluation
        )
    fitted = None
    if method in TRAINED_METHODS:
        evaluator = None
        if args.eval_every and rank == 0:

            def evaluator() -> float:
                return evaluate(
                    model, split.test, test_transform, **{**evaluation, "progress": False}
                )["accuracy"]

        config = TrainConfig(**run["train_config"], num_workers=args.workers, progress=progress)
        try:
            train(
                model,
                samples,
                train_transform,
                config,
                folder,
                resume=plan.resume,
                device=args.device,
                run=run,
                evaluate_every=args.eval_every or 0,
                evaluator=evaluator,
            )
        except RunDiverged as diverged:
            if rank == 0:
                _mark_failed(folder, split, run, diverged)
            raise
        if rank != 0:
            return None
        if method == "tip-adapter-f" and model.config.search:
            validation = _validation_samples(run, split, samples, folder)
            features, labels = _plain_features(
                run, "validation", validation, clip, test_transform, args.device
            )
            alpha, beta, accuracy = model.search_hyperparameters(features, labels)
            update_checkpoint_state(checkpoint, model)
            fitted = {"alpha": alpha, "beta": beta, "validation_accuracy": accuracy}
    else:
        fitted = _fit(
            run, model, split, samples, clip, test_transform, folder, stored, tip_cache, args.device
        )
        state = {} if method == "zero-shot" else model.state_dict()
        save_fitted_checkpoint(checkpoint, method, state, run["method_config"], run)
    result = evaluate(model, split.test, test_transform, **evaluation)
    summary = {
        "dataset": split.name,
        "method": method,
        "shots": run["shots"],
        "seed": run["seed"],
        "noise": run["noise"],
        "zero_shot_accuracy": zero_shot["accuracy"],
        "zero_shot_template": _zero_shot_template(split),
        "accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "test_images": result["samples"],
        "skipped_images": result["skipped_images"],
        "pini_config": run["pini_config"],
        "method_config": run["method_config"],
        "train_config": run["train_config"],
        "fitted": fitted,
    }
    if args.per_class:
        summary["per_class_accuracy"] = dict(
            zip(split.classnames, result["per_class_accuracy"], strict=True)
        )
    _write_json(folder / SUMMARY, summary)
    return summary


def _mark_failed(folder: Path, split, run: dict, diverged: RunDiverged) -> None:
    """The summary of a run that diverged: "status": "failed", why, and where it stopped; no
    accuracy (``pini sweep`` reports the run as failed). The checkpoint on disk is the last
    finite one; the message says which."""
    summary = {
        "status": "failed",
        "failure": str(diverged),
        "failed_epoch": diverged.epoch,
        "failed_step": diverged.step,
        "dataset": split.name,
        "method": run["method"],
        "shots": run["shots"],
        "seed": run["seed"],
        "noise": run["noise"],
        "train_config": run["train_config"],
    }
    _write_json(folder / SUMMARY, summary)
    kept = diverged.epoch - 1  # the epochs finished (and checkpointed) before the failure
    where = f"{folder / CHECKPOINT} keeps epoch {kept}" if kept else "no epoch finished"
    diverged.args = (f"{diverged}; {where}; the run is marked failed in {folder / SUMMARY}",)


def _fit(run, model, split, samples, clip, test_transform, folder, stored, tip_cache, device):
    """Fits the linear probe or Tip-Adapter (nothing for zero-shot CLIP), or on --resume loads
    what the checkpoint holds; returns what was chosen (C; alpha, beta) for the summary."""
    method = run["method"]
    if method == "zero-shot":
        return None
    if stored is not None:
        _load_fitted(model, stored["generators"], run)
    else:
        validation = _validation_samples(run, split, samples, folder)
        val_features, val_labels = _plain_features(
            run, "validation", validation, clip, test_transform, device
        )
        if method == "linear-probe":
            features, labels = _plain_features(
                run, "few-shot", samples, clip, test_transform, device
            )
        else:
            features, labels = tip_cache
        model.fit(features, labels, val_features, val_labels)
    if method == "linear-probe":
        return {"C": model.C}
    return {
        "alpha": model.alpha,
        "beta": model.beta,
        "validation_accuracy": model.validation_accuracy,
    }


def _load_fitted(model, state: dict, run: dict) -> None:
    try:
        model.load_state_dict(state)
    except ValueError as error:
        raise InputError(f"the checkpoint's {run['method']} state does not fit: {error}") from None


def _print_summary(summary: dict) -> None:
    method = summary.get("method", "pini")
    what = f"noise {summary['noise']}" if method == "pini" else method
    print(
        f"{summary['dataset']}, {summary['shots']} shots, seed {summary['seed']}, "
        f"{what}: zero-shot CLIP {summary['zero_shot_accuracy']:.2f}% -> "
        f"{METHOD_NAMES[method]} {summary['accuracy']:.2f}% (macro-F1 {summary['macro_f1']:.2f}%)"
    )
    for name, accuracy in summary.get("per_class_accuracy", {}).items():
        print(f"  {name:<24} {accuracy:6.2f}%")


def _train_command(args) -> int:
    folder = _default_output(args, args.shots or 16, 1 if args.seed is None else args.seed)
    if args.resume and args.root is None and args.dataset is None and folder.is_dir():
        stored = _stored_run(folder)  # left-out data flags take the run's, as other flags do
        if stored is not None:
            args.root, args.dataset = stored["root"], stored["dataset"]
    _check_data_args(args)
    split = _load_split(args.root, args.dataset, "train", "test")
    plan = _plan(args, args.shots, args.seed, folder, split)
    summary = _execute(args, plan)
    if summary is not None:
        _print_summary(summary)
    return 0


def _sweep_command(args) -> int:
    _check_data_args(args)
    if args.datasets and args.dataset:
        raise InputError("give the datasets with --datasets or --dataset, not both")
    names = args.datasets or [args.dataset]
    if args.root is None and any(name not in (None, "digits") for name in names):
        raise InputError(
            f"--datasets {' '.join(names)} needs --root, the folder that holds them (without "
            "it, pini uses the bundled digits)"
        )
    methods = list(dict.fromkeys(args.methods))
    _check_method_flags(args, methods, sweep=True)
    output = Path(args.output or "runs/sweep")
    splits = [_load_split(args.root, name, "train", "test") for name in names]
    # Every run is checked before the first one starts.
    plans = [
        _sweep_plan(
            args,
            method,
            shots,
            seed,
            output / split.name / method / f"{shots}shot-seed{seed}",
            split,
        )
        for split in splits
        for method in methods
        for shots in args.shot_list
        for seed in args.seeds
    ]
    rank, _ = distributed_rank_world()
    if rank == 0:
        _lock(output)  # one sweep at a time writes its tables
    try:
        return _run_sweep(args, plans, output, methods, splits, rank)
    finally:
        _unlock(output)


def _run_sweep(args, plans, output: Path, methods, splits, rank: int) -> int:
    """Runs a sweep's checked plans in order, then writes its report (rank 0)."""
    from . import sweep

    summaries = []
    for number, plan in enumerate(plans, 1):
        run = plan.run
        try:
            summary = plan.finished or _execute(args, plan)
        except RunDiverged:  # marked failed in its folder; the sweep goes on
            summary = json.loads((plan.folder / SUMMARY).read_text()) if rank == 0 else None
        if summary is None:  # ranks other than 0 only train
            continue
        summaries.append({**summary, "folder": str(plan.folder)})
        state = "done before" if plan.finished else "resumed" if plan.resume else "new"
        result = (
            f"FAILED: {summary['failure']}"
            if sweep.failed(summary)
            else f"{summary['accuracy']:.2f}%"
        )
        print(
            f"[{number}/{len(plans)}] {run['dataset']} {run['method']} {run['shots']} shots "
            f"seed {run['seed']}: {result} ({state})",
            flush=True,
        )
    if rank != 0:
        return 0
    datasets = [split.name for split in splits]
    report = sweep.report(summaries, methods, datasets, args.shot_list, args.seeds)
    written = sweep.write(report, output)
    print(sweep.markdown(report), end="")
    print("written: " + ", ".join(str(path) for path in written))
    failures = sum(sweep.failed(summary) for summary in summaries)
    if failures:
        print(f"pini sweep: {failures} of {len(plans)} runs failed (see above)", file=sys.stderr)
        return 3
    return 0


# Options whose trained parameters depend on the class list: evaluating them on other classes
# would silently pair class c's learned state with another class.
def _depends_on_classes(run: dict) -> str | None:
    """What the run learned per class (for the error), or None."""
    method = run["method"]
    if method == "linear-probe":
        return "a classifier per class"
    if method in ("tip-adapter", "tip-adapter-f"):
        return "a cache of labelled features"
    config = run["pini_config"] or {}
    if config.get("text") == "feature" and config.get("text_generator") == "embedding":
        return "noise per class (--text feature with --text-generator embedding)"
    return None


def _stored_method(args, command: str):
    """(run record, split, model with the checkpoint's state, frozen CLIP) for ``eval``,
    ``visualize`` and ``interpret``: the method the checkpoint stores, on the run's own data or
    on ``--root`` / ``--dataset``; checked before any work."""
    state = read_checkpoint(args.checkpoint)
    run = state.get("run")
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise InputError(f"checkpoint {args.checkpoint} has no run record; retrain it")
    run = _normalized_run(run, args.checkpoint)
    differences = _differences(run, args, keys=("model", "pretrained", "template"))
    if differences:
        raise InputError(
            f"{command} builds the model stored in {args.checkpoint}, but "
            + "; ".join(differences)
            + ". Leave these flags out (only --root and --dataset may name other data)"
        )
    if getattr(args, "root", None) is None and getattr(args, "dataset", None) is None:
        root, dataset = run["root"], run["dataset"]
    else:
        _check_data_args(args)
        root, dataset = args.root, args.dataset
    if root is None:
        dataset = None if dataset in (None, "digits") else dataset
    split = _load_split(root, dataset, "test")
    learned = _depends_on_classes(run)
    if learned and list(split.classnames) != run["classnames"]:
        raise InputError(
            f"the run learned {learned} of {run['dataset']}; {split.name} has other classes, "
            "so it cannot be evaluated there"
        )
    clip, tokenizer = _backbone(run, args.device, not args.no_progress, bool(args.trusted))
    model = _build_method(run, split, clip, tokenizer, stored=state)
    if isinstance(model, nn.Module):
        load_checkpoint(state, model)
    else:
        _load_fitted(model, state["generators"], run)
    return run, split, model, clip


def _stored_model(args, command: str):
    """(run record, split, PiNI with the checkpoint's state) for ``visualize`` and
    ``interpret``, which draw PiNI's learned noise."""
    method = read_checkpoint(args.checkpoint).get("method", "pini")
    if method != "pini":
        raise InputError(
            f"{command} shows PiNI's learned noise; the run in {Path(args.checkpoint).parent} "
            f"is {method}"
        )
    run, split, model, _ = _stored_method(args, command)
    return run, split, model


def _eval_command(args) -> int:
    run, split, model, clip = _stored_method(args, "eval")
    progress = not args.no_progress
    test_transform = clip_transforms(_image_size(clip))[1]
    features = _test_features(run, model, clip, split, test_transform, args.device)
    result = evaluate(
        model,
        split.test,
        test_transform,
        device=args.device,
        progress=progress,
        class_subset=getattr(split, "class_subset", None),
        features=features,
    )
    print(
        f"{split.name}: accuracy {result['accuracy']:.2f}%, macro-F1 "
        f"{result['macro_f1']:.2f}% on {result['samples']} images, skipped "
        f"{result['skipped_images']} unreadable"
    )
    if args.per_class:
        for name, accuracy in zip(split.classnames, result["per_class_accuracy"], strict=True):
            print(f"  {name:<24} {accuracy:6.2f}%")
    return 0


def _visualize_command(args) -> int:
    from . import visualize

    run, split, model = _stored_model(args, "visualize")
    folder = Path(args.checkpoint).parent
    transform = _test_transform(model)
    written = []
    options = dict(count=args.images, seed=args.seed, device=args.device)
    if model.config.visual == "image":
        written.append(
            visualize.image_noise_figure(
                model, split.test, transform, split.classnames, folder / "noise-image.png",
                **options,
            )
        )  # fmt: skip
    if model.config.visual == "feature" or model.config.text == "feature":
        written.append(
            visualize.feature_noise_figure(
                model, split.test, transform, split.classnames, folder / "noise-feature.png",
                **options,
            )
        )  # fmt: skip
    if model.prompt_noise is not None:
        tokenizer = _tokenizer(run)
        written.append(visualize.prompt_noise_figure(model, tokenizer, folder / "noise-prompt.png"))
    if not written:
        raise InputError(f"the run in {folder} injects no noise: nothing to draw")
    for path in written:
        print(path)
    return 0


def _tokenizer(run: dict):
    import open_clip

    register_model_configs()
    return open_clip.get_tokenizer(run["model"])


def _interpret_command(args) -> int:
    from . import visualize

    state = read_checkpoint(args.checkpoint)
    run = state.get("run")
    if (
        state.get("method", "pini") == "pini"
        and isinstance(run, dict)
        and run.get("pini_config", {}).get("text") != "prompt"
    ):
        raise InputError(
            f"the run in {Path(args.checkpoint).parent} has no prompt noise to interpret (it "
            f"was trained with --text {run['pini_config'].get('text')}, not --text prompt)"
        )
    run, _, model = _stored_model(args, "interpret")
    tokenizer = _tokenizer(run)
    rows = visualize.interpret_prompt_noise(
        model, tokenizer, draws=args.draws, count=args.top, seed=args.seed
    )
    table = visualize.interpretation_markdown(rows, args.draws)
    path = Path(args.checkpoint).parent / "interpretation.md"
    path.write_text(table)
    print(table, end="")
    print(f"written to {path}")
    return 0


def _plot_command(args) -> int:
    from . import visualize

    output = Path(args.output) if args.output else Path(args.runs[0]) / "curves.png"
    print(visualize.plot_runs(args.runs, output))
    return 0


def _test_transform(model: PiNI):
    size = model.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return clip_transforms(size)[1]


def _init_distributed(args) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) and
    use this rank's GPU. Returns the rank (0 without torchrun)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    on_gpu = str(args.device).startswith("cuda")
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    dist.init_process_group(
        "nccl" if on_gpu else "gloo", timeout=datetime.timedelta(minutes=args.timeout)
    )
    return dist.get_rank()


# Failures of the file system rather than of pini: one line (exit status 1), never a traceback.
WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EIO, errno.EFBIG}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if str(args.device).startswith("cuda") and not torch.cuda.is_available():
            raise InputError(
                f"--device {args.device}: no CUDA GPU is available here "
                "(torch.cuda.is_available() is False); use --device cpu"
            )
        rank = _init_distributed(args) if args.command in ("train", "sweep") else 0
        if rank != 0:
            args.no_progress = True
        command = {
            "train": _train_command,
            "eval": _eval_command,
            "sweep": _sweep_command,
            "visualize": _visualize_command,
            "interpret": _interpret_command,
            "plot": _plot_command,
        }
        return command[args.command](args)
    except InputError as error:
        if args.debug:
            raise
        print(f"pini {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunDiverged as error:
        if args.debug:
            raise
        if distributed_rank_world()[0] == 0:
            print(f"pini {args.command}: error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = "; every finished epoch is saved: the same command with --resume continues it"
        print(f"pini {args.command}: interrupted"
              + (hint if args.command in ("train", "sweep") else ""), file=sys.stderr)  # fmt: skip
        return 130
    except OSError as error:
        if args.debug or error.errno not in WRITE_ERRORS:
            raise
        name = errno.errorcode.get(error.errno, str(error.errno))
        print(
            f"pini {args.command}: error: cannot write {error.filename or 'a file'}: "
            f"{error.strerror} ({name}); files written before are intact (a run continues with "
            "--resume once there is room)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
