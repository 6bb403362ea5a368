"""Host side of the noisy cosine logits and the PiNI loss, shared by the fused backends.

The work is done one noise sample at a time, so nothing of size ``m*B*C``, ``m*B*D`` or ``m*C*D``
exists (beyond per-sample text features the caller passes in). For each sample, a backend's row
kernels noise and L2-normalize the image rows (stream of ``seed``, elements ``s*B*D + b*D + d``)
and the text rows (stream of ``seed + 1``; with ``(m, C, D)`` text features, sample ``s`` reads
``text[s]``) into fp32 buffers of one sample; then:

- logits: ``logit_scale * image_unit @ text_unit^T`` into the ``(m, B, C)`` output;
- loss: the backend's ``loss_stats`` gives each row's log-sum-exp, target logit and sum of logits
  (the Triton kernel never stores the ``(B, C)`` tile; the CPU one uses one BLAS product), and
  only the ``(m, B)`` log-sum-exp is saved for backward;
- backward: recompute the sample's unit rows and cosines (one ``(B, C)`` tile), turn them into
  ``d loss / d cosine`` (``loss_grad``), two matrix products, then the row kernels backpropagate
  through normalization and noise into fp32 accumulators.

A backend provides a ``CosineKernels`` object; its module binds the functions below to it. The
kernels see one sample's ``(N, D)`` rows at a time (``Side.features``), so per-sample text
features need nothing from them: the host points ``features`` at the sample's rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from ._checks import result_dtype
from ._layout import like_input


@dataclass
class Side:
    """One side (image or text) of the logits: its rows, optional noise and per-sample buffers."""

    features: torch.Tensor  # (N, D), unit stride along D: the current sample's rows
    mu: torch.Tensor | None  # expanded to (N, D) (stride 0 on broadcast dims)
    sigma: torch.Tensor | None
    seed: int
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


class CosineKernels(Protocol):
    max_feature_dim: int

    def new_buffer(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...

    def prepare_params(self, side_params: torch.Tensor) -> torch.Tensor: ...

    def normalize(self, side: Side, sample: int) -> None: ...

    def normalize_backward(
        self, side: Side, sample: int, grad_unit: torch.Tensor, grads: SideGrads
    ) -> None: ...

    def loss_stats(
        self, image: Side, text: Side, target: torch.Tensor, scale: torch.Tensor,
        lse: torch.Tensor, target_logit: torch.Tensor, logit_sum: torch.Tensor,
    ) -> None: ...  # fmt: skip

    def loss_grad(
        self, cosine: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
        row_grad: torch.Tensor, scale: torch.Tensor, label_smoothing: float,
        scale_grad: torch.Tensor,
    ) -> None: ...  # fmt: skip


def _make_side(kernels: CosineKernels, features, mu, sigma, seed, multiply) -> Side:
    """features: (N, D), or (num_samples, N, D) for one set of rows per sample."""
    rows, dim = features.shape[-2:]
    if dim > kernels.max_feature_dim:
        raise ValueError(
            f"feature dimension D={dim} exceeds this backend's maximum {kernels.max_feature_dim}"
        )
    if features.stride(-1) != 1:
        features = features.contiguous()
    sample_features = features if features.dim() == 3 else None
    if sample_features is not None:
        features = sample_features[0]
    if mu is not None:
        mu = kernels.prepare_params(mu).expand(rows, dim)
        sigma = kernels.prepare_params(sigma).expand(rows, dim)
    unit = kernels.new_buffer((rows, dim), torch.float32, features.device)
    norm = kernels.new_buffer((rows,), torch.float32, features.device)
    return Side(features, mu, sigma, seed, multiply, unit, norm, sample_features)


def _sides(kernels, image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply):
    return (
        _make_side(kernels, image, image_mu, image_sigma, seed, multiply),
        _make_side(kernels, text, text_mu, text_sigma, seed + 1, multiply),
    )


def _normalize_sample(kernels: CosineKernels, sides, sample: int) -> None:
    """Noise and normalize both sides for ``sample`` (sides equal in every sample only once)."""
    for side in sides:
        side.select_sample(sample)
        if (side.changes_per_sample or sample == 0) and side.features.shape[0] > 0:
            kernels.normalize(side, sample)


def cosine_logits_forward(
    kernels: CosineKernels, image, text, logit_scale, image_mu, image_sigma, text_mu,
    text_sigma, seed, num_samples, multiply,
) -> torch.Tensor:  # fmt: skip
    """image: (B, D), text: (C, D) or (num_samples, C, D), logit_scale: 0-d.
    Returns (num_samples, B, C) logits."""
    sides = _sides(kernels, image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply)
    image_side, text_side = sides
    dtype = result_dtype(image, text, image_mu, image_sigma, text_mu, text_sigma)
    out = kernels.new_buffer((num_samples, image.shape[0], text.shape[-2]), dtype, image.device)
    scale = logit_scale.to(device=image.device, dtype=torch.float32)
    for sample in range(num_samples):
        _normalize_sample(kernels, sides, sample)
        out[sample] = torch.mm(image_side.unit, text_side.unit.t()).mul_(scale)
    return out


def cosine_logits_backward(
    kernels: CosineKernels, grad_logits, image, text, logit_scale, image_mu, image_sigma,
    text_mu, text_sigma, seed, num_samples, multiply, needs,
):  # fmt: skip
    """Gradients (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma)."""
    scale = logit_scale.to(device=image.device, dtype=torch.float32)
    scale_grad = torch.zeros((), dtype=torch.float32, device=image.device) if needs[2] else None

    def cosine_grad(sample, cosine):
        grad = grad_logits[sample].to(torch.float32)
        if scale_grad is not None:
            scale_grad.add_((grad * cosine).sum())
        return grad * scale

    grads = _backward(
        kernels, cosine_grad, image, text, image_mu, image_sigma, text_mu, text_sigma, seed,
        num_samples, multiply, needs,
    )  # fmt: skip
    grads[2] = None if scale_grad is None else scale_grad.to(logit_scale.dtype)
    return grads


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


def cross_entropy_forward(
    kernels: CosineKernels, image, text, logit_scale, target, image_mu, image_sigma, text_mu,
    text_sigma, seed, num_samples, multiply, reduction, label_smoothing,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns (loss, lse): the reduced float32 loss and the (num_samples, B) log-sum-exp."""
    rows, classes = image.shape[0], text.shape[-2]
    sides = _sides(kernels, image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply)
    scale = logit_scale.to(device=image.device, dtype=torch.float32)
    # Separate buffers: only lse is saved for backward, and it should not pin the other two.
    lse, target_logit, logit_sum = (
        kernels.new_buffer((num_samples, rows), torch.float32, image.device) for _ in range(3)
    )
    target = target.to(torch.int64).contiguous()
    for sample in range(num_samples):
        _normalize_sample(kernels, sides, sample)
        if rows > 0:
            kernels.loss_stats(*sides, target, scale, lse[sample], target_logit[sample],
                               logit_sum[sample])  # fmt: skip
    row_losses = _row_losses(lse, target_logit, logit_sum, classes, label_smoothing)
    return _reduce(row_losses, reduction), lse


def cross_entropy_backward(
    kernels: CosineKernels, grad_loss, image, text, logit_scale, target, image_mu, image_sigma,
    text_mu, text_sigma, lse, seed, num_samples, multiply, reduction, label_smoothing, needs,
):  # fmt: skip
    """Gradients (image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma)."""
    rows = image.shape[0]
    device = image.device
    scale = logit_scale.to(device=device, dtype=torch.float32)
    grad_loss = grad_loss.to(torch.float32)
    if reduction == "mean":
        grad_loss = grad_loss / (num_samples * rows)
    row_grads = grad_loss.expand(num_samples, rows).contiguous()  # "none": already (m, B)
    scale_grad_rows = kernels.new_buffer((num_samples, rows), torch.float32, device)
    target = target.to(torch.int64).contiguous()

    def cosine_grad(sample, cosine):
        kernels.loss_grad(cosine, lse[sample], target, row_grads[sample], scale, label_smoothing,
                          scale_grad_rows[sample])  # fmt: skip
        return cosine

    grads = _backward(
        kernels, cosine_grad, image, text, image_mu, image_sigma, text_mu, text_sigma, seed,
        num_samples, multiply, needs,
    )  # fmt: skip
    grads[2] = scale_grad_rows.sum().to(logit_scale.dtype) if needs[2] else None
    return grads


def _backward(
    kernels, cosine_grad, image, text, image_mu, image_sigma, text_mu, text_sigma, seed,
    num_samples, multiply, needs,
) -> list:  # fmt: skip
    """Shared backward: per sample, recompute the unit rows and cosines, turn them into
    d loss / d cosine with ``cosine_grad(sample, cosine)``, and backpropagate through the matrix
    product, the normalization and the noise of both sides. Returns the seven gradients, with
    logit_scale's left to the caller."""
    sides = _sides(kernels, image, text, image_mu, image_sigma, text_mu, text_sigma, seed, multiply)
    image_side, text_side = sides
    side_grads = (
        SideGrads.zeros(image_side, needs[0], needs[3] or needs[4]),
        SideGrads.zeros(text_side, needs[1], needs[5] or needs[6]),
    )
    # Sides equal in every sample: sum their unit gradients, backpropagate once.
    unit_grad_sums = [
        None if side.changes_per_sample else torch.zeros_like(side.unit) for side in sides
    ]
    for sample in range(num_samples):
        _normalize_sample(kernels, sides, sample)
        if image.shape[0] == 0:
            continue
        cosine = cosine_grad(sample, torch.mm(image_side.unit, text_side.unit.t()))
        unit_grads = (torch.mm(cosine, text_side.unit), torch.mm(cosine.t(), image_side.unit))
        for side, grads, unit_grad, total in zip(
            sides, side_grads, unit_grads, unit_grad_sums, strict=True
        ):
            if total is None:
                _side_backward(kernels, side, sample, unit_grad, grads)
            else:
                total.add_(unit_grad)
    for side, grads, total in zip(sides, side_grads, unit_grad_sums, strict=True):
        if total is not None:
            _side_backward(kernels, side, 0, total, grads)
    image_grads, text_grads = side_grads
    return [
        _cast(image_grads.x, image),
        _cast(text_grads.x, text),
        None,
        _sum_to(image_grads.mu, image_mu, needs[3]),
        _sum_to(image_grads.sigma, image_sigma, needs[4]),
        _sum_to(text_grads.mu, text_mu, needs[5]),
        _sum_to(text_grads.sigma, text_sigma, needs[6]),
    ]


def _side_backward(kernels, side: Side, sample: int, unit_grad, grads: SideGrads) -> None:
    if side.features.shape[0] > 0 and (grads.need_x or grads.need_params):
        kernels.normalize_backward(side, sample, unit_grad, grads.for_sample(side, sample))


def _cast(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return like_input(grad, like)


def _sum_to(grad: torch.Tensor | None, param: torch.Tensor | None, needed: bool):
    if not needed or grad is None or param is None:
        return None
    return like_input(grad.sum_to_size(param.shape), param)
