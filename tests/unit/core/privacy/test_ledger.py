from __future__ import annotations

import itertools
import json
import multiprocessing
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from core.privacy.ledger import (
    GENESIS_HASH,
    ArrayRelease,
    Egress,
    Ledger,
    LedgerEntry,
    LedgerError,
    compute_entry_hash,
    format_summary_html,
    format_summary_text,
    summarise_ledger,
    verify_ledger,
    write_canonical_json,
)

WEIGHTS = Egress(
    arrays=(
        ArrayRelease(
            record="weights",
            name="conv.weight",
            shape=(4, 1, 3, 3),
            dtype="float32",
            nbytes=144,
        ),
        ArrayRelease(
            record="weights", name="conv.bias", shape=(4,), dtype="float32", nbytes=16
        ),
    ),
    metrics={"loss": 1, "num-examples": 1},
    configs={"model": 8},
    total_bytes=200,
    digest="ab" * 32,
)
IMAGE = Egress(
    arrays=(
        ArrayRelease(
            record="prediction",
            name="map",
            shape=(1, 32, 32),
            dtype="float32",
            nbytes=4096,
        ),
    ),
    metrics={},
    configs={},
    total_bytes=4096,
    digest="cd" * 32,
)
METRICS = Egress(
    arrays=(),
    metrics={"dice": 3},
    configs={},
    total_bytes=24,
    digest="ef" * 32,
)

# (run, message type, egress, decision, epsilon spent, epsilon total)
ENTRIES: tuple[tuple[str, str, Egress, str, float, float], ...] = (
    ("run-1", "train.source", WEIGHTS, "released", 1.0, 1.0),
    ("run-1", "query.lftm", IMAGE, "blocked: image-shaped array", 0.0, 1.0),
    ("run-1", "train.source", WEIGHTS, "released", 0.5, 1.4),
    ("run-2", "evaluate", METRICS, "released", 0.0, 1.4),
)


def write_ledger(path: Path, *, sender: str = "A") -> list[LedgerEntry]:
    ledger = Ledger(path)
    return [
        ledger.append(
            run_id=run_id,
            message_type=message_type,
            sender=sender,
            direction="egress",
            egress=egress,
            decision=decision,
            policy={"max-reply-bytes": 1_000_000, "lftm-release": "domain"},
            epsilon_spent=spent,
            epsilon_total=total,
            time=f"2025-01-01T00:00:0{index}+00:00",
        )
        for index, (run_id, message_type, egress, decision, spent, total) in enumerate(
            ENTRIES
        )
    ]


def rehash(line: str, **changes: object) -> str:
    """The line with ``changes`` applied and its own hash recomputed (a forgery)."""
    fields = json.loads(line)
    fields.update(changes)
    fields["entry_hash"] = compute_entry_hash(fields)
    return write_canonical_json(fields)


def edit(line: str, **changes: object) -> str:
    """The line with ``changes`` applied, valid JSON, hash left as it was."""
    fields = json.loads(line)
    fields.update(changes)
    return write_canonical_json(fields)


def edit_bytes(line: str) -> str:
    fields = json.loads(line)
    fields["egress"]["total_bytes"] = 1
    return write_canonical_json(fields)


def test_a_failed_append_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the disk fills up after the line's bytes were written, before fsync
    path = tmp_path / "ledger.jsonl"
    write_ledger(path)
    before = path.read_bytes()

    def disk_full(_descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    # Execute
    with monkeypatch.context() as patched:
        patched.setattr("core.privacy.ledger.os.fsync", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            write_ledger(path)

    # Assert: the file is as before, and the next append chains on
    assert path.read_bytes() == before
    write_ledger(path)
    assert verify_ledger(path).entries == 2 * len(ENTRIES)


def test_append_chains_entries_and_verifies(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "state" / "ledger.jsonl"

    # Execute
    written = write_ledger(path)
    result = verify_ledger(path)

    # Assert
    assert result.ok
    assert (result.entries, result.first_bad, result.problem) == (4, None, "")
    assert Ledger(path).entries() == written
    assert [entry.index for entry in written] == [0, 1, 2, 3]
    assert written[0].previous_hash == GENESIS_HASH
    for previous, entry in itertools.pairwise(written):
        assert entry.previous_hash == previous.entry_hash
    assert len(path.read_text().splitlines()) == 4


def test_entry_hash_covers_every_other_field(tmp_path: Path) -> None:
    # Prepare
    entry = write_ledger(tmp_path / "ledger.jsonl")[1]

    # Execute
    actual = compute_entry_hash(entry.to_json())

    # Assert
    assert actual == entry.entry_hash
    assert entry.egress == IMAGE
    assert not entry.released


def test_egress_round_trips_through_json() -> None:
    # Execute
    actual = Egress.from_json(json.loads(json.dumps(WEIGHTS.to_json())))

    # Assert
    assert actual == WEIGHTS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"total_bytes": None}, "field 'total_bytes' must be an integer, got None"),
        ({"digest": 5}, "field 'digest' must be a string, got 5"),
        ({"metrics": {"loss": "1"}}, "field 'loss' must be an integer, got '1'"),
        ({"arrays": [1]}, "field 'arrays' must be a list of objects"),
    ],
)
def test_egress_from_json_names_the_bad_field(
    change: dict[str, object], message: str
) -> None:
    # Prepare
    data = {**WEIGHTS.to_json(), **change}

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(message)):
        Egress.from_json(data)


def test_egress_from_json_names_a_missing_field() -> None:
    # Prepare
    data = WEIGHTS.to_json()
    del data["digest"]

    # Execute / Assert
    with pytest.raises(ValueError, match="field 'digest' is missing"):
        Egress.from_json(data)


@pytest.mark.parametrize(
    ("tamper", "first_bad", "problem"),
    [
        pytest.param(
            lambda lines: [lines[0], edit_bytes(lines[1]), *lines[2:]],
            1,
            "edited: entry_hash does not match",
            id="edit-total-bytes",
        ),
        pytest.param(
            lambda lines: [lines[0], edit(lines[1], decision="released"), *lines[2:]],
            1,
            "edited: entry_hash does not match",
            id="edit-decision",
        ),
        pytest.param(
            lambda lines: [lines[0], rehash(lines[1], sender="B"), *lines[2:]],
            2,
            "broken chain: previous_hash does not match",
            id="edit-and-rehash",
        ),
        pytest.param(
            lambda lines: [lines[0], *lines[2:]],
            1,
            "out of sequence: recorded index 2, expected 1",
            id="delete-middle",
        ),
        pytest.param(
            lambda lines: lines[1:],
            0,
            "out of sequence: recorded index 1, expected 0",
            id="delete-first",
        ),
        pytest.param(
            lambda lines: [lines[0], lines[2], lines[1], lines[3]],
            1,
            "out of sequence: recorded index 2, expected 1",
            id="swap",
        ),
        pytest.param(
            lambda lines: [
                lines[0],
                rehash(lines[1], previous_hash="f" * 64, decision="released"),
                *lines[1:],
            ],
            1,
            "broken chain: previous_hash does not match",
            id="insert-forged-wrong-previous",
        ),
        pytest.param(
            lambda lines: [lines[0], rehash(lines[1], sender="forger"), *lines[1:]],
            2,
            "out of sequence: recorded index 1, expected 2",
            id="insert-forged-right-previous",
        ),
        pytest.param(
            lambda lines: [lines[0], "not json", *lines[2:]],
            1,
            "malformed: Expecting value",
            id="not-json",
        ),
        pytest.param(
            lambda lines: [lines[0], "[1, 2]", *lines[2:]],
            1,
            "malformed: not a JSON object",
            id="not-an-object",
        ),
        pytest.param(
            lambda lines: [lines[0], rehash(lines[1], sender=None), *lines[2:]],
            1,
            "malformed: field 'sender' must be a string",
            id="wrong-type",
        ),
        pytest.param(
            lambda lines: [lines[0], rehash(lines[1], extra=1), *lines[2:]],
            1,
            "malformed: unexpected field(s) 'extra'",
            id="unknown-field",
        ),
        pytest.param(
            lambda lines: [lines[0], rehash(lines[1], decision="maybe"), *lines[2:]],
            1,
            "malformed: decision must be one of 'released', 'error', 'sent', "
            "'received', 'undelivered' or 'blocked: <rule>', got 'maybe'",
            id="bad-decision",
        ),
    ],
)
def test_verify_names_the_first_tampered_entry(
    tmp_path: Path,
    tamper: Callable[[list[str]], list[str]],
    first_bad: int,
    problem: str,
) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_ledger(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(tamper(lines)) + "\n")

    # Execute
    result = verify_ledger(path)

    # Assert
    assert not result.ok
    assert result.first_bad == first_bad
    assert result.entries == first_bad
    assert result.problem.startswith(
        f"entry at line {first_bad + 1} (index {first_bad}): {problem}"
    )


def test_forged_line_with_a_missing_field_is_named(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_ledger(path)
    lines = path.read_text().splitlines()
    fields = json.loads(lines[1])
    del fields["sender"]
    fields["entry_hash"] = compute_entry_hash(fields)
    lines[1] = write_canonical_json(fields)
    path.write_text("\n".join(lines) + "\n")

    # Execute
    result = verify_ledger(path)

    # Assert
    assert result.problem == (
        "entry at line 2 (index 1): malformed: field 'sender' is missing"
    )


@pytest.mark.parametrize(
    ("cut", "problem"),
    [
        pytest.param(-40, "truncated: the last line is incomplete", id="mid-line"),
        pytest.param(-1, "truncated: the last line has no line ending", id="newline"),
    ],
)
def test_verify_detects_a_truncated_last_line(
    tmp_path: Path, cut: int, problem: str
) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_ledger(path)
    path.write_bytes(path.read_bytes()[:cut])

    # Execute
    result = verify_ledger(path)

    # Assert
    assert not result.ok
    assert result.first_bad == 3
    assert result.problem.startswith(f"entry at line 4 (index 3): {problem}")


def test_verify_missing_and_empty_ledgers(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "empty.jsonl").write_bytes(b"")

    # Execute
    missing = verify_ledger(tmp_path / "missing.jsonl")
    empty = verify_ledger(tmp_path / "empty.jsonl")

    # Assert
    assert not missing.ok
    assert missing.problem == f"no ledger at {tmp_path / 'missing.jsonl'}"
    assert empty.ok
    assert empty.entries == 0


def test_append_refuses_to_extend_a_truncated_ledger(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_ledger(path)
    path.write_bytes(path.read_bytes()[:-10])

    # Execute / Assert
    with pytest.raises(LedgerError, match="the last line is incomplete"):
        write_ledger(path)


def test_entries_names_a_malformed_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_ledger(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{}", *lines[2:]]) + "\n")

    # Execute / Assert
    with pytest.raises(LedgerError, match="line 2: field 'index' is missing"):
        Ledger(path).entries()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"direction": "sideways"}, "direction must be 'egress' or 'ingress'"),
        ({"decision": "ok"}, "decision must be one of 'released', 'error', 'sent',"),
        ({"epsilon_spent": float("nan")}, "epsilon must be finite"),
        ({"epsilon_total": float("inf")}, "epsilon must be finite"),
        ({"policy": {"key": object()}}, "policy is not JSON-serialisable"),
    ],
)
def test_append_rejects_bad_values(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    # Prepare
    arguments: dict[str, object] = {
        "run_id": "run-1",
        "message_type": "evaluate",
        "sender": "A",
        "direction": "egress",
        "egress": None,
        "decision": "released",
        "policy": {},
        "epsilon_spent": 0.0,
        "epsilon_total": 0.0,
        **change,
    }

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(message)):
        Ledger(tmp_path / "ledger.jsonl").append(**arguments)  # type: ignore[arg-type]


def append_many(path: Path, sender: str) -> None:
    for _ in range(15):
        Ledger(path).append(
            run_id="run-1",
            message_type="evaluate",
            sender=sender,
            direction="egress",
            egress=METRICS,
            decision="released",
            policy={},
            epsilon_spent=0.0,
            epsilon_total=0.0,
        )


def test_two_processes_appending_keep_one_chain(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=append_many, args=(path, name)) for name in ("A", "B")
    ]

    # Execute
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    # Assert
    assert [worker.exitcode for worker in workers] == [0, 0]
    result = verify_ledger(path)
    assert result.ok, result.problem
    assert result.entries == 30


def test_summary_counts_per_run_and_message_type(tmp_path: Path) -> None:
    # Prepare
    entries = write_ledger(tmp_path / "ledger.jsonl")

    # Execute
    summary = summarise_ledger(entries)

    # Assert
    actual = {
        (row.run_id, row.message_type): (
            row.totals.replies,
            row.totals.released,
            row.totals.blocked,
            row.totals.bytes_released,
            row.totals.arrays_released,
            row.totals.metric_values_released,
        )
        for row in (*summary.rows, *summary.run_totals, *summary.type_totals)
    }
    assert actual == {
        ("run-1", "train.source"): (2, 2, 0, 400, 4, 4),
        ("run-1", "query.lftm"): (1, 0, 1, 0, 0, 0),
        ("run-2", "evaluate"): (1, 1, 0, 24, 0, 3),
        ("run-1", "(all)"): (3, 2, 1, 400, 4, 4),
        ("run-2", "(all)"): (1, 1, 0, 24, 0, 3),
        ("(all)", "train.source"): (2, 2, 0, 400, 4, 4),
        ("(all)", "query.lftm"): (1, 0, 1, 0, 0, 0),
        ("(all)", "evaluate"): (1, 1, 0, 24, 0, 3),
    }
    assert summary.total.replies == 4
    assert summary.total.blocked == 1
    assert summary.total.bytes_released == 424
    assert summary.senders == ("A",)


@pytest.mark.parametrize(
    ("budget", "remaining", "text"),
    [
        (None, None, "epsilon budget: not given"),
        (8.0, 6.6, "epsilon budget: 8, remaining: 6.6\n"),
        (1.0, -0.4, "epsilon budget: 1, remaining: -0.4 (EXCEEDED)"),
    ],
)
def test_summary_compares_epsilon_with_the_budget(
    tmp_path: Path, budget: float | None, remaining: float | None, text: str
) -> None:
    # Prepare
    entries = write_ledger(tmp_path / "ledger.jsonl")

    # Execute
    summary = summarise_ledger(entries, epsilon_budget=budget)

    # Assert
    assert summary.epsilon_cumulative == pytest.approx(1.4)
    assert summary.epsilon_spent_sum == pytest.approx(1.5)
    assert summary.epsilon_used == pytest.approx(1.4)
    assert summary.epsilon_remaining == pytest.approx(remaining)
    assert "epsilon used: 1.4 (cumulative 1.4, sum of per-entry 1.5)" in (
        format_summary_text(summary)
    )
    assert text in format_summary_text(summary)


def test_summary_text_is_a_table(tmp_path: Path) -> None:
    # Prepare
    summary = summarise_ledger(write_ledger(tmp_path / "ledger.jsonl"))

    # Execute
    text = format_summary_text(summary)

    # Assert
    lines = text.splitlines()
    assert lines[0] == "ledger summary: 4 entries; senders: A"
    assert re.split(r"\s{2,}", lines[2]) == [
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
    ]
    assert any(
        line.split()
        == ["run-1", "query.lftm", "egress", "1", "0", "1", "0", "0", "0", "0", "0"]
        for line in lines
    )
    assert any(
        line.split()
        == ["(all)", "(all)", "(all)", "4", "3", "1", "0", "0", "424", "4", "7"]
        for line in lines
    )


def test_summary_html_is_a_page_and_escapes_names(tmp_path: Path) -> None:
    # Prepare
    hostile = "<script>alert('x')</script>"
    summary = summarise_ledger(write_ledger(tmp_path / "ledger.jsonl", sender=hostile))

    # Execute
    page = format_summary_html(summary)

    # Assert
    assert page.startswith("<!DOCTYPE html>")
    assert "<table>" in page
    assert "<th>message type</th>" in page
    assert "<td>query.lftm</td>" in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
