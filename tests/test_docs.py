"""Documentation links stay inside the repository and resolve, anchors included."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "tests" / "data").rglob("*.md")]
)
SOURCES = [
    *sorted(
        p
        for folder in ("lagnet", "tests", "examples", "benchmarks", "docs")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in {".py", ".md", ".ipynb", ".sh"} and p.name != "test_docs.py"
    ),
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (and GitHub) gives a heading."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def test_slug_matches_the_toc_extension() -> None:
    assert slug("4. Pooling and heads") == "4-pooling-and-heads"
    assert slug("LAS: top-K maps (B, K, H, W)") == "las-top-k-maps-b-k-h-w"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        assert dest.is_file(), f"{path.name}: link {target!r} points to a missing file"
        assert ROOT in dest.parents, f"{path.name}: link {target!r} leaves the repository"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{path.name}: no heading for anchor {target!r}"


def test_nothing_points_outside_the_repository() -> None:
    outside = re.compile(r"REFERENCE\.md|\.\./shared|shared/(spec|conformance|DESIGN|STYLE)")
    offenders = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in SOURCES
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert offenders == []
