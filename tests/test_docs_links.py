"""Every relative link of README.md and docs/*.md names a file or folder of the repository, and a link to a heading
of a page (``page.md#anchor``) names a heading that page has."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
# pages that the manual links to and that other branches of the repository add; until they are there, a link to one
# of them is reported as a skip (by name) rather than a failure
def _pages():
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def links(page):
    """(target as written, repository-relative path) of every local link of ``page``, outside code blocks."""
    with open(os.path.join(ROOT, page)) as f:
        text = FENCE.sub("", f.read())
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # http:, https:, mailto:, in-page
            continue
        path = target.split("#", 1)[0]
        out.append((target, os.path.normpath(os.path.join(os.path.dirname(page), path))))
    return out


def anchors(page):
    """The anchors GitHub gives the headings of ``page``: lower case, punctuation dropped, spaces as hyphens."""
    with open(os.path.join(ROOT, page)) as f:
        text = FENCE.sub("", f.read())
    out, seen = set(), {}
    for title in re.findall(r"^#{1,6}\s+(.*?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_anchor_rule():
    assert "run-folders---out---overwrite---resume" in anchors("docs/cli.md")
    assert "what-it-does-measured" in anchors("README.md")


def test_link_pattern():
    """The pattern finds links and images, and drops URLs and in-page anchors."""
    page = os.path.join(ROOT, "README.md")
    assert ("docs/method.md", "docs/method.md") in links("README.md"), "README.md links docs/method.md"
    assert os.path.isfile(page)
    found = LINK.findall('x [a](b.md) ![c](d/e.png) [f](https://g) [h](#i) [j](k.md#l "t")')
    assert found == ["b.md", "d/e.png", "https://g", "#i", "k.md#l"]


@pytest.mark.parametrize("page", _pages())
def test_local_links_resolve(page):
    missing = [(t, p) for t, p in links(page) if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"{page}: links to files that do not exist: {[t for t, _ in missing]}"


@pytest.mark.parametrize("page", _pages())
def test_heading_links_resolve(page):
    bad = []
    for target, path in links(page):
        if "#" in target and path.endswith(".md") and os.path.isfile(os.path.join(ROOT, path)):
            if target.split("#", 1)[1] not in anchors(path):
                bad.append(target)
    assert not bad, f"{page}: links to headings that do not exist: {bad}"
