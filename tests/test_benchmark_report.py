"""Every number the benchmark report shows, against a computation written out here: the machine's
rates, the floors' bytes and FLOPs from each op's definition (docs/spec.md), peak memory, the
medians and IQRs, ratios, units and rounding of benchmarks/report.py, the training step's
interleaved ratio and noise+loss share, and the committed report against its own JSON. Synthetic
timings and allocations of known size: no real benchmark runs."""

from __future__ import annotations

import importlib
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytest_benchmark.stats import Stats


def _import_benchmark(name: str):
    """benchmarks.<name>; the harness drops TRITON_INTERPRET on import, the tests need it back."""
    interpreter = os.environ.get("TRITON_INTERPRET")
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        if interpreter is not None:
            os.environ["TRITON_INTERPRET"] = interpreter


harness = _import_benchmark("harness")
report = _import_benchmark("report")
inject_bench = _import_benchmark("test_inject_bench")
cosine_bench = _import_benchmark("test_cosine_bench")
train_step_bench = _import_benchmark("test_train_step_bench")

RESULTS = Path(report.DEFAULT_OUTPUT_DIRECTORY)
MIB = 1024 * 1024
FLOAT32, INT64 = 4, 8


# --- the machine's rates and the floor ----------------------------------------------------------


def test_machine_rates_are_the_fastest_repeat_counting_bytes_read_and_written(monkeypatch):
    seconds = iter([0.4, 0.1, 0.3, 2.0, 0.5, 0.25])  # the copy's three repeats, then the matmul's
    monkeypatch.setattr(harness, "time_call", lambda function: next(seconds))
    copy = harness._best_copy_bytes_per_second(1000, repeats=3, device=torch.device("cpu"))
    matmul = harness._best_matmul_flops_per_second(16, repeats=3, device=torch.device("cpu"))
    assert copy == pytest.approx(2 * 1000 * FLOAT32 / 0.1)  # read 4000 bytes, write 4000
    assert matmul == pytest.approx(2 * 16**3 / 0.25)  # a multiply and an add per term


def test_floor_is_the_slower_of_the_bytes_and_the_flops():
    rates = harness.MachineRates(copy_bytes_per_second=2e9, matmul_flops_per_second=1e12)
    assert rates.floor(bytes_moved=6_000_000, flops=10**9) == pytest.approx((3e-3, "memory"))
    assert rates.floor(bytes_moved=1_000_000, flops=5 * 10**9) == pytest.approx((5e-3, "compute"))


class _KnownAllocations(torch.autograd.Function):
    """Forward: an output of OUT floats and SAVED floats kept for backward; backward: the
    gradient of OUT floats, then TEMPORARY floats freed before it returns."""

    OUT, SAVED, TEMPORARY = 1000, 300, 2000

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(torch.empty(_KnownAllocations.SAVED))
        return torch.empty(_KnownAllocations.OUT)

    @staticmethod
    def backward(ctx, gradient):
        input_gradient = torch.empty(_KnownAllocations.OUT)
        temporary = torch.empty(_KnownAllocations.TEMPORARY)
        del temporary
        return input_gradient


def test_live_bytes_are_the_peak_and_the_end_above_the_start_on_a_cpu():
    def allocate():
        first, second = torch.empty(1000), torch.empty(3000)
        del first
        return second

    if harness.DEVICE.type != "cpu":
        pytest.skip("the CPU's allocation events; CUDA reads the allocator's own counters")
    _, peak, end = harness.live_bytes_during(allocate)
    assert (peak, end) == (4000 * FLOAT32, 3000 * FLOAT32)


class _FakeBenchmark:
    """pytest-benchmark's fixture as run_case uses it, with a chosen median."""

    def __init__(self, median_seconds: float):
        self.extra_info: dict = {}
        self.group = None
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=median_seconds))

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        target()


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_run_case_stores_the_peak_memory_the_floor_and_its_fraction(backward):
    if harness.DEVICE.type != "cpu":
        pytest.skip("the allocations of known size are on the CPU")
    x = torch.randn(_KnownAllocations.OUT, requires_grad=True)
    benchmark = _FakeBenchmark(median_seconds=0.012)
    rates = harness.MachineRates(copy_bytes_per_second=2e9, matmul_flops_per_second=1e12)
    harness.run_case(
        benchmark,
        op="fused_inject",
        case="known",
        provider="eager",
        call=lambda: _KnownAllocations.apply(x),
        gradient_inputs=(x,) if backward else (),
        check=None,
        bytes_moved=6_000_000,
        flops=10**9,
        machine_rates=rates,
        description="allocations of known size",
    )
    forward_bytes = (_KnownAllocations.OUT + _KnownAllocations.SAVED) * FLOAT32
    # forward+backward: what forward keeps (output and saved) stays live under the backward's
    # own peak (its temporary and the gradient).
    backward_bytes = (_KnownAllocations.TEMPORARY + _KnownAllocations.OUT) * FLOAT32
    expected_peak = forward_bytes + backward_bytes if backward else forward_bytes
    assert benchmark.extra_info["peak_bytes"] == expected_peak
    assert benchmark.extra_info["retained_bytes"] == forward_bytes
    assert benchmark.extra_info["floor_seconds"] == pytest.approx(6e6 / 2e9)
    assert benchmark.extra_info["floor_bound"] == "memory"
    assert benchmark.extra_info["fraction_of_floor"] == pytest.approx(3e-3 / 0.012)  # 25%
    assert benchmark.group == f"fused_inject {'forward+backward' if backward else 'forward'} known"


# --- each op's bytes and FLOPs, from its definition ----------------------------------------------


def test_noise_moves_its_float32_output_once():
    assert harness.tensor_bytes(torch.empty((8, 256, 512), device="meta")) == 8 * 256 * 512 * 4
    assert harness.tensor_bytes(torch.empty(3, dtype=torch.int64), None) == 3 * INT64


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_fused_inject_moves_its_inputs_and_each_sample(backward):
    """Images B=8, m=4: forward reads x (8,3,224,224), mu and sigma (3,224,224) and writes
    (4,8,3,224,224); backward reads that gradient and writes the three gradients (in "add" mode it
    reads neither mu nor sigma, docs/spec.md section 6; eps comes again from the seed)."""
    case = inject_bench.CASES["image-B8-m4"]
    inputs = inject_bench.make_inputs(case, requires_grad=False)
    pixels = 3 * 224 * 224
    x_bytes, noise_bytes, sample_bytes = 8 * pixels * 4, pixels * 4, 4 * 8 * pixels * 4
    forward = x_bytes + 2 * noise_bytes + sample_bytes
    expected = forward + (sample_bytes + x_bytes + 2 * noise_bytes if backward else 0)
    assert inject_bench.least_bytes_moved(case, inputs, backward) == expected
    prompt = inject_bench.CASES["prompt-C100"]  # num_samples=None: one sample shaped like x
    prompt_bytes = inject_bench.least_bytes_moved(
        prompt, inject_bench.make_inputs(prompt, requires_grad=False), backward=False
    )
    assert prompt_bytes == (100 * 77 * 512 * 2 + 2 * 77 * 512) * 4


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("op", ["noisy_cosine_logits", "noisy_cross_entropy"])
@pytest.mark.parametrize("sides", ["both", "image"])
def test_the_cosine_ops_move_their_inputs_and_output_and_do_the_logit_products(op, sides, backward):
    """B=6, D=10, C=7, m=3. Inputs: features (B, D) and (C, D), mu and sigma of each noisy side,
    and (for the loss only) the int64 target (B,). Output: the (m, B, C) float32 logits, or the
    loss (one float32). FLOPs: 2*B*C*D per sample for the logits; backward two products as
    large (the gradients of both sides' features) and reads the output's gradient and the
    differentiable inputs again, writing one gradient each."""
    batch, width, classes, samples = 6, 10, 7, 3
    case = cosine_bench.FeatureCase(batch, width, classes, samples, sides=sides)
    inputs = cosine_bench.make_inputs(case, requires_grad=False)
    noisy_rows = batch + (classes if sides == "both" else 0)
    differentiable = ((batch + classes) + 2 * noisy_rows) * width * FLOAT32
    is_loss = op == "noisy_cross_entropy"
    output = FLOAT32 if is_loss else samples * batch * classes * FLOAT32
    expected_bytes = differentiable + (batch * INT64 if is_loss else 0) + output
    expected_flops = 2 * samples * batch * classes * width
    if backward:
        expected_bytes += output + differentiable + differentiable
        expected_flops *= 3
    got = cosine_bench.least_work(case, inputs, with_target=is_loss, backward=backward)
    assert got == (expected_bytes, expected_flops)


# --- the pytest-benchmark statistics the report reads --------------------------------------------


def test_the_median_and_iqr_are_pytest_benchmarks_quartiles_not_the_mean_or_the_range():
    rounds = [0.007, 0.001, 0.1, 0.003, 0.002, 0.005, 0.004, 0.006]
    stats = Stats()
    for seconds in rounds:
        stats.update(seconds)
    ordered = sorted(rounds)
    assert stats.median == pytest.approx((0.004 + 0.005) / 2)  # not the mean, 0.016
    q1, q3 = statistics.median(ordered[:4]), statistics.median(ordered[4:])
    assert stats.iqr == pytest.approx(q3 - q1) == pytest.approx(0.004)  # not max - min, 0.099


def _entry(
    op, direction, case, provider, median, iqr, peak_mib, fraction=None, bound="", **extra_info
) -> dict:
    """One saved benchmark; its other statistics differ from the median and IQR on purpose."""
    info = dict(op=op, direction=direction, case=case, provider=provider, description=case)
    info.update(peak_bytes=round(peak_mib * MIB), **extra_info)
    if fraction is not None:
        info.update(fraction_of_floor=fraction, floor_bound=bound)
    stats = dict(min=median / 3, max=median * 5, mean=median * 1.7, stddev=median * 0.9)
    stats.update(median=median, iqr=iqr, q1=median - iqr / 3, q3=median + 2 * iqr / 3, rounds=9)
    return {"name": f"{op}[{case}-{provider}]", "group": op, "extra_info": info, "stats": stats}


def _saved() -> dict:
    forward = ("fused_inject", "forward", "image")
    step = ("train_step", "forward+backward+optimizer", "image, pini-tiny")
    return {
        "machine_info": {
            "pini_machine": "Test CPU, 2 CPUs",
            "pini_device": "cpu",
            "pini_fused_backends": ["cpu"],
            "torch": "2.x",
            "python_version": "3.11",
            "pini_rates": {"copy_bytes_per_second": 42.85e9, "matmul_flops_per_second": 216.44e9},
        },
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "datetime": "2026-01-01T00:00:00.000000",
        "benchmarks": [
            _entry(*forward, "fused-cpu", 2.0e-3, 0.25e-3, 3.0, 0.315, "memory"),
            _entry(*forward, "eager", 6.5e-3, 0.5e-3, 12.0),
            _entry(*forward, "compiled", 13.0e-3, 1.2e-3, 6.0),
            _entry("noise", "forward", "eps", "fused-cpu", 0.357e-3, 0.004e-3, 1.0, 0.865, "x"),
            _entry("noise", "forward", "eps", "eager", 0.25e-3, 0.01e-3, 0.5),
            _entry(
                *step,
                "fused-cpu",
                66.3e-3,
                0.7e-3,
                84.0,
                noise_loss_share=0.081,
                interleaved_fused_seconds=0.050,
                interleaved_eager_seconds=0.051,
            ),
            _entry(*step, "eager", 66.0e-3, 1.1e-3, 42.0, noise_loss_share=0.0149),
            {"name": "another", "group": None, "extra_info": {}, "stats": {}},  # not pini's
        ],
    }


def _render(saved: dict, source: str = "run.json") -> str:
    """The markdown report of ``saved``, as ``python -m benchmarks.report`` writes it."""
    measurements = report.load_measurements(saved)
    rows = report.build_rows([m for m in measurements if m.op != report.TRAIN_STEP_OP])
    steps = report.build_rows([m for m in measurements if m.op == report.TRAIN_STEP_OP])
    return report.render_markdown(saved, rows, Path(source), steps)


def test_report_reads_the_median_and_iqr_in_seconds_from_the_saved_statistics():
    measurements = report.load_measurements(_saved())
    assert len(measurements) == 7  # the benchmark without extra_info is skipped
    fused = measurements[0]
    assert (fused.median_seconds, fused.iqr_seconds, fused.rounds) == (2.0e-3, 0.25e-3, 9)
    assert fused.peak_bytes == 3 * MIB and fused.fraction_of_floor == 0.315
    assert measurements[5].interleaved_speedup == pytest.approx(0.051 / 0.050)


def test_report_rows_show_ms_ratios_mib_and_floor_computed_by_hand():
    lines = _render(_saved()).splitlines()
    # fused 2.00 ms (IQR 0.25), eager 6.50 / 2.00 = 3.25x, compiled 13.0 / 2.00 = 6.50x;
    # peaks 3, 12 and 6 MiB (3 * 2^20 bytes is 3.15 MB), memory 3 / 12 = 0.25; floor 31.5%.
    expected = (
        "| image | cpu | 2.00 (0.25) | 6.50 (0.50) | 13.0 (1.2) | 3.25x | 6.50x "
        "| 3.00 / 12.00 / 6.00 | 0.25 | 31.5% (memory) |"
    )
    assert expected in lines
    # Under a millisecond: three decimals; fused slower than eager: below 1x; no compiled run.
    expected = (
        "| eps | cpu | 0.357 (0.004) | 0.250 (0.010) | - | 0.70x | - | 1.00 / 0.50 / - | 2.00 "
        "| 86.5% (x) |"
    )
    assert expected in lines
    # The training step: 66.0 / 66.3 = 0.995 -> 1.00x; interleaved 51 / 50 = 1.02x; peaks
    # 84 and 42 MiB, memory 2.00; shares 8.1% and 1.49% as whole percents.
    expected = (
        "| image, pini-tiny | cpu | 66.3 (0.7) | 66.0 (1.1) | 1.00x | 1.02x | 84.00 / 42.00 "
        "| 2.00 | 8% / 1% |"
    )
    assert expected in lines


def test_report_header_gives_the_rates_in_gb_and_gflop_per_second():
    header = _render(_saved())
    assert "copy 42.9 GB/s (bytes read + written), float32 matmul 216.4 GFLOP/s" in header
    assert "# pini_kernels benchmarks on Test CPU, 2 CPUs" in header


def test_share_of_step_is_the_median_of_the_profiled_steps(monkeypatch):
    shares = iter([0.1, 0.2, 0.9, 0.8, 0.3])  # median 0.3, mean 0.46
    monkeypatch.setattr(
        harness,
        "_profiled_share",
        lambda step, label: harness.StepShare(label, next(shares), 1.0, "synthetic"),
    )
    assert harness.share_of_step(lambda: None, "label").share == pytest.approx(0.3)
    assert harness.StepShare("label", 0.02, 0.08, "synthetic").share == pytest.approx(0.25)


LABEL = "labelled"
SLEPT: dict[str, float] = {}  # what each part of the step below really slept, in seconds


def _sleep(part: str, seconds: float) -> None:
    """Sleeps ``seconds`` and records how long it took: on a loaded machine a sleep overshoots,
    so the test compares with what was slept, not what was asked."""
    start = time.perf_counter()
    time.sleep(seconds)
    SLEPT[part] = time.perf_counter() - start


class _Slow(torch.autograd.Function):
    """40 ms forward, inside a LABEL range of its own; 80 ms backward."""

    @staticmethod
    def forward(ctx, x):
        with torch.profiler.record_function(LABEL):
            _sleep("forward", 0.04)
        return x * 2

    @staticmethod
    def backward(ctx, gradient):
        _sleep("backward", 0.08)
        return gradient * 2


def test_the_profiled_share_counts_nested_ranges_once_and_their_backward():
    """A step of about 240 ms: 40 ms forward in a labelled range inside another (through an op:
    the profiler keeps both), 120 ms outside, 80 ms in the backward of the labelled op. The
    labelled time is the forward and backward as slept, (40 + 80) / 240 = 0.5 of the step (the
    nested range counted twice: 0.67; without the backward: 0.17). Compared with the sleeps'
    measured lengths, with half the forward's as the margin, so a sleep that overshoots on a
    loaded machine does not fail it."""
    if harness.DEVICE.type != "cpu":
        pytest.skip("the CPU's wall time")
    x = torch.randn(4, requires_grad=True)

    def step():
        with torch.profiler.record_function(LABEL):
            y = _Slow.apply(x)
        _sleep("outside", 0.12)
        y.sum().backward()

    SLEPT.clear()
    share = harness._profiled_share(step, LABEL)
    margin = SLEPT["forward"] / 2
    labelled = SLEPT["forward"] + SLEPT["backward"]
    assert share.labelled_seconds == pytest.approx(labelled, abs=margin)
    assert share.step_seconds == pytest.approx(labelled + SLEPT["outside"], abs=2 * margin)
    assert share.share == share.labelled_seconds / share.step_seconds


def test_interleaved_medians_are_each_paths_median_in_alternating_order(monkeypatch):
    calls = []
    seconds = {"fused": iter([1.0, 5.0, 2.0] + [3.0] * 7), "eager": iter([4.0] * 9 + [40.0])}

    def fake_time_call(step):
        calls.append(step.__name__)
        return next(seconds[step.__name__])

    def fused():
        pass

    def eager():
        pass

    monkeypatch.setattr(train_step_bench, "time_call", fake_time_call)
    assert train_step_bench._interleaved_medians(fused, eager, seconds_per_step=1.0) == (3.0, 4.0)
    assert calls[:4] == ["eager", "fused", "fused", "eager"]  # the order swaps each round


# --- the committed report -------------------------------------------------------------------------


@pytest.mark.parametrize("machine", sorted(path.stem for path in RESULTS.glob("*.md")))
def test_committed_report_is_its_json_rendered_and_its_floors_follow_from_it(machine):
    """Each number of benchmarks/results/<machine>.md, from <machine>.json: the floor from the
    recorded bytes, FLOPs and machine rates, its fraction of the median, then the table."""
    saved = json.loads((RESULTS / f"{machine}.json").read_text())
    rates = saved["machine_info"]["pini_rates"]
    for benchmark in saved["benchmarks"]:
        info = benchmark["extra_info"]
        if "bytes_moved" not in info:
            continue
        memory = info["bytes_moved"] / rates["copy_bytes_per_second"]
        compute = info["flops"] / rates["matmul_flops_per_second"]
        assert info["floor_seconds"] == pytest.approx(max(memory, compute)), benchmark["name"]
        assert info["floor_bound"] == ("compute" if compute > memory else "memory")
        fraction = info["floor_seconds"] / benchmark["stats"]["median"]
        assert info["fraction_of_floor"] == pytest.approx(fraction), benchmark["name"]
    committed = (RESULTS / f"{machine}.md").read_text()
    source = committed.split("source: `", 1)[1].split("`", 1)[0]
    assert _render(saved, source) == committed


def _report_cells(markdown: str) -> dict[tuple[str, str, str], str]:
    """{(section, case, column): cell} of every table of a rendered report."""
    cells, section, columns = {}, "", []
    for line in markdown.splitlines():
        values = [value.strip() for value in line.strip("|").split("|")]
        if line.startswith("## "):
            section = line.removeprefix("## ")
        elif line.startswith("| case |"):
            columns = values
        elif line.startswith("| ") and not line.startswith("|--"):
            row = zip(columns, values, strict=True)
            cells |= {(section, values[0], name): value for name, value in row}
    return cells


TRAIN_STEP = "Training step (forward, backward, optimizer)"
COMMITTED_REPORT = "intel-xeon-processor-2-cpus"  # the one docs/benchmarks.md quotes
# What docs/benchmarks.md quotes from the committed CPU report: its text, from these cells.
DOCS_QUOTES = {
    "| {} / {} |": [
        ("fused_inject, forward", "feature-B32-D512-m1", "vs eager"),
        ("fused_inject, forward+backward", "feature-B32-D512-m1", "vs eager"),
    ],
    "per-row / per-feature mu and sigma, forward+backward | {} / {} |": [
        ("fused_inject, forward+backward", f"feature-B32-D512-per-{kind}", "vs eager")
        for kind in ("row", "feature")
    ],
    "m=4, forward / forward+backward | {} / {} |": [
        ("fused_inject, forward", "image-B8-m4", "vs eager"),
        ("fused_inject, forward+backward", "image-B8-m4", "vs eager"),
    ],
    "(vs `torch.compile`) | {} ({}) |": [
        ("noisy_cross_entropy, forward+backward", "B256-D512-C1000-m8-image", "vs eager"),
        ("noisy_cross_entropy, forward+backward", "B256-D512-C1000-m8-image", "vs compiled"),
    ],
    "same case, forward+backward | {} |": [
        ("noisy_cosine_logits, forward+backward", "B256-D512-C1000-m8-image", "vs eager"),
    ],
    "(timed apart: {} / {}) | {} / {} |": [
        (TRAIN_STEP, "feature+prompt, pini-tiny-B32-C37", "vs eager"),
        (TRAIN_STEP, "image, pini-tiny-B32-C37", "vs eager"),
        (TRAIN_STEP, "feature+prompt, pini-tiny-B32-C37", "vs eager, interleaved"),
        (TRAIN_STEP, "image, pini-tiny-B32-C37", "vs eager, interleaved"),
    ],
    "m = 1 / 4 / 8, interleaved | {} / {} / {} |": [
        (TRAIN_STEP, "feature, pini-tiny-B32-C37", "vs eager, interleaved"),
        (TRAIN_STEP, "feature, pini-tiny-B32-C37-m4", "vs eager, interleaved"),
        (TRAIN_STEP, "feature, pini-tiny-B32-C37-m8", "vs eager, interleaved"),
    ],
}


def test_the_ratios_docs_quote_are_the_committed_reports():
    cells = _report_cells((RESULTS / f"{COMMITTED_REPORT}.md").read_text())
    docs = (Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md").read_text()
    for template, keys in DOCS_QUOTES.items():
        quote = template.format(*(cells[key] for key in keys))
        assert quote in docs, f"docs/benchmarks.md does not say {quote!r}, the report's figures"
