"""K-shot sampling, cached per seed with a record of what the split was drawn from, so that a
split is never silently reused for other images.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

from ..errors import InputError
from ..files import write_text_atomically
from .sample_ids import listing_fingerprint, sample_id

log = logging.getLogger(__name__)

# The format of a cached split file: a file of another format is refused, not read. Format 3
# holds Dassl's draw; format 2 (pini before it) the sorted draw, still read so that a run
# folder written then resumes with its own split.
SPLIT_FORMAT = "pini-few-shot-split/3"
PREVIOUS_SPLIT_FORMAT = "pini-few-shot-split/2"


def _by_label(samples: list[tuple]) -> dict[int, list[int]]:
    """Each label's sample indices, labels in the order they first appear in ``samples``."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, (_, label) in enumerate(samples):
        by_label[label].append(index)
    return by_label


def dassl_draw(samples: list[tuple], shots: int, rng: random.Random) -> list[int]:
    """Indices of ``shots`` samples per label, drawn as Dassl's ``generate_fewshot_dataset``
    draws them (CoOp's few-shot splits, the authors' too): labels in the order they first appear
    in ``samples``, ``rng.sample(members, shots)`` for each, or ``rng.choices(members,
    k=shots)`` (with repeats) for a label with fewer; the indices in the order drawn. With
    ``rng = random.Random(seed)`` and ``samples`` in Dassl's order, the same images as Dassl
    with ``random.seed(seed)``."""
    indices = []
    for members in _by_label(samples).values():
        if len(members) >= shots:
            indices += rng.sample(members, shots)
        else:
            indices += rng.choices(members, k=shots)
    return indices


def _sorted_draw(samples: list[tuple], shots: int, rng: random.Random) -> list[int]:
    """The draw of format 2: labels in sorted order, each label's draw sorted, every member of
    a label with fewer than ``shots`` once."""
    by_label = _by_label(samples)
    indices = []
    for label in sorted(by_label):
        members = by_label[label]
        indices += members if len(members) < shots else sorted(rng.sample(members, shots))
    return indices


DRAWS = {SPLIT_FORMAT: dassl_draw, PREVIOUS_SPLIT_FORMAT: _sorted_draw}


def few_shot(
    samples: list[tuple],
    shots: int,
    seed: int,
    cache: str | Path | None = None,
    source: dict | None = None,
    drawn_before: tuple[tuple[list[tuple], int], ...] = (),
) -> list[tuple]:
    """``shots`` samples per class, drawn by ``seed`` as Dassl draws them (``dassl_draw``; a
    class with fewer is drawn with repeats, with a warning). ``drawn_before``: the ``(samples,
    shots)`` draws that come first from the same stream, as Dassl draws CoOp's validation shots
    right after the training shots from one ``random.seed(seed)``.

    With ``cache``, the split is stored there with what it was drawn from: ``source`` (e.g. the
    dataset name and root), ``shots``, ``seed``, a fingerprint of the whole listing (paths and
    labels) and the chosen samples. A later call reuses it only if all of these still match, and
    otherwise raises ``InputError`` saying what differs: a split is never silently reused for
    other images. A file of the previous format holds the previous draw, and is checked and
    reused as that draw."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise InputError(f"shots must be an integer >= 1, got {shots!r}")
    source = dict(source or {})
    fingerprint = listing_fingerprint(samples)
    record = {"source": source, "shots": shots, "seed": seed, "listing": fingerprint}
    cache = Path(cache) if cache else None
    stored = _stored_split(cache) if cache is not None and cache.is_file() else None
    if stored is not None and stored["format"] == PREVIOUS_SPLIT_FORMAT:
        redrawn = _sorted_draw(samples, shots, random.Random(seed))
        return _cached_split(cache, stored, samples, record, redrawn)
    rng = random.Random(seed)
    for earlier, earlier_shots in drawn_before:
        dassl_draw(earlier, earlier_shots, rng)
    indices = dassl_draw(samples, shots, rng)
    if stored is not None:
        return _cached_split(cache, stored, samples, record, indices)
    counts = Counter(label for _, label in samples)
    for label, count in sorted(counts.items()):
        if count < shots:
            log.warning(
                "class %d has %d samples, fewer than %d shots: %d drawn with repeats (as Dassl)",
                label,
                count,
                shots,
                shots,
            )
    chosen = [samples[i] for i in indices]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        stored = {
            "format": SPLIT_FORMAT,
            **record,
            "indices": indices,
            "samples": [[sample_id(item), label] for item, label in chosen],
        }
        write_text_atomically(cache, json.dumps(stored, indent=1))
    return chosen


def _stored_split(cache: Path) -> dict:
    """The split file ``cache`` as written, of this format or the previous one; ``InputError``
    otherwise."""
    try:
        stored = json.loads(cache.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"few-shot split {cache} cannot be read ({error}); delete it") from None
    if not isinstance(stored, dict) or stored.get("format") not in DRAWS:
        raise InputError(
            f"few-shot split {cache} is not one this version wrote (no record of the images it "
            "was drawn from); delete it or use another --output"
        )
    return stored


def _cached_split(
    cache: Path, stored: dict, samples: list[tuple], record: dict, redrawn: list[int]
) -> list[tuple]:
    """The split ``stored`` in ``cache``, after checking it was drawn from the same listing with
    the same options (``record``) and is what its seed draws from that listing (``redrawn``);
    ``InputError`` naming every difference otherwise."""
    names = {"source": "dataset", "shots": "shots", "seed": "seed", "listing": "image listing"}
    differences = [
        f"{names[key]} {stored.get(key)!r} -> {record[key]!r}"
        if key != "listing"
        else "the image listing (files or labels were added, removed or renamed)"
        for key in record
        if stored.get(key) != record[key]
    ]
    if differences:
        raise InputError(
            f"few-shot split {cache} was drawn from other data: {'; '.join(differences)}; "
            "use another --output (or --overwrite) for a new run"
        )
    indices = stored.get("indices")
    chosen_ids = stored.get("samples")
    if (
        not isinstance(indices, list)
        or not isinstance(chosen_ids, list)
        or len(indices) != len(chosen_ids)
        or not all(isinstance(i, int) and 0 <= i < len(samples) for i in indices)
        or [[sample_id(samples[i][0]), samples[i][1]] for i in indices] != chosen_ids
    ):
        raise InputError(f"few-shot split {cache} is damaged (its samples do not match); delete it")
    if indices != redrawn:
        raise InputError(
            f"few-shot split {cache}: its images are not the ones seed {record['seed']} draws "
            f"from this listing ({sum(a != b for a, b in zip(indices, redrawn, strict=False))} "
            "differ; was it edited?); delete it to draw it again, or use another --output"
        )
    return [samples[i] for i in indices]
