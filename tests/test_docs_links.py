"""Every relative link in the README and docs/*.md points at a file that exists, and every
``#anchor`` on a markdown target names one of its headings (GitHub's slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept)."""
    out, fenced = [], None
    for line in text.split("\n"):
        match = FENCE.match(line)
        if fenced is None and match:
            fenced = match.group(1)
            out.append("")
        elif fenced is not None:
            if line.strip().startswith(fenced):
                fenced = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lowercase, without characters other
    than letters, digits, spaces, hyphens and underscores, spaces as hyphens."""
    text = LINK.sub(lambda m: m.group(1), heading)  # a link in a heading renders as its text
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text(encoding="utf-8")).split("\n"):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every link outside code (fenced blocks and inline code spans)."""
    text = prose(page.read_text(encoding="utf-8"))
    # Inline code keeps its length of characters, so line numbers and link texts stay in place.
    text = INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in LINK.finditer(text)]


def broken(page: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each of the page's relative links."""
    out = []
    for line, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}:{line}: {target}"
        if not resolved.exists():
            out.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            out.append(f"{where}: no heading with this anchor in {resolved.relative_to(root)}")
    return out


def test_slugs_follow_github() -> None:
    assert slug("Results (H200, 2026-12-02): three ratios, CUDA graphs") == (
        "results-h200-2026-12-02-three-ratios-cuda-graphs"
    )
    assert slug("Measuring speed: `tokenreduce bench`") == "measuring-speed-tokenreduce-bench"
    assert slug("Merge schedules (`schedule:`)") == "merge-schedules-schedule"
    assert slug("Kernels per merged block: `tokenreduce bench --ops`") == (
        "kernels-per-merged-block-tokenreduce-bench---ops"
    )


def test_repeated_headings_and_code_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A\n\n```yaml\n# B\n```\n\n## A\n\n### A\n", encoding="utf-8")
    assert anchors(page) == {"a", "a-1", "a-2"}
    page.write_text(
        "[ok](#a) [gone](#b) [file](missing.md) `[code](missing.md)`\n\n```\n[x](missing.md)\n```\n# A\n",
        encoding="utf-8",
    )
    problems = [p.split(": ", 1)[1] for p in broken(page, tmp_path)]
    assert problems == ["#b: no heading with this anchor in page.md", "missing.md: no such file"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    problems = broken(page)
    assert not problems, "broken links:\n" + "\n".join(problems)
