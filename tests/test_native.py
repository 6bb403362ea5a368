"""The native extension: built by the README's install, with CUDA kernels where nvcc exists."""

import os
import shutil

import pytest
import torch

import pini_kernels

NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
)
OPS = ("noise", "inject_forward", "inject_backward", "noisy_normalize",
       "noisy_normalize_backward", "cross_entropy_stats", "cross_entropy_grad")  # fmt: skip


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: nothing to build")
def test_cpu_backend_is_built():
    assert "cpu" in pini_kernels.available_backends(), pini_kernels.backends._probe_native("cpu")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pini_native::{op}", "CPU"), op


@pytest.mark.skipif(NVCC is None or torch.version.cuda is None, reason="needs nvcc and CUDA torch")
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
        torch.ops.pini_native.noise(1, 0, out)
    with pytest.raises(RuntimeError, match="start must be >= 0"):
        torch.ops.pini_native.noise(1, -4, torch.empty(8))


def test_native_op_checks_say_what_came():
    """One set of checks for both devices (csrc/checks.h): the message names the argument, what
    was expected and what came, and a grad_out too small for the samples is caught, not read past
    its end."""
    if "cpu" not in pini_kernels.available_backends():
        pytest.skip("native CPU kernels not built")
    ops = torch.ops.pini_native
    x, mu, sigma = torch.randn(4, 8), torch.randn(8), torch.rand(8)
    with pytest.raises(RuntimeError, match="sigma must have 8 elements, got 7"):
        ops.inject_forward(x, mu, sigma[:7], 1, 1, False, 4, 8, 1, torch.empty(4, 8))
    with pytest.raises(
        RuntimeError, match=r"grad_out must have num_samples \* x.numel\(\) = 64 elements, got 32"
    ):
        ops.inject_backward(x, x, mu, sigma, 1, 2, False, 4, 8, 1, 64, None, None, None)
    with pytest.raises(RuntimeError, match="mu and sigma must be given together"):
        ops.noisy_normalize(x, mu.expand(4, 8), None, 1, 0, False, torch.empty(32), torch.empty(4))
    with pytest.raises(RuntimeError, match=r"features must be 2-D \(rows, D\) with unit stride"):
        ops.noisy_normalize(x.t(), None, None, 1, 0, False, torch.empty(32), torch.empty(8))
    cosine, target, scale = torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.ones(())
    with pytest.raises(RuntimeError, match="target_logit must have 4 elements, got 3"):
        ops.cross_entropy_stats(cosine, target, scale, *(torch.empty(rows) for rows in (4, 3, 4)))
