"""``pini train``, ``pini eval`` and ``pini sweep`` (also ``python -m pini``).

With no dataset arguments, ``pini train`` trains the tiny model on the bundled digits dataset on
the CPU and prints zero-shot vs PiNI accuracy. The paper's protocol, for a user with CLIP weights
and the CoOp datasets:

    pini train --model ViT-B-16 --pretrained openai --root DATA --dataset oxford_pets \\
        --shots 16 --seed 1 --noise feature+prompt --output runs/pets-16-1

A run folder holds one run: ``run.json`` (what the run is: model, data, every resolved option),
the few-shot split with a fingerprint of the images it was drawn from, ``metrics.jsonl``,
``checkpoint.pt`` and ``summary.json``. A new run never writes into a folder that holds
something (``--overwrite`` replaces a run), ``--resume`` continues exactly the stored run (a flag
that differs is an error), and ``eval`` rebuilds the model from the checkpoint. Every problem
with what the user gave is one line on stderr and exit status 2 (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

from . import demo
from .data import clip_transforms, few_shot, load_dataset
from .errors import InputError
from .model import INFERENCE_MODES, TABLE1, PiNI, PiNIConfig, build_clip, check_weights
from .train import (
    CHECKPOINT,
    METRICS,
    TrainConfig,
    distributed_rank_world,
    evaluate,
    load_checkpoint,
    read_checkpoint,
    train,
)

# The embedded default run: tiny model, digits, few epochs (well under two minutes on 2 cores).
DEFAULT_EPOCHS_EMBEDDED = 20
DEFAULT_LR_EMBEDDED = 0.05
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2^62), got {text!r}")
    return value


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
    run.add_argument("--output", default=None, help="run folder (default runs/<dataset>-...)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --output")
    again.add_argument(
        "--overwrite", action="store_true", help="replace the run in --output (its files are lost)"
    )

    one = _Parser(add_help=False)
    one.add_argument("--shots", type=_positive_int, default=None, help="shots per class (16)")
    one.add_argument("--seed", type=_seed, default=None, help="run seed (default 1)")

    commands.add_parser(
        "train", parents=[general, data, model, one, run], help="train and evaluate one run"
    )
    evaluate_parser = commands.add_parser(
        "eval",
        parents=[general, data, model],
        help="evaluate a run's checkpoint (on its own data, or another dataset via --root and "
        "--dataset)",
    )
    evaluate_parser.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt")
    draw = commands.add_parser(
        "visualize",
        parents=[general, data, model],
        help="draw a run's learned noise (PNGs in its run folder)",
        description="Draw a run's learned noise into its run folder: image-level noise (the "
        "paper's Fig. 4: image, |mu|, |sigma|, a noise sample, the noisy image), feature-level "
        "mu and sigma, and prompt noise per template position.",
    )
    draw.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt")
    draw.add_argument("--images", type=_positive_int, default=4, help="test images (4)")
    draw.add_argument("--seed", type=_seed, default=0, help="the noise draw shown (0)")
    words = commands.add_parser(
        "interpret",
        parents=[general, model],
        help="the vocabulary words nearest to a run's noisy prompts (the paper's Table 8)",
        description="For --draws noise samples, the --top vocabulary tokens nearest to the noisy "
        "prompt embedding at each template position, with how often each appears; printed and "
        "written to RUN/interpretation.md.",
    )
    words.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt")
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
        help="train over shots x seeds, print the mean and 95%% interval",
        description="Train and evaluate one run per shot count and seed (run folders "
        "OUTPUT/<K>shot-seed<S>, default OUTPUT runs/sweep); print the mean accuracy and its "
        "95% interval per shot count.",
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
    return split


def _template(run: dict, split) -> str:
    from .prompts import template_for

    return run["template"] or template_for(split.name)


def _zero_shot_template(split) -> str:
    from .prompts import zero_shot_template

    return zero_shot_template(split.name)


def _build_model(run: dict, split, device: str, progress: bool) -> PiNI:
    """The frozen backbone and PiNI with the run's configuration; seeded by the run's seed so a
    random-weight backbone and the generators' initialisation are the same in every process,
    cached demo backbone or not."""
    torch.manual_seed(run["seed"])
    if run["demo_backbone"]:
        clip, tokenizer = demo.digits_clip(demo.DEFAULT_CACHE, progress=progress)
    else:
        clip, tokenizer = build_clip(
            run["model"], run["pretrained"], trusted=run["trusted"], device=device
        )
    torch.manual_seed(run["seed"])  # the generators' initialisation: independent of the cache
    model = PiNI(
        clip.to(device),
        tokenizer,
        split.classnames,
        _template(run, split),
        PiNIConfig(**run["pini_config"]),
        zero_shot_template=_zero_shot_template(split),
    )
    return model.to(device)


def _new_run(args, shots: int | None, seed: int | None, split) -> dict:
    """The record of a new run from the arguments and the defaults (16 shots, seed 1)."""
    shots = 16 if shots is None else shots
    seed = 1 if seed is None else seed
    embedded = args.root is None
    classes = len(split.classnames)
    large = classes >= 1000
    config = _pini_config(_config_request(args))
    train_config = TrainConfig(
        epochs=args.epochs or (DEFAULT_EPOCHS_EMBEDDED if embedded else 100 if large else 200),
        lr=args.lr or (DEFAULT_LR_EMBEDDED if embedded else 0.001 if large else 0.002),
        batch_size=args.batch_size or 32,
        seed=seed,
    )
    demo_backbone = embedded and args.model is None and args.pretrained is None
    model_name = args.model or ("pini-tiny" if embedded else "ViT-B-16")
    if args.pretrained is None and model_name != "pini-tiny":
        raise InputError(
            f"--pretrained is needed for {model_name}: without CLIP weights the model is random "
            "and its accuracy meaningless (e.g. --pretrained openai, or a weights file)"
        )
    check_weights(model_name, args.pretrained)
    return {
        "format": RUN_FORMAT,
        "model": model_name,
        "pretrained": _resolve_pretrained(args.pretrained),
        "trusted": bool(args.trusted),
        "demo_backbone": demo_backbone,
        "root": _resolve_root(args.root),
        "dataset": split.name,
        "template": args.template,
        "classnames": list(split.classnames),
        "shots": shots,
        "seed": seed,
        "noise": _row_name(config),
        "pini_config": dataclasses.asdict(config),
        "train_config": {
            key: value
            for key, value in dataclasses.asdict(train_config).items()
            if key not in ("num_workers", "progress")
        },
    }


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
    requested = _requested(args, shots, seed)
    for key, value in requested.items():
        if keys is not None and key not in keys:
            continue
        if key == "dataset":
            continue  # compared through the loaded split's canonical name
        if stored.get(key) != value:
            found.append(f"{_flag_for(key, args)} {value} (the run has {stored.get(key)})")
    for key, value in _config_request(args).items():
        if stored["pini_config"].get(key) != value:
            found.append(
                f"{_flag_for(key, args)} {value} (the run has {stored['pini_config'].get(key)})"
            )
    if keys is None:
        for key in TRAIN_FLAGS:
            value = getattr(args, key, None)
            if value is not None and stored["train_config"].get(key) != value:
                found.append(
                    f"{TRAIN_FLAGS[key]} {value} (the run has {stored['train_config'].get(key)})"
                )
    if args.trusted and not stored.get("trusted"):
        found.append("--trusted (the run did not use it)")
    return found


def _stored_run(folder: Path) -> dict | None:
    """The record of the run in ``folder``: from its checkpoint, else from run.json."""
    checkpoint = folder / CHECKPOINT
    if checkpoint.exists():
        run = read_checkpoint(checkpoint).get("run")
        if isinstance(run, dict) and run.get("format") == RUN_FORMAT:
            return run
        raise InputError(f"checkpoint {checkpoint} has no run record; it cannot be resumed")
    record = folder / RUN_FILE
    if record.exists():
        try:
            run = json.loads(record.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{record} cannot be read ({error})") from None
        if isinstance(run, dict) and run.get("format") == RUN_FORMAT:
            return run
        raise InputError(f"{record} is not a run record this version wrote")
    return None


# --- run folders ------------------------------------------------------------------------------

OWN_FILES = (RUN_FILE, CHECKPOINT, CHECKPOINT + ".tmp", METRICS, METRICS + ".tmp", SUMMARY)


def _own_files(folder: Path) -> list[Path]:
    return [folder / name for name in OWN_FILES if (folder / name).exists()] + sorted(
        folder.glob("split-*shot-seed*.json*")
    )


def _check_folder(folder: Path, *, overwrite: bool) -> None:
    """Without side effects: a new run needs an empty (or new) folder, unless ``--overwrite``;
    the folder (or the nearest existing parent) must be a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--output {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        foreign = sorted(set(folder.iterdir()) - set(_own_files(folder)))
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
    """Deletes a replaced run's files (``--overwrite``) and creates the folder."""
    if overwrite and folder.is_dir():
        for path in _own_files(folder):
            path.unlink()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise InputError(f"run folder {folder} is not writable ({error.strerror})") from None


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2))
    os.replace(temporary, path)


def _default_output(args, shots: int, seed: int) -> Path:
    if args.output:
        return Path(args.output)
    if args.dataset:
        name = args.dataset
    elif args.root is not None:
        name = Path(args.root).expanduser().resolve().name or "data"
    else:
        name = "digits"
    row = args.noise or ("custom" if _given(args, CONFIG_FLAGS) else DEFAULT_ROW)
    return Path("runs") / f"{name}-{row}-{shots}shot-seed{seed}"


# --- the commands -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """One run, checked and ready: its folder, its record, its data."""

    folder: Path
    run: dict
    split: object
    resume: bool


def _plan(args, shots: int | None, seed: int | None, folder: Path, split) -> _Plan:
    """Checks one run before any work: the folder, and on --resume that every flag matches.
    ``shots``/``seed``: as given (None: the stored run's on --resume, else the defaults)."""
    resume = bool(args.resume)
    stored = _stored_run(folder) if resume and folder.is_dir() else None
    if resume and stored is None:
        print(f"pini: nothing to resume in {folder}: starting a new run", file=sys.stderr)
        resume = False
        if folder.is_dir() and any(folder.iterdir()):
            raise InputError(
                f"run folder {folder} holds files but no run record; use --overwrite or "
                "another --output"
            )
    if resume:
        differences = _differences(stored, args, shots, seed)
        if split.name != stored["dataset"] or list(split.classnames) != stored["classnames"]:
            differences.append(f"--root/--dataset {split.name} (the run has {stored['dataset']})")
        if differences:
            raise InputError(
                f"--resume continues the run in {folder} exactly, but "
                + "; ".join(differences)
                + ". For a new run use another --output, or --overwrite to replace this one"
            )
        run = stored
    else:
        run = _new_run(args, shots, seed, split)  # checks the options before the folder
        _check_folder(folder, overwrite=bool(args.overwrite))
    return _Plan(folder, run, split, resume)


def _execute(args, plan: _Plan) -> dict | None:
    run, split, folder = plan.run, plan.split, plan.folder
    progress = not args.no_progress
    rank, world = distributed_rank_world()
    if rank == 0 and not plan.resume:
        _prepare_folder(folder, overwrite=bool(args.overwrite))
        _write_json(folder / RUN_FILE, run)
    if world > 1:
        torch.distributed.barrier()  # the folder exists before any rank uses it
    model = _build_model(run, split, args.device, progress)
    embedded = run["root"] is None
    size = model.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    # The demo's 32-pixel digits keep at least half of each image in a crop.
    crop_scale = demo.CROP_SCALE if embedded else (0.08, 1.0)
    train_transform, test_transform = clip_transforms(size, crop_scale)
    cache = folder / f"split-{run['shots']}shot-seed{run['seed']}.json"
    source = {"dataset": run["dataset"], "root": run["root"]}
    if rank == 0:
        few_shot(split.train, run["shots"], run["seed"], cache=cache, source=source)
    if world > 1:
        torch.distributed.barrier()  # every rank then reads the split rank 0 wrote
    samples = few_shot(split.train, run["shots"], run["seed"], cache=cache, source=source)
    config = TrainConfig(**run["train_config"], num_workers=args.workers, progress=progress)
    subset = getattr(split, "class_subset", None)
    if rank == 0:
        zero_shot = evaluate(
            model,
            split.test,
            test_transform,
            zero_shot=True,
            device=args.device,
            progress=progress,
            class_subset=subset,
        )
    evaluator = None
    if args.eval_every and rank == 0:

        def evaluator() -> float:
            return evaluate(
                model,
                split.test,
                test_transform,
                device=args.device,
                progress=False,
                class_subset=subset,
            )["accuracy"]

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
    if rank != 0:
        return None
    result = evaluate(
        model,
        split.test,
        test_transform,
        device=args.device,
        progress=progress,
        class_subset=subset,
    )
    summary = {
        "dataset": split.name,
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
        "train_config": run["train_config"],
    }
    if args.per_class:
        summary["per_class_accuracy"] = dict(
            zip(split.classnames, result["per_class_accuracy"], strict=True)
        )
    _write_json(folder / SUMMARY, summary)
    return summary


def _print_summary(summary: dict) -> None:
    print(
        f"{summary['dataset']}, {summary['shots']} shots, seed {summary['seed']}, "
        f"noise {summary['noise']}: zero-shot CLIP {summary['zero_shot_accuracy']:.2f}% -> "
        f"PiNI {summary['accuracy']:.2f}% (macro-F1 {summary['macro_f1']:.2f}%)"
    )
    for name, accuracy in summary.get("per_class_accuracy", {}).items():
        print(f"  {name:<24} {accuracy:6.2f}%")


def _train_command(args) -> int:
    _check_data_args(args)
    split = _load_split(args.root, args.dataset, "train", "test")
    folder = _default_output(args, args.shots or 16, 1 if args.seed is None else args.seed)
    plan = _plan(args, args.shots, args.seed, folder, split)
    summary = _execute(args, plan)
    if summary is not None:
        _print_summary(summary)
    return 0


def _sweep_command(args) -> int:
    _check_data_args(args)
    split = _load_split(args.root, args.dataset, "train", "test")
    root = Path(args.output or "runs/sweep")
    # Every run is checked before the first one starts.
    plans = {
        (shots, seed): _plan(args, shots, seed, root / f"{shots}shot-seed{seed}", split)
        for shots in args.shot_list
        for seed in args.seeds
    }
    for shots in args.shot_list:
        accuracies = []
        for seed in args.seeds:
            summary = _execute(args, plans[shots, seed])
            if summary is not None:
                accuracies.append(summary["accuracy"])
        if not accuracies:  # ranks other than 0 only train
            continue
        mean, interval = mean_and_interval(accuracies)
        print(
            f"{shots:>3} shots: {mean:.2f}% +- {interval:.2f} (95% interval, Student's t over "
            f"{len(accuracies)} seeds)"
        )
    return 0


def mean_and_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the ``confidence`` interval of the mean): Student's t with n - 1
    degrees of freedom, right for the few seeds of a sweep (with 3 seeds the normal's 1.96 would
    understate the 95% half-width by 2.2x); 0 for a single value."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    quantile = stats.t.ppf(0.5 + confidence / 2, len(values) - 1)
    return mean, float(quantile * statistics.stdev(values) / math.sqrt(len(values)))


# Options whose trained parameters depend on the class list: evaluating them on other classes
# would silently pair class c's learned noise with another class.
def _depends_on_classes(pini_config: dict) -> bool:
    return pini_config.get("text") == "feature" and pini_config.get("text_generator") == "embedding"


def _stored_model(args, command: str):
    """(run record, split, model with the checkpoint's state) for ``eval``, ``visualize`` and
    ``interpret``: the model the checkpoint stores, on the run's own data or on ``--root`` /
    ``--dataset``; checked before any work."""
    state = read_checkpoint(args.checkpoint)
    run = state.get("run")
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise InputError(f"checkpoint {args.checkpoint} has no run record; retrain it")
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
    if _depends_on_classes(run["pini_config"]) and list(split.classnames) != run["classnames"]:
        raise InputError(
            f"the run learned noise per class of {run['dataset']} (--text feature with "
            f"--text-generator embedding); {split.name} has other classes, so it cannot be "
            "evaluated there"
        )
    model = _build_model(run, split, args.device, not args.no_progress)
    load_checkpoint(state, model)
    return run, split, model


def _eval_command(args) -> int:
    _, split, model = _stored_model(args, "eval")
    progress = not args.no_progress
    result = evaluate(
        model,
        split.test,
        _test_transform(model),
        device=args.device,
        progress=progress,
        class_subset=getattr(split, "class_subset", None),
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

    from .model import _register_configs

    _register_configs()
    return open_clip.get_tokenizer(run["model"])


def _interpret_command(args) -> int:
    from . import visualize

    state = read_checkpoint(args.checkpoint)
    run = state.get("run")
    if isinstance(run, dict) and run.get("pini_config", {}).get("text") != "prompt":
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
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
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


if __name__ == "__main__":
    sys.exit(main())
