"""Turn a saved pytest-benchmark JSON into a markdown table and a PNG plot.

    python -m benchmarks.report [JSON] [--out benchmarks/results]

JSON defaults to the newest file under ``.benchmarks/`` (where ``pytest benchmarks/
--benchmark-only`` saves one). Writes ``<out>/<machine>.md``, ``<machine>.png`` and
``<machine>.json`` (the input without the per-round timings, so the report can be
rendered again from it), the machine named in each.

For each op, direction and case, per fused backend: the median time (IQR), the speedup over eager
PyTorch and over torch.compile of it (above 1: the fused op is faster), the peak memory and its
ratio to eager's (below 1: the fused op needs less), and the fraction of the floor (the least time
the op's bytes and FLOPs take at this machine's measured copy bandwidth and matmul rate; 1 is the
machine's limit).

The training step (``benchmarks/test_train_step_bench.py``) gets a table of its own: per model and
Table 1 row, the step with pini_kernels' noise path against the same model with the eager noise
path, their ratio, peak memory and the share of the step spent in the noise path and loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_INPUT_DIRECTORY = REPOSITORY / ".benchmarks"
DEFAULT_OUTPUT_DIRECTORY = REPOSITORY / "benchmarks" / "results"
BASELINES = ("eager", "compiled")
# The order ops and directions appear in, in the table and the plot.
OP_ORDER = ("noise", "fused_inject", "noisy_cosine_logits", "noisy_cross_entropy")
DIRECTION_ORDER = ("forward", "forward+backward")
MEBIBYTE = 1 << 20
TRAIN_STEP_OP = "train_step"  # one PiNI training step, fused against eager noise path


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One provider on one case: what pytest-benchmark timed and what the benchmark stored."""

    op: str
    direction: str
    case: str
    provider: str
    description: str
    median_seconds: float
    iqr_seconds: float
    rounds: int
    peak_bytes: int
    fraction_of_floor: float | None
    floor_bound: str
    noise_loss_share: float | None = None  # training steps: the share in the noise path and loss
    # Training steps, fused entry: the eager over the fused median, the two timed alternately.
    interleaved_speedup: float | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One fused backend on one case, next to the two baselines."""

    op: str
    direction: str
    case: str
    fused: Measurement
    eager: Measurement | None
    compiled: Measurement | None

    def speedup_over(self, baseline: Measurement | None) -> float | None:
        if baseline is None:
            return None
        return baseline.median_seconds / self.fused.median_seconds

    @property
    def memory_ratio(self) -> float | None:
        if self.eager is None or self.eager.peak_bytes <= 0:
            return None
        return self.fused.peak_bytes / self.eager.peak_bytes


def machine_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def newest_json(directory: Path = DEFAULT_INPUT_DIRECTORY) -> Path:
    candidates = sorted(directory.rglob("*.json"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise SystemExit(
            f"no benchmark JSON under {directory}; run: pytest benchmarks/ --benchmark-only"
        )
    return candidates[-1]


def load_measurements(saved: dict) -> list[Measurement]:
    """The pini benchmarks of a pytest-benchmark JSON (others, without extra_info, are skipped)."""
    measurements = []
    for benchmark in saved["benchmarks"]:
        info = benchmark.get("extra_info", {})
        if "op" not in info:
            continue
        stats = benchmark["stats"]
        measurements.append(
            Measurement(
                op=info["op"],
                direction=info["direction"],
                case=info["case"],
                provider=info["provider"],
                description=info.get("description", ""),
                median_seconds=stats["median"],
                iqr_seconds=stats["iqr"],
                rounds=stats["rounds"],
                peak_bytes=info["peak_bytes"],
                fraction_of_floor=info.get("fraction_of_floor"),
                floor_bound=info.get("floor_bound", ""),
                noise_loss_share=info.get("noise_loss_share"),
                interleaved_speedup=_interleaved_speedup(info),
            )
        )
    return measurements


def _interleaved_speedup(info: dict) -> float | None:
    fused, eager = info.get("interleaved_fused_seconds"), info.get("interleaved_eager_seconds")
    return eager / fused if fused and eager else None


def _order(measurement_key: tuple[str, str, str], case_order: dict[str, int]) -> tuple:
    op, direction, case = measurement_key
    op_rank = OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER)
    direction_rank = DIRECTION_ORDER.index(direction) if direction in DIRECTION_ORDER else 2
    return (op_rank, op, direction_rank, case_order[case])


def build_rows(measurements: list[Measurement]) -> list[Row]:
    """One row per (op, direction, case, fused backend), in the order the cases ran."""
    by_case: dict[tuple[str, str, str], dict[str, Measurement]] = defaultdict(dict)
    case_order: dict[str, int] = {}
    for measurement in measurements:
        key = (measurement.op, measurement.direction, measurement.case)
        by_case[key][measurement.provider] = measurement
        case_order.setdefault(measurement.case, len(case_order))
    rows = []
    for key in sorted(by_case, key=lambda key: _order(key, case_order)):
        providers = by_case[key]
        for provider, measurement in sorted(providers.items()):
            if provider in BASELINES:
                continue
            rows.append(Row(*key, measurement, providers.get("eager"), providers.get("compiled")))
    return rows


def _milliseconds(measurement: Measurement | None) -> str:
    if measurement is None:
        return "-"
    median, iqr = measurement.median_seconds * 1e3, measurement.iqr_seconds * 1e3
    digits = 3 if median < 1 else 2 if median < 10 else 1
    return f"{median:.{digits}f} ({iqr:.{digits}f})"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mebibytes(measurement: Measurement | None) -> str:
    return "-" if measurement is None else f"{measurement.peak_bytes / MEBIBYTE:.2f}"


def _floor(measurement: Measurement) -> str:
    if measurement.fraction_of_floor is None:
        return "-"
    return f"{100 * measurement.fraction_of_floor:.1f}% ({measurement.floor_bound})"


def _header(saved: dict, source: Path) -> list[str]:
    machine = saved["machine_info"]
    commit = saved.get("commit_info", {})
    rates = machine.get("pini_rates", {})
    name = machine.get("pini_machine", machine.get("node", "unknown machine"))
    lines = [
        f"# pini_kernels benchmarks on {name}",
        "",
        f"- machine: **{name}** ({machine.get('pini_device', '?')}), "
        f"fused backends {machine.get('pini_fused_backends', '?')}",
        f"- torch {machine.get('torch', '?')}, Python {machine.get('python_version', '?')}, "
        f"run {saved.get('datetime', '?')[:19]}, commit {commit.get('id', '?')[:12]}"
        + (" (with uncommitted changes)" if commit.get("dirty") else ""),
    ]
    if rates:
        lines.append(
            f"- measured limits: copy {rates['copy_bytes_per_second'] / 1e9:.1f} GB/s "
            f"(bytes read + written), float32 matmul "
            f"{rates['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s"
        )
    sizes = "full (PINI_BENCH_FULL=1)" if machine.get("pini_full_sizes") else "default"
    lines += [
        f"- sizes: {sizes}; source: `{source.name}`",
        "",
        "Times are medians in ms with the interquartile range in parentheses. *vs eager* and "
        "*vs compiled* are the baseline's median over the fused median (above 1: fused is "
        "faster). *peak MiB* is the memory allocated above the inputs during the call (forward "
        "and backward for forward+backward); *memory vs eager* is fused over eager (below 1: "
        "fused needs less). *floor* is the least time the fused op's bytes (at the copy "
        "bandwidth) or FLOPs (at the matmul rate) take, as a fraction of its median; 100% is the "
        "machine's limit.",
        "",
    ]
    return lines


def _share(measurement: Measurement | None) -> str:
    if measurement is None or measurement.noise_loss_share is None:
        return "-"
    return f"{100 * measurement.noise_loss_share:.0f}%"


def render_train_steps(rows: list[Row]) -> list[str]:
    """The "training step" section: fused against eager noise path, one row per case."""
    if not rows:
        return []
    lines = [
        "",
        "## Training step (forward, backward, optimizer)",
        "",
        "One PiNI training step on the same model, weights and batch, with pini_kernels' noise "
        'path (`PiNIConfig(noise_path="fused")`) and with the eager one as the authors write it '
        '(`noise_path="eager"`). *vs eager* is the eager median over the fused median (above 1: '
        "the kernels make the step faster), each path timed in its own benchmark; *interleaved* "
        "is the same ratio with the two steps timed alternately in one loop, so that a shared "
        "machine's drift moves both alike. *noise+loss share* is the part of a profiled step "
        "spent in the noise path and loss, forward and the backward of its ops (record_function "
        "ranges; CPU: wall time, CUDA: kernel time; the median of five profiled steps).",
        "",
        "| case | fused | fused ms | eager ms | vs eager | vs eager, interleaved "
        "| peak MiB fused / eager | memory vs eager | noise+loss share fused / eager |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        memory_ratio = "-" if row.memory_ratio is None else f"{row.memory_ratio:.2f}"
        peaks = " / ".join(_mebibytes(m) for m in (row.fused, row.eager))
        lines.append(
            f"| {row.case} | {row.fused.provider.removeprefix('fused-')} "
            f"| {_milliseconds(row.fused)} | {_milliseconds(row.eager)} "
            f"| {_times(row.speedup_over(row.eager))} "
            f"| {_times(row.fused.interleaved_speedup)} | {peaks} | {memory_ratio} "
            f"| {_share(row.fused)} / {_share(row.eager)} |"
        )
    return lines


def render_markdown(
    saved: dict, rows: list[Row], source: Path, train_step_rows: list[Row] = ()
) -> str:
    lines = _header(saved, source)
    lines += render_train_steps(list(train_step_rows))
    section = None
    for row in rows:
        if (row.op, row.direction) != section:
            section = (row.op, row.direction)
            lines += [
                "",
                f"## {row.op}, {row.direction}",
                "",
                "| case | fused | fused ms | eager ms | compiled ms | vs eager | vs compiled "
                "| peak MiB fused / eager / compiled | memory vs eager | floor |",
                "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
            ]
        memory_ratio = "-" if row.memory_ratio is None else f"{row.memory_ratio:.2f}"
        peaks = " / ".join(_mebibytes(m) for m in (row.fused, row.eager, row.compiled))
        lines.append(
            f"| {row.case} | {row.fused.provider.removeprefix('fused-')} "
            f"| {_milliseconds(row.fused)} | {_milliseconds(row.eager)} "
            f"| {_milliseconds(row.compiled)} | {_times(row.speedup_over(row.eager))} "
            f"| {_times(row.speedup_over(row.compiled))} | {peaks} | {memory_ratio} "
            f"| {_floor(row.fused)} |"
        )
    cases = dict.fromkeys(
        (row.op, row.case, row.fused.description) for row in [*train_step_rows, *rows]
    )
    lines += ["", "## Cases", ""]
    lines += [f"- {op} `{case}`: {description}" for op, case, description in cases]
    return "\n".join(lines) + "\n"


def render_plot(saved: dict, rows: list[Row], path: Path) -> bool:
    """Speedup over eager and peak memory over eager per case; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    sections = list(dict.fromkeys((row.op, row.direction) for row in rows))
    figure, axes = plt.subplots(
        len(sections), 2, figsize=(13, 2.2 + 1.6 * len(sections)), squeeze=False
    )
    for (op, direction), (speed_axis, memory_axis) in zip(sections, axes, strict=True):
        section_rows = [row for row in rows if (row.op, row.direction) == (op, direction)]
        labels = [f"{row.case} ({row.fused.provider})" for row in section_rows]
        positions = list(range(len(section_rows)))
        fused_speedups = [row.speedup_over(row.eager) or 0 for row in section_rows]
        compiled_speedups = [
            (row.eager.median_seconds / row.compiled.median_seconds)
            if row.eager and row.compiled
            else 0
            for row in section_rows
        ]
        height = 0.38
        speed_axis.barh([p - height / 2 for p in positions], fused_speedups, height, label="fused")
        speed_axis.barh(
            [p + height / 2 for p in positions], compiled_speedups, height, label="torch.compile"
        )
        speed_axis.axvline(1.0, color="black", linewidth=0.8)
        speed_axis.set_xscale("log")
        for axis in (speed_axis.xaxis,):
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
            axis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        speed_axis.set_yticks(positions, labels, fontsize=7)
        speed_axis.invert_yaxis()
        speed_axis.set_title(f"{op}, {direction}: speedup over eager", fontsize=9)

        def memory_ratio(measurement: Measurement | None, row: Row) -> float:
            if measurement is None or row.eager is None or row.eager.peak_bytes <= 0:
                return 0.0
            return measurement.peak_bytes / row.eager.peak_bytes

        memory_axis.barh(
            [p - height / 2 for p in positions],
            [memory_ratio(row.fused, row) for row in section_rows],
            height,
            label="fused",
        )
        memory_axis.barh(
            [p + height / 2 for p in positions],
            [memory_ratio(row.compiled, row) for row in section_rows],
            height,
            label="torch.compile",
        )
        memory_axis.axvline(1.0, color="black", linewidth=0.8)
        memory_axis.set_yticks(positions, [""] * len(positions))
        memory_axis.invert_yaxis()
        memory_axis.set_title("peak memory / eager's (lower is better)", fontsize=9)
    machine = saved["machine_info"].get("pini_machine", "unknown machine")
    figure.suptitle(f"pini_kernels on {machine} (torch {saved['machine_info'].get('torch')})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


KEPT_STATISTICS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "rounds")


def _summary(saved: dict) -> dict:
    """``saved`` without per-round timings and pytest-benchmark's options: what the report reads."""
    summary = {key: value for key, value in saved.items() if key != "benchmarks"}
    summary["benchmarks"] = [
        {
            "name": benchmark["name"],
            "group": benchmark["group"],
            "extra_info": benchmark["extra_info"],
            "stats": {key: benchmark["stats"][key] for key in KEPT_STATISTICS},
        }
        for benchmark in saved["benchmarks"]
    ]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("json", nargs="?", type=Path, help="a pytest-benchmark JSON")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUTPUT_DIRECTORY,
        help="the directory to write <machine>.md, .png and .json into",
    )
    arguments = parser.parse_args(argv)
    source = arguments.json or newest_json()
    saved = json.loads(source.read_text())
    measurements = load_measurements(saved)
    rows = build_rows([m for m in measurements if m.op != TRAIN_STEP_OP])
    train_step_rows = build_rows([m for m in measurements if m.op == TRAIN_STEP_OP])
    if not rows and not train_step_rows:
        raise SystemExit(f"{source} holds no pini benchmark with a fused backend")
    machine = saved["machine_info"].get("pini_machine", "unknown machine")
    arguments.out.mkdir(parents=True, exist_ok=True)
    stem = arguments.out / machine_slug(machine)

    markdown_path = stem.with_suffix(".md")
    markdown_path.write_text(render_markdown(saved, rows, source, train_step_rows))
    stem.with_suffix(".json").write_text(json.dumps(_summary(saved), indent=1) + "\n")
    written = [markdown_path, stem.with_suffix(".json")]
    if rows and render_plot(saved, rows, stem.with_suffix(".png")):
        written.append(stem.with_suffix(".png"))
    print(f"read {source}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
