"""The Python examples of README.md and of the pages under docs/ run as written, and their links
lead somewhere."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.DOTALL)


def _python_blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text())


EXAMPLES = _python_blocks(README)
# (id, code) for every ```python block of every docs/*.md page, e.g. ("docs/kernels.md-0", ...).
DOCS_EXAMPLES = [
    (f"docs/{page.name}-{index}", code)
    for page in sorted(DOCS.glob("*.md"))
    for index, code in enumerate(_python_blocks(page))
]


def _run_example(code: str, name: str, monkeypatch, capsys) -> None:
    # The examples use CPU tensors and the default backend, as a newcomer would.
    monkeypatch.delenv("PINI_KERNELS_BACKEND", raising=False)
    exec(compile(code, name, "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()


def test_readme_has_examples():
    assert len(EXAMPLES) >= 1


def test_docs_have_examples():
    assert len(DOCS_EXAMPLES) >= 1


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, monkeypatch, capsys):
    _run_example(EXAMPLES[index], f"README.md example {index}", monkeypatch, capsys)


@pytest.mark.parametrize(
    "code", [code for _, code in DOCS_EXAMPLES], ids=[name for name, _ in DOCS_EXAMPLES]
)
def test_docs_example_runs(code, request, monkeypatch, capsys):
    _run_example(code, f"{request.node.callspec.id} example", monkeypatch, capsys)


# The target of a Markdown link or image, [text](target) or ![text](target).
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize(
    "page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda page: str(page.relative_to(ROOT))
)
def test_links_resolve(page):
    """Every relative link of the front page and of docs/ names a file that exists, and an anchor
    names a heading of its page."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(target)
            continue
        if anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(target)
    assert not broken, f"{page.name}: links that lead nowhere: {broken}"
