"""What a run prints while it works, and its metric files (docs/spec.md §11, §12): a pipe gets one
line per epoch with the values of metrics.jsonl and no carriage-return bars, a terminal a bar per
epoch that stays, `--no-progress` only the results; the last line names the run folder.
metrics.csv holds what metrics.jsonl holds, also after a resume; `--tensorboard` writes loss, lr
and accuracy per epoch, and without the package is one line before any work.

The runs are the tiny random model on a 3-class toy dataset (tests/test_cli.py's helpers).
"""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from test_cli import (
    _fail_checkpoint_save,
    assert_one_line_error,
    make_folder,
    resume,
    run_cli,
    toy_train,
)

import pini.commands
import pini.demo
import pini.metrics_log
import pini.progress
from pini.backbone import build_clip

# The tiny run of these tests with progress reporting on (test_cli's TINY turns it off).
WATCHED = ["--shots", "2", "--epochs", "3", "--eval-every", "2"]
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): loss (\S+), lr (\S+)(?:, test accuracy (\S+)%)?, ")


@pytest.fixture
def data(tmp_path):
    make_folder(tmp_path / "data" / "toy")
    return tmp_path / "data"


def watched_train(data, output, *extra) -> list:
    """`pini train` of the tiny model with progress reporting (no --no-progress)."""
    argv = toy_train(data, output, *WATCHED, *extra)
    argv.remove("--no-progress")
    return argv


def _metrics(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _csv_rows(output) -> list[dict]:
    """metrics.csv's rows as numbers, an empty cell left out."""
    with open(output / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return [
        {
            key: int(value) if key in ("epoch", "skipped_images") else float(value)
            for key, value in row.items()
            if value != ""
        }
        for row in rows
    ]


def test_a_pipe_gets_one_line_per_epoch_with_the_metrics_values_and_no_bars(data, tmp_path, capsys):
    output = tmp_path / "run"
    status, out, err = run_cli(watched_train(data, output), capsys)
    assert status == 0, err
    assert "\r" not in out + err
    metrics = _metrics(output)
    epoch_lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == len(metrics) == 3
    for line, row in zip(epoch_lines, metrics, strict=True):
        epoch, epochs, loss, lr, accuracy = EPOCH_LINE.match(line).groups()
        assert (int(epoch), int(epochs)) == (row["epoch"], 3)
        assert loss == f"{row['loss']:.4f}" and lr == f"{row['lr']:.4g}"
        if "test_accuracy" in row:
            assert accuracy == f"{row['test_accuracy']:.2f}"
        else:
            assert accuracy is None
    assert [row["epoch"] for row in metrics if "test_accuracy" in row] == [2]
    # Nothing else but a line before each evaluation: no bar, no blank line.
    others = [line for line in err.splitlines() if not line.startswith("epoch ")]
    assert others == ["zero-shot CLIP on the 9 test images ...", "PiNI on the 9 test images ..."]
    *_, result, last = out.splitlines()
    assert result.startswith("toy, 2 shots, seed 1, noise feature+prompt: zero-shot CLIP ")
    assert last == f"run folder: {output}"


def test_a_terminal_gets_a_bar_per_epoch_that_stays_then_its_line(
    data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(pini.progress, "stderr_is_terminal", lambda: True)
    output = tmp_path / "run"
    status, _, err = run_cli(watched_train(data, output), capsys)
    assert status == 0, err
    metrics = _metrics(output)
    # Each epoch's bar ends at 100% on its own line (it stays), its summary line right below.
    lines = err.split("\n")
    for row in metrics:
        summary = next(
            i for i, line in enumerate(lines) if line.startswith(f"epoch {row['epoch']}/3:")
        )
        last_draw = lines[summary - 1].split("\r")[-1]
        assert last_draw.startswith(f"epoch {row['epoch']}/3: 100%"), lines[summary - 1]
        assert f"loss={row['loss']:.4f}" in last_draw


def test_no_progress_prints_only_the_results(data, tmp_path, capsys):
    output = tmp_path / "run"
    argv = toy_train(data, output, *WATCHED)
    status, out, err = run_cli(argv, capsys)
    assert status == 0 and err == "", err
    assert len(out.splitlines()) == 2 and out.splitlines()[-1] == f"run folder: {output}"


def test_loading_weights_is_said_before_the_wait(data, tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    torch.save(build_clip("pini-tiny")[0].state_dict(), weights)
    output = tmp_path / "run"
    status, _, err = run_cli(watched_train(data, output, "--pretrained", weights), capsys)
    assert status == 0, err
    assert err.splitlines()[0] == f"loading pini-tiny weights ({weights}) ..."


def test_the_demo_says_it_pre_trains_its_clip(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pini.demo, "PRETRAIN_STEPS", 2)
    pini.demo.digits_clip(tmp_path, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("pre-training the demo's tiny CLIP on held-out digits (2 steps, once")
    assert "\r" not in err and len(err.splitlines()) == 1


def test_metrics_csv_holds_what_metrics_jsonl_holds(data, tmp_path, capsys):
    output = tmp_path / "run"
    status, _, err = run_cli(toy_train(data, output, *WATCHED), capsys)
    assert status == 0, err
    metrics = _metrics(output)
    assert _csv_rows(output) == metrics  # every value, exactly (floats as repr writes them)
    header = (output / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,loss,lr,skipped_images,seconds,test_accuracy"


def test_a_resumed_run_keeps_metrics_csv_equal_to_metrics_jsonl(
    data, tmp_path, capsys, monkeypatch
):
    """Ctrl-C while epoch 2's checkpoint is written: its metric lines are on disk, the
    checkpoint is epoch 1's. The resume drops epoch 2's lines from both files and runs it
    again: both end as an uninterrupted run's (but for the seconds)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli(toy_train(data, whole, *WATCHED), capsys)[0] == 0
    _fail_checkpoint_save(monkeypatch, KeyboardInterrupt())
    assert run_cli(toy_train(data, cut, *WATCHED), capsys)[0] == 130
    monkeypatch.undo()
    assert [row["epoch"] for row in _csv_rows(cut)] == [1, 2]
    assert run_cli(resume(data, cut, "--eval-every", "2"), capsys)[0] == 0  # not stored
    assert _csv_rows(cut) == _metrics(cut)

    def without_seconds(rows):
        return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]

    assert without_seconds(_csv_rows(cut)) == without_seconds(_csv_rows(whole))


def test_tensorboard_without_the_package_is_one_line_before_any_work(
    data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(pini.metrics_log.importlib.util, "find_spec", lambda name: None)
    output = tmp_path / "run"
    result = run_cli(toy_train(data, output, "--tensorboard"), capsys)
    assert_one_line_error(result, "--tensorboard", "pip install tensorboard")
    assert not output.exists()


WRITERS: list = []  # the _Writer objects made, in order


class _Writer:
    """Stands in for torch's SummaryWriter: records what is written."""

    def __init__(self, log_dir, purge_step):
        self.log_dir, self.purge_step, self.scalars = log_dir, purge_step, []
        WRITERS.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_gets_loss_lr_and_accuracy_per_epoch(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pini.commands, "check_tensorboard", lambda: None)
    monkeypatch.setattr(pini.metrics_log, "summary_writer", _Writer)
    WRITERS.clear()
    output = tmp_path / "run"
    status, _, err = run_cli(toy_train(data, output, *WATCHED, "--tensorboard"), capsys)
    assert status == 0, err
    (writer,) = WRITERS
    assert (writer.log_dir, writer.purge_step) == (output / "tensorboard", 1) and writer.closed
    want = []
    for row in _metrics(output):
        want += [("loss", row["epoch"], row["loss"]), ("lr", row["epoch"], row["lr"])]
        if "test_accuracy" in row:
            want.append(("accuracy", row["epoch"], row["test_accuracy"]))
    assert writer.scalars == want
    # A resume past the checkpoint drops the events of the epochs that run again.
    WRITERS.clear()
    assert run_cli(resume(data, output, "--tensorboard"), capsys)[0] == 0
    assert WRITERS[0].purge_step == 4 and WRITERS[0].scalars == []


def test_tensorboard_events_with_the_real_package(data, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    status, _, err = run_cli(toy_train(data, output, *WATCHED, "--tensorboard"), capsys)
    assert status == 0, err
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    metrics = _metrics(output)
    for tag, key in (("loss", "loss"), ("lr", "lr"), ("accuracy", "test_accuracy")):
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        want = [(row["epoch"], row[key]) for row in metrics if key in row]
        assert [step for step, _ in logged] == [step for step, _ in want]
        assert all(
            math.isclose(value, wanted, rel_tol=1e-6)
            for (_, value), (_, wanted) in zip(logged, want, strict=True)
        )
    # --overwrite replaces the events with the run's other files.
    status, _, err = run_cli(toy_train(data, output, "--overwrite"), capsys)
    assert status == 0 and not (output / "tensorboard").exists(), err
