"""CLIP's preprocessing: the training augmentation and the test transform."""

from __future__ import annotations

from torchvision import transforms

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_transforms(
    image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0)
) -> tuple[transforms.Compose, transforms.Compose]:
    """(train, test) preprocessing: random resized crop (Dassl's scale range by default) + flip,
    or resize + center crop; CLIP's mean and std."""
    normalize = transforms.Normalize(CLIP_MEAN, CLIP_STD)
    bicubic = transforms.InterpolationMode.BICUBIC
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=crop_scale, interpolation=bicubic),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test = transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=bicubic),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return train, test
