"""The coordinator: it sends a phase's messages and records them in its ledger.

Owns :class:`Coordinator` (one message per node, replies matched by message id,
timeouts reported per node), what the coordinator knows of a site
(:class:`SiteInfo`), the phase failure (:class:`PhaseError`) and the model names
that several phases share. The phases themselves live in ``server/phases/``, one
module each.

The coordinator keeps its own hash-chained ledger (``runs/<run-id>/ledger.jsonl``):
one ``egress`` entry per request it sends (``sent``), one ``ingress`` entry per reply it
receives (``received``, or ``error`` for an error reply), digested exactly as the site
digests it (``core.privacy.egress``), with the reply's anchor (the index and hash of the
site's own ledger entry for it), and one ``undelivered`` entry per node that sent
nothing before the timeout. So an auditor can match each site's ledger against it
(``sitebridge audit verify SITE_LEDGER --against runs/<id>/ledger.jsonl``). It also
keeps the policy each site reported it applied, for the report's privacy section.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from core import protocol
from core.config import RunConfig
from core.logs import get_logger
from core.privacy.egress import measure_content, measure_error
from core.privacy.ledger import (
    EGRESS,
    ERROR,
    INGRESS,
    RECEIVED,
    SENT,
    UNDELIVERED,
    Egress,
    Ledger,
)
from server import records
from server.store import RunStore

# The coordinator's progress output; the ServerApp's sends each line to the
# sitebridge.coordinator logger at INFO (server/app.py).
Log = Callable[[str], None]
LOGGER = get_logger("coordinator")  # its own DEBUG lines: each reply, or its absence
COORDINATOR: Final = "coordinator"  # the coordinator's name in ledgers
LEDGER_FILE: Final = "ledger.jsonl"
ADAPTED_START: Final = "adapted:main"  # the model consensus and semisup start from
# Site names become file names (models/source-<name>.npz, report rows): one safe
# component, as deploy/register-site.sh checks at registration.
# A site name becomes part of file names here: one pattern, the wire contract's.
SITE_NAME_PATTERN: Final = protocol.SITE_NAME_PATTERN


class PhaseError(RuntimeError):
    """A phase could not proceed (too few sites answered, or a required one failed).

    Attributes:
        phase: the phase that failed, when known.
        missing: site (or node) name -> why it did not answer, for the report's
            missing-sites section even though the phase never persisted a result.
        refused: the target refused the phase's request by its policy (rather than
            failing): an optional phase is then skipped, not the run stopped.
    """

    def __init__(
        self,
        message: str,
        *,
        phase: str | None = None,
        missing: Mapping[str, str] | None = None,
        refused: bool = False,
    ) -> None:
        super().__init__(message)
        self.phase = phase
        self.missing = dict(missing or {})
        self.refused = refused


# Replies are pulled from the SuperLink at these intervals, growing from the first
# to the last: Flower's own ``send_and_receive`` sleeps 3 s between pulls, which adds
# up to 3 s to every round trip of a deployment (docs/perf-benchmark.md).
REPLY_POLL_FIRST_S: Final = 0.05
REPLY_POLL_GROWTH: Final = 1.5
REPLY_POLL_LAST_S: Final = 1.0


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push ``messages``; pull their replies until all came or ``timeout`` passed.

    What ``grid.send_and_receive`` does, polling at :data:`REPLY_POLL_FIRST_S`
    growing to :data:`REPLY_POLL_LAST_S` instead of Flower's fixed 3 s. A grid that
    is not a Flower ``Grid`` (the tests' in-process one) is asked as it is.
    """
    if not isinstance(grid, Grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    interval = REPLY_POLL_FIRST_S
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
        remaining = deadline - time.monotonic()
        if not waiting or remaining <= 0:
            break
        time.sleep(min(interval, remaining))
        interval = min(interval * REPLY_POLL_GROWTH, REPLY_POLL_LAST_S)
    return replies


def validate_site_name(name: str, node: int) -> str:
    """``name`` when it is a safe site name (it becomes part of file names).

    Raises:
        PhaseError: naming the node, when ``name`` is not 1-64 letters, digits,
            ``.``, ``_`` or ``-`` starting with a letter or digit.

    Example:
        >>> validate_site_name("hospital-a", 7)
        'hospital-a'
    """
    try:
        return protocol.check_site_name(name[:80])
    except ValueError as error:
        raise PhaseError(f"node {node}: {error}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class SiteInfo:
    """A site as the coordinator knows it: its node and what it said in hello."""

    node_id: int
    hello: protocol.HelloReply

    @property
    def name(self) -> str:
        """The site's name."""
        return self.hello.site


@dataclasses.dataclass(frozen=True, slots=True)
class Replies:
    """Replies of one phase by node id, and the nodes that failed with the reason.

    ``refused`` are the failed nodes whose site refused the request by its policy
    (an egress-guard refusal, ``core.protocol.EGRESS_BLOCKED_CODE``), as opposed to
    a site that failed or did not answer.
    """

    ok: dict[int, Message]
    failed: dict[int, str]
    refused: frozenset[int] = frozenset()


@dataclasses.dataclass
class Coordinator:
    """Sends a phase's messages, collects its replies and records both in its ledger.

    Attributes:
        site_names: node id -> site name, known after discover.
        applied_policies: site name -> the ``policy.*`` fields its last reply said
            were applied.
    """

    grid: Grid
    config: RunConfig
    store: RunStore
    log: Log
    warn_log: Log | None = None  # failures the run records; None: into ``log``
    site_names: dict[int, str] = dataclasses.field(default_factory=dict)
    applied_policies: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=dict
    )
    # The resolution plan's values, sent with every request once the plan phase
    # derived them (None before, or when the run has no plan).
    plan: protocol.PlanSettings | None = None

    def warn(self, line: str) -> None:
        """A failure the run records and goes on from (or stops on): ``warn_log``."""
        (self.warn_log or self.log)(line)

    @property
    def ledger(self) -> Ledger:
        """The coordinator's ledger of this run."""
        return Ledger(self.store.run_dir / LEDGER_FILE)

    def site_name(self, node: int, reply: Message | None = None) -> str:
        """The node's site name: known, or said in its hello reply, or ``node <id>``."""
        if node in self.site_names:
            return self.site_names[node]
        if reply is not None and not reply.has_error():
            said = records.read_settings(reply.content).get("site")
            if isinstance(said, str) and said:
                return said
        return f"node {node}"

    def _record_request(self, message: Message) -> None:
        egress = measure_content(
            message.content, message_type=message.metadata.message_type
        ).egress
        self._append(
            message, direction=EGRESS, sender=COORDINATOR, egress=egress, decision=SENT
        )

    def _record_reply(self, reply: Message, *, sender: str) -> str | None:
        """Ledger a reply with its anchor; return an error reply's unanchored reason."""
        if reply.has_error():
            reason, anchor = protocol.LedgerAnchor.split_reason(
                reply.error.reason or ""
            )
            self._append(
                reply,
                direction=INGRESS,
                sender=sender,
                egress=measure_error(reason),
                decision=ERROR,
                anchor=anchor,
            )
            return reason
        anchor = protocol.LedgerAnchor.from_settings(
            records.read_settings(reply.content)
        )
        egress = measure_content(
            reply.content, message_type=reply.metadata.message_type
        ).egress
        self._append(
            reply,
            direction=INGRESS,
            sender=sender,
            egress=egress,
            decision=RECEIVED,
            anchor=anchor,
        )
        return None

    def _append(
        self,
        message: Message,
        *,
        direction: str,
        sender: str,
        egress: Egress | None,
        decision: str,
        anchor: protocol.LedgerAnchor | None = None,
    ) -> None:
        self.ledger.append(
            run_id=str(message.metadata.run_id),
            message_type=message.metadata.message_type,
            sender=sender,
            direction=direction,
            egress=egress,
            decision=decision,
            policy={},
            epsilon_spent=0.0,
            epsilon_total=0.0,
            anchor=None if anchor is None else anchor.to_json(),
        )

    def _keep_applied_policy(self, node: int, reply: Message) -> None:
        if reply.has_error():
            return
        settings = records.read_settings(reply.content)
        applied = {
            key: value
            for key, value in settings.items()
            if key.startswith(protocol.APPLIED_POLICY_PREFIX)
        }
        if applied:
            self.applied_policies[self.site_name(node, reply)] = applied

    def ask(self, requests: Mapping[int, RecordDict], message_type: str) -> Replies:
        """Send one message per node and wait up to the reply timeout.

        Replies are matched to requests by message id (an error reply made by the
        SuperLink does not carry the dead node's id); a node that neither answered nor
        errored before the timeout is reported as timed out. Every request and reply
        is recorded in the coordinator's ledger, and so is every reply that did not
        come (``undelivered``).
        """
        if self.plan is not None:
            for content in requests.values():
                content[protocol.PLAN_KEY] = ConfigRecord(self.plan.to_fields())  # type: ignore[arg-type]
        messages = {
            node: Message(content, dst_node_id=node, message_type=message_type)
            for node, content in requests.items()
        }
        for message in messages.values():
            self._record_request(message)
        replies = exchange(
            self.grid,
            list(messages.values()),
            self.config.federation.reply_timeout_s,
        )
        # The grid assigns message ids when it pushes, so map them only afterwards.
        by_message_id = {
            message.metadata.message_id: node for node, message in messages.items()
        }
        ok: dict[int, Message] = {}
        failed: dict[int, str] = {}
        refused: set[int] = set()
        for reply in replies:
            node = by_message_id.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            reason = self._record_reply(reply, sender=self.site_name(node, reply))
            self._keep_applied_policy(node, reply)
            if reason is not None:
                failed[node] = f"error {reply.error.code}: {reason}"
                if reply.error.code == protocol.EGRESS_BLOCKED_CODE:
                    refused.add(node)
            else:
                ok[node] = reply
            LOGGER.debug(
                "%s from %s: %s",
                message_type,
                self.site_name(node, reply),
                failed.get(node, "replied"),
            )
        for node, message in messages.items():
            if node not in ok and node not in failed:
                failed[node] = (
                    f"no reply within {self.config.federation.reply_timeout_s:g} s"
                )
                LOGGER.debug(
                    "%s from %s: %s", message_type, self.site_name(node), failed[node]
                )
                self._append(
                    message,
                    direction=INGRESS,
                    sender=self.site_name(node),
                    egress=None,
                    decision=UNDELIVERED,
                )
        return Replies(ok=ok, failed=failed, refused=frozenset(refused))


def names_by_site(
    sites: Mapping[int, SiteInfo], nodes: Mapping[int, object]
) -> dict[str, Any]:
    """``nodes``' values keyed by site name (the node id where the site is unknown)."""
    return {
        sites[node].name if node in sites else str(node): value
        for node, value in nodes.items()
    }


def ask_target(
    coordinator: Coordinator,
    target: SiteInfo,
    content: RecordDict,
    message_type: str,
    phase: str,
) -> Message:
    """Ask the target alone; its reply, or a PhaseError naming ``phase``."""
    replies = coordinator.ask({target.node_id: content}, message_type)
    if target.node_id not in replies.ok:
        reason = str(replies.failed.get(target.node_id))
        raise PhaseError(
            f"{phase}: target {target.name} failed: {reason}",
            phase=phase,
            missing={target.name: reason},
            refused=target.node_id in replies.refused,
        )
    return replies.ok[target.node_id]
