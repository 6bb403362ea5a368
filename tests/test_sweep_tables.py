"""One `pini sweep` per table of the paper: Table 1 (`--noise-rows`), Table 3 (`--eval-datasets`
on an ImageNet-trained run) and Table 4 (`--models`). Each writes its table, whose cells are
checked against the runs' own summary.json (and eval-<dataset>.json) numbers; a rerun trains and
evaluates nothing again; bad input is one line before any work. Tiny random `pini-tiny` models,
1 epoch, 1 shot, 2 seeds."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy import stats
from test_cli import TINY, assert_one_line_error, make_folder, run_cli
from test_user_numbers import _markdown_rows

from pini import sweep_grid
from pini.config import TABLE1
from pini.errors import InputError

SEEDS = [1, 2]


def _cell_text(values_by_seed: dict[int, float]) -> str:
    """A table cell as sweep.md must show it: mean ± the t half-width (numpy and scipy's t
    quantile; scipy's interval is nan where every seed gave the same accuracy)."""
    values = [values_by_seed[seed] for seed in sorted(values_by_seed)]
    half_width = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / len(values) ** 0.5
    return f"{np.mean(values):.2f} ± {half_width:.2f}"


def _accuracy(path) -> float:
    return json.loads(path.read_text())["accuracy"]


def _section(table: str, title: str) -> dict:
    """The rows of the markdown table under ``## title`` (name -> {column: cell})."""
    return _markdown_rows(table[table.index(f"## {title}\n") :].split("\n## ", 1)[0])


def _mtimes(folder) -> dict:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*.pt")} | {
        path: path.stat().st_mtime_ns for path in folder.rglob("eval-*.json")
    }


# --- Table 1: --noise-rows ---------------------------------------------------------------------


def test_noise_rows_parse_presets_generators_and_drop_repeats():
    rows = sweep_grid.rows(
        ["pini", "coop"], ["table1", "image:cnn-authors", "feature+prompt", "prompt:embedding"]
    )
    keys = [row.key for row in rows]
    assert keys[:7] == [
        "pini image",
        "pini image:attention",
        "pini feature",
        "pini feature:mlp",
        "pini prompt",
        "pini text-feature",
        "pini text-feature:embedding",
    ]  # Table 1: one location each, with each of the paper's generators for it; image is
    # image:cnn-authors and prompt is prompt:embedding, not second rows
    assert keys[7:] == ["pini feature+prompt", "coop"]
    assert rows[1].noise == {"noise": "image", "visual_generator": "attention"}
    assert rows[6].noise == {"noise": "text-feature", "text_generator": "embedding"}
    assert rows[6].folder == "pini-text-feature:embedding"
    locations = [row.key for row in sweep_grid.rows(["pini"], ["locations"])]
    assert locations == [f"pini {row}" for row in TABLE1]  # the eight --noise rows
    assert len(locations) == 8 and "pini feature+text-feature" in locations
    (prompt_first,) = sweep_grid.rows(["pini"], ["prompt+feature:mlp"])
    assert prompt_first.key == "pini feature:mlp+prompt"
    assert prompt_first.noise == {"noise": "feature+prompt", "visual_generator": "mlp"}
    generators = [row.key for row in sweep_grid.rows(["pini"], ["generators"])]
    assert generators == [
        "pini image",
        "pini image:cnn",
        "pini image:attention",
        "pini image:mlp",
        "pini image:cnn-light",
        "pini image:attention-pixels",
        "pini feature",
        "pini feature:mlp",
        "pini prompt",
        "pini text-feature:embedding",
        "pini text-feature",
    ]
    for spec, message in (
        ("image+feature", "two visual locations"),
        ("image:embedding", "image noise has the generators cnn-authors, cnn, attention"),
        ("pixels", "expected a Table 1 row"),
        ("prompt:", "expected a Table 1 row"),
    ):
        with pytest.raises(InputError, match=message):
            sweep_grid.rows(["pini"], [spec])


def test_a_text_noise_option_applies_to_the_noise_rows_that_use_it(tmp_path, capsys):
    """--fixed-prompt, the per-step draws, --head-init are options some rows do not use: each
    row that uses one is recorded with it, the others with their default; one that no row uses
    is refused."""
    data = make_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "rows"
    argv = ["sweep", *TINY, "--root", data, "--dataset", "toy", "--output", output]
    argv += ["--noise-rows", "feature", "prompt", "text-feature", "--num-samples", "2"]
    argv += ["--shot-list", "1", "--seeds", "1", "--methods", "pini"]
    options = ["--fixed-prompt", "placeholder", "--no-prompt-noise-per-step"]
    options += ["--no-text-feature-noise-per-step", "--head-init", "small"]
    status, _, err = run_cli([*argv, *options], capsys)
    assert status == 0, err

    def config(row):
        path = output / "toy" / f"pini-{row}" / "1shot-seed1" / "run.json"
        return json.loads(path.read_text())["pini_config"]

    keys = ("fixed_prompt", "prompt_noise_per_step", "text_feature_noise_per_step", "head_init")
    recorded = {row: [config(row)[key] for key in keys] for row in ("feature", "prompt")}
    assert recorded == {
        "feature": ["placeholder", True, True, "small"],
        "prompt": ["hand-written", False, True, "default"],  # learnable mu, sigma: no layers
    }
    assert [config("text-feature")[key] for key in keys] == ["placeholder", True, False, "small"]
    refused = ["sweep", *TINY, "--root", data, "--dataset", "toy", "--output", tmp_path / "x"]
    refused += ["--noise-rows", "feature", "image", "--no-text-feature-noise-per-step"]
    assert_one_line_error(
        run_cli(refused, capsys),
        "--text-feature-noise-per-step: none of the --noise-rows uses it (feature, image)",
    )
    refused[-1] = "--head-init=small"  # learnable mu and sigma alone have no output layers
    refused[refused.index("feature")] = "prompt"
    refused[refused.index("image")] = "text-feature:embedding"
    assert_one_line_error(
        run_cli(refused, capsys),
        "--head-init: none of the --noise-rows uses it (prompt, text-feature:embedding); for "
        "text-feature:embedding, --head-init initialises the generators' output layers",
    )


def test_table1_sweep_writes_one_row_per_noise_row_and_resumes(tmp_path, capsys):
    data = make_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "table1"
    argv = ["sweep", *TINY, "--root", data, "--dataset", "toy", "--output", output]
    argv += ["--noise-rows", "image:mlp", "prompt", "--shot-list", "1", "--seeds", *SEEDS]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    rows = {
        "zero-shot": "zero-shot",
        "pini image:mlp": "pini-image:mlp",
        "pini prompt": "pini-prompt",
    }
    run = json.loads((output / "toy" / "pini-image:mlp" / "1shot-seed1" / "run.json").read_text())
    assert run["pini_config"]["visual"] == "image" and run["pini_config"]["text"] == "none"
    assert run["pini_config"]["visual_generator"] == "mlp"
    table = (output / "sweep.md").read_text()
    assert table in out and "PiNI gain" not in table
    written = _section(table, "1 shot")
    report = json.loads((output / "sweep.json").read_text())
    assert report["methods"] == list(rows)
    for key, folder in rows.items():
        found = {
            s: _accuracy(output / "toy" / folder / f"1shot-seed{s}" / "summary.json") for s in SEEDS
        }
        name = key.replace("pini", "PiNI").replace("zero-shot", "zero-shot CLIP")
        assert written[name]["toy"] == written[name]["average"] == _cell_text(found), key
        assert report["accuracy"][key]["datasets"]["toy"]["1"]["values"] == [found[1], found[2]]
    assert re.search(r"^\[3/6\] toy pini image:mlp 1 shot seed 1: [\d.]+% \(new\)$", out, re.M)
    before = _mtimes(output)
    status, again, err = run_cli(argv, capsys)
    assert status == 0, err
    assert again.count("(done before)") == 6 and _mtimes(output) == before
    assert (output / "sweep.md").read_text() == table


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--noise-rows", "prompt", "--visual", "feature"], "--visual: each --noise-rows row"),
        (["--noise-rows", "prompt", "--noise", "image"], "--noise: each --noise-rows row"),
        (["--noise-rows", "prompt", "--methods", "coop"], "--methods has no pini"),
        (["--noise-rows", "image+feature"], "two visual locations (image, feature)"),
        (["--models", "pini-tiny", "--model", "pini-tiny"], "leave out --model"),
        (["--models", "=w.pt"], "--models =w.pt: expected MODEL or MODEL=WEIGHTS"),
        (
            ["--models", "pini-tiny", "no-such-model=openai"],
            "unknown open_clip model 'no-such-model'",
        ),
    ],
)
def test_table_flags_that_cannot_work_are_one_line_before_any_run(
    tmp_path, capsys, extra, fragment
):
    data = make_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "sweep"
    argv = ["sweep", "--no-progress", "--root", data, "--dataset", "toy", "--output", output]
    argv += ["--shot-list", "1", "--seeds", "1", "--epochs", "1"]
    assert_one_line_error(run_cli([*argv, *extra], capsys), fragment)
    assert not output.exists()


# --- Table 3: --eval-datasets ------------------------------------------------------------------

WNIDS = ["n01440764", "n01443537", "n01491361"]
CLASSNAMES = "n01491361 great white shark\nn01440764 tench\nn01443537 goldfish\n"


def _imagenet_layout(root):
    """Tiny ImageNet, ImageNetV2, -Sketch, -A and -R in CoOp's layout, 3 classes (A and R hold 2
    of them), each image a flat colour that differs by class, image and dataset."""
    from PIL import Image

    folders = {
        "imagenet": [("images/train", WNIDS), ("images/val", WNIDS)],
        "imagenetv2": [("imagenetv2-matched-frequency-format-val", ["0", "1", "2"])],
        "imagenet-sketch": [("images", WNIDS)],
        "imagenet-adversarial": [("imagenet-a", WNIDS[1:])],
        "imagenet-rendition": [("imagenet-r", WNIDS[:1] + WNIDS[2:])],
    }
    for number, (dataset, parts) in enumerate(folders.items()):
        (root / dataset).mkdir(parents=True)
        (root / dataset / "classnames.txt").write_text(CLASSNAMES)
        for part, classes in parts:
            for label, name in enumerate(classes):
                (root / dataset / part / name).mkdir(parents=True)
                for i in range(3):
                    colour = (70 * label % 256, (50 * i + 40 * number) % 256, 200 - 60 * label)
                    Image.new("RGB", (8, 8), colour).save(
                        root / dataset / part / name / f"{i}.JPEG"
                    )
    return root


TARGETS = ["imagenetv2", "imagenet-sketch", "imagenet-adversarial", "imagenet-rendition"]


def test_table3_trains_on_imagenet_and_tabulates_pini_evals_on_its_variants(tmp_path, capsys):
    data = _imagenet_layout(tmp_path / "data")
    output = tmp_path / "table3"
    argv = ["sweep", *TINY, "--root", data, "--dataset", "imagenet", "--output", output]
    argv += ["--eval-datasets", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r"]
    argv += ["--methods", "zero-shot", "pini", "--shot-list", "1", "--seeds", *SEEDS]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    table = (output / "sweep.md").read_text()
    assert table in out and (output / "sweep.png").is_file()
    written = _section(table, "1 shot")
    report = json.loads((output / "sweep.json").read_text())
    assert report["datasets"] == ["imagenet", *TARGETS] and report["averaged"] == TARGETS
    averages = {}
    for method, name in (("zero-shot", "zero-shot CLIP"), ("pini", "PiNI")):
        folders = {s: output / "imagenet" / method / f"1shot-seed{s}" for s in SEEDS}
        source = {s: _accuracy(folders[s] / "summary.json") for s in SEEDS}
        assert written[name]["imagenet (source)"] == _cell_text(source)
        by_target = {
            t: {s: _accuracy(folders[s] / f"eval-{t}.json") for s in SEEDS} for t in TARGETS
        }
        for target in TARGETS:
            assert written[name][target] == _cell_text(by_target[target]), (method, target)
        average = {s: sum(by_target[t][s] for t in TARGETS) / len(TARGETS) for s in SEEDS}
        assert written[name]["target average"] == _cell_text(average), method
        averages[method] = average
    gain = {s: averages["pini"][s] - averages["zero-shot"][s] for s in SEEDS}
    mean, half_width = _cell_text(gain).split(" ± ")
    assert written["zero-shot CLIP"]["PiNI gain"] == f"{float(mean):+.2f} ± {half_width}"
    # each evaluation is pini eval's on that dataset (ImageNet-A: its 2 classes of 3)
    run = output / "imagenet" / "pini" / "1shot-seed2"
    evaluation = json.loads((run / "eval-imagenet-adversarial.json").read_text())
    assert evaluation["test_images"] == 6
    line = "[4/4] imagenet pini 1 shot seed 2 on imagenet-adversarial: "
    assert f"{line}{evaluation['accuracy']:.2f}% (evaluated)" in out
    checkpoint = ["--checkpoint", run / "checkpoint.pt", "--no-progress"]
    status, printed, err = run_cli(
        ["eval", *checkpoint, "--root", data, "--dataset", "imagenet-a"], capsys
    )
    assert status == 0, err
    assert printed.startswith(f"imagenet-adversarial: accuracy {evaluation['accuracy']:.2f}%, ")
    before = _mtimes(output)
    status, again, err = run_cli(argv, capsys)
    assert status == 0, err
    assert again.count("(done before)") == 4 * (1 + len(TARGETS)) and _mtimes(output) == before
    assert (output / "sweep.md").read_text() == table
    # a target whose test images changed is evaluated again, the rest reused
    listing = json.loads((run / "eval-imagenet-sketch.json").read_text())["listing"]
    (data / "imagenet-sketch" / "images" / WNIDS[0] / "0.JPEG").rename(
        data / "imagenet-sketch" / "images" / WNIDS[1] / "9.JPEG"
    )
    status, changed, err = run_cli(argv, capsys)
    assert status == 0, err
    assert re.findall(r" on (\S+): [\d.]+% \(evaluated\)", changed) == ["imagenet-sketch"] * 4
    assert changed.count("(done before)") == 4 * len(TARGETS)
    assert json.loads((run / "eval-imagenet-sketch.json").read_text())["listing"] != listing
    # an entry from before model_classes was recorded is evaluated again on a dataset with a
    # class subset, now on its 2 classes
    path = run / "eval-imagenet-adversarial.json"
    entry = json.loads(path.read_text())
    assert entry["model_classes"] == 2
    del entry["model_classes"]
    path.write_text(json.dumps(entry))
    v2 = json.loads((run / "eval-imagenetv2.json").read_text())
    assert v2.pop("model_classes") == 3  # no class subset: reused without it
    (run / "eval-imagenetv2.json").write_text(json.dumps(v2))
    status, rerun, err = run_cli(argv, capsys)
    assert status == 0, err
    evaluated = re.findall(r"seed (\d) on (\S+): [\d.]+% \(evaluated\)", rerun)
    assert evaluated == [("2", "imagenet-adversarial")]
    assert json.loads(path.read_text()) == dict(entry, model_classes=2)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--dataset", "imagenet-sketch"], "dataset imagenet-sketch is test-only"),
        (
            ["--datasets", "imagenet", "toy", "--eval-datasets", "imagenetv2"],
            "--eval-datasets evaluates the runs of one training dataset",
        ),
        (
            ["--dataset", "imagenet", "--eval-datasets", "imagenet"],
            "--eval-datasets imagenet is the training dataset",
        ),
        (
            [
                "--dataset",
                "toy",
                "--eval-datasets",
                "imagenetv2",
                "--methods",
                "pini",
                "linear-probe",
            ],
            "the run learned",
        ),
        (["--dataset", "imagenet", "--eval-datasets", "no_such_set"], "no_such_set"),
    ],
)
def test_table3_refuses_what_cannot_be_evaluated_before_any_run(tmp_path, capsys, extra, fragment):
    data = _imagenet_layout(tmp_path / "data")
    make_folder(data / "toy")
    output = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--root", data, "--output", output, "--shot-list", "1"]
    assert_one_line_error(run_cli([*argv, "--seeds", "1", *extra], capsys), fragment)
    assert not output.exists()


# --- Table 4: --models -------------------------------------------------------------------------


def test_table4_tabulates_methods_against_backbones(tmp_path, capsys):
    import torch

    from pini.backbone import build_clip

    torch.manual_seed(123)
    weights = tmp_path / "other.pt"
    torch.save(build_clip("pini-tiny")[0].state_dict(), weights)
    data = make_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "table4"
    backbones = ["pini-tiny", f"pini-tiny={weights}"]
    argv = ["sweep", *TINY[2:], "--no-progress", "--root", data, "--dataset", "toy"]
    argv += ["--output", output, "--models", *backbones, "--methods", "zero-shot", "pini"]
    status, out, err = run_cli([*argv, "--shot-list", "1", "--seeds", *SEEDS], capsys)
    assert status == 0, err
    table = (output / "sweep.md").read_text()
    assert table in out and not (output / "sweep.png").exists()
    written = _section(table, "Backbones, 1 shot")
    report = json.loads((output / "sweep.json").read_text())
    assert report["backbones"] == backbones
    folders = {"pini-tiny": "pini-tiny", backbones[1]: re.sub(r"[^\w.+-]", "_", backbones[1])}
    for method, name in (("zero-shot", "zero-shot CLIP"), ("pini", "PiNI")):
        for backbone, folder in folders.items():
            runs = output / folder / "toy" / method
            found = {s: _accuracy(runs / f"1shot-seed{s}" / "summary.json") for s in SEEDS}
            assert written[name][backbone] == _cell_text(found), (method, backbone)
            assert _section(table, f"{backbone}, 1 shot")[name]["toy"] == _cell_text(found)
            record = json.loads((runs / "1shot-seed1" / "run.json").read_text())
            assert record["pretrained"] == (None if backbone == "pini-tiny" else str(weights))
    status, again, err = run_cli([*argv, "--shot-list", "1", "--seeds", *SEEDS], capsys)
    assert status == 0, err
    assert again.count("(done before)") == 8


def test_overwrite_replaces_a_run_with_its_evaluations(tmp_path):
    """eval-<dataset>.json (and a failed write's .tmp) are the run's own files: --overwrite
    deletes them with the run instead of refusing the folder as holding foreign files. A failed
    write's split-*.json.tmp was listed twice and its second deletion raised FileNotFoundError."""
    from pini import run_folders

    folder = tmp_path / "run"
    folder.mkdir()
    for name in (
        "run.json",
        "summary.json",
        "eval-imagenet-sketch.json",
        "eval-imagenetv2.json.tmp",
        "split-1shot-seed1.json",
        "split-1shot-seed1.json.tmp",
    ):
        (folder / name).write_text("{}")
    run_folders.check_folder(folder, overwrite=True)
    run_folders.prepare_folder(folder, overwrite=True)
    assert sorted(path.name for path in folder.iterdir()) == []
    (folder / "notes.txt").write_text("mine")
    (folder / "eval-imagenetv2.json").write_text("{}")
    with pytest.raises(InputError, match=r"also holds other files \(notes.txt\)"):
        run_folders.check_folder(folder, overwrite=True)
