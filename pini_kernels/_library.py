"""The fused ops as ``torch.library`` custom ops, with fake implementations and autograd.

Registered as custom ops, the kernels are opaque nodes to ``torch.compile``: a compiled function
that calls them has no graph break, and the fake implementations give it the output shapes. Each
op takes the backend's name and dispatches to that backend's plain forward/backward functions
(``pini_kernels/ops/*.py`` for Triton); the autograd formula saves the inputs and the 0-d seed,
never ``eps``.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from . import _checks

_NAMESPACE = "pini_kernels"

# Backend name -> module with inject_forward / inject_backward (imported on first use, so that a
# machine without Triton can still import pini_kernels).
_BACKEND_MODULES = {
    "triton": "pini_kernels.ops.inject",
    "cpu": "pini_kernels.native",
    "cuda": "pini_kernels.native",
}


def _on_device(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device), not on cuda:0."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _backend_module(backend: str):
    try:
        return importlib.import_module(_BACKEND_MODULES[backend])
    except KeyError:
        raise RuntimeError(
            f"backend {backend!r} has no fused implementation in this build"
        ) from None


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
    with _on_device(x):
        return module.inject_forward(x, mu, sigma, _checks.seed_value(seed), num_samples, multiply)


@inject.register_fake
def _inject_fake(x, mu, sigma, seed, num_samples, multiply, backend):
    return x.new_empty((num_samples, *x.shape), dtype=_checks.result_dtype(x, mu, sigma))


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
    with _on_device(x):
        grads = module.inject_backward(
            grad_out,
            x,
            mu,
            sigma,
            _checks.seed_value(seed),
            num_samples,
            multiply,
            need_x_grad,
            need_param_grad,
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
    if not multiply:
        # Add mode never reads x in backward: keep an 8-byte stand-in with its shape and dtype,
        # so x is neither kept alive nor checked for in-place changes.
        x = x.new_empty(()).expand(x.shape)
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


# --- noisy cosine logits and the PiNI loss ------------------------------------------------------

_COSINE_MODULES = {
    "triton": "pini_kernels.ops.cosine",
    "cpu": "pini_kernels.native",
    "cuda": "pini_kernels.native",
}


def _cosine_module(backend: str):
    try:
        return importlib.import_module(_COSINE_MODULES[backend])
    except KeyError:
        raise RuntimeError(
            f"backend {backend!r} has no fused implementation in this build"
        ) from None


def _gradients_or_empty(grads, like: torch.Tensor) -> list[torch.Tensor]:
    """Custom ops return tensors: an empty one stands for a gradient not asked for."""
    return [like.new_empty(0) if grad is None else grad for grad in grads]


def _fake_gradients(needs, tensors) -> list[torch.Tensor]:
    like = tensors[0]
    return [
        torch.empty_like(tensor) if needed and tensor is not None else like.new_empty(0)
        for needed, tensor in zip(needs, tensors, strict=True)
    ]


@torch.library.custom_op(f"{_NAMESPACE}::noisy_cosine_logits", mutates_args=())
def noisy_cosine_logits(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    image_mu: torch.Tensor | None,
    image_sigma: torch.Tensor | None,
    text_mu: torch.Tensor | None,
    text_sigma: torch.Tensor | None,
    seed: torch.Tensor,
    num_samples: int,
    multiply: bool,
    backend: str,
) -> torch.Tensor:
    """(num_samples, B, C) logits of noisy, normalized features; image: (B, D); text: (C, D) or
    (num_samples, C, D), one set of class rows per sample; logit_scale is 0-d."""
    with _on_device(image):
        return _cosine_module(backend).cosine_logits_forward(
        image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma,
        _checks.seed_value(seed), num_samples, multiply,
    )  # fmt: skip


@noisy_cosine_logits.register_fake
def _noisy_cosine_logits_fake(
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed, num_samples,
    multiply, backend,
):  # fmt: skip
    dtype = _checks.result_dtype(image, text, image_mu, image_sigma, text_mu, text_sigma)
    return image.new_empty((num_samples, image.shape[0], text.shape[-2]), dtype=dtype)


@torch.library.custom_op(f"{_NAMESPACE}::noisy_cosine_logits_backward", mutates_args=())
def noisy_cosine_logits_backward(
    grad_logits: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    image_mu: torch.Tensor | None,
    image_sigma: torch.Tensor | None,
    text_mu: torch.Tensor | None,
    text_sigma: torch.Tensor | None,
    seed: torch.Tensor,
    num_samples: int,
    multiply: bool,
    backend: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    with _on_device(image):
        grads = _cosine_module(backend).cosine_logits_backward(
        grad_logits, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma,
        _checks.seed_value(seed), num_samples, multiply, needs,
    )  # fmt: skip
    return _gradients_or_empty(grads, image)


@noisy_cosine_logits_backward.register_fake
def _noisy_cosine_logits_backward_fake(
    grad_logits, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed,
    num_samples, multiply, backend, needs,
):  # fmt: skip
    return _fake_gradients(needs, (image, text, logit_scale, image_mu, image_sigma, text_mu,
                                   text_sigma))  # fmt: skip


def _needs(ctx) -> list[bool]:
    """Which of (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma) need grad."""
    flags = ctx.needs_input_grad
    return [bool(flags[i]) for i in ctx.differentiable_inputs]


def _as_input_grads(ctx, grads, total_inputs: int):
    out = [None] * total_inputs
    for index, needed, grad in zip(ctx.differentiable_inputs, _needs(ctx), grads, strict=True):
        out[index] = grad if needed else None
    return tuple(out)


def _logits_setup_context(ctx, inputs, output):
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed = inputs[:8]
    ctx.save_for_backward(
        image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed
    )
    ctx.num_samples, ctx.multiply, ctx.backend = inputs[8:11]
    ctx.differentiable_inputs = (0, 1, 2, 3, 4, 5, 6)


def _logits_autograd(ctx, grad_logits):
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed = ctx.saved_tensors
    grads = noisy_cosine_logits_backward(
        grad_logits, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed,
        ctx.num_samples, ctx.multiply, ctx.backend, _needs(ctx),
    )  # fmt: skip
    return _as_input_grads(ctx, grads, 11)


noisy_cosine_logits.register_autograd(_logits_autograd, setup_context=_logits_setup_context)


@torch.library.custom_op(f"{_NAMESPACE}::noisy_cross_entropy", mutates_args=())
def noisy_cross_entropy(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    target: torch.Tensor,
    image_mu: torch.Tensor | None,
    image_sigma: torch.Tensor | None,
    text_mu: torch.Tensor | None,
    text_sigma: torch.Tensor | None,
    seed: torch.Tensor,
    num_samples: int,
    multiply: bool,
    reduction: str,
    label_smoothing: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse): the float32 loss and the (num_samples, B) log-sum-exp saved for backward."""
    _checks.check_target_values(target, text.shape[-2])
    with _on_device(image):
        return _cosine_module(backend).cross_entropy_forward(
        image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma,
        _checks.seed_value(seed), num_samples, multiply, reduction, label_smoothing,
    )  # fmt: skip


@noisy_cross_entropy.register_fake
def _noisy_cross_entropy_fake(
    image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma, seed,
    num_samples, multiply, reduction, label_smoothing, backend,
):  # fmt: skip
    rows = image.shape[0]
    loss_shape = (num_samples, rows) if reduction == "none" else ()
    lse = image.new_empty((num_samples, rows), dtype=torch.float32)
    return image.new_empty(loss_shape, dtype=torch.float32), lse


@torch.library.custom_op(f"{_NAMESPACE}::noisy_cross_entropy_backward", mutates_args=())
def noisy_cross_entropy_backward(
    grad_loss: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    target: torch.Tensor,
    image_mu: torch.Tensor | None,
    image_sigma: torch.Tensor | None,
    text_mu: torch.Tensor | None,
    text_sigma: torch.Tensor | None,
    lse: torch.Tensor,
    seed: torch.Tensor,
    num_samples: int,
    multiply: bool,
    reduction: str,
    label_smoothing: float,
    backend: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    with _on_device(image):
        grads = _cosine_module(backend).cross_entropy_backward(
        grad_loss, image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma,
        lse, _checks.seed_value(seed), num_samples, multiply, reduction, label_smoothing, needs,
    )  # fmt: skip
    return _gradients_or_empty(grads, image)


@noisy_cross_entropy_backward.register_fake
def _noisy_cross_entropy_backward_fake(
    grad_loss, image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma, lse,
    seed, num_samples, multiply, reduction, label_smoothing, backend, needs,
):  # fmt: skip
    return _fake_gradients(needs, (image, text, logit_scale, image_mu, image_sigma, text_mu,
                                   text_sigma))  # fmt: skip


def _loss_setup_context(ctx, inputs, output):
    image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma, seed = inputs[:9]
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(
        image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma, lse, seed
    )
    ctx.num_samples, ctx.multiply, ctx.reduction, ctx.label_smoothing, ctx.backend = inputs[9:14]
    ctx.differentiable_inputs = (0, 1, 2, 4, 5, 6, 7)


def _loss_autograd(ctx, grad_loss, grad_lse):
    (image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma, lse,
     seed) = ctx.saved_tensors  # fmt: skip
    grads = noisy_cross_entropy_backward(
        grad_loss, image, text, logit_scale, target, image_mu, image_sigma, text_mu, text_sigma,
        lse, seed, ctx.num_samples, ctx.multiply, ctx.reduction, ctx.label_smoothing,
        ctx.backend, _needs(ctx),
    )  # fmt: skip
    return _as_input_grads(ctx, grads, 14)


noisy_cross_entropy.register_autograd(_loss_autograd, setup_context=_loss_setup_context)
