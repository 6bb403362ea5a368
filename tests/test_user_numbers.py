"""Every number `pini` prints or writes for a user, checked by value against a computation of the
test's own (numpy, scipy, scikit-learn, or the spec's noise stream), under conditions where a
plausible mistake shows: unequal class supports, several epochs after a warm-up, seeds that are
not 1..n and runs that failed, datasets of different sizes."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from pini import sweep

# --- pini sweep: cells, averages over datasets, paired gains, sweep.md ------------------------


def _half_width(values: list[float]) -> float:
    """Half-width of the 95% interval of the mean: scipy's t interval around the sample's sem."""
    if len(values) < 2:
        return 0.0
    mean = float(np.mean(values))
    upper = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))[1]
    return float(upper) - mean


def _expected_cell(by_seed: dict[int, float]) -> dict:
    seeds = sorted(by_seed)
    values = [by_seed[seed] for seed in seeds]
    mean = float(np.mean(values))
    return {"mean": mean, "interval": _half_width(values)}


def _sweep_summaries():
    """Two datasets of 1000 and 10 test images, seeds 3, 1, 7, 1 and 4 shots, three methods;
    CoOp's 4-shot run of seed 7 on "small" and PiNI's 1-shot run of seed 3 on "big" failed."""
    rng = np.random.default_rng(27)
    methods, datasets, shots, seeds = (
        ["zero-shot", "coop", "pini"],
        ["big", "small"],
        [1, 4],
        [3, 1, 7],
    )
    images = {"big": 1000, "small": 10}
    failed = {("coop", "small", 4, 7), ("pini", "big", 1, 3)}
    summaries, accuracy = [], {}
    for method in methods:
        for dataset in datasets:
            for k in shots:
                for seed in seeds:
                    key = (method, dataset, k, seed)
                    summary = {"method": method, "dataset": dataset, "shots": k, "seed": seed}
                    if key in failed:
                        summary |= {"status": "failed", "failure": "training diverged"}
                    else:
                        accuracy[key] = float(rng.uniform(20, 95))
                        summary |= {"accuracy": accuracy[key], "test_images": images[dataset]}
                    summaries.append(summary)
    return summaries, accuracy, (methods, datasets, shots, seeds)


def test_sweep_report_and_tables_by_value_with_uneven_seeds_failed_runs_and_unequal_datasets():
    """Each cell is the mean over the seeds that finished with scipy's t half-width (n - 1
    degrees of freedom, sample std); the average is per seed the unweighted mean over the two
    datasets (1000 and 10 images: weighting by images would differ) over the seeds every
    dataset finished; PiNI's gain is paired by seed over the seeds both averages have (CoOp's
    4-shot average lacks seed 7, PiNI's 1-shot one seed 3: an unpaired difference of means
    differs). sweep.md shows each of them to two decimals in its row and column."""
    summaries, accuracy, (methods, datasets, shots, seeds) = _sweep_summaries()
    result = json.loads(json.dumps(sweep.report(summaries, methods, datasets, shots, seeds)))
    expected, averages = {}, {}
    for method in methods:
        for k in shots:
            for dataset in datasets:
                found = {
                    s: accuracy[method, dataset, k, s]
                    for s in seeds
                    if (method, dataset, k, s) in accuracy
                }
                expected[method, dataset, k] = _expected_cell(found)
                cell = result["accuracy"][method]["datasets"][dataset][str(k)]
                assert cell["seeds"] == sorted(found) and cell["values"] == [
                    found[s] for s in sorted(found)
                ]
            complete = [s for s in seeds if all((method, d, k, s) in accuracy for d in datasets)]
            averages[method, k] = {
                s: np.mean([accuracy[method, d, k, s] for d in datasets]) for s in complete
            }
            expected[method, "average", k] = _expected_cell(averages[method, k])
    for method in ("zero-shot", "coop"):
        for k in shots:
            common = sorted(set(averages["pini", k]) & set(averages[method, k]))
            expected[method, "gain", k] = _expected_cell(
                {s: averages["pini", k][s] - averages[method, k][s] for s in common}
            )
    assert sorted(averages["coop", 4]) == [1, 3] and sorted(averages["pini", 1]) == [1, 7]
    for (method, where, k), want in expected.items():
        if where == "gain":
            got = result["pini_gain"][method][str(k)]
        elif where == "average":
            got = result["accuracy"][method]["average"][str(k)]
        else:
            got = result["accuracy"][method]["datasets"][where][str(k)]
        for name in ("mean", "interval"):
            assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-12), (
                method,
                where,
                k,
                name,
            )
    # sweep.md: every cell of Table 2 per shot count and of the average against shots.
    table = sweep.markdown(result)
    names = {"zero-shot": "zero-shot CLIP", "coop": "CoOp", "pini": "PiNI"}
    for k in shots:
        title = f"## {k} shot" + ("s" if k > 1 else "")
        section = table[table.index(title + "\n") :].split("\n## ", 1)[0]
        rows = _markdown_rows(section)
        for method in methods:
            row = rows[names[method]]
            for where in (*datasets, "average"):
                want = expected[method, where, k]
                assert row[where] == f"{want['mean']:.2f} ± {want['interval']:.2f}", (
                    method,
                    k,
                    where,
                )
            gain = expected.get((method, "gain", k))
            assert row["PiNI gain"] == (
                "" if gain is None else f"{gain['mean']:+.2f} ± {gain['interval']:.2f}"
            )
    against_shots = _markdown_rows(table[table.index("## Average over datasets against shots") :])
    for method in methods:
        for k in shots:
            want = expected[method, "average", k]
            label = f"{k} shot" + ("s" if k > 1 else "")
            assert (
                against_shots[names[method]][label]
                == f"{want['mean']:.2f} ± {want['interval']:.2f}"
            )
    failed_runs = [
        re.match(r"- (\w+) (.+) (\d+) shots? seed (\d+): training diverged$", line).groups()
        for line in table.splitlines()
        if line.startswith("- ")
    ]
    assert failed_runs == [("small", "CoOp", "4", "7"), ("big", "PiNI", "1", "3")]


def _markdown_rows(section: str) -> dict[str, dict[str, str]]:
    """{first cell: {column header: cell}} of the first markdown table in ``section``."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


# --- pini train and pini eval: the final line, --per-class, summary.json, metrics.jsonl -------

CLASSES = ["bird", "cat", "dog"]
TEST_SUPPORT = {"bird": 3, "cat": 1, "dog": 6}  # unequal: accuracy != the mean of recalls


def _unequal_folder(root):
    """ImageFolder "toy": 3 training images per class, one of dog's unreadable (so every 3-shot
    split holds it), and 6, 3 and 1 test images plus an unreadable one in cat."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, counts in (("train", dict.fromkeys(CLASSES, 3)), ("test", TEST_SUPPORT)):
        for label, name in enumerate(CLASSES):
            folder = root / part / name
            folder.mkdir(parents=True)
            for index in range(counts[name]):
                base = np.array([90 * label, 200 - 80 * label, 60 + 50 * label])
                pixels = (base + rng.integers(-40, 40, (16, 16, 3))).clip(0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    (root / "train" / "dog" / "2.png").write_bytes(b"not an image")
    (root / "test" / "cat" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture
def recorded(monkeypatch):
    """The events of a run, in order, from the model itself: ("loss", value, batch images) per
    training step, ("zero-shot", predictions) and ("eval", predictions) per evaluated batch,
    ("epoch",) when an epoch's checkpoint is saved."""
    import pini.train
    from pini.model import PiNI

    events = []
    loss, forward, zero_shot = PiNI.loss, PiNI.forward, PiNI.zero_shot_logits
    save = pini.train.save_checkpoint

    def record_loss(self, images, labels, seed=None):
        value = loss(self, images, labels, seed=seed)
        events.append(("loss", value.item(), len(labels)))
        return value

    def record(name, method):
        def recorded_method(self, images, *args, **kwargs):
            logits = method(self, images, *args, **kwargs)
            if not self.training:
                events.append((name, logits.argmax(-1).tolist()))
            return logits

        return recorded_method

    def record_epoch(*args, **kwargs):
        events.append(("epoch",))
        return save(*args, **kwargs)

    monkeypatch.setattr(PiNI, "loss", record_loss)
    monkeypatch.setattr(PiNI, "forward", record("eval", forward))
    monkeypatch.setattr(PiNI, "zero_shot_logits", record("zero-shot", zero_shot))
    monkeypatch.setattr(pini.train, "save_checkpoint", record_epoch)
    return events


def _scores(labels: list[int], predictions: list[int]) -> dict:
    """Accuracy, macro-F1 over the classes with images and per-class recall, in %, by sklearn."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    present = sorted(set(labels))
    recall = recall_score(
        labels, predictions, labels=range(len(CLASSES)), average=None, zero_division=0
    )
    return {
        "accuracy": 100 * accuracy_score(labels, predictions),
        "macro_f1": 100
        * f1_score(labels, predictions, labels=present, average="macro", zero_division=0),
        "per_class": [100 * value for value in recall],
    }


def _evaluations(events: list, name: str, images: int) -> list[list[int]]:
    """The predictions of each whole evaluation called ``name`` (its batches joined)."""
    predictions = [p for event in events if event[0] == name for p in event[1]]
    assert len(predictions) % images == 0
    return [predictions[i : i + images] for i in range(0, len(predictions), images)]


def _per_class_lines(out: str) -> list[tuple[str, str]]:
    """(class, accuracy as printed) of each --per-class line."""
    return re.findall(r"^  (\w+) +(\d+\.\d\d)%$", out, flags=re.MULTILINE)


def _formatted(per_class: list[float]) -> list[tuple[str, str]]:
    return [(name, f"{value:.2f}") for name, value in zip(CLASSES, per_class, strict=True)]


def test_train_and_eval_print_and_write_the_numbers_of_the_models_predictions(
    tmp_path, capsys, recorded
):
    """4 epochs, the first a warm-up, batches of 4 of 9 images one of which is unreadable,
    --eval-every 2, --per-class, test supports 3, 1, 6 (+1 unreadable). From the predictions the
    model made and the loss of each step: summary.json's and the printed accuracy, macro-F1,
    per-class accuracy in class order, zero-shot accuracy, image counts; metrics.jsonl's epoch
    numbers, image-weighted mean loss per epoch, skipped images per epoch, lr and test
    accuracy (epochs 2 and 4); `pini eval --per-class` the same numbers again."""
    from test_cli import run_cli

    from pini.data.load import load_dataset

    root = _unequal_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "run"
    argv = ["train", "--model", "pini-tiny", "--no-progress", "--root", root, "--dataset", "toy"]
    argv += ["--shots", "3", "--epochs", "4", "--batch-size", "4", "--lr", "0.01"]
    argv += ["--eval-every", "2", "--per-class", "--output", output]
    argv += ["--no-drop-last"]  # every image in every epoch: the 9th in a batch of its own
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    labels = [label for path, label in load_dataset(root, "toy").test if "broken" not in str(path)]
    assert len(labels) == 10
    (zero_shot,) = _evaluations(recorded, "zero-shot", len(labels))
    at_epoch_2, at_epoch_4, final = _evaluations(recorded, "eval", len(labels))
    want, want_zero_shot = _scores(labels, final), _scores(labels, zero_shot)
    # The conditions under which a wrong denominator or order shows.
    assert want["accuracy"] != pytest.approx(np.mean(want["per_class"]))
    assert len(set(want["per_class"])) > 1 and want["accuracy"] != want["macro_f1"]

    summary = json.loads((output / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert summary["macro_f1"] == pytest.approx(want["macro_f1"], abs=1e-9)
    assert summary["zero_shot_accuracy"] == pytest.approx(want_zero_shot["accuracy"], abs=1e-9)
    assert list(summary["per_class_accuracy"]) == CLASSES
    assert list(summary["per_class_accuracy"].values()) == pytest.approx(want["per_class"])
    assert (summary["test_images"], summary["skipped_images"]) == (10, 1)
    assert (summary["shots"], summary["seed"]) == (3, 1)
    final_line = re.search(
        r"^toy, 3 shots, seed 1, noise [\w+-]+: zero-shot CLIP (\d+\.\d\d)% -> PiNI (\d+\.\d\d)% "
        r"\(macro-F1 (\d+\.\d\d)%\)$",
        out,
        flags=re.MULTILINE,
    )
    assert final_line, out
    expected = [want_zero_shot["accuracy"], want["accuracy"], want["macro_f1"]]
    assert list(final_line.groups()) == [f"{value:.2f}" for value in expected]
    assert _per_class_lines(out) == _formatted(want["per_class"])

    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps, epochs = [], []
    for event in recorded:
        if event[0] == "loss":
            steps.append(event[1:])
        elif event[0] == "epoch":
            epochs.append(steps)
            steps = []
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4] and len(epochs) == 4
    for line, steps in zip(metrics, epochs, strict=True):
        assert sum(count for _, count in steps) == 8  # the unreadable image left out
        weighted = sum(value * count for value, count in steps) / 8
        assert line["loss"] == pytest.approx(weighted, rel=1e-12)
        assert line["skipped_images"] == 1 and line["seconds"] >= 0
    # Dassl's: the cosine counted from the end of the one warm-up epoch.
    lrs = [1e-5] + [0.01 * 0.5 * (1 + np.cos(np.pi * (epoch - 1) / 4)) for epoch in (1, 2, 3)]
    assert [m["lr"] for m in metrics] == pytest.approx(lrs, rel=1e-12)
    assert ["test_accuracy" in m for m in metrics] == [False, True, False, True]
    for line, predictions in ((metrics[1], at_epoch_2), (metrics[3], at_epoch_4)):
        assert line["test_accuracy"] == pytest.approx(_scores(labels, predictions)["accuracy"])

    recorded.clear()
    status, out, err = run_cli(
        ["eval", "--no-progress", "--per-class", "--checkpoint", output / "checkpoint.pt"], capsys
    )
    assert status == 0, err
    (again,) = _evaluations(recorded, "eval", len(labels))
    want = _scores(labels, again)
    assert f"toy: accuracy {want['accuracy']:.2f}%, macro-F1 {want['macro_f1']:.2f}% " in out
    assert "on 10 images, skipped 1 unreadable" in out
    assert _per_class_lines(out) == _formatted(want["per_class"])


# --- pini interpret: how often each nearest token appears ---------------------------------------


class _TokenIds:
    """A tokenizer whose decoding of a token is its id, so a table names tokens unambiguously."""

    def decode(self, ids: list[int]) -> str:
        return str(ids[0])


def test_interpret_counts_are_how_many_draws_have_the_token_among_their_nearest():
    """An untrained PiNI's prompt noise (its sigma spreads the 30 draws over many tokens): the
    noisy embeddings rebuilt from the spec's stream (docs/spec.md §4: prompt noise is
    noise((draws, L, width), seed + 2)), the 5 nearest vocabulary rows of each by numpy's float64
    distances, and for each position the count of draws with a token among their 5 nearest. Each
    token in the table has its count, and the counts are the 5 largest (ties in any order)."""
    import torch

    import pini
    import pini_kernels
    from pini import visualize

    torch.manual_seed(0)
    clip, tokenizer = pini.build_clip("pini-tiny")
    config = pini.PiNIConfig.table1("feature+prompt")
    model = pini.PiNI(clip, tokenizer, CLASSES, config=config)
    draws, count, seed = 30, 5, 5
    rows = visualize.interpret_prompt_noise(model, _TokenIds(), draws=draws, count=count, seed=seed)
    table = visualize.interpretation_markdown(rows, draws)
    with torch.no_grad():
        mu, sigma = (value.double().numpy() for value in model.prompt_noise())
        ids = model.token_ids[0, 1 : 1 + model.prefix_length]
        prefix = clip.token_embedding(ids).double().numpy()
        vocabulary = clip.token_embedding.weight.double().numpy()
        eps = pini_kernels.noise((draws, *prefix.shape), seed=seed + 2).double().numpy()
    noisy = prefix + mu + sigma * eps  # (draws, L, width), "add" mode
    squared = (noisy**2).sum(-1)[..., None] - 2 * noisy @ vocabulary.T + (vocabulary**2).sum(-1)
    nearest = np.argsort(squared, axis=-1)[..., :count]  # (draws, L, count)
    assert "over 30 noise draws" in table
    lines = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == len(lines) == len(ids)
    for position, (row, line) in enumerate(zip(rows, lines, strict=True)):
        tally = Counter(int(token) for token in nearest[:, position].flatten())
        assert row["position"] == position and row["token"] == str(int(ids[position]))
        shown = [(int(token), times) for token, times in row["nearest"]]
        assert [times for _, times in shown] == sorted(tally.values(), reverse=True)[:count]
        assert all(times == tally[token] for token, times in shown), (position, shown)
        cells = re.findall(r"`(\d+)` \((\d+)\)", line)
        assert [(int(token), int(times)) for token, times in cells] == shown
    assert len({times for row in rows for _, times in row["nearest"]}) > 3  # counts vary


# --- pini visualize: what the figures show ------------------------------------------------------


def test_visualize_figures_show_the_norms_and_the_noise_sample_the_model_uses(
    tmp_path, monkeypatch
):
    """noise-prompt.png's bars are |mu| and |sigma| over the embedding width at each position;
    noise-image.png's panels are the per-pixel norms over colour channels of mu, sigma and of
    sample 0 of the spec's image stream (docs/spec.md §4: noise((1, B, 3, H, W), seed + 3)),
    each image in its own row; noise-feature.png's lines and histogram of the text noise, per
    class; all computed here with numpy."""
    import torch
    from test_cli import make_folder

    import pini
    import pini_kernels
    from pini import visualize
    from pini.data.load import load_dataset
    from pini.data.transforms import clip_transforms

    figures = []
    monkeypatch.setattr(visualize, "_save", lambda figure, path: figures.append(figure) or path)
    torch.manual_seed(0)
    clip, tokenizer = pini.build_clip("pini-tiny")
    config = pini.PiNIConfig.table1("image+prompt")
    model = pini.PiNI(clip, tokenizer, CLASSES, config=config).eval()
    visualize.prompt_noise_figure(model, _TokenIds(), tmp_path / "prompt.png")
    with torch.no_grad():
        mu, sigma = (value.double().numpy() for value in model.prompt_noise())
    bars = [[bar.get_height() for bar in bars] for bars in figures[0].axes[0].containers]
    np.testing.assert_allclose(bars[0], np.linalg.norm(mu, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(bars[1], np.linalg.norm(sigma, axis=-1), rtol=1e-5)
    assert len(bars[0]) == model.prefix_length

    split = load_dataset(make_folder(tmp_path / "data" / "toy", size=16).parent, "toy")
    transform = clip_transforms(32)[1]
    seed, count = 4, 3
    visualize.image_noise_figure(
        model, split.test, transform, split.classnames, tmp_path / "i.png", count=count, seed=seed
    )
    images = torch.stack([transform(_open_rgb(path)) for path, _ in split.test[:count]])
    with torch.no_grad():
        text, _ = model.text_features(seed=seed)
        mu, sigma = (value.expand_as(images) for value in model.image_noise(images, text))
        mu, sigma = mu.double().numpy(), sigma.double().numpy()
        eps = pini_kernels.noise((1, *images.shape), seed=seed + 3)[0].double().numpy()
    shown = {"mu": mu, "sigma": sigma, "noise": mu + sigma * eps}
    axes = np.array(figures[1].axes[: count * 5]).reshape(count, 5)  # the colour bars come after
    for row in range(count):
        for column, name in ((1, "mu"), (2, "sigma"), (3, "noise")):
            drawn = axes[row, column].get_images()[0].get_array()
            want = np.linalg.norm(shown[name][row], axis=0)
            np.testing.assert_allclose(drawn, want, rtol=1e-4, atol=1e-6, err_msg=f"{row} {name}")

    # noise-feature.png: the text side's mu and sigma of each class over the dimensions, and the
    # histogram of its sigma (50 bins, numpy's).
    model = pini.PiNI(clip, tokenizer, CLASSES, config=pini.PiNIConfig.table1("text-feature"))
    visualize.feature_noise_figure(
        model, split.test, transform, split.classnames, tmp_path / "f.png", count=2
    )
    with torch.no_grad():
        _, (mu, sigma) = model.text_features(seed=0)
        mu, sigma = (value.expand(3, mu.shape[-1]).double().numpy() for value in (mu, sigma))
    panels = figures[2].axes
    for panel, values in ((panels[0], mu), (panels[1], sigma)):
        drawn = [line.get_ydata() for line in panel.get_lines()]
        np.testing.assert_allclose(drawn, values[:2], rtol=1e-5, atol=1e-7)
    heights = [bar.get_height() for bar in panels[2].patches]
    assert heights == np.histogram(sigma[:2].flatten(), bins=50)[0].tolist()


def _open_rgb(path):
    """The image at ``path`` in RGB, read before the file is closed."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_sweep_prints_and_keeps_each_runs_own_numbers(tmp_path, capsys):
    """Zero-shot CLIP (nothing to train) on two datasets of 9 and 10 test images, seeds 3 and 1
    in that order: each progress line "[i/N] ... seed S: X% (new)" and each run kept in
    sweep.json carry the numbers of that run's own summary.json, in the order of the plans."""
    from test_cli import make_folder, run_cli

    root = make_folder(tmp_path / "data" / "toy").parent
    _unequal_folder(root / "small")
    output = tmp_path / "sweep"
    argv = ["sweep", "--model", "pini-tiny", "--no-progress", "--root", root]
    argv += ["--datasets", "toy", "small", "--methods", "zero-shot", "--output", output]
    status, out, err = run_cli([*argv, "--shot-list", "1", "--seeds", "3", "1"], capsys)
    assert status == 0, err
    report = json.loads((output / "sweep.json").read_text())
    plans = [(dataset, seed) for dataset in ("toy", "small") for seed in (3, 1)]
    progress = re.findall(r"^\[(\d)/(\d)\] (\w+) zero-shot 1 shot seed (\d): (.*)%", out, re.M)
    assert len(progress) == len(report["runs"]) == 4
    for number, ((dataset, seed), line, run) in enumerate(
        zip(plans, progress, report["runs"], strict=True), 1
    ):
        summary = json.loads(
            (output / dataset / "zero-shot" / f"1shot-seed{seed}" / "summary.json").read_text()
        )
        assert line == (str(number), "4", dataset, str(seed), f"{summary['accuracy']:.2f}")
        for key in ("accuracy", "macro_f1", "zero_shot_accuracy", "test_images", "skipped_images"):
            assert run[key] == summary[key], key
        assert (run["dataset"], run["seed"], run["shots"]) == (dataset, seed, 1)
    assert [run["test_images"] for run in report["runs"]] == [9, 9, 10, 10]
