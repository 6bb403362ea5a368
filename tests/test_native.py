"""The native extension: built by the README's install, with CUDA kernels where nvcc exists."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_close

import pini_kernels

NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
)
# The ops take the seed as a 0-d int64 tensor (read inside the CUDA kernels: graph-safe).
SEED = torch.tensor(1)
OPS = (
    "noise",
    "inject_forward",
    "inject_backward",
    "noisy_normalize",
    "noisy_normalize_backward",
    "cross_entropy_stats",
    "cross_entropy_grad",
)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: nothing to build")
def test_cpu_backend_is_built():
    assert "cpu" in pini_kernels.available_backends(), pini_kernels.backends._probe_native("cpu")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pini_native::{op}", "CPU"), op


@pytest.mark.skipif(NVCC is None or torch.version.cuda is None, reason="needs nvcc and CUDA torch")
@pytest.mark.skipif(
    os.environ.get("PINI_BUILD_CUDA") == "0", reason="built with PINI_BUILD_CUDA=0 (CPU kernels)"
)
def test_cuda_kernels_are_built_and_registered():
    """CI compiles and links the CUDA sources even without a GPU to run them on."""
    from pini_kernels import _C  # noqa: F401

    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pini_native::{op}", "CUDA"), op
    if not torch.cuda.is_available():
        assert "cuda" not in pini_kernels.available_backends()
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available: no CUDA GPU"):
            pini_kernels.fused_inject(torch.zeros(2), 0.0, 1.0, backend="cuda")


def test_native_op_checks_name_the_argument():
    """The compiled ops reject bad buffers with a message, not a crash."""
    if "cpu" not in pini_kernels.available_backends():
        pytest.skip("native CPU kernels not built")
    out = torch.empty(8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="out must be float32"):
        torch.ops.pini_native.noise(SEED, 0, out)
    with pytest.raises(RuntimeError, match="start must be >= 0"):
        torch.ops.pini_native.noise(SEED, -4, torch.empty(8))
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor, got Int"):
        torch.ops.pini_native.noise(torch.tensor(1, dtype=torch.int32), 0, torch.empty(8))


def test_native_op_checks_say_what_came():
    """One set of checks for both devices (csrc/checks.h): the message names the argument, what
    was expected and what came, and a grad_out too small for the samples is caught, not read past
    its end."""
    if "cpu" not in pini_kernels.available_backends():
        pytest.skip("native CPU kernels not built")
    ops = torch.ops.pini_native
    x, mu, sigma = torch.randn(4, 8), torch.randn(8), torch.rand(8)
    with pytest.raises(RuntimeError, match="sigma must have 8 elements, got 7"):
        ops.inject_forward(x, mu, sigma[:7], SEED, 1, False, 4, 8, 1, torch.empty(4, 8))
    with pytest.raises(
        RuntimeError, match=r"grad_out must have num_samples \* x.numel\(\) = 64 elements, got 32"
    ):
        ops.inject_backward(x, x, mu, sigma, SEED, 2, False, 4, 8, 1, 64, None, None, None)
    with pytest.raises(RuntimeError, match="mu and sigma must be given together"):
        ops.noisy_normalize(
            x, mu.expand(4, 8), None, SEED, 0, False, torch.empty(32), torch.empty(4)
        )
    with pytest.raises(RuntimeError, match=r"features must be 2-D \(rows, D\) with unit stride"):
        ops.noisy_normalize(x.t(), None, None, SEED, 0, False, torch.empty(32), torch.empty(8))
    cosine, target, scale = torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.ones(())
    with pytest.raises(RuntimeError, match="target_logit must have 4 elements, got 3"):
        ops.cross_entropy_stats(cosine, target, scale, *(torch.empty(rows) for rows in (4, 3, 4)))


# --- the seed as an int or a 0-d int64 tensor (docs/spec.md §4: CUDA graphs) -------------------

NATIVE_DEVICES = [
    device
    for device, backend in (("cpu", "cpu"), ("cuda", "cuda"))
    if backend in pini_kernels.available_backends()
]
# An int seed and the 0-d int64 tensor with the same 64 bits (text seeds reach 2^63: seed + 1).
SEED_PAIRS = [(5, torch.tensor(5)), (2**63 + 5, torch.tensor(-(2**63) + 5))]


def _glue_calls(seed, device):
    """Every native glue function's outputs for ``seed`` (an int or a tensor), fixed inputs."""
    from pini_kernels import native

    generator = torch.Generator().manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    outputs = {"noise": native.noise_forward(4099, seed, torch.device(device), torch.float32, 3)}
    x, mu, sigma = random(5, 37), random(37), random(37).abs() + 0.1
    out = torch.full((2, 5, 37), float("nan"), device=device)
    native.inject_forward(x, mu, sigma, seed, 2, True, 5, 37, 1, out)
    outputs["inject"] = out
    grad_x = torch.full((5, 37), float("nan"), device=device)
    partial = native.inject_backward(
        random(2, 5, 37), x, mu, sigma, seed, 2, True, 5, 37, 1, grad_x, True
    )
    outputs.update(inject_grad_x=grad_x, partial_mu=partial[0], partial_sigma=partial[1])
    features, feature_mu, feature_sigma = random(6, 40), random(40), random(40).abs()
    expanded = (feature_mu.expand(6, 40), feature_sigma.expand(6, 40))
    unit, norm = torch.empty(6, 40, device=device), torch.empty(6, device=device)
    native.normalize(features, *expanded, seed, 240, False, unit, norm)
    grads = [torch.zeros(6, 40, device=device) for _ in range(3)]
    native.normalize_backward(
        features, *expanded, seed, 240, False, unit, norm, random(6, 40), *grads
    )
    outputs.update(unit=unit, norm=norm, grad_features=grads[0], grad_mu=grads[1])
    outputs["grad_sigma"] = grads[2]
    return outputs, (x, mu, sigma, features, feature_mu, feature_sigma)


@pytest.mark.parametrize("device", NATIVE_DEVICES)
@pytest.mark.parametrize(("seed_int", "seed_tensor"), SEED_PAIRS)
def test_glue_takes_int_and_tensor_seeds_alike(device, seed_int, seed_tensor):
    """Each glue function gives bit-identical results for an int seed, the same seed as a 0-d
    int64 tensor on the data's device, and (on a GPU) as a CPU tensor; and the results are those
    of the seed's stream (checked against the reference stream, so a seed ignored or read wrong
    fails)."""
    from pini_kernels import reference

    by_int, inputs = _glue_calls(seed_int, device)
    tensor_seeds = [seed_tensor.to(device)] + ([seed_tensor] if device != "cpu" else [])
    for tensor_seed in tensor_seeds:
        by_tensor, _ = _glue_calls(tensor_seed, device)
        for name, value in by_int.items():
            torch.testing.assert_close(by_tensor[name], value, atol=0, rtol=0, msg=name)
    x, mu, sigma, features, feature_mu, feature_sigma = inputs
    stream = reference.normal_stream(seed_int, 0, 4099 + 3, device=device)
    assert_close(by_int["noise"], stream[3:], atol=1e-5, rtol=1e-5, name="noise")
    eps = reference.normal_stream(seed_int, 0, 2 * 5 * 37, device=device).view(2, 5, 37)
    want = x * (mu + sigma * eps)
    assert_close(by_int["inject"], want, atol=1e-5, rtol=1e-5, name="inject")
    eps = reference.normal_stream(seed_int, 240, 6 * 40, device=device).view(6, 40)
    noisy = features + feature_mu + feature_sigma * eps
    want_unit = torch.nn.functional.normalize(noisy, dim=1)
    assert_close(by_int["unit"], want_unit, atol=1e-5, rtol=1e-5, name="unit")


def test_glue_rejects_a_seed_tensor_it_cannot_read():
    from pini_kernels import native

    with pytest.raises(TypeError, match="seed must be an int or a one-element int64 tensor"):
        native.noise_forward(8, torch.tensor(1.0), torch.device("cpu"), torch.float32)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="seed must be a CPU tensor or on the data's device"):
            native.noise_forward(
                8, torch.tensor(1, device="cuda"), torch.device("cpu"), torch.float32
            )


needs_cuda_backend = pytest.mark.skipif(
    "cuda" not in pini_kernels.available_backends(), reason="needs a CUDA GPU and the CUDA kernels"
)


@needs_cuda_backend
def test_cuda_graph_replays_with_the_seed_written_before_each_replay():
    """The CUDA kernels read the seed tensor on the device: a graph captured once draws the noise
    of whatever value the tensor holds at each replay, forward and backward."""
    from pini_kernels import native, reference

    device = torch.device("cuda")
    rows, width, samples = 33, 68, 2
    x = torch.randn(rows, width, device=device)
    mu, sigma = torch.randn(width, device=device), torch.rand(width, device=device) + 0.1
    grad_out = torch.randn(samples, rows, width, device=device)
    seed = torch.full((), 3, dtype=torch.int64, device=device)
    out = torch.empty(samples, rows, width, device=device)
    grad_x = torch.empty(rows, width, device=device)
    unit, norm = torch.empty(rows, width, device=device), torch.empty(rows, device=device)

    def step():
        native.inject_forward(x, mu, sigma, seed, samples, False, rows, width, 1, out)
        partial = native.inject_backward(
            grad_out, x, mu, sigma, seed, samples, False, rows, width, 1, grad_x, True
        )
        native.normalize(
            x, mu.expand(rows, width), sigma.expand(rows, width), seed, 0, False, unit, norm
        )
        return partial

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, partial_sigma = step()
    for value in (3, 11, 2**62 + 7):
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        eps = reference.normal_stream(value, 0, samples * rows * width, device=device)
        eps = eps.view(samples, rows, width)
        assert_close(out, x + mu + sigma * eps, atol=1e-5, rtol=1e-5, name=f"out {value}")
        want_sigma = (grad_out * eps).sum((0, 1))
        assert_close(partial_sigma.sum(0), want_sigma, atol=1e-3, rtol=1e-4, name="grad_sigma")
        want_unit = torch.nn.functional.normalize(x + mu + sigma * eps[0], dim=1)
        assert_close(unit, want_unit, atol=1e-5, rtol=1e-5, name=f"unit {value}")


@needs_cuda_backend
@pytest.mark.parametrize("seed", [7, torch.tensor(7), "device"])
def test_cuda_glue_never_syncs(seed):
    """No glue function syncs the GPU, whatever form the seed takes."""
    from pini_kernels import native

    device = torch.device("cuda")
    seed = torch.tensor(7, device=device) if isinstance(seed, str) else seed
    x, mu = torch.randn(9, 12, device=device), torch.randn(12, device=device)
    sigma = torch.rand(12, device=device)
    out, grad_x = torch.empty(9, 12, device=device), torch.empty(9, 12, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        native.noise_forward(100, seed, device, torch.float32)
        native.inject_forward(x, mu, sigma, seed, 1, True, 9, 12, 1, out)
        native.inject_backward(out, x, mu, sigma, seed, 1, True, 9, 12, 1, grad_x, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- register pressure of the CUDA kernels -----------------------------------------------------

KERNELS_CU = Path(__file__).parents[1] / "csrc" / "cuda" / "kernels.cu"
# STYLE.md's budget for memory-bound kernels, which need many warps in flight to saturate HBM: at
# most 96 registers per thread keeps 2 or more blocks of 256 threads resident per SM (65536
# registers), however the compiler's choices drift.
MAX_REGISTERS = 96


def demangled_kernel_name(mangled: str) -> str:
    """``inject_forward_kernel<true>`` for the mangled name of that kernel (c++filt, where
    installed; else the mangled name)."""
    demangler = shutil.which("c++filt") or shutil.which("cu++filt")
    if demangler is None:
        return mangled
    name = subprocess.run([demangler, mangled], capture_output=True, text=True).stdout.strip()
    match = re.search(r"(\w+_kernel(?:<\w+>)?)\(", name)
    return match.group(1) if match else name


def ptxas_resources(cuda_file: Path, arch: str) -> dict[str, dict[str, int]]:
    """``nvcc -Xptxas -v`` of one .cu file: per kernel, its registers and spill bytes."""
    result = subprocess.run(
        [
            NVCC,
            "-std=c++20",
            "-O3",
            f"-arch={arch}",
            "-Xptxas",
            "-v",
            "-c",
            str(cuda_file),
            "-o",
            os.devnull,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    resources: dict[str, dict[str, int]] = {}
    kernel = None
    for line in result.stderr.splitlines():
        if match := re.search(r"Compiling entry function '(\w+)'", line):
            kernel = demangled_kernel_name(match.group(1))
            resources[kernel] = {}
        elif kernel and (match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill", line)):
            resources[kernel]["spill_stores"] = int(match.group(1))
            resources[kernel]["spill_loads"] = int(match.group(2))
        elif kernel and (match := re.search(r"Used (\d+) registers", line)):
            resources[kernel]["registers"] = int(match.group(1))
    return resources


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (a CUDA toolkit) to compile kernels.cu")
def test_cuda_kernels_compile_for_sm90_without_spills():
    """kernels.cu alone (small includes: seconds) for sm_90: print every kernel's registers and
    spills; no kernel spills and none needs more than MAX_REGISTERS registers."""
    resources = ptxas_resources(KERNELS_CU, "sm_90")
    table = "\n".join(
        f"{name:<40} {usage.get('registers', 0):>4} registers, spill stores "
        f"{usage.get('spill_stores', 0)} B, loads {usage.get('spill_loads', 0)} B"
        for name, usage in sorted(resources.items())
    )
    print(f"\nnvcc -Xptxas -v, sm_90:\n{table}")
    assert len(resources) >= 7, table
    for name, usage in resources.items():
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"{name} spills\n{table}"
        assert usage["registers"] <= MAX_REGISTERS, f"{name} uses too many registers\n{table}"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_native_checks_compare_devices_with_their_index(tmp_path):
    """csrc/checks.h compares whole devices: mu on cuda:1 beside x on cuda:0 is refused (a
    pointer of one GPU would be read on another), through a direct torch.ops.pini_native call
    too. Without a GPU, tests/native/device_checks_probe.cpp hands the checks tensors whose
    storage claims cuda:0 or cuda:1 and prints what each check said."""
    probe = tmp_path / "device_checks_probe"
    library_dir, include_dir = (Path(torch.__file__).parent / name for name in ("lib", "include"))
    command = [
        shutil.which("c++"),
        "-std=c++20",
        "-O0",
        "-w",
        f"-I{Path(__file__).parents[1] / 'csrc'}",
        f"-I{include_dir}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        str(Path(__file__).parent / "native" / "device_checks_probe.cpp"),
        "-o",
        str(probe),
        f"-L{library_dir}",
        f"-Wl,-rpath,{library_dir}",
        "-lc10",
        "-ltorch_cpu",
    ]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([str(probe)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    said = dict(line.split(": ", 1) for line in ran.stdout.splitlines())
    assert len(said) == 13, ran.stdout
    for case, message in said.items():
        if case.endswith(" same"):
            assert message == "passed", f"{case}: {message}"
            continue
        name = case.split(" ")[-1]
        assert message != "passed", f"{case}: a tensor on cuda:1 beside data on cuda:0 passed"
        if name == "seed":
            assert "seed must be on the data's device cuda:0, got one on cuda:1" in message
        else:
            assert f"{name} must be on the op's device cuda:0, got one on cuda:1" in message, case
