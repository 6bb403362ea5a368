"""Every training option on the command line and in a `--config` file (docs/spec.md §11):
`--optimizer`, `--momentum`, `--weight-decay`, `--warmup-epochs`, `--warmup-lr` and PiNI's
`--scaled-attention` are stored with the run and used by its optimizer and model, checked (one
line naming the flag), refused where they do not apply, and held to on `--resume`; a config file
gives the same options under the same names, the flags given override it; `--help` states every
default.

The runs are the tiny random model on a 3-class toy dataset (tests/test_cli.py's helpers).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, make_folder, resume, run_cli, toy_train

from pini import cli, runner, runs
from pini.checkpoint import read_checkpoint
from pini.config_file import apply_config_file
from pini.data.load import load_dataset
from pini.errors import InputError
from pini.generators import CrossAttention


@pytest.fixture
def data(tmp_path):
    make_folder(tmp_path / "data" / "toy")
    return tmp_path / "data"


def _trained(data, output, capsys, *extra) -> tuple[dict, dict, list[dict]]:
    """(run record, checkpoint, metric lines) of a 2-shot run of the tiny model."""
    status, _, err = run_cli(toy_train(data, output, "--shots", "2", *extra), capsys)
    assert status == 0, err
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((output / "run.json").read_text())
    return run, read_checkpoint(output / "checkpoint.pt"), metrics


def test_sgd_options_are_stored_and_used(data, tmp_path, capsys):
    argv = ["--momentum", "0.5", "--weight-decay", "0.001", "--epochs", "3", "--lr", "0.01"]
    argv += ["--warmup-epochs", "2", "--warmup-lr", "0.0001"]
    run, checkpoint, metrics = _trained(data, tmp_path / "run", capsys, *argv)
    want = dict(momentum=0.5, weight_decay=0.001, warmup_epochs=2, warmup_lr=0.0001)
    assert {key: run["train_config"][key] for key in want} == want
    assert run["train_config"]["optimizer"] == "sgd"
    assert checkpoint["run"]["train_config"] == run["train_config"]
    (group,) = checkpoint["optimizer"]["param_groups"]
    assert (group["momentum"], group["weight_decay"]) == (0.5, 0.001)
    assert "betas" not in group
    # Two warm-up epochs at 1e-4, then the cosine schedule's first epoch (Dassl's: counted from
    # the end of the warm-up); counted from epoch 0 it is cosine epoch 2 of 3.
    assert [row["lr"] for row in metrics] == pytest.approx([1e-4, 1e-4, 0.01])
    _, _, metrics = _trained(data, tmp_path / "start", capsys, *argv, "--cosine-from", "start")
    assert [row["lr"] for row in metrics] == pytest.approx([1e-4, 1e-4, 0.01 * 0.25])


def test_adamw_is_used_with_its_weight_decay(data, tmp_path, capsys):
    argv = ["--optimizer", "adamw", "--weight-decay", "0.02", "--warmup-epochs", "0"]
    run, checkpoint, metrics = _trained(data, tmp_path / "run", capsys, *argv)
    assert run["train_config"]["optimizer"] == "adamw"
    assert run["train_config"]["weight_decay"] == 0.02
    (group,) = checkpoint["optimizer"]["param_groups"]
    assert group["weight_decay"] == 0.02 and group["eps"] == 1e-4 and "betas" in group
    assert "momentum" not in group
    assert metrics[0]["lr"] == 0.002  # no warm-up: the cosine schedule's first epoch


def test_scaled_attention_is_stored_and_builds_scaled_generators(data, tmp_path, capsys):
    output = tmp_path / "run"
    run, _, _ = _trained(data, output, capsys, "--scaled-attention")
    assert run["pini_config"]["scaled_attention"] is True
    split = load_dataset(data, "toy")
    clip, tokenizer = runner.load_backbone(run, "cpu", False, False)
    model = runner.build_method(run, split, clip, tokenizer)
    (attention,) = [module for module in model.modules() if isinstance(module, CrossAttention)]
    assert attention.scale == 1 / math.sqrt(attention.key.out_features)
    status, _, err = run_cli(
        ["eval", "--no-progress", "--checkpoint", output / "checkpoint.pt"], capsys
    )
    assert status == 0, err


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--momentum", "1.5"], ["--momentum", "[0, 1)", "'1.5'"]),
        (["--momentum", "-0.1"], ["--momentum", "[0, 1)"]),
        (["--weight-decay", "-1"], ["--weight-decay", ">= 0"]),
        (["--weight-decay", "nan"], ["--weight-decay", ">= 0"]),
        (["--warmup-epochs", "-1"], ["--warmup-epochs", ">= 0"]),
        (["--warmup-epochs", "1.5"], ["--warmup-epochs"]),
        (["--warmup-lr", "0"], ["--warmup-lr", "positive"]),
        (["--optimizer", "adam"], ["--optimizer", "adamw"]),
        (["--optimizer", "adamw", "--momentum", "0.5"], ["--momentum", "SGD", "adamw"]),
        (["--scaled-attention", "--noise", "prompt"], ["--scaled-attention", "--visual none"]),
        (["--method", "linear-probe", "--weight-decay", "0.1"], ["--weight-decay", "not trained"]),
        (["--method", "zero-shot", "--warmup-epochs", "0"], ["--warmup-epochs", "not trained"]),
        (["--method", "coop", "--scaled-attention"], ["--scaled-attention", "PiNI's option"]),
        (["--method", "coop", "--no-scaled-attention"], ["--scaled-attention", "PiNI's option"]),
    ],
)
def test_bad_or_misplaced_training_options_are_one_line(data, tmp_path, capsys, flags, fragments):
    output = tmp_path / "run"
    assert_one_line_error(run_cli(toy_train(data, output, *flags), capsys), *fragments)
    assert not output.exists()


def test_resume_holds_to_the_new_options(data, tmp_path, capsys):
    output = tmp_path / "run"
    flags = ["--momentum", "0.5", "--optimizer", "sgd", "--warmup-lr", "0.0001"]
    _trained(data, output, capsys, *flags, "--scaled-attention")
    for changed, words in [
        (["--momentum", "0.9"], "--momentum 0.9 (the run has 0.5)"),
        (["--optimizer", "adamw"], "--optimizer adamw (the run has sgd)"),
        (["--weight-decay", "0.1"], "--weight-decay 0.1 (the run has 0.0005)"),
        (["--warmup-epochs", "0"], "--warmup-epochs 0 (the run has 1)"),
        (["--warmup-lr", "0.001"], "--warmup-lr 0.001 (the run has 0.0001)"),
        (["--no-scaled-attention"], "--no-scaled-attention (the run has True)"),
    ]:
        assert_one_line_error(run_cli(resume(data, output, *changed), capsys), words)
    same = [*flags, "--weight-decay", "0.0005", "--warmup-epochs", "1", "--scaled-attention"]
    status, _, err = run_cli(resume(data, output, *same), capsys)
    assert status == 0, err


@pytest.mark.parametrize(
    ("key", "value"), [("momentum", 1.5), ("momentum", "0.9"), ("weight_decay", -0.1)]
)
def test_a_stored_record_out_of_range_is_one_line_naming_the_key(
    data, tmp_path, capsys, key, value
):
    run, _, _ = _trained(data, tmp_path / "run", capsys)
    run["train_config"][key] = value
    with pytest.raises(InputError, match=rf"run record run.json: 'train_config': {key} must be"):
        runs.normalized_run(run, "run.json")


def test_a_sweep_leaves_momentum_to_its_sgd_runs():
    """In a sweep --momentum applies to the SGD runs (as noise flags to the pini runs);
    Tip-Adapter-F's AdamW keeps its own."""
    args = argparse.Namespace(root="data", momentum=0.5)
    split = argparse.Namespace(name="toy", classnames=["a", "b"])
    tip = runs._train_config(args, "tip-adapter-f", 2, 1, split, sweep=True)
    coop = runs._train_config(args, "coop", 2, 1, split, sweep=True)
    assert (tip["optimizer"], tip["momentum"]) == ("adamw", 0.9)
    assert (coop["optimizer"], coop["momentum"]) == ("sgd", 0.5)


# --- config files -----------------------------------------------------------------------------

TOML = """
shots = 2
momentum = 0.5
weight-decay = 0.001
warmup_lr = 0.0001
optimizer = "sgd"
scaled-attention = true
noise = "feature"
"""
YAML = """
shots: 2
momentum: 0.5
weight-decay: 0.001
warmup_lr: 0.0001
optimizer: sgd
scaled-attention: true
noise: feature
"""


@pytest.mark.parametrize(("name", "text"), [("options.toml", TOML), ("options.yaml", YAML)])
def test_a_config_file_gives_the_options_and_flags_override_it(data, tmp_path, capsys, name, text):
    config = tmp_path / name
    config.write_text(text)
    output = tmp_path / "run"
    argv = toy_train(data, output, "--config", config, "--momentum", "0.7", "--no-scaled-attention")
    status, _, err = run_cli(argv, capsys)
    assert status == 0, err
    run = json.loads((output / "run.json").read_text())
    assert run["shots"] == 2 and run["noise"] == "feature"
    train_config = run["train_config"]
    assert (train_config["momentum"], train_config["weight_decay"]) == (0.7, 0.001)
    assert (train_config["warmup_lr"], train_config["optimizer"]) == (0.0001, "sgd")
    assert run["pini_config"]["scaled_attention"] is False
    (group,) = read_checkpoint(output / "checkpoint.pt")["optimizer"]["param_groups"]
    assert group["momentum"] == 0.7
    # The file's options are the run's: the same file resumes it, another value is refused.
    again = resume(data, output, "--config", config, "--momentum", "0.7", "--no-scaled-attention")
    status, _, err = run_cli(again, capsys)
    assert status == 0, err
    assert_one_line_error(
        run_cli(resume(data, output, "--config", config), capsys),
        "--momentum 0.5 (the run has 0.7)",
    )


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        ("a.toml", "momentum = 2\n", ["a.toml", "momentum", "[0, 1)"]),
        ("a.toml", "weight_decay = 'much'\n", ["a.toml", "weight_decay", ">= 0"]),
        ("a.toml", "optimizer = 'adam'\n", ["a.toml", "optimizer", "adamw"]),
        ("a.toml", "scaled-attention = 1\n", ["a.toml", "scaled-attention", "true or false"]),
        ("a.toml", "epochs = [1, 2]\n", ["a.toml", "epochs", "a single value"]),
        ("a.toml", "momentm = 0.5\n", ["a.toml", "unknown option 'momentm'"]),
        ("a.toml", "resume = true\n", ["a.toml", "resume", "command-line flag only"]),
        ("a.toml", "momentum = \n", ["a.toml", "not valid TOML"]),
        ("a.yaml", "- 1\n- 2\n", ["a.yaml", "a table of options"]),
        ("a.json", "{}", ["a.json", ".toml, .yaml or .yml"]),
        ("missing.toml", None, ["missing.toml", "cannot be read"]),
    ],
)
def test_bad_config_files_are_one_line(data, tmp_path, capsys, name, text, fragments):
    config = tmp_path / name
    if text is not None:
        config.write_text(text)
    output = tmp_path / "run"
    assert_one_line_error(run_cli(toy_train(data, output, "--config", config), capsys), *fragments)
    assert not output.exists()


def test_yaml_without_pyyaml_says_to_install_it_or_use_toml(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    config = tmp_path / "options.yaml"
    config.write_text(YAML)
    result = run_cli(toy_train(data, tmp_path / "run", "--config", config), capsys)
    assert_one_line_error(result, "options.yaml", "pip install pyyaml", "TOML")


# --- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_help_states_every_default(command):
    """Every option that takes a value says its default in --help (switches are off)."""
    command_parser = cli._parser()._subparsers._group_actions[0].choices[command]
    missing = [
        action.option_strings[0]
        for action in command_parser._actions
        if action.option_strings and action.nargs != 0 and "default" not in (action.help or "")
    ]
    assert not missing, f"--help of pini {command} does not state the default of {missing}"
    names = [option for action in command_parser._actions for option in action.option_strings]
    for flag in ["--momentum", "--weight-decay", "--optimizer", "--warmup-epochs", "--warmup-lr"]:
        assert flag in names
    assert ("--scaled-attention" in names) and ("--config" in names) and ("--tensorboard" in names)


def test_the_config_file_example_of_the_docs_reads(tmp_path):
    """docs/training.md's TOML example holds options of `pini train`, each a valid value."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    config = tmp_path / "pets.toml"
    config.write_text(textwrap.dedent(example))
    parser = cli._parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    apply_config_file(train_parser, str(config), "train")
    args = parser.parse_args(["train", "--seed", "2"])
    assert (args.dataset, args.shots, args.seed, args.weight_decay) == ("oxford_pets", 16, 2, 1e-4)
