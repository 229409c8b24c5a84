"""SiteBridge's logging: the namespace and format, the level flag, progress figures."""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys

import pytest

from core.config import load_default_config, load_run_config, read_default_run_config
from core.logs import (
    NAMESPACE,
    Countdown,
    LogLevel,
    add_log_level_option,
    configure_logging,
    format_duration,
    get_logger,
    log_level_of,
    parse_level,
    progress_note,
)

# 2026-12-07 10:31:02,118 INFO sitebridge.coordinator: ...
HEAD = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "


@pytest.fixture
def pristine() -> logging.Logger:
    """The ``sitebridge`` logger as a fresh process has it (conftest restores it)."""
    logger = logging.getLogger(NAMESPACE)
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    return logger


def test_a_line_has_the_time_level_and_sitebridge_logger_name(
    pristine: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    configure_logging(LogLevel.INFO)

    # Execute
    get_logger("coordinator").info("run 1 started")
    get_logger("site.B").warning("slow disk")

    # Assert
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(HEAD + r"INFO sitebridge\.coordinator: run 1 started", lines[0])
    assert re.fullmatch(HEAD + r"WARNING sitebridge\.site\.B: slow disk", lines[1])
    assert len(lines) == 2


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        (LogLevel.DEBUG, ["DEBUG", "INFO", "WARNING", "ERROR"]),
        (LogLevel.INFO, ["INFO", "WARNING", "ERROR"]),
        (LogLevel.WARNING, ["WARNING", "ERROR"]),
        (LogLevel.ERROR, ["ERROR"]),
    ],
)
def test_the_level_filters_the_less_severe_lines(
    pristine: logging.Logger,
    capsys: pytest.CaptureFixture[str],
    level: LogLevel,
    shown: list[str],
) -> None:
    # Prepare
    configure_logging(level)
    logger = get_logger("train")

    # Execute
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")

    # Assert
    printed = [line.split()[2] for line in capsys.readouterr().out.splitlines()]
    assert printed == shown


def test_configuring_twice_never_duplicates_a_line(
    pristine: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    configure_logging(LogLevel.INFO)
    configure_logging(LogLevel.DEBUG)
    get_logger("serve").debug("once")

    # Assert: one handler, the second call's level
    assert len(pristine.handlers) == 1
    assert capsys.readouterr().out.count("once") == 1


def test_the_root_and_flower_loggers_are_left_alone(pristine: logging.Logger) -> None:
    # Prepare
    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    before = (list(root.handlers), root.level, list(flwr.handlers), flwr.level)

    # Execute
    configure_logging(LogLevel.DEBUG)

    # Assert
    assert (list(root.handlers), root.level, list(flwr.handlers), flwr.level) == before


def test_if_unconfigured_keeps_the_level_a_process_chose(
    pristine: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: sitebridge-serve started with --log-level warning
    configure_logging(LogLevel.WARNING)

    # Execute: the ClientApp then asks for the run config's level
    applied = configure_logging(LogLevel.DEBUG, if_unconfigured=True)
    get_logger("site.B").info("epoch 1/2")

    # Assert
    assert not applied
    assert pristine.level == logging.WARNING
    assert capsys.readouterr().out == ""


def test_each_line_of_a_record_carries_the_head(
    pristine: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    configure_logging(LogLevel.INFO)

    # Execute: a report, and a traceback
    get_logger("coordinator").info("report written\n\n| a | b |")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("serve").exception("task failed")

    # Assert: every line says when, how bad and who
    lines = capsys.readouterr().out.splitlines()
    assert all(re.match(HEAD + r"(INFO|ERROR) sitebridge\.", line) for line in lines)
    assert lines[2].endswith("sitebridge.coordinator: | a | b |")
    assert lines[-1].endswith("sitebridge.serve: RuntimeError: boom")


def test_lines_go_to_the_stdout_of_the_moment(
    pristine: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: stdout is swapped after configuring (as Flower and pytest do)
    configure_logging(LogLevel.INFO)
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", swapped)

    # Execute
    get_logger("loopback").info("superlink up")

    # Assert
    assert swapped.getvalue().endswith("INFO sitebridge.loopback: superlink up\n")


def test_a_bad_level_name_is_an_error_naming_the_key_and_the_levels() -> None:
    # Prepare
    flat = read_default_run_config()
    flat["output.log-level"] = "loud"

    # Execute / Assert
    expected = (
        "output.log-level must be one of 'debug', 'info', 'warning', 'error', "
        "got 'loud'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        load_run_config(flat)
    with pytest.raises(ValueError, match=r"^--log-level must be one of 'debug', "):
        parse_level(3, "--log-level")


def test_the_run_config_level_defaults_to_info_and_takes_any_case() -> None:
    # Execute / Assert
    assert load_default_config().output.log_level is LogLevel.INFO
    config = load_default_config(**{"output.log-level": "DEBUG"})
    assert config.output.log_level is LogLevel.DEBUG


def test_the_log_level_option_stands_before_or_after_a_subcommand(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    parser = argparse.ArgumentParser(prog="tool")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    add_log_level_option(parser, run)

    # Execute / Assert
    assert log_level_of(parser.parse_args(["run"])) is LogLevel.INFO
    assert log_level_of(parser.parse_args(["--log-level", "debug", "run"])) is (
        LogLevel.DEBUG
    )
    assert log_level_of(parser.parse_args(["run", "--log-level", "ERROR"])) is (
        LogLevel.ERROR
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--log-level", "loud"])
    assert "argument --log-level: invalid choice: 'loud' (choose from 'debug', " in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "step", "count", "expected"),
    [
        (3, 10, 6.3, 2.1, 100, "2.1 s, 48 samples/s, eta 14.7 s"),
        (1, 30, 4.0, 4.0, 8, "4.0 s, 2.0 samples/s, eta 1 min 56 s"),
        (2, 200, 90.0, 45.0, None, "45.0 s, eta 2 h 28 min"),
        (10, 10, 21.0, 2.1, 100, "2.1 s, 48 samples/s, total 21.0 s"),
    ],
)
def test_progress_figures_show_the_step_the_rate_and_the_eta(
    done: int,
    total: int,
    elapsed: float,
    step: float,
    count: int | None,
    expected: str,
) -> None:
    # Execute / Assert
    note = progress_note(done, total, elapsed_s=elapsed, step_s=step, count=count)
    assert note == expected


def test_durations_read_as_seconds_minutes_or_hours() -> None:
    # Execute / Assert
    assert [format_duration(s) for s in (0.04, 59.9, 60.0, 3599.4, 3600.0)] == [
        "0.04 s",
        "59.9 s",
        "1 min 00 s",
        "59 min 59 s",
        "1 h 00 min",
    ]


def test_a_countdown_counts_items_with_their_time_and_eta() -> None:
    # Prepare: fixed clock readings, no waiting
    readings = iter([10.0, 12.0, 16.0, 18.0])
    countdown = Countdown(3, clock=lambda: next(readings))

    # Execute
    notes = [countdown.tick(count=4, unit="cases") for _ in range(3)]

    # Assert
    assert notes == [
        "1/3 (2.0 s, 2.0 cases/s, eta 4.0 s)",
        "2/3 (4.0 s, 1.0 cases/s, eta 3.0 s)",
        "3/3 (2.0 s, 2.0 cases/s, total 8.0 s)",
    ]
