"""Argument checks shared by the public functions (docs/spec.md §7).

Every message names the argument, what was expected and what was given. The checks look at
shapes, dtypes and devices; the one that looks at values on a GPU (targets in range) does so with a
device-side assert, so no check costs a device sync. The seed's checks are in ``seeds.py``.
"""

from __future__ import annotations

import contextlib
import operator
from numbers import Real

import torch

MAX_STREAM_ELEMENTS = 1 << 63  # the noise stream's counters (docs/spec.md §3)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("add", "mul")


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def check_float_tensor(name: str, value, *, allow_float64: bool) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(value)}")
    allowed = (*FLOAT_DTYPES, torch.float64) if allow_float64 else FLOAT_DTYPES
    if value.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        hint = "" if allow_float64 else " (float64 is accepted by backend='reference' only)"
        raise TypeError(f"{name} must have dtype in ({names}){hint}, got {value.dtype}")


def as_tensor_like(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """Accept a Python number for a noise parameter, as a 0-d float32 tensor on like's device."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Real) and not isinstance(value, bool):
        # torch.full, not torch.tensor: a copy from host memory would sync the GPU.
        return torch.full((), float(value), dtype=torch.float32, device=like.device)
    raise TypeError(f"{name} must be a float tensor or a Python number, got {describe(value)}")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` with its index: None is the CPU; ``"cuda"`` without an index is the current
    CUDA device, as torch places a new tensor there. Tensors always carry an index, so a device
    compared with a tensor's must carry one too (a seed tensor on cuda:0 against ``"cuda"``)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        module = getattr(torch, device.type, None)
        available = getattr(module, "is_available", None)
        if available is not None and available():  # else the backend check says what is missing
            device = torch.device(device.type, module.current_device())
    return device


def check_same_device(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def check_mode(mode) -> bool:
    """Returns True for "mul", False for "add"."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'add' or 'mul', got {mode!r}")
    return mode == "mul"


def as_int(name: str, value, expected: str) -> int:
    """``value`` as an int (a bool is not one), else a TypeError saying what was expected."""
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            return operator.index(value)
    raise TypeError(f"{name} must be {expected}, got {describe(value)}")


def check_num_samples(num_samples, *, allow_none: bool) -> int | None:
    if num_samples is None:
        if allow_none:
            return None
        raise TypeError("num_samples must be an int >= 1, got None")
    expected = "None or an int >= 1" if allow_none else "an int >= 1"
    num_samples = as_int("num_samples", num_samples, expected)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return num_samples


def check_broadcast_to(name: str, value: torch.Tensor, shape: torch.Size, target: str) -> None:
    """``value`` must broadcast to ``shape`` without growing it (the result has ``shape``)."""
    ok = value.dim() <= len(shape) and all(
        size in (1, target_size)
        for size, target_size in zip(reversed(value.shape), reversed(shape), strict=False)
    )
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast to {target}'s shape "
            f"{tuple(shape)}"
        )


def check_total_elements(num_samples: int, numel: int) -> None:
    if num_samples * numel >= MAX_STREAM_ELEMENTS:
        raise ValueError(
            f"num_samples * x.numel() = {num_samples * numel} exceeds the noise stream's 2^63 "
            "counter range"
        )


REDUCTIONS = ("mean", "sum", "none")


def check_features(image_features, text_features, num_samples: int) -> None:
    """image_features: (B, D) shared by every sample, or (num_samples, B, D), one set per sample;
    text_features: (C, D) or (num_samples, C, D) likewise."""
    for name, features, rows in (
        ("image_features", image_features, "B"),
        ("text_features", text_features, "C"),
    ):
        check_float_tensor(name, features, allow_float64=True)
        if features.dim() not in (2, 3):
            raise ValueError(
                f"{name} must be ({rows}, D) or (num_samples, {rows}, D), got shape "
                f"{tuple(features.shape)}"
            )
        if features.dim() == 3 and features.shape[0] != num_samples:
            count, dim = features.shape[1:]
            raise ValueError(
                f"{name} with 3 dims must be (num_samples, {rows}, D) = ({num_samples}, {count}, "
                f"{dim}), got shape {tuple(features.shape)}"
            )
    if image_features.shape[-1] != text_features.shape[-1]:
        raise ValueError(
            f"image_features and text_features must have the same feature dimension D, got "
            f"{image_features.shape[-1]} and {text_features.shape[-1]}"
        )


def check_noise_pair(
    name: str, pair, features: torch.Tensor, target: str, shape: torch.Size | None = None
):
    """None, or a (mu, sigma) pair broadcastable to ``shape`` (default ``features.shape``);
    returns tensors."""
    if pair is None:
        return None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be None or a (mu, sigma) pair, got {describe(pair)}")
    shape = features.shape if shape is None else shape
    mu = as_tensor_like(f"{name}[0] (mu)", pair[0], features)
    sigma = as_tensor_like(f"{name}[1] (sigma)", pair[1], features)
    for label, tensor in ((f"{name}[0] (mu)", mu), (f"{name}[1] (sigma)", sigma)):
        check_float_tensor(label, tensor, allow_float64=True)
        check_broadcast_to(label, tensor, shape, target)
    return mu, sigma


def check_logit_scale(logit_scale, like: torch.Tensor) -> torch.Tensor:
    """A Python number or a 0-d (or one-element) float tensor; returns a 0-d tensor."""
    if isinstance(logit_scale, torch.Tensor):
        check_float_tensor("logit_scale", logit_scale, allow_float64=True)
        if logit_scale.numel() != 1:
            raise ValueError(
                f"logit_scale must be a scalar (0-d tensor), got shape {tuple(logit_scale.shape)}"
            )
        return logit_scale.reshape(())
    if isinstance(logit_scale, Real) and not isinstance(logit_scale, bool):
        return torch.full((), float(logit_scale), dtype=torch.float32, device=like.device)
    raise TypeError(f"logit_scale must be a float or a 0-d tensor, got {describe(logit_scale)}")


def check_target(target, batch: int) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor of class indices, got {describe(target)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"target must be an integer tensor of class indices (class probabilities are not "
            f"supported), got dtype {target.dtype}"
        )
    if tuple(target.shape) != (batch,):
        raise ValueError(f"target must have shape (B,) = ({batch},), got {tuple(target.shape)}")


def check_target_values(target: torch.Tensor, classes: int) -> None:
    """Class indices in [0, classes): a ValueError for CPU tensors; on a GPU a device-side assert
    (as F.cross_entropy does there), which fails the next synchronizing call with this message
    instead of reading a flag back, so the check costs no device sync."""
    if target.numel() == 0:
        return
    if target.device.type != "cpu":
        in_range = ((target >= 0) & (target < classes)).all()
        torch._assert_async(in_range, f"target must hold class indices in [0, {classes})")
        return
    low, high = (int(value) for value in torch.aminmax(target))  # one pass, host reads
    if low < 0 or high >= classes:
        raise ValueError(
            f"target must hold class indices in [0, {classes}), got values in [{low}, {high}]"
        )


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_label_smoothing(label_smoothing) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, Real):
        raise TypeError(f"label_smoothing must be a float, got {describe(label_smoothing)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing)


def result_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype torch gives ``a + b + ...`` of float tensors: 0-d tensors (and Python numbers,
    which arrive as 0-d tensors) do not raise the dtype of tensors with dimensions."""
    if len(tensors) == 3 and all(t is not None for t in tensors):  # fused_inject's common case
        x, mu, sigma = tensors
        if x.dtype == mu.dtype == sigma.dtype:
            return x.dtype
    present = [t for t in tensors if t is not None]
    dimensioned = [t.dtype for t in present if t.dim() > 0]
    dtypes = dimensioned or [t.dtype for t in present]
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype
