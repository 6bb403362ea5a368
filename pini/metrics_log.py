"""A run's epoch metrics (docs/spec.md §11): ``metrics.jsonl`` (one JSON object per epoch),
``metrics.csv`` beside it (the same rows and values, a column per key), and with ``tensorboard``
TensorBoard scalars (``loss``, ``lr``, ``accuracy``) under ``RUN/tensorboard``. On resume the
lines past the checkpoint are dropped from all of them."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

from .errors import InputError
from .files import write_text_atomically

METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
TENSORBOARD = "tensorboard"


def check_tensorboard() -> None:
    """An ``InputError`` when the ``tensorboard`` package, which ``--tensorboard`` writes with,
    is not installed (checked before any work)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise InputError(
            "--tensorboard needs the tensorboard package, which is not installed "
            "(pip install tensorboard)"
        )


def summary_writer(folder: Path, purge_step: int):
    """torch's TensorBoard writer into ``folder``; events from ``purge_step`` on (a resumed
    run's epochs past its checkpoint) are dropped."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def _kept_rows(path: Path, epochs_done: int) -> list[dict]:
    """The metric lines of epochs 1..``epochs_done``: lines past the checkpoint (a kill between
    the metrics append and the checkpoint write leaves an epoch that will run again) and a torn
    last line are dropped."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            epoch = row["epoch"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(epoch, int) and epoch <= epochs_done:
            kept.append(row)
    return kept


def csv_text(rows: list[dict]) -> str:
    """``rows`` as CSV: a column per key in the order keys first appear, an empty cell where a
    row has no value (``test_accuracy`` outside ``--eval-every`` epochs); floats as ``repr``
    writes them, so each reads back exactly."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue() if rows else ""


class MetricsLog:
    """The metric files of the run in ``folder``, trimmed to ``epochs_done`` (the checkpoint's)
    on opening; ``append`` adds an epoch to each."""

    def __init__(self, folder: Path, epochs_done: int, *, tensorboard: bool = False):
        self.folder = Path(folder)
        self.rows = _kept_rows(self.folder / METRICS, epochs_done)
        if (self.folder / METRICS).is_file():  # a resumed run: both files as far as it got
            write_text_atomically(
                self.folder / METRICS, "".join(json.dumps(row) + "\n" for row in self.rows)
            )
            self._write_csv()
        self.writer = None
        if tensorboard:
            self.writer = summary_writer(self.folder / TENSORBOARD, purge_step=epochs_done + 1)

    def _write_csv(self) -> None:
        write_text_atomically(self.folder / METRICS_CSV, csv_text(self.rows))

    def append(self, metrics: dict) -> None:
        with open(self.folder / METRICS, "a") as log:
            log.write(json.dumps(metrics) + "\n")
        self.rows.append(dict(metrics))
        self._write_csv()
        if self.writer is not None:
            step = metrics["epoch"]
            self.writer.add_scalar("loss", metrics["loss"], step)
            self.writer.add_scalar("lr", metrics["lr"], step)
            if "test_accuracy" in metrics:
                self.writer.add_scalar("accuracy", metrics["test_accuracy"], step)
            self.writer.flush()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
