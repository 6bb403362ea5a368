"""The few-shot trainer: SGD with a constant warm-up epoch then a cosine schedule, metrics to
JSONL, atomic checkpoints of the trainable parameters, exact resume.

Reproducibility: the data order, the augmentations and the noise seeds of epoch ``e`` are derived
from ``(seed, e)`` and the step, not from state carried between epochs, so a run resumed from the
checkpoint of epoch ``e`` replays epochs ``e+1..`` exactly as an uninterrupted run does.

Multi-process (``torchrun``; NCCL on GPUs, gloo on CPU): every rank takes its share of each global
batch of ``batch_size`` and DistributedDataParallel averages the gradients, so the optimizer sees
the global batch's mean gradient, as in one process. The one difference, by design: each rank
draws its noise from its own stream (``seed + rank * RANK_STREAM``), so the noise samples differ
from a single-process run's; with the noise switched off the two runs agree to float rounding
(tests/test_pini_training.py). Rank 0 writes metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .data import EncodedImages, ImageList, collate_skipping
from .errors import InputError, RunDiverged
from .files import replace_atomically, write_text_atomically
from .model import PiNI

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
OPTIMIZERS = ("sgd", "adamw")
# Tip-Adapter-F's AdamW (its main.py): eps 1e-4 instead of PyTorch's 1e-8.
ADAMW_EPS = 1e-4


@dataclasses.dataclass
class TrainConfig:
    """The paper's defaults (appendix A.3): SGD, batch 32, a cosine schedule after one warm-up
    epoch at a constant 1e-5, lr 0.002, 200 epochs. Momentum 0.9 and weight decay 5e-4 are
    Dassl's defaults (the authors' code base): the paper does not state them. ``optimizer``
    "adamw" is AdamW with ``weight_decay`` and eps ``ADAMW_EPS`` (Tip-Adapter-F's)."""

    epochs: int = 200
    lr: float = 0.002
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    seed: int = 1
    num_workers: int = 0
    progress: bool = True
    optimizer: str = "sgd"  # or "adamw" (Tip-Adapter-F's; ``momentum`` is then unused)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "warmup_epochs"):
            value = getattr(self, name)
            minimum = 0 if name == "warmup_epochs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("lr", "warmup_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InputError(f"{name} must be a finite number > 0, got {value!r}")


def lr_factor(epoch: int, config: TrainConfig) -> float:
    """Multiplier of ``lr`` in ``epoch``: warm-up at a constant ``warmup_lr``, then cosine."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr / config.lr
    return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))


# Under torch.distributed, rank r draws its noise from seed + r * RANK_STREAM (its own streams).
RANK_STREAM = 1_000_000_007


class GlobalBatches(Sampler):
    """One permutation of the data per epoch (from ``generator``), cut into global batches of
    ``batch_size``; each rank takes every ``world``-th sample of each global batch, so the ranks
    together see exactly the batches a single process would.

    Every rank takes part in every step, even where the last global batch leaves it no sample
    (100 samples, batch 32, 8 ranks: the tail of 4 gives ranks 4..7 nothing): it then gets an
    empty share and contributes a zero loss. ``shares[step]`` is ``(samples of this rank, samples
    of the global batch)``, from which the trainer weights each rank's loss so that the gradient
    is the mean over the samples actually in the global batch."""

    def __init__(
        self,
        length: int,
        batch_size: int,
        generator: torch.Generator,
        rank: int = 0,
        world: int = 1,
    ):
        order = torch.randperm(length, generator=generator).tolist()
        self.batches: list[list[int]] = []
        self.shares: list[tuple[int, int]] = []
        for start in range(0, length, batch_size):
            global_batch = order[start : start + batch_size]
            mine = global_batch[rank::world]
            self.batches.append(mine)
            self.shares.append((len(mine), len(global_batch)))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _LossStep(nn.Module):
    """model.loss as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: PiNI):
        super().__init__()
        self.model = model

    def forward(self, images, labels, seed):
        return self.model.loss(images, labels, seed=seed)


def distributed_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (1 << 62)


def _trainable(model: PiNI) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def generator_state(model: PiNI) -> dict[str, torch.Tensor]:
    """What training changes: every entry of the model's state dict outside the frozen CLIP (the
    generators' parameters and buffers, e.g. BatchNorm statistics), on the CPU."""
    return {
        name: value.detach().cpu()
        for name, value in model.state_dict().items()
        if not name.startswith("clip.")
    }


# Written into every checkpoint; a file without it is not one of ours (or an older format).
CHECKPOINT_FORMAT = "pini-run-checkpoint/2"


def save_checkpoint(
    path: Path,
    model: PiNI,
    optimizer,
    epoch: int,
    config: TrainConfig,
    run: dict | None = None,
) -> None:
    """The generators' state, the optimizer, where we are and what the run is (``run``: the
    resolved options of the command that started it; its "method", "pini" if absent, is also
    stored as the checkpoint's "method"); written atomically."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "method": (run or {}).get("method", "pini"),
        "epoch": epoch,
        "generators": generator_state(model),
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(config),
        "pini_config": dataclasses.asdict(model.config),
        "run": run or {},
    }
    _save_atomically(path, state)


def save_fitted_checkpoint(
    path: Path, method: str, fitted_state: dict, method_config: dict, run: dict
) -> None:
    """The checkpoint of a method that is fitted or built rather than trained (zero-shot CLIP,
    the linear probe, Tip-Adapter): the same format as ``save_checkpoint``'s, its "method",
    ``fitted_state`` (the method's ``state_dict()``, empty for zero-shot CLIP) where a trained
    run has its generators' state, epoch 0 and no optimizer; written atomically."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "method": method,
        "epoch": 0,
        "generators": fitted_state,
        "optimizer": {},
        "train_config": {},
        "pini_config": method_config,
        "run": run,
    }
    _save_atomically(path, state)


def update_checkpoint_state(path: Path, model: nn.Module) -> None:
    """Replaces the trained state in the checkpoint at ``path`` by ``model``'s (e.g. what a
    search after training changed: Tip-Adapter-F's alpha and beta); the rest is kept."""
    state = read_checkpoint(path)
    state["generators"] = generator_state(model)
    _save_atomically(path, state)


def _save_atomically(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda temporary: torch.save(state, temporary))


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``save_checkpoint``, checked; ``InputError`` (one line naming the
    file and what it holds instead) for anything else: a missing, truncated, empty or foreign
    file, or CLIP weights."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file (expected RUN/{CHECKPOINT})")
    if path.stat().st_size == 0:
        raise InputError(f"checkpoint {path} is empty (0 bytes): the run was never saved")
    try:
        with warnings.catch_warnings():  # a foreign file is reported below, in one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps every failure of a weights-only load in this error: only a global that is
        # not a tensor type (a class, a function: a payload) says "Unsupported global".
        if "unsupported global" not in str(error).lower():
            raise InputError(
                f"checkpoint {path} cannot be read (UnpicklingError): it is truncated, corrupt or "
                f"not a file torch.save wrote; expected RUN/{CHECKPOINT}"
            ) from None
        raise InputError(
            f"checkpoint {path} holds pickled objects beyond tensors (code, possibly), which pini "
            f"never loads: it is not the {CHECKPOINT} that `pini train` writes"
        ) from None
    except Exception as error:  # torch raises many types for a corrupt archive
        raise InputError(
            f"checkpoint {path} cannot be read ({type(error).__name__}): it is truncated, "
            f"corrupt or not a file torch.save wrote; expected RUN/{CHECKPOINT}"
        ) from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        for key, kind in (("epoch", int), ("generators", dict), ("pini_config", dict)):
            if not isinstance(state.get(key), kind):
                raise InputError(f"checkpoint {path} is damaged: {key!r} is missing or malformed")
        return state
    if isinstance(state, dict) and "trainable" in state and "pini_config" in state:
        raise InputError(
            f"checkpoint {path} was written by an older pini (no run record); "
            "train it again with this version"
        )
    looks_like_weights = isinstance(state, dict) and any(
        isinstance(key, str) and key.split(".")[0] in _CLIP_KEYS for key in state
    )
    what = "CLIP weights (give those to --pretrained)" if looks_like_weights else "something else"
    raise InputError(
        f"checkpoint {path} is not a pini run checkpoint: it holds {what}; "
        f"expected the {CHECKPOINT} that `pini train` writes into its run folder"
    )


_CLIP_KEYS = {"visual", "transformer", "token_embedding", "positional_embedding", "logit_scale"}


def load_checkpoint(checkpoint: str | Path | dict, model: PiNI, optimizer=None) -> int:
    """Restores the generators' state (and the optimizer) from a checkpoint (a path, or what
    ``read_checkpoint`` returned); returns the checkpoint's epoch. A checkpoint of another model
    (other generators or shapes) is an ``InputError`` naming what differs."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    expected = generator_state(model)
    stored = state["generators"]
    if set(expected) != set(stored):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise InputError(
            "the checkpoint's generators do not match the model: "
            f"missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, value in expected.items():
        if stored[name].shape != value.shape:
            raise InputError(
                f"the checkpoint's {name} has shape {tuple(stored[name].shape)}, the model "
                f"expects {tuple(value.shape)} (another class list, template or model?)"
            )
    model.load_state_dict(stored, strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"])


def _optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters, lr=config.lr, weight_decay=config.weight_decay, eps=ADAMW_EPS
        )
    return torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def _keep_metrics_through(path: Path, epochs_done: int) -> None:
    """Drops metric lines past the checkpoint (a kill between the metrics append and the
    checkpoint write leaves an epoch that will run again) and any torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(epoch, int) and epoch <= epochs_done:
            kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def _image_size(model: PiNI) -> tuple[int, int]:
    size = model.clip.visual.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def train(
    model: PiNI,
    samples: list[tuple],
    transform,
    config: TrainConfig,
    output_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[dict], None] | None = None,
    run: dict | None = None,
    evaluate_every: int = 0,
    evaluator: Callable[[], float] | None = None,
) -> dict:
    """Trains the generators of ``model`` on ``samples`` ((source, label) pairs); returns the
    last epoch's metrics. Writes ``metrics.jsonl`` and ``checkpoint.pt`` under ``output_dir``
    (``run``, the command's resolved options, is stored in the checkpoint). Without ``resume``,
    a folder that already holds a checkpoint is refused: nothing is overwritten. With
    ``evaluator`` (rank 0), every ``evaluate_every`` epochs its test accuracy is recorded as the
    metrics' ``test_accuracy``; it does not change the training (each epoch reseeds). A loss
    that is NaN or infinite (on any rank), or a trained parameter that is after an epoch, raises
    ``RunDiverged`` before anything non-finite is logged or saved: the checkpoint on disk stays
    the last finite one."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rank, world = distributed_rank_world()
    checkpoint = output_dir / CHECKPOINT
    if not resume and checkpoint.exists():
        raise InputError(
            f"{output_dir} already holds a run ({CHECKPOINT}); resume it or use another folder"
        )
    if not samples:
        raise InputError("no training samples: the few-shot split is empty")
    model.to(device)
    step_module: nn.Module = _LossStep(model)
    if world > 1:
        device_ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
        step_module = DistributedDataParallel(step_module, device_ids=device_ids)
    optimizer = _optimizer(list(_trainable(model).values()), config)
    start_epoch = 0
    if resume and checkpoint.is_file():
        start_epoch = load_checkpoint(read_checkpoint(checkpoint), model, optimizer) + 1
    if rank == 0:
        _keep_metrics_through(output_dir / METRICS, start_epoch)
    dataset = ImageList(samples, transform)
    blank_image = torch.zeros(1, 3, *_image_size(model))
    metrics: dict = {}
    for epoch in range(start_epoch, config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(epoch, config)
        epoch_seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(epoch_seed)  # augmentations in this process
        order = torch.Generator().manual_seed(epoch_seed)
        batches = GlobalBatches(len(dataset), config.batch_size, order, rank, world)
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=config.num_workers,
            collate_fn=collate_skipping,
            generator=order,
        )
        model.train()
        total_loss, trained, skipped, started = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
            disable=not config.progress or rank != 0,
        )
        for step, (images, labels, batch_skipped) in enumerate(bar):
            skipped += batch_skipped
            kept = 0 if images is None else images.shape[0]
            if kept == 0:
                if world == 1:
                    continue
                # Every rank joins every all-reduce: an empty share steps with a zero weight.
                images, labels = blank_image, torch.zeros(1, dtype=torch.long)
            # DDP averages over ranks: weight each rank's mean by its share of the global batch,
            # so the step's gradient is the mean over the samples actually in it.
            weight = kept * world / batches.shares[step][1] if world > 1 else 1.0
            images, labels = images.to(device), labels.to(device)
            noise_seed = (epoch_seed + step + rank * RANK_STREAM) % (1 << 62)
            loss = step_module(images, labels, noise_seed)
            value = loss.item()
            _stop_unless_finite(value if kept else 0.0, epoch, step, world, device)
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            optimizer.step()
            if kept:
                total_loss += value * kept
                trained += kept
                bar.set_postfix(loss=f"{total_loss / trained:.4f}")
        trained_everywhere = trained
        if world > 1:
            count = torch.tensor([trained], dtype=torch.long, device=device)
            dist.all_reduce(count)
            trained_everywhere = int(count.item())
        if trained_everywhere == 0:
            raise InputError(
                f"epoch {epoch + 1}: no training image could be read ({skipped} skipped, "
                "see the warnings above); nothing was trained"
            )
        _stop_unless_parameters_finite(model, epoch)  # every rank holds the same parameters
        metrics = {
            "epoch": epoch + 1,
            "loss": total_loss / max(trained, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "skipped_images": skipped,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if evaluator is not None and evaluate_every and (epoch + 1) % evaluate_every == 0:
            metrics["test_accuracy"] = evaluator()
        if rank == 0:
            if skipped:
                tqdm.write(f"epoch {epoch + 1}: skipped {skipped} unreadable images")
            with open(output_dir / METRICS, "a") as log:
                log.write(json.dumps(metrics) + "\n")
            save_checkpoint(checkpoint, model, optimizer, epoch, config, run)
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    return metrics


def _stop_unless_finite(loss: float, epoch: int, step: int, world: int, device) -> None:
    """Raises RunDiverged when this step's loss is NaN or infinite on any rank (every rank joins
    one all-reduce of the verdict, so all stop together), before the step changes anything."""
    finite = math.isfinite(loss)
    everywhere = finite
    if world > 1:
        verdict = torch.tensor([int(finite)], dtype=torch.int32, device=device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
        everywhere = bool(verdict.item())
    if not everywhere:
        what = f"the loss is {loss}" if not finite else "another rank's loss is not finite"
        raise RunDiverged(
            f"training diverged at epoch {epoch + 1}, step {step + 1}: {what} (a lower --lr "
            "may help)",
            epoch=epoch + 1,
            step=step + 1,
        )


def _stop_unless_parameters_finite(model: nn.Module, epoch: int) -> None:
    """Raises RunDiverged when a trained parameter holds NaN or inf after ``epoch``, before its
    checkpoint would replace the last finite one."""
    broken = [name for name, value in _trainable(model).items()
              if not bool(torch.isfinite(value).all())]  # fmt: skip
    if broken:
        raise RunDiverged(
            f"training diverged in epoch {epoch + 1}: {len(broken)} trained parameter(s) hold "
            f"NaN or inf ({', '.join(broken[:3])}) (a lower --lr may help)",
            epoch=epoch + 1,
            step=None,
        )


@contextlib.contextmanager
def features_in_place_of_images(clip: nn.Module):
    """While active, ``clip.encode_image(x)`` returns ``x``: the image tower is replaced by the
    identity, so a model that encodes its images with the frozen CLIP (PiNI without image-level
    noise, the baselines' modules) can be given their precomputed features (B, D) instead."""
    visual = clip.visual
    clip.visual = nn.Identity()
    try:
        yield
    finally:
        clip.visual = visual


def _perturbs_images(model) -> bool:
    """Whether ``model`` changes raw images (PiNI's image-level noise): then its logits cannot
    come from features encoded beforehand."""
    return getattr(getattr(model, "config", None), "visual", None) == "image"


@torch.no_grad()
def evaluate(
    model,
    samples: list[tuple],
    transform,
    *,
    batch_size: int = 64,
    zero_shot: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
    class_subset: list[int] | None = None,
    features: EncodedImages | None = None,
) -> dict:
    """Accuracy, macro-F1 and per-class accuracy (in %) of ``model`` (or of zero-shot CLIP) on
    ``samples``; unreadable images are skipped and counted. The inference noise of batch ``i``
    is drawn with seed ``seed + i``, so an evaluation is exactly repeatable. ``class_subset``
    (indices into the model's classes, e.g. ImageNet-A's 200 of ImageNet's 1000) restricts the
    prediction to those classes. No readable image at all is an ``InputError``. Macro-F1 is
    over the classes that have test images (``macro_f1``).

    ``model``: PiNI, a module of ``pini.baselines`` (``forward(images, seed)``,
    ``zero_shot_logits``), or a fitted method with only ``logits(features)`` and
    ``num_classes`` (``LinearProbe``, ``TipAdapter``; needs ``features``). ``features``: the
    frozen image features of ``samples`` (``pini.data.encode_samples`` with this ``transform``
    and ``batch_size``), used instead of the images; batch i then holds the same images with the
    same noise seed, so the result is the one the images give. Not for PiNI with image-level
    noise, which perturbs the images themselves.
    """
    module = isinstance(model, nn.Module)
    if features is None and not module:
        raise ValueError(
            f"a {type(model).__name__} predicts from features: pass features=encode_samples(...)"
        )
    if features is not None:
        if _perturbs_images(model):
            raise ValueError("features cannot stand in for images under image-level noise")
        if features.batch_size != batch_size:
            raise ValueError(
                f"features were encoded in batches of {features.batch_size}, batch_size is "
                f"{batch_size}: the per-batch noise seeds would not match"
            )
        if features.features.shape[0] + features.skipped != len(samples):
            raise ValueError(
                f"features hold {features.features.shape[0]} rows and {features.skipped} "
                f"skipped images, samples has {len(samples)}"
            )
    if module:
        model.to(device).eval()
    classes = model.num_classes
    subset = None if class_subset is None else torch.tensor(class_subset, dtype=torch.long)
    if features is not None:
        batches = ((index, rows, labels, 0) for index, rows, labels in features.batches())
        skipped = features.skipped
        bypass = features_in_place_of_images(model.clip) if module else contextlib.nullcontext()
    else:
        loader = DataLoader(
            ImageList(samples, transform), batch_size=batch_size, collate_fn=collate_skipping
        )
        batches, skipped, bypass = _image_batches(loader), 0, contextlib.nullcontext()
    all_labels, all_predictions = [], []
    with bypass:
        for batch_index, inputs, labels, batch_skipped in tqdm(
            batches, desc="evaluate", leave=False, disable=not progress
        ):
            skipped += batch_skipped
            if inputs is None:
                continue
            inputs = inputs.to(device)
            if zero_shot:
                logits = model.zero_shot_logits(inputs)
            elif module:
                logits = model(inputs, seed=(seed + batch_index) % (1 << 62))
            else:
                logits = model.logits(inputs)
            if subset is None:
                predictions = logits.argmax(dim=-1).cpu()
            else:
                predictions = subset[logits[:, subset.to(logits.device)].argmax(dim=-1).cpu()]
            all_labels.append(labels.cpu())
            all_predictions.append(predictions)
    if not all_labels:
        raise InputError(f"no image to evaluate: {len(samples)} test samples, {skipped} unreadable")
    confusion = confusion_matrix(torch.cat(all_labels), torch.cat(all_predictions), classes)
    support = confusion.sum(dim=1)
    recall = [
        100.0 * int(confusion[label, label]) / int(support[label]) if support[label] else 0.0
        for label in range(classes)
    ]
    return {
        "accuracy": 100.0 * int(confusion.trace()) / int(support.sum()),
        "macro_f1": 100.0 * macro_f1(confusion),
        "per_class_accuracy": recall,
        "skipped_images": skipped,
        "samples": int(support.sum()),
    }


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) int64 counts: row = true label, column = predicted label.
    labels, predictions: (N,) class indices in [0, classes)."""
    pairs = labels.to(torch.int64) * classes + predictions.to(torch.int64)
    return torch.bincount(pairs, minlength=classes * classes).view(classes, classes)


def macro_f1(confusion: torch.Tensor) -> float:
    """The unweighted mean over the classes that have test images of F1 = 2 TP / (support +
    predicted), i.e. 2PR / (P + R), 0 where a class was never predicted right (scikit-learn's
    ``f1_score(labels=<classes with support>, average="macro", zero_division=0)``)."""
    support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    present = support > 0
    true_positives = confusion.diagonal().to(torch.float64)
    scores = 2 * true_positives[present] / (support[present] + predicted[present])
    return float(scores.mean()) if scores.numel() else 0.0


def _image_batches(loader: DataLoader):
    """(batch index, images, labels, skipped images) per loader batch."""
    for index, (images, labels, skipped) in enumerate(loader):
        yield index, images, labels, skipped
