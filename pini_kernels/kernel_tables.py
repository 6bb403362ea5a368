"""The kernel table of each op: what a fused backend must provide, and where each backend's is.

Each op module (``noise_stream.py``, ``inject.py``, ``logits.py``, ``loss.py``) owns its op's
contract and calls a backend only through the table below; a backend runs kernels. Every fused
backend has the same functions, taking the same arguments:

- ``"triton"``: ``triton/noise_stream.py``, ``triton/inject.py``, ``triton/logits_loss.py``;
- ``"cpu"`` and ``"cuda"``: ``native.py`` (one module for both: the dispatcher runs the compiled
  kernels of the tensors' device), which also has ``LossFlowKernels`` and
  ``InjectAutogradKernels``, the whole flows as single C++ ops.

``reference.py`` (pure PyTorch) is not a table: it is the definition the tables are tested against.
Seeds reach every function as a ``KernelSeed`` (``seeds.kernel_seed``): an int, or a 0-d int64
tensor on the data's device that the kernels read there.

The long signatures below are written a few arguments to a line (``# fmt: skip``): one argument
per line would spell each backward's forward arguments out again, a screen per kernel.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import NamedTuple, Protocol, cast

import torch

from .seeds import KernelSeed

Tensor = torch.Tensor
# The seven differentiable inputs of the logits ops, in this order (``per_sample.py``'s
# DIFFERENTIABLE_INPUTS): image, text, logit_scale, image_mu, image_sigma, text_mu, text_sigma.
OpInputs = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]


class LossSettings(NamedTuple):
    """The loss's settings after its inputs, target and seed."""

    num_samples: int
    multiply: bool
    reduction: str
    label_smoothing: float


class FlowSettings(NamedTuple):
    """What ``LossFlowKernels.cross_entropy_flow`` runs with besides its inputs: forward's lse
    (None in forward), the rows' loss weights (None: no gradient) and the gradients needed."""

    num_samples: int
    multiply: bool
    label_smoothing: float
    lse: Tensor | None
    row_grads: Tensor | None
    needs: list[bool]


class NoiseKernels(Protocol):
    def noise_forward(
        self, numel: int, seed: KernelSeed, device: torch.device, dtype: torch.dtype, start: int = 0
    ) -> Tensor:
        """Stream elements ``start .. start + numel - 1`` of ``seed`` (docs/spec.md §3) as a flat
        tensor of ``dtype``. ``start`` exists for tests of the counters past 2^32."""


class InjectKernels(Protocol):
    """``x`` and ``grad_out`` come contiguous and viewed as ``rows x width``; ``mu`` and
    ``sigma`` flat and contiguous (the ``width // inner`` parameters, any float dtype); the
    parameter of flat element ``i`` is ``(i % width) // inner`` (``inject.BroadcastLayout``)."""

    def inject_forward(
        self, x: Tensor, mu: Tensor, sigma: Tensor, seed: KernelSeed, num_samples: int,
        multiply: bool, rows: int, width: int, inner: int, out: Tensor,
    ) -> None:  # fmt: skip
        """Writes ``out`` (num_samples, *x.shape): x (+ or *) (mu + sigma * eps[s])."""

    def inject_backward(
        self, grad_out: Tensor, x: Tensor, mu: Tensor, sigma: Tensor, seed: KernelSeed,
        num_samples: int, multiply: bool, rows: int, width: int, inner: int,
        grad_x: Tensor | None, need_param_grad: bool,
    ) -> tuple[Tensor, Tensor] | None:  # fmt: skip
        """Writes ``grad_x`` (x's shape and dtype) unless it is None; returns the
        (row_chunks, width) fp32 partial sums of mu's and sigma's gradients, one row per chunk of
        rows, when ``need_param_grad``. In add mode ``x`` may be autograd's one-element stand-in
        (``inject._save_for_backward``): it must not be read."""


class LogitsKernels(Protocol):
    """The row kernels and the product of the per-sample flow (``per_sample.py``). They see one
    sample's ``(N, D)`` rows at a time, so per-sample text features need nothing from them."""

    MAX_FEATURE_DIM: int  # the widest rows the row kernels take

    def normalize(
        self, features: Tensor, mu: Tensor | None, sigma: Tensor | None, seed: KernelSeed,
        stream_offset: int, multiply: bool, unit: Tensor, norm: Tensor,
    ) -> None:  # fmt: skip
        """Writes ``unit`` (N, D) fp32, the noisy rows normalized as F.normalize does, and
        ``norm`` (N,) fp32, their norms. features: (N, D), unit stride along D; mu, sigma: None
        (no noise) or fp32 views expanded to (N, D); the noise of element (r, d) is stream
        element ``stream_offset + r * D + d`` of ``seed``."""

    def normalize_backward(
        self, features: Tensor, mu: Tensor | None, sigma: Tensor | None, seed: KernelSeed,
        stream_offset: int, multiply: bool, unit: Tensor, norm: Tensor, grad_unit: Tensor,
        grad_x: Tensor | None, grad_mu: Tensor | None, grad_sigma: Tensor | None,
    ) -> None:  # fmt: skip
        """Adds this sample's gradients into the fp32 (N, D) accumulators ``grad_x``, ``grad_mu``
        and ``grad_sigma`` (None: not needed), given ``grad_unit``, the gradient of ``unit``."""

    def cosines(self, image_unit: Tensor, text_unit: Tensor, out: Tensor | None = None) -> Tensor:
        """(B, C) fp32 ``image_unit @ text_unit^T`` of (B, D) and (C, D) fp32 unit rows, into
        ``out`` when given: the product ``loss_stats`` takes its logits from, so that forward and
        backward agree to the last bit."""


class LossKernels(LogitsKernels, Protocol):
    """The loss's kernels on one sample. target: (B,) int64; scale: 0-d fp32; the (B,) fp32 row
    statistics are the log-sum-exp, the target's logit and the sum of the logits."""

    def loss_stats(
        self,
        image_unit: Tensor,
        text_unit: Tensor,
        target: Tensor,
        scale: Tensor,
        lse: Tensor,
        target_logit: Tensor,
        logit_sum: Tensor,
    ) -> None:
        """Writes the row statistics of the logits ``scale * cosines(image_unit, text_unit)``
        without storing the (B, C) logits."""

    def loss_grad(
        self,
        cosine: Tensor,
        lse: Tensor,
        target: Tensor,
        row_grad: Tensor,
        scale: Tensor,
        label_smoothing: float,
        scale_grad: Tensor,
    ) -> None:
        """In place: the (B, C) fp32 ``cosine`` becomes d loss / d cosine for the rows' loss
        weights ``row_grad`` (B,); ``scale_grad`` (B,) gets each row's d loss / d scale."""

    def loss_stats_grad(
        self,
        cosine: Tensor,
        target: Tensor,
        row_grad: Tensor,
        scale: Tensor,
        label_smoothing: float,
        lse: Tensor,
        target_logit: Tensor,
        logit_sum: Tensor,
        scale_grad: Tensor,
    ) -> None:
        """``loss_stats`` of the logits ``scale * cosine``, then ``loss_grad`` with that
        log-sum-exp: the loss's forward with its gradients (``loss.gradients_in_forward``)."""


class LossFlowKernels(Protocol):
    """The loss's whole per-sample flow as one op (csrc/loss_flow.cpp: the ``LossKernels``, call
    for call, without a Python frame per kernel). ``seed`` is a kernel seed."""

    def cross_entropy_flow(
        self, inputs: OpInputs, target: Tensor, seed: KernelSeed, settings: FlowSettings
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None]]:
        """(lse, target_logit, logit_sum, the seven gradients in their inputs' shapes or None
        where ``settings.needs`` does not ask for them): ``loss.cross_entropy_forward``'s flow,
        or ``loss.cross_entropy_backward``'s when given forward's ``lse``."""

    def cross_entropy_autograd(
        self, inputs: OpInputs, target: Tensor, seed: KernelSeed, settings: LossSettings
    ) -> Tensor:
        """The loss with its autograd node in C++: the flow, saved tensors and gradients of
        ``loss.LossFunction``."""


class InjectAutogradKernels(Protocol):
    def inject_autograd(
        self, x: Tensor, mu: Tensor, sigma: Tensor, seed: KernelSeed, num_samples: int,
        multiply: bool, rows: int, width: int, inner: int, dtype: torch.dtype, sample_dim: bool,
    ) -> Tensor:  # fmt: skip
        """``fused_inject`` with its autograd node in C++ (csrc/autograd.cpp), for contiguous x,
        mu and sigma of one shape (``inject._native_fast_path``): (num_samples, *x.shape), or
        x.shape without ``sample_dim``; the parameters' gradients in their own shape."""


# Each backend's module of each op's table, imported on first use (Triton is Linux-only).
_TRITON_MODULES = {"noise": "noise_stream", "inject": "inject", "loss": "logits_loss"}
NATIVE_BACKENDS = ("cpu", "cuda")


@functools.cache  # an import statement per call costs host time, which small tensors feel
def _table(backend: str, op: str) -> ModuleType:
    if backend == "triton":
        return importlib.import_module(f"{__package__}.triton.{_TRITON_MODULES[op]}")
    if backend in NATIVE_BACKENDS:
        return importlib.import_module(f"{__package__}.native")
    raise ValueError(f"backend {backend!r} has no kernels; expected 'triton', 'cpu' or 'cuda'")


def noise_kernels(backend: str) -> NoiseKernels:
    return cast(NoiseKernels, _table(backend, "noise"))


def inject_kernels(backend: str) -> InjectKernels:
    return cast(InjectKernels, _table(backend, "inject"))


def loss_kernels(backend: str) -> LossKernels:
    """The logits op's table too: ``LossKernels`` holds ``LogitsKernels``."""
    return cast(LossKernels, _table(backend, "loss"))


def loss_flow_kernels(backend: str) -> LossFlowKernels | None:
    """The native backends' one-op flow, None on Triton (whose flow runs in Python)."""
    if backend not in NATIVE_BACKENDS:
        return None
    return cast(LossFlowKernels, _table(backend, "loss"))


def inject_autograd_kernels(backend: str) -> InjectAutogradKernels | None:
    if backend not in NATIVE_BACKENDS:
        return None
    return cast(InjectAutogradKernels, _table(backend, "inject"))
