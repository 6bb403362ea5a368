"""Test set-up: Triton's interpreter on machines without a GPU, NaN-poisoned kernel outputs."""

import os

import torch

# Both must be set before pini_kernels (and so triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PINI_KERNELS_POISON", "1")

import pytest

import pini_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Every test of an op runs on each of these: a new backend is a new parameter.
FUSED_BACKENDS = [name for name in pini_kernels.available_backends() if name != "reference"]
ALL_BACKENDS = [*FUSED_BACKENDS, "reference"]


def backend_device(backend: str) -> torch.device:
    """Where a backend's tests put their tensors: the CPU for "cpu", else the test device."""
    return torch.device("cpu") if backend == "cpu" else DEVICE


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request) -> str:
    return request.param


@pytest.fixture
def force_loss_splits(monkeypatch):
    """``force_loss_splits(n)``: the Triton loss kernel then splits each row's classes n ways on
    any device (under the interpreter it otherwise uses one, and the merge of the splits' row
    statistics would never run). Returns the list of (rows, classes) it is asked for."""
    from pini_kernels.triton import logits_loss

    asked: list[tuple[int, int]] = []

    def force(splits: int) -> list[tuple[int, int]]:
        def loss_splits(rows: int, classes: int, device: torch.device) -> int:
            asked.append((rows, classes))
            return splits

        monkeypatch.setattr(logits_loss, "_loss_splits", loss_splits)
        return asked

    return force


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    from helpers import worst_errors

    errors = worst_errors()
    if not errors:
        return
    terminalreporter.section("largest error against the reference")
    for key in sorted(errors):
        terminalreporter.write_line(f"{key:<48} {errors[key]:.3g}")
