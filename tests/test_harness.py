"""The methods from the command line: `pini train --method`, `pini eval` of every
method's checkpoint, exact resume, the frozen-feature cache and `pini sweep`'s table, plot and
JSON. Tiny CoOp-layout and ImageFolder datasets are drawn with PIL in tmp_path; the backbone is
the random `pini-tiny`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import TINY, assert_one_line_error, make_folder, run_cli

import pini
from pini import cli, runner
from pini.checkpoint import CHECKPOINT_FORMAT, read_checkpoint
from pini.data.features import EncodedImages, encode_samples
from pini.data.load import load_dataset
from pini.data.transforms import clip_transforms
from pini.evaluation import evaluate
from pini.methods import METHODS, PAPER_METHODS

TRAINED_METHODS = [name for name, method in METHODS.items() if method.trains]
VALIDATED_METHODS = [
    name
    for name, method in METHODS.items()
    if method.fitting or (method.training and method.training.searches)
]

PETS = ["abyssinian", "beagle", "bombay"]
# Every key of summary.json, whatever the method.
SUMMARY_KEYS = {
    "dataset",
    "method",
    "shots",
    "seed",
    "noise",
    "zero_shot_accuracy",
    "zero_shot_template",
    "accuracy",
    "macro_f1",
    "test_images",
    "skipped_images",
    "pini_config",
    "method_config",
    "train_config",
    "fitted",
}
TRAINED = ["pini", "coop", "clip-adapter", "tip-adapter-f"]
# t(0.975, 1): the 95% quantile of Student's t with one degree of freedom (two seeds).
T_ONE_DEGREE = 12.706204736174707


def make_coop_dataset(root, classes=PETS, counts=(("train", 3), ("val", 1), ("test", 3))):
    """OxfordPets in CoOp's layout: images/<name>.png and split_zhou_OxfordPets.json with
    [path, label, class name] entries per part; each class its own colour, varied per image."""
    folder = root / "oxford_pets"
    (folder / "images").mkdir(parents=True)
    entries = {part: [] for part, _ in counts}
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        for part, count in counts:
            for index in range(count):
                base = np.array([80 * label % 256, 200 - 70 * label, 40 + 60 * label])
                pixels = (base + rng.integers(-30, 30, (8, 8, 3))).clip(0, 255).astype(np.uint8)
                relative = f"{name}_{part}_{index}.png"
                Image.fromarray(pixels).save(folder / "images" / relative)
                entries[part].append([relative, label, name])
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(entries))
    return root


@pytest.fixture
def pets(tmp_path):
    return make_coop_dataset(tmp_path / "data")


def train_method(root, output, capsys, method, *extra, dataset="oxford_pets"):
    """`pini train --method METHOD` for 2 shots (1 epoch in batches of 4 if it trains)."""
    argv = ["train", "--model", "pini-tiny", "--no-progress", "--method", method]
    if method in TRAINED_METHODS:
        argv += ["--batch-size", "4", "--epochs", "1"]
    argv += ["--root", root, "--dataset", dataset, "--shots", "2", "--output", output, *extra]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    return json.loads((output / "summary.json").read_text()), out


# --- every method through the run folder ------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_writes_the_summary_format_and_eval_repeats_it(pets, tmp_path, capsys, method):
    output = tmp_path / "run"
    summary, out = train_method(pets, output, capsys, method)
    assert set(summary) == SUMMARY_KEYS
    assert summary["method"] == method and summary["dataset"] == "oxford_pets"
    assert summary["test_images"] == 9 and 0 <= summary["accuracy"] <= 100
    name = METHODS[method].display_name
    assert f"-> {name} {summary['accuracy']:.2f}%" in out
    run = json.loads((output / "run.json").read_text())
    assert run["method"] == method
    assert (run["pini_config"] is None) == (method != "pini")
    assert (run["train_config"] is None) == (method not in TRAINED_METHODS)
    state = read_checkpoint(output / "checkpoint.pt")
    assert state["format"] == CHECKPOINT_FORMAT and state["method"] == method
    if method == "zero-shot":
        assert summary["accuracy"] == pytest.approx(summary["zero_shot_accuracy"], abs=1e-9)
    if method in VALIDATED_METHODS:  # drawn from the dataset's val part: 1 image per class,
        # so its 2 shots are that image twice (Dassl's draw with repeats)
        validation = json.loads((output / "split-val-2shot-seed1.json").read_text())
        assert validation["source"]["part"] == "val" and len(validation["samples"]) == 6
        assert len({tuple(sample) for sample in validation["samples"]}) == 3
    if method == "tip-adapter-f":  # the searched alpha and beta are the checkpoint's
        for name in ("alpha", "beta"):  # float32 buffers
            assert float(state["trained_state"][name]) == pytest.approx(summary["fitted"][name])
    status, out, err = run_cli(
        ["eval", "--no-progress", "--checkpoint", output / "checkpoint.pt"], capsys
    )
    assert status == 0, err
    assert f"accuracy {summary['accuracy']:.2f}%, macro-F1 {summary['macro_f1']:.2f}%" in out


def test_the_validation_split_without_a_val_part_leaves_out_the_shots(tmp_path, capsys):
    root = make_folder(tmp_path / "data" / "toy", per_class=4).parent
    output = tmp_path / "run"
    train_method(root, output, capsys, "linear-probe", dataset="toy")
    shots = json.loads((output / "split-2shot-seed1.json").read_text())["samples"]
    validation = json.loads((output / "split-val-2shot-seed1.json").read_text())
    assert validation["source"]["part"] == "train outside the shots"
    assert len(validation["samples"]) == 6  # min(2, 4) of the 2 left per class
    assert not {tuple(s) for s in shots} & {tuple(s) for s in validation["samples"]}


@pytest.mark.parametrize("method", TRAINED)
def test_resume_of_a_trained_method_is_exact(pets, tmp_path, capsys, monkeypatch, method):
    """Killed after the first of two epochs, then resumed: the state and the accuracy of an
    uninterrupted run."""
    whole, _ = train_method(pets, tmp_path / "whole", capsys, method, "--epochs", "2")
    original = pini.train.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, model, optimizer, epoch, config, run=None):
        original(path, model, optimizer, epoch, config, run)
        if epoch == 0:
            raise Killed

    monkeypatch.setattr(pini.train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_method(pets, tmp_path / "killed", capsys, method, "--epochs", "2")
    monkeypatch.setattr(pini.train, "save_checkpoint", original)
    assert read_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 0
    status, _, err = run_cli(
        [
            "train",
            "--no-progress",
            "--output",
            tmp_path / "killed",
            "--resume",
            "--root",
            pets,
            "--dataset",
            "oxford_pets",
        ],
        capsys,
    )
    assert status == 0, err
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert (resumed["accuracy"], resumed["fitted"]) == (whole["accuracy"], whole["fitted"])
    expected = read_checkpoint(tmp_path / "whole" / "checkpoint.pt")["trained_state"]
    got = read_checkpoint(tmp_path / "killed" / "checkpoint.pt")["trained_state"]
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_resume_with_another_method_and_flags_of_another_method_are_one_line_errors(
    pets, tmp_path, capsys
):
    output = tmp_path / "run"
    train_method(pets, output, capsys, "coop")
    resume = ["train", "--no-progress", "--output", output, "--resume"]
    result = run_cli([*resume, "--method", "clip-adapter"], capsys)
    assert_one_line_error(result, "--method clip-adapter (the run has coop)")
    result = run_cli([*resume, "--mode", "mul"], capsys)
    assert_one_line_error(result, "--mode mul (the run is coop: no PiNI options)")
    fresh = ["train", *TINY, "--root", pets, "--dataset", "oxford_pets"]
    result = run_cli([*fresh, "--method", "coop", "--noise", "feature"], capsys)
    assert_one_line_error(result, "--noise is PiNI's option; --method coop has none")
    result = run_cli([*fresh, "--method", "linear-probe", "--output", tmp_path / "x"], capsys)
    assert_one_line_error(result, "--epochs, --batch-size: linear-probe is not trained")
    assert not (tmp_path / "x").exists()


def test_eval_of_a_per_class_method_on_other_classes_is_refused(pets, tmp_path, capsys):
    other = make_folder(tmp_path / "more" / "toy", classes=["ant", "bee", "cow", "eel"]).parent
    for method, allowed in (("linear-probe", False), ("coop", True)):
        output = tmp_path / method
        train_method(pets, output, capsys, method)
        argv = ["eval", "--no-progress", "--checkpoint", output / "checkpoint.pt"]
        result = run_cli([*argv, "--root", other, "--dataset", "toy"], capsys)
        if allowed:  # CoOp's context is shared by every class
            assert result[0] == 0 and "toy: accuracy" in result[1]
        else:
            assert_one_line_error(result, "a classifier per class", "other classes")


# --- the frozen-feature cache -----------------------------------------------------------------


@pytest.mark.parametrize("noise", ["feature+prompt", "feature"])
def test_features_give_exactly_the_evaluation_of_the_images(tmp_path, noise):
    """PiNI with feature noise (batch i draws its noise with seed i) and CoOp, with an unreadable
    image inside a batch: the cached features repeat the image evaluation to the bit."""
    root = make_folder(tmp_path / "data" / "toy", per_class=5).parent
    (root / "toy" / "test" / "cat" / "2.png").write_bytes(b"not an image")
    split = load_dataset(root, "toy")
    torch.manual_seed(0)
    clip, tokenizer = pini.build_clip("pini-tiny")
    _, transform = clip_transforms(32)
    config = pini.PiNIConfig.table1(noise)
    models = [
        pini.PiNI(clip, tokenizer, split.classnames, config=config),
        pini.methods.coop.CoOp(clip, tokenizer, split.classnames),
    ]
    for model in models:
        encoder = model.encode_image if isinstance(model, pini.PiNI) else clip.encode_image
        features = encode_samples(encoder, split.test, transform, batch_size=4)
        assert features.skipped == 1 and features.features.shape[0] == 14
        for zero_shot in (False, True):
            options = dict(batch_size=4, progress=False, zero_shot=zero_shot)
            from_images = evaluate(model, split.test, transform, **options)
            from_features = evaluate(model, split.test, transform, features=features, **options)
            assert from_features == from_images
        assert clip.visual.__class__.__name__ == "VisionTransformer"  # the tower is back


def test_image_noise_cannot_use_features_and_batches_must_match(tmp_path):
    root = make_folder(tmp_path / "data" / "toy").parent
    split = load_dataset(root, "toy")
    torch.manual_seed(0)
    clip, tokenizer = pini.build_clip("pini-tiny")
    _, transform = clip_transforms(32)
    features = encode_samples(clip.encode_image, split.test, transform, batch_size=4)
    image_noise = pini.PiNI(
        clip, tokenizer, split.classnames, config=pini.PiNIConfig.table1("image")
    )
    with pytest.raises(ValueError, match="image-level noise"):
        evaluate(image_noise, split.test, transform, batch_size=4, features=features)
    coop = pini.methods.coop.CoOp(clip, tokenizer, split.classnames)
    with pytest.raises(ValueError, match="batches of 4, batch_size is 64"):
        evaluate(coop, split.test, transform, features=features)


def test_a_run_encodes_its_test_images_once_and_the_next_method_reuses_them(pets, tmp_path, capsys):
    runner.FEATURES.clear()
    runner.FEATURES.misses = runner.FEATURES.hits = 0
    train_method(pets, tmp_path / "probe", capsys, "linear-probe")
    # test set (zero-shot and the probe's evaluation share it), few-shot and validation images
    assert runner.FEATURES.misses == 3
    train_method(pets, tmp_path / "tip", capsys, "tip-adapter")
    assert runner.FEATURES.misses == 4  # only Tip-Adapter's augmented cache is new
    train_method(pets, tmp_path / "coop", capsys, "coop", "--eval-every", "1")
    assert runner.FEATURES.misses == 4  # the test features again, at every evaluation


def test_macro_f1_and_confusion_are_scikit_learns_on_a_fitted_method():
    """A fitted method (logits from features only) on hand-made predictions: labels 0 0 1 1 2 2,
    predictions 0 1 1 1 2 0. Per class: precision 1/2, 2/3, 1; recall 1/2, 1, 1/2."""

    class Fixed:
        num_classes = 3

        def logits(self, features):
            return features  # each row is one-hot on its prediction

    predictions = torch.tensor([0, 1, 1, 1, 2, 0])
    features = torch.nn.functional.one_hot(predictions, 3).float()
    encoded = EncodedImages(
        features, torch.tensor([0, 0, 1, 1, 2, 2]), torch.zeros(6).long(), 0, 64
    )
    result = evaluate(Fixed(), [None] * 6, None, features=encoded, progress=False)
    f1 = [2 * p * r / (p + r) for p, r in ((1 / 2, 1 / 2), (2 / 3, 1.0), (1.0, 1 / 2))]
    assert result["accuracy"] == pytest.approx(400 / 6)
    assert result["macro_f1"] == pytest.approx(100 * sum(f1) / 3)
    assert result["per_class_accuracy"] == pytest.approx([50.0, 100.0, 50.0])
    with pytest.raises(ValueError, match="predicts from features"):
        evaluate(Fixed(), [None] * 6, None)


# --- pini sweep -------------------------------------------------------------------------------


def sweep_argv(root, output, *extra):
    argv = ["sweep", "--model", "pini-tiny", "--no-progress", "--root", root]
    argv += ["--datasets", "oxford_pets", "toy", "--output", output, "--shot-list", "1", "2"]
    return [*argv, "--seeds", "1", "2", "--epochs", "1", "--batch-size", "4", *extra]


def test_sweep_writes_table_plot_and_json_and_skips_finished_runs(tmp_path, capsys):
    root = make_coop_dataset(tmp_path / "data")
    make_folder(root / "toy")
    output = tmp_path / "sweep"
    methods = ["--methods", "zero-shot", "coop", "pini"]
    status, out, err = run_cli(sweep_argv(root, output, *methods), capsys)
    assert status == 0, err
    assert out.count("(new)") == 2 * 3 * 2 * 2
    assert (output / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((output / "sweep.json").read_text())
    assert len(report["runs"]) == 24
    summaries = {
        (run["method"], run["dataset"], run["shots"], run["seed"]): run["accuracy"]
        for run in report["runs"]
    }
    for (method, dataset, shots, seed), accuracy in summaries.items():
        folder = output / dataset / method / f"{shots}shot-seed{seed}"
        assert json.loads((folder / "summary.json").read_text())["accuracy"] == accuracy
    # A cell by hand: two seeds, so the half-width is t(0.975, 1) * |a - b| / 2.
    a, b = summaries["coop", "toy", 2, 1], summaries["coop", "toy", 2, 2]
    cell = report["accuracy"]["coop"]["datasets"]["toy"]["2"]
    assert cell["mean"] == pytest.approx((a + b) / 2)
    assert cell["interval"] == pytest.approx(T_ONE_DEGREE * abs(a - b) / 2)
    # The average over datasets per seed, and PiNI's gain paired by seed.
    average = {
        (method, seed): (
            summaries[method, "oxford_pets", 2, seed] + summaries[method, "toy", 2, seed]
        )
        / 2
        for method in ("coop", "pini")
        for seed in (1, 2)
    }
    expected_average = (average["coop", 1] + average["coop", 2]) / 2
    assert report["accuracy"]["coop"]["average"]["2"]["mean"] == pytest.approx(expected_average)
    gains = [average["pini", seed] - average["coop", seed] for seed in (1, 2)]
    gain = report["pini_gain"]["coop"]["2"]
    assert gain["mean"] == pytest.approx(sum(gains) / 2)
    assert gain["interval"] == pytest.approx(T_ONE_DEGREE * abs(gains[0] - gains[1]) / 2)
    table = (output / "sweep.md").read_text()
    assert "| method | oxford_pets | toy | average | PiNI gain |" in table
    two_shots = table[table.index("## 2 shots") : table.index("## 1 shot\n")]
    coop_row = next(line for line in two_shots.splitlines() if line.startswith("| CoOp |"))
    assert f"| {(a + b) / 2:.2f} ± {T_ONE_DEGREE * abs(a - b) / 2:.2f} |" in coop_row
    assert table in out
    # Again: every run is found finished and skipped; nothing is trained or rewritten.
    checkpoint = output / "toy" / "coop" / "1shot-seed1" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    status, out, err = run_cli(sweep_argv(root, output, *methods), capsys)
    assert status == 0, err
    assert out.count("(done before)") == 24 and "(new)" not in out
    assert checkpoint.stat().st_mtime_ns == before
    # An unfinished run (no summary yet) is resumed, not restarted.
    (output / "toy" / "pini" / "2shot-seed2" / "summary.json").unlink()
    status, out, err = run_cli(sweep_argv(root, output, *methods), capsys)
    assert status == 0, err
    assert out.count("(resumed)") == 1 and out.count("(done before)") == 23


def test_sweep_refuses_a_run_of_another_configuration_before_any_run(tmp_path, capsys):
    root = make_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--root", root, "--dataset", "toy", "--output", output]
    argv += ["--methods", "coop", "--shot-list", "1", "--seeds", "1"]
    assert run_cli(argv, capsys)[0] == 0
    more = [*argv, "--shot-list", "2", "1", "--epochs", "2"]
    result = run_cli(more, capsys)
    assert_one_line_error(
        result,
        "1shot-seed1 holds a run of another configuration",
        "train_config.epochs 1 -> 2",
        "--overwrite",
    )
    assert not (output / "toy" / "coop" / "2shot-seed1").exists()  # checked before any run
    result = run_cli([*argv, "--methods", "linear-probe", "--noise", "feature"], capsys)
    assert_one_line_error(result, "--noise: PiNI's option, but --methods has no pini")


def test_a_sweep_defaults_to_the_papers_methods():
    """Without --methods, ``pini sweep`` runs the methods of the paper's Table 2 (PiNI, zero-shot
    CLIP, the linear probe, CoOp, CLIP-Adapter); Tip-Adapter and -F are extras."""
    from pini.commands import sweep_methods

    args = cli._parser().parse_args(["sweep"])
    assert sweep_methods(args) == ["pini", "zero-shot", "linear-probe", "coop", "clip-adapter"]
    assert set(PAPER_METHODS) <= set(METHODS)
    table1 = cli._parser().parse_args(["sweep", "--noise-rows", "table1"])
    assert sweep_methods(table1) == ["zero-shot", "pini"]
