"""Where pini follows the authors' code and its base, Dassl (docs/spec.md §10, §11): the learning
rate of every epoch, the last partial batch, the generators' output layers, the authors' image
CNN, Dassl's few-shot draw; and runs (and sweeps) written before those defaults resume exactly as
they were trained, or are refused in one line.

The runs are the tiny random model on a 3-class toy dataset (tests/test_cli.py's helpers).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from test_cli import assert_one_line_error, make_folder, resume, run_cli, toy_train

import pini
import pini.generators as gen
import pini.runs
import pini.train
from pini.checkpoint import read_checkpoint
from pini.data.few_shot import few_shot
from pini.data.sample_ids import sample_id
from pini.train import GlobalBatches, TrainConfig, lr_factor


@pytest.fixture
def data(tmp_path):
    make_folder(tmp_path / "data" / "toy")
    return tmp_path / "data"


# --- the learning rate of each epoch ------------------------------------------------------------


def test_the_lr_of_every_epoch_is_dassls():
    """CoOp's configuration (lr 0.002, 200 epochs, one warm-up epoch at 1e-5): Dassl steps a
    CosineAnnealingLR(T_max=200) once per epoch after the warm-up, so epoch e >= 1 runs at the
    cosine of e - 1; the last epoch at 0.002 * (1 + cos(198 pi / 200)) / 2 = 4.934e-7."""
    config = TrainConfig(epochs=200, lr=0.002)
    lrs = [config.lr * lr_factor(epoch, config) for epoch in range(200)]
    assert lrs[0] == pytest.approx(1e-5, rel=1e-12)
    assert lrs[1] == 0.002
    assert lrs[199] == pytest.approx(4.934396342684e-7, rel=1e-9)
    expected = [0.002 * (1 + math.cos(math.pi * (epoch - 1) / 200)) / 2 for epoch in range(1, 200)]
    assert lrs[1:] == pytest.approx(expected, rel=1e-12)
    # torch's own scheduler, stepped once per epoch from the end of the warm-up.
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.002)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
    stepped = []
    for _ in range(1, 200):
        stepped.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
    assert lrs[1:] == pytest.approx(stepped, rel=1e-9)
    # Counted from epoch 0 (pini before): one epoch ahead, 1.234e-7 in the last epoch.
    ahead = TrainConfig(epochs=200, lr=0.002, cosine_from="start")
    assert 0.002 * lr_factor(199, ahead) == pytest.approx(1.2336751833941e-7, rel=1e-9)
    assert 0.002 * lr_factor(1, ahead) == pytest.approx(expected[1], rel=1e-12)


def test_more_warm_up_epochs_delay_the_cosine():
    config = TrainConfig(epochs=10, lr=0.01, warmup_epochs=3, warmup_lr=1e-4)
    factors = [lr_factor(epoch, config) for epoch in range(10)]
    assert factors[:3] == [0.01, 0.01, 0.01]
    assert factors[3:] == pytest.approx([(1 + math.cos(math.pi * k / 10)) / 2 for k in range(7)])
    none = TrainConfig(epochs=10, warmup_epochs=0)
    assert [lr_factor(e, none) for e in (0, 5)] == pytest.approx([1.0, 0.5])


def test_bad_schedule_and_loader_options_are_refused():
    with pytest.raises(pini.errors.InputError, match="cosine_from"):
        TrainConfig(cosine_from="end")
    with pytest.raises(pini.errors.InputError, match="drop_last"):
        TrainConfig(drop_last=1)


# --- the last partial batch ---------------------------------------------------------------------


def _sizes(length: int, batch: int, drop_last: bool, world: int = 1) -> list[list[int]]:
    """The global batch sizes, and each rank's shares, of one epoch."""
    shares = []
    for rank in range(world):
        batches = GlobalBatches(
            length, batch, torch.Generator().manual_seed(0), rank, world, drop_last
        )
        shares.append([len(b) for b in batches.batches])
    return [sum(per_rank) for per_rank in zip(*shares, strict=True)]


def test_the_last_partial_batch_is_dropped_as_dassl_does():
    """Dassl's train loader: drop_last where the data holds at least one full batch."""
    assert _sizes(37, 32, drop_last=True) == [32]
    assert _sizes(37, 32, drop_last=False) == [32, 5]
    assert _sizes(64, 32, drop_last=True) == [32, 32]
    assert _sizes(20, 32, drop_last=True) == [20]  # fewer than a batch: kept whole
    assert _sizes(37, 32, drop_last=True, world=3) == [32]  # the global batch, over 3 ranks
    batches = GlobalBatches(37, 32, torch.Generator().manual_seed(0), drop_last=True)
    assert len(set(batches.batches[0])) == 32  # distinct images, from one permutation


def test_a_run_trains_on_full_batches_only_by_default(data, tmp_path, capsys, monkeypatch):
    """2 shots of 3 classes in batches of 4: [4] by default, [4, 2] with --no-drop-last."""
    seen = []
    forward = pini.train._LossStep.forward

    def recording(self, images, labels, seed):
        seen.append(images.shape[0])
        return forward(self, images, labels, seed)

    monkeypatch.setattr(pini.train._LossStep, "forward", recording)
    argv = toy_train(data, tmp_path / "a", "--shots", "2", "--epochs", "2")
    status, _, err = run_cli(argv, capsys)
    assert status == 0, err
    assert seen == [4, 4]
    assert json.loads((tmp_path / "a" / "run.json").read_text())["train_config"]["drop_last"]
    seen.clear()
    argv = toy_train(data, tmp_path / "b", "--shots", "2", "--epochs", "2", "--no-drop-last")
    status, _, err = run_cli(argv, capsys)
    assert status == 0, err
    assert seen == [4, 2, 4, 2]


# --- the generators' output layers --------------------------------------------------------------


def test_output_layers_keep_pytorchs_default_initialisation():
    """As the authors' fc_mean / fc_variance: what nn.Linear draws, not re-initialised."""
    torch.manual_seed(3)
    generator = gen.FeatureCrossAttention(24)
    torch.manual_seed(3)
    attention = [torch.nn.Linear(24, 24) for _ in range(3)]  # query, key, value
    head = torch.nn.Linear(24, 48)
    assert torch.equal(generator.attention.value.weight, attention[2].weight)
    assert torch.equal(generator.head.weight, head.weight)
    assert torch.equal(generator.head.bias, head.bias)
    assert generator.head.bias.abs().min() > 0


@pytest.mark.parametrize(
    "build",
    [
        lambda init: gen.FeatureCrossAttention(32, head_init=init).head,
        lambda init: gen.FeatureMLP(32, head_init=init).head,
        lambda init: gen.ImageCNN(head_init=init).head,
        lambda init: gen.AuthorsImageCNN(head_init=init).mean_head,
        lambda init: gen.ImageMLP(head_init=init).head,
        lambda init: gen.ImageCrossAttention(16, 8, 4, head_init=init).head,
    ],
)
def test_small_output_layers_start_at_n_0_0_02_with_zero_bias(build):
    torch.manual_seed(0)
    small, default = build("small"), build("default")
    assert small.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert small.bias is None or not small.bias.any()
    fan_in = default.weight[0].numel()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), ...)
    assert default.weight.abs().max() <= bound
    assert default.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_the_pini_model_takes_head_init_from_its_config():
    clip, tokenizer = pini.build_clip("pini-tiny")
    classes = ["a", "b", "c"]
    for init, zero_bias in (("default", False), ("small", True)):
        config = pini.PiNIConfig(head_init=init)
        model = pini.PiNI(clip, tokenizer, classes, config=config)
        assert (not model.visual_generator.head.bias.any()) == zero_bias
    with pytest.raises(ValueError, match="head_init"):
        pini.PiNIConfig(head_init="zeros")


# --- runs written before these defaults ---------------------------------------------------------

ADDED = {key: tuple(added) for key, added in pini.runs.OPTIONS_ADDED.items()}


def _as_written_before(folder) -> None:
    """Removes every option added since from the run's record and its checkpoint's copy."""
    record = json.loads((folder / "run.json").read_text())
    for section, keys in ADDED.items():
        for key in keys:
            del record[section][key]
    (folder / "run.json").write_text(json.dumps(record))
    checkpoint = read_checkpoint(folder / "checkpoint.pt")
    for section, keys in ADDED.items():
        for key in keys:
            del checkpoint["run"][section][key]
    torch.save(checkpoint, folder / "checkpoint.pt")


def test_a_run_written_before_resumes_as_it_was_trained(data, tmp_path, capsys, monkeypatch):
    """A record without cosine_from, drop_last and head_init is a run of the behaviour before
    them (cosine from epoch 0, every partial batch, small output layers): resumed, it ends with
    the parameters of an uninterrupted run of those options."""
    options = ["--shots", "2", "--epochs", "3", "--lr", "0.05"]
    before = ["--cosine-from", "start", "--no-drop-last", "--head-init", "small"]
    whole = tmp_path / "whole"
    status, _, err = run_cli(toy_train(data, whole, *options, *before), capsys)
    assert status == 0, err

    save = pini.train.save_checkpoint
    saved = []

    def killed_before_the_third(*args, **kwargs):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(1)
        save(*args, **kwargs)

    monkeypatch.setattr(pini.train, "save_checkpoint", killed_before_the_third)
    old = tmp_path / "old"
    status, _, _ = run_cli(toy_train(data, old, *options, *before), capsys)
    assert status == 130
    monkeypatch.setattr(pini.train, "save_checkpoint", save)
    _as_written_before(old)
    # Today's defaults on the command line contradict the run: one line naming the flag.
    result = run_cli(resume(data, old, "--drop-last"), capsys)
    assert_one_line_error(result, "--drop-last", "the run has False")
    status, _, err = run_cli(resume(data, old), capsys)
    assert status == 0, err
    resumed = read_checkpoint(old / "checkpoint.pt")
    expected = read_checkpoint(whole / "checkpoint.pt")
    assert resumed["epoch"] == expected["epoch"] == 2
    for name, value in expected["trained_state"].items():
        assert torch.equal(resumed["trained_state"][name], value), name
    lrs = [json.loads(line)["lr"] for line in (old / "metrics.jsonl").read_text().splitlines()]
    assert lrs[2] == pytest.approx(0.05 * (1 + math.cos(2 * math.pi / 3)) / 2)
    # pini eval reads the same record.
    status, _, err = run_cli(["eval", "--checkpoint", str(old / "checkpoint.pt")], capsys)
    assert status == 0, err


# --- the authors' image CNN ---------------------------------------------------------------------


def test_cnn_authors_is_the_authors_network():
    """64 -> [64, 64] -> 128 -> 64 channels, 1x1 projection shortcuts where the width changes,
    separate mu and sigma output convolutions without bias: the authors' VPNGenerator has
    502,592 parameters (1,728 + 128 stem; 147,968, 230,144, 119,168 in its three layers;
    3,456 in the two heads)."""
    generator = gen.AuthorsImageCNN()
    assert sum(p.numel() for p in generator.parameters()) == 502_592
    convolutions = [m for m in generator.modules() if isinstance(m, torch.nn.Conv2d)]
    three = [m for m in convolutions if m.kernel_size == (3, 3)]
    one = [m for m in convolutions if m.kernel_size == (1, 1)]
    assert len(three) == 11 and len(one) == 2  # stem, 4 blocks of 2, mu and sigma heads
    assert [(m.in_channels, m.out_channels) for m in one] == [(64, 128), (128, 64)]
    assert generator.mean_head.bias is None and generator.sigma_head.bias is None


def test_cnn_authors_rescales_mu_and_sigma_per_channel_of_each_image():
    """Each (image, channel) of mu and of sigma has a root mean square of 0.1: the authors'
    normalize over (B, 3, H * W). A per-image rescale leaves the channels unequal."""
    torch.manual_seed(0)
    generator = gen.AuthorsImageCNN()
    images = torch.randn(2, 3, 12, 20) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1)
    mu, sigma = generator(images)
    assert mu.shape == sigma.shape == images.shape and (sigma >= 0).all()
    for values in (mu, sigma):
        rms = values.square().mean(dim=(-2, -1)).sqrt()
        assert torch.allclose(rms, torch.full((2, 3), 0.1), rtol=1e-5), rms
    narrow = gen.ImageCNN()(images)[0].square().mean(dim=(-2, -1)).sqrt()
    assert not torch.allclose(narrow, torch.full((2, 3), 0.1), rtol=1e-2)  # pini's: per image


def test_the_image_rows_of_table_1_use_the_authors_cnn():
    clip, tokenizer = pini.build_clip("pini-tiny")
    for row in ("image", "image+prompt", "image+text-feature"):
        config = pini.PiNIConfig.table1(row)
        assert config.visual_generator == "cnn-authors"
    model = pini.PiNI(clip, tokenizer, ["a", "b"], config=pini.PiNIConfig.table1("image"))
    assert isinstance(model.visual_generator, gen.AuthorsImageCNN)
    narrow = pini.PiNIConfig.table1("image", visual_generator="cnn")
    model = pini.PiNI(clip, tokenizer, ["a", "b"], config=narrow)
    assert type(model.visual_generator) is gen.ImageCNN


# --- the few-shot draw --------------------------------------------------------------------------


def _listing():
    """Labels first appear as 2, 0, 1 (not sorted); label 1 has 2 images."""
    return [
        (f"/d/{label}-{i}.png", label) for label, n in ((2, 5), (0, 5), (1, 2)) for i in range(n)
    ]


def test_the_shots_are_dassls_draw():
    """Dassl's generate_fewshot_dataset after random.seed(seed): per label, in the order labels
    first appear, random.sample(items, K), or random.choices(items, k=K) where a label has
    fewer; seed 1, K = 3 on this listing: [1, 0, 4], [5, 8, 6], [10, 10, 10]."""
    samples = _listing()
    chosen = few_shot(samples, 3, seed=1)
    assert chosen == [samples[i] for i in (1, 0, 4, 5, 8, 6, 10, 10, 10)]
    stream = random.Random(1)
    expected = stream.sample(range(0, 5), 3) + stream.sample(range(5, 10), 3)
    expected += stream.choices(range(10, 12), k=3)
    assert chosen == [samples[i] for i in expected]


def test_the_validation_shots_continue_the_training_draws_stream():
    samples, validation = (
        _listing(),
        [(f"/v/{label}-{i}.png", label) for label in (0, 1, 2) for i in range(6)],
    )
    drawn = few_shot(validation, 2, seed=4, drawn_before=((samples, 3),))
    stream = random.Random(4)
    stream.sample(range(5), 3), stream.sample(range(5), 3), stream.choices(range(2), k=3)
    expected = [
        index for start in (0, 6, 12) for index in stream.sample(range(start, start + 6), 2)
    ]
    assert drawn == [validation[i] for i in expected]
    assert drawn != few_shot(validation, 2, seed=4)


def test_a_split_file_of_the_previous_draw_is_still_reused(tmp_path):
    """A run folder written before keeps its split (labels sorted, draws sorted, no repeats)."""
    samples = _listing()
    cache = tmp_path / "split.json"
    few_shot(samples, 3, seed=1, cache=cache, source={"dataset": "toy"})
    stored = json.loads(cache.read_text())
    assert stored["format"] == "pini-few-shot-split/3"
    stream = random.Random(1)
    old = [*sorted(stream.sample(range(5, 10), 3)), 10, 11, *sorted(stream.sample(range(0, 5), 3))]
    stored.update(
        format="pini-few-shot-split/2",
        indices=old,
        samples=[[sample_id(samples[i][0]), samples[i][1]] for i in old],
    )
    cache.write_text(json.dumps(stored))
    assert few_shot(samples, 3, seed=1, cache=cache, source={"dataset": "toy"}) == [
        samples[i] for i in old
    ]
    stored.update(indices=old[::-1], samples=stored["samples"][::-1])
    cache.write_text(json.dumps(stored))  # not what the previous draw gives
    with pytest.raises(pini.errors.InputError, match="not the ones seed 1 draws"):
        few_shot(samples, 3, seed=1, cache=cache, source={"dataset": "toy"})


def test_a_sweep_written_before_is_refused_in_one_line_or_continued_with_its_options(
    data, tmp_path, capsys
):
    """A sweep's finished run from before the new defaults is not silently reported as a run
    of them: one line naming each option that differs; with the run's own options (the old
    behaviour's flags) the sweep reuses it."""
    output = tmp_path / "sweep"
    argv = ["sweep", "--model", "pini-tiny", "--no-progress", "--batch-size", "4", "--epochs"]
    argv += ["1", "--root", data, "--dataset", "toy", "--output", output, "--methods", "pini"]
    argv += ["--shot-list", "2", "--seeds", "1"]
    before = ["--cosine-from", "start", "--no-drop-last", "--head-init", "small"]
    status, _, err = run_cli([*argv, *before], capsys)
    assert status == 0, err
    _as_written_before(output / "toy" / "pini" / "2shot-seed1")
    result = run_cli(argv, capsys)
    # what this feature+prompt run at m = 1 does not use (the fixed prompt, the per-step
    # draws) reads as today's record of the row holds it: not a difference
    assert_one_line_error(
        result,
        "another configuration (pini_config.head_init small -> default; "
        "train_config.cosine_from start -> warmup-end; train_config.drop_last False -> True)",
    )
    status, out, err = run_cli([*argv, *before], capsys)
    assert status == 0, err
    assert "| PiNI |" in out


@pytest.mark.parametrize(
    "row, samples, uses, differs",
    [
        ("feature", 1, ["--head-init", "small", "--fixed-prompt", "placeholder"], "fixed_prompt"),
        ("prompt", 1, [], None),  # learnable mu and sigma alone, one sample: nothing to match
        ("prompt", 2, ["--no-prompt-noise-per-step"], "prompt_noise_per_step False -> True"),
        (
            "text-feature",
            2,
            [
                *("--head-init", "small", "--fixed-prompt", "placeholder"),
                "--no-text-feature-noise-per-step",
            ],
            "text_feature_noise_per_step False -> True",
        ),
    ],
)
def test_an_old_run_differs_only_in_the_options_its_run_uses(
    data, tmp_path, capsys, row, samples, uses, differs
):
    """A record from before every added option reads the options its run does not use (its row,
    its number of samples) as a new record of that run holds them (a flag for one is refused,
    so none could match otherwise): the sweep reuses it given the old behaviour's flags for
    what the run does use, and without them names what differs."""
    output = tmp_path / "sweep"
    argv = ["sweep", "--model", "pini-tiny", "--no-progress", "--batch-size", "4", "--epochs"]
    argv += ["1", "--root", data, "--dataset", "toy", "--output", output, "--methods", "pini"]
    argv += ["--shot-list", "2", "--seeds", "1", "--noise", row, "--num-samples", str(samples)]
    argv += ["--cosine-from", "start", "--no-drop-last"]
    status, _, err = run_cli([*argv, *uses], capsys)
    assert status == 0, err
    folder = output / "toy" / "pini" / "2shot-seed1"
    written = json.loads((folder / "run.json").read_text())["pini_config"]
    _as_written_before(folder)
    status, out, err = run_cli([*argv, *uses], capsys)
    assert status == 0, err
    assert "(done before)" in out
    stored = pini.runs.read_stored_run(folder)["pini_config"]
    assert stored == written  # the unused options as written, the used ones as trained
    if differs is not None:
        assert_one_line_error(run_cli(argv, capsys), "another configuration", differs)
