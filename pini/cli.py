"""The command line: ``pini train | eval | predict | sweep | visualize | interpret | plot`` (also
``python -m pini``). This module is the parser and ``main`` (errors to one line and an exit
status); each command is in ``pini.commands``.

Following one ``pini train``: ``pini.runs`` decides what the run is (the run record from the
flags and defaults, resume rules, ``plan_run``), ``pini.run_folders`` checks and locks its
folder, ``pini.runner`` runs it (backbone, method, split, training or fitting, evaluation,
summary), and the method's own module in ``pini.methods`` builds the model.

With no dataset arguments, ``pini train`` trains the tiny model on the bundled digits dataset on
the CPU and prints zero-shot vs PiNI accuracy. The paper's protocol, for a user with CLIP weights
and the CoOp datasets:

    pini train --model ViT-B-16 --pretrained openai --root DATA --dataset oxford_pets \\
        --shots 16 --seed 1 --noise feature+prompt --output runs/pets-16-1

``--method`` runs one of the paper's baselines instead (``pini.methods``) on the same backbone,
split, preprocessing, evaluation and run folder; ``pini sweep`` runs methods x datasets x shots
x seeds and writes the paper's Table 2 and Fig. 5 (``pini.sweep``). Every problem with what the
user gave is one line on stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import datetime
import errno
import math
import os
import sys

import torch

from .commands import (
    eval_command,
    interpret_command,
    plot_command,
    predict_command,
    sweep_command,
    train_command,
    visualize_command,
)
from .config import FIXED_PROMPTS, INFERENCE_MODES, PRECISIONS, TABLE1
from .config_file import apply_config_file
from .errors import InputError, RunDiverged
from .methods import METHODS, PAPER_METHODS
from .runs import DEFAULT_ROW, MAX_SEED
from .train import OPTIMIZERS, distributed_rank_world

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
_non_negative_float = _checked(
    float, lambda value: math.isfinite(value) and value >= 0, "a number >= 0"
)
_momentum = _checked(float, lambda value: 0 <= value < 1, "a momentum in [0, 1)")
_seed = _checked(int, lambda value: 0 <= value < MAX_SEED, "a seed in [0, 2^62)")


# How long a rank waits in a collective (gloo's and NCCL's defaults are 30 and 10 minutes): a
# rank that died or hangs stops the others this soon. Rank 0 alone evaluates (zero-shot before
# training, --eval-every during it) while the others wait, so it must cover those evaluations.
DISTRIBUTED_TIMEOUT_MINUTES = 15.0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pini", description="PiNI few-shot fine-tuning of CLIP")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.set_defaults(command_parsers=commands.choices)  # for --config

    general = _Parser(add_help=False)
    general.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    general.add_argument("--per-class", action="store_true", help="print per-class accuracy")
    general.add_argument(
        "--no-progress",
        action="store_true",
        help="only the results: no progress bars (drawn where stderr is a terminal) and no "
        "epoch lines (one per epoch elsewhere)",
    )
    general.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    data = _Parser(add_help=False)
    data.add_argument(
        "--root", default=None, help="datasets folder (default: none, the bundled digits)"
    )
    data.add_argument(
        "--dataset",
        default=None,
        help="dataset folder name under --root, e.g. oxford_pets (default: --root is the "
        "dataset's folder)",
    )

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
        "open_clip (offline: read from the cache) (default: none, only for pini-tiny and the "
        "demo)",
    )
    model.add_argument(
        "--trusted",
        action="store_true",
        help="allow OpenAI TorchScript archives (runs code from the file)",
    )
    model.add_argument(
        "--template", default=None, help="prompt template (default: the dataset's, Table 6)"
    )
    model.add_argument(
        "--noise",
        default=None,
        choices=list(TABLE1),
        help=f"a row of the paper's Table 1, filling --visual, --visual-generator, --text and "
        f"--text-generator (default {DEFAULT_ROW}); explicit flags override it",
    )
    model.add_argument(
        "--visual",
        default=None,
        choices=["none", "image", "feature"],
        help="where visual noise goes (default: the --noise row's)",
    )
    model.add_argument(
        "--visual-generator",
        default=None,
        help="image: cnn-authors (the paper's residual CNN as the authors built it), cnn (pini's "
        "narrower one), attention (the paper's, on CLIP's patch tokens), mlp, cnn-light, "
        "attention-pixels; feature: attention (the paper's), mlp (default: the --noise row's)",
    )
    model.add_argument(
        "--text",
        default=None,
        choices=["none", "prompt", "feature"],
        help="where text noise goes (default: the --noise row's)",
    )
    model.add_argument(
        "--text-generator",
        default=None,
        help="prompt: embedding; feature: embedding, mlp (default: the --noise row's)",
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
    for noise in ("prompt", "text-feature"):  # --prompt-noise-per-step, --text-feature-...
        model.add_argument(
            f"--{noise}-noise-per-step",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"training with --num-samples m: the m samples share one {noise} noise draw "
            f"per step (the authors', default); --no-{noise}-noise-per-step draws it per sample",
        )
    model.add_argument(
        "--fixed-prompt",
        default=None,
        choices=FIXED_PROMPTS,
        help="the prompt of the rows without prompt noise: hand-written (the dataset's zero-shot "
        "prompt, the authors', default) or placeholder (PiNI's 16-placeholder prompt)",
    )
    model.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="fp32 (default; exact on CPU and GPU); bf16, fp16: autocast for the frozen towers, "
        "generators in fp32; fp16-all: CLIP and the generators in fp16 (the authors')",
    )
    model.add_argument(
        "--scaled-attention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the cross-attention generators divide by sqrt(d) (default: no, one unscaled head "
        "as the authors' code)",
    )
    model.add_argument(
        "--head-init",
        default=None,
        choices=["default", "small"],
        help="the generators' output layers start at PyTorch's initialisation (the authors', "
        "default) or small: N(0, 0.02^2) weights and zero bias",
    )

    run = _Parser(add_help=False)
    run.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="options from a TOML file (YAML with pyyaml installed) under the flags' names, e.g. "
        "weight-decay = 1e-4; flags given here override it (default: none)",
    )
    run.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="default: the method's (PiNI 200, 100 for 1000 classes; CoOp by shots; the demo 200)",
    )
    run.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate after the warm-up, cosine-annealed (default: the method's: PiNI "
        "0.002, 0.001 for 1000 classes; the demo 0.01)",
    )
    run.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="default 32 (Tip-Adapter-F 256)",
    )
    run.add_argument(
        "--optimizer",
        default=None,
        choices=OPTIMIZERS,
        help="default sgd (Dassl's; Tip-Adapter-F adamw, with eps 1e-4)",
    )
    run.add_argument(
        "--momentum",
        type=_momentum,
        default=None,
        help="SGD's momentum (default 0.9, Dassl's; the paper does not state it)",
    )
    run.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=None,
        help="default 5e-4 (Dassl's; Tip-Adapter-F 0.01)",
    )
    run.add_argument(
        "--warmup-epochs",
        type=_non_negative_int,
        default=None,
        help="epochs at the constant --warmup-lr before the cosine schedule (default 1; "
        "Tip-Adapter-F 0)",
    )
    run.add_argument(
        "--warmup-lr",
        type=_positive_float,
        default=None,
        help="warm-up learning rate (default 1e-5)",
    )
    run.add_argument(
        "--cosine-from",
        default=None,
        choices=["warmup-end", "start"],
        help="the cosine schedule counts epochs from the end of the warm-up (Dassl's, default) "
        "or from epoch 0",
    )
    run.add_argument(
        "--drop-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="leave out each epoch's last partial batch where the training set holds at least "
        "--batch-size images (Dassl's train loader; default: yes)",
    )
    run.add_argument(
        "--workers", type=_non_negative_int, default=0, help="data loader workers (default 0)"
    )
    run.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="also evaluate on the test set every N epochs, recorded in metrics.jsonl "
        "(default: never)",
    )
    run.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write loss, lr and accuracy per epoch as TensorBoard scalars to "
        "RUN/tensorboard (needs the tensorboard package)",
    )
    run.add_argument(
        "--timeout",
        type=_positive_float,
        default=DISTRIBUTED_TIMEOUT_MINUTES,
        help="under torchrun: minutes a rank waits for the others before the run stops with an "
        f"error (default {DISTRIBUTED_TIMEOUT_MINUTES:g}; raise it when rank 0's evaluations "
        "take longer)",
    )
    run.add_argument(
        "--output",
        default=None,
        help="run folder (default runs/<dataset>-<noise row or method>-<K>shot-seed<S>; sweep: "
        "runs/sweep)",
    )
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --output")
    again.add_argument(
        "--overwrite", action="store_true", help="replace the run in --output (its files are lost)"
    )

    one = _Parser(add_help=False)
    one.add_argument(
        "--shots", type=_positive_int, default=None, help="shots per class (default 16)"
    )
    one.add_argument("--seed", type=_seed, default=None, help="run seed (default 1)")

    train_parser = commands.add_parser(
        "train", parents=[general, data, model, one, run], help="train and evaluate one run"
    )
    train_parser.add_argument(
        "--method",
        default=None,
        choices=list(METHODS),
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
    guess = commands.add_parser(
        "predict",
        parents=[stored],
        help="the top-k classes of images with their probabilities (CSV and JSON)",
        description="Classify images with a run's stored method: per image the --top-k classes "
        "and their probabilities, one line each printed (the first class), all in "
        "OUTPUT/predictions.csv and predictions.json.",
    )
    guess.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    guess.add_argument(
        "--top-k", type=_positive_int, default=5, help="classes per image (default 5)"
    )
    guess.add_argument("--output", default=None, help="folder of the files (default: the run's)")
    guess.add_argument(
        "--inference",
        default=None,
        choices=INFERENCE_MODES,
        help="PiNI's inference noise instead of the run's (default: the run's)",
    )
    guess.add_argument(
        "--inference-samples",
        type=_positive_int,
        default=None,
        help="draws averaged by --inference average (default: the run's)",
    )
    guess.add_argument(
        "--seed", type=_seed, default=0, help="seed of PiNI's noise draws (default 0)"
    )
    guess.add_argument("--trusted", action="store_true", help="as for pini eval")
    guess.add_argument(
        "--pretrained",
        default=None,
        help="the run's weights file where it lies now, if it moved (same SHA-256)",
    )
    for flag, text in (("--no-progress", "no progress lines"), ("--debug", "show tracebacks")):
        guess.add_argument(flag, action="store_true", help=text)
    guess.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
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
        help="methods x datasets x shots x seeds: the paper's Tables 1 to 4 and Fig. 5, mean and "
        "95%% interval",
        description="Train and evaluate one run per method, dataset, shot count and seed (run "
        "folders OUTPUT/<dataset>/<method>/<K>shot-seed<S>, default OUTPUT runs/sweep); a run "
        "already finished with the same configuration is skipped, an unfinished one resumed, "
        "one with another configuration is an error (--overwrite replaces every run). Writes "
        "OUTPUT/sweep.md (mean accuracy and its 95% interval over seeds per method and dataset, "
        "PiNI's gain over each baseline), sweep.png (accuracy against shots) and sweep.json. "
        "Noise flags apply to the pini runs; the training flags (--epochs, --lr, --batch-size, "
        "--optimizer, --weight-decay, --warmup-epochs, --warmup-lr) to every trained method, "
        "--momentum to those trained with SGD. With no --root: every method on the bundled "
        "digits. One command per table: --noise-rows table1 (Table 1: location x generator), "
        "--dataset imagenet --eval-datasets imagenetv2 imagenet-sketch imagenet-a imagenet-r "
        "(Table 3: source, targets, target average), --models A B (Table 4: methods against "
        "backbones, runs in OUTPUT/<backbone>/).",
    )
    sweep.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=None,
        help=f"methods (default: the paper's, {' '.join(PAPER_METHODS)}; with --noise-rows "
        "zero-shot pini; tip-adapter and tip-adapter-f are extras)",
    )
    sweep.add_argument(
        "--noise-rows",
        nargs="+",
        default=None,
        metavar="ROW",
        help="Table 1: PiNI once per row (a --noise row, locations may name a generator: "
        "image:attention, feature:mlp+prompt) or preset: table1 (each location with each of "
        "the paper's generators), locations (the 8 --noise rows), generators (every one); "
        "default: PiNI once, with the noise flags",
    )
    sweep.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="MODEL[=WEIGHTS]",
        help="Table 4: the whole sweep once per backbone, MODEL with --pretrained's weights or "
        "MODEL=WEIGHTS, in OUTPUT/<backbone>/; a table of methods against backbones (default: "
        "--model's one backbone)",
    )
    sweep.add_argument(
        "--eval-datasets",
        nargs="+",
        default=None,
        metavar="DATASET",
        help="Table 3: also evaluate every run on these test sets under --root, as pini eval "
        "--dataset does (e.g. imagenetv2 imagenet-sketch imagenet-a imagenet-r after --dataset "
        "imagenet); columns source, targets and their average (default: none)",
    )
    sweep.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="dataset folder names under --root (default: --dataset's, or the bundled digits)",
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
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:  # the file's options under the flags given
        try:
            apply_config_file(args.command_parsers[args.command], args.config, args.command)
        except InputError as error:
            if args.debug:
                raise
            print(f"pini {args.command}: error: {error}", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
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
            "train": train_command,
            "eval": eval_command,
            "predict": predict_command,
            "sweep": sweep_command,
            "visualize": visualize_command,
            "interpret": interpret_command,
            "plot": plot_command,
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
        print(
            f"pini {args.command}: interrupted"
            + (hint if args.command in ("train", "sweep") else ""),
            file=sys.stderr,
        )
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
