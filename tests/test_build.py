"""The native build: portable by default (AVX-512 chosen at run time), a portable path for machines
other than x86-64, `python -m pini_kernels.build`, and a failed compile that only warns.

The builds here go into temporary copies of the tree and run in subprocesses, so the installed
extension (and the ops it registered in this process) is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pini_kernels
from pini_kernels.build import BUILD_COMMAND, native_missing_hint

ROOT = Path(__file__).resolve().parent.parent
HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
IS_X86_64 = os.uname().machine in ("x86_64", "AMD64")

# Run in a subprocess against whichever pini_kernels its PYTHONPATH selects: the "cpu" backend's
# noise stream, fused_inject (forward and every gradient, add and mul, two column tiles) and the
# noisy cross-entropy against the pure-PyTorch "reference" backend. Exits non-zero on a mismatch.
CHECK_AGAINST_REFERENCE = r"""
import os, sys
import torch
import pini_kernels

assert pini_kernels.__file__.startswith(sys.argv[1]), pini_kernels.__file__
assert "cpu" in pini_kernels.available_backends(), pini_kernels.available_backends()
torch.manual_seed(0)
close = lambda actual, expected, what, tol=1e-5: torch.testing.assert_close(
    actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")

# The stream past several 4096-element tasks, with a ragged end; x=0, mu=0, sigma=1 gives eps.
numel, seed = 3 * 4096 + 13, 2**40 + 7
zeros = torch.zeros(numel)
eps = pini_kernels.fused_inject(zeros, zeros, torch.ones(numel), seed=seed, backend="reference")
close(pini_kernels.noise((numel,), seed=seed), eps, "noise")

# Width 2100 spans two 2048-column tiles; 3 samples; per-feature mu and sigma.
x = torch.randn(2, 37, 2100)
mu, sigma = torch.randn(2100) * 0.5, torch.rand(2100) + 0.1
for mode in ("add", "mul"):
    results = {}
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, mu, sigma)]
        out = pini_kernels.fused_inject(*leaves, mode=mode, num_samples=3, seed=11, backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results[backend] = [out.detach()] + [leaf.grad for leaf in leaves]
    names = ["out", "x.grad", "mu.grad", "sigma.grad"]
    for name, actual, expected in zip(names, *results.values()):
        tol = 1e-4 if name in ("mu.grad", "sigma.grad") else 1e-5  # sums over 222 rows, samples
        close(actual, expected, f"fused_inject {mode} {name}", tol=tol)
x_half = x.to(torch.bfloat16)
close(pini_kernels.fused_inject(x_half, mu, sigma, mode="mul", seed=5, backend="cpu"),
      pini_kernels.fused_inject(x_half, mu, sigma, mode="mul", seed=5, backend="reference"),
      "fused_inject bf16", tol=1.6e-2)

# Normalize, log-sum-exp and their backward: 33 images, 17 classes, width 70, 2 samples.
image, text = torch.randn(33, 70), torch.randn(17, 70)
target = torch.randint(0, 17, (33,))
noise_mu, noise_sigma = torch.randn(70) * 0.1, torch.rand(70) * 0.3
results = {}
for backend in ("cpu", "reference"):
    leaves = [t.clone().requires_grad_() for t in (image, text)]
    loss = pini_kernels.noisy_cross_entropy(
        *leaves, 30.0, target, image_noise=(noise_mu, noise_sigma),
        text_noise=(noise_mu, noise_sigma), num_samples=2, seed=3, backend=backend)
    loss.backward()
    results[backend] = [loss.detach()] + [leaf.grad for leaf in leaves]
for name, actual, expected in zip(["loss", "image.grad", "text.grad"], *results.values()):
    close(actual, expected, f"noisy_cross_entropy {name}", tol=1e-4)
print("matches the reference")
"""


def _copy_tree(destination: Path) -> Path:
    """The files a build needs (no compiled library, no build folder) under ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    ignore = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "build")
    for name in ("csrc", "pini_kernels"):
        shutil.copytree(ROOT / name, destination / name, ignore=ignore)
    return destination


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MAX_JOBS": "2", "PINI_BUILD_CUDA": "0", **env}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)


def _check_against_reference(tree: Path, **env: str) -> None:
    result = _run(
        [sys.executable, "-c", CHECK_AGAINST_REFERENCE, str(tree)],
        Path("/"),
        PYTHONPATH=str(tree),
        PINI_KERNELS_BACKEND="cpu",
        **env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "matches the reference" in result.stdout


def _vector_registers_by_function(library: Path) -> dict[str, set[str]]:
    """For each function of ``library``: the x86 vector register kinds it uses (xmm, ymm, zmm)."""
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    registers: dict[str, set[str]] = {}
    function = ""
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            registers[function] = set()
        elif function:
            registers[function].update(re.findall(r"%([xyz]mm)\d+", line))
    return registers


def _compiled_library(package: Path) -> Path:
    libraries = sorted(package.glob("_C.*.so"))
    assert libraries, f"no compiled pini_kernels._C in {package}"
    return libraries[0]


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_portable_build_matches_reference(tmp_path):
    """PINI_CPU_ARCH=portable (the code path of aarch64 and other non-x86 machines), built with
    `python -m pini_kernels.build`: no x86 vector code beyond the SSE2 every x86-64 has, and the
    noise stream, fused_inject and the loss equal the reference. 35-60 s on 2 busy cores."""
    tree = _copy_tree(tmp_path)
    started = time.perf_counter()
    result = _run(
        [sys.executable, "-m", "pini_kernels.build", "--cpu-only"], tree, PINI_CPU_ARCH="portable"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "CPU kernels for portable code" in output
    assert "built pini_kernels._C with kernels for: cpu" in output
    print(f"portable build: {time.perf_counter() - started:.0f} s")
    if IS_X86_64 and shutil.which("objdump"):
        registers = _vector_registers_by_function(_compiled_library(tree / "pini_kernels"))
        ours = {name: kinds for name, kinds in registers.items() if "pini::" in name}
        assert any("pini::cpu::baseline::" in name for name in ours), "kernels not found"
        assert not any("pini::cpu::avx512::" in name for name in ours), "an AVX-512 copy was built"
        wide = sorted(name for name, kinds in ours.items() if kinds & {"ymm", "zmm"})
        assert not wide, f"AVX code in the portable build: {wide[:3]}"
    _check_against_reference(tree)


@pytest.mark.skipif("cpu" not in pini_kernels.available_backends(), reason="no 'cpu' backend")
@pytest.mark.parametrize("capability", ["auto", "baseline"])
def test_installed_build_copies_match_reference(capability):
    """Both copies of the installed kernels: the one this CPU picks, and the baseline one forced by
    PINI_CPU_CAPABILITY=baseline (x86-64-v3 by default, what a CPU without AVX-512 runs)."""
    _check_against_reference(ROOT, PINI_CPU_CAPABILITY=capability)


@pytest.mark.skipif(
    not IS_X86_64
    or shutil.which("objdump") is None
    or "cpu" not in pini_kernels.available_backends(),
    reason="needs x86-64, objdump and the 'cpu' backend",
)
@pytest.mark.skipif(
    os.environ.get("PINI_CPU_ARCH", "auto") != "auto", reason="built with another PINI_CPU_ARCH"
)
def test_installed_build_runs_on_any_x86_64_v3_cpu():
    """The default build's baseline copy uses no AVX-512 (it used to be -march=native), and the
    AVX-512 copy exists, so AVX-512 machines lose no speed."""
    registers = _vector_registers_by_function(_compiled_library(ROOT / "pini_kernels"))
    baseline = {name: kinds for name, kinds in registers.items() if "pini::cpu::baseline::" in name}
    avx512 = {name: kinds for name, kinds in registers.items() if "pini::cpu::avx512::" in name}
    assert baseline, "no baseline copy of the kernels in the installed build"
    assert avx512, "no AVX-512 copy of the kernels in the installed build"
    with_zmm = sorted(name for name, kinds in baseline.items() if "zmm" in kinds)
    assert not with_zmm, f"baseline kernels use AVX-512 (built with -march=native?): {with_zmm[:3]}"
    assert any("ymm" in kinds for kinds in baseline.values()), "baseline kernels not vectorized"
    assert any("zmm" in kinds for kinds in avx512.values()), "AVX-512 copy uses no zmm registers"
    # Outside the two copies (bindings, inline functions of torch and the standard library, of
    # which the linker keeps one copy): nothing that needs AVX-512.
    shared = sorted(
        name
        for name, kinds in registers.items()
        if "zmm" in kinds and "pini::cpu::avx512::" not in name
    )
    assert not shared, f"AVX-512 code outside the AVX-512 copy: {shared[:3]}"


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_failed_compile_warns_and_builds_pure_python_wheel(tmp_path):
    """A compiler that errors out (here on an unknown -march) leaves a pure-Python package and a
    warning, not a failed `pip install`; with PINI_BUILD_CPU=1 the same build fails."""
    tree = _copy_tree(tmp_path / "tree")
    wheels = tmp_path / "wheels"
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-v",
        "--no-build-isolation",
        "--no-deps",
        "--no-index",
        "-w",
        str(wheels),
        str(tree),
    ]
    result = _run(command, tmp_path, PINI_CPU_ARCH="no-such-cpu")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "compiling the native kernels failed" in output
    (wheel,) = wheels.glob("pini-*.whl")
    listing = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True
    ).stdout
    assert "pini_kernels/__init__.py" in listing
    assert "pini_kernels/_C" not in listing

    strict = _run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        tree,
        PINI_CPU_ARCH="no-such-cpu",
        PINI_BUILD_CPU="1",
    )
    assert strict.returncode != 0
    assert not list((tree / "pini_kernels").glob("_C.*.so"))


def test_native_missing_hint_is_one_line_naming_the_command():
    hint = native_missing_hint()
    assert "\n" not in hint
    assert f"`{BUILD_COMMAND}`" in hint  # this test runs from a source checkout


def test_a_missing_native_backend_warns_once_when_it_would_have_been_chosen(monkeypatch):
    """A plain `pip install -e .` (isolated build, no torch) leaves no native kernels: the first
    call that would have used them says so, once, with the command that builds them."""
    import warnings

    import torch

    from pini_kernels import backends

    monkeypatch.setattr(backends, "_native_probe", {"cpu": "not built (simulated)"})
    monkeypatch.setattr(backends, "_warned_native_missing", set())
    monkeypatch.setattr(backends, "_resolved", {})  # answers kept from before the simulation
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = backends.resolve_backend(None, torch.device("cpu"))
        second = backends.resolve_backend(None, torch.device("cpu"))
    assert first == second == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "'cpu' kernels are not available" in messages[0]
    assert "python -m pini_kernels.build" in messages[0]


def test_python_m_pini_kernels_says_which_backends_this_install_has():
    """``python -m pini_kernels`` lists every backend, available or why not, and the backend a
    call on CPU tensors picks; the same answers the library gives."""
    import torch

    from pini_kernels import __main__ as doctor
    from pini_kernels import backends

    lines = doctor.report().splitlines()
    available = backends.available_backends()
    for name in backends.BACKENDS:
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert ("not available:" not in line) == (name in available), line
    chosen = backends.resolve_backend(None, torch.device("cpu"))
    assert f"a call on CPU tensors runs on: {chosen}" in lines
    completed = subprocess.run(
        [sys.executable, "-m", "pini_kernels"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    assert all(f"  {name} " in completed.stdout for name in backends.BACKENDS), completed.stdout


def _setup_function(name: str, **modules):
    """A function of setup.py, without running setup.py (which builds at import)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"os": os, "shutil": shutil, "subprocess": subprocess, "Path": Path, **modules}
    exec(compile(ast.Module([node], []), "setup.py", "exec"), namespace)
    return namespace[name]


def test_cuda_home_comes_from_the_nvcc_on_path_even_when_it_is_a_wrapper(tmp_path, monkeypatch):
    """A wrapper script `nvcc` outside the toolkit (as on these machines) made torch guess its
    parent folder as CUDA_HOME and the install silently skipped the CUDA kernels; setup.py asks
    nvcc where its toolkit is."""
    cuda_home_from_nvcc = _setup_function("cuda_home_from_nvcc")
    toolkit = tmp_path / "cuda-99.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    nvcc = wrappers / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(wrappers))
    assert cuda_home_from_nvcc() == os.path.realpath(toolkit)
    (toolkit / "include" / "cuda_runtime.h").unlink()  # not a toolkit: no answer
    assert cuda_home_from_nvcc() is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvcc
    assert cuda_home_from_nvcc() is None


def test_a_failed_build_ends_with_the_compilers_first_error():
    """``python -m pini_kernels.build`` ends with the first error line of hundreds of lines of
    build output, not "see the output above"; warnings and "-Werror" on a command line are not
    errors."""
    from pini_kernels.build import first_error

    output = [
        "[1/4] c++ -MMD -Wno-error=deprecated -c csrc/cpu/kernels.cpp -o kernels.o\n",
        "csrc/cpu/kernels.cpp:12:3: warning: unused variable 'x' [-Wunused-variable]\n",
        "FAILED: kernels_cuda.o\n",
        'csrc/cuda/kernels.cu(41): error: identifier "half2" is undefined\n',
        'csrc/cuda/kernels.cu(57): error: expected a ";"\n',
        "RuntimeError: Error compiling objects for extension\n",
    ]
    assert first_error(output) == 'csrc/cuda/kernels.cu(41): error: identifier "half2" is undefined'
    assert first_error(["nvcc fatal   : Unsupported gpu architecture 'compute_120'\n"]) == (
        "nvcc fatal   : Unsupported gpu architecture 'compute_120'"
    )
    assert first_error(["ld: kernels.o: undefined reference to `foo'\n"]).endswith("`foo'")
    assert first_error(output[:2]) is None


def test_a_failed_cuda_compile_keeps_the_cpu_kernels(monkeypatch, capsys, tmp_path):
    """When the CUDA kernels fail to compile, the build retries without them and says which
    error cost them, instead of leaving no native backend at all."""
    from pini_kernels import build

    calls = []

    def fake_build(root, *, cpu_only=False):
        calls.append(cpu_only)
        return (0, None) if cpu_only else (1, "csrc/cuda/kernels.cu(41): error: bad")

    monkeypatch.setattr(build, "build_in_place", fake_build)
    monkeypatch.setattr(build, "source_checkout", lambda: tmp_path)
    monkeypatch.setattr(build, "built_backends", lambda root: ["cpu"])
    assert build.main([]) == 1 and calls == [False, True]
    out = capsys.readouterr().out
    assert "built pini_kernels._C with kernels for: cpu; NOT the CUDA kernels" in out
    assert out.strip().endswith("csrc/cuda/kernels.cu(41): error: bad")
    calls.clear()  # a CPU error: no retry, and the first error is the last line
    monkeypatch.setattr(
        build, "build_in_place", lambda root, cpu_only=False: (1, "a.cpp:1: error: x")
    )
    assert build.main([]) == 1
    assert capsys.readouterr().out.strip().endswith("the first error: a.cpp:1: error: x")


class _FakeExtension:
    def __init__(self, name: str):
        self.name = name


class _FakeBuild:
    """A build command whose compile fails for every extension named in ``failing``. Like
    setuptools' build_ext: its options' finalizing sets ``_needs_stub`` on each extension and
    fills ``ext_map``, which a run needs; a run replaces ``compiler`` (the name given, or None)
    with the compiler object it makes, and fails when given such an object; it clears
    ``inplace`` while building and copies the built extensions into the source tree after, when
    it was set (an editable install)."""

    failing: tuple = ()

    def __init__(self, extensions):
        self.extensions = list(extensions)
        for extension in self.extensions:
            extension._needs_stub = False
        self.ext_map = {"pini_kernels._C": self.extensions[0]}
        self.built, self.copied = [], []
        self.compiler = None
        self.inplace = True

    def run(self):
        if self.compiler is not None:
            raise TypeError("don't know how to compile C/C++ code with <Compiler object>")
        self.compiler = object()
        inplace, self.inplace = self.inplace, False
        for extension in self.extensions:
            extension._needs_stub  # noqa: B018 (AttributeError when not finalized)
            assert self.ext_map["pini_kernels._C"] is extension
        names = [extension.name for extension in self.extensions]
        if any(name in self.failing for name in names):
            raise RuntimeError("Error compiling objects for extension")
        self.built.append(names)
        self.inplace = inplace
        if inplace:
            self.copied.append(names)


@pytest.mark.parametrize(
    "failing, cpu_required, cuda_required, expected",
    [
        ((), False, False, [["cpu+cuda"]]),
        (("cpu+cuda",), False, False, [["cpu"]]),  # the CUDA kernels cost, the CPU ones kept
        (("cpu+cuda",), True, False, [["cpu"]]),  # PINI_BUILD_CPU=1 asks for the CPU ones only
        (("cpu+cuda", "cpu"), False, False, []),  # nothing compiles: the pure-Python package
        (("cpu+cuda",), False, True, RuntimeError),  # PINI_BUILD_CUDA=1: the build fails
        (("cpu+cuda", "cpu"), True, False, RuntimeError),  # PINI_BUILD_CPU=1: the build fails
    ],
)
def test_pip_installs_keep_the_cpu_kernels_when_the_cuda_ones_fail_to_compile(
    failing, cpu_required, cuda_required, expected
):
    """setup.py's build command: a failed CUDA compile of an install that did not require it
    builds the CPU kernels alone (with a warning), rather than leaving no native backend."""
    import warnings

    takes_place_of = _setup_function("_takes_place_of")
    wrap = _setup_function(
        "warn_when_compiling_fails", warnings=warnings, _takes_place_of=takes_place_of
    )
    base = type("Failing", (_FakeBuild,), {"failing": failing})
    command = wrap(base, cpu_required, cuda_required, _FakeExtension("cpu"))(
        [_FakeExtension("cpu+cuda")]
    )
    if expected is RuntimeError:
        with pytest.raises(RuntimeError):
            command.run()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        command.run()
    assert command.built == expected
    assert command.copied == expected  # into the source tree: an editable install imports it
    assert [extension.name for extension in command.extensions] == (
        expected[-1] if expected else []
    )
    said = " ".join(str(warning.message) for warning in caught)
    if failing:
        assert "CUDA kernels failed" in said and "'cuda' backend is missing" in said
    if expected == []:
        assert "only the 'triton' and 'reference' backends" in said
