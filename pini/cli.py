"""``pini train``, ``pini eval`` and ``pini sweep`` (also ``python -m pini``).

With no dataset arguments, ``pini train`` trains the tiny model on the bundled digits dataset on
the CPU and prints zero-shot vs PiNI accuracy. The paper's protocol, for a user with CLIP weights
and the CoOp datasets:

    pini train --model ViT-B-16 --pretrained ViT-B-16.pt --root DATA --dataset oxford_pets \\
        --shots 16 --seed 1 --noise feature+prompt --output runs/pets-16-1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from . import demo
from .data import clip_transforms, few_shot, load_dataset
from .model import INFERENCE_MODES, TABLE1, PiNI, PiNIConfig, build_clip
from .prompts import DEFAULT_TEMPLATE, TEMPLATES
from .train import TrainConfig, distributed_rank_world, evaluate, load_checkpoint, train

# The embedded default run: tiny model, digits, few epochs (well under two minutes on 2 cores).
DEFAULT_EPOCHS_EMBEDDED = 20
DEFAULT_LR_EMBEDDED = 0.05


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pini", description="PiNI few-shot fine-tuning of CLIP")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=None,
        help="open_clip model name (default: pini-tiny on the bundled digits, else ViT-B-16)",
    )
    common.add_argument("--pretrained", default=None, help="local CLIP weights file")
    common.add_argument(
        "--trusted",
        action="store_true",
        help="allow OpenAI TorchScript archives (runs code from the file)",
    )
    common.add_argument("--root", default=None, help="dataset root (none: bundled digits)")
    common.add_argument("--dataset", default=None, help="dataset name, e.g. oxford_pets")
    common.add_argument("--template", default=None, help="prompt template (default by dataset)")
    common.add_argument("--shots", type=int, default=16)
    common.add_argument("--seed", type=int, default=1)
    common.add_argument(
        "--noise", default="feature+prompt", choices=list(TABLE1), help="the Table 1 row"
    )
    common.add_argument("--mode", default="add", choices=["add", "mul"])
    common.add_argument("--num-samples", type=int, default=1)
    common.add_argument("--inference", default="sample", choices=INFERENCE_MODES)
    common.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--output", default=None, help="run folder (default runs/<dataset>-...)")
    common.add_argument("--per-class", action="store_true", help="print per-class accuracy")
    common.add_argument("--no-progress", action="store_true")
    training = argparse.ArgumentParser(add_help=False)
    training.add_argument("--epochs", type=int, default=None)
    training.add_argument("--lr", type=float, default=None)
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--workers", type=int, default=0)
    training.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    commands.add_parser("train", parents=[common, training], help="train and evaluate")
    evaluate_parser = commands.add_parser("eval", parents=[common], help="evaluate a run")
    evaluate_parser.add_argument("--checkpoint", required=True)
    sweep = commands.add_parser(
        "sweep",
        parents=[common, training],
        help="train over shots x seeds, print mean and 95% interval",
    )
    sweep.add_argument("--shot-list", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    sweep.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    return parser


def _template(args, dataset_name: str) -> str:
    if args.template:
        return args.template
    return TEMPLATES.get((args.dataset or dataset_name or "").lower(), DEFAULT_TEMPLATE)


def _setup(args):
    """(model, split, test transform, train transform) for the arguments."""
    embedded = args.root is None
    model_name = args.model or ("pini-tiny" if embedded else "ViT-B-16")
    split = load_dataset(args.root, args.dataset)
    if embedded and args.model is None and args.pretrained is None:
        clip, tokenizer = demo.digits_clip(demo.DEFAULT_CACHE, progress=not args.no_progress)
        clip = clip.to(args.device)
    else:
        clip, tokenizer = build_clip(
            model_name, args.pretrained, trusted=args.trusted, device=args.device
        )
    config = PiNIConfig.table1(
        args.noise,
        mode=args.mode,
        num_samples=args.num_samples,
        inference=args.inference,
        precision=args.precision,
    )
    model = PiNI(clip, tokenizer, split.classnames, _template(args, split.name), config)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    # The demo's 32-pixel digits keep at least half of each image in a crop.
    crop_scale = demo.CROP_SCALE if embedded else (0.08, 1.0)
    train_transform, test_transform = clip_transforms(size, crop_scale)
    return model.to(args.device), split, train_transform, test_transform


def _run(args, shots: int, seed: int, output: Path) -> dict:
    torch.manual_seed(seed)
    model, split, train_transform, test_transform = _setup(args)
    embedded = args.root is None
    rank, world = distributed_rank_world()
    cache = output / f"split-{shots}shot-seed{seed}.json"
    if rank == 0:
        few_shot(split.train, shots, seed, cache=cache)
    if world > 1:
        torch.distributed.barrier()  # every rank then reads the split rank 0 wrote
    samples = few_shot(split.train, shots, seed, cache=cache)
    epochs = args.epochs or (
        DEFAULT_EPOCHS_EMBEDDED if embedded else (100 if len(split.classnames) >= 1000 else 200)
    )
    lr = args.lr or (
        DEFAULT_LR_EMBEDDED if embedded else (0.001 if len(split.classnames) >= 1000 else 0.002)
    )
    config = TrainConfig(
        epochs=epochs,
        lr=lr,
        batch_size=args.batch_size,
        seed=seed,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    progress = not args.no_progress
    if rank == 0:
        zero_shot = evaluate(
            model,
            split.test,
            test_transform,
            zero_shot=True,
            device=args.device,
            progress=progress,
        )
    train(model, samples, train_transform, config, output, resume=args.resume, device=args.device)
    if rank != 0:
        return None
    result = evaluate(model, split.test, test_transform, device=args.device, progress=progress)
    summary = {
        "dataset": split.name,
        "shots": shots,
        "seed": seed,
        "noise": args.noise,
        "zero_shot_accuracy": zero_shot["accuracy"],
        "accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "skipped_images": result["skipped_images"],
        "train_config": dataclasses.asdict(config),
    }
    if args.per_class:
        summary["per_class_accuracy"] = dict(
            zip(split.classnames, result["per_class_accuracy"], strict=True)
        )
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _default_output(args, shots: int, seed: int) -> Path:
    if args.output:
        return Path(args.output)
    name = args.dataset or ("digits" if args.root is None else Path(args.root).name)
    return Path("runs") / f"{name}-{args.noise}-{shots}shot-seed{seed}"


def _print_summary(summary: dict) -> None:
    print(
        f"{summary['dataset']}, {summary['shots']} shots, seed {summary['seed']}, "
        f"noise {summary['noise']}: zero-shot CLIP {summary['zero_shot_accuracy']:.2f}% -> "
        f"PiNI {summary['accuracy']:.2f}% (macro-F1 {summary['macro_f1']:.2f}%)"
    )
    for name, accuracy in summary.get("per_class_accuracy", {}).items():
        print(f"  {name:<24} {accuracy:6.2f}%")


def _init_distributed(args) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) and
    use this rank's GPU. Returns the rank (0 without torchrun)."""
    import os

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
    rank = _init_distributed(args) if args.command in ("train", "sweep") else 0
    if rank != 0:
        args.no_progress = True
    if args.command == "train":
        summary = _run(args, args.shots, args.seed, _default_output(args, args.shots, args.seed))
        if summary is not None:
            _print_summary(summary)
    elif args.command == "eval":
        model, split, _, test_transform = _setup(args)
        load_checkpoint(Path(args.checkpoint), model)
        result = evaluate(
            model, split.test, test_transform, device=args.device, progress=not args.no_progress
        )
        print(
            f"{split.name}: accuracy {result['accuracy']:.2f}%, "
            f"macro-F1 {result['macro_f1']:.2f}%, skipped {result['skipped_images']} images"
        )
    else:
        root = Path(args.output or "runs/sweep")
        for shots in args.shot_list:
            accuracies = []
            for seed in args.seeds:
                summary = _run(args, shots, seed, root / f"{shots}shot-seed{seed}")
                if summary is not None:
                    accuracies.append(summary["accuracy"])
            if not accuracies:  # ranks other than 0 only train
                continue
            mean = statistics.fmean(accuracies)
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            interval = 1.96 * spread / math.sqrt(len(accuracies))
            print(
                f"{shots:>3} shots: {mean:.2f}% +- {interval:.2f} (95% interval, "
                f"{len(accuracies)} seeds)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
