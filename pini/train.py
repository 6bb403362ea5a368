"""The few-shot trainer: SGD with a constant warm-up epoch then a cosine schedule, metrics to
JSONL and CSV (``pini.metrics_log``), atomic checkpoints of the trainable parameters, exact
resume; a progress bar per epoch on a terminal, else one line per epoch (``pini.progress``).

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
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .checkpoint import CHECKPOINT, load_checkpoint, read_checkpoint, save_checkpoint
from .data.image_list import ImageList, collate_skipping
from .errors import InputError, RunDiverged
from .methods.base import TrainableModel
from .metrics_log import METRICS, MetricsLog
from .progress import epoch_line, say, show_bars

__all__ = ["METRICS", "TrainConfig", "lr_factor", "train"]

OPTIMIZERS = ("sgd", "adamw")
# Where the cosine schedule counts its epochs from: "warmup-end" (Dassl's: the CosineAnnealingLR
# behind its ConstantWarmupScheduler starts counting when the warm-up ends, so the first epoch
# after it runs at ``lr``), or "start" (counted from epoch 0, as pini counted before it followed
# Dassl: one epoch ahead of Dassl's after one warm-up epoch).
COSINE_FROM = ("warmup-end", "start")
# Tip-Adapter-F's AdamW (its main.py): eps 1e-4 instead of PyTorch's 1e-8.
ADAMW_EPS = 1e-4


@dataclasses.dataclass
class TrainConfig:
    """The paper's defaults (appendix A.3): SGD, batch 32, a cosine schedule after one warm-up
    epoch at a constant 1e-5, lr 0.002, 200 epochs. Momentum 0.9 and weight decay 5e-4 are
    Dassl's defaults (the authors' code base): the paper does not state them. ``optimizer``
    "adamw" is AdamW with ``weight_decay`` and eps ``ADAMW_EPS`` (Tip-Adapter-F's).
    ``cosine_from`` and ``drop_last`` follow Dassl's trainer (docs/spec.md §10): the cosine
    counted from the end of the warm-up, and an epoch's last partial batch dropped where the
    training set holds at least ``batch_size`` images."""

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
    cosine_from: str = "warmup-end"  # or "start" (see COSINE_FROM)
    drop_last: bool = True  # Dassl's train loader: drop_last when len(data) >= batch_size

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.cosine_from not in COSINE_FROM:
            raise InputError(f"cosine_from must be one of {COSINE_FROM}, got {self.cosine_from!r}")
        if not isinstance(self.drop_last, bool):
            raise InputError(f"drop_last must be true or false, got {self.drop_last!r}")
        for name in ("epochs", "batch_size", "warmup_epochs"):
            value = getattr(self, name)
            minimum = 0 if name == "warmup_epochs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("lr", "warmup_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InputError(f"{name} must be a finite number > 0, got {value!r}")
        for name, low, high in (("momentum", 0.0, 1.0), ("weight_decay", 0.0, math.inf)):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not low <= value < high:
                raise InputError(f"{name} must be a number in [{low:g}, {high:g}), got {value!r}")


def lr_factor(epoch: int, config: TrainConfig) -> float:
    """Multiplier of ``lr`` in ``epoch`` (from 0): ``warmup_epochs`` at a constant ``warmup_lr``,
    then a cosine over ``epochs`` (Dassl's ``CosineAnnealingLR(T_max=epochs)``), counted from
    the end of the warm-up (``cosine_from="warmup-end"``, Dassl's) or from epoch 0 ("start")."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr / config.lr
    counted = epoch - config.warmup_epochs if config.cosine_from == "warmup-end" else epoch
    return 0.5 * (1.0 + math.cos(math.pi * counted / config.epochs))


# Under torch.distributed, rank r draws its noise from seed + r * RANK_STREAM (its own streams).
RANK_STREAM = 1_000_000_007


class GlobalBatches(Sampler):
    """One permutation of the data per epoch (from ``generator``), cut into global batches of
    ``batch_size``; each rank takes every ``world``-th sample of each global batch, so the ranks
    together see exactly the batches a single process would. With ``drop_last`` (Dassl's train
    loader) a last global batch smaller than ``batch_size`` is left out, where there is a full
    one before it: 37 images give batches [32], 20 images [20].

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
        drop_last: bool = False,
    ):
        order = torch.randperm(length, generator=generator).tolist()
        self.batches: list[list[int]] = []
        self.shares: list[tuple[int, int]] = []
        end = length - length % batch_size if drop_last and length >= batch_size else length
        for start in range(0, end, batch_size):
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

    def __init__(self, model: TrainableModel):
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


def _trainable(model: TrainableModel) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters, lr=config.lr, weight_decay=config.weight_decay, eps=ADAMW_EPS
        )
    return torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def _image_size(model: TrainableModel) -> tuple[int, int]:
    size = model.clip.visual.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def train(
    model: TrainableModel,
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
    tensorboard: bool = False,
) -> dict:
    """Trains the generators of ``model`` on ``samples`` ((source, label) pairs); returns the
    last epoch's metrics. Writes ``metrics.jsonl``, ``metrics.csv`` (and with ``tensorboard``
    TensorBoard scalars) and ``checkpoint.pt`` under ``output_dir``
    (``run``, the command's resolved options, is stored in the checkpoint). Without ``resume``,
    a folder that already holds a checkpoint is refused: nothing is overwritten. With
    ``evaluator`` (rank 0), every ``evaluate_every`` epochs its test accuracy is recorded as the
    metrics' ``test_accuracy``; it does not change the training (each epoch reseeds). A loss
    that is NaN or infinite (on any rank), or a trained parameter that is after an epoch, raises
    ``RunDiverged`` before anything non-finite is logged or saved: the checkpoint on disk stays
    the last finite one. With ``config.progress`` (rank 0), each epoch ends with a line of its
    metrics on stderr, after its progress bar where stderr is a terminal."""
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
    log = MetricsLog(output_dir, start_epoch, tensorboard=tensorboard) if rank == 0 else None
    with log if log is not None else contextlib.nullcontext():
        dataset = ImageList(samples, transform)
        blank_image = torch.zeros(1, 3, *_image_size(model))
        metrics: dict = {}
        for epoch in range(start_epoch, config.epochs):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(epoch, config)
            epoch_seed = _epoch_seed(config.seed, epoch)
            torch.manual_seed(epoch_seed)  # augmentations in this process
            order = torch.Generator().manual_seed(epoch_seed)
            batches = GlobalBatches(
                len(dataset), config.batch_size, order, rank, world, config.drop_last
            )
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
                leave=True,  # the bar of each epoch stays, its summary line below it
                disable=not show_bars(config.progress and rank == 0),
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
                log.append(metrics)
                save_checkpoint(checkpoint, model, optimizer, epoch, config, run)
                say(epoch_line(metrics, config.epochs), config.progress)
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
    broken = [
        name for name, value in _trainable(model).items() if not bool(torch.isfinite(value).all())
    ]
    if broken:
        raise RunDiverged(
            f"training diverged in epoch {epoch + 1}: {len(broken)} trained parameter(s) hold "
            f"NaN or inf ({', '.join(broken[:3])}) (a lower --lr may help)",
            epoch=epoch + 1,
            step=None,
        )
