"""Run checkpoints: what a run has learned (every state-dict entry outside the frozen CLIP), the
optimizer and where the run is, with the run record; written atomically, read back checked.

The format is ``CHECKPOINT_FORMAT``; ``read_checkpoint`` also reads the previous one
(``pini-run-checkpoint/2``, whose keys were "generators" and "pini_config") and gives it the
current keys.
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .files import replace_atomically

CHECKPOINT = "checkpoint.pt"


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: every entry of the model's state dict outside the frozen CLIP (PiNI's
    generators, CoOp's context, an adapter; parameters and buffers, e.g. BatchNorm statistics),
    on the CPU."""
    return {
        name: value.detach().cpu()
        for name, value in model.state_dict().items()
        if not name.startswith("clip.")
    }


# Written into every checkpoint; a file without it is not one of ours.
CHECKPOINT_FORMAT = "pini-run-checkpoint/3"
# The previous format: the same content under the keys "generators" and "pini_config".
PREVIOUS_FORMAT = "pini-run-checkpoint/2"
PREVIOUS_KEYS = {"generators": "trained_state", "pini_config": "model_config"}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer,
    epoch: int,
    config,
    run: dict | None = None,
) -> None:
    """The trained state, the optimizer, where we are and what the run is (``run``: the
    resolved options of the command that started it; its "method", "pini" if absent, is also
    stored as the checkpoint's "method"); written atomically."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "method": (run or {}).get("method", "pini"),
        "epoch": epoch,
        "trained_state": trained_state(model),
        "optimizer": optimizer.state_dict(),
        "train_config": dataclasses.asdict(config),
        "model_config": dataclasses.asdict(model.config),
        "run": run or {},
    }
    _save_atomically(path, state)


def save_fitted_checkpoint(
    path: Path, method: str, fitted_state: dict, method_config: dict, run: dict
) -> None:
    """The checkpoint of a method that is fitted or built rather than trained (zero-shot CLIP,
    the linear probe, Tip-Adapter): the same format as ``save_checkpoint``'s, its "method",
    ``fitted_state`` (the method's ``state_dict()``, empty for zero-shot CLIP) where a trained
    run has its trained state, epoch 0 and no optimizer; written atomically."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "method": method,
        "epoch": 0,
        "trained_state": fitted_state,
        "optimizer": {},
        "train_config": {},
        "model_config": method_config,
        "run": run,
    }
    _save_atomically(path, state)


def update_checkpoint_state(path: Path, model: nn.Module) -> None:
    """Replaces the trained state in the checkpoint at ``path`` by ``model``'s (e.g. what a
    search after training changed: Tip-Adapter-F's alpha and beta); the rest is kept."""
    state = read_checkpoint(path)
    state["trained_state"] = trained_state(model)
    _save_atomically(path, state)


def _save_atomically(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda temporary: torch.save(state, temporary))


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``save_checkpoint``, checked; ``InputError`` (one line naming the
    file and what it holds instead) for anything else: a missing, truncated, empty or foreign
    file, or CLIP weights."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file (expected RUN/{CHECKPOINT})")
    if path.stat().st_size == 0:
        raise InputError(f"checkpoint {path} is empty (0 bytes): the run was never saved")
    try:
        with warnings.catch_warnings():  # a foreign file is reported below, in one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps every failure of a weights-only load in this error: only a global that is
        # not a tensor type (a class, a function: a payload) says "Unsupported global".
        if "unsupported global" not in str(error).lower():
            raise InputError(
                f"checkpoint {path} cannot be read (UnpicklingError): it is truncated, corrupt or "
                f"not a file torch.save wrote; expected RUN/{CHECKPOINT}"
            ) from None
        raise InputError(
            f"checkpoint {path} holds pickled objects beyond tensors (code, possibly), which pini "
            f"never loads: it is not the {CHECKPOINT} that `pini train` writes"
        ) from None
    except Exception as error:  # torch raises many types for a corrupt archive
        raise InputError(
            f"checkpoint {path} cannot be read ({type(error).__name__}): it is truncated, "
            f"corrupt or not a file torch.save wrote; expected RUN/{CHECKPOINT}"
        ) from None
    if isinstance(state, dict) and state.get("format") == PREVIOUS_FORMAT:
        state = {PREVIOUS_KEYS.get(key, key): value for key, value in state.items()}
        state["format"] = CHECKPOINT_FORMAT
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        for key, kind in (("epoch", int), ("trained_state", dict), ("model_config", dict)):
            if not isinstance(state.get(key), kind):
                raise InputError(f"checkpoint {path} is damaged: {key!r} is missing or malformed")
        return state
    looks_like_weights = isinstance(state, dict) and any(
        isinstance(key, str) and key.split(".")[0] in _CLIP_KEYS for key in state
    )
    what = "CLIP weights (give those to --pretrained)" if looks_like_weights else "something else"
    raise InputError(
        f"checkpoint {path} is not a pini run checkpoint: it holds {what}; "
        f"expected the {CHECKPOINT} that `pini train` writes into its run folder"
    )


_CLIP_KEYS = {"visual", "transformer", "token_embedding", "positional_embedding", "logit_scale"}


def load_checkpoint(checkpoint: str | Path | dict, model: nn.Module, optimizer=None) -> int:
    """Restores the trained state (and the optimizer) from a checkpoint (a path, or what
    ``read_checkpoint`` returned); returns the checkpoint's epoch. A checkpoint of another model
    (other parameters or shapes) is an ``InputError`` naming what differs."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    expected = trained_state(model)
    stored = state["trained_state"]
    if set(expected) != set(stored):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise InputError(
            "the checkpoint's trained state does not match the model: "
            f"missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, value in expected.items():
        if stored[name].shape != value.shape:
            raise InputError(
                f"the checkpoint's {name} has shape {tuple(stored[name].shape)}, the model "
                f"expects {tuple(value.shape)} (another class list, template or model?)"
            )
    model.load_state_dict(stored, strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"])
