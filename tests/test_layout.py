"""The house rules a newcomer relies on: no module of pini or pini_kernels past 600 lines, and
imports only downwards through the layers below (a lower layer never imports a higher one, so a
module can be read without the ones above it)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600

# pini's modules from the bottom up; a module may import its own layer and those below.
PINI_LAYERS = [
    ["errors", "files", "progress", "metrics_log"],
    ["data", "prompts", "generators", "config", "backbone"],
    ["noise_paths", "model"],
    ["methods"],
    ["checkpoint", "train", "evaluation"],
    ["demo", "sweep", "sweep_grid", "visualize"],
    ["run_folders", "run_flags"],
    ["runs"],
    ["runner"],
    ["commands", "predict"],
    ["config_file", "cli", "__main__", "__init__"],
]
LAYER = {name: level for level, names in enumerate(PINI_LAYERS) for name in names}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported(path: Path, package: str) -> set[str]:
    """The first-level modules of ``package`` that ``path`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                parts = list(path.relative_to(ROOT / package).parts[:-1])
                base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target:
                    target = [alias.name for alias in node.names]
                    found.update(target)
                    continue
                found.add(target[0])
            elif node.module and node.module.split(".")[0] == package:
                rest = node.module.split(".")[1:]
                found.add(rest[0] if rest else node.names[0].name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package and len(parts) > 1:
                    found.add(parts[1])
    return found


def _layer_of(path: Path) -> str:
    parts = path.relative_to(ROOT / "pini").parts
    return parts[0] if len(parts) > 1 else path.stem


@pytest.mark.parametrize("package", ["pini", "pini_kernels"])
def test_no_module_is_longer_than_a_reader_can_follow(package):
    long = {
        str(path.relative_to(ROOT)): count
        for path in _modules(package)
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines (split by what a reader looks for): {long}"


def test_pini_imports_only_downwards():
    wrong = []
    for path in _modules("pini"):
        own = _layer_of(path)
        assert own in LAYER, f"{path.relative_to(ROOT)}: add its module to PINI_LAYERS"
        for target in _imported(path, "pini") - {own}:
            assert target in LAYER, f"{path.relative_to(ROOT)} imports unknown pini.{target}"
            if LAYER[target] > LAYER[own]:
                wrong.append(f"{path.relative_to(ROOT)} -> pini.{target}")
    assert not wrong, "imports from a higher layer: " + ", ".join(wrong)


def test_the_kernel_library_does_not_import_the_training_package():
    users = [
        str(path.relative_to(ROOT))
        for path in _modules("pini_kernels")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            name.split(".")[0] == "pini"
            for name in (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] * (node.level == 0)
            )
        )
    ]
    assert not users, f"pini_kernels must stand alone: {users}"
