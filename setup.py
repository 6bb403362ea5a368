"""Build script: metadata lives in pyproject.toml; this file builds the native extension.

``pini_kernels._C`` holds the fused CPU kernels (C++, OpenMP, SIMD) and, where nvcc and a CUDA
build of torch are present, the CUDA kernels, registered as the ``pini_native`` operator library.
It needs torch at build time, so install with ``pip install -e . --no-build-isolation``; a plain
``pip install -e .`` (isolated build without torch) or a machine without a C++ compiler still
installs the pure-Python package, with a warning, and the "triton" / "reference" backends.

Switches (environment variables):
  PINI_BUILD_CPU=0|1|auto    build the CPU kernels (default auto: when a C++ compiler exists)
  PINI_BUILD_CUDA=0|1|auto   build the CUDA kernels (default auto: when nvcc and torch.version.cuda)
  PINI_CPU_ARCH=native|...   -march for the CPU kernels (default native; e.g. x86-64-v3)
  TORCH_CUDA_ARCH_LIST       CUDA targets (default "8.0;9.0")
  MAX_JOBS                   parallel compile jobs (honoured by torch's ninja build)
"""

import os
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = Path("csrc")


def switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise SystemExit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def say(message: str) -> None:
    print(f"[pini setup] {message}", file=sys.stderr)


def native_extension():
    """The extension and its build command, or (None, None) with a warning saying why."""
    build_cpu, build_cuda = switch("PINI_BUILD_CPU"), switch("PINI_BUILD_CUDA")
    if build_cpu == "0" and build_cuda == "0":
        say("PINI_BUILD_CPU=0 and PINI_BUILD_CUDA=0: pure-Python install")
        return None, None
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn(
            "pini: torch is not importable at build time, so the native CPU/CUDA kernels are not "
            "built (backends 'triton' and 'reference' remain). Install torch first, then "
            "`pip install -e . --no-build-isolation`.",
            stacklevel=1,
        )
        return None, None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        message = f"no C++ compiler ({compiler}) found: the native kernels are not built"
        if build_cpu == "1":
            raise SystemExit(message)
        warnings.warn(f"pini: {message}", stacklevel=1)
        return None, None
    nvcc_found = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    cuda_sources = [CSRC / "cuda" / "kernels.cu", CSRC / "cuda" / "bindings_cuda.cpp"]
    if not all((ROOT / source).exists() for source in cuda_sources):
        nvcc_found = False
    with_cuda = build_cuda == "1" or (build_cuda == "auto" and nvcc_found)
    if build_cuda == "1" and not nvcc_found:
        raise SystemExit(
            "PINI_BUILD_CUDA=1 but nvcc (CUDA_HOME) or a CUDA build of torch is missing"
        )
    if build_cuda == "auto" and not nvcc_found:
        say("no nvcc or CPU-only torch: building the CPU kernels only")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    arch = os.environ.get("PINI_CPU_ARCH", "native")
    # -fno-math-errno: sqrt without an errno branch, so the Box-Muller loop vectorizes.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", f"-march={arch}"]
    sources = [str(CSRC / "bindings.cpp"), str(CSRC / "cpu" / "kernels.cpp")]
    define_macros = []
    if with_cuda:
        sources += [str(source) for source in cuda_sources]
        define_macros.append(("PINI_WITH_CUDA", "1"))
        extension_type = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": ["-O3"]}
    else:
        extension_type = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
    say(f"building pini_kernels._C: CPU kernels{' + CUDA kernels' if with_cuda else ''}")
    extension = extension_type(
        "pini_kernels._C",
        sources,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    build_command = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return extension, build_command


extension, build_command = native_extension()
if extension is None:
    setup()
else:
    setup(ext_modules=[extension], cmdclass={"build_ext": build_command})
