"""The paper's prompts (its Table 6): 16 placeholder tokens, the dataset's template, the class name
last, a full stop, e.g. "X X X X X X X X X X X X X X X X a photo of a beagle." (SPEC.md)."""

from __future__ import annotations

NUM_PLACEHOLDERS = 16
PLACEHOLDER = "X"

TEMPLATES = {
    "imagenet": "a photo of a",
    "caltech101": "a photo of a",
    "stanford_cars": "a photo of a",
    "sun397": "a photo of a",
    "imagenet_v2": "a photo of a",
    "imagenet_sketch": "a photo of a",
    "imagenet_a": "a photo of a",
    "imagenet_r": "a photo of a",
    "oxford_pets": "a type of pet, a photo of a",
    "flowers102": "a type of flower, a photo of a",
    "food101": "a type of food, a photo of",
    "fgvc_aircraft": "a type of aircraft, a photo of a",
    "dtd": "texture",
    "eurosat": "a centered satellite photo of",
    "ucf101": "a photo of a person doing",
}
DEFAULT_TEMPLATE = "a photo of a"


def prompt_prefix(template: str) -> str:
    """The part of every prompt that text noise perturbs: placeholders and template."""
    return " ".join([PLACEHOLDER] * NUM_PLACEHOLDERS + [template])


def build_prompts(classnames: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class, the class name last."""
    prefix = prompt_prefix(template)
    return [f"{prefix} {name.replace('_', ' ')}." for name in classnames]
