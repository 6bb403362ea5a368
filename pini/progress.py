"""Output for people while a command works (docs/spec.md §12): a terminal gets progress bars, a
pipe or a CI log one line per epoch and no carriage-return bars; either way a line says what is
about to take long before it starts. Everything here goes to stderr (tqdm's stream), so stdout
holds only the results."""

from __future__ import annotations

import sys

from tqdm import tqdm


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def show_bars(progress: bool) -> bool:
    """Whether to draw progress bars: progress is wanted (no ``--no-progress``) and stderr, where
    tqdm draws them, is a terminal."""
    return progress and stderr_is_terminal()


def say(message: str, progress: bool = True) -> None:
    """One line on stderr (through tqdm, so that a bar on the screen is not torn), when
    ``progress`` is wanted."""
    if progress:
        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()


def epoch_line(metrics: dict, epochs: int) -> str:
    """The one-line summary of an epoch from its metrics (a line of ``metrics.jsonl``), e.g.
    ``epoch 3/200: loss 1.2345, lr 0.002, test accuracy 54.26%, 0.4 s``."""
    parts = [f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.4g}"]
    if "test_accuracy" in metrics:
        parts.append(f"test accuracy {metrics['test_accuracy']:.2f}%")
    parts.append(f"{metrics['seconds']:.1f} s")
    return f"epoch {metrics['epoch']}/{epochs}: " + ", ".join(parts)
