"""Which backends exist in this process, and which one a call uses (docs/spec.md §2).

- ``"triton"``: the fused Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
  was set before the kernels were imported (Triton's interpreter, for tests).
- ``"cuda"`` / ``"cpu"``: the compiled kernels of the native extension, when it was built.
- ``"reference"``: pure PyTorch, any device, float64 too.

``backend=None`` picks ``PINI_KERNELS_BACKEND`` when set, else ``"triton"`` for CUDA tensors and
``"cpu"`` for CPU tensors, falling back to ``"reference"`` where those are not available.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

__all__ = ["BACKENDS", "ENV_VAR", "available_backends", "resolve_backend"]

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "PINI_KERNELS_BACKEND"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_probe: list[str | None] = []  # filled once by _triton_missing_reason


@torch.compiler.assume_constant_result  # torch.compile calls it eagerly instead of tracing it
def _triton_missing_reason() -> str | None:
    """None when Triton can be imported, else why not (probed once per process)."""
    if not _triton_probe:
        _triton_probe.append(_probe_triton())
    return _triton_probe[0]


def _probe_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as error:  # an incompatible install fails in many ways
        return f"importing triton failed: {error}"
    return None


_native_probe: dict[str, str | None] = {}  # filled once per backend by _native_missing_reason


@torch.compiler.assume_constant_result
def _native_missing_reason(backend: str) -> str | None:
    """None when the native extension has kernels for ``backend`` ("cpu" or "cuda")."""
    if backend not in _native_probe:
        _native_probe[backend] = _probe_native(backend)
    return _native_probe[backend]


def _probe_native(backend: str) -> str | None:
    rebuild = "pip install -e . --no-build-isolation (with a C++ compiler, and nvcc for 'cuda')"
    try:
        from . import _C  # noqa: F401
    except ImportError as error:
        return (
            f"the native extension pini_kernels._C was not built ({error}); build it with {rebuild}"
        )
    dispatch_key = "CUDA" if backend == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
        "pini_native::inject_forward", dispatch_key
    ):
        return f"pini_kernels._C was built without {backend!r} kernels; rebuild with {rebuild}"
    return None


_warned_native_missing: set[str] = set()


def _warn_native_missing_once(backend: str) -> None:
    """The first time a missing native backend would have been chosen, one warning says so and
    how to build it (a plain ``pip install -e .`` builds without torch, hence without them)."""
    if backend in _warned_native_missing or _native_missing_reason(backend) is None:
        return
    _warned_native_missing.add(backend)
    from .build import native_missing_hint

    warnings.warn(
        f"pini_kernels: the compiled {backend!r} kernels are not available, so the slower "
        f"'reference' backend runs instead. {native_missing_hint()}",
        RuntimeWarning,
        stacklevel=3,
    )


def _unavailable_reason(backend: str, device: torch.device | None) -> str | None:
    """None when ``backend`` can run on ``device`` (any device when None), else why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        missing = _triton_missing_reason()
        if missing is not None:
            return missing
        if device is None:
            if torch.cuda.is_available() or triton_interpreting():
                return None
            return "no CUDA GPU is available (set TRITON_INTERPRET=1 to run it on CPU tensors)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        if device.type == "cpu":
            return (
                "it needs CUDA tensors, got CPU tensors (set TRITON_INTERPRET=1 before importing "
                "pini_kernels to run Triton's interpreter on the CPU)"
            )
        return f"it does not run on {device.type} tensors"
    if backend in ("cpu", "cuda"):
        reason = _native_missing_reason(backend)
        if reason is None and backend == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA GPU is available"
        if reason is None and device is not None and device.type != backend:
            reason = f"it runs on {backend} tensors, got {device.type} tensors"
        return reason
    return f"unknown backend; expected one of {BACKENDS}"


def available_backends() -> list[str]:
    """The backends usable in this process, in order of preference, e.g. ["triton", "reference"]."""
    return [name for name in BACKENDS if _unavailable_reason(name, None) is None]


_resolved: dict[tuple, str] = {}  # (backend, environment, device) -> backend: a call's answer


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend a call on tensors of ``device`` runs on; raises if it cannot run there.
    Answers are kept per argument, environment and device (small tensors feel every host-side
    microsecond); under torch.compile it is worked out each time, as the graph is traced once."""
    if torch.compiler.is_compiling():
        return _resolve_backend(backend, device)
    key = (backend, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"), device)
    resolved = _resolved.get(key)
    if resolved is None:
        resolved = _resolved[key] = _resolve_backend(backend, device)
    return resolved


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}"
    if backend is None:
        preferred = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        for name in preferred:
            if _unavailable_reason(name, device) is None:
                return name
        _warn_native_missing_once(preferred[-1])
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return backend
