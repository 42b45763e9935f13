"""Every relative markdown link in README.md and docs/**/*.md points to something that exists.

A link ``[text](target)`` (or an image ``![alt](target)``) whose target is relative must name an
existing file or folder; when it carries ``#anchor``, the markdown file it names (the linking file
itself for a bare ``#anchor``) must have a heading whose GitHub slug equals the anchor. Links in
fenced code blocks and in inline code spans are not links and are ignored.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) or ![alt](target), with an optional "title"; text may hold one level of [...]
LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def lines_outside_fences(path: Path):
    """(line number, line) for each line not inside a fenced code block."""
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                continue
            yield number, line
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not line.strip()[len(match.group(1)):].strip():
            fence = None


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (github-slugger, as GitHub renders it)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in " -" or category[0] in "LMN" or category == "Pc":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in lines_outside_fences(path):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        if slug in seen:
            seen[slug] += 1
            unique = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
            unique = slug
        result.add(unique)
    return frozenset(result)


def relative_links(path: Path):
    """(line number, link as written, target) for each relative link of a markdown file."""
    for number, line in lines_outside_fences(path):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group(1).strip("<>")
            if EXTERNAL.match(target):
                continue
            yield number, match.group(0), target


def problems(path: Path) -> list[str]:
    found = []
    where = path.relative_to(ROOT)
    for number, link, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not linked.exists():
            found.append(f"{where}:{number}: {link}: {file_part} does not exist")
            continue
        if anchor and linked.suffix == ".md" and linked.is_file():
            if unquote(anchor) not in anchors(linked):
                found.append(
                    f"{where}:{number}: {link}: no heading of "
                    f"{linked.relative_to(ROOT)} has the anchor #{anchor}"
                )
    return found


def test_slug_matches_github():
    assert github_slug("Where it stands: today's default (Intel Xeon, 2026-12-05)") == (
        "where-it-stands-todays-default-intel-xeon-2026-12-05"
    )
    assert github_slug("Correction graded (`--plus-correction graded`, 2026-12-01)") == (
        "correction-graded---plus-correction-graded-2026-12-01"
    )
    assert github_slug("20,000 images × 2 — ünïcode_ok") == "20000-images--2--ünïcode_ok"


def test_fenced_code_and_duplicate_headings(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# A\n\n```bash\n# not a heading\n[x](missing.md)\n```\n\n## A\n\n[ok](#a-1) [bad](#b)\n",
        encoding="utf-8",
    )
    assert anchors(doc) == {"a", "a-1"}
    assert [t for _, _, t in relative_links(doc)] == ["#a-1", "#b"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    found = problems(path)
    assert not found, "broken links:\n" + "\n".join(found)


DOC_PATH = re.compile(r"\bdocs/[\w./-]*?\.(?:md|csv|png)\b")


@pytest.mark.parametrize("folder", ["mixnn_fast", "scripts", "bench", "tests"])
def test_documents_named_in_the_code_exist(folder):
    """A comment or message that sends the reader to docs/<page> names a page that exists (the
    investigations moved into docs/mixnn_plus/ pages; a stale path would send them nowhere)."""
    missing = []
    for path in sorted((ROOT / folder).rglob("*")):
        if path.suffix not in (".py", ".sh", ".md") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            for name in DOC_PATH.findall(line):
                if not (ROOT / name).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {name} does not exist")
    assert not missing, "\n".join(missing)
