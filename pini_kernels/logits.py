"""The ``noisy_cosine_logits`` op: ``logit_scale * <z/|z|, t/|t|>`` per noise sample.

This module owns the op's contract; a backend only runs its kernels
(``kernel_tables.LogitsKernels``: ``triton/logits_loss.py``, ``native.py``), on the per-sample
flow of ``per_sample.py``. In order:

- the op's forward and backward (``logits_forward`` / ``logits_backward``): forward writes each
  sample's ``logit_scale * cosines`` into the ``(m, B, C)`` output; backward recomputes the
  sample's unit rows (and, only for logit_scale's gradient, its cosines) from the seed;
- what is saved for backward (docs/spec.md §6): the inputs and the seed, never ``eps``;
- two entry points (``run_logits`` picks one): under torch.compile the custom ops
  ``pini_kernels::noisy_cosine_logits`` and ``::noisy_cosine_logits_backward`` (opaque to the
  compiler, with fakes for shapes, so no graph break) with the custom op's autograd; in eager
  mode ``LogitsFunction`` (an ``autograd.Function`` calling the same two functions), or the
  forward alone when no gradient is wanted: the custom-op dispatch costs tens of microseconds per
  call, more than the kernels take on small tensors.

``reference.noisy_cosine_logits`` (pure PyTorch) is the definition the backends are tested
against.
"""

from __future__ import annotations

import torch

from . import _checks, kernel_tables, per_sample
from ._host import new_buffer, on_device, once_differentiable
from .per_sample import DIFFERENTIABLE_INPUTS, INPUTS_SCHEMA, split_inputs
from .seeds import kernel_seed

# The custom ops' schemas, written out once (the functions below take these arguments
# positionally): the seven inputs, then the op's 0-d int64 seed tensor and its settings.
_SETTINGS_SCHEMA = "Tensor seed, SymInt num_samples, bool multiply, str backend"
_FORWARD_SCHEMA = f"({INPUTS_SCHEMA}, {_SETTINGS_SCHEMA}) -> Tensor"
_BACKWARD_SCHEMA = (
    f"(Tensor grad_logits, {INPUTS_SCHEMA}, {_SETTINGS_SCHEMA}, bool[] needs) -> Tensor[]"
)
_INPUTS = 11  # the custom op's argument count, for autograd's None per input


def logits_forward(*arguments) -> torch.Tensor:
    """(num_samples, B, C) logits of noisy, normalized features, for ``_FORWARD_SCHEMA``'s
    arguments: image: (B, D) or (num_samples, B, D); text: (C, D) or (num_samples, C, D) (the
    3-d ones: a set of rows per sample); logit_scale is 0-d; the noise parameters None or
    broadcastable to their side's rows."""
    inputs, (seed, num_samples, multiply, backend) = split_inputs(arguments)
    image, text, logit_scale, *noise_parameters = inputs
    kernels = kernel_tables.loss_kernels(backend)
    seed_arg = kernel_seed(seed, image.device)
    dtype = _checks.result_dtype(image, text, *noise_parameters)
    with on_device(image.device):
        image_side, text_side = sides = per_sample.make_sides(kernels, inputs, seed_arg, multiply)
        out = new_buffer((num_samples, image.shape[-2], text.shape[-2]), dtype, image.device)
        scale = logit_scale.to(device=image.device, dtype=torch.float32)
        for sample in range(num_samples):
            per_sample.normalize_sample(kernels, sides, sample)
            out[sample] = kernels.cosines(image_side.unit, text_side.unit).mul_(scale)
    return out


def logits_backward(grad_logits: torch.Tensor, *arguments) -> list[torch.Tensor]:
    """The gradients of the seven DIFFERENTIABLE_INPUTS for (num_samples, B, C) ``grad_logits``
    (an empty tensor for each one ``needs`` does not ask for); ``_BACKWARD_SCHEMA``'s arguments."""
    inputs, (seed, num_samples, multiply, backend, needs) = split_inputs(arguments)
    image, logit_scale = inputs[0], inputs[2]
    scale = logit_scale.to(device=image.device, dtype=torch.float32)
    scale_grad = torch.zeros((), dtype=torch.float32, device=image.device) if needs[2] else None

    def cosine_grad(sample, cosine):
        grad = grad_logits[sample].to(torch.float32)
        if scale_grad is not None:  # the only use of the cosines: d logits / d scale
            scale_grad.add_((grad * cosine).sum())
            return grad * scale
        return torch.mul(grad, scale, out=cosine)

    with on_device(image.device):
        grads = per_sample.backward(
            kernel_tables.loss_kernels(backend),
            cosine_grad,
            inputs,
            kernel_seed(seed, image.device),
            num_samples,
            multiply,
            needs,
            needs_cosines=scale_grad is not None,
        )
    grads[2] = None if scale_grad is None else scale_grad.to(logit_scale.dtype)
    return per_sample.gradients_or_empty(grads, image)


# --- autograd: what is saved, and the gradients from it --------------------------------------


def _save_for_backward(ctx, differentiable, seed, num_samples, multiply, backend, needs) -> None:
    ctx.save_for_backward(*differentiable, seed)  # the seed, never eps: backward draws it again
    ctx.num_samples, ctx.multiply, ctx.backend, ctx.needs = num_samples, multiply, backend, needs


def _gradients(ctx, grad_logits, backward) -> tuple:
    """The inputs' gradients from the saved tensors, with ``backward`` (the custom op or the plain
    function, the same arguments)."""
    grads = backward(
        grad_logits, *ctx.saved_tensors, ctx.num_samples, ctx.multiply, ctx.backend, ctx.needs
    )
    return per_sample.input_grads(ctx.needs, grads, _INPUTS)


# --- the custom ops (torch.compile's entry point) --------------------------------------------

noisy_cosine_logits, noisy_cosine_logits_backward = per_sample.custom_ops(
    "noisy_cosine_logits", logits_forward, logits_backward, _FORWARD_SCHEMA, _BACKWARD_SCHEMA
)


@noisy_cosine_logits.register_fake
def _noisy_cosine_logits_fake(*arguments):
    (image, text, _, *noise_parameters), (_, num_samples, *_) = split_inputs(arguments)
    dtype = _checks.result_dtype(image, text, *noise_parameters)
    return image.new_empty((num_samples, image.shape[-2], text.shape[-2]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    differentiable, settings = split_inputs(inputs)
    needs = [bool(flag) for flag in ctx.needs_input_grad[: len(DIFFERENTIABLE_INPUTS)]]
    _save_for_backward(ctx, differentiable, *settings, needs)


noisy_cosine_logits.register_autograd(
    lambda ctx, grad: _gradients(ctx, grad, noisy_cosine_logits_backward),
    setup_context=_setup_context,
)


# --- the eager entry point -------------------------------------------------------------------


class LogitsFunction(torch.autograd.Function):
    """The op in eager mode: the custom op's forward, saved tensors and backward, without the
    custom-op dispatch."""

    @staticmethod
    def forward(ctx, *arguments):
        differentiable, settings = split_inputs(arguments)
        needs = list(ctx.needs_input_grad[: len(DIFFERENTIABLE_INPUTS)])
        _save_for_backward(ctx, differentiable, *settings, needs)
        return logits_forward(*arguments)

    @staticmethod
    @once_differentiable("noisy_cosine_logits")
    def backward(ctx, grad_logits):
        return _gradients(ctx, grad_logits, logits_backward)


def run_logits(*arguments) -> torch.Tensor:
    """The op on checked arguments (``_FORWARD_SCHEMA``'s), with autograd: the custom op under
    torch.compile, else the eager entry point, or the forward alone without gradients."""
    if torch.compiler.is_compiling():
        return noisy_cosine_logits(*arguments)
    if any(per_sample.needs_grad(arguments[: len(DIFFERENTIABLE_INPUTS)])):
        return LogitsFunction.apply(*arguments)
    return logits_forward(*arguments)
