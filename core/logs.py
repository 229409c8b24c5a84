"""SiteBridge's logging: one namespace, one format, one level flag, progress figures.

Owns how every SiteBridge process reports progress and diagnostics (results a command
prints for its user stay on stdout as program output):

- **namespace**: every logger is ``sitebridge.<part>`` (:func:`get_logger`):
  ``sitebridge.coordinator``, ``sitebridge.site.<site name>`` (its guard:
  ``sitebridge.site.<site name>.guard``; ``sitebridge.guard`` before the site is
  known), ``sitebridge.serve``, ``sitebridge.train``, ``sitebridge.consensus``,
  ``sitebridge.semisup``, ``sitebridge.data``, ``sitebridge.audit``,
  ``sitebridge.benchmark``, ``sitebridge.loopback``;
- **format** (:data:`LOG_FORMAT`), the one ``sitebridge-serve`` always used::

      2026-12-07 10:31:02,118 INFO sitebridge.site.B: [train B] epoch 3/30 ...

  A record of several lines (a report, a traceback) repeats the head on every line,
  so each line of a log file says when, how bad and who;
- **level**: :class:`LogLevel`, read from the run config's ``output.log-level`` or a
  command's ``--log-level`` (:func:`add_log_level_option`);
- :func:`configure_logging`: one handler on the ``sitebridge`` logger, writing to the
  process's stdout;
- **progress figures** for long loops, the way the field's tools show them (nnU-Net's
  epoch time, tqdm's rate and ETA) but on one line: :func:`progress_note` and
  :class:`Countdown`.

Why stdout, looked up at each line: in a Flower simulation the ServerApp's process
mirrors what is written to its ``sys.stdout`` to the SuperLink
(``flwr.supercore.logger.mirror_output_to_queue`` wraps ``sys.stdout.write``), which
``flwr run --stream`` prints, and Ray forwards a ClientApp actor's stdout to that
process; the prints these loggers replace reached the console exactly that way. A
handler that kept the stream it was created with would miss a later swap of
``sys.stdout`` (Flower's ``restore_output``, pytest's capture), so this one asks for
``sys.stdout`` at every line. The root logger and Flower's ``flwr`` logger are left
alone. Plain Python; never imports flwr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Final

NAMESPACE: Final = "sitebridge"
LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogLevel(StrEnum):
    """The least severe level shown (``output.log-level``, ``--log-level``).

    Example:
        >>> LogLevel("DEBUG"), LogLevel.WARNING.number
        (<LogLevel.DEBUG: 'debug'>, 30)
    """

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @classmethod
    def _missing_(cls, value: object) -> LogLevel | None:
        # "INFO" is what Python's logging spells; accept it as "info".
        if isinstance(value, str):
            return next((m for m in cls if m.value == value.strip().lower()), None)
        return None

    @property
    def number(self) -> int:
        """The ``logging`` module's number of this level (``logging.INFO``, ...)."""
        return logging.getLevelNamesMapping()[self.name]


DEFAULT_LEVEL: Final = LogLevel.INFO
LEVEL_NAMES: Final = tuple(level.value for level in LogLevel)


def parse_level(value: object, key: str) -> LogLevel:
    """The :class:`LogLevel` that ``value`` names; case does not matter.

    Args:
        value: a level name, e.g. ``"info"``.
        key: where the value came from, for the error (``output.log-level``).

    Raises:
        ValueError: ``value`` names no level; the message names ``key`` and the
            allowed values.

    Example:
        >>> parse_level("Warning", "output.log-level")
        <LogLevel.WARNING: 'warning'>
        >>> parse_level("loud", "--log-level")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --log-level must be one of 'debug', 'info', ..., got 'loud'
    """
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return LogLevel(value)
    allowed = ", ".join(repr(name) for name in LEVEL_NAMES)
    raise ValueError(f"{key} must be one of {allowed}, got {value!r}")


def get_logger(part: str) -> logging.Logger:
    """The logger ``sitebridge.<part>``, e.g. ``get_logger("site.B")``.

    Example:
        >>> get_logger("coordinator").name
        'sitebridge.coordinator'
    """
    return logging.getLogger(f"{NAMESPACE}.{part}")


class LineFormatter(logging.Formatter):
    r""":data:`LOG_FORMAT`, with its head repeated on every line of a record.

    Example:
        >>> record = logging.LogRecord("sitebridge.x", logging.INFO, "", 0,
        ...                            "one\ntwo", None, None)
        >>> LineFormatter("%(levelname)s %(name)s: %(message)s").format(record)
        'INFO sitebridge.x: one\nINFO sitebridge.x: two'
    """

    def __init__(self, fmt: str = LOG_FORMAT) -> None:
        if not fmt.endswith("%(message)s"):
            raise ValueError(f"a line format ends with %(message)s, got {fmt!r}")
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        """The record's text (its message, then any traceback), one head per line."""
        first, *rest = super().format(record).split("\n")
        if not rest:
            return first
        message_start = record.message.split("\n", 1)[0]
        head = first[: len(first) - len(message_start)]
        return "\n".join([first, *(head + line for line in rest)])


class _StdoutHandler(logging.Handler):
    """Writes each record to ``sys.stdout`` as it is at that moment (see above)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never break the work it reports on
            self.handleError(record)


def _installed_handler() -> _StdoutHandler | None:
    handlers = logging.getLogger(NAMESPACE).handlers
    return next((h for h in handlers if isinstance(h, _StdoutHandler)), None)


def configure_logging(
    level: LogLevel = DEFAULT_LEVEL, *, if_unconfigured: bool = False
) -> bool:
    """Send every ``sitebridge.*`` line at ``level`` or above to stdout.

    Installs one handler on the ``sitebridge`` logger (calling this again only sets
    the level: never a second handler, never a duplicated line) and sets that
    logger's level. The root logger and Flower's ``flwr`` logger are not touched.

    Args:
        level: the least severe level shown.
        if_unconfigured: leave a process whose SiteBridge logging is already
            configured as it is. The ClientApp passes it: in a deployment
            ``sitebridge-serve`` configured it from the site's own ``--log-level``,
            which the coordinator's run config does not override.

    Returns:
        Whether the level was applied.
    """
    logger = logging.getLogger(NAMESPACE)
    if _installed_handler() is None:
        handler = _StdoutHandler()
        handler.setFormatter(LineFormatter())
        logger.addHandler(handler)
    elif if_unconfigured:
        return False
    logger.setLevel(level.number)
    return True


def add_log_level_option(*parsers: argparse.ArgumentParser) -> None:
    """Give each parser (a command and its subcommands) the same ``--log-level``.

    Read the value with :func:`log_level_of`; it may stand before or after a
    subcommand. A bad name is argparse's usage error, naming the allowed values.
    """
    for parser in parsers:
        parser.add_argument(
            "--log-level",
            type=str.lower,
            choices=LEVEL_NAMES,
            default=argparse.SUPPRESS,
            help="the least severe progress and diagnostic lines shown on stdout: "
            f"{', '.join(LEVEL_NAMES)} (default {DEFAULT_LEVEL.value})",
        )


def log_level_of(args: argparse.Namespace) -> LogLevel:
    """The ``--log-level`` of parsed arguments, or the default."""
    return LogLevel(getattr(args, "log_level", DEFAULT_LEVEL.value))


# A progress sink: the site jobs and training loops report progress lines through one;
# the ClientApp's logs them at the site's logger, a benchmark's at its own.
Progress = Callable[[str], None]


def quiet(_line: str) -> None:
    """The progress sink that drops every line (the jobs' default)."""


def format_duration(seconds: float) -> str:
    """A duration as progress lines show it.

    Example:
        >>> format_duration(0.034), format_duration(14.66), format_duration(125)
        ('0.03 s', '14.7 s', '2 min 05 s')
        >>> format_duration(3725)
        '1 h 02 min'
    """
    if seconds < 0.995:
        return f"{max(seconds, 0.0):.2f} s"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def format_rate(count: float, seconds: float, unit: str) -> str:
    """``count`` per second, e.g. ``48 samples/s`` (one decimal below 10).

    Example:
        >>> format_rate(100, 2.1, "samples"), format_rate(5, 2.0, "steps")
        ('48 samples/s', '2.5 steps/s')
    """
    rate = count / seconds if seconds > 0 else float("inf")
    shown = f"{rate:.1f}" if rate < 9.95 else f"{rate:.0f}"
    return f"{shown} {unit}/s"


def progress_note(
    done: int,
    total: int,
    *,
    elapsed_s: float,
    step_s: float,
    count: float | None = None,
    unit: str = "samples",
) -> str:
    """The bracketed figures of a progress line: the last step, the rate, the ETA.

    The ETA assumes the rest goes at the mean pace so far; the last step gives the
    total time instead.

    Args:
        done: items (epochs, images, candidates...) finished, from 1.
        total: items in all.
        elapsed_s: seconds since the loop started.
        step_s: seconds of the last step (one epoch, or the items since the last
            line).
        count: what the last step processed (samples, steps), for the rate.
        unit: what ``count`` counts.

    Example:
        >>> progress_note(3, 10, elapsed_s=6.3, step_s=2.1, count=100)
        '2.1 s, 48 samples/s, eta 14.7 s'
        >>> progress_note(10, 10, elapsed_s=21.0, step_s=2.1)
        '2.1 s, total 21.0 s'
    """
    parts = [format_duration(step_s)]
    if count is not None:
        parts.append(format_rate(count, step_s, unit))
    if done >= total:
        parts.append(f"total {format_duration(elapsed_s)}")
    elif done > 0:
        parts.append(f"eta {format_duration(elapsed_s / done * (total - done))}")
    return ", ".join(parts)


class Countdown:
    """``done/total`` of a long loop that is not epochs, with each item's time and ETA.

    Args:
        total: items in the loop.
        clock: the seconds source (a test passes fixed times).

    Example:
        >>> ticks = iter([0.0, 2.0, 5.0])
        >>> countdown = Countdown(3, clock=lambda: next(ticks))
        >>> countdown.tick()
        '1/3 (2.0 s, eta 4.0 s)'
        >>> countdown.tick()
        '2/3 (3.0 s, eta 2.5 s)'
    """

    def __init__(
        self, total: int, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.total = total
        self.done = 0
        self._clock = clock
        self._started = self._mark = clock()

    def tick(self, count: float | None = None, unit: str = "samples") -> str:
        """Count one item done; return ``done/total (<item s>, [rate, ]eta ...)``."""
        now = self._clock()
        self.done += 1
        note = progress_note(
            self.done,
            self.total,
            elapsed_s=now - self._started,
            step_s=now - self._mark,
            count=count,
            unit=unit,
        )
        self._mark = now
        return f"{self.done}/{self.total} ({note})"
