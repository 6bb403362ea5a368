"""The "cpu" and "cuda" backends: the compiled kernels of csrc/ (the ``pini_native`` op library).

Same function names as the Triton backend (``pini_kernels/ops/*.py``); the custom ops of
``_library.py`` dispatch here by backend name. The compiled ops write into buffers allocated
here, so the tests' NaN poisoning covers them too.
"""

from __future__ import annotations

import functools

import torch

from . import _cosine_host as host
from ._checks import result_dtype
from ._layout import broadcast_layout, like_input, reduce_partial_sums
from .ops.launch import new_buffer

# Rows per chunk of the backward's parameter partial sums: each chunk adds one row of `width`
# floats to reduce. CPU: a task is a 2048-column tile (csrc/cpu/kernels.cpp) times these rows;
# CUDA: a thread owns 4 columns of a chunk, so smaller chunks give more threads.
ROWS_PER_CHUNK = {"cpu": 64, "cuda": 8}
# The CPU row kernels keep a row's noise in a heap buffer: any width works.
MAX_FEATURE_DIM = 1 << 20


def _ops():
    from . import _C  # noqa: F401  (registers torch.ops.pini_native)

    return torch.ops.pini_native


def _seed_arg(seed: int) -> int:
    """The seed as the int64 the op schema takes (a uint64 key: text seeds may reach 2^63)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def noise_forward(
    numel: int, seed: int, device: torch.device, dtype: torch.dtype, start: int = 0
) -> torch.Tensor:
    out = new_buffer(numel, torch.float32, device)
    if numel:
        _ops().noise(_seed_arg(seed), start, out)
    return out if dtype == torch.float32 else out.to(dtype)


def _flat_params(x, mu, sigma):
    param_shape = torch.broadcast_shapes(mu.shape, sigma.shape)
    layout = broadcast_layout(x.shape, param_shape)
    if layout.expand:
        param_shape = x.shape
    flat = [p.to(torch.float32).expand(param_shape).contiguous().view(-1) for p in (mu, sigma)]
    return layout, param_shape, flat[0], flat[1]


def inject_forward(x, mu, sigma, seed: int, num_samples: int, multiply: bool) -> torch.Tensor:
    out_dtype = result_dtype(x, mu, sigma)
    out = new_buffer((num_samples, *x.shape), out_dtype, x.device)
    if x.numel() == 0:
        return out
    layout, _, mu_flat, sigma_flat = _flat_params(x, mu, sigma)
    _ops().inject_forward(
        x.contiguous(), mu_flat, sigma_flat, _seed_arg(seed), num_samples, multiply,
        layout.rows, layout.width, layout.inner, out,
    )  # fmt: skip
    return out


def inject_backward(
    grad_out, x, mu, sigma, seed: int, num_samples: int, multiply: bool, need_x_grad: bool,
    need_param_grad: bool,
):  # fmt: skip
    layout, param_shape, mu_flat, sigma_flat = _flat_params(x, mu, sigma)
    grad_x = new_buffer(x.shape, x.dtype, x.device) if need_x_grad else None
    if x.numel() == 0:
        mu_grad = torch.zeros(param_shape, dtype=torch.float32, device=x.device)
        sigma_grad = torch.zeros_like(mu_grad)
    else:
        rows_per_chunk = ROWS_PER_CHUNK[x.device.type]
        row_chunks = -(-layout.rows // rows_per_chunk)
        partial_mu = partial_sigma = None
        if need_param_grad:
            partial_mu = new_buffer((row_chunks, layout.width), torch.float32, x.device)
            partial_sigma = new_buffer((row_chunks, layout.width), torch.float32, x.device)
        x_data = x.contiguous() if multiply else x  # add mode never reads x (maybe a stand-in)
        _ops().inject_backward(
            grad_out.contiguous(), x_data, mu_flat, sigma_flat, _seed_arg(seed),
            num_samples, multiply, layout.rows, layout.width, layout.inner, rows_per_chunk,
            grad_x, partial_mu, partial_sigma,
        )  # fmt: skip
        if not need_param_grad:
            return like_input(grad_x, x), None, None
        mu_grad = reduce_partial_sums(partial_mu, layout).view(param_shape)
        sigma_grad = reduce_partial_sums(partial_sigma, layout).view(param_shape)
    if not need_param_grad:
        return like_input(grad_x, x), None, None
    return (
        like_input(grad_x, x),
        like_input(mu_grad.sum_to_size(mu.shape), mu),
        like_input(sigma_grad.sum_to_size(sigma.shape), sigma),
    )


class NativeCosineKernels:
    """The compiled row and loss kernels, for pini_kernels/_cosine_host.py (which hands them one
    sample's (N, D) rows at a time, so (num_samples, C, D) text features need nothing here)."""

    max_feature_dim = MAX_FEATURE_DIM
    new_buffer = staticmethod(new_buffer)

    @staticmethod
    def prepare_params(params: torch.Tensor) -> torch.Tensor:
        return params.to(torch.float32)  # the compiled kernels read float32 parameters

    def normalize(self, side: host.Side, sample: int) -> None:
        rows, dim = side.features.shape
        _ops().noisy_normalize(
            side.features, side.mu, side.sigma, _seed_arg(side.seed), sample * rows * dim,
            side.multiply, side.unit, side.norm,
        )  # fmt: skip

    def normalize_backward(self, side, sample, grad_unit, grads: host.SideGrads) -> None:
        rows, dim = side.features.shape
        _ops().noisy_normalize_backward(
            side.features, side.mu, side.sigma, _seed_arg(side.seed), sample * rows * dim,
            side.multiply, side.unit, side.norm, grad_unit, grads.x, grads.mu, grads.sigma,
        )  # fmt: skip

    def loss_stats(self, image, text, target, scale, lse, target_logit, logit_sum) -> None:
        cosine = torch.mm(image.unit, text.unit.t())
        _ops().cross_entropy_stats(cosine, target, scale, lse, target_logit, logit_sum)

    def loss_grad(self, cosine, lse, target, row_grad, scale, label_smoothing, scale_grad) -> None:
        _ops().cross_entropy_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad)


KERNELS = NativeCosineKernels()
cosine_logits_forward = functools.partial(host.cosine_logits_forward, KERNELS)
cosine_logits_backward = functools.partial(host.cosine_logits_backward, KERNELS)
cross_entropy_forward = functools.partial(host.cross_entropy_forward, KERNELS)
cross_entropy_backward = functools.partial(host.cross_entropy_backward, KERNELS)
