"""Host-side helpers of every op and backend: the buffers kernels fill, gradients in their inputs'
layouts, launching on a tensor's GPU, and the ops' custom-op registration."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

# Tests set PINI_KERNELS_POISON=1 so that every buffer a kernel must fill starts as NaN: an element
# it fails to write then shows up as a mismatch instead of whatever the allocator left there.
POISON_OUTPUTS = os.environ.get("PINI_KERNELS_POISON", "0") == "1"


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for a buffer that a kernel writes completely (NaN-filled under tests)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        buffer.fill_(float("nan"))
    return buffer


def like_input(grad: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor | None:
    """``grad`` (contiguous, ``tensor``'s shape) in ``tensor``'s dtype and memory layout, as
    ``torch.empty_like(tensor)`` lays it out: what the ops' fake implementations promise, so
    torch.compile's stride checks hold for channels-last or transposed inputs too."""
    if grad is None:
        return None
    if grad.dtype != tensor.dtype:  # (each call costs host time, which small tensors feel)
        grad = grad.to(tensor.dtype)
    if tensor.is_contiguous():
        return grad
    return torch.empty_like(tensor).copy_(grad)


_NO_DEVICE_CHANGE = contextlib.nullcontext()  # reusable: entering it does nothing


def on_device(device: torch.device):
    """Launch on ``device``'s GPU (Triton launches on the current device), not on cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else _NO_DEVICE_CHANGE


def once_differentiable(op: str):
    """For an autograd.Function's backward, as torch.autograd.function.once_differentiable but
    stricter: with create_graph=True the gradients always come attached to an error node, not
    only when the incoming gradients require grad. A loss that computes its gradients in forward
    keeps them as constants, so a second differentiation would otherwise silently leave out its
    terms. The C++ autograd nodes do the same (csrc/once_differentiable.h)."""
    message = (
        f"pini_kernels: the backward of {op} is not differentiable (its kernels are opaque to "
        "autograd); a second-order gradient through it is not supported"
    )

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            error = torch._C._functions.DelayedError(message.encode(), len(grads))
            return error(*[None if g is None else g.detach().requires_grad_() for g in grads])

        return wrapper

    return decorate


def custom_op(name: str, function, schema: str):
    """``pini_kernels::<name>``, a functional custom op running ``function``, which takes the
    ``schema``'s arguments positionally (written out, not inferred from annotations)."""
    return torch.library.custom_op(
        f"pini_kernels::{name}", function, mutates_args=(), schema=schema
    )
