"""The fused ops as ``torch.library`` custom ops, with fake implementations and autograd.

Registered as custom ops, the kernels are opaque nodes to ``torch.compile``: a compiled function
that calls them has no graph break, and the fake implementations give it the output shapes. Each
op takes the backend's name and dispatches to that backend's plain forward/backward functions
(``pini_kernels/ops/*.py`` for Triton); the autograd formula saves the inputs and the 0-d seed,
never ``eps``.
"""

from __future__ import annotations

import importlib

import torch

_NAMESPACE = "pini_kernels"

# Backend name -> module with inject_forward / inject_backward (imported on first use, so that a
# machine without Triton can still import pini_kernels).
_BACKEND_MODULES = {"triton": "pini_kernels.ops.inject"}


def _backend_module(backend: str):
    try:
        return importlib.import_module(_BACKEND_MODULES[backend])
    except KeyError:
        raise RuntimeError(
            f"backend {backend!r} has no fused implementation in this build"
        ) from None


def _promoted_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


@torch.library.custom_op(f"{_NAMESPACE}::inject", mutates_args=())
def inject(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    seed: torch.Tensor,
    num_samples: int,
    multiply: bool,
    backend: str,
) -> torch.Tensor:
    """(num_samples, *x.shape): x (+ or *) (mu + sigma * eps); seed is a 0-d int64 CPU tensor."""
    module = _backend_module(backend)
    return module.inject_forward(x, mu, sigma, int(seed), num_samples, multiply)


@inject.register_fake
def _inject_fake(x, mu, sigma, seed, num_samples, multiply, backend):
    return x.new_empty((num_samples, *x.shape), dtype=_promoted_dtype(x, mu, sigma))


@torch.library.custom_op(f"{_NAMESPACE}::inject_backward", mutates_args=())
def inject_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    seed: torch.Tensor,
    num_samples: int,
    multiply: bool,
    backend: str,
    need_x_grad: bool,
    need_param_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_mu, grad_sigma); an empty tensor stands for a gradient not asked for."""
    module = _backend_module(backend)
    grads = module.inject_backward(
        grad_out, x, mu, sigma, int(seed), num_samples, multiply, need_x_grad, need_param_grad
    )
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


@inject_backward.register_fake
def _inject_backward_fake(
    grad_out, x, mu, sigma, seed, num_samples, multiply, backend, need_x_grad, need_param_grad
):
    def like(tensor, needed):
        return torch.empty_like(tensor) if needed else x.new_empty(0)

    return like(x, need_x_grad), like(mu, need_param_grad), like(sigma, need_param_grad)


def _inject_setup_context(ctx, inputs, output):
    x, mu, sigma, seed, num_samples, multiply, backend = inputs
    ctx.save_for_backward(x, mu, sigma, seed)
    ctx.num_samples, ctx.multiply, ctx.backend = num_samples, multiply, backend


def _inject_autograd(ctx, grad_out):
    x, mu, sigma, seed = ctx.saved_tensors
    need_x_grad = ctx.needs_input_grad[0]
    need_param_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_mu, grad_sigma = inject_backward(
        grad_out, x, mu, sigma, seed, ctx.num_samples, ctx.multiply, ctx.backend,
        need_x_grad, need_param_grad,
    )  # fmt: skip
    return (
        grad_x if need_x_grad else None,
        grad_mu if ctx.needs_input_grad[1] else None,
        grad_sigma if ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
    )


inject.register_autograd(_inject_autograd, setup_context=_inject_setup_context)
