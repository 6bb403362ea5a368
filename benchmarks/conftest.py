"""Benchmark set-up: a saved JSON by default, the machine named in it, its rates measured once.

``pytest benchmarks/ --benchmark-only`` writes ``.benchmarks/<machine>-<date>.json`` unless
``--benchmark-json``, ``--benchmark-save`` or ``--benchmark-autosave`` says otherwise;
``python -m benchmarks.report`` turns the newest one into ``benchmarks/results/<machine>.md``
and ``.png``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from .harness import (
    DEVICE,
    FULL_SIZES,
    MachineRates,
    fused_backends,
    machine_name,
    machine_slug,
    measure_machine_rates,
)

_measured_rates: list[MachineRates] = []  # filled by the machine_rates fixture, once


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options
def pytest_configure(config: pytest.Config) -> None:
    option = config.option
    if not hasattr(option, "benchmark_json"):  # pytest-benchmark is not installed or disabled
        return
    if option.benchmark_json or option.benchmark_save or option.benchmark_autosave:
        return
    if option.benchmark_disable or option.benchmark_skip:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = config.rootpath / ".benchmarks" / f"{machine_slug()}-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    option.benchmark_json = json_path


@pytest.fixture(scope="session")
def machine_rates() -> MachineRates:
    """This machine's copy bandwidth and matmul rate, measured once per session."""
    if not _measured_rates:
        _measured_rates.append(measure_machine_rates(DEVICE))
    return _measured_rates[0]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["pini_machine"] = machine_name()
    machine_info["pini_device"] = DEVICE.type
    machine_info["pini_fused_backends"] = fused_backends(DEVICE)
    machine_info["pini_full_sizes"] = FULL_SIZES
    machine_info["torch"] = torch.__version__
    if DEVICE.type == "cuda":
        machine_info["cuda"] = torch.version.cuda
    if _measured_rates:
        machine_info["pini_rates"] = dataclasses.asdict(_measured_rates[0])


def pytest_report_header(config: pytest.Config) -> list[str]:
    sizes = "full" if FULL_SIZES else "default (PINI_BENCH_FULL=1 for the full GPU sizes)"
    return [
        f"pini benchmarks on {machine_name()}: fused backends {fused_backends(DEVICE)}, {sizes}"
    ]


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    json_path = getattr(config.option, "benchmark_json", None)
    if isinstance(json_path, Path) and json_path.exists():
        terminalreporter.write_line(
            f"pini benchmarks saved to {json_path}; render them with: python -m benchmarks.report"
        )
