"""The ``noisy_cross_entropy`` op: PiNI's loss (Eq. 13), F.cross_entropy over the noisy cosine
logits of every sample, without materializing the logits or ``eps``.

This module owns the op's contract; a backend only runs its kernels
(``kernel_tables.LossKernels``: ``triton/logits_loss.py``, ``native.py``), on the per-sample flow
of ``per_sample.py``. In order:

- the loss from per-row statistics: the backend's ``loss_stats`` gives each row's log-sum-exp,
  target logit and sum of logits (the Triton kernel never stores the ``(B, C)`` tile; the CPU one
  uses one BLAS product), and ``_row_losses`` turns them into F.cross_entropy's row losses;
- what is saved for backward (docs/spec.md §6, ``gradients_in_forward``): for a "mean" or "sum"
  loss that an input needs a gradient of, forward computes the gradients while each sample's
  cosines are at hand (``loss_stats_grad`` gives the row statistics and d loss / d cosine of one
  tile, then ``per_sample.backward`` runs), keeps those input-sized gradients and nothing else,
  and backward only scales them by the loss's gradient. A "none" loss (a gradient per row, known
  only in backward) keeps its ``(m, B)`` log-sum-exp, and backward recomputes with ``loss_grad``.
  Never ``eps``, never the logits;
- the native backends run the per-sample flow as one C++ op (``kernel_tables.LossFlowKernels``,
  the same kernels call for call); Triton runs it here;
- two entry points (``run_cross_entropy`` picks one): under torch.compile the custom ops
  ``pini_kernels::noisy_cross_entropy`` and ``::noisy_cross_entropy_backward`` (opaque to the
  compiler, with fakes for shapes) with the custom op's autograd; in eager mode the native
  backends' C++ autograd node, or ``LossFunction`` (an ``autograd.Function`` calling the same
  functions), or the forward alone when no gradient is wanted.

``reference.noisy_cross_entropy`` (pure PyTorch) is the definition the backends are tested
against.
"""

from __future__ import annotations

import torch

from . import _checks, kernel_tables, per_sample
from ._host import new_buffer, on_device, once_differentiable
from .kernel_tables import FlowSettings, LossSettings, OpInputs
from .per_sample import DIFFERENTIABLE_INPUTS, INPUTS_SCHEMA, split_inputs
from .seeds import kernel_seed

# The custom ops' schemas, written out once (the functions below take these arguments
# positionally): the seven inputs, the target (and backward's lse), the op's 0-d int64 seed
# tensor, the settings. Forward returns the loss, the lse and the seven gradients.
_SETTINGS_SCHEMA = (
    "Tensor seed, SymInt num_samples, bool multiply, str reduction, float label_smoothing, "
    "str backend, bool[] needs"
)
_FORWARD_SCHEMA = (
    f"({INPUTS_SCHEMA}, Tensor target, {_SETTINGS_SCHEMA}) -> ({', '.join(['Tensor'] * 9)})"
)
_BACKWARD_SCHEMA = (
    f"(Tensor grad_loss, {INPUTS_SCHEMA}, Tensor target, Tensor lse, {_SETTINGS_SCHEMA})"
    " -> Tensor[]"
)
_INPUTS = 15  # the custom op's argument count, for autograd's None per input


def gradients_in_forward(reduction: str, needs) -> bool:
    """Whether the loss computes its inputs' gradients in forward: for a "mean" or "sum" loss
    backward only scales them by the loss's gradient (a number), so forward computes them while
    each sample's (B, C) cosines are at hand, and backward recomputes nothing. A "none" loss
    gets a gradient per row only in backward: it keeps the log-sum-exp and recomputes."""
    return reduction != "none" and any(needs)


def _row_losses(lse, target_logit, logit_sum, classes, label_smoothing):
    """F.cross_entropy per row from its statistics: (1-e)(lse - x_t) + e(lse - mean(x))."""
    nll = lse - target_logit
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll + label_smoothing * (lse - logit_sum / classes)


def _reduce(row_losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_losses
    if reduction == "sum":
        return row_losses.sum()
    return row_losses.mean()


def cross_entropy_forward(*arguments) -> tuple[torch.Tensor, ...]:
    """(loss, lse, *gradients) for ``_FORWARD_SCHEMA``'s arguments: the float32 loss; with
    ``gradients_in_forward``, the seven DIFFERENTIABLE_INPUTS' gradients of the loss (those
    ``needs`` asks for, empty tensors for the others) and an empty lse; else the (num_samples, B)
    log-sum-exp backward recomputes from and seven empty tensors. With no gradient needed, no
    work is done for gradients."""
    inputs, (target, seed, *settings, backend, needs) = split_inputs(arguments)
    image = inputs[0]
    loss, lse, grads = _cross_entropy(inputs, target, seed, LossSettings(*settings), backend, needs)
    lse = image.new_empty(0, dtype=torch.float32) if lse is None else lse
    return (loss, lse, *per_sample.gradients_or_empty(grads, image))


def _cross_entropy(
    inputs: OpInputs,
    target: torch.Tensor,
    seed: torch.Tensor,
    settings: LossSettings,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """``cross_entropy_forward`` with None for what is not computed: (loss, lse or None, the
    seven gradients or None each)."""
    image, text, logit_scale = inputs[:3]
    num_samples, multiply, reduction, label_smoothing = settings
    _checks.check_target_values(target, text.shape[-2])
    kernels = kernel_tables.loss_kernels(backend)
    flow = kernel_tables.loss_flow_kernels(backend)
    seed_arg = kernel_seed(seed, image.device)
    rows, classes = image.shape[-2], text.shape[-2]
    device = image.device
    target = target.to(torch.int64).contiguous()
    grads: list = [None] * len(DIFFERENTIABLE_INPUTS)
    in_forward = gradients_in_forward(reduction, needs)
    row_grads = None
    if in_forward:
        weight = 1.0 / (num_samples * rows) if reduction == "mean" and rows else 1.0
        row_grads = torch.full((num_samples, rows), weight, device=device)
    if flow is not None:
        flow_settings = FlowSettings(num_samples, multiply, label_smoothing, None, row_grads, needs)
        with on_device(device):
            lse, target_logit, logit_sum, flow_grads = flow.cross_entropy_flow(
                inputs, target, seed_arg, flow_settings
            )
        if in_forward:
            grads = flow_grads
    else:
        scale = logit_scale.to(device=device, dtype=torch.float32)
        # Separate buffers: only lse is saved for backward, and it should not pin the other two.
        lse, target_logit, logit_sum = (
            new_buffer((num_samples, rows), torch.float32, device) for _ in range(3)
        )
        with on_device(device):
            if in_forward:
                scale_grad_rows = new_buffer((num_samples, rows), torch.float32, device)

                def cosine_grad(sample, cosine):
                    statistics = (lse[sample], target_logit[sample], logit_sum[sample])
                    kernels.loss_stats_grad(
                        *(cosine, target, row_grads[sample], scale, label_smoothing),
                        *(*statistics, scale_grad_rows[sample]),
                    )
                    return cosine

                grads = per_sample.backward(
                    kernels, cosine_grad, inputs, seed_arg, num_samples, multiply, needs
                )
                if needs[2]:
                    grads[2] = scale_grad_rows.sum().to(logit_scale.dtype)
            else:
                sides = per_sample.make_sides(kernels, inputs, seed_arg, multiply)
                for sample in range(num_samples):
                    per_sample.normalize_sample(kernels, sides, sample)
                    if rows > 0:
                        statistics = (lse[sample], target_logit[sample], logit_sum[sample])
                        units = (sides[0].unit, sides[1].unit)
                        kernels.loss_stats(*units, target, scale, *statistics)
    row_losses = _row_losses(lse, target_logit, logit_sum, classes, label_smoothing)
    return _reduce(row_losses, reduction), None if in_forward else lse, grads


def cross_entropy_backward(grad_loss: torch.Tensor, *arguments) -> list[torch.Tensor]:
    """The recompute path (a "none" loss, see ``gradients_in_forward``): the gradients of the
    seven DIFFERENTIABLE_INPUTS for the loss's gradient ``grad_loss``, from forward's lse;
    ``_BACKWARD_SCHEMA``'s arguments."""
    inputs, (target, lse, seed, *settings, backend, needs) = split_inputs(arguments)
    num_samples, multiply, reduction, label_smoothing = settings
    image, logit_scale = inputs[0], inputs[2]
    kernels = kernel_tables.loss_kernels(backend)
    flow = kernel_tables.loss_flow_kernels(backend)
    rows = image.shape[-2]
    device = image.device
    scale = logit_scale.to(device=device, dtype=torch.float32)
    grad_loss = grad_loss.to(torch.float32)
    if reduction == "mean":
        grad_loss = grad_loss / (num_samples * rows)
    row_grads = grad_loss.expand(num_samples, rows).contiguous()  # "none": already (m, B)
    scale_grad_rows = new_buffer((num_samples, rows), torch.float32, device)
    target = target.to(torch.int64).contiguous()

    def cosine_grad(sample, cosine):
        kernels.loss_grad(
            *(cosine, lse[sample], target, row_grads[sample], scale),
            *(label_smoothing, scale_grad_rows[sample]),
        )
        return cosine

    seed_arg = kernel_seed(seed, image.device)
    with on_device(device):
        if flow is not None:
            settings = FlowSettings(num_samples, multiply, label_smoothing, lse, row_grads, needs)
            *_, grads = flow.cross_entropy_flow(inputs, target, seed_arg, settings)
            return per_sample.gradients_or_empty(grads, image)
        grads = per_sample.backward(
            kernels, cosine_grad, inputs, seed_arg, num_samples, multiply, needs
        )
    grads[2] = scale_grad_rows.sum().to(logit_scale.dtype) if needs[2] else None
    return per_sample.gradients_or_empty(grads, image)


# --- autograd: what is saved, and the gradients from it --------------------------------------


def _save_for_backward(ctx, differentiable, target, seed, lse, grads, settings, needs) -> None:
    """settings: (num_samples, multiply, reduction, label_smoothing, backend)."""
    ctx.needs = needs
    ctx.in_forward = gradients_in_forward(settings[2], needs)
    if ctx.in_forward:  # backward only scales these: nothing else is kept
        ctx.save_for_backward(*(g if need else None for g, need in zip(grads, needs, strict=True)))
    else:
        ctx.save_for_backward(*differentiable, target, lse, seed)
        ctx.settings = settings


def _gradients(ctx, grad_loss, backward, inputs: int, eager: bool = False) -> tuple:
    if ctx.in_forward:
        grads = ctx.saved_tensors
        # In eager mode d loss / d loss = 1 (loss.backward()) needs no scaling; read on the host
        # for a CPU tensor only (on a GPU that read would sync; traced, it has no value).
        if not (eager and grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
            grads = [None if grad is None else (grad * grad_loss).to(grad.dtype) for grad in grads]
    else:
        grads = backward(grad_loss, *ctx.saved_tensors, *ctx.settings, ctx.needs)
    return per_sample.input_grads(ctx.needs, grads, inputs)


# --- the custom ops (torch.compile's entry point) --------------------------------------------

noisy_cross_entropy, noisy_cross_entropy_backward = per_sample.custom_ops(
    "noisy_cross_entropy",
    cross_entropy_forward,
    cross_entropy_backward,
    _FORWARD_SCHEMA,
    _BACKWARD_SCHEMA,
)


@noisy_cross_entropy.register_fake
def _noisy_cross_entropy_fake(*arguments):
    inputs, (_, _, num_samples, _, reduction, _, _, needs) = split_inputs(arguments)
    image = inputs[0]
    rows = image.shape[-2]
    loss_shape = (num_samples, rows) if reduction == "none" else ()
    loss = image.new_empty(loss_shape, dtype=torch.float32)
    if gradients_in_forward(reduction, needs):
        lse = image.new_empty(0, dtype=torch.float32)
        return (loss, lse, *per_sample.fake_gradients(needs, inputs))
    lse = image.new_empty((num_samples, rows), dtype=torch.float32)
    return (loss, lse, *per_sample.fake_gradients([False] * len(needs), inputs))


def _setup_context(ctx, inputs, output):
    *differentiable, target, seed = inputs[:9]
    ctx.mark_non_differentiable(*output[1:])
    _, lse, *grads = output
    _save_for_backward(ctx, differentiable, target, seed, lse, grads, inputs[9:14], inputs[14])


noisy_cross_entropy.register_autograd(
    lambda ctx, grad_loss, *_: _gradients(ctx, grad_loss, noisy_cross_entropy_backward, _INPUTS),
    setup_context=_setup_context,
)


# --- the eager entry points ------------------------------------------------------------------


class LossFunction(torch.autograd.Function):
    """The op in eager mode on Triton: the custom op's forward, saved tensors and backward,
    without the custom-op dispatch; returns the loss alone."""

    @staticmethod
    def forward(ctx, *arguments):
        differentiable, (target, seed, *settings) = split_inputs(arguments)
        needs = list(ctx.needs_input_grad[: len(DIFFERENTIABLE_INPUTS)])
        loss_settings = LossSettings(*settings[:-1])
        backend = settings[-1]
        loss, lse, grads = _cross_entropy(
            differentiable, target, seed, loss_settings, backend, needs
        )
        _save_for_backward(ctx, differentiable, target, seed, lse, grads, settings, needs)
        return loss

    @staticmethod
    @once_differentiable("noisy_cross_entropy")
    def backward(ctx, grad_loss):
        return _gradients(ctx, grad_loss, cross_entropy_backward, _INPUTS - 1, eager=True)


def _flow_with_autograd(
    backend: str,
    flow: kernel_tables.LossFlowKernels,
    inputs: OpInputs,
    target: torch.Tensor,
    seed: torch.Tensor,
    settings: LossSettings,
) -> torch.Tensor:
    """The native backends' eager entry point: the flow, saved tensors and gradients of
    ``LossFunction``, with the autograd node and the flow in C++ (csrc/loss_flow.cpp)."""
    image, text = inputs[:2]
    _checks.check_target_values(target, text.shape[-2])
    max_dim = kernel_tables.loss_kernels(backend).MAX_FEATURE_DIM
    per_sample.check_feature_dim(image.shape[-1], max_dim)
    target = target.to(torch.int64).contiguous()  # (no copy when it already is both)
    with on_device(image.device):
        return flow.cross_entropy_autograd(
            inputs, target, kernel_seed(seed, image.device), settings
        )


def run_cross_entropy(*arguments) -> torch.Tensor:
    """The op on checked arguments (``cross_entropy_forward``'s but ``needs``), with autograd:
    the custom op under torch.compile; else on the native backends their C++ flow and autograd,
    on Triton ``LossFunction``, or the forward alone when no gradient is wanted; returns the
    loss."""
    inputs, (target, seed, *settings, backend) = split_inputs(arguments)
    settings = LossSettings(*settings)
    if torch.compiler.is_compiling():
        needs = per_sample.needs_grad(inputs)
        return noisy_cross_entropy(*arguments, needs)[0]
    flow = kernel_tables.loss_flow_kernels(backend)
    if flow is not None:
        return _flow_with_autograd(backend, flow, inputs, target, seed, settings)
    needs = per_sample.needs_grad(inputs)
    if any(needs):
        return LossFunction.apply(*arguments)
    return _cross_entropy(inputs, target, seed, settings, backend, needs)[0]
