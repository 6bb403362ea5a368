"""``--config FILE``: a command's options from a TOML file (YAML too where pyyaml is installed),
under the names of its flags (``weight-decay = 1e-4`` or ``weight_decay = 1e-4``); a flag on the
command line overrides the file. Each value is checked as its flag's is, and the run stores the
resolved options as it stores flags (docs/spec.md §11)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import InputError

# What a command should do rather than what the run is: flags only, never from a file.
FLAGS_ONLY = {"config", "help", "resume", "overwrite", "debug"}


def read_config_file(path: str) -> dict:
    """The table of options in ``path`` (``.toml``, or ``.yaml``/``.yml`` with pyyaml)."""
    suffix = Path(path).suffix.lower()
    try:
        with open(path, "rb") as file:
            if suffix == ".toml":
                import tomllib

                values = tomllib.load(file)
            elif suffix in (".yaml", ".yml"):
                try:
                    import yaml
                except ImportError:
                    raise InputError(
                        f"--config {path}: reading YAML needs pyyaml (pip install pyyaml); or "
                        "write the options as TOML (--config FILE.toml)"
                    ) from None
                values = yaml.safe_load(file)
            else:
                raise InputError(
                    f"--config {path}: expected a .toml, .yaml or .yml file, got {suffix or 'no'} "
                    "suffix"
                )
    except OSError as error:
        raise InputError(f"--config {path}: cannot be read ({error.strerror})") from None
    except InputError:
        raise
    except Exception as error:  # tomllib's and yaml's syntax errors
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputError(
            f"--config {path} is not valid {suffix[1:].upper()}: {first_line}"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InputError(
            f"--config {path}: expected a table of options (name = value), got "
            f"{type(values).__name__}"
        )
    return values


def _converted(action: argparse.Action, value, where: str):
    """``value`` from the file as ``action``'s flag would give it, else one ``InputError``."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*")
    items = value if many and isinstance(value, list) else [value]
    converted = []
    for item in items:
        if isinstance(item, (bool, dict, list)) or item is None:
            expected = "a list of values" if many else "a single value"
            raise InputError(f"{where}: expected {expected}, got {item!r}")
        try:
            result = action.type(str(item)) if action.type else str(item)
        except argparse.ArgumentTypeError as error:
            raise InputError(f"{where}: {error}") from None
        if action.choices is not None and result not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise InputError(f"{where}: expected one of {choices}, got {item!r}")
        converted.append(result)
    if many and not converted:
        raise InputError(f"{where}: expected at least one value")
    return converted if many else converted[0]


def apply_config_file(parser: argparse.ArgumentParser, path: str, command: str) -> None:
    """Makes the options in ``path`` the defaults of ``parser`` (``pini COMMAND``'s), so that
    parsing again gives the flags on the command line precedence over the file."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    defaults = {}
    for key, value in read_config_file(path).items():
        dest = str(key).replace("-", "_")
        if dest in FLAGS_ONLY:
            raise InputError(f"--config {path}: {key} is a command-line flag only")
        if dest not in actions:
            raise InputError(
                f"--config {path}: unknown option {key!r} (the file takes the names of pini "
                f"{command}'s flags, e.g. weight-decay = 1e-4)"
            )
        defaults[dest] = _converted(actions[dest], value, f"--config {path}: {key}")
    parser.set_defaults(**defaults)
