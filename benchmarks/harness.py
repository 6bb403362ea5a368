"""What every benchmark shares: the device and machine, the providers, memory, the floor, the run.

A benchmark case is one op on one shape, run by each provider on the same inputs:

- ``fused-<backend>``: the ``pini_kernels`` op on every available backend that runs on the
  benchmark device (never Triton's interpreter; on a CPU, ``reference`` only while no native
  ``cpu`` backend is built);
- ``eager``: the eager PyTorch baseline of ``benchmarks/baselines.py``;
- ``compiled``: ``torch.compile`` of that baseline, compiled before the timing starts.

``run_case`` times the call with pytest-benchmark (median and spread over a few rounds), measures
its peak memory once, and stores what the report needs in ``benchmark.extra_info``.
"""

from __future__ import annotations

import os

# Never benchmark Triton's interpreter: it is a correctness tool, thousands of times slower. This
# must happen before pini_kernels (and so triton.jit) is imported.
os.environ.pop("TRITON_INTERPRET", None)

import dataclasses
import functools
import platform
import re
import time
from collections.abc import Callable, Sequence

import pytest
import torch

import pini_kernels
from pini_kernels.backends import resolve_backend

from . import baselines

__all__ = [
    "DEVICE",
    "FULL_SIZES",
    "FULL_SIZES_ENV",
    "PROVIDERS",
    "MachineRates",
    "check_against_eager",
    "machine_name",
    "machine_slug",
    "measure_machine_rates",
    "provider_function",
    "rounds_for",
    "run_case",
    "share_of_step",
    "skip_slow_reference",
    "tensor_bytes",
]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL_SIZES_ENV = "PINI_BENCH_FULL"
# PINI_BENCH_FULL=1 selects the full (GPU) sizes; the defaults finish in minutes on 2 CPU cores.
FULL_SIZES = os.environ.get(FULL_SIZES_ENV, "0") == "1"
BACKENDS_ENV = "PINI_BENCH_BACKENDS"  # e.g. "cpu,reference": the fused backends to benchmark

# Each provider gets about this much timed work per case, in at least MIN_ROUNDS and at most
# MAX_ROUNDS rounds: a noisy 2-core CPU must finish the whole suite in under 10 minutes, and a
# median needs a few rounds however slow the call.
SECONDS_PER_CASE = 1.0 if DEVICE.type == "cuda" else 0.6
MIN_ROUNDS = 10 if DEVICE.type == "cuda" else 3
MAX_ROUNDS = 200 if DEVICE.type == "cuda" else 100
# The reference backend draws its noise with int64 tensor ops (~0.5 s per million elements on
# 2 CPU cores); above this many noise elements per call it is skipped on a CPU.
REFERENCE_MAX_NOISE_ELEMENTS = 6_000_000

# The seed of the one correctness check per case, and of every benchmark's inputs.
CHECK_SEED = 1234
INPUT_SEED = 0


# --- the machine ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1]
                    model = re.sub(r"\((R|TM)\)|CPU|@.*", "", model)
                    return " ".join(model.split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@functools.cache
def machine_name() -> str:
    """The benchmark device in words, e.g. "NVIDIA H200" or "AMD EPYC, 2 CPUs"."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"{_cpu_model()}, {_cpu_count()} CPUs"


def machine_slug(name: str | None = None) -> str:
    """``name`` (default: this machine) as a file name, e.g. "amd-epyc-2-cpus"."""
    return re.sub(r"[^a-z0-9]+", "-", (name or machine_name()).lower()).strip("-")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def time_call(function: Callable[[], object]) -> float:
    """Seconds one call of ``function`` takes, device work included."""
    synchronize()
    start = time.perf_counter()
    function()
    synchronize()
    return time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class MachineRates:
    """What this machine can do at best: the denominators of each case's floor."""

    copy_bytes_per_second: float  # bytes read plus bytes written by a large tensor copy
    matmul_flops_per_second: float  # float32 matrix product, torch's current precision settings

    def floor(self, bytes_moved: int, flops: int) -> tuple[float, str]:
        """(seconds, "memory" or "compute"): the least time ``bytes_moved`` and ``flops`` take."""
        memory_seconds = bytes_moved / self.copy_bytes_per_second
        compute_seconds = flops / self.matmul_flops_per_second
        if compute_seconds > memory_seconds:
            return compute_seconds, "compute"
        return memory_seconds, "memory"


def _best_copy_bytes_per_second(elements: int, repeats: int, device: torch.device) -> float:
    source = torch.randn(elements, device=device)
    destination = torch.empty_like(source)
    seconds = min(time_call(lambda: destination.copy_(source)) for _ in range(repeats))
    return 2 * source.numel() * source.element_size() / seconds


def _best_matmul_flops_per_second(size: int, repeats: int, device: torch.device) -> float:
    left = torch.randn(size, size, device=device)
    right = torch.randn(size, size, device=device)
    seconds = min(time_call(lambda: left @ right) for _ in range(repeats))
    return 2 * size**3 / seconds


def measure_machine_rates(device: torch.device = DEVICE) -> MachineRates:
    """The best copy bandwidth and float32 matmul rate over a few repeats (about a second)."""
    if device.type == "cuda":  # a 1 GiB copy, 8192^2 matrices
        return MachineRates(
            _best_copy_bytes_per_second(1 << 28, repeats=20, device=device),
            _best_matmul_flops_per_second(8192, repeats=10, device=device),
        )
    return MachineRates(  # a 128 MiB copy (beyond the caches), 1024^2 matrices
        _best_copy_bytes_per_second(1 << 25, repeats=6, device=device),
        _best_matmul_flops_per_second(1024, repeats=5, device=device),
    )


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes in the storage of ``tensors`` (None counts nothing)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)


# --- providers --------------------------------------------------------------------------------


def fused_backends(device: torch.device = DEVICE) -> list[str]:
    """The pini_kernels backends that run on ``device``; on a CPU, "reference" only as a stand-in.

    ``PINI_BENCH_BACKENDS=cpu,reference`` (comma-separated) picks from them instead.
    """
    requested = os.environ.get(BACKENDS_ENV)
    if requested:
        candidates = [name.strip() for name in requested.split(",") if name.strip()]
    else:
        candidates = pini_kernels.available_backends()
    runnable = []
    for backend in candidates:
        try:
            resolve_backend(backend, device)
        except RuntimeError:
            continue
        runnable.append(backend)
    if not requested and device.type == "cpu" and len(runnable) > 1:
        runnable.remove("reference")
    return runnable


PROVIDERS = [*(f"fused-{backend}" for backend in fused_backends()), "eager", "compiled"]


def fused_backend_of(provider: str) -> str | None:
    """ "fused-cpu" -> "cpu"; None for the baselines."""
    return provider.removeprefix("fused-") if provider.startswith("fused-") else None


def provider_function(
    provider: str,
    fused_function: Callable[..., torch.Tensor],
    eager_function: Callable[..., torch.Tensor],
) -> Callable[..., torch.Tensor]:
    """What ``provider`` calls: the fused op on its backend, the eager baseline, or its compile.

    ``fused_function`` and ``eager_function`` take the same arguments (the fused one also takes
    ``backend=``).
    """
    if provider == "eager":
        return eager_function
    if provider == "compiled":
        return baselines.compile_baseline(eager_function)
    return functools.partial(fused_function, backend=fused_backend_of(provider))


def skip_slow_reference(provider: str, noise_elements: int) -> None:
    """Skip the reference backend on a CPU for cases too large for it to finish in time."""
    if (
        fused_backend_of(provider) == "reference"
        and DEVICE.type == "cpu"
        and noise_elements > REFERENCE_MAX_NOISE_ELEMENTS
    ):
        pytest.skip(
            f"the reference backend draws {noise_elements:,} noise elements too slowly on a CPU "
            f"(limit {REFERENCE_MAX_NOISE_ELEMENTS:,})"
        )


# --- correctness, memory, timing ----------------------------------------------------------------


def _output_gradient(output: torch.Tensor) -> torch.Tensor | None:
    """A fixed random gradient for ``output`` (None for a scalar loss)."""
    if output.dim() == 0:
        return None
    generator = torch.Generator(device=output.device).manual_seed(INPUT_SEED + 1)
    return torch.randn(output.shape, generator=generator, device=output.device, dtype=output.dtype)


def check_against_eager(
    fused_call: Callable[[], torch.Tensor],
    eager_call: Callable[[], torch.Tensor],
    *,
    gradient_inputs: dict[str, torch.Tensor],
    backward: bool,
    output_tolerance: tuple[float, float],
    gradient_tolerance: tuple[float, float],
) -> None:
    """Assert that the fused op equals the eager formula fed the same ``eps``, and so do gradients.

    Tolerances are (atol, rtol); a gradient's atol is scaled by its largest magnitude (at least 1),
    as in the tests: an element summed over m * C terms of size up to that magnitude carries their
    float32 rounding, whichever order each side sums in.
    """
    fused_output = fused_call()
    eager_output = eager_call()
    atol, rtol = output_tolerance
    torch.testing.assert_close(
        fused_output, eager_output, atol=atol, rtol=rtol, msg=lambda m: f"output: {m}"
    )
    if not backward:
        return
    names, tensors = list(gradient_inputs), list(gradient_inputs.values())
    output_gradient = _output_gradient(eager_output)
    fused_gradients = torch.autograd.grad(fused_output, tensors, output_gradient)
    eager_gradients = torch.autograd.grad(eager_output, tensors, output_gradient)
    atol, rtol = gradient_tolerance
    for name, fused_gradient, eager_gradient in zip(
        names, fused_gradients, eager_gradients, strict=True
    ):
        magnitude = max(1.0, eager_gradient.abs().max().item()) if eager_gradient.numel() else 1.0
        torch.testing.assert_close(
            fused_gradient,
            eager_gradient,
            atol=atol * magnitude,
            rtol=rtol,
            msg=lambda message, name=name: f"gradient of {name}: {message}",
        )


def _cpu_live_bytes_during(function: Callable[[], object]) -> tuple[object, int, int]:
    """Run ``function`` under the profiler, which sees every CPU allocation and free."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = function()
    # The raw allocator events; profiler.events() folds them into the ops that made them.
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return result, peak, live


def _cuda_live_bytes_during(function: Callable[[], object]) -> tuple[object, int, int]:
    torch.cuda.synchronize(DEVICE)
    start = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    result = function()
    torch.cuda.synchronize(DEVICE)
    peak = torch.cuda.max_memory_allocated(DEVICE) - start
    return result, peak, torch.cuda.memory_allocated(DEVICE) - start


def live_bytes_during(function: Callable[[], object]) -> tuple[object, int, int]:
    """(result, peak, end): bytes allocated above the starting level at the peak and at the end.

    Measured by the allocator (CUDA: ``max_memory_allocated``; CPU: the profiler's allocation
    events), so temporaries and tensors saved for backward count, whoever allocates them.
    """
    if DEVICE.type == "cuda":
        return _cuda_live_bytes_during(function)
    return _cpu_live_bytes_during(function)


def _rounds_for(seconds_per_call: float) -> int:
    return max(MIN_ROUNDS, min(MAX_ROUNDS, round(SECONDS_PER_CASE / max(seconds_per_call, 1e-9))))


def rounds_for(seconds_per_call: float) -> int:
    """How many timed rounds a call of ``seconds_per_call`` gets: about ``SECONDS_PER_CASE`` of
    work, at least ``MIN_ROUNDS`` and at most ``MAX_ROUNDS``."""
    return _rounds_for(seconds_per_call)


def run_case(
    benchmark,
    *,
    op: str,
    case: str,
    provider: str,
    call: Callable[[], torch.Tensor],
    gradient_inputs: Sequence[torch.Tensor] = (),
    check: Callable[[], None] | None,
    bytes_moved: int,
    flops: int,
    machine_rates: MachineRates,
    description: str,
) -> None:
    """Check once, warm up (compiling), measure memory once, then time ``call``.

    call: the provider's forward on the case's inputs. gradient_inputs: non-empty times forward
    plus ``torch.autograd.grad`` with respect to them. check: the fused result against eager
    (None for the baselines). bytes_moved, flops: the least work of the fused op, whose floor is
    the larger of bytes_moved / copy bandwidth and flops / matmul rate.
    """
    backward = len(gradient_inputs) > 0
    direction = "forward+backward" if backward else "forward"
    benchmark.group = f"{op} {direction} {case}"
    if check is not None:
        check()

    if backward:
        output_gradient = _output_gradient(call())

        def step() -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(call(), gradient_inputs, output_gradient)

    else:
        step = call
    if check is None:  # else the check was the warm-up
        step()  # torch.compile compiles here
    seconds_per_call = time_call(step)

    if backward:
        output, forward_peak, retained = live_bytes_during(call)
        _, backward_peak, _ = live_bytes_during(
            lambda: torch.autograd.grad(output, gradient_inputs, output_gradient)
        )
        del output
        peak_bytes = max(forward_peak, retained + backward_peak)
    else:
        _, peak_bytes, retained = live_bytes_during(step)

    def synchronized_step() -> None:
        step()
        synchronize()

    benchmark.extra_info.update(
        op=op,
        direction=direction,
        case=case,
        provider=provider,
        description=description,
        device=DEVICE.type,
        machine=machine_name(),
        peak_bytes=peak_bytes,
        retained_bytes=retained,  # after the forward: the output plus what backward keeps
        bytes_moved=bytes_moved,
        flops=flops,
        checked=check is not None,
    )
    benchmark.pedantic(
        synchronized_step,
        rounds=_rounds_for(seconds_per_call),
        iterations=1,
        warmup_rounds=1 if DEVICE.type == "cuda" else 0,
    )
    floor_seconds, floor_bound = machine_rates.floor(bytes_moved, flops)
    benchmark.extra_info.update(floor_seconds=floor_seconds, floor_bound=floor_bound)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["fraction_of_floor"] = floor_seconds / median if median > 0 else None


# --- the share of a step spent in labelled code --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepShare:
    """How much of one profiled step ran in the ranges labelled ``label`` and their backward."""

    label: str
    labelled_seconds: float  # the labelled forward ranges plus the backward of their ops
    step_seconds: float  # the whole step under the profiler (CPU: wall time; CUDA: kernel time)
    method: str  # how both were measured, in words for the report

    @property
    def share(self) -> float:
        return self.labelled_seconds / self.step_seconds if self.step_seconds > 0 else 0.0


def _within(event, interval) -> bool:
    """Whether profiler ``event`` ran inside ``interval`` (another event) on the same thread."""
    return (
        event.thread == interval.thread
        and interval.time_range.start <= event.time_range.start
        and event.time_range.end <= interval.time_range.end
    )


def _outermost(events: list) -> list:
    """``events`` that are not nested inside another of them."""
    return [
        event
        for event in events
        if not any(other is not event and _within(event, other) for other in events)
    ]


def share_of_step(step: Callable[[], object], label: str, repeats: int = 5) -> StepShare:
    """The median share (``_profiled_share``) of ``repeats`` profiled steps: one step is one
    draw of a shared machine's hiccups, and a pause inside a labelled range would count as its
    time."""
    shares = sorted((_profiled_share(step, label) for _ in range(repeats)), key=lambda s: s.share)
    return shares[len(shares) // 2]


def _profiled_share(step: Callable[[], object], label: str) -> StepShare:
    """Run ``step`` once under torch.profiler and measure the share of it spent in code that ran
    inside ``torch.profiler.record_function(label)`` ranges, forward and backward.

    The forward is the labelled ranges themselves (nested ranges count once). Their backward is
    every ``autograd::engine::evaluate_function`` node whose sequence number is that of an op
    recorded inside a labelled range: the profiler's link between a forward op and its backward.
    On a CPU both are wall time on the profiled thread, over the step's wall time; on CUDA both
    are kernel time (each kernel counted once, in the op that launched it), over all kernel time.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if DEVICE.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        wall_seconds = time.perf_counter() - start
    events = list(profiler.events())
    ranges = _outermost([event for event in events if event.name == label])
    sequence_numbers = {
        event.sequence_nr
        for event in events
        if event.sequence_nr >= 0 and any(_within(event, interval) for interval in ranges)
    }
    backward = _outermost(
        [
            event
            for event in events
            if event.name.startswith("autograd::engine::evaluate_function")
            and event.sequence_nr in sequence_numbers
        ]
    )
    intervals = ranges + backward
    if DEVICE.type == "cuda":
        # The ops that launched kernels (a range's own GPU-side annotation is no kernel).
        owners = [
            event
            for event in events
            if event.device_type == torch.autograd.DeviceType.CPU and event.name != label
        ]
        total = sum(event.self_device_time_total for event in owners)
        labelled = sum(
            event.self_device_time_total
            for event in owners
            if any(_within(event, interval) for interval in intervals)
        )
        return StepShare(label, labelled * 1e-6, total * 1e-6, "profiler kernel time")
    labelled = sum(interval.time_range.elapsed_us() for interval in intervals)
    return StepShare(label, labelled * 1e-6, wall_seconds, "profiler wall time")
