"""Running a planned run: the frozen backbone, the method from the registry, the few-shot and
validation splits, training or fitting, evaluation and the summary; frozen image features are
encoded once per process where that is exact (``FEATURES``)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch import nn

from . import demo
from .backbone import build_clip, encode_image, preprocessing_of
from .checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    read_checkpoint,
    save_fitted_checkpoint,
    update_checkpoint_state,
)
from .data.features import FeatureCache, encode_samples
from .data.few_shot import few_shot
from .data.sample_ids import listing_fingerprint, sample_id
from .data.split import Split
from .data.transforms import clip_transforms
from .errors import InputError, RunDiverged
from .evaluation import evaluate
from .methods import METHODS, MethodSetup
from .methods.common import encode_augmented_views
from .methods.zero_shot import ZeroShotCLIP
from .model import PiNI
from .progress import say
from .run_folders import RUN_FILE, SUMMARY, lock_folder, prepare_folder, unlock_folder, write_json
from .runs import (
    RUN_FORMAT,
    VALIDATION_SHOTS,
    RunPlan,
    check_data_args,
    dataset_zero_shot_template,
    flag_differences,
    load_split,
    normalized_run,
    prompt_template,
    relocated_weights,
    resolve_pretrained,
    weights_digest,
)
from .train import TrainConfig, distributed_rank_world, train


def _random_weights(run: dict) -> bool:
    """A backbone without CLIP weights: pini-tiny at random, seeded by the run's seed."""
    return run["pretrained"] is None and not run["demo_backbone"]


def load_backbone(run: dict, device: str, progress: bool, trusted: bool):
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
            found = weights_digest(run["pretrained"])
            if found != expected:
                now = "is gone" if found is None else f"has SHA-256 {found[:16]}..."
                raise InputError(
                    f"the weights file {run['pretrained']} {now}, but the run was made with "
                    f"SHA-256 {expected[:16]}...: it was replaced since. Put the original back, "
                    "or start a new run with these weights"
                )
        if run["pretrained"] is not None:
            say(f"loading {run['model']} weights ({run['pretrained']}) ...", progress)
        clip, tokenizer = build_clip(
            run["model"], run["pretrained"], trusted=trusted, device=device
        )
    return clip.to(device), tokenizer


def build_method(run: dict, split, clip, tokenizer, cache=None, stored=None):
    """The run's method on the backbone (from the registry), not yet trained or fitted; its own
    initialisation is seeded by the run's seed. Tip-Adapter needs its cache: ``cache``
    (features (views, N, D), labels (N,)) for a new run, else a checkpoint's state ``stored``
    to size it (its keys are then loaded from that state)."""
    torch.manual_seed(run["seed"])  # the method's initialisation: independent of the backbone
    setup = MethodSetup(
        clip=clip,
        tokenizer=tokenizer,
        classnames=list(split.classnames),
        template=prompt_template(run, split),
        zero_shot_template=dataset_zero_shot_template(split),
        options=dict(run["method_config"]),
        pini_config=run["pini_config"],
        cache=cache,
        stored_state=None if stored is None else stored["trained_state"],
    )
    return METHODS[run["method"]].build(setup)


# Frozen image features of this process, shared by a run's evaluations and a sweep's runs.
FEATURES = FeatureCache()


def _features(run: dict, part: str, samples: list[tuple], transform_key: tuple, compute):
    """``compute()``'s features of ``samples``, from ``FEATURES`` when the same backbone (model,
    weights, seed of random weights, precision) already encoded the same listing through the
    same transform (``transform_key``: test or augmented views, with the weights' whole
    ``Preprocessing``, so two preprocessings never share features)."""
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
    return lambda images: encode_image(clip, images).float()  # raw, on every family


def encode_test_features(run: dict, model, clip, split, test_transform, device: str):
    """The frozen features of the test images, or None where the model perturbs the images
    (PiNI's image-level noise) and must see them."""
    if getattr(model, "perturbs_images", False):
        return None
    preprocessing = preprocessing_of(clip)

    def compute():
        return encode_samples(_image_encoder(model, clip), split.test, test_transform, 64, device)

    key = ("test", preprocessing, 64, str(device))
    return _features(run, "test", split.test, key, compute)


def _plain_features(run, part: str, samples, clip, test_transform, device: str):
    """(features (N, D), labels (N,)) of ``samples`` through the test transform."""
    preprocessing = preprocessing_of(clip)

    def compute():
        return encode_samples(_image_encoder(None, clip), samples, test_transform, 64, device)

    encoded = _features(run, part, samples, ("test", preprocessing, 64, str(device)), compute)
    return encoded.features, encoded.labels


def _cache_views(run: dict, samples, clip, train_transform, device: str):
    """Tip-Adapter's cache: (features (views, N, D), labels (N,)) of ``cache_views`` augmented
    passes over the few-shot images (pass v seeded by the run's seed + v)."""
    views = run["method_config"]["cache_views"]
    key = (
        "views",
        preprocessing_of(clip),
        tuple(run["crop_scale"]),
        views,
        run["seed"],
        str(device),
    )

    def compute():
        return encode_augmented_views(
            clip, samples, train_transform, views=views, seed=run["seed"], device=device
        )

    return _features(run, "few-shot", samples, key, compute)


def _validation_samples(run: dict, split, samples: list[tuple], folder: Path) -> list[tuple]:
    """The validation split of the methods that search hyper-parameters: min(K, 4) images per
    class (CoOp's few-shot val), drawn by the run's seed from the dataset's val part (after the
    training shots, from the same stream, as Dassl draws it), or where
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
    # Drawn after the training shots from the seed's one stream, as Dassl draws CoOp's val.
    first = ((split.train, run["shots"]),)
    return few_shot(pool, shots, run["seed"], cache=cache, source=source, drawn_before=first)


def execute(args, plan: RunPlan) -> dict | None:
    """Runs a checked plan; rank 0 holds the run folder's lock throughout."""
    rank, world = distributed_rank_world()
    if world > 1:
        # Every rank has checked the run (its folder empty, or resumable) before rank 0 writes
        # into it: a slower rank would otherwise find rank 0's run.json and refuse the folder.
        torch.distributed.barrier()
    if rank != 0:
        return _execute_locked(args, plan)
    lock_folder(plan.folder)
    try:
        return _execute_locked(args, plan)
    finally:
        unlock_folder(plan.folder)


def _execute_locked(args, plan: RunPlan) -> dict | None:
    run, split, folder = plan.run, plan.split, plan.folder
    method = run["method"]
    spec = METHODS[method]
    progress = not args.no_progress
    rank, world = distributed_rank_world()
    # The backbone first: weights that cannot be loaded leave a new run's folder as it was.
    needed = rank == 0 or spec.trains  # fitting and evaluating is rank 0's
    if needed:
        clip, tokenizer = load_backbone(run, args.device, progress, bool(args.trusted))
    if rank == 0 and not plan.resume:
        prepare_folder(folder, overwrite=bool(args.overwrite))
        write_json(folder / RUN_FILE, run)
    if world > 1:
        torch.distributed.barrier()  # the folder exists before any rank uses it
    if not needed:
        return None
    crop_scale = run["crop_scale"] or (0.08, 1.0)
    preprocessing = preprocessing_of(clip)  # the weights' own (docs/spec.md §13)
    train_transform, test_transform = clip_transforms(preprocessing, tuple(crop_scale))
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
    if spec.needs_cache and stored is None:
        tip_cache = _cache_views(run, samples, clip, train_transform, args.device)
    model = build_method(run, split, clip, tokenizer, tip_cache, stored)
    subset = getattr(split, "class_subset", None)
    test_features = None
    if rank == 0:
        say(f"zero-shot CLIP on the {len(split.test)} test images ...", progress)
        test_features = encode_test_features(run, model, clip, split, test_transform, args.device)
    evaluation = dict(
        device=args.device, class_subset=subset, features=test_features, progress=progress
    )
    if rank == 0:
        zero_shot_model = (
            model
            if isinstance(model, nn.Module)
            else ZeroShotCLIP(clip, tokenizer, split.classnames, dataset_zero_shot_template(split))
        )
        zero_shot = evaluate(
            zero_shot_model, split.test, test_transform, zero_shot=True, **evaluation
        )
    fitted = None
    if spec.trains:
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
                tensorboard=bool(getattr(args, "tensorboard", False)),
            )
        except RunDiverged as diverged:
            if rank == 0:
                _mark_failed(folder, split, run, diverged)
            raise
        if rank != 0:
            return None
        if (
            spec.training.searches and model.config.search
        ):  # Tip-Adapter-F: alpha and beta, trained keys
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
        state = {} if spec.fitting is None else model.state_dict()  # zero-shot: nothing
        save_fitted_checkpoint(checkpoint, method, state, run["method_config"], run)
    say(f"{spec.display_name} on the {len(split.test)} test images ...", progress)
    result = evaluate(model, split.test, test_transform, **evaluation)
    summary = {
        "dataset": split.name,
        "method": method,
        "shots": run["shots"],
        "seed": run["seed"],
        "noise": run["noise"],
        "zero_shot_accuracy": zero_shot["accuracy"],
        "zero_shot_template": dataset_zero_shot_template(split),
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
    write_json(folder / SUMMARY, summary)
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
    write_json(folder / SUMMARY, summary)
    kept = diverged.epoch - 1  # the epochs finished (and checkpointed) before the failure
    where = f"{folder / CHECKPOINT} keeps epoch {kept}" if kept else "no epoch finished"
    diverged.args = (f"{diverged}; {where}; the run is marked failed in {folder / SUMMARY}",)


def _fit(run, model, split, samples, clip, test_transform, folder, stored, tip_cache, device):
    """Fits a method fitted on frozen features (the linear probe, Tip-Adapter; nothing for
    zero-shot CLIP), or on --resume loads what the checkpoint holds; returns what was chosen
    (C; alpha, beta) for the summary."""
    spec = METHODS[run["method"]]
    if spec.fitting is None:
        return None
    if stored is not None:
        _load_fitted(model, stored["trained_state"], run)
    else:
        validation = _validation_samples(run, split, samples, folder)
        val_features, val_labels = _plain_features(
            run, "validation", validation, clip, test_transform, device
        )
        if spec.fitting.on == "shots":
            features, labels = _plain_features(
                run, "few-shot", samples, clip, test_transform, device
            )
        else:
            features, labels = tip_cache
        model.fit(features, labels, val_features, val_labels)
    return spec.fitting.chosen(model)


def _load_fitted(model, state: dict, run: dict) -> None:
    try:
        model.load_state_dict(state)
    except ValueError as error:
        raise InputError(f"the checkpoint's {run['method']} state does not fit: {error}") from None


def with_inference(model, run: dict, checkpoint, **options):
    """``model`` with the test-time noise options given (``inference``, ``inference_samples``;
    None: not given) in place of the run's: PiNI's only, as nothing trained depends on them; an
    ``InputError`` for another method, which draws no noise, or for a value out of range."""
    override = {key: value for key, value in options.items() if value is not None}
    if not override:
        return model
    if run["method"] != "pini":
        flags = " and ".join("--" + key.replace("_", "-") for key in override)
        raise InputError(
            f"{flags} set PiNI's test-time noise; the run in {Path(checkpoint).parent} is "
            f"{run['method']} ({type(model).__name__}), which has none"
        )
    try:
        model.config = dataclasses.replace(model.config, **override)
    except ValueError as error:
        raise InputError(str(error)) from None
    return model


def load_stored_method(args, command: str, *, inference: bool = False):
    """(run record, split, model with the checkpoint's state, frozen CLIP) for ``eval``,
    ``visualize`` and ``interpret``: the method the checkpoint stores, on the run's own data or
    on ``--root`` / ``--dataset``; checked before any work. ``inference``: ``--inference`` and
    ``--inference-samples`` replace a PiNI run's test-time noise (``pini eval``: they change
    nothing that was trained)."""
    state, run = _stored_run(args.checkpoint)
    run = relocated_weights(run, getattr(args, "pretrained", None))
    keys = ("inference", "inference_samples") if inference else ()
    given = {key: getattr(args, key, None) for key in keys}
    compared = argparse.Namespace(**{**vars(args), **dict.fromkeys(given)})
    differences = flag_differences(run, compared, keys=("model", "pretrained", "template"))
    if differences:
        raise InputError(
            f"{command} builds the model stored in {args.checkpoint}, but "
            + "; ".join(differences)
            + ". Leave these flags out (only --root and --dataset may name other data)"
        )
    if getattr(args, "root", None) is None and getattr(args, "dataset", None) is None:
        root, dataset = run["root"], run["dataset"]
    else:
        check_data_args(args)
        root, dataset = args.root, args.dataset
    if root is None:
        dataset = None if dataset in (None, "digits") else dataset
    state, split = _on_evaluation_classes(state, run, load_split(root, dataset, "test"))
    model, clip = _restored(state, run, split, args.device, not args.no_progress, args.trusted)
    return run, split, with_inference(model, run, args.checkpoint, **given), clip


def evaluation_split(run: dict, split):
    """The split a stored run is evaluated on: on a dataset's class subset (ImageNet-A, -R)
    the subset's classes alone, the model built on those classes as the authors build it
    (docs/spec.md §11), where what the run learned per class can be cut to them (PiNI's
    per-class text noise); else, for a run that learned something per class (the linear probe,
    Tip-Adapter), the split with the run's own classes, its logits restricted to the subset. Such
    a run is evaluated only on data of its own classes."""
    method = METHODS[run["method"]]
    learned = method.learned(run)
    if learned and list(split.classnames) != run["classnames"]:
        raise InputError(
            f"the run learned {learned} of {run['dataset']}; {split.name} has other classes, "
            "so it cannot be evaluated there"
        )
    return split.on_class_subset() if method.builds_on_class_subsets(run) else split


def _on_evaluation_classes(state: dict, run: dict, split) -> tuple[dict, object]:
    """(checkpoint state, split) for evaluating ``run`` on ``split`` (``evaluation_split``):
    the state cut to the class subset where the model is built on it."""
    evaluated = evaluation_split(run, split)
    subset = getattr(split, "class_subset", None)
    if subset is None or evaluated is split:
        return state, evaluated
    cut = METHODS[run["method"]].state_on_classes(state["trained_state"], run, list(subset))
    return dict(state, trained_state=cut), evaluated


def restore_on(checkpoint, split, device: str, *, progress: bool, trusted: bool):
    """(run record, the split it is evaluated on, model with the checkpoint's state, frozen
    CLIP): the stored method rebuilt on ``split`` (on its class subset, ``evaluation_split``), as
    ``load_stored_method`` rebuilds it for ``pini eval --dataset``."""
    state, run = _stored_run(checkpoint)
    state, split = _on_evaluation_classes(state, run, split)
    return (run, split, *_restored(state, run, split, device, progress, trusted))


def evaluate_stored(run: dict, model, clip, split, device: str, progress: bool) -> dict:
    """``evaluate``'s result for a stored method on ``split``'s test images through the test
    transform (from frozen features where that is exact), on its ``class_subset``."""
    test_transform = clip_transforms(preprocessing_of(clip))[1]
    features = encode_test_features(run, model, clip, split, test_transform, device)
    return evaluate(
        model,
        split.test,
        test_transform,
        device=device,
        progress=progress,
        class_subset=getattr(split, "class_subset", None),
        features=features,
    )


def _stored_run(checkpoint) -> tuple[dict, dict]:
    """(checkpoint state, its checked run record)."""
    state = read_checkpoint(checkpoint)
    run = state.get("run")
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise InputError(f"checkpoint {checkpoint} has no run record; retrain it")
    return state, normalized_run(run, checkpoint)


def _restored(state: dict, run: dict, split, device: str, progress: bool, trusted: bool):
    """(model with the checkpoint's state, frozen CLIP): the stored method rebuilt on ``split``'s
    classes."""
    clip, tokenizer = load_backbone(run, device, progress, bool(trusted))
    model = build_method(run, split, clip, tokenizer, stored=state)
    if isinstance(model, nn.Module):
        load_checkpoint(state, model)
    else:
        _load_fitted(model, state["trained_state"], run)
    return model, clip


def load_stored_model(
    checkpoint,
    device: str = "cpu",
    *,
    progress: bool = False,
    trusted: bool = False,
    pretrained: str | None = None,
    inference: str | None = None,
    inference_samples: int | None = None,
):
    """(run record, model with the checkpoint's state, frozen CLIP): the method a checkpoint
    stores, rebuilt as ``load_stored_method`` rebuilds it for ``eval``, on the run's own classes
    and without reading its data (``pini predict``, ``pini.predict.load_run``). ``pretrained``:
    the run's weights file where it lies now (checked by its SHA-256). ``inference``,
    ``inference_samples``: PiNI's test-time noise instead of the run's (``with_inference``)."""
    state, run = _stored_run(checkpoint)
    run = relocated_weights(run, pretrained)
    if pretrained is not None and run["pretrained"] != resolve_pretrained(pretrained):
        raise InputError(
            f"--pretrained {pretrained} is not the weights file the run in "
            f"{Path(checkpoint).parent} was made with (its SHA-256 differs, or the run has none)"
        )
    classes = Split(list(run["classnames"]), [], [], run["dataset"])  # names only, no images
    model, clip = _restored(state, run, classes, device, progress, trusted)
    options = dict(inference=inference, inference_samples=inference_samples)
    return run, with_inference(model, run, checkpoint, **options), clip


def load_stored_pini(args, command: str):
    """(run record, split, PiNI with the checkpoint's state) for ``visualize`` and
    ``interpret``, which draw PiNI's learned noise."""
    method = read_checkpoint(args.checkpoint).get("method", "pini")
    if method != "pini":
        raise InputError(
            f"{command} shows PiNI's learned noise; the run in {Path(args.checkpoint).parent} "
            f"is {method}"
        )
    run, split, model, _ = load_stored_method(args, command)
    return run, split, model
