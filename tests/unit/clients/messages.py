"""Messages, Contexts and policies built by hand, as a SuperNode delivers them.

Shared by the ClientApp tests: no Flower daemon runs; each test builds the
``Message`` with explicit metadata and a ``Context`` whose ``node_config`` points at
one site folder (as a deployed SuperNode's --node-config does), then checks the reply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from clients import records
from core import protocol
from core.config import ConfigValue
from core.privacy.policy import ACTIONS
from core.training.networks import Arrays

MESSAGE_ID: Final = "m1"

# The safe defaults of deploy/policy.template.toml, as dotted policy.toml keys.
DEFAULT_POLICY: Final[dict[str, object]] = {
    "actions.answer": list(ACTIONS),
    "release.lftm": "domain",
    "release.weights-may-leave": True,
    "release.max-reply-mb": 64.0,
    "release.max-config-value-bytes": 4096,
    "dp.required": False,
    "dp.noise-multiplier": 1.0,
    "dp.delta": 1e-5,
    "dp.budget-epsilon": 10.0,
}
DP_POLICY: Final[dict[str, object]] = {
    "dp.required": True,
    "dp.noise-multiplier": 2.0,
    "dp.budget-epsilon": 10.0,
}


def build_message(
    content: RecordDict, message_type: str, message_id: str = MESSAGE_ID
) -> Message:
    """A message from the coordinator (node 1) to the site (node 7)."""
    metadata = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )
    return Message(content, metadata=metadata)


def build_context(
    run_config: Mapping[str, ConfigValue], node_config: Mapping[str, ConfigValue]
) -> Context:
    """The site node's Context for one message."""
    return Context(
        run_id=1,
        node_id=7,
        node_config=dict(node_config),
        state=RecordDict(),
        run_config=dict(run_config),
    )


def build_site_context(
    run_config: Mapping[str, ConfigValue],
    site_dir: Path,
    state_dir: Path,
    *,
    policy: Path | None = None,
    run_overrides: Mapping[str, ConfigValue] | None = None,
) -> Context:
    """A deployed site's Context: its folder, its state folder, its policy file."""
    node_config: dict[str, ConfigValue] = {
        "site-dir": str(site_dir),
        "state-dir": str(state_dir),
    }
    if policy is not None:
        node_config["policy"] = str(policy)
    return build_context({**run_config, **(run_overrides or {})}, node_config)


def build_candidates(
    models: Mapping[str, Arrays], settings: Mapping[str, ConfigValue] | None = None
) -> RecordDict:
    """A request carrying ``model.<name>`` weights and, optionally, its settings."""
    content = RecordDict()
    for name, weights in models.items():
        content[protocol.model_key(name)] = records.to_array_record(weights)
    if settings is not None:
        content[protocol.REQUEST_KEY] = ConfigRecord(dict(settings))
    return content


def policy_text(overrides: Mapping[str, object] | None = None) -> str:
    """A policy.toml: the template's defaults with ``overrides`` (None drops a key)."""
    tables: dict[str, list[str]] = {}
    for key, value in {**DEFAULT_POLICY, **(overrides or {})}.items():
        if value is None:
            continue
        table, name = key.split(".", 1)
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:  # JSON numbers, strings and string lists are valid TOML values too
            text = json.dumps(value)
        tables.setdefault(table, []).append(f"{name} = {text}")
    return "".join(
        f"[{table}]\n" + "".join(f"{line}\n" for line in lines)
        for table, lines in tables.items()
    )


def write_policy(folder: Path, overrides: Mapping[str, object] | None = None) -> Path:
    """Write ``folder/policy.toml`` from :func:`policy_text`; return its path."""
    path = folder / "policy.toml"
    path.write_text(policy_text(overrides))
    return path


def reason_of(reply: Message) -> str:
    """The error reason of a reply ("" when it has none)."""
    return reply.error.reason or ""


def assert_site_error(reply: Message, *fragments: str) -> None:
    """A site error reply to :data:`MESSAGE_ID` whose reason holds every fragment."""
    reason = reason_of(reply)
    assert reply.has_error()
    assert reply.error.code == protocol.SITE_ERROR_CODE, reason[:500]
    assert reply.metadata.reply_to_message_id == MESSAGE_ID
    for fragment in fragments:
        assert fragment in reason, reason[:500]
