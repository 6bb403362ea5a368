"""The per-sample flow that ``noisy_cosine_logits`` (``logits.py``) and ``noisy_cross_entropy``
(``loss.py``) share.

The work is done one noise sample at a time, so nothing of size ``m*B*C``, ``m*B*D`` or ``m*C*D``
exists (beyond per-sample text features the caller passes in). For each sample the backend's row
kernels (``kernel_tables.LogitsKernels``) noise and L2-normalize the image rows (the stream of
``seed``, elements ``s*B*D + b*D + d``) and the text rows (the stream of ``seeds.text_seed``; a
side given as ``(m, N, D)``, one set of rows per sample, reads ``features[s]`` for sample ``s``)
into fp32 buffers of one sample (``Side``). A side whose rows are the same in every sample is
normalized once.

Backward (``backward``) goes through the samples again: each sample's unit rows and cosines (one
``(B, C)`` tile, with the backend's ``cosines``, the product forward used) become
``d loss / d cosine`` (the op's callback), two matrix products, then the row kernels backpropagate
through normalization and noise into fp32 accumulators (``SideGrads``), summed over samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._host import custom_op, like_input, new_buffer
from .kernel_tables import LogitsKernels, OpInputs
from .seeds import KernelSeed, text_seed

# Both ops take these seven inputs first, in this order; their backward ops return the seven
# gradients in the same order (and so does csrc/loss_flow.cpp).
DIFFERENTIABLE_INPUTS = (
    "image",
    "text",
    "logit_scale",
    "image_mu",
    "image_sigma",
    "text_mu",
    "text_sigma",
)
# The seven in the custom ops' schemas (None noise parameters: no noise on that side).
INPUTS_SCHEMA = (
    "Tensor image, Tensor text, Tensor logit_scale, "
    "Tensor? image_mu, Tensor? image_sigma, Tensor? text_mu, Tensor? text_sigma"
)


def split_inputs(arguments: tuple) -> tuple[OpInputs, tuple]:
    """An op's arguments (its schema's, after any incoming gradient) as (the seven inputs, the
    rest)."""
    count = len(DIFFERENTIABLE_INPUTS)
    return arguments[:count], arguments[count:]


@dataclass
class Side:
    """One side (image or text) of the logits: its rows, optional noise and per-sample buffers."""

    features: torch.Tensor  # (N, D), unit stride along D: the current sample's rows
    mu: torch.Tensor | None  # fp32, expanded to (N, D) (stride 0 on broadcast dims)
    sigma: torch.Tensor | None
    seed: KernelSeed
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

    def kernel_args(self, sample: int) -> tuple:
        """The leading arguments of the row kernels (``normalize``, ``normalize_backward``)."""
        offset = self.stream_offset(sample)
        return (self.features, self.mu, self.sigma, self.seed, offset, self.multiply)


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


def check_feature_dim(dim: int, max_dim: int) -> None:
    if dim > max_dim:
        raise ValueError(f"feature dimension D={dim} exceeds this backend's maximum {max_dim}")


def make_side(
    kernels: LogitsKernels, features, mu, sigma, seed: KernelSeed, multiply: bool
) -> Side:
    """features: (N, D), or (num_samples, N, D) for one set of rows per sample."""
    rows, dim = features.shape[-2:]
    check_feature_dim(dim, kernels.MAX_FEATURE_DIM)
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


def make_sides(
    kernels: LogitsKernels, inputs: OpInputs, seed: KernelSeed, multiply: bool
) -> tuple[Side, Side]:
    """The image and the text side of the seven ``inputs``."""
    image, text, _, image_mu, image_sigma, text_mu, text_sigma = inputs
    return (
        make_side(kernels, image, image_mu, image_sigma, seed, multiply),
        make_side(kernels, text, text_mu, text_sigma, text_seed(seed), multiply),
    )


def normalize_sample(kernels: LogitsKernels, sides: Sequence[Side], sample: int) -> None:
    """Noise and normalize both sides for ``sample`` (sides equal in every sample only once)."""
    for side in sides:
        side.select_sample(sample)
        if (side.changes_per_sample or sample == 0) and side.features.shape[0] > 0:
            kernels.normalize(*side.kernel_args(sample), side.unit, side.norm)


def _side_backward(
    kernels: LogitsKernels, side: Side, sample: int, unit_grad: torch.Tensor, grads: SideGrads
) -> None:
    if side.features.shape[0] > 0 and (grads.need_x or grads.need_params):
        grads = grads.for_sample(side, sample)
        kernels.normalize_backward(
            *side.kernel_args(sample),
            side.unit,
            side.norm,
            unit_grad,
            grads.x,
            grads.mu,
            grads.sigma,
        )


# d loss / d cosine of one sample: (sample, its (B, C) fp32 cosines, or a buffer to write) -> it.
CosineGrad = Callable[[int, torch.Tensor], torch.Tensor]


def backward(
    kernels: LogitsKernels,
    cosine_grad: CosineGrad,
    inputs: OpInputs,
    seed: KernelSeed,
    num_samples: int,
    multiply: bool,
    needs: Sequence[bool],
    needs_cosines: bool = True,
) -> list:
    """Per sample, recompute the unit rows and cosines, turn them into d loss / d cosine with
    ``cosine_grad(sample, cosine)``, and backpropagate through the matrix product, the
    normalization and the noise of both sides. Returns the gradients of the seven ``inputs``,
    with logit_scale's left to the caller. Without ``needs_cosines`` no cosines are computed:
    ``cosine_grad`` gets a (B, C) fp32 buffer to write into instead."""
    image, text, _, image_mu, image_sigma, text_mu, text_sigma = inputs
    sides = make_sides(kernels, inputs, seed, multiply)
    image_side, text_side = sides
    side_grads = (
        SideGrads.zeros(image_side, needs[0], needs[3] or needs[4]),
        SideGrads.zeros(text_side, needs[1], needs[5] or needs[6]),
    )
    # Sides equal in every sample: the matrix products sum their unit gradients in place (the
    # first sample's product writes the sum, the others' add to it), and they are backpropagated
    # once. The other sides' unit gradients and the cosines use one buffer each for all samples
    # (the CPU allocator gives each new large buffer fresh pages to fault in).
    batch, classes = image.shape[-2], text.shape[-2]
    summed = batch > 0 and num_samples > 0  # else the sums stay zero
    unit_grad_sums = [
        None
        if side.changes_per_sample
        else (torch.empty_like if summed else torch.zeros_like)(side.unit)
        for side in sides
    ]
    unit_grad_buffers = [
        torch.empty_like(side.unit) if side.changes_per_sample else None for side in sides
    ]
    cosine_buffer = None
    if batch > 0:
        cosine_buffer = image_side.unit.new_empty((batch, classes))
    for sample in range(num_samples):
        normalize_sample(kernels, sides, sample)
        if batch == 0:
            continue
        if needs_cosines:
            cosine = kernels.cosines(image_side.unit, text_side.unit, cosine_buffer)
        else:  # the callback fills the buffer without reading it
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


# --- what the two ops' custom ops and autograd share ---------------------------------------------


def needs_grad(tensors) -> list[bool]:
    """Which of the seven DIFFERENTIABLE_INPUTS need a gradient (grad mode on, requires_grad)."""
    enabled = torch.is_grad_enabled()
    return [enabled and tensor is not None and tensor.requires_grad for tensor in tensors]


def gradients_or_empty(grads, like: torch.Tensor) -> list[torch.Tensor]:
    """Custom ops return tensors: an empty one stands for a gradient not asked for."""
    return [like.new_empty(0) if grad is None else grad for grad in grads]


def fake_gradients(needs, tensors) -> list[torch.Tensor]:
    """What ``gradients_or_empty`` gives, for the custom ops' fakes."""
    like = tensors[0]
    return [
        torch.empty_like(tensor) if needed and tensor is not None else like.new_empty(0)
        for needed, tensor in zip(needs, tensors, strict=True)
    ]


def _backward_fake(grad_output, *arguments) -> list[torch.Tensor]:
    """Both backward custom ops' fake: the seven gradients of ``fake_gradients`` (the ``needs``
    flags come last in either op's arguments)."""
    differentiable, (*_, needs) = split_inputs(arguments)
    return fake_gradients(needs, differentiable)


def custom_ops(name: str, forward, backward, forward_schema: str, backward_schema: str) -> tuple:
    """The custom ops ``pini_kernels::<name>`` and ``::<name>_backward`` (with its fake)."""
    forward_op = custom_op(name, forward, forward_schema)
    backward_op = custom_op(f"{name}_backward", backward, backward_schema)
    backward_op.register_fake(_backward_fake)
    return forward_op, backward_op


def input_grads(needs, grads, inputs: int) -> tuple:
    """Seven gradients as autograd wants them: None where no gradient is needed, and for each of
    the op's other ``inputs``."""
    needed = [grad if need else None for grad, need in zip(grads, needs, strict=True)]
    return (*needed, *[None] * (inputs - len(DIFFERENTIABLE_INPUTS)))
