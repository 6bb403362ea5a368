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

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .data import ImageList, collate_skipping
from .model import PiNI

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclasses.dataclass
class TrainConfig:
    """The paper's defaults (appendix A.3): SGD, momentum 0.9, weight decay 5e-4, batch 32,
    cosine schedule after one warm-up epoch at a constant 1e-5; lr 0.002, 200 epochs."""

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

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


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
    together see exactly the batches a single process would."""

    def __init__(
        self,
        length: int,
        batch_size: int,
        generator: torch.Generator,
        rank: int = 0,
        world: int = 1,
    ):
        self.length, self.batch_size, self.generator = length, batch_size, generator
        self.rank, self.world = rank, world

    def __iter__(self):
        order = torch.randperm(self.length, generator=self.generator).tolist()
        for start in range(0, self.length, self.batch_size):
            yield order[start : start + self.batch_size][self.rank :: self.world]

    def __len__(self) -> int:
        return -(-self.length // self.batch_size)


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


def save_checkpoint(path: Path, model: PiNI, optimizer, epoch: int, config: TrainConfig) -> None:
    """Only the trainable parameters, the optimizer and where we are; written atomically."""
    state = {
        "epoch": epoch,
        "trainable": {name: p.detach().cpu() for name, p in _trainable(model).items()},
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(config),
        "pini_config": dataclasses.asdict(model.config),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, model: PiNI, optimizer=None) -> int:
    """Restores the trainable parameters (and the optimizer); returns the checkpoint's epoch."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    trainable = _trainable(model)
    missing = set(trainable) ^ set(state["trainable"])
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model: {sorted(missing)}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            trainable[name].copy_(value)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"])


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
) -> dict:
    """Trains the generators of ``model`` on ``samples`` ((source, label) pairs); returns the
    last epoch's metrics. Writes ``metrics.jsonl`` and ``checkpoint.pt`` under ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rank, world = distributed_rank_world()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {world} ranks")
    model.to(device)
    step_module: nn.Module = _LossStep(model)
    if world > 1:
        device_ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
        step_module = DistributedDataParallel(step_module, device_ids=device_ids)
    parameters = list(_trainable(model).values())
    optimizer = torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    start_epoch = 0
    checkpoint = output_dir / CHECKPOINT
    if resume and checkpoint.is_file():
        start_epoch = load_checkpoint(checkpoint, model, optimizer) + 1
    dataset = ImageList(samples, transform)
    metrics: dict = {}
    for epoch in range(start_epoch, config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(epoch, config)
        epoch_seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(epoch_seed)  # augmentations in this process
        order = torch.Generator().manual_seed(epoch_seed)
        loader = DataLoader(
            dataset,
            batch_sampler=GlobalBatches(len(dataset), config.batch_size, order, rank, world),
            num_workers=config.num_workers,
            collate_fn=collate_skipping,
            generator=order,
        )
        model.train()
        total_loss, batches, skipped, started = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
            disable=not config.progress or rank != 0,
        )
        for step, (images, labels, batch_skipped) in enumerate(bar):
            skipped += batch_skipped
            if images is None:
                continue
            images, labels = images.to(device), labels.to(device)
            noise_seed = (epoch_seed + step + rank * RANK_STREAM) % (1 << 62)
            loss = step_module(images, labels, noise_seed)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            batches += 1
            bar.set_postfix(loss=f"{total_loss / batches:.4f}")
        metrics = {
            "epoch": epoch + 1,
            "loss": total_loss / max(batches, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "skipped_images": skipped,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if rank == 0:
            if skipped:
                tqdm.write(f"epoch {epoch + 1}: skipped {skipped} unreadable images")
            with open(output_dir / METRICS, "a") as log:
                log.write(json.dumps(metrics) + "\n")
            save_checkpoint(checkpoint, model, optimizer, epoch, config)
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    return metrics


@torch.no_grad()
def evaluate(
    model: PiNI,
    samples: list[tuple],
    transform,
    *,
    batch_size: int = 64,
    zero_shot: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Accuracy, macro-F1 and per-class accuracy (in %) of PiNI (or zero-shot CLIP) on
    ``samples``; unreadable images are skipped and counted. The inference noise of batch ``i``
    is drawn with seed ``seed + i``, so an evaluation is exactly repeatable."""
    model.to(device).eval()
    loader = DataLoader(
        ImageList(samples, transform), batch_size=batch_size, collate_fn=collate_skipping
    )
    classes = model.token_ids.shape[0]
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    skipped = 0
    batches = tqdm(loader, desc="evaluate", leave=False, disable=not progress)
    for batch_index, (images, labels, batch_skipped) in enumerate(batches):
        skipped += batch_skipped
        if images is None:
            continue
        images = images.to(device)
        if zero_shot:
            logits = model.zero_shot_logits(images)
        else:
            logits = model(images, seed=(seed + batch_index) % (1 << 62))
        predictions = logits.argmax(dim=-1).cpu()
        confusion += torch.bincount(
            labels * classes + predictions, minlength=classes * classes
        ).view(classes, classes)
    correct = confusion.diag().double()
    support = confusion.sum(dim=1).double()
    predicted = confusion.sum(dim=0).double()
    recall = torch.where(support > 0, correct / support.clamp_min(1), torch.zeros_like(correct))
    precision = torch.where(
        predicted > 0, correct / predicted.clamp_min(1), torch.zeros_like(correct)
    )
    f1 = torch.where(
        precision + recall > 0,
        2 * precision * recall / (precision + recall).clamp_min(1e-12),
        torch.zeros_like(correct),
    )
    present = support > 0
    return {
        "accuracy": 100.0 * correct.sum().item() / max(support.sum().item(), 1),
        "macro_f1": 100.0 * f1[present].mean().item() if present.any() else 0.0,
        "per_class_accuracy": (100.0 * recall).tolist(),
        "skipped_images": skipped,
        "samples": int(support.sum().item()),
    }
