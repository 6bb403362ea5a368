"""Run folders: the files a run writes, the lock a writing process holds, and the checks a new,
replaced or resumed run makes on its folder before any work.

A run folder holds one run: ``run.json`` (what the run is: method, model, data, every resolved
option), the few-shot split with a fingerprint of the images it was drawn from, ``metrics.jsonl``
and ``metrics.csv`` (with ``--tensorboard`` also ``tensorboard/``), ``checkpoint.pt`` and
``summary.json``; a sweep with ``--eval-datasets`` adds ``eval-<dataset>.json`` per target. A
new run never writes into a folder that holds something (``--overwrite`` replaces a run),
``--resume`` continues exactly the stored run (a flag that differs is an error), and ``eval``
rebuilds the model from the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .checkpoint import CHECKPOINT
from .errors import InputError
from .files import write_text_atomically
from .metrics_log import METRICS, METRICS_CSV, TENSORBOARD

RUN_FILE = "run.json"
SUMMARY = "summary.json"

OWN_FILES = (RUN_FILE, CHECKPOINT, METRICS, METRICS_CSV, SUMMARY)
# Every file pini writes goes first to NAME.tmp, then replaces NAME: a write that failed (disk
# full, Ctrl-C) leaves at most these, which are pini's own and hold nothing worth keeping.
TEMPORARY_FILES = (*(name + ".tmp" for name in OWN_FILES), ".write-test-*")


def _own_files(folder: Path) -> list[Path]:
    return [
        folder / name for name in (*OWN_FILES, TENSORBOARD) if (folder / name).exists()
    ] + sorted(
        {  # a set: a failed write's split-*.json.tmp is also one of the leftovers
            *folder.glob("split-*shot-seed*.json*"),
            *folder.glob("eval-*.json*"),  # a sweep's evaluations on its --eval-datasets
            *_leftovers(folder),
        }
    )


def _leftovers(folder: Path) -> list[Path]:
    """pini's temporary files in ``folder``, left by a write that failed."""
    return sorted(
        {path for pattern in TEMPORARY_FILES for path in folder.glob(pattern)}
        | set(folder.glob("split-*shot-seed*.json.tmp"))
        | set(folder.glob("eval-*.json.tmp"))
    )


# Held (flock) by the process writing a run folder, or a sweep's folder, for as long as it runs;
# holds that process's pid. Not part of the run: an otherwise empty folder is still empty.
LOCK_FILE = ".pini-lock"
_LOCKS: dict[Path, object] = {}  # folder -> its open, locked lock file


def folder_entries(folder: Path) -> list[Path]:
    """What a folder holds, less pini's lock file and the temporary files of failed writes (a
    folder holding only those is as good as empty)."""
    leftovers = set(_leftovers(folder))
    return [path for path in folder.iterdir() if path.name != LOCK_FILE and path not in leftovers]


def lock_folder(folder: Path) -> None:
    """Takes the folder's exclusive lock for this process (creating the folder): a second pini
    process writing the same run or sweep would interleave its files. The lock goes with the
    process (or ``unlock_folder``)."""
    import fcntl

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 (held until unlock_folder)
    except OSError as error:
        raise InputError(f"run folder {folder} is not writable ({error.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise InputError(
            f"{folder} is in use by another pini process (pid {holder}); wait for it to finish, "
            "or use another --output"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCKS[folder] = handle


def unlock_folder(folder: Path) -> None:
    handle = _LOCKS.pop(Path(folder), None)
    if handle is not None:
        handle.close()  # closing releases the flock


def check_folder(folder: Path, *, overwrite: bool) -> None:
    """Without side effects: a new run needs an empty (or new) folder, unless ``--overwrite``;
    the folder (or the nearest existing parent) must be a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--output {folder} is a file, not a folder")
    if folder.is_dir() and folder_entries(folder):
        foreign = sorted(set(folder_entries(folder)) - set(_own_files(folder)))
        if not overwrite:
            raise InputError(
                f"run folder {folder} is not empty; use --resume to continue its run, "
                "--overwrite to replace it, or another --output"
            )
        if foreign:
            raise InputError(
                f"--overwrite replaces a run, but {folder} also holds other files "
                f"({', '.join(path.name for path in foreign[:3])}); use another --output"
            )
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"run folder {folder} cannot be created: {existing} is not writable")


def prepare_folder(folder: Path, *, overwrite: bool) -> None:
    """Deletes a replaced run's files (``--overwrite``) and the temporary files of failed
    writes, and creates the folder."""
    if folder.is_dir():
        for path in _own_files(folder) if overwrite else _leftovers(folder):
            if path.is_dir():  # --tensorboard's events
                shutil.rmtree(path)
            else:
                path.unlink()
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
    except OSError as error:
        raise InputError(f"run folder {folder} is not writable ({error.strerror})") from None
    finally:
        probe.unlink(missing_ok=True)


def write_json(path: Path, value: dict) -> None:
    write_text_atomically(path, json.dumps(value, indent=2))
