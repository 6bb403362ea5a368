"""Benchmark set-up: the machine's name in every saved result, and the device under test."""

import os
import platform

import torch

# Never benchmark Triton's interpreter: it is a correctness tool, thousands of times slower.
os.environ.pop("TRITON_INTERPRET", None)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL_SIZES = os.environ.get("PINI_BENCH_FULL", "0") == "1"


def machine_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["pini_device"] = machine_name()
    machine_info["torch"] = torch.__version__
