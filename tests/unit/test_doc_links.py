"""Every relative link in the project's markdown resolves: the file exists, and a #section of a
markdown file names one of its headings (as GitHub spells the anchor). Paths under docs/ named
in code, scripts and prose exist too, so moving a page cannot leave a pointer behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP = {"node_modules", "build", "dist"}  # and dot-folders (.git, .venv), *.egg-info
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"`[^`\n]+`")
# docs/... as a path of this project, not the tail of a URL (".../docs/...")
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*[\w/]")


def _tracked(pattern: str, under: Path = ROOT) -> list[Path]:
    return sorted(p for p in under.rglob(pattern)
                  if not any(part in SKIP or part.startswith(".") or part.endswith(".egg-info")
                             for part in p.relative_to(ROOT).parts))


def anchors(md: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to '-'
    (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in FENCE.sub("", md.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(md: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", md.read_text()))
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, section = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif section and dest.suffix == ".md" and section not in anchors(dest):
            bad.append(f"{target}: no heading #{section} in {dest.name}")
    return bad


@pytest.mark.parametrize("md", _tracked("*.md"), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    assert broken_links(md) == []


def test_docs_paths_named_in_text_exist() -> None:
    """docs/... written as plain text (a comment, a docstring, a page's prose) names a path from
    the project's root; it must exist as surely as a link's target."""
    sources = [p for d in ("src", "bench", "scripts", "tests")
               for ext in ("*.py", "*.sh") for p in _tracked(ext, ROOT / d)] + _tracked("*.md")
    missing = [f"{src.relative_to(ROOT)}: {path}" for src in sources
               for path in DOCS_PATH.findall(src.read_text())
               if path.endswith(("/", ".md", ".json", ".png"))  # a page or folder, not a QEMU doc
               and "NAME" not in path and not (ROOT / path).exists()]
    assert missing == []


def test_the_checker_catches_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n\n## A section, with punctuation!\n")
    page.write_text("[ok](b.md#a-section-with-punctuation) [gone](c.md) [bad](b.md#nope)\n"
                    "`[in code](d.md)` ![img](b.md) [web](https://example.org/x.md)\n")
    assert broken_links(page) == ["c.md: no such file", "b.md#nope: no heading #nope in b.md"]
