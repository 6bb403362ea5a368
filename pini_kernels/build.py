"""Compile the native kernels (``pini_kernels._C``) in place against the installed torch.

    python -m pini_kernels.build [--cpu-only]

For a source checkout installed with a plain ``pip install -e .``: pip built it in an isolated
environment without torch, so the "cpu" and "cuda" backends were not compiled. This runs the
checkout's ``setup.py build_ext --inplace`` with this interpreter, so against the torch it imports,
through torch's ``cpp_extension`` (with ninja where installed). The switches of ``setup.py`` apply
(``PINI_CPU_ARCH``, ``PINI_BUILD_CUDA``, ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``); a failed compile
fails here with the compiler's output, where ``pip install`` only warns.

Imports nothing but the standard library at module level, so the package can import
``native_missing_hint`` cheaply.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_COMMAND = "python -m pini_kernels.build"

# Run in a fresh interpreter after the build: which dispatch keys the new library has kernels for.
_PROBE = """
import torch
import pini_kernels._C
for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
    if torch._C._dispatch_has_kernel_for_dispatch_key("pini_native::inject_forward", key):
        print(backend)
"""


def source_checkout() -> Path | None:
    """The source checkout this package runs from (an editable install), or None."""
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():
        return root
    return None


def native_missing_hint() -> str:
    """One sentence telling the user how to get the native ("cpu", "cuda") backends."""
    if source_checkout() is not None:
        return (
            f"Build the native kernels against the installed torch with `{BUILD_COMMAND}` "
            "(needs a C++ compiler, and nvcc for the 'cuda' backend)."
        )
    return (
        "Reinstall from a source checkout with `pip install --no-build-isolation -e .` to build "
        "the native kernels (needs torch installed first and a C++ compiler)."
    )


# A compiler's or the linker's error line: GCC/clang "file:line:col: error: ...", nvcc "file(line):
# error: ..." and "nvcc fatal : ...", "fatal error", ld's "undefined reference"; not a command
# line's "-Werror", not a warning.
_ERROR_LINE = re.compile(r"\berror\s*:|fatal error|nvcc fatal|undefined reference", re.IGNORECASE)
# An error from the CUDA part of the build (a .cu file, nvcc, the CUDA toolkit or its headers).
_CUDA_ERROR = re.compile(r"\.cu\b|\.cuh\b|nvcc|cuda", re.IGNORECASE)


def first_error(lines: list[str]) -> str | None:
    """The first line of a build's output that reports an error (not a warning), stripped."""
    for line in lines:
        if _ERROR_LINE.search(line) and "warning" not in line.lower():
            return line.strip()
    return None


def build_in_place(root: Path, *, cpu_only: bool = False) -> tuple[int, str | None]:
    """Runs ``setup.py build_ext --inplace`` in ``root``, its output shown as it comes; returns
    its exit status and the first error line of that output (None when there is none)."""
    env = dict(os.environ)
    env.setdefault("PINI_BUILD_CPU", "1")  # a failed compile is an error here, not a warning
    if cpu_only:
        env["PINI_BUILD_CUDA"] = "0"
    command = [sys.executable, "setup.py", "build_ext", "--inplace"]
    print(f"pini_kernels.build: {' '.join(command)} (in {root})", flush=True)
    lines: list[str] = []
    with subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as build:
        for line in build.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    return build.returncode, first_error(lines)


def built_backends(root: Path) -> list[str]:
    """The backends ("cpu", "cuda") whose kernels the in-place library registers.

    Probed in a fresh interpreter: this one may hold an older copy of the library.
    """
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=root, capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        raise RuntimeError(f"the built pini_kernels._C does not load:\n{probe.stderr.strip()}")
    return probe.stdout.split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=BUILD_COMMAND,
        description="Compile pini_kernels._C in place against the installed torch (see setup.py "
        "for the PINI_* switches).",
    )
    parser.add_argument(
        "--cpu-only", action="store_true", help="skip the CUDA kernels (PINI_BUILD_CUDA=0)"
    )
    arguments = parser.parse_args(argv)
    root = source_checkout()
    if root is None:
        print(f"pini_kernels.build: no source checkout next to {Path(__file__).parent}.")
        print(native_missing_hint())
        return 1
    if shutil.which("ninja") is None:
        print(
            "pini_kernels.build: ninja not found, compiling one file at a time (pip install ninja)"
        )
    status, error = build_in_place(root, cpu_only=arguments.cpu_only)
    if status != 0 and not arguments.cpu_only and error and _CUDA_ERROR.search(error):
        # The CUDA kernels are the usual casualty (toolkit, arch list, host compiler): keep the
        # CPU kernels rather than nothing, and say why the CUDA ones are missing.
        print(
            f"pini_kernels.build: the CUDA kernels failed to compile ({error}); retrying without "
            "them (--cpu-only)",
            flush=True,
        )
        cpu_status, cpu_error = build_in_place(root, cpu_only=True)
        if cpu_status == 0:
            backends = built_backends(root)
            print(
                f"pini_kernels.build: built pini_kernels._C with kernels for: "
                f"{', '.join(backends)}; NOT the CUDA kernels, whose build failed with: {error}"
            )
            return 1
        status, error = cpu_status, cpu_error
    if status != 0:
        print(
            f"pini_kernels.build: the build failed (exit status {status}); the first error: "
            f"{error or 'none found in the output (see above)'}"
        )
        return status
    backends = built_backends(root)
    print(f"pini_kernels.build: built pini_kernels._C with kernels for: {', '.join(backends)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
