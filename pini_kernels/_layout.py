"""How noise parameters broadcast over the tensor they perturb, as a ``rows x width`` view.

Every pattern that matters in practice has the parameter index of flat element ``i`` equal to
``(i % width) // inner`` for a row-major view of ``x`` as ``rows x width``:

| parameter vs ``x``        | example                             | rows | width | inner |
|---------------------------|-------------------------------------|------|-------|-------|
| same shape                | ``(B, D)`` vs ``(B, D)``            | 1    | N     | 1     |
| trailing dims (shared)    | ``(D,)``, ``(L, D)``, ``(3, H, W)`` | lead | trail | 1     |
| leading dims (per row)    | ``(B, 1)`` vs ``(B, D)``            | 1    | N     | trail |
| a middle run              | ``(3, 1, 1)`` vs ``(B, 3, H, W)``   | B    | 3HW   | HW    |
| a scalar                  | ``()``                              | 1    | N     | N     |

Any other pattern (e.g. ``(B, 1, D)`` vs ``(B, L, D)``) is handled by expanding the parameters to
``x``'s shape first (``expand=True``); their gradients are summed back to the given shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BroadcastLayout:
    rows: int  # leading extent over which the parameters repeat
    width: int  # elements per row
    inner: int  # consecutive elements that share one parameter value
    expand: bool  # parameters must first be expanded to x's shape

    @property
    def num_params(self) -> int:
        return self.width // self.inner


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


def reduce_partial_sums(partial: torch.Tensor, layout: BroadcastLayout) -> torch.Tensor:
    """(row_chunks, width) fp32 partial sums -> (num_params,) sums, deterministically."""
    per_column = partial.sum(dim=0)
    if layout.inner == 1:
        return per_column
    return per_column.view(layout.num_params, layout.inner).sum(dim=1)


def like_input(grad: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor | None:
    """``grad`` (contiguous, ``tensor``'s shape) in ``tensor``'s dtype and memory layout, as
    ``torch.empty_like(tensor)`` lays it out: what the ops' fake implementations promise, so
    torch.compile's stride checks hold for channels-last or transposed inputs too."""
    if grad is None:
        return None
    grad = grad.to(tensor.dtype)
    if tensor.is_contiguous():
        return grad
    return torch.empty_like(tensor).copy_(grad)
