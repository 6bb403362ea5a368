"""The commands of ``pini``: train, sweep, eval, predict, visualize, interpret and plot (the
parser is ``pini.cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

from . import sweep_grid
from .backbone import preprocessing_of, register_model_configs
from .checkpoint import CHECKPOINT, read_checkpoint
from .config import PiNIConfig
from .data.names import TEST_ONLY_DATASETS, canonical_name
from .data.sample_ids import listing_fingerprint
from .data.transforms import clip_transforms
from .errors import InputError, RunDiverged
from .methods import METHODS, PAPER_METHODS
from .metrics_log import check_tensorboard
from .model import PiNI
from .progress import say
from .run_flags import CONFIG_FLAGS, ROW_OPTIONS, unused_options
from .run_folders import SUMMARY, lock_folder, unlock_folder, write_json
from .runner import (
    evaluate_stored,
    evaluation_split,
    execute,
    load_stored_method,
    load_stored_pini,
    restore_on,
)
from .runs import (
    RunPlan,
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


# Where a noise goes and its generator: set by each --noise-rows row, so not flags beside it.
ROW_FLAGS = {"noise": "--noise"} | {
    key: CONFIG_FLAGS[key] for key in ("visual", "visual_generator", "text", "text_generator")
}


@dataclasses.dataclass
class _SweepRun:
    """One run of a sweep: its checked plan, its row and backbone, and the arguments it runs
    with (the sweep's, with the backbone's model and weights and the row's noise flags)."""

    plan: RunPlan
    row: sweep_grid.Row
    backbone: sweep_grid.Backbone
    args: argparse.Namespace


def sweep_methods(args) -> list[str]:
    """The methods a sweep runs: ``--methods``, else the paper's Table 2 methods (Tip-Adapter
    and -F are extras), or zero-shot CLIP and PiNI for ``--noise-rows`` (Table 1)."""
    default = ["zero-shot", "pini"] if args.noise_rows else list(PAPER_METHODS)
    return list(dict.fromkeys(args.methods or default))


def sweep_command(args) -> int:
    if args.tensorboard:
        check_tensorboard()
    check_data_args(args)
    if args.datasets and args.dataset:
        raise InputError("give the datasets with --datasets or --dataset, not both")
    names = args.datasets or [args.dataset]
    given = [*names, *(args.eval_datasets or [])]
    if args.root is None and any(name not in (None, "digits") for name in given):
        raise InputError(
            f"--datasets {' '.join(n for n in given if n)} needs --root, the folder that holds "
            "them (without it, pini uses the bundled digits)"
        )
    row_flags = [flag for key, flag in ROW_FLAGS.items() if getattr(args, key) is not None]
    if args.noise_rows and row_flags:
        raise InputError(
            f"{', '.join(row_flags)}: each --noise-rows row says where the noise goes and its "
            "generators; leave these out"
        )
    if args.models and args.model:
        raise InputError("--models names the backbones (MODEL or MODEL=WEIGHTS); leave out --model")
    methods = sweep_methods(args)
    check_method_flags(args, methods, sweep=True)
    rows = sweep_grid.rows(methods, args.noise_rows)
    _check_row_options(args, rows)
    backbones = sweep_grid.backbones(args.models, args.pretrained)
    output = Path(args.output or "runs/sweep")
    splits = [_training_split(args.root, name) for name in names]
    targets = _target_splits(args, splits)
    runs = []  # every run is checked before the first one starts
    grid = itertools.product(backbones, splits, rows, args.shot_list, args.seeds)
    for backbone, split, row, shots, seed in grid:
        base = output / backbone.folder if backbone.folder else output
        folder = base / split.name / row.folder / f"{shots}shot-seed{seed}"
        run_args = _run_arguments(args, row, backbone)
        plan = plan_sweep_run(run_args, row.method, shots, seed, folder, split)
        for target in targets:
            evaluation_split(plan.run, target)
        runs.append(_SweepRun(plan, row, backbone, run_args))
    rank, _ = distributed_rank_world()
    if rank == 0:
        lock_folder(output)  # one sweep at a time writes its tables
    try:
        return _run_sweep(args, runs, output, rows, backbones, splits, targets, rank)
    finally:
        unlock_folder(output)


def _training_split(root, name):
    """The dataset ``name`` with training and test images; a test-only one is refused with the
    flag that evaluates on it."""
    if canonical_name(name) in TEST_ONLY_DATASETS:
        raise InputError(
            f"dataset {name} is test-only (no training images): train on imagenet and evaluate "
            f"on it with --eval-datasets {name}"
        )
    return load_split(root, name, "train", "test")


def _target_splits(args, splits) -> list:
    """The datasets of ``--eval-datasets`` (Table 3's targets), each with test images."""
    if not args.eval_datasets:
        return []
    if len(splits) != 1:
        raise InputError(
            "--eval-datasets evaluates the runs of one training dataset (Table 3: --dataset "
            f"imagenet), and --datasets names {len(splits)}"
        )
    targets: dict = {}
    for name in args.eval_datasets:
        target = load_split(args.root, name, "test")
        if target.name == splits[0].name:
            raise InputError(
                f"--eval-datasets {name} is the training dataset: its test set is the source "
                "column already"
            )
        targets.setdefault(target.name, target)
    return list(targets.values())


def _row_config(args, row: sweep_grid.Row) -> dict:
    """A noise row's PiNIConfig fields as far as ``ROW_OPTIONS`` read them: the row's
    locations and generators, the sweep's --num-samples."""
    generators = {key: value for key, value in row.noise.items() if key != "noise"}
    config = PiNIConfig.table1(row.noise["noise"], num_samples=args.num_samples or 1, **generators)
    return dataclasses.asdict(config)


def _check_row_options(args, rows: list[sweep_grid.Row]) -> None:
    """A flag of an option that some rows do not use (``ROW_OPTIONS``: e.g. --fixed-prompt,
    --[no-]prompt-noise-per-step, --head-init) applies to the noise rows that use it; one that no
    row uses is refused, as ``pini train`` refuses it."""
    noise_rows = [row for row in rows if row.noise is not None]
    if not noise_rows:  # PiNI once: pini train's checks
        return
    configs = [_row_config(args, row) for row in noise_rows]
    for key in ROW_OPTIONS:
        if getattr(args, key, None) is not None and all(
            key in unused_options(config) for config in configs
        ):
            names = [row.key.removeprefix("pini ") for row in noise_rows]
            raise InputError(
                f"{CONFIG_FLAGS[key]}: none of the --noise-rows uses it ({', '.join(names)}); for "
                f"{names[-1]}, {CONFIG_FLAGS[key]} {ROW_OPTIONS[key][1](configs[-1])}"
            )


def _run_arguments(args, row: sweep_grid.Row, backbone: sweep_grid.Backbone):
    """The sweep's arguments with the backbone's model and weights and the row's noise flags;
    for a noise row, without the options it does not use (``_check_row_options``)."""
    changes = dict(row.noise or {})
    if row.noise is not None:
        changes.update(dict.fromkeys(unused_options(_row_config(args, row))))
    if backbone.model is not None:
        changes.update(model=backbone.model, pretrained=backbone.pretrained)
    return argparse.Namespace(**{**vars(args), **changes})


def _run_sweep(args, runs, output: Path, rows, backbones, splits, targets, rank: int) -> int:
    """Runs a sweep's checked plans in order, each finished run evaluated on the targets, then
    writes its report (rank 0)."""
    from . import sweep

    summaries = []
    for number, item in enumerate(runs, 1):
        plan, run = item.plan, item.plan.run
        try:
            summary = plan.finished or execute(item.args, plan)
        except RunDiverged:  # marked failed in its folder; the sweep goes on
            summary = json.loads((plan.folder / SUMMARY).read_text()) if rank == 0 else None
        if rank != 0:  # ranks other than 0 only train; rank 0 evaluates and reports
            continue
        labels = {
            "folder": str(plan.folder),
            "row": item.row.key,
            "backbone": item.backbone.label or run["model"],
            "trained_on": run["dataset"],
        }
        summaries.append({**summary, **labels})
        state = "done before" if plan.finished else "resumed" if plan.resume else "new"
        result = (
            f"FAILED: {summary['failure']}"
            if sweep.failed(summary)
            else f"{summary['accuracy']:.2f}%"
        )
        where = f"{item.backbone.label} " if item.backbone.label else ""
        line = (
            f"[{number}/{len(runs)}] {where}{run['dataset']} {item.row.key} "
            f"{shots_text(run['shots'])} seed {run['seed']}"
        )
        print(f"{line}: {result} ({state})", flush=True)
        if sweep.failed(summary):
            continue
        for target in targets:
            entry, state = _evaluate_target(item.args, plan.folder, target)
            summaries.append({**entry, **labels})
            print(f"{line} on {target.name}: {entry['accuracy']:.2f}% ({state})", flush=True)
    if rank != 0:
        return 0
    datasets = [split.name for split in [*splits, *targets]]
    averaged = [target.name for target in targets] or None
    grid = ([row.key for row in rows], datasets, args.shot_list, args.seeds)
    if args.models:
        labels = [backbone.label for backbone in backbones]
        report = sweep.backbone_report(summaries, labels, *grid, averaged=averaged)
    else:
        report = sweep.report(summaries, *grid, averaged=averaged)
    written = sweep.write(report, output)
    print(sweep.markdown(report), end="")
    print("written: " + ", ".join(str(path) for path in written))
    failures = sum(sweep.failed(summary) for summary in summaries)
    if failures:
        print(f"pini sweep: {failures} of {len(runs)} runs failed (see above)", file=sys.stderr)
        return 3
    return 0


def _evaluate_target(args, folder: Path, target) -> tuple[dict, str]:
    """(the evaluation of the finished run in ``folder`` on ``target``, "evaluated" or "done
    before"): ``pini eval --dataset``'s numbers, kept in RUN/eval-<target>.json; one kept there
    is reused while the target's test listing is the same and, on a dataset with a class subset,
    if it records the number of classes its model was built on (an entry without
    ``model_classes`` predates per-class noise cut to the subset: it is evaluated again)."""
    path = folder / f"eval-{target.name}.json"
    listing = listing_fingerprint(target.test, target.directory)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = None
        subset = getattr(target, "class_subset", None)
        if (
            isinstance(stored, dict)
            and stored.get("listing") == listing
            and (subset is None or "model_classes" in stored)
        ):
            return stored, "done before"
    progress = not args.no_progress
    lock_folder(folder)
    try:
        run, target, model, clip = restore_on(
            folder / CHECKPOINT, target, args.device, progress=progress, trusted=args.trusted
        )
        say(
            f"{METHODS[run['method']].display_name} on the {len(target.test)} test images "
            f"of {target.name} ...",
            progress,
        )
        result = evaluate_stored(run, model, clip, target, args.device, progress)
        entry = {
            "dataset": target.name,
            **{key: run[key] for key in ("method", "shots", "seed", "noise")},
            "accuracy": result["accuracy"],
            "macro_f1": result["macro_f1"],
            "test_images": result["samples"],
            "skipped_images": result["skipped_images"],
            "listing": listing,
            "model_classes": len(target.classnames),
        }
        write_json(path, entry)
    finally:
        unlock_folder(folder)
    return entry, "evaluated"


def eval_command(args) -> int:
    run, split, model, clip = load_stored_method(args, "eval", inference=True)
    result = evaluate_stored(run, model, clip, split, args.device, not args.no_progress)
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
