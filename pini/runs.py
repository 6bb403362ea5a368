"""The run record: what one run is (method, backbone, data, every resolved option), built from
the command line, checked against its schema when read back, and compared with the flags of a
``--resume`` or a sweep; ``plan_run`` and ``plan_sweep_run`` check a run before any work.
(docs/spec.md §11)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from . import demo
from .backbone import check_weights, has_vit_image_tower, hf_text_encoder
from .checkpoint import (
    CHECKPOINT,
    read_checkpoint,
)
from .config import TABLE1, PiNIConfig
from .data.load import load_dataset
from .errors import InputError
from .methods import METHODS
from .run_flags import (
    CONFIG_FLAGS,
    READ_BY_ROW_OPTIONS,
    ROW_OPTIONS,
    RUN_FLAGS,
    TRAIN_FLAGS,
    check_method_flags,
    config_request,
    flag_for,
    given_options,
    shown,
    unused_defaults,
    unused_options,
)
from .run_folders import RUN_FILE, SUMMARY, check_folder, folder_entries
from .train import TrainConfig

# The validation split: CoOp's datasets draw min(K, 4) shots per class from the val part.
VALIDATION_SHOTS = 4
DEFAULT_ROW = "feature+prompt"  # the Table 1 row of a run without noise flags
RUN_FORMAT = "pini-run/1"
MAX_SEED = 1 << 62


# Options added to the run record after runs were written without them, each with the value
# that is what such a run did: a record without one reads as that value, so an older run
# resumes, evaluates and predicts exactly as it was trained (docs/spec.md §11). Today's defaults
# differ (Dassl's schedule and loader, PyTorch's initialisation of the output layers, the
# authors' prompts and one prompt or text-feature noise draw per step).
OPTIONS_ADDED = {
    "train_config": {"cosine_from": "start", "drop_last": False},
    "pini_config": {
        "head_init": "small",
        "fixed_prompt": "placeholder",
        "prompt_noise_per_step": False,
        "text_feature_noise_per_step": False,
    },
}

# --- resolving what a run is ------------------------------------------------------------------


def _pini_config(request: dict) -> PiNIConfig:
    base = dict(TABLE1[DEFAULT_ROW])
    base.update(request)
    try:
        config = PiNIConfig(**base)
    except ValueError as error:
        raise InputError(str(error)) from None
    fields = dataclasses.asdict(config)
    for key in unused_options(fields):
        if key in request:
            raise InputError(f"{CONFIG_FLAGS[key]} {ROW_OPTIONS[key][1](fields)}")
    return config


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


def resolve_pretrained(pretrained: str | None) -> str | None:
    """A local file as its absolute path; a tag or hf-hub name as given."""
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    return str(path.resolve()) if path.is_file() else pretrained


def check_data_args(args) -> None:
    if args.root is None and args.dataset not in (None, "digits"):
        raise InputError(
            f"--dataset {args.dataset} needs --root, the folder that holds the datasets "
            "(without both, pini uses the bundled digits)"
        )
    if args.root is not None and not Path(args.root).expanduser().is_dir():
        raise InputError(f"--root {args.root}: no such folder")


def load_split(root: str | None, dataset: str | None, *parts: str):
    """The dataset, with images in each of ``parts`` ("train", "test") or an ``InputError``."""
    split = load_dataset(root, dataset)
    split.require(*parts)
    if "train" in parts and len(split.classnames) < 2:
        raise InputError(
            f"dataset {split.name} has one class ({split.classnames[0]}): training a classifier "
            "needs at least two (every prediction would be right)"
        )
    return split


def prompt_template(run: dict, split) -> str:
    from .prompts import template_for

    return run["template"] or template_for(split.name)


def dataset_zero_shot_template(split) -> str:
    from .prompts import zero_shot_template

    return zero_shot_template(split.name)


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> SHA-256, hashed once per process


def weights_digest(pretrained: str | None) -> str | None:
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


def relocated_weights(run: dict, pretrained: str | None) -> dict:
    """``run`` with its weights file at ``pretrained`` instead of the path it recorded, when that
    file has the SHA-256 the run recorded: a run does not depend on where its weights lie. Else
    ``run`` as it is (a file with other weights is then a differing ``--pretrained``)."""
    if pretrained is None or run.get("pretrained_sha256") is None:
        return run
    path = resolve_pretrained(pretrained)
    if path == run["pretrained"] or weights_digest(path) != run["pretrained_sha256"]:
        return run
    return {**run, "pretrained": path}


def _train_config(args, method: str, shots: int, seed: int, split, sweep: bool) -> dict | None:
    """The run's TrainConfig fields (None for a method that is not trained): the flags, else
    the method's demo settings on the embedded default, else the method's paper's.
    ``--momentum`` is SGD's: an error for an AdamW run, in a ``sweep`` left to its SGD runs."""
    spec = METHODS[method]
    if not spec.trains:
        return None
    defaults = spec.training.settings(shots, split.name, len(split.classnames))
    if args.root is None:
        defaults.update(spec.training.demo)
    given = given_options(args, TRAIN_FLAGS)
    defaults.update(given)
    if "momentum" in given and defaults.get("optimizer", "sgd") != "sgd":
        if not sweep:
            raise InputError(
                f"--momentum is SGD's, and this {method} run trains with "
                f"{defaults['optimizer']}: leave it out, or add --optimizer sgd"
            )
        defaults.pop("momentum")
    config = TrainConfig(**defaults, seed=seed)
    return {
        key: value
        for key, value in dataclasses.asdict(config).items()
        if key not in ("num_workers", "progress")
    }


def _crop_scale(method: str, embedded: bool) -> list[float] | None:
    """The random resized crop's scale range of the run's training images (or Tip-Adapter's
    augmented cache); None where no image is augmented."""
    crop_scale = METHODS[method].crop_scale
    if crop_scale is None:
        return None
    if embedded:  # the demo's 32-pixel digits keep at least half of each image in a crop
        return list(demo.CROP_SCALE)
    return list(crop_scale)


def _new_run(
    args, shots: int | None, seed: int | None, split, method: str | None = None, sweep=False
) -> dict:
    """The record of a new run from the arguments and the defaults (PiNI, 16 shots, seed 1).
    ``method``: the sweep's (else ``--method``); PiNI's flags only shape a pini run."""
    method = method or getattr(args, "method", None) or "pini"
    shots = 16 if shots is None else shots
    seed = 1 if seed is None else seed
    embedded = args.root is None
    config = _pini_config(config_request(args)) if method == "pini" else None
    demo_backbone = embedded and args.model is None and args.pretrained is None
    model_name = args.model or ("pini-tiny" if embedded else "ViT-B-16")
    if args.pretrained is None and model_name != "pini-tiny":
        raise InputError(
            f"--pretrained is needed for {model_name}: without CLIP weights the model is random "
            "and its accuracy meaningless (e.g. --pretrained openai, or a weights file)"
        )
    check_weights(model_name, args.pretrained)
    hf_text = hf_text_encoder(model_name)
    if hf_text and METHODS[method].edits_prompts(config):
        rows = [row for row, values in TABLE1.items() if values["text"] != "prompt"]
        methods = [
            name for name, spec in METHODS.items() if spec.baseline and not spec.edits_prompts(None)
        ]
        raise InputError(
            f"{model_name}'s text tower is a Hugging Face text encoder ({hf_text}), which takes "
            "no token embeddings: prompt noise and CoOp cannot run on it; --noise "
            f"{', '.join(rows)} and --method pini, {', '.join(methods)} can"
        )
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
        "pretrained": resolve_pretrained(args.pretrained),
        "pretrained_sha256": weights_digest(resolve_pretrained(args.pretrained)),
        "demo_backbone": demo_backbone,
        "root": _resolve_root(args.root),
        "dataset": split.name,
        "template": args.template if method == "pini" else None,
        "classnames": list(split.classnames),
        "shots": shots,
        "seed": seed,
        "noise": _row_name(config) if config else None,
        "pini_config": dataclasses.asdict(config) if config else None,
        "method_config": METHODS[method].default_options(),
        "crop_scale": _crop_scale(method, embedded),
        "train_config": _train_config(args, method, shots, seed, split, sweep),
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
        isinstance(crop, list)
        and len(crop) == 2
        and all(isinstance(v, (int, float)) and 0 < v <= 1 for v in crop)
        and crop[0] <= crop[1]
    ):
        fail("crop_scale", "null or [low, high] with 0 < low <= high <= 1")
    if not isinstance(run.get("method_config"), dict):
        fail("method_config", "an object")
    sections = (
        ("pini_config", PiNIConfig, run["method"] == "pini", ()),
        ("train_config", TrainConfig, METHODS[run["method"]].trains, ("num_workers", "progress")),
    )
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
            earlier = "; a run of an earlier pini lacks the options added since: train it anew"
            fail(
                key,
                f"an object with every option of the run (missing {missing or 'none'}, "
                f"unknown {extra or 'none'}{earlier if missing else ''})",
            )
        try:
            config(**section)
        except (InputError, TypeError, ValueError) as error:
            raise InputError(f"run record {source}: {key!r}: {error}") from None


def normalized_run(run: dict, source=None) -> dict:
    """A run record with its training options complete and as JSON values, comparable with a
    new one; an option it was written without (``OPTIONS_ADDED``) reads as what the run did, and
    one its row does not use as a new record of that row holds it (``unused_defaults``), so an
    older run differs from a new one only where it trained differently. ``source``: the file it
    was read from; the record is then checked (``_check_record``)."""
    run = dict(run)
    for section, added in OPTIONS_ADDED.items():
        if isinstance(run.get(section), dict):
            run[section] = {**added, **run[section]}
    config = run.get("pini_config")
    if (  # else _check_record refuses it
        isinstance(config, dict)
        and set(config) >= READ_BY_ROW_OPTIONS
        and type(config["num_samples"]) is int
    ):
        run["pini_config"] = {**config, **unused_defaults(config)}
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
        request["pretrained"] = resolve_pretrained(request["pretrained"])
    if shots is not None:
        request["shots"] = shots
    if seed is not None:
        request["seed"] = seed
    return request


def flag_differences(stored: dict, args, shots=None, seed=None, keys=None) -> list[str]:
    """``--flag given`` vs the stored run, for every option the user gave that differs (a
    weights file elsewhere with the run's SHA-256 is the same weights)."""
    stored = relocated_weights(stored, getattr(args, "pretrained", None))
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
            found.append(f"{shown(flag_for(key, args), value)} (the run has {stored.get(key)})")
    for key, value in config_request(args).items():
        flag = shown(flag_for(key, args), value)
        if method != "pini":
            found.append(f"{flag} (the run is {method}: no PiNI options)")
        elif stored["pini_config"].get(key) != value:
            found.append(f"{flag} (the run has {stored['pini_config'].get(key)})")
    if keys is None:
        train_config = stored.get("train_config")
        for key, value in given_options(args, TRAIN_FLAGS).items():
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


def read_stored_run(folder: Path) -> dict | None:
    """The record of the run in ``folder``: from its checkpoint, else from run.json."""
    checkpoint = folder / CHECKPOINT
    if checkpoint.exists():
        run = read_checkpoint(checkpoint).get("run")
        if isinstance(run, dict) and run.get("format") == RUN_FORMAT:
            return normalized_run(run, checkpoint)
        raise InputError(f"checkpoint {checkpoint} has no run record; it cannot be resumed")
    record = folder / RUN_FILE
    if record.exists():
        try:
            run = json.loads(record.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{record} cannot be read ({error})") from None
        if isinstance(run, dict) and run.get("format") == RUN_FORMAT:
            return normalized_run(run, record)
        raise InputError(f"{record} is not a run record this version wrote")
    return None


def default_output(args, shots: int, seed: int) -> Path:
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
        row = args.noise or ("custom" if given_options(args, CONFIG_FLAGS) else DEFAULT_ROW)
    return Path("runs") / f"{name}-{row}-{shots}shot-seed{seed}"


# --- the commands -----------------------------------------------------------------------------


@dataclasses.dataclass
class RunPlan:
    """One run, checked and ready: its folder, its record, its data; ``finished``: the summary
    of a sweep's run that is already done (skipped)."""

    folder: Path
    run: dict
    split: object
    resume: bool
    finished: dict | None = None


def plan_run(args, shots: int | None, seed: int | None, folder: Path, split) -> RunPlan:
    """Checks one run before any work: the folder, and on --resume that every flag matches.
    ``shots``/``seed``: as given (None: the stored run's on --resume, else the defaults)."""
    resume = bool(args.resume)
    stored = read_stored_run(folder) if resume and folder.is_dir() else None
    if resume and stored is None:
        print(f"pini: nothing to resume in {folder}: starting a new run", file=sys.stderr)
        resume = False
        if folder.is_dir() and folder_entries(folder):
            raise InputError(
                f"run folder {folder} holds files but no run record; use --overwrite or "
                "another --output"
            )
    if resume:
        differences = flag_differences(stored, args, shots, seed)
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
        run = relocated_weights(stored, args.pretrained)
    else:
        check_method_flags(args, [args.method or "pini"])
        run = _new_run(args, shots, seed, split)  # checks the options before the folder
        check_folder(folder, overwrite=bool(args.overwrite))
    return RunPlan(folder, run, split, resume)


def plan_sweep_run(args, method: str, shots: int, seed: int, folder: Path, split) -> RunPlan:
    """One run of a sweep, checked before any work: new (an empty or missing folder, or any
    folder with --overwrite), finished (its summary exists: skipped), or unfinished (resumed);
    a stored run of another configuration is an error naming what differs."""
    requested = normalized_run(_new_run(args, shots, seed, split, method, sweep=True))
    stored = None if args.overwrite or not folder.is_dir() else read_stored_run(folder)
    if stored is None:
        check_folder(folder, overwrite=bool(args.overwrite))
        return RunPlan(folder, requested, split, resume=False)
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
            return RunPlan(folder, stored, split, True, json.loads(summary.read_text()))
        except (OSError, ValueError) as error:
            raise InputError(f"{summary} cannot be read ({error}); delete it to rerun") from None
    return RunPlan(folder, stored, split, resume=True)
