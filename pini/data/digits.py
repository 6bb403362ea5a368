"""scikit-learn's handwritten digits, bundled: the dataset of the default run, the demo and the
tests.
"""

from __future__ import annotations

import random

from PIL import Image

from .split import Split

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# The bundled digits, shuffled once: a test part, a few-shot pool, and a disjoint part on which the
# demo's tiny CLIP is pre-trained (pini/demo.py).
DIGITS_TEST, DIGITS_POOL = 540, 600
# Each digit image carries its index in scikit-learn's dataset in ``image.info`` under this key:
# its stable identity for `sample_id` (the image stays a plain PIL image for `ImageList`).
DIGITS_INDEX_KEY = "digits_index"


def _digits(seed: int = 0) -> list[tuple]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    samples = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        array = (pixels * (255.0 / 16.0)).clip(0, 255).astype("uint8")
        image = Image.fromarray(array).convert("RGB")
        image.info[DIGITS_INDEX_KEY] = index
        samples.append((image, int(label)))
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in order]


def load_digits_split() -> Split:
    """scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with the package): the
    embedded dataset of the default run and the tests. 600 form the few-shot pool, 540 the test
    set."""
    samples = _digits()
    test = samples[:DIGITS_TEST]
    pool = samples[DIGITS_TEST : DIGITS_TEST + DIGITS_POOL]
    return Split(list(DIGIT_NAMES), pool, test, "digits")


def digits_pretraining_samples() -> list[tuple]:
    """The digits outside the test set and the few-shot pool (657 images)."""
    return _digits()[DIGITS_TEST + DIGITS_POOL :]
