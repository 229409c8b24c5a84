"""The ServerApp's entry point: its lines are the coordinator's, at the run's level.

Runs :func:`server.app.main` on the FakeGrid (the real ClientApp in this process),
stopped after discover, so that it takes a second.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from core.config import ConfigValue
from core.logs import NAMESPACE
from server.app import main
from server.coordinator import PhaseError
from tests.unit.server.fake_grid import build_grid

HEAD = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "  # 2026-12-07 10:31:02,118


@pytest.fixture
def fresh_logging() -> None:
    """A ServerApp process whose SiteBridge logging nothing configured yet."""
    logger = logging.getLogger(NAMESPACE)
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)


def run_to_discover(
    federation: Path,
    run_config: dict[str, ConfigValue],
    runs: Path,
    **overrides: ConfigValue,
) -> None:
    flat = {
        **run_config,
        "last-phase": "discover",
        "output.runs-dir": str(runs),
        **overrides,
    }
    context = Context(
        run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=flat
    )
    main(build_grid(federation, flat), context)  # type: ignore[arg-type]


@pytest.mark.usefixtures("fresh_logging")
def test_the_coordinators_lines_are_its_loggers_one_head_per_line(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    run_to_discover(federation, run_config, tmp_path)

    # Assert: every line, the report's included, says when, INFO and who
    lines = capsys.readouterr().out.splitlines()
    assert all(
        re.match(HEAD + r"INFO sitebridge\.coordinator: ", line) for line in lines
    ), lines
    said = [line.split(": ", 1)[1] for line in lines]
    assert f"run 5: results in {tmp_path / '5'}" in said
    assert "discover: sites ['A', 'B', 'C'], target A" in said
    assert any(text.startswith("report written to ") for text in said)
    assert "# SiteBridge run 5" in said


@pytest.mark.usefixtures("fresh_logging")
def test_the_run_configs_log_level_quiets_the_coordinator(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    run_to_discover(federation, run_config, tmp_path, **{"output.log-level": "warning"})

    # Assert
    assert (tmp_path / "5" / "report.md").is_file()
    assert capsys.readouterr().out == ""


@pytest.mark.usefixtures("fresh_logging")
def test_debug_shows_each_reply_at_both_ends(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    run_to_discover(federation, run_config, tmp_path, **{"output.log-level": "debug"})

    # Assert: the coordinator's view of each hello, and each site's ledgered release
    output = capsys.readouterr().out
    for site in ("A", "B", "C"):
        assert f" DEBUG sitebridge.coordinator: query.hello from {site}: replied" in (
            output
        )
        assert re.search(
            rf" DEBUG sitebridge\.site\.{site}\.guard: query\.hello released: "
            r"\d+ bytes, ledger entry \d+\n",
            output,
        )


@pytest.mark.usefixtures("fresh_logging")
def test_a_failure_is_a_warning_that_the_warning_level_still_shows(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute: a target that is not a site stops the run at discover
    with pytest.raises(PhaseError, match="target site 'Z'"):
        run_to_discover(
            federation,
            run_config,
            tmp_path,
            **{"output.log-level": "warning", "federation.target-site": "Z"},
        )

    # Assert: only the failure is shown, at WARNING, with the command to resume
    lines = capsys.readouterr().out.splitlines()
    assert lines
    assert all(
        re.match(HEAD + r"WARNING sitebridge\.coordinator: ", line) for line in lines
    )
    assert ": the run stopped: discover: target site 'Z'" in lines[0]
    assert any("resume-run=" in line for line in lines)
