"""The repository's documentation stands on its own: every reference resolves inside it.

Checks every text file of the repository for references to documents outside it, every
``docs/<page>.md#<anchor>`` a source file cites, and every relative link of the README
and the ``docs/`` pages (the file exists; an anchor names one of its headings).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = frozenset(
    {".git", ".venv", "data", "runs", ".flwr-home", "__pycache__", ".cache"}
)
TEXT_SUFFIXES = frozenset(
    {".py", ".md", ".toml", ".sh", ".template", ".service", ".txt", ".cfg", ".yml"}
)
# Spelled in pieces so that this file does not cite them itself.
OUTSIDE_DOCUMENTS = (
    *(f"{name}.md" for name in ("METHODS", "DESIGN", "STYLE", "DEPLOY")),
    "../" + "shared",
)
CITED_PAGE = re.compile(r"docs/([a-z0-9-]+\.md)(?:#([\w-]+))?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def text_files() -> Iterator[Path]:
    """Every text file of the repository outside generated and environment folders."""
    for path in sorted(REPO.rglob("*")):
        relative = path.relative_to(REPO)
        if SKIPPED_DIRS & set(relative.parts) or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or path.name in {"Makefile", "run"}:
            yield path


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page`` (fenced code skipped)."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_heading_anchors_follow_githubs_rule(tmp_path: Path) -> None:
    # Prepare
    page = tmp_path / "page.md"
    page.write_text(
        "# Flower 1.39 behaviours\n```bash\n# not a heading\n```\n"
        "## What `federation.min-sites` counts\n"
    )

    # Execute
    anchors = heading_anchors(page)

    # Assert
    assert anchors == {"flower-139-behaviours", "what-federationmin-sites-counts"}


def test_no_file_refers_to_a_document_outside_the_repository() -> None:
    # Execute
    found = [
        f"{path.relative_to(REPO)}:{number}: {name}"
        for path in text_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for name in OUTSIDE_DOCUMENTS
        if name in line
    ]

    # Assert
    assert found == []


def test_every_cited_docs_page_and_anchor_exists() -> None:
    # Execute: docs/<page>.md[#anchor] anywhere in the repository
    broken = []
    for path in text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for page_name, anchor in CITED_PAGE.findall(line):
                page = REPO / "docs" / page_name
                if not page.is_file():
                    broken.append(f"{path.relative_to(REPO)}:{number}: {page_name}")
                elif anchor and anchor not in heading_anchors(page):
                    broken.append(
                        f"{path.relative_to(REPO)}:{number}: {page_name}#{anchor}"
                    )

    # Assert
    assert broken == []


@pytest.mark.parametrize(
    "page",
    [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))],
    ids=lambda page: page.name,
)
def test_every_relative_link_resolves(page: Path) -> None:
    # Execute
    broken = []
    for target in MARKDOWN_LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked)
        ):
            broken.append(target)

    # Assert
    assert broken == []


REPOSITORY_PATH = re.compile(
    r"`((?:core|clients|server|simulations|deploy|tests|benchmarks|docs)/[\w/.\-]+)`"
)


@pytest.mark.parametrize(
    "page",
    [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))],
    ids=lambda page: page.name,
)
def test_every_repository_path_a_page_names_exists(page: Path) -> None:
    # Execute: `core/...`, `deploy/...` and the like, as the pages spell them
    missing = [
        name
        for name in REPOSITORY_PATH.findall(page.read_text())
        if not (REPO / name).exists()
    ]

    # Assert
    assert missing == []
