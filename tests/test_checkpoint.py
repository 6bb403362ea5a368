"""Run checkpoints: today's keys, and the previous format read as today's."""

import dataclasses

import pytest
import torch
from torch import nn

from pini.checkpoint import (
    CHECKPOINT_FORMAT,
    PREVIOUS_FORMAT,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pini.errors import InputError
from pini.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    hidden: int = 3


class Adapter(nn.Module):
    """A trained method's shape: a frozen ``clip`` and trainable parts beside it."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.clip = nn.Linear(4, 4)
        self.adapter = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.config = AdapterConfig()


def test_a_checkpoint_holds_the_trained_state_outside_clip(tmp_path):
    model = Adapter(0)
    optimizer = torch.optim.SGD(model.adapter.parameters(), lr=0.1, momentum=0.9)
    save_checkpoint(tmp_path / "c.pt", model, optimizer, 4, TrainConfig(), {"method": "coop"})
    state = read_checkpoint(tmp_path / "c.pt")
    assert state["format"] == CHECKPOINT_FORMAT and state["method"] == "coop"
    assert state["epoch"] == 4 and state["model_config"] == {"hidden": 3}
    assert sorted(state["trained_state"]) == sorted(
        name for name in model.state_dict() if not name.startswith("clip.")
    )


def test_the_previous_format_reads_as_todays(tmp_path):
    model = Adapter(0)
    optimizer = torch.optim.SGD(model.adapter.parameters(), lr=0.1, momentum=0.9)
    save_checkpoint(tmp_path / "new.pt", model, optimizer, 2, TrainConfig(), {"method": "coop"})
    today = read_checkpoint(tmp_path / "new.pt")
    renamed = {"trained_state": "generators", "model_config": "pini_config"}
    previous = {renamed.get(key, key): value for key, value in today.items()}
    previous["format"] = PREVIOUS_FORMAT
    torch.save(previous, tmp_path / "old.pt")
    read = read_checkpoint(tmp_path / "old.pt")
    assert sorted(read) == sorted(today) and read["format"] == CHECKPOINT_FORMAT
    other = Adapter(1)
    assert load_checkpoint(read, other) == 2
    untouched = Adapter(1).state_dict()
    for name, value in model.state_dict().items():
        expected = value if name.startswith("adapter.") else untouched[name]  # clip: its own
        torch.testing.assert_close(other.state_dict()[name], expected, atol=0, rtol=0)


def test_a_damaged_checkpoint_names_the_key(tmp_path):
    model = Adapter(0)
    optimizer = torch.optim.SGD(model.adapter.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "c.pt", model, optimizer, 1, TrainConfig())
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    del state["trained_state"]
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(InputError, match="'trained_state' is missing"):
        read_checkpoint(tmp_path / "c.pt")
