"""Build script: metadata lives in pyproject.toml; this file builds the native extension.

``pini_kernels._C`` holds the fused CPU kernels (C++, OpenMP, SIMD) and, where nvcc and a CUDA
build of torch are present, the CUDA kernels, registered as the ``pini_native`` operator library.
It needs torch at build time, so install with ``pip install -e . --no-build-isolation``; a plain
``pip install -e .`` (isolated build without torch), a machine without a C++ compiler or a compile
that fails still installs the pure-Python package, with a warning, and the "triton" / "reference"
backends; ``python -m pini_kernels.build`` then compiles the extension in place against the
installed torch.

Switches (environment variables):
  PINI_BUILD_CPU=0|1|auto    build the CPU kernels (default auto: when a C++ compiler exists)
  PINI_BUILD_CUDA=0|1|auto   build the CUDA kernels (default auto: when nvcc and torch.version.cuda)
                             With either at 1 a failed compile of those kernels fails the build;
                             otherwise it warns: a failed CUDA compile builds the CPU kernels
                             alone, a failed CPU compile installs the pure-Python package.
  PINI_CPU_ARCH              the CPU kernels' target:
                               auto (default): x86-64-v3 (AVX2, FMA) on x86-64, plus a copy of the
                                 kernels for AVX-512 that runs where the CPU has it; the compiler's
                                 default elsewhere (aarch64: NEON)
                               portable: no -march and no x86 code paths (what non-x86 machines
                                 build; forces that path on x86 for testing, or for CPUs older
                                 than x86-64-v3)
                               native, or any -march value: -march=VALUE (native: fastest here,
                                 may crash on another CPU); the AVX-512 copy is kept
  TORCH_CUDA_ARCH_LIST       CUDA targets (default "8.0;9.0+PTX": newer GPUs JIT the PTX)
  MAX_JOBS                   parallel compile jobs (honoured by torch's ninja build)
"""

import os
import platform
import shlex
import shutil
import subprocess
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


# x86-64-v3 (Haswell, Zen 1 and later) spelled as its extensions, for compilers that do not know
# -march=x86-64-v3 (GCC before 11, clang before 12).
X86_64_V3_FLAGS = [
    "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe", "-mpopcnt", "-mcx16",
    "-msahf", "-mxsave",
]  # fmt: skip


def compiler_accepts(compiler: str, flag: str) -> bool:
    """Whether the C++ compiler accepts ``flag`` (it preprocesses an empty file with it)."""
    command = [*shlex.split(compiler), flag, "-x", "c++", "-E", "-o", os.devnull, "-"]
    try:
        return subprocess.run(command, input="", capture_output=True, check=False).returncode == 0
    except OSError:
        return False


def cpu_target(compiler: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Compiler flags and macros for PINI_CPU_ARCH (see the switches above)."""
    arch = os.environ.get("PINI_CPU_ARCH", "auto").strip()
    if not arch or any(character.isspace() for character in arch):
        raise SystemExit(
            f"PINI_CPU_ARCH must be auto, portable, native or a -march value, got {arch!r}"
        )
    if arch == "portable":
        return [], [("PINI_CPU_PORTABLE", "1")]
    if arch != "auto":
        return [f"-march={arch}"], []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [], []
    if compiler_accepts(compiler, "-march=x86-64-v3"):
        return ["-march=x86-64-v3"], []
    return X86_64_V3_FLAGS, []


def _takes_place_of(extension, original, command) -> None:
    """``extension`` (of the same name) replaces ``original`` in ``command`` after its options
    were finalized: it gets what setuptools' build_ext.finalize_options set on ``original``
    (``_full_name``, ``_needs_stub``, ...) and its entry in ``ext_map``."""
    for name, value in vars(original).items():
        if name.startswith("_") and not hasattr(extension, name):
            setattr(extension, name, value)
    ext_map = getattr(command, "ext_map", None)
    if isinstance(ext_map, dict):
        for key, value in list(ext_map.items()):
            if value is original:
                ext_map[key] = extension


def warn_when_compiling_fails(build_command, cpu_required: bool, cuda_required: bool, cpu_alone):
    """``build_command`` that, when the CUDA kernels fail to compile and were not required, builds
    ``cpu_alone`` (the extension without them; None when there is none to fall back to) instead,
    and when the CPU kernels fail too and were not required, warns and installs the pure-Python
    package instead of failing ``pip install``."""

    class BuildNativeOrWarn(build_command):
        def run(self):
            with_cuda = cpu_alone is not None
            # What a run changes and does not put back when the compile fails: the compiler
            # (replaced by the one it made) and setuptools' inplace (cleared while building, so
            # an editable install's copy into the source tree would be skipped).
            state = {name: getattr(self, name) for name in ("compiler", "inplace")}
            try:
                super().run()
                return
            except Exception as error:
                if cuda_required or (cpu_required and not with_cuda):
                    raise
                failure = error
            if with_cuda:
                warnings.warn(
                    f"pini: compiling the CUDA kernels failed ({failure}; the compiler's output is "
                    "above): building the CPU kernels alone, so the 'cuda' backend is missing. "
                    "`python -m pini_kernels.build` names the first error.",
                    stacklevel=1,
                )
                _takes_place_of(cpu_alone, self.extensions[0], self)
                self.extensions = [cpu_alone]
                for name, value in state.items():
                    setattr(self, name, value)
                try:
                    super().run()
                    return
                except Exception as error:
                    if cpu_required:
                        raise
                    failure = error
            warnings.warn(
                f"pini: compiling the native kernels failed ({failure}; the compiler's output is "
                "above), so only the 'triton' and 'reference' backends are installed. Once "
                "fixed, `python -m pini_kernels.build` compiles them in place.",
                stacklevel=1,
            )
            self.extensions = []  # nothing built: nothing for the wheel to collect

    return BuildNativeOrWarn


def cuda_home_from_nvcc() -> str | None:
    """The CUDA toolkit folder of the ``nvcc`` on PATH, as nvcc itself reports it (its dry run's
    ``TOP=``), for when CUDA_HOME is not set: torch then guesses the parent of nvcc's folder,
    which is wrong where ``nvcc`` is a wrapper script outside the toolkit. None when nvcc is
    missing or its answer holds no ``include/cuda_runtime.h``."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dry_run.stdout + dry_run.stderr).splitlines():
        if "TOP=" in line:
            home = os.path.realpath(line.split("TOP=", 1)[1].strip().strip('"'))
            if Path(home, "include", "cuda_runtime.h").is_file():
                return home
    return None


def native_extension():
    """The extension and its build command, or (None, None) with a warning saying why."""
    build_cpu, build_cuda = switch("PINI_BUILD_CPU"), switch("PINI_BUILD_CUDA")
    if build_cpu == "0" and build_cuda == "0":
        say("PINI_BUILD_CPU=0 and PINI_BUILD_CUDA=0: pure-Python install")
        return None, None
    if build_cuda != "0" and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = cuda_home_from_nvcc()
        if home is not None:  # before torch reads it, at the import of cpp_extension
            os.environ["CUDA_HOME"] = home
            say(f"CUDA_HOME not set: using {home}, the toolkit of the nvcc on PATH")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn(
            "pini: torch is not importable at build time, so the native CPU/CUDA kernels are not "
            "built (backends 'triton' and 'reference' remain). Build them against the installed "
            "torch with `python -m pini_kernels.build` (or reinstall with "
            "`pip install -e . --no-build-isolation`).",
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
    # +PTX: GPUs newer than the last listed one JIT-compile its PTX instead of "no kernel image".
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    target_flags, define_macros = cpu_target(compiler)
    target = " ".join(target_flags) or "the compiler's default target"
    if define_macros:
        target = "portable code (PINI_CPU_ARCH=portable)"
    # -fno-math-errno: sqrt without an errno branch, so the Box-Muller loop vectorizes.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", *target_flags]
    sources = [
        str(CSRC / "bindings.cpp"),
        str(CSRC / "autograd.cpp"),
        str(CSRC / "loss_flow.cpp"),
        str(CSRC / "cpu" / "kernels.cpp"),
        str(CSRC / "cpu" / "kernels_avx512.cpp"),  # empty unless x86-64 (csrc/cpu/isa.h)
    ]
    cpu_extension = cpp_extension.CppExtension(
        "pini_kernels._C",
        sources,
        define_macros=list(define_macros),
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    extension, cpu_alone = cpu_extension, None
    if with_cuda:
        extension = cpp_extension.CUDAExtension(
            "pini_kernels._C",
            sources + [str(source) for source in cuda_sources],
            define_macros=[*define_macros, ("PINI_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
        cpu_alone = None if build_cpu == "0" else cpu_extension
    kernels = f"CPU kernels for {target}" + (" + CUDA kernels" if with_cuda else "")
    say(f"building pini_kernels._C: {kernels}")
    build_command = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return extension, warn_when_compiling_fails(
        build_command, build_cpu == "1", build_cuda == "1", cpu_alone
    )


extension, build_command = native_extension()
if extension is None:
    setup()
else:
    setup(ext_modules=[extension], cmdclass={"build_ext": build_command})
