"""Every relative link in the README and docs/*.md points at a file that exists, and every
``#anchor`` on a markdown target names one of its headings (GitHub's slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSER = MarkdownIt("commonmark").enable("table")


def tokens(page: Path) -> list[Token]:
    return PARSER.parse(page.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's rendered text: lowercase, without characters other than
    letters, digits, spaces, hyphens and underscores, spaces as hyphens."""
    text = "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def rendered(inline: Token) -> str:
    """The text an inline token renders (code spans and link texts included, markup not)."""
    return "".join(t.content for t in inline.children or [] if t.type in ("text", "code_inline"))


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    stream = tokens(page)
    for opening, inline in zip(stream, stream[1:], strict=False):
        if opening.type != "heading_open":
            continue
        base = slug(rendered(inline))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image outside code."""
    out = []
    for block in tokens(page):
        for token in block.children or []:
            target = token.attrGet("href") if token.type == "link_open" else token.attrGet("src")
            if token.type in ("link_open", "image") and isinstance(target, str):
                out.append(((block.map or [0])[0] + 1, target))
    return out


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
    page.write_text("# A\n\n```yaml\n# B\n```\n\n## A\n\n### `A`\n", encoding="utf-8")
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
