"""Argument checks shared by the public functions (SPEC.md, "Errors").

Every message names the argument, what was expected and what was given. The checks look only at
shapes, dtypes and devices, never at values, so they cost no device sync.
"""

from __future__ import annotations

import operator
from numbers import Real

import torch

MAX_SEED = 1 << 63
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
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    raise TypeError(f"{name} must be a float tensor or a Python number, got {describe(value)}")


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


def check_num_samples(num_samples, *, allow_none: bool) -> int | None:
    if num_samples is None:
        if allow_none:
            return None
        raise TypeError("num_samples must be an int >= 1, got None")
    expected = "None or an int >= 1" if allow_none else "an int >= 1"
    if isinstance(num_samples, bool):
        raise TypeError(f"num_samples must be {expected}, got {describe(num_samples)}")
    try:
        num_samples = operator.index(num_samples)
    except TypeError:
        raise TypeError(f"num_samples must be {expected}, got {describe(num_samples)}") from None
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return num_samples


def check_seed(seed) -> int | None:
    """Returns the seed as an int, or None when one should be drawn."""
    if seed is None:
        return None
    if isinstance(seed, bool):
        raise TypeError(f"seed must be None or an int in [0, 2^63), got {describe(seed)}")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be None or an int in [0, 2^63), got {describe(seed)}") from None
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    return seed


def seed_tensor(seed: int | None) -> torch.Tensor:
    """The seed as a 0-d int64 CPU tensor; None draws one from torch's default CPU generator.

    A CPU tensor (not an int) keeps the seed out of torch.compile's guards, so a new seed per step
    does not recompile, and reading it back in the op costs no device sync.
    """
    if seed is None:
        return torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64)
    return torch.tensor(seed, dtype=torch.int64)


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
    if num_samples * numel >= MAX_SEED:
        raise ValueError(
            f"num_samples * x.numel() = {num_samples * numel} exceeds the noise stream's 2^63 "
            "counter range"
        )
