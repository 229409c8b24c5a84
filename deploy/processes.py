"""Process bookkeeping for the loopback harness: which processes are ours, and are gone.

Owns reading ``/proc`` (stat, cmdline, environ), the identity of a process (PID *and*
start time, so that a recycled PID is never mistaken for ours), and
:class:`ProcessTracker`: every process a harness started, every descendant of those and
every process carrying the harness's marker variable, followed until all of them have
exited. Processes are never looked up by name (other harnesses and simulations may run
on the same machine). Linux only; knows nothing about Flower or the deploy scripts.

Example:
    >>> import os
    >>> record = read_process(os.getpid())
    >>> record is not None and is_running(record)
    True
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

# States of a process that has exited but is not yet reaped (zombie, dead).
_EXITED_STATES = frozenset({"Z", "X"})


class LeftoverProcessesError(AssertionError):
    """Processes of the harness survived :meth:`LoopbackDeployment.close`."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One process, identified by PID and start time (immune to PID reuse)."""

    pid: int
    start_ticks: int
    command: str


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent PID, start ticks) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _read_command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:300]


def read_process(pid: int) -> ProcessRecord | None:
    """The running process ``pid``, or None when it is gone or a zombie."""
    stat = _read_stat(pid)
    if stat is None or stat[0] in _EXITED_STATES:
        return None
    return ProcessRecord(pid=pid, start_ticks=stat[2], command=_read_command(pid))


def is_running(record: ProcessRecord) -> bool:
    """Whether the very process of ``record`` still runs (not a zombie, not reused)."""
    stat = _read_stat(record.pid)
    return (
        stat is not None
        and stat[0] not in _EXITED_STATES
        and stat[2] == record.start_ticks
    )


def _process_table() -> dict[int, tuple[int, int]]:
    """PID -> (parent PID, start ticks) of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        stat = _read_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat[0] not in _EXITED_STATES:
            table[int(entry.name)] = (stat[1], stat[2])
    return table


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


class ProcessTracker:
    """The processes of one harness: those it started and every one they started.

    Args:
        marker: the ``NAME=value`` environment entry that every process the harness
            starts inherits, so that descendants are found even after their parent
            died.
    """

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        # PID -> the latest record seen for it; never forgets an exited process.
        self.records: dict[int, ProcessRecord] = {}

    def track(self, pid: int) -> ProcessRecord | None:
        """Track the running process ``pid``; return its record, None when it is gone.

        Updates ``records`` in place.
        """
        record = read_process(pid)
        if record is not None:
            # The latest record: a fork execs its program after we first saw it, and
            # a reused PID (other start time) means the earlier process is gone.
            self.records[pid] = record
        return record

    def refresh(self) -> None:
        """Track every descendant of a tracked process, and every marked process."""
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in table.items():
            children.setdefault(parent, []).append(pid)
        stack = [record.pid for record in self.records.values() if is_running(record)]
        stack += [
            pid
            for pid in table
            if pid not in self.records and _has_marker(pid, self.marker)
        ]
        seen: set[int] = set()
        while stack:
            pid = stack.pop()
            if pid in seen or pid == os.getpid():
                continue
            seen.add(pid)
            if self.track(pid) is not None:
                stack.extend(children.get(pid, []))

    def tracked(self) -> list[ProcessRecord]:
        """Every process tracked so far, after a :meth:`refresh` (some may be gone)."""
        self.refresh()
        return list(self.records.values())

    def marked(self) -> list[ProcessRecord]:
        """Running processes that carry the marker (without tracking them)."""
        return [
            record
            for pid in _process_table()
            if pid != os.getpid()
            and _has_marker(pid, self.marker)
            and (record := read_process(pid)) is not None
        ]

    def descendants(self, pid: int) -> list[ProcessRecord]:
        """Track and return every running descendant of ``pid``."""
        table = _process_table()
        found, stack = [], [pid]
        while stack:
            parent = stack.pop()
            for child, (child_parent, _) in table.items():
                if child_parent == parent and (record := self.track(child)) is not None:
                    found.append(record)
                    stack.append(child)
        return found

    def wait_gone(self, timeout_s: float) -> list[ProcessRecord]:
        """Wait until every tracked process has exited; return those still running."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh()
            running = [record for record in self.records.values() if is_running(record)]
            if not running or time.monotonic() > deadline:
                return running
            time.sleep(0.3)
