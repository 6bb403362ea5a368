"""The paper's prompts (its Table 6): 16 placeholder tokens, the dataset's template, the class name
last, a full stop, e.g. "X X X X X X X X X X X X X X X X a photo of a beagle." (docs/spec.md §9).

Zero-shot CLIP, the baseline the paper reports, reads CoOp's hand-written prompts instead, e.g.
"a photo of a beagle, a type of pet." (``ZERO_SHOT_TEMPLATES``, ``zero_shot_template``).
"""

from __future__ import annotations

from .data.names import canonical_name

NUM_PLACEHOLDERS = 16
PLACEHOLDER = "X"

# PiNI's templates (the paper's Table 6), keyed by the dataset folder names of CoOp's DATASETS.md
# (what ``Split.name`` holds); another spelling of a dataset's name is resolved by the data layer's
# alias table (`pini.data.names.canonical_name`), not here.
TEMPLATES = {
    "imagenet": "a photo of a",
    "caltech-101": "a photo of a",
    "oxford_pets": "a type of pet, a photo of a",
    "stanford_cars": "a photo of a",
    "oxford_flowers": "a type of flower, a photo of a",
    "food-101": "a type of food, a photo of",
    "fgvc_aircraft": "a type of aircraft, a photo of a",
    "sun397": "a photo of a",
    "dtd": "texture",
    "eurosat": "a centered satellite photo of",
    "ucf101": "a photo of a person doing",
    "imagenetv2": "a photo of a",
    "imagenet-sketch": "a photo of a",
    "imagenet-adversarial": "a photo of a",
    "imagenet-rendition": "a photo of a",
}
DEFAULT_TEMPLATE = "a photo of a"

# Zero-shot CLIP, the paper's ZS row: CoOp's hand-written prompts (its trainers/zsclip.py,
# CUSTOM_TEMPLATES), "{}" standing for the class name; keyed as TEMPLATES.
ZERO_SHOT_TEMPLATES = {
    "imagenet": "a photo of a {}.",
    "caltech-101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food-101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet-sketch": "a photo of a {}.",
    "imagenet-adversarial": "a photo of a {}.",
    "imagenet-rendition": "a photo of a {}.",
}
DEFAULT_ZERO_SHOT_TEMPLATE = "a photo of a {}."


def template_for(dataset_name: str) -> str:
    """PiNI's template for a dataset by its CoOp folder name or any alias of it (case, ``-``,
    ``_`` and spaces ignored; ``"DescribableTextures"`` is ``"dtd"``: ``"texture"``);
    ``DEFAULT_TEMPLATE`` ("a photo of a") for a name that is none of the protocol's datasets."""
    return TEMPLATES.get(_dataset_key(dataset_name), DEFAULT_TEMPLATE)


def zero_shot_template(dataset_name: str) -> str:
    """CoOp's zero-shot prompt for a dataset by its CoOp folder name or any alias of it, e.g. "a
    photo of a {}, a type of pet." for "oxford_pets" or "OxfordPets";
    ``DEFAULT_ZERO_SHOT_TEMPLATE`` ("a photo of a {}.") for an unknown name."""
    return ZERO_SHOT_TEMPLATES.get(_dataset_key(dataset_name), DEFAULT_ZERO_SHOT_TEMPLATE)


def _dataset_key(dataset_name: str) -> str | None:
    """CoOp's folder name for ``dataset_name`` (the data layer's alias table), None for a name
    that is none of the protocol's datasets."""
    if not isinstance(dataset_name, str):
        raise TypeError(f"dataset_name must be a str, got {type(dataset_name).__name__}")
    return canonical_name(dataset_name)


def prompt_prefix(template: str) -> str:
    """The part of every prompt that text noise perturbs: placeholders and template."""
    return " ".join([PLACEHOLDER] * NUM_PLACEHOLDERS + [template])


def build_prompts(classnames: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class, the class name last."""
    prefix = prompt_prefix(template)
    return [f"{prefix} {_readable(name)}." for name in classnames]


def build_zero_shot_prompts(classnames: list[str], template: str = DEFAULT_ZERO_SHOT_TEMPLATE):
    """One hand-written prompt per class, ``template`` with its "{}" replaced by the class name,
    e.g. "a photo of a golden retriever, a type of pet."."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(
            f"zero_shot_template must be a str with exactly one '{{}}' for the class name, "
            f"got {template!r}"
        )
    return [template.format(_readable(name)) for name in classnames]


def _readable(classname: str) -> str:
    """Class names as CoOp's datasets give them to CLIP: underscores read as spaces."""
    return classname.replace("_", " ")
