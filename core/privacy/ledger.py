"""The tamper-evident egress ledger: append, verify, summarise (docs/privacy.md).

Owns the on-disk format of a site's (or the coordinator's) ``ledger.jsonl``: one JSON
object per line, each holding the SHA-256 of the previous line's entry, so an edited,
deleted, inserted or reordered entry breaks the chain. Also owns the audit summary
(per run and message type) and its text and HTML renderings. Pure stdlib: never
imports flwr, torch or numpy. Callers describe what left (:class:`Egress`) and the
policy decision; this module only records and checks.

Decisions: a site's entry for a reply is ``released`` (it passed the egress guard and
was handed to the SuperNode for delivery; the coordinator's ledger, not the site's,
shows whether it arrived), ``error`` (an error reply: only its reason left) or
``blocked: <rules>`` (refused; only the refusal's reason left). The coordinator's
entries are ``sent`` (a request), ``received`` or ``error`` (a reply) and
``undelivered`` (no reply came before the timeout). An entry may carry the ``anchor``
of the other side's entry it answers: the coordinator records, for each reply, the
index and hash of the site's own ledger entry for it, which the reply carries.

Limit, stated plainly: on its own, a chain can't show that entries were cut off at the
*end* of the file, nor that someone who can write the file rewrote it and recomputed
every hash. The anchors catch both: :mod:`core.privacy.ledger_match` checks a site's
ledger against the hashes its replies carried to the coordinator.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import html
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Final, TypeAlias

from core.coerce import FieldReader, is_number
from core.protocol import applied_policy_key

JsonObject: TypeAlias = dict[str, object]

GENESIS_HASH: Final = "0" * 64
EGRESS: Final = "egress"
INGRESS: Final = "ingress"
RELEASED: Final = "released"  # a site's reply that passed its guard, handed on
ERROR: Final = "error"  # an error reply (only its reason left)
SENT: Final = "sent"  # the coordinator's request
RECEIVED: Final = "received"  # a reply that reached the coordinator
UNDELIVERED: Final = "undelivered"  # no reply reached the coordinator in time
BLOCKED_PREFIX: Final = "blocked: "
DECISIONS: Final = (RELEASED, ERROR, SENT, RECEIVED, UNDELIVERED)
# Decisions whose entry's content reached (or was handed on toward) the other side.
_DELIVERED: Final = frozenset({RELEASED, SENT, RECEIVED})
_DIRECTIONS: Final = (EGRESS, INGRESS)


class LedgerError(ValueError):
    """A ledger file that can't be read or appended to; the message names the line."""


def write_canonical_json(value: object) -> str:
    """Serialise ``value`` as the canonical JSON that entry hashes are taken over.

    Example:
        >>> write_canonical_json({"b": 1, "a": [1, 2]})
        '{"a":[1,2],"b":1}'
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def compute_entry_hash(fields: Mapping[str, object]) -> str:
    """SHA-256 hex of the canonical JSON of every field except ``entry_hash``.

    Example:
        >>> compute_entry_hash({"index": 0, "entry_hash": "ignored"}) == (
        ...     compute_entry_hash({"index": 0})
        ... )
        True
    """
    content = {key: value for key, value in fields.items() if key != "entry_hash"}
    return hashlib.sha256(write_canonical_json(content).encode()).hexdigest()


def _fields(data: Mapping[str, object]) -> FieldReader:
    """Typed getters over a JSON object; errors say ``field '<key>'``."""
    return FieldReader(data, "field")


def _get_counts(data: Mapping[str, object], key: str) -> dict[str, int]:
    counts = _fields(_fields(data).get_dict(key))
    return {name: counts.get_int(name) for name in counts.data}


@dataclass(frozen=True, slots=True, kw_only=True)
class ArrayRelease:
    """One array that left: its record key, name, shape, dtype and size in bytes."""

    record: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    def to_json(self) -> JsonObject:
        """Plain JSON-ready mapping."""
        return {
            "record": self.record,
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ArrayRelease:
        """Inverse of :meth:`to_json`. Raises ValueError naming a bad field."""
        shape = _fields(data).get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(size, int) for size in shape
        ):
            raise ValueError("field 'shape' must be a list of integers")
        return cls(
            record=_fields(data).get_str("record"),
            name=_fields(data).get_str("name"),
            shape=tuple(shape),
            dtype=_fields(data).get_str("dtype"),
            nbytes=_fields(data).get_int("nbytes"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Egress:
    """What left in one reply, as the caller measured it.

    Attributes:
        arrays: every array released, in record order.
        metrics: metric name -> number of values released under it.
        configs: config key -> size in bytes of its value.
        total_bytes: size of the whole released content.
        digest: SHA-256 hex of the released content (computed by the caller).
    """

    arrays: tuple[ArrayRelease, ...]
    metrics: dict[str, int]
    configs: dict[str, int]
    total_bytes: int
    digest: str

    def to_json(self) -> JsonObject:
        """Plain JSON-ready mapping."""
        return {
            "arrays": [array.to_json() for array in self.arrays],
            "metrics": dict(self.metrics),
            "configs": dict(self.configs),
            "total_bytes": self.total_bytes,
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Egress:
        """Inverse of :meth:`to_json`. Raises ValueError naming a bad field."""
        arrays = _fields(data).get("arrays")
        if not isinstance(arrays, list) or not all(
            isinstance(array, dict) for array in arrays
        ):
            raise ValueError("field 'arrays' must be a list of objects")
        return cls(
            arrays=tuple(ArrayRelease.from_json(array) for array in arrays),
            metrics=_get_counts(data, "metrics"),
            configs=_get_counts(data, "configs"),
            total_bytes=_fields(data).get_int("total_bytes"),
            digest=_fields(data).get_str("digest"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One line of the ledger.

    Attributes:
        index: 0-based position in the ledger.
        time: ISO-8601 UTC time of the append.
        run_id: the Flower run the message belongs to.
        message_type: the action, as in ``core.protocol``.
        sender: the site or coordinator name that wrote the entry.
        direction: ``"egress"`` or ``"ingress"``.
        egress: what left (or arrived); None when nothing was released.
        decision: ``"released"`` or ``"blocked: <rule>"``.
        policy: the policy values applied to this reply.
        epsilon_spent: ε (at the policy's δ) spent by this entry's reply alone.
        epsilon_total: the site accountant's cumulative ε after this entry, or 0.0.
        previous_hash: ``entry_hash`` of the previous entry; 64 zeros for the first.
        entry_hash: SHA-256 of the canonical JSON of every other field.
        anchor: the other side's ledger entry this one answers (``{"index": int,
            "hash": str}``), or None; absent from entries written before anchors
            existed, which still verify.
    """

    index: int
    time: str
    run_id: str
    message_type: str
    sender: str
    direction: str
    egress: Egress | None
    decision: str
    policy: dict[str, object]
    epsilon_spent: float
    epsilon_total: float
    previous_hash: str
    entry_hash: str
    anchor: dict[str, object] | None = None

    @property
    def released(self) -> bool:
        """Whether the entry's content left (site) or travelled (coordinator).

        An error reply's reason, a refusal's reason and an undelivered reply are not
        counted as released content.
        """
        return self.decision in _DELIVERED

    @property
    def blocked(self) -> bool:
        """Whether the site's guard refused the reply."""
        return self.decision.startswith(BLOCKED_PREFIX)

    def to_json(self) -> JsonObject:
        """Plain JSON-ready mapping of every field, as written to the file.

        ``anchor`` is left out when None, as entries without one were written.
        """
        fields: JsonObject = {
            field.name: getattr(self, field.name) for field in dataclasses.fields(self)
        }
        fields["egress"] = None if self.egress is None else self.egress.to_json()
        if self.anchor is None:
            del fields["anchor"]
        return fields

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> LedgerEntry:
        """Parse one ledger line's object. Raises ValueError naming a bad field."""
        unknown = sorted(set(data) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unexpected field(s) {', '.join(map(repr, unknown))}")
        entry = cls(
            index=_fields(data).get_int("index"),
            time=_fields(data).get_str("time"),
            run_id=_fields(data).get_str("run_id"),
            message_type=_fields(data).get_str("message_type"),
            sender=_fields(data).get_str("sender"),
            direction=_fields(data).get_str("direction"),
            egress=(
                None
                if _fields(data).get("egress") is None
                else Egress.from_json(_fields(data).get_dict("egress"))
            ),
            decision=_fields(data).get_str("decision"),
            policy=_fields(data).get_dict("policy"),
            epsilon_spent=_fields(data).get_float("epsilon_spent"),
            epsilon_total=_fields(data).get_float("epsilon_total"),
            previous_hash=_fields(data).get_str("previous_hash"),
            entry_hash=_fields(data).get_str("entry_hash"),
            anchor=_get_anchor(data),
        )
        _check_values(entry.direction, entry.decision)
        return entry


def _get_anchor(data: Mapping[str, object]) -> dict[str, object] | None:
    if data.get("anchor") is None:
        return None
    anchor = _fields(data).get_dict("anchor")
    return {
        "index": _fields(anchor).get_int("index"),
        "hash": _fields(anchor).get_str("hash"),
    }


def _check_values(direction: str, decision: str) -> None:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'egress' or 'ingress', got {direction!r}")
    if decision not in DECISIONS and not decision.startswith(BLOCKED_PREFIX):
        raise ValueError(
            f"decision must be one of {', '.join(map(repr, DECISIONS))} or "
            f"'blocked: <rule>', got {decision!r}"
        )


class Ledger:
    """An append-only, hash-chained JSON-lines file.

    Appends hold an exclusive ``flock`` on the file, so processes sharing a ledger
    never interleave lines or fork the chain. Each append is flushed and fsynced
    before :meth:`append` returns; an append that fails part-way is cut back, so the
    file always ends with a complete entry.
    """

    def __init__(self, path: Path) -> None:
        """Use the ledger at ``path`` (created with its folders on first append)."""
        self.path = Path(path)

    def append(
        self,
        *,
        run_id: str,
        message_type: str,
        sender: str,
        direction: str,
        egress: Egress | None,
        decision: str,
        policy: Mapping[str, object],
        epsilon_spent: float,
        epsilon_total: float,
        time: str | None = None,
        anchor: Mapping[str, object] | None = None,
    ) -> LedgerEntry:
        """Append one entry chained to the last one and return it.

        Args:
            run_id: the Flower run.
            message_type: the action.
            sender: the site or coordinator writing the entry.
            direction: ``"egress"`` or ``"ingress"``.
            egress: what left; None when nothing did.
            decision: ``"released"`` or ``"blocked: <rule>"``.
            policy: the policy values applied (JSON-serialisable).
            epsilon_spent: ε of this reply alone (0.0 without DP).
            epsilon_total: the site's cumulative ε after this reply, or 0.0.
            time: ISO-8601 UTC time; now when None.
            anchor: the other side's entry this one answers (``index``, ``hash``).

        Returns:
            The entry as written.

        Raises:
            ValueError: on an unknown direction or decision, a non-finite ε, or a
                policy value JSON can't hold.
            LedgerError: when the ledger's last line is incomplete or malformed.
        """
        _check_values(direction, decision)
        if not (math.isfinite(epsilon_spent) and math.isfinite(epsilon_total)):
            raise ValueError(
                f"epsilon must be finite, got spent={epsilon_spent} "
                f"total={epsilon_total}"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered, so a failed write leaves nothing behind to be flushed later.
        with self.path.open("a+b", buffering=0) as file:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            try:
                index, previous_hash = _read_chain_tail(file, self.path)
                fields: JsonObject = {
                    "index": index,
                    "time": time or datetime.now(UTC).isoformat(),
                    "run_id": run_id,
                    "message_type": message_type,
                    "sender": sender,
                    "direction": direction,
                    "egress": None if egress is None else egress.to_json(),
                    "decision": decision,
                    "policy": dict(policy),
                    "epsilon_spent": float(epsilon_spent),
                    "epsilon_total": float(epsilon_total),
                    "previous_hash": previous_hash,
                }
                if anchor is not None:
                    fields["anchor"] = {
                        "index": int(anchor["index"]),  # type: ignore[call-overload]
                        "hash": str(anchor["hash"]),
                    }
                try:
                    fields["entry_hash"] = compute_entry_hash(fields)
                except TypeError as error:
                    raise ValueError(
                        f"policy is not JSON-serialisable: {error}"
                    ) from error
                line = write_canonical_json(fields)
                end = file.seek(0, os.SEEK_END)
                data = line.encode() + b"\n"
                try:
                    written = 0
                    while written < len(data):
                        written += file.write(data[written:])
                    os.fsync(file.fileno())
                except BaseException:
                    # A torn append (disk full, interrupt) would leave half a line
                    # and stop every later append: cut the file back to its last
                    # complete entry instead.
                    file.truncate(end)
                    raise
            finally:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        return LedgerEntry.from_json(_parse_line(line.encode()))

    def entries(self) -> list[LedgerEntry]:
        """Every entry in file order; [] when the file doesn't exist yet.

        Does not check the chain (use :func:`verify_ledger`).

        Raises:
            LedgerError: naming the first line that is not a well-formed entry.
        """
        if not self.path.exists():
            return []
        entries = []
        for number, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                entries.append(LedgerEntry.from_json(_parse_line(line)))
            except ValueError as error:
                raise LedgerError(f"{self.path} line {number}: {error}") from error
        return entries


def _parse_line(line: bytes) -> JsonObject:
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _read_chain_tail(file: BinaryIO, path: Path) -> tuple[int, str]:
    """Next index and previous hash, from the last line only (the file is locked)."""
    size = file.seek(0, os.SEEK_END)
    if size == 0:
        return 0, GENESIS_HASH
    chunk = 4096
    tail = b""
    position = size
    while position > 0 and tail.count(b"\n") < 2:
        position = max(0, position - chunk)
        file.seek(position)
        tail = file.read(size - position)
    if not tail.endswith(b"\n"):
        raise LedgerError(f"{path}: the last line is incomplete; run 'audit verify'")
    last = tail[:-1].rsplit(b"\n", 1)[-1]
    try:
        entry = LedgerEntry.from_json(_parse_line(last))
    except ValueError as error:
        raise LedgerError(f"{path}: the last line is malformed: {error}") from error
    return entry.index + 1, entry.entry_hash


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyResult:
    """Outcome of :func:`verify_ledger`.

    Attributes:
        ok: whether every line is a well-formed entry and the chain is intact.
        entries: intact entries before the first bad one (all of them when ok).
        first_bad: 0-based position (line number - 1) of the first bad entry.
        problem: "" when ok, else "entry at line L (index I): what is wrong".
    """

    ok: bool
    entries: int
    first_bad: int | None
    problem: str


def verify_ledger(path: Path) -> VerifyResult:
    """Check every line of the ledger at ``path`` and the hash chain between them.

    Detects a malformed or truncated line, an edited entry (its hash no longer matches
    its content), and a deleted, inserted or reordered entry (index gap or a
    ``previous_hash`` that doesn't match the entry before). A missing file is not ok;
    an empty file is an intact ledger of 0 entries.
    """
    if not path.is_file():
        return VerifyResult(
            ok=False, entries=0, first_bad=None, problem=f"no ledger at {path}"
        )
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = data.endswith(b"\n") or not data
    if complete:
        lines.pop()
    previous_hash = GENESIS_HASH
    for position, line in enumerate(lines):
        checked = _check_line(
            line,
            position,
            previous_hash,
            last_incomplete=not complete and position == len(lines) - 1,
        )
        if isinstance(checked, str):
            return VerifyResult(
                ok=False,
                entries=position,
                first_bad=position,
                problem=f"entry at line {position + 1} (index {position}): {checked}",
            )
        previous_hash = checked.entry_hash
    return VerifyResult(ok=True, entries=len(lines), first_bad=None, problem="")


def _check_line(
    line: bytes, position: int, previous_hash: str, *, last_incomplete: bool
) -> LedgerEntry | str:
    """The entry on this line, or what is wrong with it."""
    try:
        data = _parse_line(line)
    except ValueError as error:
        if last_incomplete:
            return f"truncated: the last line is incomplete ({error})"
        return f"malformed: {error}"
    try:
        entry = LedgerEntry.from_json(data)
        content_hash = compute_entry_hash(data)
    except ValueError as error:
        return f"malformed: {error}"
    if content_hash != entry.entry_hash:
        return "edited: entry_hash does not match the entry's content"
    if entry.index != position:
        return (
            f"out of sequence: recorded index {entry.index}, expected {position} "
            "(an entry was deleted, inserted or reordered)"
        )
    if entry.previous_hash != previous_hash:
        return (
            "broken chain: previous_hash does not match the entry before it "
            "(an entry was deleted, inserted or reordered)"
        )
    if last_incomplete:
        return "truncated: the last line has no line ending"
    return entry


ALL: Final = "(all)"


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressTotals:
    """Counts over a group of entries; released content only in the byte counts.

    Attributes:
        replies: entries in the group.
        released: entries whose content left or travelled (``released``, ``sent``,
            ``received``).
        blocked: entries whose decision was ``blocked: <rule>``.
        errors: error replies (``error``).
        undelivered: replies that never reached the coordinator (``undelivered``).
        bytes_released: sum of ``total_bytes`` over released entries.
        arrays_released: arrays in released entries.
        metric_values_released: metric values (not names) in released entries.
    """

    replies: int
    released: int
    blocked: int
    errors: int
    undelivered: int
    bytes_released: int
    arrays_released: int
    metric_values_released: int

    @classmethod
    def of(cls, entries: Sequence[LedgerEntry]) -> EgressTotals:
        """Totals of ``entries``.

        Example:
            >>> EgressTotals.of([]).replies
            0
        """
        released = [entry.egress for entry in entries if entry.released]
        content = [egress for egress in released if egress is not None]
        return cls(
            replies=len(entries),
            released=len(released),
            blocked=sum(entry.blocked for entry in entries),
            errors=sum(entry.decision == ERROR for entry in entries),
            undelivered=sum(entry.decision == UNDELIVERED for entry in entries),
            bytes_released=sum(egress.total_bytes for egress in content),
            arrays_released=sum(len(egress.arrays) for egress in content),
            metric_values_released=sum(
                sum(egress.metrics.values()) for egress in content
            ),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SummaryRow:
    """Totals of one group; a field that is ``(all)`` was summed over."""

    run_id: str
    message_type: str
    direction: str
    totals: EgressTotals


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerSummary:
    """What a ledger says left, per run and per message type, and the ε used.

    Attributes:
        rows: one per (run, message type, direction), in first-seen order.
        run_totals: one per run (``message_type`` and ``direction`` are ``(all)``).
        type_totals: one per message type over all runs (``run_id`` is ``(all)``).
        total: every entry.
        senders: distinct senders, in first-seen order.
        epsilon_cumulative: the largest ``epsilon_total`` recorded (the accountant's
            cumulative ε of the site at the policy's δ; 0.0 when none was recorded).
        epsilon_spent_sum: sum of per-entry ``epsilon_spent`` (an upper bound by basic
            composition; looser than the accountant's figure).
        epsilon_budget: the site's total budget, or None when not given.
        epsilon_remaining: budget minus ε used, or None without a budget.
    """

    rows: tuple[SummaryRow, ...]
    run_totals: tuple[SummaryRow, ...]
    type_totals: tuple[SummaryRow, ...]
    total: EgressTotals
    senders: tuple[str, ...]
    epsilon_cumulative: float
    epsilon_spent_sum: float
    epsilon_budget: float | None
    epsilon_remaining: float | None

    @property
    def epsilon_used(self) -> float:
        """The accountant's cumulative ε when recorded, else the sum of per-entry ε."""
        return self.epsilon_cumulative or self.epsilon_spent_sum


def _group(
    entries: Sequence[LedgerEntry],
    key: Callable[[LedgerEntry], tuple[str, str, str]],
) -> tuple[SummaryRow, ...]:
    """Totals per distinct (run, message type, direction) ``key``, first-seen order."""
    groups: dict[tuple[str, str, str], list[LedgerEntry]] = {}
    for entry in entries:
        groups.setdefault(key(entry), []).append(entry)
    return tuple(
        SummaryRow(
            run_id=run_id,
            message_type=message_type,
            direction=direction,
            totals=EgressTotals.of(members),
        )
        for (run_id, message_type, direction), members in groups.items()
    )


# Where a site's entries record the budget
# (core.privacy.policy.AppliedPolicy.to_fields()).
_BUDGET_KEY: Final = applied_policy_key("dp.budget-epsilon")


def _recorded_budget(entries: Sequence[LedgerEntry]) -> float | None:
    """The ε budget the latest entry's applied policy states, if any.

    Example:
        >>> _recorded_budget([]) is None
        True
    """
    for entry in reversed(entries):
        value = entry.policy.get(_BUDGET_KEY)
        if is_number(value):
            return float(value)
    return None


def summarise_ledger(
    entries: Sequence[LedgerEntry], *, epsilon_budget: float | None = None
) -> LedgerSummary:
    """Group ``entries`` per run and message type and compare ε with the budget.

    Args:
        entries: a verified ledger's entries (see :func:`verify_ledger`).
        epsilon_budget: the site's total ε budget at the policy's δ; None takes the
            budget the latest entry's applied policy recorded, if any.

    Returns:
        The summary; ``epsilon_remaining`` is negative when the budget was exceeded.

    Example:
        >>> summary = summarise_ledger([], epsilon_budget=8.0)
        >>> summary.total.replies, summary.epsilon_remaining
        (0, 8.0)
    """
    cumulative = max((entry.epsilon_total for entry in entries), default=0.0)
    spent = sum(entry.epsilon_spent for entry in entries)
    used = cumulative or spent
    if epsilon_budget is None:
        epsilon_budget = _recorded_budget(entries)
    return LedgerSummary(
        rows=_group(entries, lambda e: (e.run_id, e.message_type, e.direction)),
        run_totals=_group(entries, lambda e: (e.run_id, ALL, ALL)),
        type_totals=_group(entries, lambda e: (ALL, e.message_type, ALL)),
        total=EgressTotals.of(entries),
        senders=tuple(dict.fromkeys(entry.sender for entry in entries)),
        epsilon_cumulative=cumulative,
        epsilon_spent_sum=spent,
        epsilon_budget=epsilon_budget,
        epsilon_remaining=None if epsilon_budget is None else epsilon_budget - used,
    )


_HEADER: Final = (
    "run",
    "message type",
    "direction",
    "replies",
    "released",
    "blocked",
    "errors",
    "undelivered",
    "bytes released",
    "arrays",
    "metric values",
)


def _table(summary: LedgerSummary) -> list[tuple[str, ...]]:
    grand = SummaryRow(
        run_id=ALL, message_type=ALL, direction=ALL, totals=summary.total
    )
    rows = [*summary.rows, *summary.run_totals, *summary.type_totals, grand]
    return [
        (
            row.run_id,
            row.message_type,
            row.direction,
            str(row.totals.replies),
            str(row.totals.released),
            str(row.totals.blocked),
            str(row.totals.errors),
            str(row.totals.undelivered),
            str(row.totals.bytes_released),
            str(row.totals.arrays_released),
            str(row.totals.metric_values_released),
        )
        for row in rows
    ]


def _epsilon_lines(summary: LedgerSummary) -> list[str]:
    lines = [
        f"epsilon used: {summary.epsilon_used:.4g} "
        f"(cumulative {summary.epsilon_cumulative:.4g}, "
        f"sum of per-entry {summary.epsilon_spent_sum:.4g})"
    ]
    if summary.epsilon_budget is None or summary.epsilon_remaining is None:
        lines.append("epsilon budget: not given")
    else:
        lines.append(
            f"epsilon budget: {summary.epsilon_budget:.4g}, "
            f"remaining: {summary.epsilon_remaining:.4g}"
            + (" (EXCEEDED)" if summary.epsilon_remaining < 0 else "")
        )
    return lines


def format_summary_text(summary: LedgerSummary) -> str:
    """Render ``summary`` as a plain-text table followed by the ε lines."""
    table = [_HEADER, *_table(summary)]
    widths = [max(len(row[column]) for row in table) for column in range(len(_HEADER))]
    lines = [
        f"ledger summary: {summary.total.replies} entries; "
        f"senders: {', '.join(summary.senders) or '-'}",
        "",
    ]
    for row in table:
        lines.append(
            "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )
    return "\n".join([*lines, "", *_epsilon_lines(summary)]) + "\n"


def format_summary_html(summary: LedgerSummary) -> str:
    """Render ``summary`` as a self-contained HTML page (every value escaped)."""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in _HEADER)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in _table(summary)
    )
    senders = html.escape(", ".join(summary.senders) or "-")
    epsilon = "\n".join(
        f"<p>{html.escape(line)}</p>" for line in _epsilon_lines(summary)
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SiteBridge ledger report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #999; padding: 0.3em 0.6em; text-align: left; }}
</style>
</head>
<body>
<h1>SiteBridge ledger report</h1>
<p>{summary.total.replies} entries; senders: {senders}</p>
<table>
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
{epsilon}
</body>
</html>
"""
