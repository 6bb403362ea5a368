"""The `pini` command line as a user meets it: wrong flags, files and folders give one line on
stderr and exit status 2; a run never trains on data or a config other than what was asked for.

Tiny ImageFolder trees are built with PIL in tmp_path; the backbone is the random `pini-tiny`.
Most cases call `cli.main` in-process (what the console script runs); a few run the real
`pini` entry point in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import pini
import pini.demo
from pini import cli, run_folders, runner, runs, sweep
from pini.data.few_shot import few_shot
from pini.data.load import load_dataset
from pini.errors import InputError

CLASSES = ["bird", "cat", "dog"]
TINY = ["--model", "pini-tiny", "--no-progress", "--batch-size", "4", "--epochs", "1"]


def make_folder(root, classes=CLASSES, per_class=3, splits=("train", "test"), size=8):
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                color = (70 * label % 256, 50 * i % 256, 200 - 60 * label % 200)
                Image.new("RGB", (size, size), color).save(folder / f"{i}.png")
    return root


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `pini ARGV`, in this process."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(result, *fragments):
    status, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("pini")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def data(tmp_path):
    make_folder(tmp_path / "data" / "toy")
    return tmp_path / "data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run (lr 0.002, batch 4, 2 shots, 1 epoch, seed 1) on its own data folder;
    tests copy it before changing anything."""
    import shutil

    base = tmp_path_factory.mktemp("trained")
    data = make_folder(base / "data" / "toy").parent
    output = base / "run"
    status = cli.main(
        [str(a) for a in ["train", *TINY, "--root", data, "--dataset", "toy", "--shots", "2"]]
        + ["--lr", "0.002", "--output", str(output)]
    )
    assert status == 0

    def copy(tmp_path):
        shutil.copytree(base, tmp_path / "copy")
        return tmp_path / "copy" / "data", tmp_path / "copy" / "run"

    return copy


def toy_train(root, output, *extra) -> list:
    """`pini train` of the tiny model on the dataset "toy" under ``root`` into ``output``."""
    return ["train", *TINY, "--root", root, "--dataset", "toy", "--output", output, *extra]


def resume(root, output, *extra) -> list:
    """`pini train --resume` of the run in ``output`` on the dataset "toy" under ``root``."""
    return [
        "train",
        "--no-progress",
        "--root",
        root,
        "--dataset",
        "toy",
        "--output",
        output,
        "--resume",
        *extra,
    ]


def train_run(data, output, capsys, *extra):
    result = run_cli(
        [
            "train",
            *TINY,
            "--root",
            data,
            "--dataset",
            "toy",
            "--shots",
            "2",
            "--output",
            output,
            *list(extra),
        ],
        capsys,
    )
    assert result[0] == 0, result[2]
    return json.loads((output / "summary.json").read_text())


# --- help and flags ---------------------------------------------------------------------------


def test_help_prints_for_every_command(capsys):
    for command in ([], ["sweep"]):  # the real entry point
        completed = subprocess.run(
            [sys.executable, "-m", "pini", *command, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr
        assert "usage: pini" in completed.stdout and not completed.stderr.strip()
        assert "95% interval" in " ".join(completed.stdout.split())  # argparse's % format
    for command in (["train"], ["eval"]):
        status, out, err = run_cli([*command, "--help"], capsys)
        assert status == 0 and f"usage: pini {command[0]}" in out and not err


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["train", "--epochs", "0"], ["--epochs", "positive integer", "'0'"]),
        (["train", "--lr", "0"], ["--lr", "positive number", "'0'"]),
        (["train", "--lr", "nan"], ["--lr", "positive number"]),
        (["train", "--shots", "0"], ["--shots", "positive integer"]),
        (["train", "--batch-size", "-4"], ["--batch-size", "positive integer"]),
        (["train", "--seed", str(1 << 64)], ["--seed", "[0, 2^62)"]),
        (["train", "--num-samples", "0"], ["--num-samples", "positive integer"]),
        (["sweep", "--shot-list", "2", "0"], ["--shot-list", "'0'"]),
        (["sweep", "--seeds", "1", "-1"], ["--seeds", "'-1'"]),
        (["train", "--dataset", "oxford_pets"], ["--dataset oxford_pets needs --root"]),
        (["train", "--root", "no/such/folder"], ["--root no/such/folder", "no such folder"]),
        (["train", "--resume", "--overwrite"], ["not allowed with"]),
        (["eval"], ["--checkpoint"]),
    ],
)
def test_bad_flags_are_one_line_errors(argv, fragments, capsys):
    assert_one_line_error(run_cli(argv, capsys), *fragments)


def test_flag_errors_from_the_real_entry_point():
    """The console script: status 2, one line on stderr, no traceback."""
    completed = subprocess.run(
        [sys.executable, "-m", "pini", "train", "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "pini train: error: argument --epochs: expected a positive integer, got '0' "
        "(see pini train --help)"
    ]


def test_model_without_weights_and_unknown_weights_are_refused(data, capsys, tmp_path):
    base = ["train", "--root", data, "--dataset", "toy", "--output", tmp_path / "run"]
    assert_one_line_error(
        run_cli([*base, "--model", "ViT-B-16"], capsys), "--pretrained is needed for ViT-B-16"
    )
    assert_one_line_error(
        run_cli([*base, "--model", "pini-tiny", "--pretrained", "no-such-tag"], capsys),
        "--pretrained no-such-tag is neither a file nor a pretrained tag of pini-tiny",
    )
    assert_one_line_error(
        run_cli([*base, "--model", "pini-tiny", "--pretrained", "missing.pt"], capsys),
        "--pretrained missing.pt: no such weights file",
    )
    assert_one_line_error(
        run_cli([*base, "--model", "ViT-X-99", "--pretrained", "openai"], capsys),
        "unknown open_clip model 'ViT-X-99'",
    )
    assert not (tmp_path / "run").exists()


def test_invalid_config_combination_is_one_line(data, capsys, tmp_path):
    result = run_cli(
        toy_train(data, tmp_path / "r", "--visual", "feature", "--visual-generator", "cnn"),
        capsys,
    )
    assert_one_line_error(result, "visual_generator", "'cnn'")


# --- run folders and resume -------------------------------------------------------------------


def test_a_used_run_folder_is_refused_and_overwrite_replaces_it(data, tmp_path, capsys):
    output = tmp_path / "run"
    train_run(data, output, capsys)
    metrics_before = (output / "metrics.jsonl").read_text()
    result = run_cli(
        ["train", *TINY, "--root", data, "--dataset", "toy", "--output", output], capsys
    )
    assert_one_line_error(result, f"run folder {output} is not empty", "--resume", "--overwrite")
    assert (output / "metrics.jsonl").read_text() == metrics_before  # nothing appended
    summary = train_run(data, output, capsys, "--overwrite", "--seed", "2")
    assert summary["seed"] == 2
    assert len((output / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (output / "split-2shot-seed1.json").exists()  # the old run's files are gone


def argv_overwrite(data, output):
    return ["train", *TINY, "--root", data, "--dataset", "toy", "--output", output, "--overwrite"]


def test_an_unusable_output_folder_is_refused_before_any_work(data, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    argv = ["train", *TINY, "--root", data, "--dataset", "toy"]
    result = run_cli([*argv, "--output", tmp_path / "a-file"], capsys)
    assert_one_line_error(result, "is a file, not a folder")
    result = run_cli([*argv, "--output", tmp_path / "a-file" / "run"], capsys)
    assert_one_line_error(result, "cannot be created", "a-file is not writable")


def test_a_folder_with_foreign_files_is_refused(data, tmp_path, capsys):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("my notes")
    result = run_cli(
        ["train", *TINY, "--root", data, "--dataset", "toy", "--output", output], capsys
    )
    assert_one_line_error(result, "is not empty")
    result = run_cli([*argv_overwrite(data, output)], capsys)
    assert_one_line_error(result, "--overwrite replaces a run", "notes.txt")
    assert (output / "notes.txt").read_text() == "my notes"


RESUME_CHANGES = [
    (["--mode", "mul"], "--mode mul (the run has add)"),
    (["--noise", "feature"], "--noise feature (text) none (the run has prompt)"),
    (["--lr", "0.5"], "--lr 0.5 (the run has 0.002)"),
    (["--batch-size", "8"], "--batch-size 8 (the run has 4)"),
    (["--shots", "3"], "--shots 3 (the run has 2)"),
    (["--epochs", "2"], "--epochs 2 (the run has 1)"),
    (["--seed", "5"], "--seed 5 (the run has 1)"),
    (["--num-samples", "2"], "--num-samples 2 (the run has 1)"),
    (["--template", "a drawing of a"], "--template a drawing of a (the run has None)"),
]


def test_resume_refuses_a_changed_flag(trained, tmp_path, capsys):
    data, output = trained(tmp_path)
    checkpoint = (output / "checkpoint.pt").read_bytes()
    for flag, fragment in RESUME_CHANGES:
        result = run_cli(
            resume(data, output, *flag),
            capsys,
        )
        assert_one_line_error(result, "--resume continues the run", fragment, "another --output")
    assert (output / "checkpoint.pt").read_bytes() == checkpoint


def test_resume_refuses_other_data(trained, tmp_path, capsys):
    make_folder(tmp_path / "other" / "toy", classes=["ant", "bee", "cow"])
    _, output = trained(tmp_path)
    result = run_cli(
        resume(tmp_path / "other", output),
        capsys,
    )
    assert_one_line_error(result, "--root", str(tmp_path / "other"), "(the run has")


def test_resume_refuses_a_changed_image_listing(data, tmp_path, capsys):
    """Images added after the split was drawn: the cached split no longer describes the data."""
    output = tmp_path / "run"
    train_run(data, output, capsys, "--epochs", "3")
    lines = (output / "metrics.jsonl").read_text().splitlines()
    (output / "metrics.jsonl").write_text(lines[0] + "\n")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(data / "toy" / "train" / "cat" / "new.png")
    result = run_cli(
        resume(data, output),
        capsys,
    )
    assert_one_line_error(result, "split-2shot-seed1.json", "image listing")


def test_resume_continues_with_the_stored_options_and_drops_extra_metric_lines(
    data, tmp_path, capsys
):
    output = tmp_path / "run"
    train_run(data, output, capsys, "--mode", "mul", "--lr", "0.01")
    metrics = output / "metrics.jsonl"
    first = metrics.read_text().splitlines()
    # A kill between the metrics append and the checkpoint write: an epoch too many, torn.
    metrics.write_text("\n".join(first) + '\n{"epoch": 2, "loss": 1.0}\n{"epo')
    status, _out, err = run_cli(
        resume(data, output),
        capsys,
    )
    assert status == 0, err
    assert metrics.read_text().splitlines() == first
    run = json.loads((output / "run.json").read_text())
    assert run["pini_config"]["mode"] == "mul" and run["train_config"]["lr"] == 0.01


def test_split_cache_is_checked_against_what_it_was_drawn_from(tmp_path):
    samples = [(f"/data/{c}/{i}.png", c) for c in range(3) for i in range(4)]
    cache = tmp_path / "split.json"
    source = {"dataset": "toy", "root": "/data"}
    chosen = few_shot(samples, 2, 1, cache=cache, source=source)
    assert few_shot(samples, 2, 1, cache=cache, source=source) == chosen
    with pytest.raises(InputError, match=r"seed 1 -> 2"):
        few_shot(samples, 2, 2, cache=cache, source=source)
    with pytest.raises(InputError, match=r"shots 2 -> 3"):
        few_shot(samples, 3, 1, cache=cache, source=source)
    with pytest.raises(InputError, match=r"dataset .*'/data'.*'/elsewhere'"):
        few_shot(samples, 2, 1, cache=cache, source={**source, "root": "/elsewhere"})
    with pytest.raises(InputError, match="image listing"):
        few_shot([*samples, ("/data/0/9.png", 0)], 2, 1, cache=cache, source=source)
    relabelled = [(path, (label + 1) % 3) for path, label in samples]
    with pytest.raises(InputError, match="image listing"):
        few_shot(relabelled, 2, 1, cache=cache, source=source)
    cache.write_text('{"indices": [0, 1]}')  # an old cache without a record
    with pytest.raises(InputError, match="not one this version wrote"):
        few_shot(samples, 2, 1, cache=cache, source=source)


# --- checkpoints and eval ---------------------------------------------------------------------


def test_bad_checkpoints_are_one_line_errors(trained, tmp_path, capsys):
    data, output = trained(tmp_path)
    real = (output / "checkpoint.pt").read_bytes()
    cases = {
        "empty.pt": (b"", "is empty (0 bytes)"),
        "truncated.pt": (real[: len(real) // 2], "cannot be read"),
        "random.pt": (os.urandom(4096), "cannot be read"),
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_bytes(content)
        result = run_cli(["eval", "--checkpoint", tmp_path / name], capsys)
        assert_one_line_error(result, f"checkpoint {tmp_path / name}", fragment)
    clip, _ = pini.build_clip("pini-tiny")
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    result = run_cli(["eval", "--checkpoint", tmp_path / "clip.pt"], capsys)
    assert_one_line_error(result, "not a pini run checkpoint", "CLIP weights", "--pretrained")
    result = run_cli(["eval", "--checkpoint", tmp_path / "missing.pt"], capsys)
    assert_one_line_error(result, "missing.pt: no such file")
    # A damaged checkpoint is found before any work when resuming.
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "checkpoint.pt").write_bytes(b"junk")
    result = run_cli(
        toy_train(data, tmp_path / "y", "--resume"),
        capsys,
    )
    assert_one_line_error(result, "cannot be read")


def test_eval_rebuilds_the_trained_model_and_repeats_its_accuracy(data, tmp_path, capsys):
    """pini-tiny is random: eval must seed its backbone as training did."""
    output = tmp_path / "run"
    summary = train_run(data, output, capsys, "--seed", "7", "--lr", "0.5")
    status, out, err = run_cli(
        ["eval", "--no-progress", "--checkpoint", output / "checkpoint.pt"], capsys
    )
    assert status == 0, err
    assert f"accuracy {summary['accuracy']:.2f}%" in out
    assert f"macro-F1 {summary['macro_f1']:.2f}%" in out


def test_eval_refuses_contradicting_model_flags(trained, tmp_path, capsys):
    _, output = trained(tmp_path)
    checkpoint = output / "checkpoint.pt"
    for flags, fragment in [
        (["--mode", "mul"], "--mode mul (the run has add)"),
        (["--noise", "image"], "--noise image"),
        (["--template", "a drawing of a"], "--template a drawing of a"),
        (["--model", "ViT-B-16"], "--model ViT-B-16 (the run has pini-tiny)"),
    ]:
        result = run_cli(["eval", "--checkpoint", checkpoint, *flags], capsys)
        assert_one_line_error(result, "eval builds the model stored in", fragment)


def test_eval_replaces_the_test_time_noise_of_a_pini_run(trained, tmp_path, capsys, monkeypatch):
    """``pini eval --inference mean|sample|average`` scores a PiNI run with another test-time
    noise, without retraining; the accuracy is that of the model's own top-1 predictions."""
    from pini import predict

    data, output = trained(tmp_path)
    checkpoint = output / "checkpoint.pt"
    test = load_dataset(data, "toy").test
    classnames = load_dataset(data, "toy").classnames
    import pini.runner

    evaluated = []
    evaluate = pini.runner.evaluate
    monkeypatch.setattr(
        pini.runner,
        "evaluate",
        lambda model, *a, **k: evaluated.append(model) or evaluate(model, *a, **k),
    )
    for flags in (["--inference", "mean"], ["--inference", "average", "--inference-samples", "3"]):
        status, out, err = run_cli(
            ["eval", "--no-progress", "--checkpoint", checkpoint, *flags], capsys
        )
        assert status == 0, err
        options = dict(zip(("inference", "inference_samples"), flags[1::2], strict=False))
        options = {
            key: int(value) if key.endswith("samples") else value for key, value in options.items()
        }
        config = evaluated[-1].config
        assert (config.inference, config.inference_samples) == (
            options["inference"],
            options.get("inference_samples", 8),
        )
        model, names, transform = predict.load_run(checkpoint, **options)
        rows = predict.predict(model, [path for path, _ in test], transform, 1, classnames=names)
        right = sum(
            row["top_k"][0]["class"] == classnames[label]
            for row, (_, label) in zip(rows, test, strict=True)
        )
        assert f"accuracy {100 * right / len(test):.2f}%" in out, (flags, out)
    zero_shot = tmp_path / "zero-shot"
    argv = ["train", "--model", "pini-tiny", "--no-progress", "--root", data, "--dataset", "toy"]
    assert run_cli([*argv, "--method", "zero-shot", "--output", zero_shot], capsys)[0] == 0
    result = run_cli(
        ["eval", "--checkpoint", zero_shot / "checkpoint.pt", "--inference", "mean"], capsys
    )
    assert_one_line_error(result, "--inference set PiNI's test-time noise", "zero-shot")


def test_eval_on_other_data_and_its_limits(trained, tmp_path, capsys):
    other = make_folder(tmp_path / "more" / "pets", classes=["ant", "bee", "cow", "eel"])
    data, output = trained(tmp_path)
    status, out, err = run_cli(
        [
            "eval",
            "--no-progress",
            "--checkpoint",
            output / "checkpoint.pt",
            "--root",
            other.parent,
            "--dataset",
            "pets",
        ],
        capsys,
    )
    assert status == 0, err
    assert out.startswith("pets: accuracy") and "on 12 images" in out
    per_class = tmp_path / "per-class"
    train_run(data, per_class, capsys, "--text", "feature", "--text-generator", "embedding")
    result = run_cli(
        [
            "eval",
            "--checkpoint",
            per_class / "checkpoint.pt",
            "--root",
            other.parent,
            "--dataset",
            "pets",
        ],
        capsys,
    )
    assert_one_line_error(result, "learned noise per class", "other classes")


# --- data that would give meaningless numbers -------------------------------------------------


def test_no_test_images_is_an_error(tmp_path, capsys):
    make_folder(tmp_path / "d" / "toy", splits=("train",))
    (tmp_path / "d" / "toy" / "test").mkdir()
    result = run_cli(
        ["train", *TINY, "--root", tmp_path / "d", "--dataset", "toy", "--output", tmp_path / "r"],
        capsys,
    )
    assert_one_line_error(result, "toy", "test images")


def test_every_training_image_unreadable_is_an_error(tmp_path, capsys):
    root = make_folder(tmp_path / "d" / "toy", splits=("test",))
    for name in CLASSES:
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"{i}.png").write_bytes(b"not an image")
    argv = ["train", *TINY, "--root", tmp_path / "d", "--dataset", "toy", "--shots", "2"]
    argv += ["--no-drop-last"]  # every one of the 6 images read in the epoch
    result = run_cli([*argv, "--output", tmp_path / "r"], capsys)
    assert_one_line_error(result, "no training image could be read", "6 skipped")


def test_an_oversized_image_is_skipped_and_counted(data, tmp_path, capsys, monkeypatch):
    """PIL's DecompressionBombError (not an OSError) is skipped like any decode failure."""
    Image.new("RGB", (64, 64), (9, 9, 9)).save(data / "toy" / "test" / "cat" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 > 2x: an error, 8x8 is fine
    summary = train_run(data, tmp_path / "run", capsys)
    assert summary["skipped_images"] == 1 and summary["test_images"] == 9


def test_dataset_file_errors_reach_the_user_as_one_line(tmp_path, capsys):
    dataset = tmp_path / "d" / "oxford_pets"
    (dataset / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(dataset / "images" / "a.jpg")
    entries = [["a.jpg", 0, "abyssinian"], ["a.jpg", 2, "beagle"]]
    split_file = dataset / "split_zhou_OxfordPets.json"
    split_file.write_text(json.dumps({"train": entries, "val": entries, "test": entries}))
    argv = ["train", *TINY, "--root", tmp_path / "d", "--dataset", "oxford_pets"]
    argv += ["--output", tmp_path / "run"]
    assert_one_line_error(run_cli(argv, capsys), str(split_file), "labels skip 1")
    split_file.write_text("")
    assert_one_line_error(run_cli(argv, capsys), str(split_file), "is empty")
    assert not (tmp_path / "run").exists()


# --- naming and repeatability -----------------------------------------------------------------


def test_root_dot_names_the_run_after_the_folder(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(data / "toy")
    status, _, err = run_cli(["train", *TINY, "--root", ".", "--shots", "1"], capsys)
    assert status == 0, err
    assert (data / "toy" / "runs" / "toy-feature+prompt-1shot-seed1" / "summary.json").is_file()


def test_model_initialisation_does_not_depend_on_the_global_rng(data, capsys):
    """The demo's cached or fresh backbone consumes the RNG differently: the generators must
    not see it."""
    split = load_dataset(data, "toy")
    run = runs._new_run(cli._parser().parse_args(["train", "--model", "pini-tiny"]), 2, 3, split)

    def build():
        return runner.build_method(run, split, *runner.load_backbone(run, "cpu", False, False))

    torch.manual_seed(0)
    first = build()
    torch.rand(1000)
    second = build()
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


LOAD_BY_TAG = """
import sys, torch, open_clip, pini
# A pretrained tag of pini-tiny whose weights live on the hub, as open_clip registers its own.
open_clip.pretrained._PRETRAINED["pini-tiny"] = {"testtag": {"hf_hub": "pini-test/pini-tiny/"}}
expected = torch.load(sys.argv[1], weights_only=True)
for pretrained in ("testtag", "hf-hub:pini-test/pini-tiny"):
    clip, _ = pini.build_clip("pini-tiny", pretrained)
    for name, value in clip.state_dict().items():
        assert torch.equal(value, expected[name]), (pretrained, name)
# The repository's open_clip_config.json gives the weights' preprocessing.
clip, _ = pini.build_clip("pini-tiny", "hf-hub:pini-test/pini-tiny")
preprocessing = pini.backbone.preprocessing_of(clip)
print("PREPROCESSING", preprocessing.mean, preprocessing.std, preprocessing.resize_mode)
try:
    pini.build_clip("pini-tiny", "hf-hub:pini-test/not-cached")
except pini.errors.InputError as error:
    print("ERROR", error)
"""


def test_pretrained_tag_and_hf_hub_name_load_offline_from_the_cache(tmp_path):
    """What open_clip users type (a pretrained tag, hf-hub:org/name) loads from a Hugging Face
    cache laid out as the hub does, with HF_HUB_OFFLINE=1; an uncached name is a clear error."""
    torch.manual_seed(3)
    clip, _ = pini.build_clip("pini-tiny")
    torch.save(clip.state_dict(), tmp_path / "expected.pt")
    repository = tmp_path / "hub" / "models--pini-test--pini-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repository / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.save(clip.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    preprocess = {"mean": [0.5] * 3, "std": [0.25] * 3, "resize_mode": "squash"}
    (snapshot / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": preprocess}))
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_BY_TAG, str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "PREPROCESSING (0.5, 0.5, 0.5) (0.25, 0.25, 0.25) squash" in completed.stdout
    assert (
        "ERROR --pretrained hf-hub:pini-test/not-cached: no open_clip weights" in completed.stdout
    )


def test_sweep_interval_is_students_t():
    """Three seeds: t(0.975, 2) = 4.303, not the normal's 1.96."""
    mean, interval = sweep.mean_and_interval([50.0, 52.0, 57.0])
    spread = (((50 - 53) ** 2 + (52 - 53) ** 2 + (57 - 53) ** 2) / 2) ** 0.5
    assert mean == 53.0
    assert interval == pytest.approx(4.302652729911275 * spread / 3**0.5, rel=1e-9)
    assert sweep.mean_and_interval([50.0]) == (50.0, 0.0)


def test_sweep_checks_every_run_before_the_first_and_reports_the_interval(data, tmp_path, capsys):
    output = tmp_path / "sweep"
    (output / "toy" / "pini" / "2shot-seed2").mkdir(parents=True)
    (output / "toy" / "pini" / "2shot-seed2" / "notes.txt").write_text("not a run")
    argv = ["sweep", *TINY, "--root", data, "--dataset", "toy", "--output", output]
    argv += ["--methods", "pini"]
    result = run_cli([*argv, "--shot-list", "1", "2", "--seeds", "1", "2"], capsys)
    assert_one_line_error(result, "2shot-seed2 is not empty")
    assert not (output / "toy" / "pini" / "1shot-seed1").exists()  # nothing ran
    status, out, err = run_cli([*argv, "--shot-list", "1", "--seeds", "1", "2"], capsys)
    assert status == 0, err
    assert "95% interval over seeds 1, 2 (Student's t" in out and "| PiNI |" in out


@pytest.mark.slow
def test_torchrun_starts_on_a_fresh_run_folder_every_time(data, tmp_path):
    """`torchrun --nproc-per-node 2 -m pini train` into a new --output, ten times in a row: every
    rank checks the folder is empty before rank 0 writes run.json into it. Without that barrier
    a slower rank found run.json and exited 2 ("run folder ... is not empty") in about half of
    the starts."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(1, 11):
        output = tmp_path / f"run-{attempt}"
        argv = toy_train(data, output, "--shots", "1", "--device", "cpu")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "pini",
            *(str(a) for a in argv),
        ]
        completed = subprocess.run(
            command, capture_output=True, text=True, env=environment, timeout=600
        )
        assert completed.returncode == 0, f"start {attempt}: {completed.stderr[-3000:]}"
        summary = json.loads((output / "summary.json").read_text())
        assert summary["shots"] == 1 and "toy, 1 shot, seed 1" in completed.stdout


def test_a_diverged_run_stops_keeps_its_last_finite_checkpoint_and_is_marked_failed(
    data, tmp_path, capsys
):
    """--lr 1e25: the warm-up epoch trains at 1e-5, the next one diverges. One line, exit
    status 3, no accuracy printed; metrics.jsonl holds only finite epochs; checkpoint.pt is
    epoch 1's, finite; summary.json says failed and why."""
    from pini.checkpoint import read_checkpoint

    output = tmp_path / "run"
    status, out, err = run_cli(toy_train(data, output, "--epochs", "4", "--lr", "1e25"), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 3 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("pini train: error: training diverged at epoch 2, step ")
    assert f"{output / 'checkpoint.pt'} keeps epoch 1" in lines[0]
    assert "zero-shot CLIP" not in out and "%" not in out
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1] and all(
        isinstance(m["loss"], float) and m["loss"] == m["loss"] for m in metrics
    )
    checkpoint = read_checkpoint(output / "checkpoint.pt")
    assert checkpoint["epoch"] == 0  # epoch 1, counted from 0
    for name, value in checkpoint["trained_state"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_epoch"] == 2
    assert "accuracy" not in summary and "diverged" in summary["failure"]


def toy_pini_sweep(data, output, shots, *extra) -> list:
    """``pini sweep`` of PiNI on the toy data set, ``shots`` shots, seed 1."""
    argv = ["sweep", *TINY, "--root", data, "--dataset", "toy", "--output", output]
    return [*argv, "--methods", "pini", "--shot-list", shots, "--seeds", "1", *extra]


def test_a_sweep_reports_a_diverged_run_as_failed_not_as_a_number(data, tmp_path, capsys):
    output = tmp_path / "sweep"
    argv = toy_pini_sweep(data, output, "2", "--epochs", "4", "--lr", "1e25")
    status, out, err = run_cli(argv, capsys)
    assert status == 3, err
    assert "FAILED: training diverged at epoch " in out
    assert "## Failed runs" in out and "| PiNI | – |" in out
    report = json.loads((output / "sweep.json").read_text())
    (run,) = report["runs"]
    assert run["status"] == "failed" and run["accuracy"] is None
    assert report["accuracy"]["pini"]["datasets"]["toy"] == {}
    # Run again: the failed run is reported as failed, not rerun and not counted.
    status, out, _ = run_cli(argv, capsys)
    assert status == 3 and "FAILED" in out and "(done before)" in out


def test_weights_are_checked_by_hash_and_trusted_is_never_stored(
    data, tmp_path, capsys, monkeypatch
):
    """A run stores its weights file's SHA-256 and checks it on every load: a file replaced
    after training is refused by `pini eval` and `--resume` (it silently changed the results).
    --trusted (weights_only=False: code in the file runs) applies to the command that says it:
    it is not stored, so a later `pini eval` without it loads with weights_only=True."""
    import hashlib

    from pini.backbone import build_clip

    clip, _ = build_clip("pini-tiny")
    weights = tmp_path / "weights.pt"
    torch.save(clip.state_dict(), weights)
    output = tmp_path / "run"
    argv = toy_train(data, output, "--pretrained", weights, "--shots", "1", "--trusted")
    status, _, err = run_cli(argv, capsys)
    assert status == 0, err
    run = json.loads((output / "run.json").read_text())
    assert "trusted" not in run
    assert run["pretrained_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    trusted = []
    monkeypatch.setattr(
        runner, "build_clip", lambda *a, **k: trusted.append(k["trusted"]) or build_clip(*a, **k)
    )
    evaluation = ["eval", "--checkpoint", output / "checkpoint.pt", "--no-progress"]
    status, _, err = run_cli(evaluation, capsys)
    assert status == 0 and trusted == [False], err
    torch.manual_seed(5)
    torch.save(build_clip("pini-tiny")[0].state_dict(), weights)  # other weights, same path
    for argv in (evaluation, resume(data, output)):
        assert_one_line_error(
            run_cli(argv, capsys), f"the weights file {weights.resolve()} has SHA-256", "replaced"
        )


def test_a_run_follows_its_weights_file_when_it_moves(data, tmp_path, capsys):
    """A run does not depend on where its weights file lies: `pini eval`, `pini predict` and
    `--resume` take --pretrained at the new place when the file has the run's SHA-256, give
    the same results, and refuse other weights in one line."""
    from pini.backbone import build_clip

    weights = tmp_path / "weights.pt"
    torch.save(build_clip("pini-tiny")[0].state_dict(), weights)
    output = tmp_path / "run"
    assert run_cli(toy_train(data, output, "--pretrained", weights, "--shots", "1"), capsys)[0] == 0
    checkpoint = output / "checkpoint.pt"
    evaluation = ["eval", "--checkpoint", checkpoint, "--no-progress"]
    before = run_cli(evaluation, capsys)[1]
    moved = tmp_path / "elsewhere" / "same.pt"
    moved.parent.mkdir()
    weights.rename(moved)
    assert_one_line_error(run_cli(evaluation, capsys), "is gone")
    status, after, err = run_cli([*evaluation, "--pretrained", moved], capsys)
    assert status == 0 and after == before, err
    image = tmp_path / "one.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)
    predict = ["predict", "--checkpoint", checkpoint, image, "--output", tmp_path / "p"]
    assert run_cli([*predict, "--pretrained", moved, "--no-progress"], capsys)[0] == 0
    status, _, err = run_cli(resume(data, output, "--pretrained", moved), capsys)
    assert status == 0, err
    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    torch.save(build_clip("pini-tiny")[0].state_dict(), other)
    assert_one_line_error(run_cli([*evaluation, "--pretrained", other], capsys), "--pretrained")
    assert_one_line_error(
        run_cli([*predict, "--pretrained", other], capsys), "not the weights file"
    )


def test_a_second_process_on_a_run_or_sweep_folder_gets_one_line_naming_the_holder(
    data, tmp_path, capsys
):
    """Two processes writing one run folder interleaved their metrics (18 lines for 10 epochs).
    The writing process holds an exclusive lock on the folder for the whole run (a sweep: on its
    folder too); another gets one line with the holder's pid, and nothing is written."""
    import multiprocessing

    output = tmp_path / "run"
    assert run_cli(toy_train(data, output, "--shots", "1"), capsys)[0] == 0
    metrics = (output / "metrics.jsonl").read_text()
    held = multiprocessing.get_context("spawn").Event()
    done = multiprocessing.get_context("spawn").Event()
    holder = multiprocessing.get_context("spawn").Process(
        target=_hold_lock, args=(str(output), held, done)
    )
    holder.start()
    try:
        assert held.wait(60)
        assert_one_line_error(
            run_cli(resume(data, output, "--epochs", "1"), capsys),
            f"{output} is in use by another pini process (pid {holder.pid})",
        )
        assert (output / "metrics.jsonl").read_text() == metrics
    finally:
        done.set()
        holder.join(60)
    sweep = tmp_path / "sweep"
    # this process holds the sweep's folder; another sweep there is refused
    run_folders.lock_folder(sweep)
    try:
        argv = toy_pini_sweep(data, sweep, "1")
        other = subprocess.run(
            [sys.executable, "-m", "pini", *map(str, argv)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert other.returncode == 2 and f"(pid {os.getpid()})" in other.stderr, other.stderr
        assert not (sweep / "toy").exists()
    finally:
        run_folders.unlock_folder(sweep)


def _hold_lock(folder, held, done):
    run_folders.lock_folder(folder)
    held.set()
    done.wait(120)


@pytest.mark.parametrize(("given", "minutes"), [([], 15.0), (["--timeout", "0.5"], 0.5)])
def test_timeout_bounds_how_long_ranks_wait_for_each_other(
    data, tmp_path, monkeypatch, capsys, given, minutes
):
    """Under torchrun the process group waits --timeout minutes (15 by default, not gloo's 30)
    in a collective before a rank that died or hangs stops the run."""
    import datetime

    import torch.distributed as dist

    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.append(timeout))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)  # a rank other than 0: then stopped here
    monkeypatch.setattr(cli, "train_command", lambda args: 0)
    assert run_cli(toy_train(data, tmp_path / "run", *given), capsys)[0] == 0
    assert seen == [datetime.timedelta(minutes=minutes)]
    assert_one_line_error(
        run_cli(toy_train(data, tmp_path / "run", "--timeout", "0"), capsys), "--timeout"
    )


def _fail_checkpoint_save(monkeypatch, error, on_call=2):
    """The on_call-th checkpoint write raises ``error`` (epoch on_call's, for a trained run)."""
    import pini.train

    calls = []
    save = pini.train.torch.save

    def failing_save(state, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == on_call and str(target).endswith("checkpoint.pt.tmp"):
            Path(target).write_bytes(b"half")  # a torn write, then the failure
            raise error
        return save(state, target, *args, **kwargs)

    monkeypatch.setattr(pini.train.torch, "save", failing_save)


@pytest.mark.parametrize(
    ("error", "exit_status", "words"),
    [
        (OSError(28, "No space left on device"), 1, "No space left on device (ENOSPC)"),
        (OSError(30, "Read-only file system"), 1, "Read-only file system (EROFS)"),
        (KeyboardInterrupt(), 130, "interrupted; every finished epoch is saved"),
    ],
)
def test_a_failed_write_or_ctrl_c_is_one_line_and_the_run_continues(
    data, tmp_path, capsys, monkeypatch, error, exit_status, words
):
    """Disk full, a read-only folder or Ctrl-C while epoch 2's checkpoint is written: one line
    and its exit status, no traceback; checkpoint.pt is still epoch 1's, no temporary file is
    left, and --resume finishes the run."""
    from pini.checkpoint import read_checkpoint

    output = tmp_path / "run"
    if isinstance(error, OSError):
        error.filename = str(output / "checkpoint.pt.tmp")
    _fail_checkpoint_save(monkeypatch, error)
    status, _, err = run_cli(toy_train(data, output, "--epochs", "3", "--shots", "1"), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == exit_status and len(lines) == 1 and "Traceback" not in err, err
    assert words in lines[0]
    assert read_checkpoint(output / "checkpoint.pt")["epoch"] == 0
    assert not list(output.glob("*.tmp"))
    monkeypatch.undo()
    status, out, err = run_cli(resume(data, output), capsys)
    assert status == 0 and "toy, 1 shot, seed 1" in out, err
    assert read_checkpoint(output / "checkpoint.pt")["epoch"] == 2


@pytest.mark.parametrize("leftover", ["run.json.tmp", "checkpoint.pt.tmp", "summary.json.tmp"])
def test_temporary_files_of_a_failed_write_do_not_block_the_folder(
    data, tmp_path, capsys, leftover
):
    """A failed write at the start (disk full) left run.json.tmp, which pini did not count as
    its own: train, --resume and --overwrite were all refused. Its temporary files are its own:
    a folder holding only them starts a new run (and they are cleaned)."""
    output = tmp_path / "run"
    output.mkdir()
    (output / leftover).write_text("{half")
    status, _, err = run_cli(toy_train(data, output, "--shots", "1"), capsys)
    assert status == 0, err
    assert not (output / leftover).exists()


def _drop(section: str, key: str):
    def edit(run):
        del run[section][key]

    return edit


RECORD_EDITS = {
    "seed 1.5": (lambda run: run.update(seed=1.5), "'seed' must be an integer in [0, 2^62)"),
    "negative seed": (lambda run: run.update(seed=-1), "'seed' must be an integer in [0, 2^62)"),
    "seed 1e400": (lambda run: run.update(seed=float("inf")), "'seed' must be an integer"),
    "no mode": (_drop("pini_config", "mode"), "'pini_config' must be an object with every"),
    "no lr": (_drop("train_config", "lr"), "missing ['lr']"),
    "epochs 1e30": (lambda run: run["train_config"].update(epochs=1e30), "epochs must be"),
    "a model without weights": (
        lambda run: run.update(model="ViT-B-16"),
        "'pretrained' must be CLIP weights for ViT-B-16",
    ),
    "unknown model": (lambda run: run.update(model="ViT-Z-99"), "'model' must be an open_clip"),
    "no model": (lambda run: run.pop("model"), "'model' must be"),
    "shots as text": (lambda run: run.update(shots="2"), "'shots' must be an integer >= 1"),
    "no classes": (lambda run: run.update(classnames=[]), "'classnames' must be a non-empty"),
    "unknown method": (lambda run: run.update(method="magic"), "'method' must be one of"),
    "crop outside (0, 1]": (lambda run: run.update(crop_scale=[2, 3]), "'crop_scale' must be"),
    "demo flag as text": (lambda run: run.update(demo_backbone="yes"), "'demo_backbone' must"),
    "unknown option": (lambda run: run["pini_config"].update(colour="red"), "unknown ['colour']"),
    "bad option value": (lambda run: run["pini_config"].update(mode="div"), "'pini_config':"),
}


@pytest.mark.parametrize("edit", list(RECORD_EDITS))
def test_a_hand_edited_run_record_is_one_line_naming_the_file_and_key(
    trained, tmp_path, capsys, edit
):
    """run.json edited by hand (the run had no checkpoint yet): was a traceback or, worse,
    silently another run (a missing option taking its default). Now one line naming the file,
    the key and what was expected."""
    data, output = trained(tmp_path)
    (output / "checkpoint.pt").unlink()
    (output / "summary.json").unlink()
    record = json.loads((output / "run.json").read_text())
    change, words = RECORD_EDITS[edit]
    change(record)
    (output / "run.json").write_text(json.dumps(record))
    line = assert_one_line_error(run_cli(resume(data, output), capsys), words)
    assert f"run record {output / 'run.json'}" in line


def test_an_edited_split_is_refused(data, tmp_path, capsys):
    """A split file whose images were swapped for others of the listing (a consistent edit:
    indices and samples agree) does not match what its seed draws: refused, not trained on."""
    from pini.data.load import load_dataset
    from pini.data.sample_ids import sample_id

    output = tmp_path / "run"
    assert run_cli(toy_train(data, output, "--shots", "2"), capsys)[0] == 0
    (split,) = output.glob("split-*.json")
    stored = json.loads(split.read_text())
    samples = load_dataset(data, "toy").train
    label = stored["samples"][0][1]
    replacement = next(
        i for i, (_, other) in enumerate(samples) if other == label and i not in stored["indices"]
    )
    stored["indices"][0] = replacement
    stored["samples"][0] = [sample_id(samples[replacement][0]), samples[replacement][1]]
    split.write_text(json.dumps(stored))
    (output / "summary.json").unlink()
    assert_one_line_error(
        run_cli(resume(data, output, "--epochs", "1"), capsys),
        "are not the ones seed 1 draws from this listing",
    )


def test_resume_takes_the_runs_data_when_left_out_and_either_spelling_of_its_folder(
    data, tmp_path, capsys
):
    """--resume with no --root/--dataset continues on the run's data (it said "--dataset digits
    (the run has toy)"); through a symlink to the same folder the listing is the same one (the
    root was stored resolved, the images' paths only made absolute: "the listing changed")."""
    output = tmp_path / "run"
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    assert run_cli(toy_train(link, output, "--shots", "1"), capsys)[0] == 0
    (output / "summary.json").unlink()
    status, out, err = run_cli(["train", "--no-progress", "--output", output, "--resume"], capsys)
    assert status == 0 and "toy, 1 shot, seed 1" in out, err
    (output / "summary.json").unlink()
    status, out, err = run_cli(resume(data, output), capsys)
    assert status == 0 and "toy, 1 shot, seed 1" in out, err


@pytest.mark.parametrize(
    ("folders", "words"),
    [
        (["big_cat", "big cat", "dog"], "class folders 'big cat' and 'big_cat' both read as class"),
        (["cats", ".NET"], "dataset odd has one class (cats)"),
    ],
)
def test_class_folders_that_would_mislead_are_refused(tmp_path, capsys, caplog, folders, words):
    """Two folders reading as one class name (identical prompts), or one class left once the
    hidden ".NET" is skipped (every prediction right: 100%): one line each; the hidden folder
    is also named in a warning."""
    root = make_folder(tmp_path / "data" / "odd", classes=folders)
    with caplog.at_level("WARNING"):
        result = run_cli(
            [
                "train",
                *TINY,
                "--root",
                root.parent,
                "--dataset",
                "odd",
                "--output",
                tmp_path / "run",
            ],
            capsys,
        )
    assert_one_line_error(result, words)
    if ".NET" in folders:
        assert "hidden folder (names starting with '.') skipped, not classes: .NET" in caplog.text


class _NotATensor:
    """Pickled into a file, it is something weights_only loading refuses (as code would be)."""


def test_files_and_flags_that_gave_tracebacks_are_one_line(data, tmp_path, capsys, monkeypatch):
    from pini.backbone import build_clip

    clip, _ = build_clip("pini-tiny")
    state = clip.state_dict()
    other = dict(state, **{"visual.conv1.weight": torch.zeros(7, 3, 5, 5)})
    torch.save(other, tmp_path / "other.pt")
    torch.save({**state, "extra": _NotATensor()}, tmp_path / "payload.pt")
    base = toy_train(data, tmp_path / "run", "--shots", "1")
    for given, words in (
        (["--pretrained", tmp_path / "other.pt"], "holds weights of another model than pini-tiny"),
        (["--pretrained", tmp_path / "payload.pt"], "which load only with --trusted"),
        (
            [
                "--model",
                "RN50",
                "--pretrained",
                "openai",
                "--noise",
                "image",
                "--visual-generator",
                "attention",
            ],
            "RN50's is not one: use --visual-generator attention-pixels",
        ),
    ):
        argv = [*base, *given]  # later flags win over TINY's
        assert_one_line_error(run_cli(argv, capsys), words)
        assert not (tmp_path / "run" / "run.json").exists()  # no run left behind
    (tmp_path / "fake").mkdir()
    torch.save(
        {"format": "pini-run-checkpoint/2", "x": _NotATensor()}, tmp_path / "fake" / "checkpoint.pt"
    )
    assert_one_line_error(
        run_cli(["eval", "--checkpoint", tmp_path / "fake" / "checkpoint.pt"], capsys),
        "holds pickled objects beyond tensors (code, possibly), which pini never loads",
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(
        run_cli([*base, "--device", "cuda"], capsys), "--device cuda: no CUDA GPU is available here"
    )


def test_a_truncated_demo_cache_is_built_again(tmp_path, monkeypatch, caplog):
    """The demo CLIP's cache cut short: a warning naming it, then the CLIP is pre-trained again
    and cached (it was a traceback without the path)."""
    monkeypatch.setattr(pini.demo, "PRETRAIN_STEPS", 2)
    first, _ = pini.demo.digits_clip(tmp_path, progress=False)
    (cache,) = tmp_path.glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        again, _ = pini.demo.digits_clip(tmp_path, progress=False)
    assert f"the cached demo CLIP {cache} cannot be read" in caplog.text
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert cache.stat().st_size > 1000


def test_corrupt_checkpoints_never_read_as_payloads(tmp_path, capsys):
    """torch wraps every failure of a weights-only load in one error type: random bytes must say
    "cannot be read", not "pickled objects" (which only a real object payload says)."""
    for index in range(20):
        path = tmp_path / f"random-{index}.pt"
        path.write_bytes(os.urandom(4096))
        assert_one_line_error(run_cli(["eval", "--checkpoint", path], capsys), "cannot be read")
