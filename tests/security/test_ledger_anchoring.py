"""Attack class 10: a site ledger rewritten after the fact, or cut short.

Whoever can write a site's ledger file can change an entry and recompute every hash
after it, or cut entries off its end: the file's own chain still verifies. Every
reply carries the index and hash of its site ledger entry, and the coordinator
records them; ``sitebridge audit verify SITE --against COORDINATOR`` holds the site's
ledger to those anchors. Here a real exchange (discover's hello, an evaluation, a
refused evaluation, a source training) runs between the coordinator and site A's
ClientApp, and the site's ledger is then tampered with as an insider would.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest
from flwr.app import RecordDict

from core import cli, protocol
from core.config import ConfigValue, load_run_config
from core.privacy.ledger import Ledger, verify_ledger
from core.training.networks import Arrays
from server import phases, records
from server.coordinator import Coordinator
from server.store import RunStore
from tests.security.attacker import (
    evaluate_content,
    grid_of_sites,
    rewrite_with_recomputed_chain,
)

NODE: Final = 11


@dataclasses.dataclass(frozen=True)
class Exchange:
    """The two ledgers of one real exchange between the coordinator and site A."""

    site_ledger: Path
    coordinator_ledger: Path


@pytest.fixture(scope="module")
def exchange(
    coordinator_process: None,
    federation: Path,
    run_config: dict[str, ConfigValue],
    models: dict[str, Arrays],
    tmp_path_factory: pytest.TempPathFactory,
) -> Exchange:
    root = tmp_path_factory.mktemp("exchange")
    nodes = {NODE: "A", 12: "B", 13: "C"}
    grid = grid_of_sites(federation, run_config, nodes, root / "sites")
    log: list[str] = []
    coordinator = Coordinator(
        grid=grid,  # type: ignore[arg-type]
        config=load_run_config(run_config),
        store=RunStore(root / "runs" / "1"),
        log=log.append,
    )

    def evaluate(count: int) -> RecordDict:
        predictors = {f"p{k}": [("fg", 1.0)] for k in range(count)}
        return evaluate_content({"fg": models["fg"]}, predictors)

    # Discover: every site says hello; the coordinator learns who node 11 is.
    discovered, sites = phases.discovery.discover(
        coordinator, nodes=sorted(nodes), default_target="A"
    )
    target = discovered.target
    assert (sites[NODE].name, target) == ("A", "A")
    asked = [
        (evaluate(1), protocol.EVALUATE, True),
        (evaluate(1000), protocol.EVALUATE, False),
        (records.build_request(), protocol.TRAIN_SOURCE, True),
    ]
    for content, message_type, answered in asked:
        replies = coordinator.ask({NODE: content}, message_type)
        assert (NODE in replies.ok) == answered, replies.failed
    return Exchange(
        site_ledger=root / "sites" / f"node-{NODE}" / "ledger.jsonl",
        coordinator_ledger=coordinator.ledger.path,
    )


def audit_verify(
    site_ledger: Path, capsys: pytest.CaptureFixture[str], *against: Path
) -> tuple[int, str, str]:
    """``sitebridge audit verify`` (with ``--against`` each of ``against``)."""
    capsys.readouterr()
    arguments = ["audit", "verify", str(site_ledger)]
    for path in against:
        arguments += ["--against", str(path)]
    status = cli.main(arguments)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_the_untouched_site_ledger_matches_the_coordinators(
    exchange: Exchange, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    status, out, _ = audit_verify(
        exchange.site_ledger, capsys, exchange.coordinator_ledger
    )

    # Assert: four replies, the refusal's included, all anchored
    assert status == 0
    assert "OK: 4 entries, chain intact" in out
    assert "OK: all 4 replies the coordinator received from A are in this ledger" in out


def hide_the_training(path: Path) -> None:
    """Rewrite the train.source entry as a refusal and recompute the chain."""
    (index,) = [
        entry.index
        for entry in Ledger(path).entries()
        if entry.message_type == protocol.TRAIN_SOURCE
    ]
    rewrite_with_recomputed_chain(
        path, index, decision="blocked: weights-may-not-leave", egress=None
    )


def hide_the_refusal(path: Path) -> None:
    """Say the refused evaluation was released: rewrite it, recompute the chain."""
    index = [entry.decision for entry in Ledger(path).entries()].index(
        "blocked: limit-exceeded"
    )
    rewrite_with_recomputed_chain(path, index, decision="released")


def cut_the_last_entry(path: Path) -> None:
    """Drop the last entry (the chain of what is left still verifies)."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))


@pytest.mark.parametrize(
    ("tamper", "mismatch"),
    [
        pytest.param(
            hide_the_training,
            "MISMATCH: rewritten: site ledger entry 3 has hash",
            id="rewritten-training",
        ),
        pytest.param(
            hide_the_refusal,
            "MISMATCH: rewritten: site ledger entry 2 has hash",
            id="rewritten-refusal",
        ),
        pytest.param(
            cut_the_last_entry,
            "MISMATCH: truncated: the coordinator received a train.source reply of "
            "run 5",
            id="truncated",
        ),
    ],
)
def test_a_tampered_site_ledger_verifies_alone_and_is_caught_against_the_coordinator(
    exchange: Exchange,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tamper: Callable[[Path], None],
    mismatch: str,
) -> None:
    # Prepare: the insider's copy of the site ledger
    site_ledger = tmp_path / "ledger.jsonl"
    shutil.copy(exchange.site_ledger, site_ledger)
    tamper(site_ledger)

    # Execute
    alone = audit_verify(site_ledger, capsys)
    against = audit_verify(site_ledger, capsys, exchange.coordinator_ledger)

    # Assert: the chain alone is fooled; the coordinator's anchors are not
    assert verify_ledger(site_ledger).ok
    assert alone[0] == 0
    assert against[0] == 1
    assert mismatch in against[2]
