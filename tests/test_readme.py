"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, monkeypatch, capsys):
    # The examples use CPU tensors and the default backend, as a newcomer would.
    monkeypatch.delenv("PINI_KERNELS_BACKEND", raising=False)
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()
