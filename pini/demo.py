"""The demo's backbone: the tiny CLIP pre-trained for a few seconds on held-out digits.

A random-weight CLIP maps every image to nearly the same feature (cosine ~0.999), so zero-shot
and PiNI would both sit at chance. For the embedded default run, the tiny model is first trained
contrastively (image vs. a caption of its class) on digits that are neither in the test set nor in
the few-shot pool, once, and cached. Like a real CLIP, it learns from natural captions
(`CAPTIONS`), never from PiNI's placeholder prompts, so the zero-shot baseline (CoOp's "a photo
of a {}.") is a fair one and PiNI starts from prompts the model has not seen. Real use loads
real CLIP weights instead (``--pretrained``).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .backbone import TINY_MODEL, build_clip, preprocessing_of
from .data.digits import DIGIT_NAMES, digits_pretraining_samples
from .data.image_list import ImageList
from .data.transforms import clip_transforms
from .progress import say, show_bars

log = logging.getLogger(__name__)

PRETRAIN_STEPS = 800
# Caption templates of the pre-training, one drawn per class and step.
CAPTIONS = ("a photo of a {}.", "a photo of the number {}.", "a handwritten {}.", "{}.")
# Bump when the pre-training changes, so an old cache is not reused (3: one thread).
CACHE_VERSION = 3
PRETRAIN_BATCH = 64
PRETRAIN_LR = 1e-3
CROP_SCALE = (0.5, 1.0)  # random crops keep at least half of a 32-pixel digit
DEFAULT_CACHE = Path(os.environ.get("PINI_CACHE", Path.home() / ".cache" / "pini"))


@contextmanager
def _one_thread():
    """Torch's CPU ops on one thread inside: how a float sum is split over threads changes its
    last bits, and 800 steps of training grow those into different weights (up to 0.03), so
    a cache built with 1 thread (torchrun's default) and with 2 gave different demo results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def digits_clip(cache_dir: str | Path = DEFAULT_CACHE, progress: bool = True):
    """(model, tokenizer): the tiny CLIP pre-trained on held-out digits (cached after the first
    call, about 30 s). The pre-training runs on one thread, so the cached weights do not depend
    on the machine's thread count."""
    torch.manual_seed(0)
    clip, tokenizer = build_clip(TINY_MODEL)
    path = Path(cache_dir) / f"{TINY_MODEL}-digits-v{CACHE_VERSION}-{PRETRAIN_STEPS}.pt"
    if path.is_file():
        try:
            clip.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return clip.eval(), tokenizer
        except Exception as error:  # a truncated or foreign file: torch raises many types
            log.warning(
                "the cached demo CLIP %s cannot be read (%s): building it again",
                path,
                type(error).__name__,
            )
            torch.manual_seed(0)
            clip, tokenizer = build_clip(TINY_MODEL)
    samples = digits_pretraining_samples()
    transform, _ = clip_transforms(preprocessing_of(clip), CROP_SCALE)
    dataset = ImageList(samples, transform)
    captions = torch.stack(
        [tokenizer([template.format(name) for name in DIGIT_NAMES]) for template in CAPTIONS]
    )  # (templates, classes, context)
    say(
        f"pre-training the demo's tiny CLIP on held-out digits ({PRETRAIN_STEPS} steps, once: "
        f"cached as {path}) ...",
        progress,
    )
    with _one_thread():
        _pretrain(clip, dataset, samples, captions, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(clip.state_dict(), temporary)
    os.replace(temporary, path)
    return clip.eval(), tokenizer


def _pretrain(clip, dataset, samples, captions, progress: bool) -> None:
    """Contrastive steps: a batch of images against one caption of each class."""
    optimizer = torch.optim.AdamW(clip.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    clip.train()
    for _ in tqdm(
        range(PRETRAIN_STEPS),
        desc="pre-training the demo's tiny CLIP on digits",
        disable=not show_bars(progress),
        leave=False,
    ):
        picks = torch.randint(0, len(dataset), (PRETRAIN_BATCH,), generator=generator)
        images = torch.stack([dataset[int(i)][0] for i in picks])
        labels = torch.tensor([samples[int(i)][1] for i in picks])
        image = F.normalize(clip.encode_image(images), dim=-1)
        template = torch.randint(0, len(CAPTIONS), (len(DIGIT_NAMES),), generator=generator)
        token_ids = captions[template, torch.arange(len(DIGIT_NAMES))]
        text = F.normalize(clip.encode_text(token_ids), dim=-1)
        loss = F.cross_entropy(clip.logit_scale.exp() * image @ text.t(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
