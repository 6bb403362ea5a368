"""One PiNI training step (forward, backward, SGD step) with the fused noise path against eager.

The same model, weights and batch twice: ``PiNIConfig(noise_path="fused")`` runs every noise
sample, noisy logit and loss on pini_kernels' ops; ``noise_path="eager"`` computes the same noise
and loss in plain PyTorch as the authors write it (``pini.noise_paths.EagerNoisePath``). For each
Table 1 row and model: the time per step, its peak memory, and the share of the step spent
in the noise path and loss (every call of the model's noise path labelled with
``record_function``, forward and the backward of its ops; ``harness.share_of_step``).

``pini-tiny`` runs on any device; the ViT-B/16 geometry (open_clip's "ViT-B-16" with random
weights, 224x224 images) only on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import statistics

import pytest
import torch

import pini
from pini import PiNI, PiNIConfig
from pini.noise_paths import NOISE_PATH_OPS
from pini_kernels.backends import resolve_backend

from .harness import (
    CHECK_SEED,
    DEVICE,
    INPUT_SEED,
    live_bytes_during,
    machine_name,
    rounds_for,
    share_of_step,
    synchronize,
    time_call,
)

OP = "train_step"
DIRECTION = "forward+backward+optimizer"
ROWS = ("feature", "feature+prompt", "image")
NOISE_PATHS = ("fused", "eager")
NOISE_PATH_RANGE = "pini.noise_path"  # the record_function label of the noise path and loss
NOISE_PATH_METHODS = ("inject", "sample_noise", "noisy_cosine_logits", "noisy_cross_entropy")
# The fused and eager losses and gradients differ only in float rounding; through ViT-B/16's
# twelve text layers on a GPU the gradients of the prompt noise gather more of it.
LOSS_TOLERANCE = dict(atol=1e-5, rtol=1e-5)
GRADIENT_TOLERANCE = (
    dict(atol=1e-5, rtol=1e-4) if DEVICE.type == "cpu" else dict(atol=1e-4, rtol=1e-3)
)


@dataclasses.dataclass(frozen=True)
class StepCase:
    model: str  # an open_clip model name, random weights
    batch: int
    classes: int  # 37: Oxford Pets, one of the paper's datasets
    num_samples: int  # m; the paper trains with one
    needs_gpu: bool

    def describe(self, row: str) -> str:
        return (
            f"{self.model} (random weights), Table 1 row {row}, batch {self.batch}, "
            f"{self.classes} classes, m = {self.num_samples}; SGD (momentum 0.9, weight decay 5e-4)"
        )


# m = 1 as in the paper, and Eq. (13)'s m = 4 and 8 noise samples per image, where the noise path
# and loss are a larger share of the step.
CASES = {
    f"{model}-B32-C37{'' if m == 1 else f'-m{m}'}": StepCase(model, 32, 37, m, needs_gpu=gpu)
    for model, gpu in (("pini-tiny", False), ("ViT-B-16", True))
    for m in (1, 4, 8)
}


@functools.cache
def _backbone(name: str):
    """(clip, tokenizer) with random weights, built once per session and device."""
    torch.manual_seed(INPUT_SEED)
    return pini.build_clip(name, device=DEVICE)


def _model(case: StepCase, row: str, noise_path: str) -> PiNI:
    """The row's PiNI in train mode; generators initialized alike for every noise path."""
    clip, tokenizer = _backbone(case.model)
    config = PiNIConfig.table1(row, num_samples=case.num_samples, noise_path=noise_path)
    classnames = [f"class {index}" for index in range(case.classes)]
    torch.manual_seed(INPUT_SEED)
    return PiNI(clip, tokenizer, classnames, pini.template_for("oxford_pets"), config).train()


def _batch(case: StepCase) -> tuple[torch.Tensor, torch.Tensor]:
    clip, _ = _backbone(case.model)
    size = clip.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    generator = torch.Generator().manual_seed(INPUT_SEED)
    images = torch.randn(case.batch, 3, *size, generator=generator)
    labels = torch.randint(0, case.classes, (case.batch,), generator=generator)
    return images.to(DEVICE), labels.to(DEVICE)


def _loss_and_gradients(model: PiNI, images, labels, seed: int):
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = model.loss(images, labels, seed=seed)
    return loss.detach(), torch.autograd.grad(loss, trainable)


def _check_against_eager(case: StepCase, row: str, model: PiNI, images, labels) -> None:
    """The fused step's loss and every generator gradient equal the eager noise path's."""
    eager = _model(case, row, "eager")
    fused_loss, fused_gradients = _loss_and_gradients(model, images, labels, CHECK_SEED)
    eager_loss, eager_gradients = _loss_and_gradients(eager, images, labels, CHECK_SEED)
    torch.testing.assert_close(fused_loss, eager_loss, **LOSS_TOLERANCE)
    for index, (fused, expected) in enumerate(zip(fused_gradients, eager_gradients, strict=True)):
        torch.testing.assert_close(
            fused,
            expected,
            **GRADIENT_TOLERANCE,
            msg=lambda message, index=index: f"gradient {index}: {message}",
        )


@contextlib.contextmanager
def _labelled_noise_path(noise_path: str):
    """Every call of the noise path's methods inside a ``record_function(NOISE_PATH_RANGE)``."""
    ops = NOISE_PATH_OPS[noise_path]

    def labelled(method):
        @functools.wraps(method)
        def call(*args, **kwargs):
            with torch.profiler.record_function(NOISE_PATH_RANGE):
                return method(*args, **kwargs)

        return call

    for name in NOISE_PATH_METHODS:
        setattr(ops, name, labelled(getattr(ops, name)))
    try:
        yield
    finally:
        for name in NOISE_PATH_METHODS:
            delattr(ops, name)  # back to the class's methods


def _training_step(model: PiNI, images, labels):
    """(step, optimizer): one SGD step of ``model`` on the batch (a new noise seed each step)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.002, momentum=0.9, weight_decay=5e-4)
    seeds = itertools.count(CHECK_SEED)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(images, labels, seed=next(seeds)).backward()
        optimizer.step()

    return step, optimizer


def _interleaved_medians(fused_step, eager_step, seconds_per_step: float) -> tuple[float, float]:
    """Median seconds of the fused and the eager step timed alternately (the order swapping each
    round), so a machine that slows down or speeds up during the run moves both alike: on a
    shared CPU the two separate timings drift by more than the difference between the paths."""
    pairs = max(10, min(200, int(3.0 / max(seconds_per_step, 1e-6))))
    times: dict[str, list[float]] = {"fused": [], "eager": []}
    steps = {"fused": fused_step, "eager": eager_step}
    for index in range(pairs):
        for name in ("fused", "eager") if index % 2 else ("eager", "fused"):
            times[name].append(time_call(steps[name]))
    return statistics.median(times["fused"]), statistics.median(times["eager"])


@pytest.mark.parametrize("noise_path", NOISE_PATHS)
@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_train_step(benchmark, case_name: str, row: str, noise_path: str):
    case = CASES[case_name]
    if case.needs_gpu and DEVICE.type != "cuda":
        pytest.skip(
            f"{case.model} geometry (random weights, batch {case.batch}) runs only on a GPU; "
            "this run is on a CPU, where pini-tiny stands in"
        )
    model = _model(case, row, noise_path)
    images, labels = _batch(case)
    if noise_path == "fused":
        _check_against_eager(case, row, model, images, labels)
    step, optimizer = _training_step(model, images, labels)
    step()  # the optimizer's momentum buffers, Triton's compilation
    # The fastest of three: one step slowed by a busy machine must not cut the rounds.
    seconds_per_step = min(time_call(step) for _ in range(3))
    interleaved = None
    if noise_path == "fused":
        eager_step, _ = _training_step(_model(case, row, "eager"), images, labels)
        eager_step()
        interleaved = _interleaved_medians(step, eager_step, seconds_per_step)
    optimizer.zero_grad(set_to_none=True)  # the measured step starts without gradients
    _, peak_bytes, retained_bytes = live_bytes_during(step)
    with _labelled_noise_path(noise_path):
        share = share_of_step(step, NOISE_PATH_RANGE)

    def synchronized_step() -> None:
        step()
        synchronize()

    benchmark.group = f"{OP} {case_name} {row}"
    provider = f"fused-{resolve_backend(None, DEVICE)}" if noise_path == "fused" else "eager"
    benchmark.extra_info.update(
        op=OP,
        direction=DIRECTION,
        case=f"{row}, {case_name}",
        provider=provider,
        description=case.describe(row),
        device=DEVICE.type,
        machine=machine_name(),
        peak_bytes=peak_bytes,
        retained_bytes=retained_bytes,  # after the step: the gradients and momentum it made
        noise_loss_share=share.share,
        noise_loss_seconds=share.labelled_seconds,
        profiled_step_seconds=share.step_seconds,
        share_method=share.method,
        checked=noise_path == "fused",
    )
    if interleaved is not None:
        benchmark.extra_info.update(
            interleaved_fused_seconds=interleaved[0], interleaved_eager_seconds=interleaved[1]
        )
    benchmark.pedantic(
        synchronized_step,
        rounds=rounds_for(seconds_per_step),
        iterations=1,
        warmup_rounds=1 if DEVICE.type == "cuda" else 0,
    )
