"""The ``fused_inject`` op: ``out[s] = x (+ or *) (mu + sigma * eps[s])`` for each noise sample.

This module owns the op's contract; a backend only runs its kernels
(``kernel_tables.InjectKernels``: ``triton/inject.py``, ``native.py``). In order:

- how the noise parameters broadcast over ``x``, as a ``rows x width`` view (``BroadcastLayout``);
- the op's forward and backward (``inject_forward`` / ``inject_backward``);
- what is saved for backward (docs/spec.md §6: the seed, never ``eps``; in add mode only a
  stand-in for ``x``, which backward must not read) and how the parameters' gradients are reduced
  (each backend returns one row of fp32 partial sums per chunk of rows; ``_reduce_partial_sums``
  adds them in a fixed order, so backward is deterministic);
- the entry points (``run_inject`` picks one): under torch.compile the custom ops
  ``pini_kernels::inject`` and ``::inject_backward`` (opaque to the compiler, with fakes for
  shapes, so no graph break) with the custom op's autograd; in eager mode ``InjectFunction`` (an
  ``autograd.Function`` calling the same two functions), or the forward alone when no gradient is
  wanted: the custom-op dispatch costs tens of microseconds per call, more than the kernels take
  on small tensors. On the native backends, eager calls on contiguous tensors take their C++
  autograd node instead (``kernel_tables.InjectAutogradKernels``: the same kernels and saved
  tensors).

``reference.fused_inject`` (pure PyTorch) is the definition the backends are tested against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import _checks, kernel_tables
from ._host import custom_op, like_input, new_buffer, on_device, once_differentiable
from .seeds import kernel_seed

# --- how mu and sigma broadcast over x ------------------------------------------------------------
#
# Every pattern that matters in practice has the parameter index of flat element ``i`` equal to
# ``(i % width) // inner`` for a row-major view of ``x`` as ``rows x width``:
#
# | parameter vs ``x``        | example                             | rows | width | inner |
# |---------------------------|-------------------------------------|------|-------|-------|
# | same shape                | ``(B, D)`` vs ``(B, D)``            | 1    | N     | 1     |
# | trailing dims (shared)    | ``(D,)``, ``(L, D)``, ``(3, H, W)`` | lead | trail | 1     |
# | leading dims (per row)    | ``(B, 1)`` vs ``(B, D)``            | 1    | N     | trail |
# | a middle run              | ``(3, 1, 1)`` vs ``(B, 3, H, W)``   | B    | 3HW   | HW    |
# | a scalar                  | ``()``                              | 1    | N     | N     |
#
# Any other pattern (e.g. ``(B, 1, D)`` vs ``(B, L, D)``) is handled by expanding the parameters to
# ``x``'s shape first (``expand=True``); their gradients are summed back to the given shapes.


@dataclass(frozen=True)
class BroadcastLayout:
    rows: int  # leading extent over which the parameters repeat
    width: int  # elements per row
    inner: int  # consecutive elements that share one parameter value
    expand: bool  # parameters must first be expanded to x's shape

    @property
    def num_params(self) -> int:
        return self.width // self.inner

    @property
    def kernel_args(self) -> tuple[int, int, int]:
        """(rows, width, inner): how every backend's inject kernels take the layout."""
        return self.rows, self.width, self.inner


@functools.lru_cache(maxsize=256)  # shapes repeat every step: compute each layout once
def broadcast_layout(x_shape: torch.Size, param_shape: torch.Size) -> BroadcastLayout:
    """The layout of ``param_shape`` broadcast over ``x_shape`` (it must broadcast to it)."""
    numel = x_shape.numel()
    padded = (1,) * (len(x_shape) - len(param_shape)) + tuple(param_shape)
    kinds: list[str] = []
    sizes: list[int] = []
    for x_size, param_size in zip(x_shape, padded, strict=True):
        if x_size == 1:
            continue
        kind = "full" if param_size == x_size else "shared"
        if kinds and kinds[-1] == kind:
            sizes[-1] *= x_size
        else:
            kinds.append(kind)
            sizes.append(x_size)
    pattern = tuple(kinds)
    if pattern in ((), ("full",)):
        return BroadcastLayout(rows=1, width=numel, inner=1, expand=False)
    if pattern == ("shared",):
        return BroadcastLayout(rows=1, width=numel, inner=numel, expand=False)
    if pattern == ("shared", "full"):
        return BroadcastLayout(rows=sizes[0], width=sizes[1], inner=1, expand=False)
    if pattern == ("full", "shared"):
        return BroadcastLayout(rows=1, width=numel, inner=sizes[1], expand=False)
    if pattern == ("shared", "full", "shared"):
        return BroadcastLayout(
            rows=sizes[0], width=sizes[1] * sizes[2], inner=sizes[2], expand=False
        )
    return BroadcastLayout(rows=1, width=numel, inner=1, expand=True)


@functools.lru_cache(maxsize=256)
def _param_layout(
    x_shape: torch.Size, mu_shape: torch.Size, sigma_shape: torch.Size
) -> tuple[BroadcastLayout, torch.Size]:
    """The layout and the common parameter shape (``x_shape`` when the parameters are expanded),
    cached: shapes repeat every step, and broadcasting them costs microseconds per call."""
    param_shape = (
        mu_shape if mu_shape == sigma_shape else torch.broadcast_shapes(mu_shape, sigma_shape)
    )
    layout = broadcast_layout(x_shape, torch.Size(param_shape))
    return layout, x_shape if layout.expand else torch.Size(param_shape)


def _flat(param: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``param`` expanded to ``shape``, contiguous and flat (a view when it already is so)."""
    if param.shape == shape and param.is_contiguous():
        return param.view(-1)
    return param.expand(shape).contiguous().view(-1)


def _flat_params(
    x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
) -> tuple[BroadcastLayout, torch.Size, torch.Tensor, torch.Tensor]:
    """The layout, the common parameter shape, and mu/sigma as contiguous flat tensors."""
    layout, param_shape = _param_layout(x.shape, mu.shape, sigma.shape)
    return layout, param_shape, _flat(mu, param_shape), _flat(sigma, param_shape)


def _reduce_partial_sums(
    partial: torch.Tensor, layout: BroadcastLayout, param_shape: torch.Size
) -> torch.Tensor:
    """(row_chunks, width) fp32 partial sums -> sums of ``param_shape``, deterministically."""
    if partial.shape[0] == 1 and layout.inner == 1:  # one chunk of rows: already the sums
        return partial.view(param_shape)
    per_column = partial.view(-1) if partial.shape[0] == 1 else partial.sum(dim=0)
    if layout.inner == 1:
        return per_column.view(param_shape)
    return per_column.view(layout.num_params, layout.inner).sum(dim=1).view(param_shape)


# --- the op's two halves ------------------------------------------------------------------------
#
# They are the custom ops' functions too, with the schemas written out below (one place for the
# argument types, instead of an annotated signature per function that takes them).
_OP_ARGUMENTS = "Tensor x, Tensor mu, Tensor sigma, Tensor seed, SymInt num_samples, bool multiply"
_FORWARD_SCHEMA = f"({_OP_ARGUMENTS}, str backend) -> Tensor"
_BACKWARD_SCHEMA = (
    f"(Tensor grad_out, {_OP_ARGUMENTS}, str backend, bool need_x_grad, bool need_param_grad)"
    " -> (Tensor, Tensor, Tensor)"
)


def inject_forward(x, mu, sigma, seed, num_samples, multiply, backend) -> torch.Tensor:
    """(num_samples, *x.shape): x (+ or *) (mu + sigma * eps); seed is a 0-d int64 tensor on the
    CPU or on x's device (then read by the kernels, see ``seeds.kernel_seed``)."""
    seed_arg = kernel_seed(seed, x.device)
    out = new_buffer((num_samples, *x.shape), _checks.result_dtype(x, mu, sigma), x.device)
    if x.numel() == 0:
        return out
    layout, _, mu_flat, sigma_flat = _flat_params(x, mu, sigma)
    data = (x.contiguous(), mu_flat, sigma_flat, seed_arg, num_samples, multiply)
    with on_device(x.device):
        kernel_tables.inject_kernels(backend).inject_forward(*data, *layout.kernel_args, out)
    return out


def inject_backward(
    grad_out, x, mu, sigma, seed, num_samples, multiply, backend, need_x_grad, need_param_grad
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_mu, grad_sigma) summed over samples and broadcast dimensions; an empty tensor
    stands for a gradient not asked for. ``seed`` is the tensor forward was given, so eps is drawn
    again. The parameters' gradients come in their shapes, dtypes and layouts; grad_x in x's dtype,
    in x's layout in mul mode and contiguous in add mode (where ``x`` is autograd's stand-in,
    ``_save_for_backward``, whose ``empty_like`` is contiguous: copying into another layout would
    cost one more pass over grad_x)."""
    seed_arg = kernel_seed(seed, x.device)
    layout, param_shape, mu_flat, sigma_flat = _flat_params(x, mu, sigma)
    grad_x = new_buffer(x.shape, x.dtype, x.device) if need_x_grad else None
    partial_sums = None
    if x.numel() > 0:
        with on_device(x.device):
            data = (grad_out.contiguous(), x, mu_flat, sigma_flat, seed_arg, num_samples, multiply)
            partial_sums = kernel_tables.inject_kernels(backend).inject_backward(
                *data, *layout.kernel_args, grad_x, need_param_grad
            )
    if grad_x is None:
        grad_x = x.new_empty(0)
    elif multiply:
        grad_x = like_input(grad_x, x)
    if not need_param_grad:  # empty tensors for the gradients not asked for (outputs never alias)
        return grad_x, x.new_empty(0), x.new_empty(0)
    if partial_sums is None:  # an empty x: zero gradients, as torch gives
        mu_grad = torch.zeros(param_shape, dtype=torch.float32, device=x.device)
        sigma_grad = torch.zeros_like(mu_grad)
    else:
        mu_grad, sigma_grad = (
            _reduce_partial_sums(partial, layout, param_shape) for partial in partial_sums
        )
    return grad_x, _param_grad(mu_grad, mu), _param_grad(sigma_grad, sigma)


def _param_grad(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A gradient of the common parameter shape as ``param``'s, summed over its broadcast
    dimensions, in its dtype and layout."""
    if grad.dtype == param.dtype and param.is_contiguous() and grad.shape == param.shape:
        return grad  # the common case, with the fewest host calls
    if grad.shape != param.shape:
        grad = grad.sum_to_size(param.shape)
    return like_input(grad, param)


def _save_for_backward(ctx, x, mu, sigma, seed, num_samples, multiply, backend) -> None:
    if not multiply:
        # Add mode's gradients do not depend on x, and no backend's inject_backward may read x in
        # add mode: keep an 8-byte stand-in with its shape and dtype, so x is neither kept alive
        # nor checked for in-place changes.
        x = x.new_empty(()).expand(x.shape)
    ctx.save_for_backward(x, mu, sigma, seed)  # the seed, never eps: backward draws eps again
    ctx.num_samples, ctx.multiply, ctx.backend = num_samples, multiply, backend


def _gradients(ctx, grad_out, backward) -> tuple[torch.Tensor | None, ...]:
    """The inputs' gradients from the saved tensors, with ``backward`` (the custom op or the plain
    function, the same arguments)."""
    x, mu, sigma, seed = ctx.saved_tensors
    need_x_grad, need_mu_grad, need_sigma_grad = ctx.needs_input_grad[:3]
    settings = (ctx.num_samples, ctx.multiply, ctx.backend)
    grads = backward(
        grad_out, x, mu, sigma, seed, *settings, need_x_grad, need_mu_grad or need_sigma_grad
    )
    needed = (need_x_grad, need_mu_grad, need_sigma_grad)
    # None for seed, num_samples, multiply and backend.
    return (
        *(grad if need else None for grad, need in zip(grads, needed, strict=True)),
        *[None] * 4,
    )


inject = custom_op("inject", inject_forward, _FORWARD_SCHEMA)


@inject.register_fake
def _inject_fake(x, mu, sigma, seed, num_samples, multiply, backend):
    return x.new_empty((num_samples, *x.shape), dtype=_checks.result_dtype(x, mu, sigma))


inject_backward_op = custom_op("inject_backward", inject_backward, _BACKWARD_SCHEMA)


@inject_backward_op.register_fake
def _inject_backward_fake(
    grad_out, x, mu, sigma, seed, num_samples, multiply, backend, need_x_grad, need_param_grad
):
    def like(tensor, needed):
        return torch.empty_like(tensor) if needed else x.new_empty(0)

    grad_x = like(x, need_x_grad) if multiply or not need_x_grad else x.new_empty(x.shape)
    return grad_x, like(mu, need_param_grad), like(sigma, need_param_grad)


inject.register_autograd(
    lambda ctx, grad_out: _gradients(ctx, grad_out, inject_backward_op),
    setup_context=lambda ctx, inputs, output: _save_for_backward(ctx, *inputs),
)


class InjectFunction(torch.autograd.Function):
    """The eager entry point: the same forward, saved tensors and backward as the custom op's
    autograd, without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, mu, sigma, seed, num_samples, multiply, backend):
        _save_for_backward(ctx, x, mu, sigma, seed, num_samples, multiply, backend)
        return inject_forward(x, mu, sigma, seed, num_samples, multiply, backend)

    @staticmethod
    @once_differentiable("fused_inject")
    def backward(ctx, grad_out):
        return _gradients(ctx, grad_out, inject_backward)


def _native_fast_path(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> bool:
    """Whether ``pini_native::inject`` takes the call: contiguous x, mu and sigma of one shape
    whose layout needs no expansion (the flat parameters are then views, so their gradients are
    exactly the kernels' fp32 sums, in the given layouts). Other calls take ``InjectFunction``."""
    return (
        mu.shape == sigma.shape
        and x.is_contiguous()
        and mu.is_contiguous()
        and sigma.is_contiguous()
        and not _param_layout(x.shape, mu.shape, sigma.shape)[0].expand
    )


def _inject_with_autograd(
    kernels: kernel_tables.InjectAutogradKernels,
    x,
    mu,
    sigma,
    seed,
    num_samples,
    multiply,
    sample_dim: bool,
) -> torch.Tensor:
    """The native backends' eager entry point (``_native_fast_path``): the same kernels, saved
    tensors and gradients as ``InjectFunction`` with the autograd node in C++, which runs backward
    without Python. mu and sigma go in as they are (contiguous, one shape, not expanded) and the
    output comes in its final shape: no view node between the op and the caller, whose cost
    (microseconds each, forward and backward) a small tensor feels."""
    layout = _param_layout(x.shape, mu.shape, sigma.shape)[0]
    with on_device(x.device):
        data = (x, mu, sigma, kernel_seed(seed, x.device), num_samples, multiply)
        return kernels.inject_autograd(
            *data, *layout.kernel_args, _checks.result_dtype(x, mu, sigma), sample_dim
        )


def run_inject(
    x, mu, sigma, seed, num_samples: int, multiply: bool, backend: str, sample_dim: bool = True
) -> torch.Tensor:
    """The op on checked arguments (``inject_forward``'s), with autograd: the custom op under
    torch.compile; else on the native backends their C++ autograd node (for contiguous tensors),
    ``InjectFunction``, or the forward alone when no gradient is wanted. (num_samples, *x.shape),
    or x.shape without ``sample_dim`` (one sample)."""
    if torch.compiler.is_compiling():
        out = inject(x, mu, sigma, seed, num_samples, multiply, backend)
    else:
        native = kernel_tables.inject_autograd_kernels(backend)
        if native is not None and _native_fast_path(x, mu, sigma):
            arguments = (x, mu, sigma, seed, num_samples, multiply, sample_dim)
            return _inject_with_autograd(native, *arguments)
        if torch.is_grad_enabled() and (x.requires_grad or mu.requires_grad or sigma.requires_grad):
            out = InjectFunction.apply(x, mu, sigma, seed, num_samples, multiply, backend)
        else:
            out = inject_forward(x, mu, sigma, seed, num_samples, multiply, backend)
    return out if sample_dim else out.view(x.shape)
