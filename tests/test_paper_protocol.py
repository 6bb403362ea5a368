"""The paper's protocol as the authors run it (docs/training.md, "Differences from the paper and
the authors' code"): the prompt of the rows without prompt noise, ImageNet-A/-R models built on
their 200 classes, fp16 everywhere as an option, one prompt and one text-feature noise draw per
training step."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import pini
import pini.noise_paths
import pini_kernels
from pini import cli, runner
from pini.config import TABLE1
from pini.data.load import load_dataset
from pini.data.split import Split
from tests.test_cli import assert_one_line_error, make_folder, run_cli, toy_train

CLASSES = ["cat", "dog", "bird"]
NO_PROMPT_ROWS = [row for row, values in TABLE1.items() if values["text"] != "prompt"]


def _model(row: str, classes=CLASSES, **overrides) -> pini.PiNI:
    torch.manual_seed(0)
    clip, tokenizer = pini.build_clip("pini-tiny")
    config = pini.PiNIConfig.table1(row, **overrides)
    return pini.PiNI(
        clip,
        tokenizer,
        classes,
        pini.TEMPLATES["oxford_pets"],
        config,
        zero_shot_template=pini.zero_shot_template("oxford_pets"),
    )


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- 1. rows without prompt noise read the hand-written prompt ---------------------------------


@pytest.mark.parametrize("row", NO_PROMPT_ROWS)
def test_rows_without_prompt_noise_read_the_hand_written_prompt(row):
    model = _model(row)
    text, _ = model.text_features(seed=0)
    assert torch.equal(text, model.zero_shot_text)  # "a photo of a cat, a type of pet."
    assert not torch.allclose(text, model.placeholder_prompt_text)
    placeholder = _model(row, fixed_prompt="placeholder")
    assert torch.equal(placeholder.text_features(seed=0)[0], placeholder.placeholder_prompt_text)


@pytest.mark.parametrize("row", ["feature", "text-feature", "feature+text-feature"])
def test_without_noise_such_a_row_is_zero_shot_clip(row):
    """Generators that give mu = 0, sigma = 0: the logits are zero-shot CLIP's (the hand-written
    prompt), or with fixed_prompt="placeholder" those of the frozen CLIP on PiNI's prompt."""
    images = _images()
    for fixed_prompt, reference in (
        ("hand-written", pini.PiNI.zero_shot_logits),
        ("placeholder", pini.PiNI.placeholder_prompt_logits),
    ):
        model = _model(row, fixed_prompt=fixed_prompt).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.zero_()
            torch.testing.assert_close(model(images, seed=3), reference(model, images))


def test_prompt_rows_still_read_the_placeholder_prompt():
    """The prompt noise perturbs PiNI's 16-placeholder prompt: with mu = 0 and sigma = 0 the
    text is the frozen CLIP's on it."""
    model = _model("feature+prompt")
    with torch.no_grad():
        for parameter in model.prompt_noise.parameters():
            parameter.zero_()
        text, _ = model.text_features(seed=0)
    torch.testing.assert_close(text, model.placeholder_prompt_text, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(text, model.zero_shot_text, atol=1e-3)


def test_fixed_prompt_flag_is_stored_and_refused_on_prompt_rows(tmp_path, capsys):
    data = make_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "run"
    status, _, err = run_cli(
        toy_train(data, output, "--noise", "feature", "--fixed-prompt", "placeholder"), capsys
    )
    assert status == 0, err
    record = json.loads((output / "run.json").read_text())["pini_config"]
    assert record["fixed_prompt"] == "placeholder" and record["prompt_noise_per_step"] is True
    default = tmp_path / "default"
    assert run_cli(toy_train(data, default, "--noise", "image"), capsys)[0] == 0
    assert json.loads((default / "run.json").read_text())["pini_config"]["fixed_prompt"] == (
        "hand-written"
    )
    result = run_cli(
        toy_train(data, tmp_path / "x", "--noise", "prompt", "--fixed-prompt", "placeholder"),
        capsys,
    )
    assert_one_line_error(result, "--fixed-prompt", "rows without prompt noise", "--text prompt")
    result = run_cli(
        toy_train(data, tmp_path / "y", "--noise", "feature", "--no-prompt-noise-per-step"),
        capsys,
    )
    assert_one_line_error(
        result, "--prompt-noise-per-step", "has none (--text none, --num-samples 1)"
    )


def _strip_from_record(output, keys) -> None:
    """The run's record (run.json and the checkpoint's) without ``pini_config[key]``: as a run
    of a pini from before those options wrote it."""
    for path in (output / "run.json", output / "checkpoint.pt"):
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            for key in keys:
                del record["pini_config"][key]
            path.write_text(json.dumps(record))
        else:
            state = torch.load(path, weights_only=False)
            for key in keys:
                del state["run"]["pini_config"][key]
            torch.save(state, path)


def test_a_run_from_before_these_options_reads_as_it_was_trained(tmp_path, capsys):
    """Its record lacks the new options: it read the placeholder prompt and drew prompt noise
    per sample, so a record without them reads as that (pini.runs.OPTIONS_ADDED, docs/spec.md
    §11) and evaluates as before; a record without any other key is still refused."""
    data = make_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "run"
    flags = ("--noise", "feature", "--fixed-prompt", "placeholder")
    assert run_cli(toy_train(data, output, *flags), capsys)[0] == 0
    evaluate = ["eval", "--checkpoint", output / "checkpoint.pt"]
    status, before, _ = run_cli(evaluate, capsys)
    assert status == 0
    _strip_from_record(
        output, ("fixed_prompt", "prompt_noise_per_step", "text_feature_noise_per_step")
    )
    status, after, err = run_cli(evaluate, capsys)
    assert status == 0, err
    assert after == before
    _strip_from_record(output, ("mode",))
    result = run_cli(evaluate, capsys)
    assert_one_line_error(result, "'pini_config'", "missing ['mode']", "train it anew")


# --- 2. ImageNet-A and -R: the model on their classes ------------------------------------------

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]


def _imagenet_root(root):
    """ImageNet (4 classes, train and val) and ImageNet-A holding 2 of them, CoOp's layout."""
    classnames = "".join(f"{wnid} {name}\n" for wnid, name in zip(WNIDS, NAMES, strict=True))
    for folder, parts in (("imagenet", ("images/train", "images/val")), ("imagenet-a", ())):
        (root / folder).mkdir(parents=True)
        (root / folder / "classnames.txt").write_text(classnames)
        for part in parts:
            for label, wnid in enumerate(WNIDS):
                (root / folder / part / wnid).mkdir(parents=True)
                for number in range(3):
                    color = (60 * label, 40 * number, 200 - 50 * label)
                    path = root / folder / part / wnid / f"{number}.png"
                    Image.new("RGB", (8, 8), color).save(path)
    for label in (1, 3):
        (root / "imagenet-a" / "imagenet-a" / WNIDS[label]).mkdir(parents=True)
        for number in range(2):
            color = (30 * label, 90 * number, 100)
            Image.new("RGB", (8, 8), color).save(
                root / "imagenet-a" / "imagenet-a" / WNIDS[label] / f"{number}.png"
            )
    return root


def test_on_class_subset_keeps_the_subset_classes_relabelled():
    split = Split(NAMES, [], [("a", 1), ("b", 3), ("c", 1)], "x", class_subset=[1, 3])
    subset = split.on_class_subset()
    assert subset.classnames == ["goldfish", "tiger shark"] and subset.class_subset is None
    assert subset.test == [("a", 0), ("b", 1), ("c", 0)]
    assert Split(NAMES, [], [("a", 1)], "x").on_class_subset().classnames == NAMES
    with pytest.raises(ValueError, match=r"labels \[2\] of x are not in class_subset"):
        Split(NAMES, [], [("a", 2)], "x", class_subset=[1, 3]).on_class_subset()


@pytest.mark.parametrize(
    "row, classes",
    [
        ("feature", 2),
        ("feature+prompt", 2),
        ("image+text-feature", 2),
        ("text-feature-emb", 2),
        ("feature+text-feature-emb", 2),
    ],
)
def test_an_imagenet_run_on_imagenet_a_is_built_on_its_classes(tmp_path, capsys, row, classes):
    """The feature cross-attention reads the 2 classes of ImageNet-A's subset, not ImageNet's 4;
    a run that learned noise per class is built on the 2 with its rows of that noise."""
    root = _imagenet_root(tmp_path / "data")
    noise = ["--noise", row.removesuffix("-emb")]
    if row.endswith("-emb"):
        noise += ["--text-generator", "embedding"]
    output = tmp_path / "run"
    argv = ["train", "--model", "pini-tiny", "--no-progress", "--batch-size", "4", "--epochs", "1"]
    argv += ["--root", root, "--dataset", "imagenet", "--shots", "2", "--output", output, *noise]
    status, _, err = run_cli(argv, capsys)
    assert status == 0, err
    eval_flags = ["--checkpoint", output / "checkpoint.pt", "--root", root, "--no-progress"]
    eval_flags += ["--dataset", "imagenet-a"]
    args = cli._parser().parse_args(["eval", *map(str, eval_flags), "--device", "cpu"])
    _, split, model, _ = runner.load_stored_method(args, "eval")
    assert model.num_classes == classes and len(split.classnames) == classes
    assert split.classnames == (["goldfish", "tiger shark"] if classes == 2 else NAMES)
    seen = []
    if model.visual_generator is not None and model._reads_text():
        model.visual_generator.register_forward_hook(
            lambda module, inputs, output: seen.append(inputs[1].shape[-2])
        )
    text, _ = model.text_features(seed=0)
    assert text.shape[-2] == classes
    status, out, err = run_cli(["eval", *eval_flags, "--per-class"], capsys)
    assert status == 0, err
    assert out.startswith("imagenet-adversarial: accuracy") and "on 4 images" in out
    assert len(out.splitlines()) == 1 + classes  # one line per class of the model
    if row.startswith("feature"):  # the cross-attention read the subset's text features
        model(torch.randn(2, 3, 32, 32), seed=0)
        assert seen == [2]
    if row.endswith("-emb"):  # classes 1 and 3's rows of the learned (mu, sigma), in order
        stored = torch.load(output / "checkpoint.pt", weights_only=False)["trained_state"]
        for name in ("mu", "raw_sigma"):
            learned = stored[f"text_generator.{name}"]
            assert learned.shape[0] == 4
            assert torch.equal(getattr(model.text_generator, name).detach(), learned[[1, 3]])


def test_per_class_text_noise_cut_to_a_class_subset_gives_those_classes_logits(tmp_path, capsys):
    """By value: with per-class text noise alone, class c's logit reads only class c's text and
    noise, so the 2-class model's logits (noise mean) are the 4-class model's columns 1 and 3."""
    root = _imagenet_root(tmp_path / "data")
    output = tmp_path / "run"
    argv = ["train", "--model", "pini-tiny", "--no-progress", "--batch-size", "4", "--epochs", "2"]
    argv += ["--root", root, "--dataset", "imagenet", "--shots", "2", "--output", output]
    argv += ["--noise", "text-feature", "--text-generator", "embedding"]
    assert run_cli(argv, capsys)[0] == 0
    models = {}
    for dataset in ("imagenet", "imagenet-a"):
        flags = ["--checkpoint", output / "checkpoint.pt", "--root", root, "--dataset", dataset]
        args = cli._parser().parse_args(["eval", *map(str, flags), "--inference", "mean"])
        _, _, models[dataset], _ = runner.load_stored_method(args, "eval", inference=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, subset = (models[name](images, seed=0) for name in ("imagenet", "imagenet-a"))
    assert full.shape == (3, 4) and subset.shape == (3, 2)
    torch.testing.assert_close(subset, full[:, [1, 3]], rtol=1e-5, atol=1e-5)


def test_a_linear_probe_on_imagenet_a_keeps_its_classes_with_restricted_logits(tmp_path, capsys):
    """Its per-class weights are not cut: the model keeps ImageNet's 4 classes and the logits
    are restricted to ImageNet-A's 2 (the same predictions: a class's logit reads its own row)."""
    root = _imagenet_root(tmp_path / "data")
    output = tmp_path / "probe"
    argv = ["train", "--model", "pini-tiny", "--no-progress", "--method", "linear-probe"]
    argv += ["--root", root, "--dataset", "imagenet", "--shots", "2", "--output", output]
    assert run_cli(argv, capsys)[0] == 0
    flags = ["--checkpoint", output / "checkpoint.pt", "--root", root, "--dataset", "imagenet-a"]
    args = cli._parser().parse_args(["eval", *map(str, flags)])
    _, split, _, _ = runner.load_stored_method(args, "eval")
    assert split.classnames == NAMES and split.class_subset == [1, 3]
    status, out, err = run_cli(["eval", *flags, "--no-progress"], capsys)
    assert status == 0, err
    assert "on 4 images" in out


def test_imagenet_a_loads_with_a_class_subset_that_on_class_subset_resolves(tmp_path):
    root = _imagenet_root(tmp_path / "data")
    split = load_dataset(root, "imagenet-a")
    assert split.class_subset == [1, 3] and split.classnames == NAMES
    assert [label for _, label in split.on_class_subset().test] == [0, 0, 1, 1]


# --- 3. fp16 everywhere, the authors' PREC="fp16" -------------------------------------------------


@pytest.mark.parametrize("row", ["feature+prompt", "image+text-feature", "feature+text-feature"])
def test_fp16_all_runs_clip_and_the_generators_in_float16(row):
    reference = _model(row, num_samples=2)
    half = _model(row, num_samples=2, precision="fp16-all")
    half.load_state_dict({k: v.half() for k, v in reference.state_dict().items()}, strict=False)
    generators = [p for p in half.parameters() if p.requires_grad]
    assert generators and all(p.dtype == torch.float16 for p in generators)
    assert all(p.dtype == torch.float16 for p in half.clip.parameters())
    assert half.zero_shot_text.dtype == torch.float16
    images, labels = _images(), torch.tensor([0, 1, 2, 0])
    loss = half.loss(images, labels, seed=5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = reference.loss(images, labels, seed=5)
    torch.testing.assert_close(loss, expected, atol=2e-2, rtol=2e-2)  # the same function
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float16 for p in generators)
    with torch.no_grad():
        logits = half(images, seed=1)
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), reference(images, seed=1), atol=0.1, rtol=2e-2)


def test_fp16_all_is_a_precision_of_the_cli_and_trains(tmp_path, capsys):
    data = make_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "run"
    status, out, err = run_cli(toy_train(data, output, "--precision", "fp16-all"), capsys)
    assert status == 0, err
    summary = json.loads((output / "summary.json").read_text())
    assert summary["pini_config"]["precision"] == "fp16-all"
    state = torch.load(output / "checkpoint.pt", weights_only=False)["trained_state"]
    assert state and all(value.dtype == torch.float16 for value in state.values())
    status, out, err = run_cli(
        ["eval", "--no-progress", "--checkpoint", output / "checkpoint.pt"], capsys
    )
    assert status == 0, err
    assert f"accuracy {summary['accuracy']:.2f}%" in out
    result = run_cli(toy_train(data, output, "--resume", "--precision", "fp32"), capsys)
    assert_one_line_error(result, "--precision fp32 (the run has fp16-all)")


# --- 6. m > 1: one prompt noise draw per training step -------------------------------------------


def _op_call(monkeypatch, model, name: str, action) -> tuple[dict, object]:
    """(the keyword arguments of the one call of the noise path's op ``name`` while
    ``action()`` runs, what ``action()`` returned)."""
    seen = []
    ops = pini.noise_paths.NOISE_PATH_OPS[model.config.noise_path]
    original = getattr(ops, name)

    def spy(**call):
        seen.append(call)
        return original(**call)

    monkeypatch.setattr(ops, name, spy)
    result = action()
    monkeypatch.undo()
    (call,) = seen
    return call, result


def _loss_call(monkeypatch, model, seed: int = 11) -> dict:
    """The keyword arguments of the loss's one op call, and the loss it returned (``loss``)."""

    def loss():
        return model.loss(_images(), torch.tensor([0, 1, 2, 0]), seed=seed)

    call, value = _op_call(monkeypatch, model, "noisy_cross_entropy", loss)
    return dict(call, loss=value)


def _inference_call(monkeypatch, model) -> dict:
    """The keyword arguments of the logits op's one call in ``model``'s inference."""
    with torch.no_grad():
        return _op_call(
            monkeypatch, model, "noisy_cosine_logits", lambda: model(_images(), seed=2)
        )[0]


def _loss_text_features(monkeypatch, model, num_samples: int) -> torch.Tensor:
    """(num_samples, C, D): the text features each of the loss's samples is scored against."""
    text = _loss_call(monkeypatch, model)["text_features"].detach()
    return text.expand(num_samples, *text.shape[-2:])


@pytest.mark.parametrize("noise_path", ["fused", "eager"])
@pytest.mark.parametrize("draw", ["shared", "per-class"])
def test_prompt_noise_per_step_is_one_draw_for_every_sample(monkeypatch, noise_path, draw):
    options = dict(num_samples=3, noise_path=noise_path, prompt_noise_draw=draw)
    per_step = _model("feature+prompt", **options)
    assert per_step.config.prompt_noise_per_step  # the authors' default
    text = _loss_text_features(monkeypatch, per_step, 3)
    assert torch.equal(text[0], text[1]) and torch.equal(text[0], text[2])
    assert not torch.allclose(text[0], per_step.text_features(sigma_scale=0.0, seed=0)[0])
    per_sample = _model("feature+prompt", prompt_noise_per_step=False, **options)
    text = _loss_text_features(monkeypatch, per_sample, 3)
    assert not torch.allclose(text[0], text[1]) and not torch.allclose(text[1], text[2])


def test_with_one_sample_both_prompt_noise_options_give_the_same_loss():
    images, labels = _images(), torch.tensor([0, 1, 2, 0])
    losses = [
        _model("feature+prompt", prompt_noise_per_step=per_step).loss(images, labels, seed=4)
        for per_step in (True, False)
    ]
    assert torch.equal(losses[0], losses[1])


def test_inference_draws_prompt_noise_per_sample_under_either_option(monkeypatch):
    """Averaged inference resamples every source, the prompt noise included."""
    model = _model("prompt", inference="average", inference_samples=3)
    assert model.config.prompt_noise_per_step
    text = _inference_call(monkeypatch, model)["text_features"]
    assert text.shape[0] == 3 and not torch.allclose(text[0], text[1])


@pytest.mark.parametrize("noise_path", ["fused", "eager"])
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("row", ["text-feature", "image+text-feature", "feature+text-feature"])
@pytest.mark.parametrize("generator", ["mlp", "embedding"])
def test_text_feature_noise_per_step_is_sample_0_of_its_stream_for_every_sample(
    monkeypatch, noise_path, mode, row, generator
):
    """The authors' repeat of the visual noise alone: the m samples are scored against one draw
    of the text-feature noise, noise((m, C, D), seed + 1)[0], and each keeps its own visual
    noise; with text_feature_noise_per_step=False the op draws it per sample as before."""
    options = dict(num_samples=3, noise_path=noise_path, mode=mode, text_generator=generator)
    if row.startswith("image"):
        options["visual_generator"] = "cnn-light"  # a small one: the draw is the point
    model = _model(row, **options)
    assert model.config.text_feature_noise_per_step  # the authors' default
    call = _loss_call(monkeypatch, model)
    assert call["text_noise"] is None and call["text_features"].shape == (3, 32)
    text, (mu, sigma) = model.text_features(seed=11)
    eps = pini_kernels.noise((3, *text.shape), seed=11 + 1)[0]
    expected = (text * (mu + sigma * eps)) if mode == "mul" else text + mu + sigma * eps
    torch.testing.assert_close(call["text_features"], expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(call["text_features"], text)
    if row != "text-feature":  # the visual noise is still per sample
        image = call["image_features"] if call["image_noise"] is None else None
        if image is not None:
            assert image.shape[0] == 3 and not torch.allclose(image[0], image[1])
        else:
            assert call["num_samples"] == 3
    per_sample = _model(row, text_feature_noise_per_step=False, **options)
    old = _loss_call(monkeypatch, per_sample)
    assert old["text_noise"] is not None and old["num_samples"] == 3
    assert not torch.allclose(old["loss"], call["loss"])


def test_text_feature_noise_per_step_is_the_per_sample_loss_with_every_draw_the_first():
    """By value: the per-step loss is the per-sample loss whose m text-feature draws are all
    sample 0 (the op given one noisy (C, D) text and no text noise), on the fused and eager
    paths alike, and its gradients reach the text generator."""
    images, labels = _images(), torch.tensor([0, 1, 2, 0])
    losses = {}
    for path in ("fused", "eager"):
        model = _model("feature+text-feature", num_samples=4, noise_path=path)
        loss = model.loss(images, labels, seed=5)
        loss.backward()
        grads = [p.grad for p in model.text_generator.parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        losses[path] = loss.detach()
        text, (mu, sigma) = model.text_features(seed=5)
        noisy = text + mu + sigma * pini_kernels.noise((1, *text.shape), seed=6)[0]
        features = model.encode_image(images.to(model.compute_dtype))
        image_noise = model._feature_noise(features, text, 1.0)
        by_hand = model.noise_ops.noisy_cross_entropy(
            target=labels,
            image_features=features,
            image_noise=image_noise,
            text_features=noisy,
            text_noise=None,
            logit_scale=model.clip.logit_scale.exp(),
            mode="add",
            seed=5,
            num_samples=4,
        )
        torch.testing.assert_close(loss.detach(), by_hand.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["fused"], losses["eager"], rtol=1e-5, atol=1e-6)


def test_with_one_sample_both_text_feature_noise_options_give_the_same_loss():
    images, labels = _images(), torch.tensor([0, 1, 2, 0])
    losses = [
        _model("feature+text-feature", text_feature_noise_per_step=per_step).loss(
            images, labels, seed=4
        )
        for per_step in (True, False)
    ]
    assert torch.equal(losses[0], losses[1])


def test_inference_draws_text_feature_noise_per_sample(monkeypatch):
    """Averaged inference redraws the text-feature noise for each sample: the logits op gets
    the noise and draws it over (k, C, D), whatever the training option."""
    model = _model("text-feature", inference="average", inference_samples=3)
    assert model.config.text_feature_noise_per_step
    call = _inference_call(monkeypatch, model)
    assert call["text_noise"] is not None and call["num_samples"] == 3


@pytest.mark.parametrize("row", ["text-feature", "feature+text-feature"])
def test_fp16_all_injects_the_per_step_text_feature_noise_in_float32(row):
    """As the op injects it: the fused and eager paths give the same loss and gradients."""
    images, labels = _images(), torch.tensor([0, 1, 2, 0])
    results = []
    for path in ("fused", "eager"):
        model = _model(row, num_samples=3, noise_path=path, precision="fp16-all")
        loss = model.loss(images, labels, seed=7)
        loss.backward()
        grads = [p.grad.float() for p in model.text_generator.parameters()]
        results.append((loss.detach(), grads))
    (fused, fused_grads), (eager, eager_grads) = results
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_the_text_feature_noise_option_needs_text_feature_noise_and_samples(tmp_path, capsys):
    data = make_folder(tmp_path / "data" / "toy").parent
    for row, samples, text in (
        ("feature", 2, "none"),
        ("prompt", 2, "prompt"),
        ("text-feature", 1, "feature"),
    ):
        result = run_cli(
            toy_train(
                data,
                tmp_path / f"{row}{samples}",
                *("--noise", row, "--num-samples", str(samples)),
                "--no-text-feature-noise-per-step",
            ),
            capsys,
        )
        expected = f"has none (--text {text}, --num-samples {samples})"
        assert_one_line_error(result, "--text-feature-noise-per-step", expected)
    output = tmp_path / "ok"
    flags = ("--noise", "text-feature", "--num-samples", "2", "--no-text-feature-noise-per-step")
    status, _, err = run_cli(toy_train(data, output, *flags), capsys)
    assert status == 0, err
    record = json.loads((output / "run.json").read_text())["pini_config"]
    assert record["text_feature_noise_per_step"] is False
    with pytest.raises(ValueError, match="text_feature_noise_per_step must be True or False"):
        pini.PiNIConfig(text_feature_noise_per_step=1)


def test_prompt_noise_per_step_must_be_a_bool():
    with pytest.raises(ValueError, match="prompt_noise_per_step must be True or False"):
        pini.PiNIConfig(prompt_noise_per_step="yes")
    with pytest.raises(ValueError, match="fixed_prompt must be one of"):
        pini.PiNIConfig(fixed_prompt="X X X")


def test_the_new_options_are_keys_of_a_config_file(tmp_path, capsys):
    data = make_folder(tmp_path / "data" / "toy").parent
    config = tmp_path / "run.toml"
    config.write_text(
        'noise = "feature+prompt"\nnum-samples = 2\nprompt-noise-per-step = false\n'
        'precision = "fp16-all"\n'
    )
    output = tmp_path / "run"
    status, _, err = run_cli(toy_train(data, output, "--config", config), capsys)
    assert status == 0, err
    record = json.loads((output / "run.json").read_text())["pini_config"]
    assert record["prompt_noise_per_step"] is False and record["precision"] == "fp16-all"
    config.write_text('noise = "image"\nfixed-prompt = "placeholder"\n')
    status, _, err = run_cli(toy_train(data, tmp_path / "image", "--config", config), capsys)
    assert status == 0, err
    record = json.loads((tmp_path / "image" / "run.json").read_text())["pini_config"]
    assert record["fixed_prompt"] == "placeholder"
    config.write_text('fixed-prompt = "nothing"\n')
    result = run_cli(toy_train(data, tmp_path / "bad", "--config", config), capsys)
    assert_one_line_error(result, "fixed-prompt", "hand-written, placeholder")


@pytest.mark.parametrize(
    "row_flags, flag, fragment",
    [
        (["--noise", "feature"], ["--prompt-noise-draw", "per-class"], "(--text none)"),
        (["--noise", "prompt"], ["--no-prompt-noise-per-step"], "(--text prompt, --num-samples 1)"),
        (["--noise", "prompt"], ["--fixed-prompt", "placeholder"], "carries noise (--text prompt"),
        (["--noise", "prompt"], ["--head-init", "small"], "learnable mu and sigma alone"),
        (
            ["--noise", "text-feature", "--text-generator", "embedding"],
            ["--head-init", "default"],
            "--text feature with --text-generator embedding",
        ),
        (["--noise", "image"], ["--no-scaled-attention"], "(--visual image, --visual-generator"),
    ],
)
def test_a_flag_for_an_option_the_run_does_not_use_is_refused(
    tmp_path, capsys, row_flags, flag, fragment
):
    """Every ROW_OPTIONS entry: one line naming the flag and why, before any work."""
    data = make_folder(tmp_path / "data" / "toy").parent
    output = tmp_path / "run"
    result = run_cli(toy_train(data, output, *row_flags, *flag), capsys)
    assert_one_line_error(result, flag[0].replace("--no-", "--"), fragment)
    assert not output.exists()


def test_the_refused_flags_cover_every_option_some_runs_do_not_use():
    from pini.run_flags import ROW_OPTIONS

    covered = {"prompt_noise_draw", "prompt_noise_per_step", "fixed_prompt", "head_init"}
    covered |= {"scaled_attention", "text_feature_noise_per_step"}  # tested above and before
    assert set(ROW_OPTIONS) == covered
