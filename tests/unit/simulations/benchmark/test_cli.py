"""The benchmark command line: ``--log-level``, and progress through the logger."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from core.logs import NAMESPACE, LogLevel, configure_logging
from simulations.benchmark.cli import main
from simulations.benchmark.output import log_progress

REPO = Path(__file__).resolve().parents[4]


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "warning", "tgma"],
        ["tgma", "--log-level", "WARNING"],
    ],
    ids=["before", "after"],
)
def test_the_log_level_sets_what_the_benchmark_shows(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the table from the committed document, printed only
    table_from = ["--table-from", str(REPO / "benchmarks" / "tgma.json"), "--page", ""]

    # Execute
    exit_code = main([*argv, *table_from])
    log_progress("not shown at warning")

    # Assert: the table is program output on stdout; the INFO line is filtered
    assert exit_code == 0
    assert logging.getLogger(NAMESPACE).level == logging.WARNING
    output = capsys.readouterr().out
    assert output.startswith("|")
    assert "not shown" not in output


def test_progress_lines_are_the_benchmark_loggers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    configure_logging(LogLevel.INFO)

    # Execute
    log_progress("target A: tgma 0.949, target 1/6 (31.0 s, eta 2 min 35 s)")

    # Assert
    assert re.fullmatch(
        r"\S+ \S+ INFO sitebridge\.benchmark: target A: tgma 0\.949, target 1/6 "
        r"\(31\.0 s, eta 2 min 35 s\)\n",
        capsys.readouterr().out,
    )
