"""Every form a seed takes, from the public argument to a kernel launch (docs/spec.md §4).

A seed changes form on its way, each time here:

1. the public argument (``check_seed``): None, an int in [0, 2^63), or a 0-d integer tensor on
   the CPU or on the op's device;
2. the op's seed (``seed_tensor``): a 0-d int64 tensor. An int or None becomes a CPU tensor, which
   keeps the seed out of torch.compile's guards (a new seed per step does not recompile) and costs
   no device sync to read; a tensor on the op's device stays there. Autograd saves this tensor, so
   backward draws the same noise again;
3. the kernels' seed (``kernel_seed``): that tensor when it is on the op's device (the kernels
   read it there: a captured CUDA graph replays whatever value was written into it), else the int
   read on the host. The text side of the logits ops uses ``text_seed``, ``seed + 1``;
4. what a backend launches with: ``native_seed`` (a 0-d int64 tensor on the data's device, for
   the compiled ops of csrc/) or ``triton_seed_args`` (an int argument or a pointer).

The reference backend reads the seed on the host instead (``reference_seed``, ``stream_key``): it
is the definition, not a graph-safe backend. Keys are 64 bits: ``seed + 1`` may reach 2^63, which a
0-d int64 tensor holds as the negative int64 of the same bits.
"""

from __future__ import annotations

import torch

from ._checks import as_int, describe

MAX_SEED = 1 << 63  # public seeds lie in [0, MAX_SEED)
MASK64 = (1 << 64) - 1

KernelSeed = int | torch.Tensor  # what ``kernel_seed`` gives: an int or a 0-d int64 tensor


def _as_int64(key: int) -> int:
    """A 64-bit key as the int64 of the same bits (keys >= 2^63 wrap to negative values)."""
    return key - (1 << 64) if key >= (1 << 63) else key


def check_seed(seed, device: torch.device | None = None):
    """Checks a public seed: None, an int in [0, 2^63), or a 0-d integer tensor on the CPU or on
    ``device`` (the op's tensors' device; a value there is checked by the op without a sync, see
    ``kernel_seed``). Under torch.compile an int is not inspected, so that a new seed per step
    does not specialize the graph; the op checks it at run time instead."""
    if seed is None:
        return None
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an integer tensor, got dtype {seed.dtype}")
        on_allowed_device = seed.device.type == "cpu" or device is None or seed.device == device
        if seed.numel() != 1 or not on_allowed_device:
            also = "" if device is None or device.type == "cpu" else f" or a 0-d tensor on {device}"
            raise ValueError(f"a tensor seed must be a 0-d CPU tensor{also}, got {describe(seed)}")
        return seed
    if torch.compiler.is_compiling():
        return seed
    seed = as_int("seed", seed, "None or an int in [0, 2^63), or a 0-d int64 tensor")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    return seed


def seed_tensor(seed) -> torch.Tensor:
    """The op's seed, a 0-d int64 tensor, from a checked public seed; None draws one from torch's
    default CPU generator (so ``torch.manual_seed`` makes a run reproducible)."""
    if seed is None:
        return torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(()).to(torch.int64)
    return torch.scalar_tensor(seed, dtype=torch.int64)


def seed_value(seed: torch.Tensor) -> int:
    """The int of a seed tensor, range-checked (a host read: no sync for a CPU tensor)."""
    value = int(seed)
    if not 0 <= value < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^63), got {value}")
    return value


def kernel_seed(seed: torch.Tensor, device: torch.device) -> KernelSeed:
    """What a fused backend's kernels take as the seed, from the op's seed tensor.

    - a seed tensor on the op's ``device``: the tensor itself, read by the kernels (no sync; a
      captured CUDA graph reads the value written before each replay). Its sign is checked with a
      device-side assert on a GPU, a ValueError on the CPU;
    - a CPU seed tensor for a GPU op (ints and None arrive so): an int read on the host (no sync).
    """
    if seed.device != device:
        return seed_value(seed)
    if seed.device.type == "cpu":
        seed_value(seed)
    else:
        torch._assert_async(seed >= 0, "seed must be in [0, 2^63)")
    return seed


def text_seed(seed: KernelSeed) -> KernelSeed:
    """The seed of the logits ops' text noise: ``seed + 1``. A tensor's + 1 runs on its device
    (no sync); 2^63 - 1 + 1 wraps to -2^63 there, the same 64-bit key."""
    return seed + 1


def native_seed(seed: KernelSeed, device: torch.device) -> torch.Tensor:
    """The seed as the compiled ops of csrc/ take it: a 0-d int64 tensor on ``device`` (the
    data's). The CUDA kernels read it on the GPU, so a CUDA graph captured around them draws the
    noise of the value written into it before each replay; the CPU kernels read it on the host.
    ``seed`` is an int in [0, 2^64) (a uint64 key, stored as the int64 of the same bits) or a
    one-element int64 tensor: on ``device`` it is used as it is (no copy, no sync); a CPU tensor
    for a GPU is read on the host (no sync) and written there by a fill kernel, as an int is (no
    host-to-device copy, so graph capture works too)."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() == 0 and seed.dtype == torch.int64 and seed.device == device:
            return seed  # the common case first: small tensors feel every host-side check
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(
                f"seed must be an int or a one-element int64 tensor, got a {seed.dtype} tensor "
                f"of shape {tuple(seed.shape)}"
            )
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if seed.device == device:
            return seed.reshape(())
        if seed.device.type != "cpu":
            raise ValueError(
                f"seed must be a CPU tensor or on the data's device {device}, got one on "
                f"{seed.device}"
            )
        seed = int(seed)  # a CPU read: no device sync
    return torch.full((), _as_int64(seed), dtype=torch.int64, device=device)


def triton_seed_args(seed: KernelSeed) -> tuple[KernelSeed, bool]:
    """(a Triton kernel's ``seed`` argument, its ``SEED_IN_MEMORY`` flag) for a kernel seed: an
    int argument (``do_not_specialize``, so a new seed reuses the compiled kernel), or a 0-d
    int64 tensor on the launch's device, read inside the kernel."""
    return seed, isinstance(seed, torch.Tensor)


def reference_seed(seed) -> torch.Tensor:
    """The reference path's seed tensor, from a checked public seed, range-checked here (the
    fused ops check theirs in the op). The reference reads a GPU seed tensor on the host (a
    sync)."""
    tensor = seed_tensor(seed)
    if not torch.compiler.is_compiling():
        seed_value(tensor)
    return tensor


def stream_key(seed: KernelSeed) -> torch.Tensor:
    """A 0-d int64 tensor holding the 64-bit key of an int or tensor seed (keys >= 2^63, e.g.
    ``seed + 1``, wrap around): what the reference's noise op is keyed by."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(()).to(torch.int64)
    return torch.scalar_tensor(_as_int64(seed), dtype=torch.int64)


def stream_key_value(key: torch.Tensor) -> int:
    """The key of ``stream_key``'s tensor as the uint64 the stream uses (a host read)."""
    return int(key) & MASK64
