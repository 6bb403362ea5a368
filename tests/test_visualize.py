"""`pini visualize`, `pini interpret`, `pini plot` and `--eval-every` on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import TINY, assert_one_line_error, make_folder, run_cli

from pini import cli, visualize


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs on one folder: image+prompt (with --eval-every) and feature."""
    base = tmp_path_factory.mktemp("visualize")
    data = make_folder(base / "data" / "toy", per_class=3, size=16).parent
    common = ["train", *TINY[:-1], "2", "--root", data, "--dataset", "toy", "--shots", "2"]
    for name, extra in (
        ("image", ["--noise", "image+prompt", "--eval-every", "1"]),
        ("feature", ["--noise", "feature+text-feature"]),
    ):
        assert cli.main([str(a) for a in [*common, *extra, "--output", base / name]]) == 0
    return base


def on_checkpoint(command: str, run: Path, *extra) -> list:
    """``pini <command>`` on ``run``'s checkpoint."""
    return [command, "--no-progress", "--checkpoint", run / "checkpoint.pt", *extra]


def test_visualize_draws_each_kind_of_noise(runs, capsys):
    status, out, err = run_cli(on_checkpoint("visualize", runs / "image", "--images", "2"), capsys)
    assert status == 0, err
    for name in ("noise-image.png", "noise-prompt.png"):
        path = runs / "image" / name
        assert str(path) in out and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status, out, err = run_cli(on_checkpoint("visualize", runs / "feature"), capsys)
    assert status == 0, err
    assert (runs / "feature" / "noise-feature.png").stat().st_size > 1000
    assert not (runs / "feature" / "noise-prompt.png").exists()


def test_interpret_prints_table_8(runs, capsys):
    status, out, err = run_cli(on_checkpoint("interpret", runs / "image", "--draws", "7"), capsys)
    assert status == 0, err
    table = (runs / "image" / "interpretation.md").read_text()
    assert table in out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    # 16 placeholders and "a photo of a" (the default template of an unknown folder).
    assert len(rows) == 20
    assert rows[0].startswith("| 0 | `x` |") and rows[16].startswith("| 16 | `a` |")
    for row in rows:
        counts = [int(cell.rsplit("(", 1)[1].rstrip(") ")) for cell in row.split("|")[3:-1]]
        assert len(counts) == 5 and all(1 <= count <= 7 for count in counts)
        assert counts == sorted(counts, reverse=True)


def test_interpret_without_prompt_noise_is_a_clear_error(runs, capsys):
    result = run_cli(["interpret", "--checkpoint", runs / "feature" / "checkpoint.pt"], capsys)
    assert_one_line_error(result, "has no prompt noise to interpret", "--text feature")


def test_nearest_tokens_agree_with_brute_force():
    generator = torch.Generator().manual_seed(0)
    vocabulary = torch.randn(1000, 12, generator=generator)
    embeddings = torch.randn(9, 12, generator=generator)
    embeddings[0] = vocabulary[417]  # an exact hit comes first
    found = visualize.nearest_tokens(embeddings, vocabulary, count=5, chunk=128)
    for row, embedding in enumerate(embeddings):
        distances = [
            (float((embedding - word).norm()), index) for index, word in enumerate(vocabulary)
        ]
        expected = [index for _, index in sorted(distances)[:5]]
        assert found[row].tolist() == expected
    assert found[0, 0] == 417


def test_eval_every_records_accuracy_and_plot_draws_runs(runs, capsys, tmp_path):
    lines = [
        json.loads(line) for line in (runs / "image" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all(0.0 <= line["test_accuracy"] <= 100.0 for line in lines)
    summary = json.loads((runs / "image" / "summary.json").read_text())
    assert lines[-1]["test_accuracy"] == summary["accuracy"]  # the same seeded evaluation
    output = tmp_path / "curves.png"
    status, _out, err = run_cli(
        ["plot", runs / "image", runs / "feature", "--output", output], capsys
    )
    assert status == 0, err
    assert output.read_bytes()[:4] == b"\x89PNG"
    result = run_cli(["plot", tmp_path / "nowhere"], capsys)
    assert_one_line_error(result, "no metrics.jsonl")
