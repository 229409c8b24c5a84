"""Every benchmark's table lives in its docs page and comes from its committed JSON."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from simulations.benchmark.cli import SUBCOMMANDS, build_parser
from simulations.benchmark.output import benchmark_page, read_document

REPO = Path(__file__).resolve().parents[4]


def committed_block(page: Path, marker: str) -> str:
    """The text between ``<!-- marker -->`` and ``<!-- /marker -->`` in ``page``."""
    match = re.search(
        rf"<!-- {re.escape(marker)} -->\n(.*?)\n<!-- /{re.escape(marker)} -->",
        page.read_text(),
        re.DOTALL,
    )
    assert match is not None, f"{page}: no <!-- {marker} --> block"
    return match.group(1)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_benchmark_writes_its_own_docs_page_by_default(name: str) -> None:
    # Execute
    args = build_parser().parse_args([name])

    # Assert
    assert args.page == Path(f"docs/{name}-benchmark.md")
    assert args.page == Path(benchmark_page(name))
    assert args.out == Path(f"benchmarks/{name}.json")


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_the_committed_table_is_what_table_from_writes(name: str) -> None:
    # Prepare
    subcommand = SUBCOMMANDS[name]
    document = read_document(REPO / "benchmarks" / f"{name}.json")

    # Execute
    table = subcommand.format_table(document)

    # Assert: the page holds exactly the generated table (nothing typed by hand)
    assert committed_block(REPO / benchmark_page(name), subcommand.marker) == table


# Pages of a benchmark run with other options: (subcommand, document, page).
FURTHER_PAGES = [("tgma", "benchmarks/tgma-mild.json", "docs/tgma-mild-benchmark.md")]


@pytest.mark.parametrize(("name", "document", "page"), FURTHER_PAGES)
def test_a_further_page_holds_what_table_from_writes(
    name: str, document: str, page: str
) -> None:
    # Prepare
    subcommand = SUBCOMMANDS[name]

    # Execute
    table = subcommand.format_table(read_document(REPO / document))

    # Assert
    assert committed_block(REPO / page, subcommand.marker) == table


def test_the_readme_holds_no_benchmark_table() -> None:
    # Assert: benchmark commands never write the README
    readme = (REPO / "README.md").read_text()
    for subcommand in SUBCOMMANDS.values():
        assert f"<!-- {subcommand.marker} -->" not in readme
