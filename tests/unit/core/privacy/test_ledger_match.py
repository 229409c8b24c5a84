"""A site's ledger against the coordinator's anchors: rewritten, truncated ledgers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cli import main
from core.privacy.ledger import (
    EGRESS,
    ERROR,
    INGRESS,
    RECEIVED,
    RELEASED,
    SENT,
    Egress,
    Ledger,
    compute_entry_hash,
    write_canonical_json,
)
from core.privacy.ledger_match import coordinator_sites, match_ledgers


def egress(digest: str, size: int = 10) -> Egress:
    return Egress(
        arrays=(), metrics={"metrics/x": 1}, configs={}, total_bytes=size, digest=digest
    )


def write_pair(tmp_path: Path, replies: int = 3) -> tuple[Path, Path]:
    """A site ledger with ``replies`` released replies and the coordinator's record."""
    site = Ledger(tmp_path / "site.jsonl")
    coordinator = Ledger(tmp_path / "coordinator.jsonl")
    for number in range(replies):
        digest = f"{number:064x}"
        coordinator.append(
            run_id="7",
            message_type="evaluate",
            sender="coordinator",
            direction=EGRESS,
            egress=egress("f" * 64),
            decision=SENT,
            policy={},
            epsilon_spent=0.0,
            epsilon_total=0.0,
        )
        entry = site.append(
            run_id="7",
            message_type="evaluate",
            sender="hospital-a",
            direction=EGRESS,
            egress=egress(digest),
            decision=RELEASED,
            policy={"policy.dp.required": False},
            epsilon_spent=0.0,
            epsilon_total=0.0,
        )
        coordinator.append(
            run_id="7",
            message_type="evaluate",
            sender="A",
            direction=INGRESS,
            egress=egress(digest),
            decision=RECEIVED,
            policy={},
            epsilon_spent=0.0,
            epsilon_total=0.0,
            anchor={"index": entry.index, "hash": entry.entry_hash},
        )
    return site.path, coordinator.path


def rewrite_with_recomputed_chain(path: Path, index: int, **changes: object) -> None:
    """Edit entry ``index`` and recompute every hash after it: the chain verifies."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[index].update(changes)
    previous = lines[index - 1]["entry_hash"] if index else "0" * 64
    for line in lines[index:]:
        line["previous_hash"] = previous
        line["entry_hash"] = compute_entry_hash(line)
        previous = line["entry_hash"]
    path.write_text("".join(write_canonical_json(line) + "\n" for line in lines))


def test_an_untouched_site_ledger_matches(tmp_path: Path) -> None:
    # Prepare
    site, coordinator = write_pair(tmp_path)

    # Execute
    match = match_ledgers(
        Ledger(site).entries(), Ledger(coordinator).entries(), site="A"
    )

    # Assert
    assert match.ok, match.problems
    assert (match.anchors, match.not_received) == (3, ())
    assert coordinator_sites(Ledger(coordinator).entries()) == ["A"]


def test_a_rewritten_site_ledger_is_caught_even_with_a_recomputed_chain(
    tmp_path: Path,
) -> None:
    # Prepare: the site's record of reply 1 now says "blocked", chain recomputed
    site, coordinator = write_pair(tmp_path)
    rewrite_with_recomputed_chain(site, 1, decision="blocked: oversized-reply")

    # Execute
    exit_code = main(["audit", "verify", str(site)])
    match = match_ledgers(
        Ledger(site).entries(), Ledger(coordinator).entries(), site="A"
    )

    # Assert: the chain alone can't tell; the anchors can
    assert exit_code == 0
    assert not match.ok
    assert [problem.split(":")[0] for problem in match.problems] == [
        "rewritten",
        "rewritten",
    ]
    assert "site ledger entry 1 has hash" in match.problems[0]
    assert "the evaluate reply of run 7 carried" in match.problems[0]


def test_a_truncated_site_ledger_is_caught(tmp_path: Path) -> None:
    # Prepare: the last entry is cut off (its chain still verifies)
    site, coordinator = write_pair(tmp_path)
    lines = site.read_text().splitlines(keepends=True)
    site.write_text("".join(lines[:-1]))

    # Execute
    match = match_ledgers(
        Ledger(site).entries(), Ledger(coordinator).entries(), site="A"
    )

    # Assert
    assert match.problems == (
        "truncated: the coordinator received a evaluate reply of run 7 anchored at "
        "site ledger entry 2, and the site ledger has only 2 entries",
    )


def test_a_digest_that_differs_from_what_arrived_is_caught(tmp_path: Path) -> None:
    # Prepare: the coordinator's record says another content arrived
    site, coordinator = write_pair(tmp_path, replies=1)
    rewrite_with_recomputed_chain(coordinator, 1, egress=egress("e" * 64).to_json())

    # Execute
    match = match_ledgers(
        Ledger(site).entries(), Ledger(coordinator).entries(), site="A"
    )

    # Assert
    (problem,) = match.problems
    assert problem.startswith("digest: site ledger entry 0 records content 0000")


def test_a_released_reply_that_never_arrived_is_listed_not_failed(
    tmp_path: Path,
) -> None:
    # Prepare: the site released one more reply in the same run; none arrived
    site, coordinator = write_pair(tmp_path, replies=1)
    Ledger(site).append(
        run_id="7",
        message_type="train.adapt",
        sender="hospital-a",
        direction=EGRESS,
        egress=egress("a" * 64),
        decision=RELEASED,
        policy={},
        epsilon_spent=0.0,
        epsilon_total=0.0,
    )
    Ledger(site).append(
        run_id="7",
        message_type="evaluate",
        sender="hospital-a",
        direction=EGRESS,
        egress=egress("b" * 64),
        decision=ERROR,
        policy={},
        epsilon_spent=0.0,
        epsilon_total=0.0,
    )

    # Execute
    match = match_ledgers(
        Ledger(site).entries(), Ledger(coordinator).entries(), site="A"
    )

    # Assert: only the released one is listed (an error reply released no content)
    assert match.ok
    assert match.not_received == (
        "site ledger entry 1: train.adapt of run 7 was released, and the coordinator "
        "has no reply for it",
    )


def test_audit_verify_against_the_coordinator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    site, coordinator = write_pair(tmp_path)

    # Execute
    untouched = main(["audit", "verify", str(site), "--against", str(coordinator)])
    printed = capsys.readouterr().out
    rewrite_with_recomputed_chain(site, 0, policy={"policy.dp.required": True})
    rewritten = main(["audit", "verify", str(site), "--against", str(coordinator)])
    errors = capsys.readouterr().err

    # Assert
    assert untouched == 0
    assert "OK: all 3 replies the coordinator received from A are in this ledger" in (
        printed
    )
    assert rewritten == 1
    assert "MISMATCH: rewritten: site ledger entry 0 has hash" in errors


def test_audit_verify_asks_for_the_site_when_the_coordinator_holds_several(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a second site's reply in the coordinator's ledger
    site, coordinator = write_pair(tmp_path, replies=1)
    Ledger(coordinator).append(
        run_id="7",
        message_type="evaluate",
        sender="B",
        direction=INGRESS,
        egress=egress("c" * 64),
        decision=RECEIVED,
        policy={},
        epsilon_spent=0.0,
        epsilon_total=0.0,
        anchor={"index": 0, "hash": "d" * 64},
    )

    # Execute
    ambiguous = main(["audit", "verify", str(site), "--against", str(coordinator)])
    named = main(
        ["audit", "verify", str(site), "--against", str(coordinator), "--site", "A"]
    )

    # Assert
    assert ambiguous == 2
    assert "name the site as the coordinator knows it with --site" in (
        capsys.readouterr().err
    )
    assert named == 0
