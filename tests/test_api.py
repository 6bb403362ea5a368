"""Backend selection (SPEC.md, "Public API"): which backends a process has, which one a call uses,
and an error that says why when the one asked for cannot run. Each op's tests are in its own
module (test_noise_stream.py, test_inject.py, test_cosine.py), run on every backend.
"""

import pytest
import torch

import pini_kernels
from pini_kernels import backends


def test_available_backends_lists_reference_last():
    names = pini_kernels.available_backends()
    assert names[-1] == "reference"
    assert set(names) <= set(backends.BACKENDS)


def test_auto_backend_and_environment_variable(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected_cpu = "cpu" if "cpu" in pini_kernels.available_backends() else "reference"
    assert backends.resolve_backend(None, cpu) == expected_cpu
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve_backend(None, cpu) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=f"{backends.ENV_VAR} must be one of"):
        backends.resolve_backend(None, cpu)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        RuntimeError, match=r"backend 'triton' is not available: .*TRITON_INTERPRET"
    ):
        backends.resolve_backend("triton", torch.device("cpu"))
    if "cpu" not in pini_kernels.available_backends():
        with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available: .*not built"):
            backends.resolve_backend("cpu", torch.device("cpu"))
