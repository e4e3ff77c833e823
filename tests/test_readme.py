"""The Python examples of README.md and of the manual's pages in docs/ run as written (each in a temporary folder).

A block that continues another page's example is marked by the line ``<!-- continues: PAGE -->`` right above its
opening fence (PAGE relative to the repository root): the first Python block of PAGE runs first, in the same
namespace.
"""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(?:<!-- continues: (?P<continues>\S+) -->\n)?```python\n(?P<code>.*?)```", flags=re.S)


def _pages():
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _blocks(page):
    with open(os.path.join(ROOT, page)) as f:
        return [(m.group("code"), m.group("continues")) for m in BLOCK.finditer(f.read())]


def _cases():
    return [(page, i) for page in _pages() for i in range(len(_blocks(page)))]


def test_pages_have_examples():
    """The collection below finds the examples where they are (a renamed page or fence would silently drop them)."""
    counted = {page: len(_blocks(page)) for page in _pages()}
    for page in ("README.md", "docs/api.md", "docs/deploy.md", "docs/swin.md", "docs/timm.md", "docs/latency.md",
                 "docs/kernels.md"):
        assert counted.get(page, 0) >= 1, f"{page}: no python block found"


@pytest.mark.parametrize("page,index", _cases(), ids=[f"{p}-{i}" for p, i in _cases()])
def test_docs_python_block_runs(page, index, tmp_path, monkeypatch):
    code, continues = _blocks(page)[index]
    monkeypatch.chdir(tmp_path)
    ns = {}
    if continues:
        first = _blocks(continues)
        assert first, f"{page}: block {index} continues {continues}, which has no python block"
        exec(compile(first[0][0], f"{continues}-block-0", "exec"), ns)
    exec(compile(code, f"{page}-block-{index}", "exec"), ns)
