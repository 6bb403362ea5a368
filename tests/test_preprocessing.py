"""The weights' own preprocessing (docs/spec.md §13): pini's test transform is open_clip's
evaluation transform for a model's ``preprocess_cfg``, its training augmentation normalizes and
interpolates as the weights expect, pini-tiny's transforms are OpenAI's as before, and cached
features are keyed by the preprocessing. Pretrained tags' configurations are open_clip's
metadata: nothing is downloaded."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional

from pini import runner
from pini.backbone import build_clip, preprocessing_of, register_model_configs
from pini.data.features import FeatureCache
from pini.data.transforms import CLIP_MEAN, CLIP_STD, Preprocessing, clip_transforms

# (model, tag): OpenAI's own; SigLIP (mean/std 0.5, squash); CLIPA (ImageNet's statistics,
# bilinear, squash); MobileCLIP (mean 0, std 1, bilinear, shortest side); a LAION tag with mean
# and std 0.5; DFN (OpenAI's statistics, squash).
TAGS = [
    ("ViT-B-16", "openai"),
    ("ViT-B-16-SigLIP", "webli"),
    ("ViT-L-14-CLIPA", "datacomp1b"),
    ("MobileCLIP-S1", "datacompdr"),
    ("ViT-L-14", "laion2b_s32b_b82k"),
    ("ViT-H-14", "dfn5b"),
]
# Odd sizes (width, height): wider, taller, nearly square, smaller than any model's input.
IMAGE_SIZES = [(37, 61), (301, 211), (225, 224), (9, 5)]


def tag_config(model: str, tag: str, **overrides) -> dict:
    """open_clip's ``preprocess_cfg`` for ``model`` with ``tag``'s weights, as ``create_model``
    sets it (defaults, the tag's entries, the image tower's size), without building the model."""
    pretrained = open_clip.get_pretrained_cfg(model, tag)
    assert pretrained, f"open_clip has no tag {tag} of {model}"
    config = merge_preprocess_dict(PreprocessCfg(), pretrained)
    config["size"] = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    return merge_preprocess_dict(config, overrides)


def random_images(seed: int = 0) -> list[Image.Image]:
    generator = np.random.default_rng(seed)
    return [
        Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for width, height in IMAGE_SIZES
    ]


def assert_same_outputs(ours, theirs, images):
    for image in images:
        expected = theirs(image)
        actual = ours(image)
        assert actual.shape == expected.shape, (image.size, actual.shape, expected.shape)
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=f"image {image.size}")


@pytest.mark.parametrize(("model", "tag"), TAGS)
def test_test_transform_is_open_clips_for_each_pretrained_tag(model, tag):
    config = tag_config(model, tag)
    _, test = clip_transforms(Preprocessing.from_config(config))
    assert_same_outputs(test, image_transform_v2(PreprocessCfg(**config), False), random_images())


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [24, (20, 28), (31, 17)])
@pytest.mark.parametrize("fill_color", [0, 200])
def test_test_transform_is_open_clips_for_every_resize_mode_and_size(resize_mode, size, fill_color):
    """No tag of open_clip pads ("longest") or has a non-square input: made-up configurations."""
    config = tag_config(
        "ViT-B-16-SigLIP", "webli", resize_mode=resize_mode, size=size, fill_color=fill_color
    )
    config["interpolation"] = "bilinear"
    _, test = clip_transforms(Preprocessing.from_config(config))
    assert_same_outputs(test, image_transform_v2(PreprocessCfg(**config), False), random_images(1))


@pytest.mark.parametrize(("model", "tag"), TAGS)
def test_training_augmentation_uses_the_weights_mean_std_and_interpolation(model, tag):
    config = tag_config(model, tag)
    preprocessing = Preprocessing.from_config(config)
    train, _ = clip_transforms(preprocessing, (1.0, 1.0))
    crop, flip = train.transforms[0], train.transforms[1]
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.scale == (1.0, 1.0)
    assert isinstance(flip, transforms.RandomHorizontalFlip)
    normalize = train.transforms[-1]
    assert tuple(normalize.mean) == tuple(config["mean"])
    assert tuple(normalize.std) == tuple(config["std"])
    # A square image cropped whole (scale 1): the output is the resized image, flipped or not.
    interpolation = functional.InterpolationMode(config["interpolation"])
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (97, 97, 3), dtype=np.uint8))
    resized = functional.resize(image, list(preprocessing.size), interpolation)
    expected = functional.normalize(functional.to_tensor(resized), config["mean"], config["std"])
    torch.manual_seed(0)
    outputs = [train(image) for _ in range(8)]
    for output in outputs:
        assert torch.equal(output, expected) or torch.equal(output, expected.flip(-1))
    assert any(torch.equal(output, expected.flip(-1)) for output in outputs)


def todays_transforms(image_size: int, crop_scale: tuple[float, float]):
    """pini's transforms before the weights' preprocessing: OpenAI's, bicubic, shortest side."""
    normalize = transforms.Normalize(CLIP_MEAN, CLIP_STD)
    bicubic = transforms.InterpolationMode.BICUBIC
    train = [
        transforms.RandomResizedCrop(image_size, scale=crop_scale, interpolation=bicubic),
        transforms.RandomHorizontalFlip(),
    ]
    test = [transforms.Resize(image_size, interpolation=bicubic), transforms.CenterCrop(image_size)]
    tail = [transforms.ToTensor(), normalize]
    return transforms.Compose(train + tail), transforms.Compose(test + tail)


def test_pini_tiny_keeps_openais_preprocessing():
    clip, _ = build_clip("pini-tiny")
    preprocessing = preprocessing_of(clip)
    assert preprocessing == Preprocessing(32) == Preprocessing(size=(32, 32))
    assert (preprocessing.mean, preprocessing.std) == (CLIP_MEAN, CLIP_STD)
    ours = clip_transforms(preprocessing, (0.5, 1.0))
    todays = todays_transforms(32, (0.5, 1.0))
    images = random_images(3)
    assert_same_outputs(ours[1], todays[1], images)
    for image in images:
        torch.manual_seed(4)
        augmented = ours[0](image)
        torch.manual_seed(4)
        torch.testing.assert_close(augmented, todays[0](image), atol=0, rtol=0)
    # A model without open_clip's preprocess_cfg gets OpenAI's at its tower's size.
    del clip.visual.preprocess_cfg
    assert preprocessing_of(clip) == preprocessing


def test_a_model_built_with_a_tags_preprocessing_reports_it():
    """What ``create_model`` sets for a tag (forced here onto pini-tiny's small tower, as a tag's
    weights are not fetched) is what the run's transforms use."""
    register_model_configs()
    config = tag_config("ViT-B-16-SigLIP", "webli", size=32)
    clip = open_clip.create_model("pini-tiny", force_preprocess_cfg=config)
    expected = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bicubic", "squash")
    assert preprocessing_of(clip) == expected


def test_two_preprocessings_never_share_cached_features(monkeypatch):
    monkeypatch.setattr(runner, "FEATURES", FeatureCache())
    torch.manual_seed(0)
    clip, _ = build_clip("pini-tiny")
    run = dict(
        model="pini-tiny",
        pretrained=None,
        pretrained_sha256=None,
        demo_backbone=False,
        seed=0,
        pini_config=None,
    )
    split = types.SimpleNamespace(test=[(image, 0) for image in random_images(5)])
    openai = preprocessing_of(clip)
    siglip = dataclasses.replace(openai, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    encoded = {}
    for name, preprocessing in [("openai", openai), ("siglip", siglip), ("again", openai)]:
        clip.visual.preprocess_cfg = dataclasses.asdict(preprocessing)
        test = clip_transforms(preprocessing)[1]
        encoded[name] = runner.encode_test_features(run, None, clip, split, test, "cpu").features
    assert (runner.FEATURES.misses, runner.FEATURES.hits) == (2, 1)
    assert not torch.allclose(encoded["openai"], encoded["siglip"])
    assert torch.equal(encoded["openai"], encoded["again"])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(size=0), "size"),
        (dict(size=32, interpolation="nearest"), "interpolation"),
        (dict(size=32, resize_mode="crop"), "resize_mode"),
        (dict(size=32, mean=(0.5, 0.5)), "mean"),
    ],
)
def test_a_preprocessing_out_of_range_is_refused(config, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing.from_config(config)


@pytest.mark.parametrize("mean_std", [(CLIP_MEAN, CLIP_STD), ((0.5,) * 3, (0.5,) * 3)])
def test_visualize_shows_the_images_as_the_weights_normalized_them(mean_std):
    """The figures undo the weights' own normalization: an image of the model's size comes back
    as its pixels (not tinted by OpenAI's mean and std on a SigLIP-like model)."""
    from pini.visualize import _to_pixels

    mean, std = mean_std
    preprocessing = Preprocessing(16, mean=mean, std=std, resize_mode="squash")
    pixels = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    normalized = clip_transforms(preprocessing)[1](Image.fromarray(pixels))
    shown = _to_pixels(normalized[None], preprocessing)[0].numpy()
    np.testing.assert_allclose(shown, pixels / 255.0, atol=1e-5)
