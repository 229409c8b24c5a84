"""A site's ledger checked against the coordinator's: the anchors its replies carried.

A hash chain shows that no entry was edited, inserted or reordered, but whoever can
write a site's ledger file can rewrite it and recompute every hash, or cut entries
off its end, and the chain still verifies. Every reply a site sends carries the
index and hash of its own ledger entry for that reply, and the coordinator records
that anchor in its ledger. :func:`match_ledgers` holds the site's ledger to those
anchors:

- an anchor beyond the site ledger's end: the site ledger was **truncated**;
- an anchor whose hash differs from the site's entry at that index: the site ledger
  was **rewritten** (or another ledger was given);
- the same entry with another digest than the coordinator received: the reply's
  content and the site's record of it disagree.

It also lists, for information, the replies the site released that never reached the
coordinator (``released`` at the site, ``undelivered`` or absent at the coordinator):
a site's ``released`` means "passed the guard and handed to the SuperNode", not
"delivered". Pure stdlib over :mod:`core.privacy.ledger` entries; never imports flwr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from core.privacy.ledger import INGRESS, LedgerEntry


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LedgerMatch:
    """What :func:`match_ledgers` found.

    Attributes:
        site: the site whose replies were matched (the coordinator's name for it).
        anchors: anchored replies the coordinator holds for that site.
        problems: one line per mismatch (truncated, rewritten, digest); none when ok.
        not_received: site entries released in the matched runs that the
            coordinator never received (information, not a mismatch).
    """

    site: str
    anchors: int
    problems: tuple[str, ...]
    not_received: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether every anchor matches the site's ledger."""
        return not self.problems


def coordinator_sites(coordinator: Sequence[LedgerEntry]) -> list[str]:
    """The sites whose replies a coordinator ledger holds anchors of, sorted."""
    return sorted(
        {
            entry.sender
            for entry in coordinator
            if entry.direction == INGRESS and entry.anchor is not None
        }
    )


def match_ledgers(
    site_entries: Sequence[LedgerEntry],
    coordinator: Sequence[LedgerEntry],
    *,
    site: str,
) -> LedgerMatch:
    """Check a site's ledger against the anchors the coordinator recorded for it.

    Args:
        site_entries: the site's ledger, in file order (its chain checked first).
        coordinator: the coordinator's ledger entries (one run or several).
        site: the name the coordinator knows the site by (the ``sender`` of its
            ingress entries).

    Returns:
        The match; ``ok`` when every anchor is in the site's ledger with the same
        hash and digest.
    """
    anchored = [
        entry
        for entry in coordinator
        if entry.direction == INGRESS and entry.sender == site and entry.anchor
    ]
    problems: list[str] = []
    received: set[int] = set()
    for entry in anchored:
        assert entry.anchor is not None
        index, entry_hash = int(str(entry.anchor["index"])), str(entry.anchor["hash"])
        what = f"{entry.message_type} reply of run {entry.run_id}"
        if index >= len(site_entries):
            problems.append(
                f"truncated: the coordinator received a {what} anchored at site "
                f"ledger entry {index}, and the site ledger has only "
                f"{len(site_entries)} entries"
            )
            continue
        recorded = site_entries[index]
        if recorded.entry_hash != entry_hash:
            problems.append(
                f"rewritten: site ledger entry {index} has hash "
                f"{recorded.entry_hash[:16]}..., the {what} carried "
                f"{entry_hash[:16]}... to the coordinator"
            )
            continue
        received.add(index)
        site_digest = None if recorded.egress is None else recorded.egress.digest
        coordinator_digest = None if entry.egress is None else entry.egress.digest
        if site_digest != coordinator_digest:
            problems.append(
                f"digest: site ledger entry {index} records content "
                f"{str(site_digest)[:16]}..., the coordinator received "
                f"{str(coordinator_digest)[:16]}... ({what})"
            )
    runs = {entry.run_id for entry in anchored}
    not_received = tuple(
        f"site ledger entry {entry.index}: {entry.message_type} of run "
        f"{entry.run_id} was released, and the coordinator has no reply for it"
        for entry in site_entries
        if entry.run_id in runs and entry.released and entry.index not in received
    )
    return LedgerMatch(
        site=site,
        anchors=len(anchored),
        problems=tuple(problems),
        not_received=not_received,
    )
