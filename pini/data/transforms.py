"""CLIP's preprocessing: the weights' own (``Preprocessing``, what open_clip calls a model's
``preprocess_cfg``), the training augmentation and the test transform (docs/spec.md §13)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torchvision import transforms
from torchvision.transforms import functional

# OpenAI's CLIP statistics: open_clip's default, and the preprocessing of most pretrained tags.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip's interpolation names; "random" is a training option of timm's augmentation that
# open_clip's own transforms (training and test) read as bicubic.
INTERPOLATIONS = {
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "random": transforms.InterpolationMode.BICUBIC,
}
# How the test transform brings an image to the model's size: scale the shorter side to it and
# crop the center; scale the longer side to it and pad (fill_color) to the size; or stretch.
RESIZE_MODES = ("shortest", "longest", "squash")


def _triple(value, name: str) -> tuple[float, float, float]:
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 3:
        raise ValueError(f"preprocessing {name}: expected one value or three (RGB), got {value!r}")
    return tuple(float(item) for item in values)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The image preprocessing a CLIP's weights were trained with; OpenAI's by default.

    ``size`` is (height, width) of the model's input (an int means a square); ``mean``/``std``
    normalize each RGB channel of the [0, 1] image; ``interpolation`` is one of
    ``INTERPOLATIONS``, ``resize_mode`` one of ``RESIZE_MODES``; ``fill_color`` (0-255) pads
    under ``"longest"``. Frozen and hashable: cached features are keyed by it.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self):
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
            raise ValueError(f"preprocessing size: expected an int or (height, width), got {size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocessing interpolation: expected one of {sorted(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"preprocessing resize_mode: expected one of {RESIZE_MODES}, "
                f"got {self.resize_mode!r}"
            )
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))

    @classmethod
    def from_config(cls, config: Mapping) -> Preprocessing:
        """From open_clip's ``preprocess_cfg`` dict (``size`` required; ``mean``, ``std``,
        ``interpolation``, ``resize_mode``, ``fill_color`` where given; other keys, such as
        ``mode`` (always RGB), are ignored)."""
        fields = ("mean", "std", "interpolation", "resize_mode", "fill_color")
        given = {name: config[name] for name in fields if config.get(name) is not None}
        return cls(size=config["size"], **given)


def _as_preprocessing(preprocessing: Preprocessing | int) -> Preprocessing:
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    if isinstance(preprocessing, int):
        return Preprocessing(size=preprocessing)
    raise TypeError(
        "clip_transforms: preprocessing must be a Preprocessing or an image size (int), got "
        f"{type(preprocessing).__name__}"
    )


class ResizeKeepingRatio:
    """Scales a PIL image (or (..., H, W) tensor) by one factor so that its shorter side
    (``longest=False``) or its longer side (``longest=True``) meets ``size`` (height, width);
    open_clip's ``ResizeKeepRatio`` without its random options, rounding as it does."""

    def __init__(self, size: tuple[int, int], longest: bool, interpolation):
        self.size, self.longest, self.interpolation = size, longest, interpolation

    def __call__(self, image):
        _, height, width = functional.get_dimensions(image)
        ratios = (height / self.size[0], width / self.size[1])
        ratio = max(ratios) if self.longest else min(ratios)
        return functional.resize(
            image, [round(height / ratio), round(width / ratio)], self.interpolation
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, longest={self.longest})"


class CenterCropOrPad:
    """Pads an image smaller than ``size`` (height, width) with ``fill`` on both sides (the odd
    pixel after), then crops its center to ``size``; open_clip's ``CenterCropOrPad``."""

    def __init__(self, size: tuple[int, int], fill: int):
        self.size, self.fill = size, fill

    def __call__(self, image):
        _, height, width = functional.get_dimensions(image)
        crop_height, crop_width = self.size
        if crop_width > width or crop_height > height:
            pad_width, pad_height = max(crop_width - width, 0), max(crop_height - height, 0)
            padding = [pad_width // 2, pad_height // 2, (pad_width + 1) // 2, (pad_height + 1) // 2]
            image = functional.pad(image, padding, fill=self.fill)
        return functional.center_crop(image, list(self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


def _test_resize(preprocessing: Preprocessing) -> list:
    """The test transform's steps to ``preprocessing.size``, as open_clip's ``image_transform``
    takes them at evaluation."""
    size, mode = preprocessing.size, preprocessing.resize_mode
    interpolation = INTERPOLATIONS[preprocessing.interpolation]
    if mode == "squash":
        return [transforms.Resize(size, interpolation=interpolation)]
    if mode == "longest":
        fill = preprocessing.fill_color
        return [ResizeKeepingRatio(size, True, interpolation), CenterCropOrPad(size, fill)]
    if size[0] == size[1]:
        return [
            transforms.Resize(size[0], interpolation=interpolation),
            transforms.CenterCrop(size[0]),
        ]
    # A non-square shortest-side resize: open_clip scales it bicubic whatever the interpolation.
    bicubic = transforms.InterpolationMode.BICUBIC
    return [ResizeKeepingRatio(size, False, bicubic), transforms.CenterCrop(size)]


def clip_transforms(
    preprocessing: Preprocessing | int, crop_scale: tuple[float, float] = (0.08, 1.0)
) -> tuple[transforms.Compose, transforms.Compose]:
    """(train, test) transforms, PIL RGB image -> (3, H, W) float tensor, for a model whose
    weights expect ``preprocessing`` (an int: OpenAI's preprocessing at that square size).

    train: random resized crop to the model's size (``crop_scale`` of the area; Dassl's range by
    default) with the weights' interpolation, horizontal flip, the weights' mean and std.
    test: exactly open_clip's evaluation transform for the same ``preprocess_cfg``.
    """
    preprocessing = _as_preprocessing(preprocessing)
    height, width = preprocessing.size
    size = height if height == width else (height, width)
    normalize = transforms.Normalize(preprocessing.mean, preprocessing.std)
    interpolation = INTERPOLATIONS[preprocessing.interpolation]
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=crop_scale, interpolation=interpolation),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test = [*_test_resize(preprocessing), transforms.ToTensor(), normalize]
    return train, transforms.Compose(test)
