"""Every number `pini` prints or writes for a user, checked by value against a computation of the
test's own (numpy, scipy, scikit-learn, or the spec's noise stream), under conditions where a
plausible mistake shows: unequal class supports, several epochs after a warm-up, seeds that are
not 1..n and runs that failed, datasets of different sizes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy import stats

from pini import sweep

# --- pini sweep: cells, averages over datasets, paired gains, sweep.md ------------------------


def _half_width(values: list[float]) -> float:
    """Half-width of the 95% interval of the mean: scipy's t interval around the sample's sem."""
    if len(values) < 2:
        return 0.0
    mean = float(np.mean(values))
    upper = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))[1]
    return float(upper) - mean


def _expected_cell(by_seed: dict[int, float]) -> dict:
    seeds = sorted(by_seed)
    values = [by_seed[seed] for seed in seeds]
    mean = float(np.mean(values))
    return {"mean": mean, "interval": _half_width(values)}


def _sweep_summaries():
    """Two datasets of 1000 and 10 test images, seeds 3, 1, 7, 1 and 4 shots, three methods;
    CoOp's 4-shot run of seed 7 on "small" and PiNI's 1-shot run of seed 3 on "big" failed."""
    rng = np.random.default_rng(27)
    methods, datasets, shots, seeds = (
        ["zero-shot", "coop", "pini"],
        ["big", "small"],
        [1, 4],
        [3, 1, 7],
    )
    images = {"big": 1000, "small": 10}
    failed = {("coop", "small", 4, 7), ("pini", "big", 1, 3)}
    summaries, accuracy = [], {}
    for method in methods:
        for dataset in datasets:
            for k in shots:
                for seed in seeds:
                    key = (method, dataset, k, seed)
                    summary = {"method": method, "dataset": dataset, "shots": k, "seed": seed}
                    if key in failed:
                        summary |= {"status": "failed", "failure": "training diverged"}
                    else:
                        accuracy[key] = float(rng.uniform(20, 95))
                        summary |= {"accuracy": accuracy[key], "test_images": images[dataset]}
                    summaries.append(summary)
    return summaries, accuracy, (methods, datasets, shots, seeds)


def test_sweep_report_and_tables_by_value_with_uneven_seeds_failed_runs_and_unequal_datasets():
    """Each cell is the mean over the seeds that finished with scipy's t half-width (n - 1
    degrees of freedom, sample std); the average is per seed the unweighted mean over the two
    datasets (1000 and 10 images: weighting by images would differ) over the seeds every
    dataset finished; PiNI's gain is paired by seed over the seeds both averages have (CoOp's
    4-shot average lacks seed 7, PiNI's 1-shot one seed 3: an unpaired difference of means
    differs). sweep.md shows each of them to two decimals in its row and column."""
    summaries, accuracy, (methods, datasets, shots, seeds) = _sweep_summaries()
    result = json.loads(json.dumps(sweep.report(summaries, methods, datasets, shots, seeds)))
    expected, averages = {}, {}
    for method in methods:
        for k in shots:
            for dataset in datasets:
                found = {
                    s: accuracy[method, dataset, k, s]
                    for s in seeds
                    if (method, dataset, k, s) in accuracy
                }
                expected[method, dataset, k] = _expected_cell(found)
                cell = result["accuracy"][method]["datasets"][dataset][str(k)]
                assert cell["seeds"] == sorted(found) and cell["values"] == [
                    found[s] for s in sorted(found)
                ]
            complete = [s for s in seeds if all((method, d, k, s) in accuracy for d in datasets)]
            averages[method, k] = {
                s: np.mean([accuracy[method, d, k, s] for d in datasets]) for s in complete
            }
            expected[method, "average", k] = _expected_cell(averages[method, k])
    for method in ("zero-shot", "coop"):
        for k in shots:
            common = sorted(set(averages["pini", k]) & set(averages[method, k]))
            expected[method, "gain", k] = _expected_cell(
                {s: averages["pini", k][s] - averages[method, k][s] for s in common}
            )
    assert sorted(averages["coop", 4]) == [1, 3] and sorted(averages["pini", 1]) == [1, 7]
    for (method, where, k), want in expected.items():
        if where == "gain":
            got = result["pini_gain"][method][str(k)]
        elif where == "average":
            got = result["accuracy"][method]["average"][str(k)]
        else:
            got = result["accuracy"][method]["datasets"][where][str(k)]
        for name in ("mean", "interval"):
            assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-12), (
                method,
                where,
                k,
                name,
            )
    # sweep.md: every cell of Table 2 per shot count and of the average against shots.
    table = sweep.markdown(result)
    names = {"zero-shot": "zero-shot CLIP", "coop": "CoOp", "pini": "PiNI"}
    for k in shots:
        title = f"## {k} shot" + ("s" if k > 1 else "")
        section = table[table.index(title + "\n") :].split("\n## ", 1)[0]
        rows = _markdown_rows(section)
        for method in methods:
            row = rows[names[method]]
            for where in (*datasets, "average"):
                want = expected[method, where, k]
                assert row[where] == f"{want['mean']:.2f} ± {want['interval']:.2f}", (
                    method,
                    k,
                    where,
                )
            gain = expected.get((method, "gain", k))
            assert row["PiNI gain"] == (
                "" if gain is None else f"{gain['mean']:+.2f} ± {gain['interval']:.2f}"
            )
    against_shots = _markdown_rows(table[table.index("## Average over datasets against shots") :])
    for method in methods:
        for k in shots:
            want = expected[method, "average", k]
            label = f"{k} shot" + ("s" if k > 1 else "")
            assert (
                against_shots[names[method]][label]
                == f"{want['mean']:.2f} ± {want['interval']:.2f}"
            )
    failed_runs = [
        re.match(r"- (\w+) (.+) (\d+) shots? seed (\d+): training diverged$", line).groups()
        for line in table.splitlines()
        if line.startswith("- ")
    ]
    assert failed_runs == [("small", "CoOp", "4", "7"), ("big", "PiNI", "1", "3")]


def _markdown_rows(section: str) -> dict[str, dict[str, str]]:
    """{first cell: {column header: cell}} of the first markdown table in ``section``."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows
