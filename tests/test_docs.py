"""The README stays a short front page, and every relative link in it and in docs/ resolves.

- README.md is at most 250 lines (as `wc -l` counts them).
- Every relative link (`[x](path)`, `![x](path)`, `[x]: path`) in README.md and docs/*.md names an
  existing file or folder, and every `#anchor` (in the page, or `page.md#anchor`) is the GitHub slug
  of a heading of the target page. Links inside code (fenced blocks, inline code) are not links.
- Every docs page is listed in the README and leads back to it on its first line.
- The checker itself can fail: a broken path and a broken anchor in a scratch tree are reported.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, ...


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept) and inline code removed."""
    lines, inside = [], None
    for line in text.split("\n"):
        fence = FENCE.match(line)
        if inside is None and fence:
            inside = fence.group(1)
            lines.append("")
        elif inside is not None:
            if fence and fence.group(1) == inside:
                inside = None
            lines.append("")
        else:
            lines.append(line)
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def slugify(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, with every character that is
    not a letter, digit, space, '-' or '_' dropped and spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The slugs of every heading outside code blocks; repeats get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    slugs = set()
    for line in prose_headings(text):
        slug = slugify(line)
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        slugs.add(slug)
    return slugs


def prose_headings(text: str) -> list[str]:
    out, inside = [], None
    for line in text.split("\n"):
        fence = FENCE.match(line)
        if inside is None and fence:
            inside = fence.group(1)
        elif inside is not None:
            if fence and fence.group(1) == inside:
                inside = None
        elif m := HEADING.match(line):
            out.append(m.group(2))
    return out


def links(text: str) -> list[str]:
    body = prose(text)
    return [m.group(1) for m in INLINE_LINK.finditer(body)] + REFERENCE_LINK.findall(body)


def broken_links(files: list[Path], root: Path) -> list[str]:
    """'file: link (why)' for every relative link among `files` that does not resolve."""
    problems = []
    for page in files:
        text = page.read_text(encoding="utf-8")
        for link in links(text):
            if not link or EXTERNAL.match(link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}: {link}"
            if not target.exists():
                problems.append(f"{where} (no such file)")
                continue
            if root.resolve() not in (target, *target.parents):
                problems.append(f"{where} (outside the repository)")
                continue
            if anchor:
                if target.is_dir() or target.suffix != ".md":
                    problems.append(f"{where} (an anchor into a file that is not Markdown)")
                elif anchor not in anchors(target.read_text(encoding="utf-8")):
                    problems.append(f"{where} (no heading with this anchor in {target.name})")
    return problems


def test_readme_is_at_most_250_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_relative_link_and_anchor_resolves():
    problems = broken_links(pages(), ROOT)
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_in_the_readme_and_leads_back_to_it():
    readme_links = {link.partition("#")[0] for link in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    docs = sorted((ROOT / "docs").glob("*.md"))
    for name in ("benchmarks", "reliability", "algorithm", "models", "rewards", "deployment", "scaling"):
        assert ROOT / "docs" / f"{name}.md" in docs, name
    for page in docs:
        assert f"docs/{page.name}" in readme_links, f"README.md does not link to docs/{page.name}"
        first = page.read_text(encoding="utf-8").split("\n", 1)[0]
        assert "](../README.md)" in first, f"{page.name}: the first line links back to the README"


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Remote services (`python bench/bench_remote.py`, ~3 min; measured 2026-11-29)",
         "remote-services-python-benchbench_remotepy-3-min-measured-2026-11-29"),
        ("The trainer against remote GPU servers (TLS + token)", "the-trainer-against-remote-gpu-servers-tls--token"),
        ("`docker compose up` on a GPU machine", "docker-compose-up-on-a-gpu-machine"),
        ("Adding a model (Qwen-Image, SDXL, …)", "adding-a-model-qwen-image-sdxl-"),
        ("Memory per GPU: SD3.5-Medium and FLUX.1-dev (estimates)", "memory-per-gpu-sd35-medium-and-flux1-dev-estimates"),
        ("A [linked](x.md) heading", "a-linked-heading"),
    ],
)
def test_slugs_follow_github(heading, slug):
    assert slugify(heading) == slug


def test_the_checker_reports_broken_links(tmp_path):
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "img.png").write_bytes(b"")
    (tmp_path / "outside.md").write_text("# Outside\n")
    (repo / "docs" / "page.md").write_text("# Page\n\n## Setup\n\n## Setup\n\n```bash\n# not a heading\n```\n")
    good = (
        "# Title\n\n## Intro\n\n[a](docs/page.md) [b](docs/page.md#setup) [c](docs/page.md#setup-1) "
        "[d](#intro) ![e](img.png) [f](https://example.com/nowhere) [g](docs/) `[h](missing.md)`\n\n"
        "```\n[i](missing.md)\n```\n"
    )
    readme = repo / "README.md"
    readme.write_text(good)
    assert broken_links([readme], repo) == []
    readme.write_text(
        good + "[x](docs/nope.md) ![y](docs/img.png) [z](docs/page.md#not-a-heading) [w](#nowhere) "
        "[v](docs/page.md#not-a-heading-2) [u](docs/page.md#setup-2) [t](img.png#top) [s](../outside.md)\n"
    )
    found = broken_links([readme], repo)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in found] == [
        "docs/nope.md", "docs/img.png", "docs/page.md#not-a-heading", "#nowhere",
        "docs/page.md#not-a-heading-2", "docs/page.md#setup-2", "img.png#top", "../outside.md",
    ], found
