"""The protocol's dataset names (CoOp's folder names) and the one alias table: every other part of
the package (the loaders, the prompt templates of `pini.prompts`) resolves a name through
`canonical_name`.
"""

from __future__ import annotations

# CoOp's folder names, in the order of its DATASETS.md: the names `Split.name` takes and the
# prompt templates are keyed on.
DATASET_NAMES = (
    "imagenet",
    "caltech-101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food-101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
    "imagenetv2",
    "imagenet-sketch",
    "imagenet-adversarial",
    "imagenet-rendition",
)
# Datasets used for testing only (CoOp's domain-generalization targets): their `Split.train` is
# empty.
TEST_ONLY_DATASETS = frozenset(DATASET_NAMES[11:])

# Other spellings users type (the paper's and Dassl's names, torchvision's), compared after
# `_alias_key`. Bare words such as "pets" or "flowers" are left out: they would claim a user's
# own ImageFolder tree of that name.
_EXTRA_ALIASES = {
    "flowers102": "oxford_flowers",
    "oxfordflowers102": "oxford_flowers",
    "describabletextures": "dtd",
    "imageneta": "imagenet-adversarial",
    "imagenetr": "imagenet-rendition",
}


def _alias_key(name: str) -> str:
    return "".join(character for character in name.lower() if character.isalnum())


# The alias table: `_alias_key` of a spelling -> CoOp's folder name. Each name of
# `DATASET_NAMES` is its own alias ("caltech101", "food101", "imagenetv2", "oxfordpets" ...).
DATASET_ALIASES = {_alias_key(name): name for name in DATASET_NAMES} | _EXTRA_ALIASES


def canonical_name(name: str | None) -> str | None:
    """CoOp's folder name for ``name`` or one of its aliases (case, ``-``, ``_`` and spaces
    ignored: ``flowers102``, ``Food101``, ``caltech101``, ``ImageNet-A``, ``imagenet_v2`` ...);
    None for a name that is none of the protocol's datasets."""
    return DATASET_ALIASES.get(_alias_key(name)) if name else None
