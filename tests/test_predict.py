"""`pini predict` and `pini.predict`: a run's top-k classes of new images with their
probabilities, equal to the stored model's own logits softmaxed, in a CSV and a JSON that agree;
folders, unreadable images, a fitted baseline, PiNI's inference noise options, one-line refusals.

Tiny ImageFolder trees and the random `pini-tiny` backbone, as in test_cli.py.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image
from test_cli import TINY, assert_one_line_error, make_folder, run_cli

from pini import cli, runner
from pini.backbone import encode_image
from pini.predict import load_run, predict


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """({method: RUN}, DATA): a run of PiNI and of three untrained baselines on the toy data."""
    base = tmp_path_factory.mktemp("predict")
    data = make_folder(base / "data" / "toy").parent
    common = ["--root", data, "--dataset", "toy", "--shots", "2"]
    made = {}
    fitted = ["--model", "pini-tiny"]  # no training flags: nothing is trained
    methods = {"pini": TINY, "linear-probe": fitted, "tip-adapter": fitted, "zero-shot": fitted}
    for method, flags in methods.items():
        output = base / method
        argv = ["train", *flags, "--no-progress", "--method", method, *common, "--output", output]
        assert cli.main([str(a) for a in argv]) == 0
        made[method] = output
    return made, data


def _images(data) -> list[str]:
    return sorted(str(path) for path in (data / "toy" / "test").rglob("*.png"))


def _expected(model, images, transform, seed=0) -> torch.Tensor:
    """(N, C) probabilities computed here: the model's own logits on the images, softmaxed."""
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in images])
    with torch.no_grad():
        return model(batch, seed=seed).float().softmax(dim=-1)


def test_predictions_are_the_models_logits_softmaxed_in_top_k_order(runs):
    made, data = runs
    model, classnames, transform = load_run(made["pini"] / "checkpoint.pt")
    images = _images(data)
    rows = predict(model, images, transform, top_k=2, classnames=classnames)
    expected = _expected(model, images, transform)
    assert [row["image"] for row in rows] == images
    for row, probabilities in zip(rows, expected, strict=True):
        assert len(row["top_k"]) == 2
        values = [entry["probability"] for entry in row["top_k"]]
        assert values == sorted(values, reverse=True)
        order = probabilities.argsort(descending=True)[:2]
        assert [entry["class"] for entry in row["top_k"]] == [classnames[i] for i in order]
        torch.testing.assert_close(torch.tensor(values), probabilities[order])
    everything = predict(model, images, transform, top_k=99, classnames=classnames)
    assert all(len(row["top_k"]) == len(classnames) for row in everything)
    in_memory = [Image.new("RGB", (9, 7), (200, 30, 90)), Image.open(images[0])]
    named = predict(model, in_memory, transform, top_k=1, classnames=classnames)
    assert [row["image"] for row in named] == ["image 0", images[0]]


@pytest.mark.parametrize("method", ["pini", "linear-probe", "tip-adapter", "zero-shot"])
def test_top_1_predictions_score_what_pini_eval_scores(runs, method, capsys):
    """The same model, transform and noise seeds as `pini eval`: the same accuracy."""
    made, data = runs
    checkpoint = made[method] / "checkpoint.pt"
    status, out, err = run_cli(["eval", "--no-progress", "--checkpoint", checkpoint], capsys)
    assert status == 0, err
    accuracy = float(out.split("accuracy ")[1].split("%")[0])
    model, classnames, transform = load_run(checkpoint)
    images = _images(data)  # the test set in pini eval's order: class folders, then files
    rows = predict(model, images, transform, top_k=1, classnames=classnames)
    right = [row["top_k"][0]["class"] == row["image"].split("/")[-2] for row in rows]
    assert f"{100 * sum(right) / len(right):.2f}" == f"{accuracy:.2f}"


def test_average_inference_gives_the_mean_probabilities_not_a_second_softmax(runs):
    made, data = runs
    model, classnames, transform = load_run(made["pini"] / "checkpoint.pt", inference="average")
    images = _images(data)[:3]
    rows = predict(model, images, transform, top_k=3, classnames=classnames)
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in images])
    with torch.no_grad():
        samples = model.sample_logits(batch, model.config.inference_samples, seed=0)
    expected = samples.float().softmax(dim=-1).mean(dim=0)
    for row, probabilities in zip(rows, expected, strict=True):
        found = torch.tensor([entry["probability"] for entry in row["top_k"]])
        torch.testing.assert_close(found, probabilities.sort(descending=True).values[:3])


def _read_outputs(folder) -> tuple[list[dict], list[dict]]:
    with open(folder / "predictions.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    return rows, json.loads((folder / "predictions.json").read_text())


def test_cli_reads_folders_recursively_warns_on_unreadable_images_and_csv_equals_json(
    runs, tmp_path, capsys
):
    made, data = runs
    images = tmp_path / "images"
    (images / "deeper").mkdir(parents=True)
    sources = _images(data)
    Image.open(sources[0]).save(images / "a.png")
    Image.open(sources[4]).save(images / "deeper" / "b.jpg")
    (images / "broken.png").write_bytes(b"not an image")
    (images / "notes.txt").write_text("not listed")
    output = tmp_path / "out"
    checkpoint = made["pini"] / "checkpoint.pt"
    flags = ["--top-k", "2", "--output", output, "--no-progress"]
    status, out, err = run_cli(
        ["predict", "--checkpoint", checkpoint, images, sources[1], *flags], capsys
    )
    assert status == 0, err
    broken, first, second = str(images / "broken.png"), str(images / "a.png"), sources[1]
    deeper = str(images / "deeper" / "b.jpg")
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith(f"pini predict: warning: cannot read {broken} (")
    lines = out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines[:-1]] == [first, deeper, second]
    assert lines[-1] == f"written: {output / 'predictions.csv'}, {output / 'predictions.json'}"
    table, listed = _read_outputs(output)
    assert [row["image"] for row in listed] == [first, broken, deeper, second]  # a folder sorted
    assert "top_k" not in listed[1] and "UnidentifiedImageError" in listed[1]["error"]
    from_json = [
        {"image": row["image"], "rank": str(rank), "class": entry["class"]}
        | {"probability": entry["probability"]}
        for row in [listed[0], *listed[2:]]
        for rank, entry in enumerate(row["top_k"], 1)
    ]
    assert [{**row, "probability": float(row["probability"])} for row in table] == from_json
    best = listed[0]["top_k"][0]
    assert lines[0] == f"{first}: {best['class']} ({100 * best['probability']:.2f}%)"


def test_a_fitted_baseline_predicts_from_its_features(runs, capsys):
    made, data = runs
    checkpoint = made["linear-probe"] / "checkpoint.pt"
    images = _images(data)
    status, out, err = run_cli(["predict", "--checkpoint", checkpoint, *images], capsys)
    assert status == 0, err
    _, listed = _read_outputs(made["linear-probe"])  # the run's folder by default
    _, probe, clip = runner.load_stored_model(checkpoint)
    _, classnames, transform = load_run(checkpoint)
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in images])
    with torch.no_grad():
        expected = probe.logits(encode_image(clip, batch).float()).softmax(dim=-1)
    for row, probabilities in zip(listed, expected, strict=True):
        top = probabilities.argmax()
        assert row["top_k"][0]["class"] == classnames[top]
        assert row["top_k"][0]["probability"] == pytest.approx(float(probabilities[top]))
    assert len(out.strip().splitlines()) == len(images) + 1


def test_pini_inference_mean_differs_from_sample_and_every_mode_repeats_with_its_seed(runs):
    made, data = runs
    checkpoint, images = made["pini"] / "checkpoint.pt", _images(data)

    def probabilities(inference, seed):
        model, classnames, transform = load_run(checkpoint, inference=inference)
        rows = predict(model, images, transform, top_k=3, classnames=classnames, seed=seed)
        return [[entry["probability"] for entry in row["top_k"]] for row in rows]

    sample, mean = probabilities("sample", 0), probabilities("mean", 0)
    assert sample != mean
    assert sample == probabilities("sample", 0) and mean == probabilities("mean", 0)
    assert probabilities("sample", 1) != sample
    torch.testing.assert_close(torch.tensor(probabilities("mean", 1)), torch.tensor(mean))


def test_refusals_are_one_line(runs, tmp_path, capsys):
    made, data = runs
    probe = made["linear-probe"] / "checkpoint.pt"
    image = _images(data)[0]
    quiet = "--no-progress"
    assert_one_line_error(
        run_cli(["predict", quiet, "--checkpoint", probe, image, "--inference", "mean"], capsys),
        "--inference",
        "LinearProbe",
    )
    pini_run = made["pini"] / "checkpoint.pt"
    assert_one_line_error(
        run_cli(["predict", quiet, "--checkpoint", pini_run, tmp_path / "missing.png"], capsys),
        "missing.png",
    )
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        run_cli(["predict", quiet, "--checkpoint", pini_run, tmp_path / "empty"], capsys),
        "no image files",
    )
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert_one_line_error(
        run_cli(["predict", quiet, "--checkpoint", pini_run, tmp_path / "bad.png"], capsys),
        "no image could be read of the 1 given",
    )
    assert_one_line_error(
        run_cli(["predict", quiet, "--checkpoint", pini_run, image, "--top-k", "0"], capsys),
        "--top-k",
    )
    assert not (made["pini"] / "predictions.csv").exists()


def test_help_states_every_default(capsys):
    status, out, err = run_cli(["predict", "--help"], capsys)
    assert status == 0 and "usage: pini predict" in out and not err
    text = " ".join(out.split())
    for flag in [
        "--top-k",
        "--output",
        "--inference ",
        "--inference-samples",
        "--seed",
        "--device",
    ]:
        assert flag in text
    assert text.count("default") >= 6
