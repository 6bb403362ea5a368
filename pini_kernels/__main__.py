"""``python -m pini_kernels``: which backends this install has, and for each one that it lacks,
why and what to run. Nothing is built or changed."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__
from .backends import BACKENDS, ENV_VAR, _unavailable_reason, resolve_backend
from .build import native_missing_hint


def report() -> str:
    """The lines ``python -m pini_kernels`` prints: versions, one line per backend (available,
    or why not), the backend a call picks for CPU and for CUDA tensors, and how to get a missing
    native backend."""
    cuda = torch.version.cuda
    lines = [
        f"pini_kernels {__version__}: torch {torch.__version__} "
        f"({'CUDA ' + cuda if cuda else 'CPU-only'} build), Python {platform.python_version()}",
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}",
        "",
    ]
    width = max(len(name) for name in BACKENDS)
    for name in BACKENDS:
        reason = _unavailable_reason(name, None)
        state = "available" if reason is None else f"not available: {reason}"
        lines.append(f"  {name:<{width}}  {state}")
    lines.append("")
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for device in devices:
        try:
            chosen = resolve_backend(None, torch.device(device))
        except (RuntimeError, ValueError) as error:
            chosen = f"none ({str(error).splitlines()[0]})"
        lines.append(f"a call on {device.upper()} tensors runs on: {chosen}")
    lines.append(f"(the environment variable {ENV_VAR} names one backend for every call)")
    if _unavailable_reason("cpu", None) is not None:
        lines += ["", native_missing_hint()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
