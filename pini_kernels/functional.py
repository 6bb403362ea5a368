"""The public functions of docs/spec.md §2: argument checks, backend choice, then the op.

The checks that look at what arguments are (types, shapes, dtypes, devices, settings) run once per
distinct signature (``_checked``); those that look at values (the seed, the targets) run on every
call. Small tensors feel every host-side microsecond, and a training loop repeats one signature.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import _checks, inject, logits, loss, noise_stream, reference, seeds
from .backends import ENV_VAR, resolve_backend

_CHECKED: dict[tuple, tuple] = {}  # signature -> what its checks returned
_CHECKED_LIMIT = 1024  # signatures kept; the cache starts over past it


def _signature(value) -> object:
    """What the signature checks can see of an argument, hashable: a tensor's shape, dtype and
    device; a number's, string's or None's type and value; a pair's parts."""
    if isinstance(value, torch.Tensor):
        return (torch.Tensor, value.shape, value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return (type(value), *(_signature(part) for part in value))
    return (type(value), value)


def _checked(arguments: tuple, check):
    """``check()`` (the signature checks of a call, raising for bad arguments) once per distinct
    signature of ``arguments`` and backend environment; later calls reuse what it returned.
    Arguments that cannot be hashed, and torch.compile's tracing, run the checks every time."""
    if torch.compiler.is_compiling():
        return check()
    try:
        key = (
            *(_signature(argument) for argument in arguments),
            os.environ.get(ENV_VAR),
            os.environ.get("TRITON_INTERPRET"),
        )
        verdict = _CHECKED.get(key)
    except TypeError:  # unhashable: an argument the checks will reject, or a new kind of one
        return check()
    if verdict is None:
        verdict = check()
        if len(_CHECKED) >= _CHECKED_LIMIT:
            _CHECKED.clear()
        _CHECKED[key] = verdict
    return verdict


__all__ = ["fused_inject", "noise", "noisy_cosine_logits", "noisy_cross_entropy"]


def noise(
    shape,
    *,
    seed: int | torch.Tensor | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """The ``eps`` stream of ``seed`` as a tensor of ``shape`` (row-major), N(0, 1) per element.

    seed: an int in [0, 2^63), None (drawn from torch's default CPU generator) or a 0-d int64
    tensor (on a GPU ``device`` the kernels read it there, without a sync). Element ``k`` of the
    flattened tensor is lane ``k % 4`` of Triton's ``tl.randn4x(seed, k // 4)``
    on every backend, so ``fused_inject(x, mu, sigma, num_samples=m, seed=s)`` equals
    ``x + mu + sigma * noise((m, *x.shape), seed=s)``.
    """
    try:
        shape = torch.Size((shape,) if isinstance(shape, int) else shape)
    except (TypeError, ValueError):
        raise TypeError(
            f"shape must be a sequence of ints, got {_checks.describe(shape)}"
        ) from None
    if any(size < 0 for size in shape):
        raise ValueError(f"shape must have non-negative sizes, got {tuple(shape)}")
    if dtype not in (*_checks.FLOAT_DTYPES, torch.float64):
        raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}")
    device = _checks.resolve_device(device)
    seed = seeds.seed_tensor(seeds.check_seed(seed, device))
    chosen = resolve_backend(backend, device)
    if chosen == "reference" or dtype == torch.float64:
        return reference.noise(shape, seed=seeds.reference_seed(seed), device=device, dtype=dtype)
    return noise_stream.noise(shape, seed, device, dtype, chosen)


def fused_inject(
    x: torch.Tensor,
    mu: torch.Tensor | float,
    sigma: torch.Tensor | float,
    *,
    mode: str = "add",
    num_samples: int | None = None,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Inject reparameterized Gaussian noise: ``x + (mu + sigma*eps)`` or ``x * (mu + sigma*eps)``.

    x: (*S) float tensor. mu, sigma: tensors (or numbers) broadcastable to S, e.g. a per-feature
    (D,), a per-row (B, D), or embeddings (L, D) shared by every leading index.
    mode: "add" or "mul". num_samples: None gives (*S); an int m gives (m, *S), m noise samples
    of the same x in one pass. seed: the noise stream's seed, an int, None (drawn from torch's
    default CPU generator) or a 0-d int64 tensor (on x's GPU the kernels read it there: a CUDA
    graph replays with whatever value was written into it; backward uses the same tensor).
    backend: see ``pini_kernels.available_backends()``.

    Differentiable in x, mu and sigma; gradients come back in their own shapes, summed over
    broadcast dimensions and samples. ``eps`` is regenerated in backward, never stored.
    """
    multiply, samples, chosen = _checked(
        (x, mu, sigma, mode, num_samples, backend),
        lambda: _check_inject(x, mu, sigma, mode, num_samples, backend),
    )
    mu = _checks.as_tensor_like("mu", mu, x)
    sigma = _checks.as_tensor_like("sigma", sigma, x)
    seed = seeds.check_seed(seed, x.device)
    if chosen == "reference":
        return reference.fused_inject(
            x, mu, sigma, seed=seeds.reference_seed(seed), num_samples=samples, multiply=multiply
        )
    settings = (samples or 1, multiply, chosen, samples is not None)
    return inject.run_inject(x, mu, sigma, seeds.seed_tensor(seed), *settings)


def _check_inject(x, mu, sigma, mode, num_samples, backend) -> tuple[bool, int | None, str]:
    """fused_inject's signature checks: (multiply, num_samples, backend)."""
    _checks.check_float_tensor("x", x, allow_float64=True)
    mu = _checks.as_tensor_like("mu", mu, x)
    sigma = _checks.as_tensor_like("sigma", sigma, x)
    _checks.check_float_tensor("mu", mu, allow_float64=True)
    _checks.check_float_tensor("sigma", sigma, allow_float64=True)
    multiply = _checks.check_mode(mode)
    samples = _checks.check_num_samples(num_samples, allow_none=True)
    _checks.check_same_device(x=x, mu=mu, sigma=sigma)
    _checks.check_broadcast_to("mu", mu, x.shape, "x")
    _checks.check_broadcast_to("sigma", sigma, x.shape, "x")
    _checks.check_total_elements(samples or 1, x.numel())
    chosen = resolve_backend(backend, x.device)
    if chosen != "reference" and torch.float64 in (x.dtype, mu.dtype, sigma.dtype):
        for name, tensor in (("x", x), ("mu", mu), ("sigma", sigma)):
            _checks.check_float_tensor(name, tensor, allow_float64=False)
    return multiply, samples, chosen


NoisePair = tuple[torch.Tensor | float, torch.Tensor | float]


class _NoiseSettings(NamedTuple):
    """How both logits ops noise their features, as given; the seed last (checked every call)."""

    image_noise: NoisePair | None
    text_noise: NoisePair | None
    mode: str
    num_samples: int
    seed: int | torch.Tensor | None


class _CheckedCall(NamedTuple):
    """What the logits ops run with after the checks: the noise pairs as tensors (or None), the
    logit scale as a tensor, the settings, the checked seed, the backend, the loss's extra."""

    image_pair: tuple[torch.Tensor, torch.Tensor] | None
    text_pair: tuple[torch.Tensor, torch.Tensor] | None
    scale: torch.Tensor
    multiply: bool
    num_samples: int
    seed: int | torch.Tensor
    backend: str
    extra: object

    def noise_tensors(self) -> tuple[torch.Tensor, ...]:
        return (*(self.image_pair or ()), *(self.text_pair or ()))

    def op_inputs(self, image_features, text_features) -> tuple:
        """The seven DIFFERENTIABLE_INPUTS of the ops (``per_sample.py``), None for no noise."""
        image_mu, image_sigma = self.image_pair or (None, None)
        text_mu, text_sigma = self.text_pair or (None, None)
        return (
            image_features,
            text_features,
            self.scale,
            image_mu,
            image_sigma,
            text_mu,
            text_sigma,
        )

    def reference_options(self) -> dict:
        """The keyword arguments both ``reference`` ops take after their tensors."""
        return {
            "image_noise": self.image_pair,
            "text_noise": self.text_pair,
            "multiply": self.multiply,
            "num_samples": self.num_samples,
            "seed": seeds.reference_seed(self.seed),
        }


def _prepare_logits_call(
    image_features,
    text_features,
    logit_scale,
    noise: _NoiseSettings,
    backend,
    extra_checks=None,
    extra_arguments=(),
) -> _CheckedCall:
    """Checks shared by the two logits ops (and ``extra_checks()``, the loss's, whose result is
    ``extra``, with ``extra_arguments`` in the signature)."""
    arguments = (image_features, text_features, logit_scale, noise[:-1], backend, *extra_arguments)

    def check():
        verdict = _check_logits_call(image_features, text_features, logit_scale, noise, backend)
        return (*verdict, extra_checks() if extra_checks is not None else None)

    multiply, samples, chosen, extra = _checked(arguments, check)
    return _CheckedCall(
        _noise_tensors("image_noise", noise.image_noise, image_features),
        _noise_tensors("text_noise", noise.text_noise, text_features),
        _checks.check_logit_scale(logit_scale, image_features),
        multiply,
        samples,
        seeds.check_seed(noise.seed, image_features.device),
        chosen,
        extra,
    )


def _noise_tensors(name, pair, like):
    """A checked (mu, sigma) pair as tensors (numbers become 0-d tensors on like's device)."""
    if pair is None:
        return None
    return (
        _checks.as_tensor_like(f"{name}[0] (mu)", pair[0], like),
        _checks.as_tensor_like(f"{name}[1] (sigma)", pair[1], like),
    )


def _check_logits_call(
    image_features, text_features, logit_scale, noise: _NoiseSettings, backend
) -> tuple[bool, int, str]:
    """The logits ops' signature checks: (multiply, num_samples, backend)."""
    image_noise, text_noise, mode, num_samples, _ = noise
    samples = _checks.check_num_samples(num_samples, allow_none=False)
    _checks.check_features(image_features, text_features, samples)
    # Noise parameters are per row, (B, D) / (C, D), shared by every sample even when the
    # features are not.
    image_pair, text_pair = (
        _checks.check_noise_pair(
            side,
            pair,
            features,
            f"{name}[s]" if features.dim() == 3 else name,
            shape=features.shape[-2:],
        )
        for side, pair, features, name in (
            ("image_noise", image_noise, image_features, "image_features"),
            ("text_noise", text_noise, text_features, "text_features"),
        )
    )
    scale = _checks.check_logit_scale(logit_scale, image_features)
    multiply = _checks.check_mode(mode)
    named = {"image_features": image_features, "text_features": text_features, "logit_scale": scale}
    for side, pair in (("image_noise", image_pair), ("text_noise", text_pair)):
        if pair is not None:
            named[f"{side}[0] (mu)"], named[f"{side}[1] (sigma)"] = pair
    _checks.check_same_device(**named)
    rows = max(image_features.shape[-2], text_features.shape[-2]) * image_features.shape[-1]
    _checks.check_total_elements(samples, rows)
    chosen = resolve_backend(backend, image_features.device)
    if chosen != "reference":
        for name, tensor in named.items():
            _checks.check_float_tensor(name, tensor, allow_float64=False)
    return multiply, samples, chosen


def noisy_cosine_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    image_noise: NoisePair | None = None,
    text_noise: NoisePair | None = None,
    mode: str = "add",
    num_samples: int = 1,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """CLIP's logits between noisy features: ``logit_scale * <z/|z|, t/|t|>`` per noise sample.

    image_features: (B, D), shared by every sample, or (num_samples, B, D), sample ``s`` using
    ``image_features[s]`` (e.g. features of noisy images); text_features: (C, D) or
    (num_samples, C, D) likewise (e.g. text features of per-sample prompt noise). One call covers
    every sample: Eq. (13)'s m samples need no loop. image_noise / text_noise: None (no noise on
    that side) or a (mu, sigma) pair broadcastable to (B, D) / (C, D), shared by the samples; the
    image noise is drawn from the stream of ``seed`` over (num_samples, B, D), the text noise from
    ``seed + 1`` over (num_samples, C, D). logit_scale: the already-exponentiated scale, a float
    or 0-d tensor. Returns (num_samples, B, C) in the inputs' promoted dtype. Differentiable in
    every tensor; gradients come back in the shapes given (a per-sample side gets a per-sample
    gradient, a shared one the sum over samples).
    """
    noise = _NoiseSettings(image_noise, text_noise, mode, num_samples, seed)
    call = _prepare_logits_call(image_features, text_features, logit_scale, noise, backend)
    if call.backend == "reference":
        out_dtype = _checks.result_dtype(image_features, text_features, *call.noise_tensors())
        features = (image_features, text_features, call.scale)
        return reference.noisy_cosine_logits(
            *features, **call.reference_options(), out_dtype=out_dtype
        )
    settings = (seeds.seed_tensor(call.seed), call.num_samples, call.multiply, call.backend)
    return logits.run_logits(*call.op_inputs(image_features, text_features), *settings)


def noisy_cross_entropy(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    target: torch.Tensor,
    *,
    image_noise: NoisePair | None = None,
    text_noise: NoisePair | None = None,
    mode: str = "add",
    num_samples: int = 1,
    seed: int | torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """PiNI's loss, Eq. (13): cross-entropy over the noisy cosine logits, for every noise sample.

    Equals ``F.cross_entropy`` of ``noisy_cosine_logits(...)`` (same arguments and seed, so
    each side's features may be shared (2-d) or per sample (3-d) here too) with the
    (num_samples, B, C) logits flattened to rows and ``target`` (B,) repeated per sample:
    "mean" averages over samples and batch, "sum" sums, "none" gives (num_samples, B). The fused
    backends never store the logits or ``eps``: a "mean" or "sum" loss computes its gradients in
    forward and keeps only those (input-sized); a "none" loss keeps one log-sum-exp per row and
    backward recomputes the rest from the seed. Returns float32 (float64 for float64 inputs on
    ``backend="reference"``).

    Targets outside [0, C) raise ValueError for CPU tensors; on a GPU they fail a device-side
    assert (as ``F.cross_entropy`` does there), so the check never syncs.
    """

    def check_loss_arguments() -> float:
        _checks.check_target(target, image_features.shape[-2])
        _checks.check_same_device(image_features=image_features, target=target)
        _checks.check_reduction(reduction)
        return _checks.check_label_smoothing(label_smoothing)

    noise = _NoiseSettings(image_noise, text_noise, mode, num_samples, seed)
    call = _prepare_logits_call(
        *(image_features, text_features, logit_scale, noise, backend),
        *(check_loss_arguments, (target, reduction, label_smoothing)),
    )
    smoothing = call.extra
    if call.backend == "reference":
        _checks.check_target_values(target, text_features.shape[-2])
        features = (image_features, text_features, call.scale, target)
        options = {"reduction": reduction, "label_smoothing": smoothing}
        return reference.noisy_cross_entropy(*features, **call.reference_options(), **options)
    settings = (call.num_samples, call.multiply, reduction, smoothing, call.backend)
    inputs = call.op_inputs(image_features, text_features)
    return loss.run_cross_entropy(*inputs, target, seeds.seed_tensor(call.seed), *settings)
