"""What a malicious coordinator holds in its hands, and how a test checks the site.

A coordinator reaches a site only through messages: the SuperNode delivers each one to
the site's ClientApp (``clients.app.app``, guard included) with the node's Context,
whose ``node_config`` the *site* chose (its folder, its state folder, its policy file)
and whose ``run_config`` the *coordinator* chose. :class:`SiteUnderAttack` is that
delivery, with a run id of the coordinator's choosing (every ``flwr run`` gets a new
one), plus the readers a test needs to see what the site did: its ledger, its
accountant, its query book and its state folder.

The assertions check a refusal the way an auditor would: the reply's code and reason
(the rule id and the limit it names), the ledger entry the site wrote for it (its
decision, the digest of the reason that left) and the anchor that ties the two. The
crafted models are the attacker's simplest tools: a U-Net of the run's architecture
that paints one class everywhere, whatever the image.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

from clients.app import app as site_app
from core import protocol
from core.config import ConfigValue, RunConfig
from core.privacy.dp import ACCOUNTANT_FILE, AccountantState, read_accountant_state
from core.privacy.egress import measure_error
from core.privacy.ledger import (
    Ledger,
    LedgerEntry,
    compute_entry_hash,
    write_canonical_json,
)
from core.privacy.limits import read_query_book
from core.privacy.policy import Rule
from core.training.job import build_initial_weights
from core.training.networks import Arrays, build_model, set_weights
from core.training.trainer import predict_probabilities
from tests.unit.clients.messages import MESSAGE_ID, build_candidates
from tests.unit.server.fake_grid import FakeGrid

COORDINATOR_NODE: Final = 1
SITE_NODE: Final = 7
BLOCKED: Final = "blocked by egress policy: "
LEDGER: Final = "ledger.jsonl"
_GRID_RUN_IDS: Final = itertools.count(5001)  # one Flower run id per grid


def attack_message(
    content: RecordDict,
    message_type: str,
    *,
    run_id: int = 1,
    message_id: str = MESSAGE_ID,
) -> Message:
    """A message as the SuperNode delivers it, in a run the coordinator numbered."""
    metadata = Metadata(
        run_id=run_id,
        message_id=message_id,
        src_node_id=COORDINATOR_NODE,
        dst_node_id=SITE_NODE,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )
    # Message(content, metadata=...) is how the SuperNode builds what it delivers;
    # the public overloads only build messages to send.
    message: Message = Message(content, metadata=metadata)  # type: ignore[call-overload]
    return message


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteUnderAttack:
    """One site as its SuperNode serves it: the site's node config, any run config.

    Attributes:
        directory: the site folder (``node_config["site-dir"]``).
        state_dir: its ledger, accountant and query book (``node_config["state-dir"]``).
        run_config: the run config the coordinator sends with every message.
        policy: the site's policy file, or None for the safe defaults (no file).
    """

    directory: Path
    state_dir: Path
    run_config: Mapping[str, ConfigValue]
    policy: Path | None = None

    @property
    def name(self) -> str:
        """The site's name as its replies say it (its folder's name)."""
        return self.directory.name

    def context(
        self,
        *,
        run_id: int = 1,
        run_overrides: Mapping[str, ConfigValue] | None = None,
        directory: Path | None = None,
    ) -> Context:
        """The node's Context for one message (``directory`` replaces the site's)."""
        node_config: dict[str, ConfigValue] = {
            "site-dir": str(directory or self.directory),
            "state-dir": str(self.state_dir),
        }
        if self.policy is not None:
            node_config["policy"] = str(self.policy)
        return Context(
            run_id=run_id,
            node_id=SITE_NODE,
            node_config=node_config,
            state=RecordDict(),
            run_config={**self.run_config, **(run_overrides or {})},
        )

    def send(
        self,
        message_type: str,
        content: RecordDict | None = None,
        *,
        run_id: int = 1,
        message_id: str = MESSAGE_ID,
        run_overrides: Mapping[str, ConfigValue] | None = None,
        app: ClientApp = site_app,
    ) -> Message:
        """Deliver one message to the site's ClientApp; its reply."""
        message = attack_message(
            RecordDict() if content is None else content,
            message_type,
            run_id=run_id,
            message_id=message_id,
        )
        return app(message, self.context(run_id=run_id, run_overrides=run_overrides))

    @property
    def ledger_path(self) -> Path:
        """The site's egress ledger."""
        return self.state_dir / LEDGER

    def entries(self) -> list[LedgerEntry]:
        """The site's ledger entries, in order."""
        return Ledger(self.ledger_path).entries()

    def state_files(self) -> list[str]:
        """Names in the site's state folder (what a request left behind there)."""
        if not self.state_dir.exists():
            return []
        return sorted(path.name for path in self.state_dir.iterdir())

    def accountant(self) -> AccountantState:
        """The site's privacy accountant (empty when never written)."""
        return read_accountant_state(self.state_dir / ACCOUNTANT_FILE)

    def query_book(self) -> dict[str, dict[str, int]]:
        """Run id -> query kind -> units the site charged."""
        return read_query_book(self.state_dir / "queries.json")


# ------------------------------------------------------------------ what came back


def reason_of(reply: Message) -> str:
    """An error reply's reason without its ledger anchor."""
    assert reply.has_error(), "expected an error reply, got content"
    reason, _ = protocol.LedgerAnchor.split_reason(reply.error.reason or "")
    return reason


def _anchored_entry(site: SiteUnderAttack, reply: Message) -> LedgerEntry:
    """The site's ledger entry this error reply is anchored to (checked)."""
    reason, anchor = protocol.LedgerAnchor.split_reason(reply.error.reason or "")
    assert anchor is not None, f"an error reply without its anchor: {reason[:300]}"
    entries = site.entries()
    assert anchor.index < len(entries), (anchor, len(entries))
    entry = entries[anchor.index]
    assert anchor.entry_hash == entry.entry_hash
    assert entry.message_type == reply.metadata.message_type
    assert entry.sender == site.name
    return entry


def assert_refused(
    site: SiteUnderAttack,
    reply: Message,
    rule: Rule,
    *fragments: str,
    message_id: str = MESSAGE_ID,
    blocked_reply: bool = False,
) -> LedgerEntry:
    """The guard refused the request under ``rule``, naming every fragment.

    Args:
        site: the site that answered.
        reply: its reply.
        rule: the rule the reason must name.
        *fragments: text the reason must hold.
        message_id: the request's id.
        blocked_reply: the handler ran and its reply was stopped on the way out (the
            ledger then records what would have left); otherwise the request was
            refused before any work and what left is the reason alone.

    Returns:
        The refusal's ledger entry (decision ``blocked: <rule>``).
    """
    assert reply.has_error(), "the site answered a request it should refuse"
    reason = reason_of(reply)
    assert reply.error.code == protocol.EGRESS_BLOCKED_CODE, reason[:500]
    assert reply.metadata.reply_to_message_id == message_id
    assert not reply.has_content()
    assert reason.startswith(BLOCKED), reason[:500]
    assert f"{rule.value} (" in reason, reason[:500]
    for fragment in fragments:
        assert fragment in reason, reason[:500]
    entry = _anchored_entry(site, reply)
    assert entry.decision == f"blocked: {rule.value}"
    assert not entry.released
    if blocked_reply:
        assert entry.egress is not None
        assert entry.egress != measure_error(reason)
    else:
        # What left is exactly the reason the coordinator reads (digest and size).
        assert entry.egress == measure_error(reason)
    return entry


def assert_site_error(
    site: SiteUnderAttack, reply: Message, *fragments: str
) -> LedgerEntry:
    """The site answered with an error naming every fragment, and ledgered it."""
    assert reply.has_error(), "expected an error reply"
    reason = reason_of(reply)
    assert reply.error.code == protocol.SITE_ERROR_CODE, reason[:500]
    assert not reply.has_content()
    for fragment in fragments:
        assert fragment in reason, reason[:500]
    entry = _anchored_entry(site, reply)
    assert entry.decision == "error"
    assert entry.egress == measure_error(reason)
    return entry


def assert_released(site: SiteUnderAttack, reply: Message) -> LedgerEntry:
    """The site answered; the reply is anchored to its ``released`` ledger entry."""
    assert not reply.has_error(), (reply.error.reason or "")[:500]
    settings = reply.content.config_records[protocol.REPLY_KEY]
    anchor = protocol.LedgerAnchor.from_settings(settings)
    assert anchor is not None
    entry = site.entries()[anchor.index]
    assert anchor.entry_hash == entry.entry_hash
    assert entry.decision == "released"
    return entry


def metrics_of(reply: Message) -> dict[str, object]:
    """The reply's metric record (empty for an error reply)."""
    if reply.has_error():
        return {}
    return dict(reply.content.metric_records.get(protocol.METRICS_KEY, {}))


# ------------------------------------------------------------- the attacker's tools


def constant_model(config: RunConfig, *, foreground: bool) -> Arrays:
    """A model of the run's architecture that paints one class on every pixel.

    The upsampling block's convolution and normalisation are zeroed, so it outputs
    zeros; the last convolution's weights are zeroed too, so only its bias is left:
    logits (-10, 10) everywhere (foreground) or (10, -10) (background), whatever the
    image. The simplest crafted model: a coordinator needs no data to build it.

    Raises:
        AssertionError: the architecture is not the two-block one this knows.
    """
    weights = build_initial_weights(config)
    last = max(int(name.split(".")[1]) for name in weights)
    upsampling, final = f"model.{last}.0.", f"model.{last}.1."
    crafted = dict(weights)
    zeroed = [
        name
        for name in weights
        if (name.startswith(upsampling) and ".A." not in name)
        or (name.startswith(final) and name.endswith("conv.weight"))
    ]
    (bias,) = [n for n in weights if n.startswith(final) and n.endswith("conv.bias")]
    for name in zeroed:
        crafted[name] = np.zeros_like(weights[name])
    crafted[bias] = np.array(
        [-10.0, 10.0] if foreground else [10.0, -10.0], dtype=np.float32
    )
    model = build_model(config.model, data=config.data)
    set_weights(model, crafted)
    size = config.data.image_size
    images = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    painted = predict_probabilities(model, images, device=torch.device("cpu"))
    assert bool((painted.argmax(1) == int(foreground)).all())
    return crafted


def with_request(
    models: Mapping[str, Arrays], fields: Mapping[str, object]
) -> RecordDict:
    """A request carrying ``model.<name>`` weights and its settings."""
    content = build_candidates(models)
    content[protocol.REQUEST_KEY] = ConfigRecord(dict(fields))  # type: ignore[arg-type]
    return content


def evaluate_content(
    models: Mapping[str, Arrays], predictors: Mapping[str, list[tuple[str, float]]]
) -> RecordDict:
    """An ``evaluate`` request: the models and the predictor table."""
    request = protocol.EvaluateRequest(predictors=dict(predictors))
    return with_request(models, request.to_fields())


def rewrite_with_recomputed_chain(path: Path, index: int, **changes: object) -> None:
    """Whoever can write the ledger file: edit entry ``index``, recompute the chain.

    Every later ``previous_hash`` and ``entry_hash`` is recomputed, so the file's own
    hash chain verifies again; only the anchors the coordinator kept can tell.
    """
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[index].update(changes)
    previous = lines[index - 1]["entry_hash"] if index else "0" * 64
    for line in lines[index:]:
        line["previous_hash"] = previous
        line["entry_hash"] = compute_entry_hash(line)
        previous = line["entry_hash"]
    path.write_text("".join(write_canonical_json(line) + "\n" for line in lines))


# --------------------------------------------------------------- the coordinator side


def grid_of_sites(
    federation: Path,
    run_config: Mapping[str, ConfigValue],
    nodes: Mapping[int, str],
    state_root: Path,
    *,
    names: Mapping[int, str] | None = None,
) -> FakeGrid:
    """A grid whose nodes serve ``nodes`` (node id -> site folder) with their own state.

    Each node keeps its ledger in ``state_root/node-<id>`` (never in the shared
    federation); ``names`` are the names the nodes' keys were registered under (a
    deployment's grid reports them; a simulation's has none).
    """
    run_id = next(_GRID_RUN_IDS)
    contexts = {
        node: Context(
            run_id=run_id,
            node_id=node,
            node_config={
                "site-dir": str(federation / site),
                "state-dir": str(state_root / f"node-{node}"),
            },
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for node, site in nodes.items()
    }
    return FakeGrid(contexts, names=names)
