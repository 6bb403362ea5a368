"""The report of ``pini sweep``: the paper's Tables 1 to 4 and Fig. 5 from the runs' summaries.

``report`` gathers every run's numbers and, per row (a method, or PiNI with one noise row),
dataset and shot count, the mean test accuracy over seeds with the half-width of its 95%
interval (Student's t, ``mean_and_interval``), the same for the average over datasets (per seed,
the mean over the averaged datasets, then over seeds; for a domain-generalization sweep the
target datasets) and PiNI's gain over each baseline (per seed, PiNI's average minus the
baseline's: paired, since both ran on the same few-shot split). ``backbone_report`` holds one
report per backbone (Table 4). ``write`` stores it as ``sweep.json`` (everything, so a report
can be rebuilt), ``sweep.md`` (the tables) and, for one backbone, ``sweep.png`` (accuracy
against shots).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .files import write_text_atomically
from .methods import METHODS

SWEEP_FORMAT = "pini-sweep/1"
CONFIDENCE = 0.95
# What sweep.json keeps of each run's summary.
RUN_KEYS = (
    "method",
    "row",
    "backbone",
    "trained_on",
    "dataset",
    "shots",
    "seed",
    "status",
    "failure",
    "accuracy",
    "macro_f1",
    "zero_shot_accuracy",
    "test_images",
    "skipped_images",
    "noise",
    "fitted",
    "train_config",
    "folder",
)


def mean_and_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width of the ``confidence`` interval of the mean): Student's t with n - 1
    degrees of freedom, right for the few seeds of a sweep (with 3 seeds the normal's 1.96 would
    understate the 95% half-width by 2.2x); 0 for a single value."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    quantile = stats.t.ppf(0.5 + confidence / 2, len(values) - 1)
    return mean, float(quantile * statistics.stdev(values) / math.sqrt(len(values)))


def _cell(values_by_seed: dict[int, float]) -> dict:
    seeds = sorted(values_by_seed)
    values = [values_by_seed[seed] for seed in seeds]
    mean, interval = mean_and_interval(values)
    return {"mean": mean, "interval": interval, "seeds": seeds, "values": values}


def report(
    summaries: list[dict],
    methods: list[str],
    datasets: list[str],
    shots: list[int],
    seeds: list[int],
    averaged: list[str] | None = None,
) -> dict:
    """The sweep's numbers from its runs' summaries (each with "method", "dataset", "shots",
    "seed", "accuracy", ..., and "row" where the row is not the method): see the module's
    docstring. ``methods``: the rows; ``averaged``: the datasets of the average (default all).
    Cells without runs are left out; an average needs every averaged dataset of its seed."""
    averaged = list(datasets if averaged is None else averaged)
    accuracy = {
        (s.get("row", s["method"]), s["dataset"], s["shots"], s["seed"]): s["accuracy"]
        for s in summaries
        if not failed(s)
    }
    table: dict = {}
    averages: dict = {}  # (row, K) -> {seed: mean over the averaged datasets}
    for method in methods:
        per_dataset: dict = {}
        for dataset in datasets:
            per_shots = {}
            for k in shots:
                found = {
                    seed: accuracy[method, dataset, k, seed]
                    for seed in seeds
                    if (method, dataset, k, seed) in accuracy
                }
                if found:
                    per_shots[str(k)] = _cell(found)
            per_dataset[dataset] = per_shots
        average = {}
        for k in shots:
            by_seed = {
                seed: statistics.fmean(accuracy[method, dataset, k, seed] for dataset in averaged)
                for seed in seeds
                if all((method, dataset, k, seed) in accuracy for dataset in averaged)
            }
            averages[method, k] = by_seed
            if by_seed:
                average[str(k)] = _cell(by_seed)
        table[method] = {"datasets": per_dataset, "average": average}
    gain: dict = {}
    if "pini" in methods:
        for method in methods:
            if method == "pini":
                continue
            gain[method] = {}
            for k in shots:
                pini, other = averages["pini", k], averages[method, k]
                paired = {seed: pini[seed] - other[seed] for seed in pini if seed in other}
                if paired:
                    gain[method][str(k)] = _cell(paired)
    return {
        "format": SWEEP_FORMAT,
        "confidence": CONFIDENCE,
        "methods": list(methods),
        "datasets": list(datasets),
        "averaged": averaged,
        "shots": list(shots),
        "seeds": list(seeds),
        "accuracy": table,
        "pini_gain": gain,
        "runs": [_run_entry(summary) for summary in summaries],
    }


def backbone_report(
    summaries: list[dict], backbones: list[str], *grid, averaged: list[str] | None = None
) -> dict:
    """Table 4: one ``report`` per backbone (``grid``: its rows, datasets, shots and seeds) of
    the summaries whose "backbone" is that one, under "by_backbone"; the backbone table's cell
    of a row, backbone and shot count is that report's average over datasets."""
    by_backbone = {
        backbone: report(
            [s for s in summaries if s["backbone"] == backbone], *grid, averaged=averaged
        )
        for backbone in backbones
    }
    first = by_backbone[backbones[0]]
    keys = ("format", "confidence", "methods", "datasets", "averaged", "shots", "seeds")
    return {**{key: first[key] for key in keys}, "backbones": backbones, "by_backbone": by_backbone}


def _run_entry(summary: dict) -> dict:
    """What sweep.json keeps of one run: RUN_KEYS, with "status" "finished" or "failed"."""
    entry = {key: summary.get(key) for key in RUN_KEYS}
    entry["status"] = "failed" if failed(summary) else "finished"
    return entry


def failed(summary: dict) -> bool:
    """Whether a run's summary marks it failed (it diverged): it has no accuracy to report."""
    return summary.get("status") == "failed"


def _format(cell: dict | None, signed: bool = False) -> str:
    if cell is None:
        return "–"
    sign = "+" if signed else ""
    return f"{cell['mean']:{sign}.2f} ± {cell['interval']:.2f}"


def markdown(result: dict) -> str:
    """Per shot count, largest first, a table (rows: methods or noise rows; columns: datasets,
    their average and PiNI's gain on the average: Tables 1 to 3), then, for several shot
    counts, the average against shots (Fig. 5); for several backbones first the backbone table
    (Table 4: rows against backbones, each cell the average over datasets), then each
    backbone's tables."""
    if "by_backbone" not in result:
        lines = ["# pini sweep", "", _introduction(result)]
        lines += _shot_tables(result) + _against_shots(result) + _failures(result["runs"])
        return "\n".join(lines) + "\n"
    backbones, reports = result["backbones"], result["by_backbone"]
    introduction = _introduction(reports[backbones[0]])
    lines = ["# pini sweep", "", f"{introduction} Backbones: each backbone's average."]
    for k in sorted(result["shots"], reverse=True):
        header = ["method", *backbones]
        lines += ["", f"## Backbones, {shots_text(k)}", "", *_header(header)]
        for method in result["methods"]:
            cells = [
                _format(reports[backbone]["accuracy"][method]["average"].get(str(k)))
                for backbone in backbones
            ]
            lines.append(_row([_display_name(method), *cells]))
    for backbone in backbones:
        lines += _shot_tables(reports[backbone], f"{backbone}, ")
    lines += _failures([run for backbone in backbones for run in reports[backbone]["runs"]])
    return "\n".join(lines) + "\n"


def _introduction(result: dict) -> str:
    seeds = ", ".join(str(seed) for seed in result["seeds"])
    datasets, averaged = result["datasets"], result["averaged"]
    text = (
        f"Test accuracy (%): mean ± half-width of the {result['confidence']:.0%} interval over "
        f"seeds {seeds} (Student's t, n - 1 degrees of freedom). "
    )
    if averaged != datasets:
        text += (
            f"Trained on {datasets[0]} (the source), evaluated on it and on the targets "
            f"{', '.join(averaged)}; target average: per seed, the mean over the targets. "
        )
    else:
        text += "Average: per seed, the mean over datasets. "
    if result["pini_gain"]:
        text += (
            "PiNI gain: PiNI's average minus the method's, paired by seed (the same few-shot "
            "split)."
        )
    return text.rstrip()


def _shot_tables(result: dict, title: str = "") -> list[str]:
    """One table per shot count, largest first, headed ``title`` and the shot count."""
    methods, datasets, table = result["methods"], result["datasets"], result["accuracy"]
    source = result["averaged"] != datasets
    average = _average_name(result)
    columns = [f"{datasets[0]} (source)", *datasets[1:]] if source else datasets
    with_gain = bool(result["pini_gain"])
    lines = []
    for k in sorted(result["shots"], reverse=True):
        header = ["method", *columns, average] + (["PiNI gain"] if with_gain else [])
        lines += ["", f"## {title}{shots_text(k)}", "", *_header(header)]
        for method in methods:
            cells = [_format(table[method]["datasets"][d].get(str(k))) for d in datasets]
            cells.append(_format(table[method]["average"].get(str(k))))
            if with_gain:
                gain = result["pini_gain"].get(method, {}).get(str(k))
                cells.append(_format(gain, signed=True) if method != "pini" else "")
            lines.append(_row([_display_name(method), *cells]))
    return lines


def _against_shots(result: dict) -> list[str]:
    """Fig. 5 as a table: each row's average against the shot counts (none for one count)."""
    if len(result["shots"]) < 2:
        return []
    header = ["method", *(shots_text(k) for k in result["shots"])]
    title = "Target average" if _average_name(result) != "average" else "Average over datasets"
    lines = ["", f"## {title} against shots", "", *_header(header)]
    for method in result["methods"]:
        cells = [
            _format(result["accuracy"][method]["average"].get(str(k))) for k in result["shots"]
        ]
        lines.append(_row([_display_name(method), *cells]))
    return lines


def _average_name(result: dict) -> str:
    """The average's column: "average" (of every dataset), or "target average" (Table 3)."""
    return "average" if result["averaged"] == result["datasets"] else "target average"


def _failures(runs: list[dict]) -> list[str]:
    failures = [run for run in runs if run["status"] == "failed"]
    if not failures:
        return []
    lines = ["", "## Failed runs (left out of the tables above)", ""]
    return lines + [
        f"- {run['dataset']} {_display_name(run.get('row') or run['method'])} "
        f"{shots_text(run['shots'])} seed {run['seed']}: {run['failure']}"
        for run in failures
    ]


def _header(cells: list[str]) -> list[str]:
    return [_row(cells), _row(["---"] + ["---:"] * (len(cells) - 1))]


def shots_text(k: int) -> str:
    """How many shots, in words: "1 shot", "16 shots"."""
    return f"{k} shot" if k == 1 else f"{k} shots"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def plot(result: dict, path: str | Path) -> Path:
    """Fig. 5: test accuracy against shots (log scale), one line per method with its 95%
    interval as a band; one panel per dataset, plus their average where there are several."""
    from .visualize import _pyplot

    plt = _pyplot()
    datasets = result["datasets"]
    panels = [(name, "datasets", name) for name in datasets]
    if len(datasets) > 1:
        panels.append((_average_name(result), "average", None))
    width = 5.0 * len(panels) if len(panels) > 1 else 6.5
    figure, axes = plt.subplots(1, len(panels), figsize=(width, 4.4), squeeze=False)
    for axis, (title, kind, name) in zip(axes[0], panels, strict=True):
        for method in result["methods"]:
            cells = result["accuracy"][method][kind]
            cells = cells[name] if name is not None else cells
            shots = [k for k in result["shots"] if str(k) in cells]
            if not shots:
                continue
            mean = [cells[str(k)]["mean"] for k in shots]
            interval = [cells[str(k)]["interval"] for k in shots]
            emphasis = dict(linewidth=2.5) if method == "pini" else dict(linewidth=1.5)
            style = "--" if method == "zero-shot" else "-"
            (line,) = axis.plot(
                shots,
                mean,
                style,
                marker="o",
                markersize=4,
                label=_display_name(method),
                **emphasis,
            )
            axis.fill_between(
                shots,
                [m - i for m, i in zip(mean, interval, strict=True)],
                [m + i for m, i in zip(mean, interval, strict=True)],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
        axis.set_xscale("log", base=2)
        axis.set_xticks(result["shots"], [str(k) for k in result["shots"]])
        axis.minorticks_off()
        axis.set_xlabel("shots per class")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    if axes[0][-1].get_legend_handles_labels()[0]:  # no lines when every run failed
        axes[0][-1].legend(fontsize=8, loc="lower right", ncols=2)
    figure.suptitle(
        f"mean and {result['confidence']:.0%} interval over seeds "
        + ", ".join(str(seed) for seed in result["seeds"]),
        fontsize=10,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write(result: dict, folder: str | Path) -> list[Path]:
    """``folder``/sweep.json, sweep.md and, for one backbone, sweep.png; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "sweep.json", folder / "sweep.md"]
    for path, text in ((paths[0], json.dumps(result, indent=1)), (paths[1], markdown(result))):
        write_text_atomically(path, text)
    if "by_backbone" not in result:
        paths.append(plot(result, folder / "sweep.png"))
    return paths


def _display_name(method: str) -> str:
    """A row's name in tables and plots: the method's (the registry's), "PiNI ROW" for a noise
    row ("pini ROW"), or the name as given."""
    if method in METHODS:
        return METHODS[method].display_name
    if method.startswith("pini "):
        return METHODS["pini"].display_name + method[len("pini") :]
    return method
