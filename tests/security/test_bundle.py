"""Attack class 1: the coordinator ships its own code to the site.

``flwr run`` sends an app bundle; a coordinator who edits ``clients/guard.py`` before
sending it would switch off the guard, the policy, the ledger and the accountant at
every site that runs the bundle's code. The site's own process
(``clients.serve.handle``) runs only bundles whose SHA-256 the site approved, and even
then runs the SiteBridge installed at the site. Here a bundle built from this
repository with its guard made a pass-through is delivered to a site that approved
the honest bundle: it gets a ledgered refusal and nothing else.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest
from flwr.app import Context, Message, RecordDict

from clients.app import app as site_app
from clients.runtime_api import TaskInput
from clients.serve import BUNDLE_NOT_APPROVED, handle
from core import protocol
from core.privacy.approvals import (
    APPROVALS_FILE,
    approve,
    bundle_sha256,
    refused_bundle_path,
)
from core.privacy.ledger import verify_ledger
from tests.security.attacker import (
    SiteUnderAttack,
    attack_message,
    reason_of,
)
from tests.security.conftest import OpenSite

REPO: Final = Path(__file__).resolve().parents[2]
PASS_THROUGH_GUARD: Final = (
    "def egress_guard(message, context, call_next):\n"
    "    return call_next(message, context)\n"
)


def build_bundle(*, guard: str | None = None) -> bytes:
    """A bundle of this repository's site code; ``guard`` replaces clients/guard.py."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(REPO / "pyproject.toml", "pyproject.toml")
        for package in ("clients", "core"):
            for path in sorted((REPO / package).glob("*.py")):
                name = f"{package}/{path.name}"
                if name == "clients/guard.py" and guard is not None:
                    archive.writestr(name, guard)
                else:
                    archive.write(path, name)
    return buffer.getvalue()


def recording_app(calls: list[str]) -> Callable[[Message, Context], Message]:
    """The installed app, recording each message it is handed."""

    def app(message: Message, context: Context) -> Message:
        calls.append(message.metadata.message_type)
        return site_app(message, context)

    return app


def task(site: SiteUnderAttack, fab: bytes, message_type: str) -> TaskInput:
    message = attack_message(RecordDict(), message_type)
    return TaskInput(message=message, context=site.context(), fab_content=fab, run_id=1)


@pytest.fixture
def site(open_site: OpenSite) -> SiteUnderAttack:
    """Site B, which approved the honest bundle of this release."""
    site = open_site("B")
    approve(
        site.state_dir / APPROVALS_FILE,
        bundle_sha256(build_bundle()),
        source="sha256",
    )
    return site


@pytest.mark.parametrize("message_type", [protocol.HELLO, protocol.TRAIN_SOURCE])
def test_a_bundle_with_its_guard_removed_gets_a_ledgered_refusal_and_nothing_else(
    site: SiteUnderAttack, message_type: str
) -> None:
    # Prepare
    rogue = build_bundle(guard=PASS_THROUGH_GUARD)
    digest = bundle_sha256(rogue)
    calls: list[str] = []

    # Execute
    reply = handle(task(site, rogue, message_type), recording_app(calls))

    # Assert: refused, naming the bundle and the command that would approve it
    assert calls == []  # no handler, no guard, nothing of the site's app ran
    assert reply.has_error()
    assert not reply.has_content()
    assert reply.error.code == protocol.EGRESS_BLOCKED_CODE
    reason = reason_of(reply)
    assert f"bundle SHA-256 {digest} is not approved" in reason
    assert f"sitebridge site approve --state-dir <state-dir> {digest}" in reason
    assert str(site.state_dir) not in reason
    # ... ledgered and anchored like every reply
    (entry,) = site.entries()
    _, anchor = protocol.LedgerAnchor.split_reason(reply.error.reason or "")
    assert anchor == protocol.LedgerAnchor(entry.index, entry.entry_hash)
    assert entry.decision == f"blocked: {BUNDLE_NOT_APPROVED}"
    assert entry.message_type == message_type
    assert verify_ledger(site.ledger_path).ok
    # ... nothing trained, nothing charged; the bundle is kept for the site's review
    assert [name for name in site.state_files() if not name.startswith(".")] == [
        APPROVALS_FILE,
        "bundles",
        "ledger.jsonl",
    ]
    assert refused_bundle_path(site.state_dir, digest).read_bytes() == rogue


def test_the_approved_bundle_runs_the_installed_app(site: SiteUnderAttack) -> None:
    # Prepare
    calls: list[str] = []

    # Execute
    reply = handle(task(site, build_bundle(), protocol.HELLO), recording_app(calls))

    # Assert: the site's own app (guard included) answered
    assert calls == [protocol.HELLO]
    assert not reply.has_error(), reply.error.reason
    settings = reply.content.config_records[protocol.REPLY_KEY]
    assert settings["site"] == "B"
    assert settings["policy.dp.required"] is False  # the guard added the policy
    assert [entry.decision for entry in site.entries()] == ["released"]
