"""What one ``pini sweep`` runs, besides datasets, shots and seeds: the rows of its tables (the
methods, PiNI once per ``--noise-rows`` row: the paper's Table 1) and its backbones
(``--models``: Table 4), with the run folder each gets (docs/baselines.md, ``pini sweep``).

A noise row is a row of the paper's Table 1 by its ``--noise`` name, each location optionally
with its generator after a colon: ``image``, ``image:attention``, ``feature:mlp+prompt``,
``text-feature:embedding``; a location's first generator (Table 1's) is left out of the row's
name. Presets: ``table1`` (Table 1: each location alone with each of the paper's generators for
it), ``locations`` (the eight ``--noise`` rows: each location alone and each visual x text pair)
and ``generators`` (each location alone with each generator pini has, the lighter ones too).
"""

from __future__ import annotations

import dataclasses
import re

from .config import PAPER_GENERATORS, TABLE1, TEXT_GENERATORS, VISUAL_GENERATORS
from .errors import InputError

# --noise-rows' locations: the name in a row -> (the PiNIConfig side, its location there).
LOCATIONS = {
    "image": ("visual", "image"),
    "feature": ("visual", "feature"),
    "prompt": ("text", "prompt"),
    "text-feature": ("text", "feature"),
}
_GENERATORS = {"visual": VISUAL_GENERATORS, "text": TEXT_GENERATORS}


def _each_location_alone(generators: dict) -> list[str]:
    """ "location:generator" for each location with each of its ``generators`` (by side)."""
    return [
        f"{name}:{generator}"
        for name, (side, where) in LOCATIONS.items()
        for generator in generators[side][where]
    ]


NOISE_ROW_PRESETS = {
    "table1": _each_location_alone(PAPER_GENERATORS),
    "locations": list(TABLE1),
    "generators": _each_location_alone(_GENERATORS),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a sweep's tables. ``key``: its name in sweep.json (the method, or "pini ROW"
    for a noise row); ``method``; ``noise``: the ``--noise`` row and generator flags of a noise
    row (None otherwise); ``folder``: its folder under the dataset's."""

    key: str
    method: str
    noise: dict | None = None
    folder: str = ""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One ``--models`` entry, ``MODEL`` or ``MODEL=WEIGHTS``: ``label`` as typed (the column of
    the backbone table), ``folder`` its folder under the sweep's (None: no ``--models``, the
    runs directly under the sweep's folder, as a one-backbone sweep always had them)."""

    label: str
    model: str | None
    pretrained: str | None
    folder: str | None


def rows(methods: list[str], noise_rows: list[str] | None) -> list[Row]:
    """The tables' rows: each method, with ``pini`` replaced by one row per noise row when
    ``noise_rows`` are given (names or presets; repeats of the same row dropped)."""
    if not noise_rows:
        return [Row(method, method, folder=method) for method in methods]
    if "pini" not in methods:
        raise InputError("--noise-rows are rows of PiNI, but --methods has no pini")
    parsed: dict[str, dict] = {}
    for name in noise_rows:
        for spec in NOISE_ROW_PRESETS.get(name, [name]):
            canonical, noise = _noise_row(spec)
            parsed.setdefault(canonical, noise)
    found = []
    for method in methods:
        if method != "pini":
            found.append(Row(method, method, folder=method))
            continue
        for canonical, noise in parsed.items():
            found.append(Row(f"pini {canonical}", "pini", noise, f"pini-{canonical}"))
    return found


def _noise_row(spec: str) -> tuple[str, dict]:
    """(the row's canonical name, the ``--noise`` row and generator flags it sets)."""
    expected = (
        f"a Table 1 row ({', '.join(TABLE1)}), locations optionally with a generator "
        f"(image:attention), or a preset ({', '.join(NOISE_ROW_PRESETS)})"
    )
    chosen: dict[str, tuple[str, str | None]] = {}  # side -> (location name, generator)
    for part in spec.split("+"):
        name, colon, generator = part.partition(":")
        if name not in LOCATIONS or (colon and not generator):
            raise InputError(f"--noise-rows {spec}: expected {expected}")
        side, where = LOCATIONS[name]
        if side in chosen:
            raise InputError(
                f"--noise-rows {spec}: two {side} locations ({chosen[side][0]}, {name}); a row "
                "has at most one visual and one text location"
            )
        if colon and generator not in _GENERATORS[side][where]:
            raise InputError(
                f"--noise-rows {spec}: {name} noise has the generators "
                f"{', '.join(_GENERATORS[side][where])}, not {generator!r}"
            )
        chosen[side] = (name, generator or None)
    sides = [side for side in ("visual", "text") if side in chosen]
    row = "+".join(chosen[side][0] for side in sides)
    noise = {"noise": row}
    names = []
    for side in sides:
        name, generator = chosen[side]
        if generator is not None and generator != TABLE1[name][f"{side}_generator"]:
            noise[f"{side}_generator"] = generator
            name = f"{name}:{generator}"
        names.append(name)
    return "+".join(names), noise


def backbones(models: list[str] | None, pretrained: str | None) -> list[Backbone]:
    """``--models``' backbones (``MODEL`` with ``--pretrained``'s weights, or ``MODEL=WEIGHTS``);
    without ``--models`` the one backbone of ``--model`` and ``--pretrained``."""
    if not models:
        return [Backbone("", None, None, None)]
    found = {}
    for spec in models:
        model, equals, weights = spec.partition("=")
        if not model or (equals and not weights):
            raise InputError(f"--models {spec}: expected MODEL or MODEL=WEIGHTS")
        folder = re.sub(r"[^A-Za-z0-9._+-]", "_", spec)
        if any(other.folder == folder for other in found.values()) and spec not in found:
            raise InputError(f"--models {spec}: another entry has the same run folder {folder}")
        found[spec] = Backbone(spec, model, weights if equals else pretrained, folder)
    return list(found.values())
