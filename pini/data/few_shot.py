"""K-shot sampling, cached per seed with a record of what the split was drawn from, so that a
split is never silently reused for other images.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from ..files import write_text_atomically
from .sample_ids import listing_fingerprint, sample_id

log = logging.getLogger(__name__)

# The format of a cached split file: a file of another format is refused, not read.
SPLIT_FORMAT = "pini-few-shot-split/2"


def few_shot(
    samples: list[tuple],
    shots: int,
    seed: int,
    cache: str | Path | None = None,
    source: dict | None = None,
) -> list[tuple]:
    """``shots`` samples per class, chosen by ``seed`` (fewer only where a class has fewer, with a
    warning).

    With ``cache``, the split is stored there with what it was drawn from: ``source`` (e.g. the
    dataset name and root), ``shots``, ``seed``, a fingerprint of the whole listing (paths and
    labels) and the chosen samples. A later call reuses it only if all of these still match, and
    otherwise raises ``InputError`` saying what differs: a split is never silently reused for
    other images."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise InputError(f"shots must be an integer >= 1, got {shots!r}")
    source = dict(source or {})
    fingerprint = listing_fingerprint(samples)
    record = {"source": source, "shots": shots, "seed": seed, "listing": fingerprint}
    cache = Path(cache) if cache else None
    stored = cache is not None and cache.is_file()
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, (_, label) in enumerate(samples):
        by_class[label].append(index)
    rng = random.Random(seed)
    indices = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < shots:
            if not stored:
                log.warning(
                    "class %d has %d samples, fewer than %d shots", label, len(members), shots
                )
            indices += members
        else:
            indices += sorted(rng.sample(members, shots))
    if stored:
        return _cached_split(cache, samples, record, indices)
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


def _cached_split(
    cache: Path, samples: list[tuple], record: dict, redrawn: list[int]
) -> list[tuple]:
    """The split stored in ``cache``, after checking it was drawn from the same listing with the
    same options (``record``) and is what its seed draws from that listing (``redrawn``);
    ``InputError`` naming every difference otherwise."""
    try:
        stored = json.loads(cache.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"few-shot split {cache} cannot be read ({error}); delete it") from None
    if not isinstance(stored, dict) or stored.get("format") != SPLIT_FORMAT:
        raise InputError(
            f"few-shot split {cache} is not one this version wrote (no record of the images it "
            "was drawn from); delete it or use another --output"
        )
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
