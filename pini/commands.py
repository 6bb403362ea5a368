"""The commands of ``pini``: train, sweep, eval, predict, visualize, interpret and plot (the
parser is ``pini.cli``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .backbone import preprocessing_of, register_model_configs
from .checkpoint import (
    read_checkpoint,
)
from .data.transforms import clip_transforms
from .errors import InputError, RunDiverged
from .evaluation import evaluate
from .methods import METHODS
from .metrics_log import check_tensorboard
from .model import PiNI
from .progress import say
from .run_folders import SUMMARY, lock_folder, unlock_folder
from .runner import (
    encode_test_features,
    execute,
    load_stored_method,
    load_stored_pini,
)
from .runs import (
    check_data_args,
    check_method_flags,
    default_output,
    load_split,
    plan_run,
    plan_sweep_run,
    read_stored_run,
)
from .sweep import shots_text
from .train import distributed_rank_world


def _print_summary(summary: dict) -> None:
    method = summary.get("method", "pini")
    what = f"noise {summary['noise']}" if method == "pini" else method
    name = METHODS[method].display_name
    print(
        f"{summary['dataset']}, {shots_text(summary['shots'])}, seed {summary['seed']}, "
        f"{what}: zero-shot CLIP {summary['zero_shot_accuracy']:.2f}% -> "
        f"{name} {summary['accuracy']:.2f}% (macro-F1 {summary['macro_f1']:.2f}%)"
    )
    for name, accuracy in summary.get("per_class_accuracy", {}).items():
        print(f"  {name:<24} {accuracy:6.2f}%")


def train_command(args) -> int:
    if args.tensorboard:
        check_tensorboard()
    folder = default_output(args, args.shots or 16, 1 if args.seed is None else args.seed)
    if args.resume and args.root is None and args.dataset is None and folder.is_dir():
        stored = read_stored_run(folder)  # left-out data flags take the run's, as other flags do
        if stored is not None:
            args.root, args.dataset = stored["root"], stored["dataset"]
    check_data_args(args)
    split = load_split(args.root, args.dataset, "train", "test")
    plan = plan_run(args, args.shots, args.seed, folder, split)
    summary = execute(args, plan)
    if summary is not None:
        _print_summary(summary)
        print(f"run folder: {folder}")  # the last line says where the result is
    return 0


def sweep_command(args) -> int:
    if args.tensorboard:
        check_tensorboard()
    check_data_args(args)
    if args.datasets and args.dataset:
        raise InputError("give the datasets with --datasets or --dataset, not both")
    names = args.datasets or [args.dataset]
    if args.root is None and any(name not in (None, "digits") for name in names):
        raise InputError(
            f"--datasets {' '.join(names)} needs --root, the folder that holds them (without "
            "it, pini uses the bundled digits)"
        )
    methods = list(dict.fromkeys(args.methods))
    check_method_flags(args, methods, sweep=True)
    output = Path(args.output or "runs/sweep")
    splits = [load_split(args.root, name, "train", "test") for name in names]
    # Every run is checked before the first one starts.
    plans = [
        plan_sweep_run(
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
        lock_folder(output)  # one sweep at a time writes its tables
    try:
        return _run_sweep(args, plans, output, methods, splits, rank)
    finally:
        unlock_folder(output)


def _run_sweep(args, plans, output: Path, methods, splits, rank: int) -> int:
    """Runs a sweep's checked plans in order, then writes its report (rank 0)."""
    from . import sweep

    summaries = []
    for number, plan in enumerate(plans, 1):
        run = plan.run
        try:
            summary = plan.finished or execute(args, plan)
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
            f"[{number}/{len(plans)}] {run['dataset']} {run['method']} {shots_text(run['shots'])} "
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


def eval_command(args) -> int:
    run, split, model, clip = load_stored_method(args, "eval", inference=True)
    progress = not args.no_progress
    test_transform = clip_transforms(preprocessing_of(clip))[1]
    features = encode_test_features(run, model, clip, split, test_transform, args.device)
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


def predict_command(args) -> int:
    from . import predict

    images = predict.image_files(args.paths)  # checked before the model loads
    if not images:
        raise InputError(
            f"no image files in {' '.join(args.paths)} (suffixes "
            f"{' '.join(sorted(predict.IMAGE_SUFFIXES))})"
        )
    model, classnames, transform = predict.load_run(
        args.checkpoint,
        args.device,
        inference=args.inference,
        inference_samples=args.inference_samples,
        trusted=args.trusted,
        pretrained=args.pretrained,
        progress=not args.no_progress,
    )
    plural = "s" if len(images) > 1 else ""
    say(f"classifying {len(images)} image{plural} ...", not args.no_progress)
    rows = predict.predict(
        model, images, transform, args.top_k, classnames=classnames, seed=args.seed
    )
    unreadable = [row for row in rows if "error" in row]
    if len(unreadable) == len(rows):
        first = rows[0]
        raise InputError(
            f"no image could be read of the {len(rows)} given ({first['image']}: {first['error']})"
        )
    for row in unreadable:
        warning = f"pini predict: warning: cannot read {row['image']} ({row['error']})"
        print(warning, file=sys.stderr)
    written = predict.write_predictions(rows, args.output or Path(args.checkpoint).parent)
    for row in rows:
        if "top_k" in row:
            best = row["top_k"][0]
            print(f"{row['image']}: {best['class']} ({100 * best['probability']:.2f}%)")
    print("written: " + ", ".join(str(path) for path in written))
    return 0


def visualize_command(args) -> int:
    from . import visualize

    run, split, model = load_stored_pini(args, "visualize")
    folder = Path(args.checkpoint).parent
    transform = _test_transform(model)
    written = []
    options = dict(count=args.images, seed=args.seed, device=args.device)
    if model.config.visual == "image":
        written.append(
            visualize.image_noise_figure(
                model,
                split.test,
                transform,
                split.classnames,
                folder / "noise-image.png",
                **options,
            )
        )
    if model.config.visual == "feature" or model.config.text == "feature":
        written.append(
            visualize.feature_noise_figure(
                model,
                split.test,
                transform,
                split.classnames,
                folder / "noise-feature.png",
                **options,
            )
        )
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


def interpret_command(args) -> int:
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
    run, _, model = load_stored_pini(args, "interpret")
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


def plot_command(args) -> int:
    from . import visualize

    output = Path(args.output) if args.output else Path(args.runs[0]) / "curves.png"
    print(visualize.plot_runs(args.runs, output))
    return 0


def _test_transform(model: PiNI):
    return clip_transforms(preprocessing_of(model.clip))[1]
