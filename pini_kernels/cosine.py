"""The noisy cosine logits and PiNI's loss (Eq. 13): the ``noisy_cosine_logits`` and
``noisy_cross_entropy`` ops.

This module owns both ops' contract; a backend only runs its kernels. The work is done one noise
sample at a time, so nothing of size ``m*B*C``, ``m*B*D`` or ``m*C*D`` exists (beyond per-sample
text features the caller passes in). For each sample, the backend's row kernels noise and
L2-normalize the image rows (stream of ``seed``, elements ``s*B*D + b*D + d``) and the text rows
(stream of ``seed + 1``; with ``(m, C, D)`` text features, sample ``s`` reads ``text[s]``) into
fp32 buffers of one sample (``Side``); then:

- logits: ``logit_scale * image_unit @ text_unit^T`` into the ``(m, B, C)`` output;
- cosines (``_cosines``): the backend's own product, the same in forward and backward (for
  Triton the ``tl.dot`` of its loss kernel, at one precision in both passes);
- loss: the backend's ``loss_stats`` gives each row's log-sum-exp, target logit and sum of logits
  (the Triton kernel never stores the ``(B, C)`` tile; the CPU one uses one BLAS product);
- the loss's gradients: for a "mean" or "sum" loss that an input needs a gradient of, forward
  computes them while each sample's cosines are at hand (``loss_stats_grad`` gives the row
  statistics and d loss / d cosine of one tile, then the per-sample backward below runs), keeps
  input-sized gradients and nothing else, and backward only scales them by the loss's gradient:
  three matrix products per sample, as eager does, and no ``m*B*C`` memory traffic. A "none"
  loss (a gradient per row, known only in backward) keeps its ``(m, B)`` log-sum-exp and
  recomputes; the logits op saves the inputs and the seed. Never ``eps``, never the logits;
- the per-sample backward (``_backward``): the sample's unit rows and cosines (one ``(B, C)``
  tile), turned into ``d loss / d cosine``, two matrix products, then the row kernels
  backpropagate through normalization and noise into fp32 accumulators (``SideGrads``), summed
  over samples.

Each fused backend has the same functions, taking the same arguments, in ``triton/cosine.py`` and
``native.py`` (``_kernels`` is the table); they see one sample's ``(N, D)`` rows at a time, so
per-sample text features need nothing from them::

    normalize(features, mu, sigma, seed, stream_offset, multiply, unit, norm)
    normalize_backward(features, mu, sigma, seed, stream_offset, multiply, unit, norm,
                       grad_unit, grad_x, grad_mu, grad_sigma)
    loss_stats(image_unit, text_unit, target, scale, lse, target_logit, logit_sum)
    loss_grad(cosine, lse, target, row_grad, scale, label_smoothing, scale_grad)
    loss_stats_grad(cosine, target, row_grad, scale, label_smoothing, lse, target_logit,
                    logit_sum, scale_grad)
    MAX_FEATURE_DIM

``reference.noisy_cosine_logits`` / ``reference.noisy_cross_entropy`` (pure PyTorch) are the
definitions the backends are tested against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _checks
from ._host import like_input, new_buffer, on_device, once_differentiable

# Both ops take these seven inputs first, in this order, and their backward ops return the seven
# gradients in the same order.
DIFFERENTIABLE_INPUTS = (
    "image", "text", "logit_scale", "image_mu", "image_sigma", "text_mu", "text_sigma",
)  # fmt: skip


def _kernels(backend: str) -> ModuleType:
    """The backend's row and loss kernels, imported on first use (Triton is Linux-only)."""
    if backend == "triton":
        from .triton import cosine as kernels
    else:  # "cpu" or "cuda": the dispatcher runs the kernels of the tensors' device
        from . import native as kernels
    return kernels


def _cosines(
    kernels: ModuleType, image_unit: torch.Tensor, text_unit: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """(B, C) fp32 cosines of unit rows with the backend's own product: the one its
    ``loss_stats`` takes the log-sum-exp from, so that forward and backward agree (issue 12,
    item 4). The native backends' loss_stats use torch.mm, as this fallback does, into ``out``
    when given (the CPU allocator gives each new large buffer fresh pages to fault in: a
    per-sample loop reuses one)."""
    product = getattr(kernels, "cosines", None)
    if product is not None:
        return product(image_unit, text_unit)
    if out is None:
        return torch.mm(image_unit, text_unit.t())
    return torch.mm(image_unit, text_unit.t(), out=out)


# --- the per-sample flow --------------------------------------------------------------------------


@dataclass
class Side:
    """One side (image or text) of the logits: its rows, optional noise and per-sample buffers."""

    features: torch.Tensor  # (N, D), unit stride along D: the current sample's rows
    mu: torch.Tensor | None  # fp32, expanded to (N, D) (stride 0 on broadcast dims)
    sigma: torch.Tensor | None
    seed: int | torch.Tensor  # an int, or a 0-d int64 tensor on the device read by the kernels
    multiply: bool
    unit: torch.Tensor  # (N, D) fp32: this sample's normalized rows
    norm: torch.Tensor  # (N,) fp32: their norms before normalization
    # (num_samples, N, D), unit stride along D, when each sample has its own rows; else None.
    sample_features: torch.Tensor | None = None

    @property
    def has_noise(self) -> bool:
        return self.mu is not None

    @property
    def per_sample(self) -> bool:
        return self.sample_features is not None

    @property
    def changes_per_sample(self) -> bool:
        """Whether the normalized rows differ between samples (else they are computed once)."""
        return self.has_noise or self.per_sample

    def select_sample(self, sample: int) -> None:
        if self.sample_features is not None:
            self.features = self.sample_features[sample]

    def stream_offset(self, sample: int) -> int:
        """The stream element of this sample's first noise value."""
        rows, dim = self.features.shape
        return sample * rows * dim


@dataclass
class SideGrads:
    need_x: bool
    need_params: bool
    x: torch.Tensor | None = None  # fp32 (N, D) accumulators; x: (num_samples, N, D) per sample
    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    @classmethod
    def zeros(cls, side: Side, need_x: bool, need_params: bool) -> SideGrads:
        shape, device = side.features.shape, side.features.device

        def make(needed: bool, shape=shape) -> torch.Tensor | None:
            return torch.zeros(shape, dtype=torch.float32, device=device) if needed else None

        x_shape = side.sample_features.shape if side.per_sample else shape
        need_params = need_params and side.has_noise
        return cls(need_x, need_params, make(need_x, x_shape), make(need_params), make(need_params))

    def for_sample(self, side: Side, sample: int) -> SideGrads:
        """The accumulators one sample's kernels add into: its own x rows when per sample."""
        if side.per_sample and self.x is not None:
            return dataclasses.replace(self, x=self.x[sample])
        return self


def _make_side(
    kernels: ModuleType, features, mu, sigma, seed: int | torch.Tensor, multiply: bool
) -> Side:
    """features: (N, D), or (num_samples, N, D) for one set of rows per sample."""
    rows, dim = features.shape[-2:]
    if dim > kernels.MAX_FEATURE_DIM:
        raise ValueError(
            f"feature dimension D={dim} exceeds this backend's maximum {kernels.MAX_FEATURE_DIM}"
        )
    if features.stride(-1) != 1:
        features = features.contiguous()
    sample_features = features if features.dim() == 3 else None
    if sample_features is not None:
        features = sample_features[0]
    if mu is not None:  # the kernels read fp32 parameters (converted once, before expanding)
        mu = mu.to(torch.float32).expand(rows, dim)
        sigma = sigma.to(torch.float32).expand(rows, dim)
    unit = new_buffer((rows, dim), torch.float32, features.device)
    norm = new_buffer((rows,), torch.float32, features.device)
    return Side(features, mu, sigma, seed, multiply, unit, norm, sample_features)


def _sides(kernels, image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply):
    return (
        _make_side(kernels, image, image_mu, image_sigma, seed, multiply),
        # A tensor seed's + 1 runs on the device (no sync); 2^63 wraps to -2^63, the same key.
        _make_side(kernels, text, text_mu, text_sigma, seed + 1, multiply),
    )


def _normalize_sample(kernels: ModuleType, sides, sample: int) -> None:
    """Noise and normalize both sides for ``sample`` (sides equal in every sample only once)."""
    for side in sides:
        side.select_sample(sample)
        if (side.changes_per_sample or sample == 0) and side.features.shape[0] > 0:
            kernels.normalize(
                side.features, side.mu, side.sigma, side.seed, side.stream_offset(sample),
                side.multiply, side.unit, side.norm,
            )  # fmt: skip


def _side_backward(kernels, side: Side, sample: int, unit_grad, grads: SideGrads) -> None:
    if side.features.shape[0] > 0 and (grads.need_x or grads.need_params):
        grads = grads.for_sample(side, sample)
        kernels.normalize_backward(
            side.features, side.mu, side.sigma, side.seed, side.stream_offset(sample),
            side.multiply, side.unit, side.norm, unit_grad, grads.x, grads.mu, grads.sigma,
        )  # fmt: skip


def _backward(
    kernels, cosine_grad, image, text, image_mu, image_sigma, text_mu, text_sigma, seed,
    num_samples, multiply, needs, needs_cosines=True,
) -> list:  # fmt: skip
    """Shared backward: per sample, recompute the unit rows and cosines, turn them into
    d loss / d cosine with ``cosine_grad(sample, cosine)``, and backpropagate through the matrix
    product, the normalization and the noise of both sides. Returns the seven gradients, with
    logit_scale's left to the caller. Without ``needs_cosines`` no cosines are computed:
    ``cosine_grad`` gets a (B, C) fp32 buffer to write into (None on Triton) instead."""
    sides = _sides(kernels, image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply)
    image_side, text_side = sides
    side_grads = (
        SideGrads.zeros(image_side, needs[0], needs[3] or needs[4]),
        SideGrads.zeros(text_side, needs[1], needs[5] or needs[6]),
    )
    # Sides equal in every sample: the matrix products sum their unit gradients in place
    # (the first sample's product writes the sum, the others' add to it), and they are
    # backpropagated once. The other sides' unit gradients and the cosines use one buffer each
    # for all samples.
    summed = image.shape[0] > 0 and num_samples > 0  # else the sums stay zero
    unit_grad_sums = [
        None if side.changes_per_sample
        else (torch.empty_like if summed else torch.zeros_like)(side.unit)
        for side in sides
    ]  # fmt: skip
    unit_grad_buffers = [
        torch.empty_like(side.unit) if side.changes_per_sample else None for side in sides
    ]
    cosine_buffer = None
    if image.shape[0] > 0 and not hasattr(kernels, "cosines"):
        cosine_buffer = image_side.unit.new_empty((image.shape[0], text.shape[-2]))
    for sample in range(num_samples):
        _normalize_sample(kernels, sides, sample)
        if image.shape[0] == 0:
            continue
        if needs_cosines:
            cosine = _cosines(kernels, image_side.unit, text_side.unit, out=cosine_buffer)
        else:  # the callback fills the buffer (when there is one) without reading it
            cosine = cosine_buffer
        cosine = cosine_grad(sample, cosine)
        products = ((cosine, text_side.unit), (cosine.t(), image_side.unit))
        for side, grads, (left, right), total, buffer in zip(
            sides, side_grads, products, unit_grad_sums, unit_grad_buffers, strict=True
        ):
            if total is None:
                unit_grad = torch.mm(left, right, out=buffer)
                _side_backward(kernels, side, sample, unit_grad, grads)
            elif sample == 0:
                torch.mm(left, right, out=total)
            else:
                total.addmm_(left, right)
    for side, grads, total in zip(sides, side_grads, unit_grad_sums, strict=True):
        if total is not None:
            _side_backward(kernels, side, 0, total, grads)
    image_grads, text_grads = side_grads
    return [
        like_input(image_grads.x, image),
        like_input(text_grads.x, text),
        None,
        _sum_to(image_grads.mu, image_mu, needs[3]),
        _sum_to(image_grads.sigma, image_sigma, needs[4]),
        _sum_to(text_grads.mu, text_mu, needs[5]),
        _sum_to(text_grads.sigma, text_sigma, needs[6]),
    ]


def _sum_to(grad: torch.Tensor | None, param: torch.Tensor | None, needed: bool):
    if not needed or grad is None or param is None:
        return None
    return like_input(grad.sum_to_size(param.shape), param)


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


def _gradients_or_empty(grads, like: torch.Tensor) -> list[torch.Tensor]:
    """Custom ops return tensors: an empty one stands for a gradient not asked for."""
    return [like.new_empty(0) if grad is None else grad for grad in grads]


def _fake_gradients(needs, tensors) -> list[torch.Tensor]:
    like = tensors[0]
    return [
        torch.empty_like(tensor) if needed and tensor is not None else like.new_empty(0)
        for needed, tensor in zip(needs, tensors, strict=True)
    ]


# --- the loss's flow on the native backends -----------------------------------------------------

# The native backends run the loss's flow as one op; tests set this False to run the Python flow
# (``_backward``, the Triton backend's) on the same native kernels and compare the two.
NATIVE_LOSS_FLOW = True


def _native_flow(
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target, seed,
    num_samples, multiply, label_smoothing, lse, row_grads, needs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:  # fmt: skip
    """The loss's per-sample flow of ``cross_entropy_forward`` / ``cross_entropy_backward`` as one
    native op (csrc/loss_flow.cpp: the same kernels, call for call, without a Python frame per
    kernel). seed: the kernels' seed (``_checks.kernel_seed``). Returns (lse, target_logit,
    logit_sum, the seven gradients in their inputs' shapes or None where not asked for)."""
    from . import native

    device = image.device
    need_bits = sum(1 << index for index, need in enumerate(needs) if need)
    lse, target_logit, logit_sum, *grads = native._ops().cross_entropy_flow(
        image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target,
        native._seed_tensor(seed, device),
        # A tensor seed's + 1 runs on the device (no sync); 2^63 wraps to -2^63, the same key.
        native._seed_tensor(seed + 1, device),
        num_samples, multiply, label_smoothing, lse, row_grads, need_bits,
    )  # fmt: skip
    grads = [grad if need else None for grad, need in zip(grads, needs, strict=True)]
    return lse, target_logit, logit_sum, grads


# --- the ops' halves -----------------------------------------------------------------------------
#
# What the two ops compute, as plain functions; two entry points run them (``run_logits`` and
# ``run_cross_entropy`` pick one):
#
# - under torch.compile, the custom ops ``pini_kernels::noisy_cosine_logits`` /
#   ``::noisy_cross_entropy`` and their backward ops (opaque to the compiler, with fakes for
#   shapes, so no graph break), with the custom ops' autograd;
# - in eager mode, an ``autograd.Function`` calling the same functions, or the forward alone when
#   no gradient is wanted: the custom-op dispatch costs tens of microseconds per call, more than
#   the kernels take on small tensors.


def logits_forward(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
    image_mu: torch.Tensor | None, image_sigma: torch.Tensor | None,
    text_mu: torch.Tensor | None, text_sigma: torch.Tensor | None,
    seed: torch.Tensor, num_samples: int, multiply: bool, backend: str,
) -> torch.Tensor:  # fmt: skip
    """(num_samples, B, C) logits of noisy, normalized features; image: (B, D); text: (C, D) or
    (num_samples, C, D), one set of class rows per sample; logit_scale is 0-d."""
    kernels = _kernels(backend)
    seed_arg = _checks.kernel_seed(seed, image.device)
    dtype = _checks.result_dtype(image, text, image_mu, image_sigma, text_mu, text_sigma)
    with on_device(image.device):
        image_side, text_side = sides = _sides(
            kernels, image, text, image_mu, image_sigma, text_mu, text_sigma, seed_arg, multiply
        )
        out = new_buffer((num_samples, image.shape[0], text.shape[-2]), dtype, image.device)
        scale = logit_scale.to(device=image.device, dtype=torch.float32)
        for sample in range(num_samples):
            _normalize_sample(kernels, sides, sample)
            out[sample] = _cosines(kernels, image_side.unit, text_side.unit).mul_(scale)
    return out


def logits_backward(
    grad_logits: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
    image_mu: torch.Tensor | None, image_sigma: torch.Tensor | None,
    text_mu: torch.Tensor | None, text_sigma: torch.Tensor | None,
    seed: torch.Tensor, num_samples: int, multiply: bool, backend: str, needs: list[bool],
) -> list[torch.Tensor]:  # fmt: skip
    """The gradients of the seven DIFFERENTIABLE_INPUTS for (num_samples, B, C) ``grad_logits``."""
    scale = logit_scale.to(device=image.device, dtype=torch.float32)
    scale_grad = torch.zeros((), dtype=torch.float32, device=image.device) if needs[2] else None

    def cosine_grad(sample, cosine):
        grad = grad_logits[sample].to(torch.float32)
        if scale_grad is not None:  # the only use of the cosines: d logits / d scale
            scale_grad.add_((grad * cosine).sum())
            return grad * scale
        return grad * scale if cosine is None else torch.mul(grad, scale, out=cosine)

    with on_device(image.device):
        grads = _backward(
            _kernels(backend), cosine_grad, image, text, image_mu, image_sigma, text_mu,
            text_sigma, _checks.kernel_seed(seed, image.device), num_samples, multiply,
            needs, needs_cosines=scale_grad is not None,
        )  # fmt: skip
    grads[2] = None if scale_grad is None else scale_grad.to(logit_scale.dtype)
    return _gradients_or_empty(grads, image)


def gradients_in_forward(reduction: str, needs) -> bool:
    """Whether the loss computes its inputs' gradients in forward: for a "mean" or "sum" loss
    backward only scales them by the loss's gradient (a number), so forward computes them while
    each sample's (B, C) cosines are at hand, and backward recomputes nothing. A "none" loss
    gets a gradient per row only in backward: it keeps the log-sum-exp and recomputes."""
    return reduction != "none" and any(needs)


def cross_entropy_forward(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
    image_mu: torch.Tensor | None, image_sigma: torch.Tensor | None,
    text_mu: torch.Tensor | None, text_sigma: torch.Tensor | None,
    target: torch.Tensor, seed: torch.Tensor, num_samples: int, multiply: bool, reduction: str,
    label_smoothing: float, backend: str, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, lse, *gradients): the float32 loss; with ``gradients_in_forward``, the seven
    DIFFERENTIABLE_INPUTS' gradients of the loss (those ``needs`` asks for, empty tensors for the
    others) and an empty lse; else the (num_samples, B) log-sum-exp backward recomputes from and
    seven empty tensors. With no gradient needed, no work is done for gradients."""
    loss, lse, grads = _cross_entropy(
        image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target, seed,
        num_samples, multiply, reduction, label_smoothing, backend, needs,
    )  # fmt: skip
    lse = image.new_empty(0, dtype=torch.float32) if lse is None else lse
    return (loss, lse, *_gradients_or_empty(grads, image))


def _cross_entropy(
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target, seed,
    num_samples, multiply, reduction, label_smoothing, backend, needs,
) -> tuple[torch.Tensor, torch.Tensor | None, list]:  # fmt: skip
    """``cross_entropy_forward`` with None for what is not computed: (loss, lse or None, the
    seven gradients or None each)."""
    _checks.check_target_values(target, text.shape[-2])
    kernels = _kernels(backend)
    seed_arg = _checks.kernel_seed(seed, image.device)
    rows, classes = image.shape[0], text.shape[-2]
    device = image.device
    target = target.to(torch.int64).contiguous()
    grads: list = [None] * len(DIFFERENTIABLE_INPUTS)
    in_forward = gradients_in_forward(reduction, needs)
    row_grads = None
    if in_forward:
        weight = 1.0 / (num_samples * rows) if reduction == "mean" and rows else 1.0
        row_grads = torch.full((num_samples, rows), weight, device=device)
    if backend != "triton" and NATIVE_LOSS_FLOW:
        with on_device(device):
            lse, target_logit, logit_sum, flow_grads = _native_flow(
                image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target,
                seed_arg, num_samples, multiply, label_smoothing, None, row_grads, needs,
            )  # fmt: skip
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
                    kernels.loss_stats_grad(
                        cosine, target, row_grads[sample], scale, label_smoothing, lse[sample],
                        target_logit[sample], logit_sum[sample], scale_grad_rows[sample],
                    )  # fmt: skip
                    return cosine

                grads = _backward(
                    kernels, cosine_grad, image, text, image_mu, image_sigma, text_mu,
                    text_sigma, seed_arg, num_samples, multiply, needs,
                )  # fmt: skip
                if needs[2]:
                    grads[2] = scale_grad_rows.sum().to(logit_scale.dtype)
            else:
                sides = _sides(
                    kernels, image, text, image_mu, image_sigma, text_mu, text_sigma, seed_arg,
                    multiply,
                )  # fmt: skip
                for sample in range(num_samples):
                    _normalize_sample(kernels, sides, sample)
                    if rows > 0:
                        kernels.loss_stats(
                            sides[0].unit, sides[1].unit, target, scale, lse[sample],
                            target_logit[sample], logit_sum[sample],
                        )  # fmt: skip
    row_losses = _row_losses(lse, target_logit, logit_sum, classes, label_smoothing)
    return _reduce(row_losses, reduction), None if in_forward else lse, grads


def cross_entropy_backward(
    grad_loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
    image_mu: torch.Tensor | None, image_sigma: torch.Tensor | None,
    text_mu: torch.Tensor | None, text_sigma: torch.Tensor | None,
    target: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor, num_samples: int, multiply: bool,
    reduction: str, label_smoothing: float, backend: str, needs: list[bool],
) -> list[torch.Tensor]:  # fmt: skip
    """The recompute path (a "none" loss, see ``gradients_in_forward``): the gradients of the
    seven DIFFERENTIABLE_INPUTS for the loss's gradient ``grad_loss``, from forward's lse."""
    kernels = _kernels(backend)
    rows = image.shape[0]
    device = image.device
    scale = logit_scale.to(device=device, dtype=torch.float32)
    grad_loss = grad_loss.to(torch.float32)
    if reduction == "mean":
        grad_loss = grad_loss / (num_samples * rows)
    row_grads = grad_loss.expand(num_samples, rows).contiguous()  # "none": already (m, B)
    scale_grad_rows = new_buffer((num_samples, rows), torch.float32, device)
    target = target.to(torch.int64).contiguous()

    def cosine_grad(sample, cosine):
        kernels.loss_grad(cosine, lse[sample], target, row_grads[sample], scale, label_smoothing,
                          scale_grad_rows[sample])  # fmt: skip
        return cosine

    seed_arg = _checks.kernel_seed(seed, image.device)
    with on_device(device):
        if backend != "triton" and NATIVE_LOSS_FLOW:
            *_, grads = _native_flow(
                image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target,
                seed_arg, num_samples, multiply, label_smoothing, lse, row_grads, needs,
            )  # fmt: skip
            return _gradients_or_empty(grads, image)
        grads = _backward(
            kernels, cosine_grad, image, text, image_mu, image_sigma, text_mu, text_sigma,
            seed_arg, num_samples, multiply, needs,
        )  # fmt: skip
    grads[2] = scale_grad_rows.sum().to(logit_scale.dtype) if needs[2] else None
    return _gradients_or_empty(grads, image)


# --- autograd, shared by both entry points --------------------------------------------------------


def _input_grads(needs, grads, inputs: int) -> tuple:
    """Seven gradients as autograd wants them: None where no gradient is needed, and for each of
    the op's other ``inputs``."""
    needed = [grad if need else None for grad, need in zip(grads, needs, strict=True)]
    return (*needed, *[None] * (inputs - len(DIFFERENTIABLE_INPUTS)))


def _save_logits(ctx, differentiable, seed, num_samples, multiply, backend, needs) -> None:
    ctx.save_for_backward(*differentiable, seed)
    ctx.num_samples, ctx.multiply, ctx.backend, ctx.needs = num_samples, multiply, backend, needs


def _logits_gradients(ctx, grad_logits, backward, inputs: int) -> tuple:
    grads = backward(
        grad_logits, *ctx.saved_tensors, ctx.num_samples, ctx.multiply, ctx.backend, ctx.needs
    )
    return _input_grads(ctx.needs, grads, inputs)


def _save_loss(ctx, differentiable, target, seed, lse, grads, settings, needs) -> None:
    """settings: (num_samples, multiply, reduction, label_smoothing, backend)."""
    ctx.needs = needs
    ctx.in_forward = gradients_in_forward(settings[2], needs)
    if ctx.in_forward:  # backward only scales these: nothing else is kept
        ctx.save_for_backward(*(g if need else None for g, need in zip(grads, needs, strict=True)))
    else:
        ctx.save_for_backward(*differentiable, target, lse, seed)
        ctx.settings = settings


def _loss_gradients(ctx, grad_loss, backward, inputs: int, eager: bool = False) -> tuple:
    if ctx.in_forward:
        grads = ctx.saved_tensors
        # In eager mode d loss / d loss = 1 (loss.backward()) needs no scaling; read on the host
        # for a CPU tensor only (on a GPU that read would sync; traced, it has no value).
        if not (eager and grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
            grads = [None if grad is None else (grad * grad_loss).to(grad.dtype) for grad in grads]
    else:
        grads = backward(grad_loss, *ctx.saved_tensors, *ctx.settings, ctx.needs)
    return _input_grads(ctx.needs, grads, inputs)


def _needs(tensors) -> list[bool]:
    """Which of the seven DIFFERENTIABLE_INPUTS need a gradient (grad mode on, requires_grad)."""
    enabled = torch.is_grad_enabled()
    return [enabled and tensor is not None and tensor.requires_grad for tensor in tensors]


# --- the custom ops (torch.compile's entry point) -------------------------------------------------

_LOGITS_INPUTS = 11  # the custom ops' argument counts, for autograd's None per input
_LOSS_INPUTS = 15

noisy_cosine_logits = torch.library.custom_op(
    "pini_kernels::noisy_cosine_logits", logits_forward, mutates_args=()
)
noisy_cosine_logits_backward = torch.library.custom_op(
    "pini_kernels::noisy_cosine_logits_backward", logits_backward, mutates_args=()
)
noisy_cross_entropy = torch.library.custom_op(
    "pini_kernels::noisy_cross_entropy", cross_entropy_forward, mutates_args=()
)
noisy_cross_entropy_backward = torch.library.custom_op(
    "pini_kernels::noisy_cross_entropy_backward", cross_entropy_backward, mutates_args=()
)


@noisy_cosine_logits.register_fake
def _noisy_cosine_logits_fake(
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed, num_samples,
    multiply, backend,
):  # fmt: skip
    dtype = _checks.result_dtype(image, text, image_mu, image_sigma, text_mu, text_sigma)
    return image.new_empty((num_samples, image.shape[0], text.shape[-2]), dtype=dtype)


@noisy_cosine_logits_backward.register_fake
def _noisy_cosine_logits_backward_fake(
    grad_logits, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed,
    num_samples, multiply, backend, needs,
):  # fmt: skip
    return _fake_gradients(needs, (image, text, logit_scale, image_mu, image_sigma, text_mu,
                                   text_sigma))  # fmt: skip


@noisy_cross_entropy.register_fake
def _noisy_cross_entropy_fake(
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target, seed,
    num_samples, multiply, reduction, label_smoothing, backend, needs,
):  # fmt: skip
    rows = image.shape[0]
    loss_shape = (num_samples, rows) if reduction == "none" else ()
    loss = image.new_empty(loss_shape, dtype=torch.float32)
    differentiable = (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma)
    if gradients_in_forward(reduction, needs):
        lse = image.new_empty(0, dtype=torch.float32)
        return (loss, lse, *_fake_gradients(needs, differentiable))
    lse = image.new_empty((num_samples, rows), dtype=torch.float32)
    return (loss, lse, *_fake_gradients([False] * len(needs), differentiable))


@noisy_cross_entropy_backward.register_fake
def _noisy_cross_entropy_backward_fake(
    grad_loss, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target, lse,
    seed, num_samples, multiply, reduction, label_smoothing, backend, needs,
):  # fmt: skip
    return _fake_gradients(needs, (image, text, logit_scale, image_mu, image_sigma, text_mu,
                                   text_sigma))  # fmt: skip


def _logits_setup_context(ctx, inputs, output):
    *differentiable, seed, num_samples, multiply, backend = inputs
    needs = [bool(flag) for flag in ctx.needs_input_grad[: len(DIFFERENTIABLE_INPUTS)]]
    _save_logits(ctx, differentiable, seed, num_samples, multiply, backend, needs)


noisy_cosine_logits.register_autograd(
    lambda ctx, grad: _logits_gradients(ctx, grad, noisy_cosine_logits_backward, _LOGITS_INPUTS),
    setup_context=_logits_setup_context,
)


def _loss_setup_context(ctx, inputs, output):
    *differentiable, target, seed = inputs[:9]
    ctx.mark_non_differentiable(*output[1:])
    _, lse, *grads = output
    _save_loss(ctx, differentiable, target, seed, lse, grads, inputs[9:14], inputs[14])


noisy_cross_entropy.register_autograd(
    lambda ctx, grad_loss, *_: _loss_gradients(
        ctx, grad_loss, noisy_cross_entropy_backward, _LOSS_INPUTS
    ),
    setup_context=_loss_setup_context,
)


# --- the eager entry points -----------------------------------------------------------------------


class _LogitsFunction(torch.autograd.Function):
    """The logits op in eager mode: the custom op's forward, saved tensors and backward, without
    the custom-op dispatch."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed,
                num_samples, multiply, backend):  # fmt: skip
        differentiable = (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma)
        needs = list(ctx.needs_input_grad[: len(DIFFERENTIABLE_INPUTS)])
        _save_logits(ctx, differentiable, seed, num_samples, multiply, backend, needs)
        return logits_forward(*differentiable, seed, num_samples, multiply, backend)

    @staticmethod
    @once_differentiable("noisy_cosine_logits")
    def backward(ctx, grad_logits):
        return _logits_gradients(ctx, grad_logits, logits_backward, _LOGITS_INPUTS)


class _LossFunction(torch.autograd.Function):
    """The loss op in eager mode, as ``_LogitsFunction``; returns the loss alone."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target,
                seed, num_samples, multiply, reduction, label_smoothing, backend):  # fmt: skip
        differentiable = (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma)
        settings = (num_samples, multiply, reduction, label_smoothing, backend)
        needs = list(ctx.needs_input_grad[: len(DIFFERENTIABLE_INPUTS)])
        loss, lse, grads = _cross_entropy(*differentiable, target, seed, *settings, needs)
        _save_loss(ctx, differentiable, target, seed, lse, grads, settings, needs)
        return loss

    @staticmethod
    @once_differentiable("noisy_cross_entropy")
    def backward(ctx, grad_loss):
        return _loss_gradients(ctx, grad_loss, cross_entropy_backward, _LOSS_INPUTS - 1, eager=True)


def run_logits(
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed, num_samples,
    multiply, backend,
) -> torch.Tensor:  # fmt: skip
    """The logits op on checked arguments (``logits_forward``'s), with autograd: the custom op
    under torch.compile, else the eager entry point, or the forward alone without gradients."""
    arguments = (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, seed,
                 num_samples, multiply, backend)  # fmt: skip
    if torch.compiler.is_compiling():
        return noisy_cosine_logits(*arguments)
    if any(_needs(arguments[:7])):
        return _LogitsFunction.apply(*arguments)
    return logits_forward(*arguments)


_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}  # csrc/loss_flow.cpp's Reduction


def _native_cross_entropy(
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target, seed,
    num_samples, multiply, reduction, label_smoothing,
) -> torch.Tensor:  # fmt: skip
    """The native backends' eager entry point: ``pini_native::cross_entropy``
    (csrc/loss_flow.cpp), the same flow, saved tensors and gradients as ``_LossFunction`` with
    the autograd node and the flow in C++."""
    from . import native

    _checks.check_target_values(target, text.shape[-2])
    if image.shape[-1] > native.MAX_FEATURE_DIM:
        raise ValueError(
            f"feature dimension D={image.shape[-1]} exceeds this backend's maximum "
            f"{native.MAX_FEATURE_DIM}"
        )
    seed_arg = _checks.kernel_seed(seed, image.device)
    device = image.device
    with on_device(device):
        return native._ops().cross_entropy(
            image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma,
            target.to(torch.int64).contiguous(),  # (no copy when it already is both)
            native._seed_tensor(seed_arg, device),
            # A tensor seed's + 1 runs on the device (no sync); 2^63 wraps to -2^63.
            native._seed_tensor(seed_arg + 1, device),
            num_samples, multiply, _REDUCTION_CODES[reduction], label_smoothing,
        )  # fmt: skip


def run_cross_entropy(
    image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target, seed,
    num_samples, multiply, reduction, label_smoothing, backend,
) -> torch.Tensor:  # fmt: skip
    """The loss op on checked arguments (``cross_entropy_forward``'s but ``needs``), with
    autograd: the custom op under torch.compile; else on the native backends
    ``pini_native::cross_entropy`` (flow and autograd in C++), on Triton ``_LossFunction``, or the
    forward alone when no gradient is wanted; returns the loss."""
    arguments = (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma, target,
                 seed, num_samples, multiply, reduction, label_smoothing, backend)  # fmt: skip
    if torch.compiler.is_compiling():
        return noisy_cross_entropy(*arguments, _needs(arguments[:7]))[0]
    if backend != "triton" and NATIVE_LOSS_FLOW:
        return _native_cross_entropy(*arguments[:-1])
    needs = _needs(arguments[:7])
    if any(needs):
        return _LossFunction.apply(*arguments)
    return _cross_entropy(*arguments, needs)[0]
