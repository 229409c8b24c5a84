"""``sitebridge-serve``: approved bundles run the installed app, others are refused.

The decisions (:func:`clients.serve.handle`) run the site's real ClientApp on a tiny
synthetic site with hand-built Messages and Contexts (``messages.py``); the loop
(:class:`clients.serve.Server`) runs against a fake Runtime API that hands out
prepared tasks and records what the loop pushes; a task's pull
(:class:`clients.runtime_api.TaskChannel`) runs Flower's own object pulling against a
fake HTTP client that answers with real protobuf messages. The real Runtime API of a
real SuperNode is exercised by ``tests/integration/test_deployment.py``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import signal
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import httpx
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.serde import (
    context_to_proto,
    fab_to_proto,
    message_to_proto,
    run_to_proto,
)
from flwr.proto.message_pb2 import (  # pylint: disable=E0611
    ConfirmMessageReceivedResponse,
    PullObjectRequest,
    PullObjectResponse,
)
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    PullAppMessagesResponse,
    PullTaskInputResponse,
)
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
)
from flwr.supercore.run import Run

from clients.app import app as site_app
from clients.runtime_api import TaskAbandonedError, TaskChannel, TaskInput
from clients.serve import BUNDLE_NOT_APPROVED, Server, build_parser, handle
from core import protocol
from core.config import ConfigValue
from core.logs import configure_logging, log_level_of
from core.privacy.approvals import (
    APPROVALS_FILE,
    approve,
    bundle_sha256,
    refused_bundle_path,
)
from core.privacy.egress import measure_error
from core.privacy.ledger import Ledger, verify_ledger
from tests.unit.clients.messages import (
    MESSAGE_ID,
    build_message,
    build_site_context,
    reason_of,
)

SITE: Final = "A"
REPO_ROOT: Final = Path(__file__).resolve().parents[3]


def bundle(guard: str) -> bytes:
    """A bundle in ``flwr build``'s layout whose ``clients/guard.py`` is ``guard``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", '[project]\nname = "sitebridge"\n')
        archive.writestr("clients/guard.py", guard)
        archive.writestr(".info/CONTENT", "")
    return buffer.getvalue()


# The coordinator's edit of issue 20: a guard that lets every reply through.
ROGUE_BUNDLE: Final = bundle(
    "def egress_guard(message, context, call_next):\n"
    "    return call_next(message, context)\n"
)


@pytest.fixture
def context(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> Context:
    """Site A's Context with its state in a tmp folder (deployment node config)."""
    return build_site_context(run_config, federation / SITE, tmp_path / "state")


def state_dir(context: Context) -> Path:
    return Path(str(context.node_config["state-dir"]))


def hello_task(context: Context, fab: bytes, message_id: str = MESSAGE_ID) -> TaskInput:
    message = build_message(RecordDict(), protocol.HELLO, message_id=message_id)
    return TaskInput(message=message, context=context, fab_content=fab, run_id=1)


def ledger_entries(context: Context) -> list[tuple[str, str]]:
    ledger = Ledger(state_dir(context) / "ledger.jsonl")
    return [(entry.message_type, entry.decision) for entry in ledger.entries()]


# ------------------------------------------------------------------ the decision


def test_an_approved_bundle_runs_the_installed_app_not_the_bundles_code(
    context: Context,
) -> None:
    # Prepare: the site approved the rogue bundle (say, by mistake)
    approve(
        state_dir(context) / APPROVALS_FILE,
        bundle_sha256(ROGUE_BUNDLE),
        source="sha256",
    )

    # Execute
    reply = handle(hello_task(context, ROGUE_BUNDLE), site_app)

    # Assert: the installed guard ran (it adds the applied policy and ledgers)
    assert not reply.has_error(), reason_of(reply)
    settings = reply.content.config_records[protocol.REPLY_KEY]
    assert settings["site"] == SITE
    assert any(key.startswith(protocol.APPLIED_POLICY_PREFIX) for key in settings)
    assert ledger_entries(context) == [(protocol.HELLO, "released")]


def test_a_bundle_not_approved_is_refused_ledgered_and_kept_for_review(
    context: Context,
) -> None:
    # Execute
    reply = handle(hello_task(context, ROGUE_BUNDLE), site_app)

    # Assert: the refusal names the hash and the command, and no site path
    digest = bundle_sha256(ROGUE_BUNDLE)
    reason = reason_of(reply)
    assert reply.has_error()
    assert reply.error.code == protocol.EGRESS_BLOCKED_CODE
    assert reply.metadata.reply_to_message_id == MESSAGE_ID
    assert f"bundle SHA-256 {digest} is not approved" in reason
    assert f"sitebridge site approve --state-dir <state-dir> {digest}" in reason
    assert str(state_dir(context)) not in reason
    # ... is ledgered like every reply, digested as it left ...
    ledger = Ledger(state_dir(context) / "ledger.jsonl")
    (entry,) = ledger.entries()
    assert entry.decision == f"blocked: {BUNDLE_NOT_APPROVED}"
    assert entry.message_type == protocol.HELLO
    assert entry.sender == SITE
    unanchored, anchor = protocol.LedgerAnchor.split_reason(reason)
    assert anchor == protocol.LedgerAnchor(0, entry.entry_hash)
    assert entry.egress == measure_error(unanchored)
    assert verify_ledger(ledger.path).ok
    # ... and the bundle is kept for the site's review
    kept = refused_bundle_path(state_dir(context), digest)
    assert kept.read_bytes() == ROGUE_BUNDLE


def test_a_broken_approvals_file_approves_nothing(
    context: Context, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    approvals = state_dir(context) / APPROVALS_FILE
    approvals.parent.mkdir(parents=True)
    approvals.write_text("{broken")

    # Execute
    with caplog.at_level(logging.WARNING, logger="sitebridge.serve"):
        reply = handle(hello_task(context, ROGUE_BUNDLE), site_app)

    # Assert: refused; the site's log says why (the reply does not)
    assert reply.error.code == protocol.EGRESS_BLOCKED_CODE
    assert "is not approved" in reason_of(reply)
    assert f"the approvals file is unusable: {approvals}: not JSON" in caplog.text
    assert ledger_entries(context) == [
        (protocol.HELLO, f"blocked: {BUNDLE_NOT_APPROVED}")
    ]


def test_the_sites_log_level_wins_over_the_run_configs(
    context: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: sitebridge-serve --log-level warning; the run asks for debug
    configure_logging(
        log_level_of(build_parser().parse_args(["--log-level", "warning"]))
    )
    approve(
        state_dir(context) / APPROVALS_FILE,
        bundle_sha256(ROGUE_BUNDLE),
        source="sha256",
    )
    loud = Context(
        run_id=1,
        node_id=7,
        node_config=dict(context.node_config),
        state=RecordDict(),
        run_config={**context.run_config, "output.log-level": "debug"},
    )

    # Execute
    reply = handle(hello_task(loud, ROGUE_BUNDLE), site_app)

    # Assert: answered, and the INFO line of the decision is not shown
    assert not reply.has_error()
    assert logging.getLogger("sitebridge").level == logging.WARNING
    assert capsys.readouterr().out == ""


def test_the_bundle_a_site_builds_from_reviewed_files_hashes_as_flwr_run_sends_it(
    tmp_path: Path,
) -> None:
    # Prepare: a small Flower app, and a copy of it elsewhere
    app = tmp_path / "release"
    (app / "clients").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "pyproject.toml", app / "pyproject.toml")
    (app / "clients" / "guard.py").write_text("GUARD = True\n")
    copy = tmp_path / "copy" / "release"
    shutil.copytree(app, copy)

    # Execute: `flwr build` and `flwr run .` both call build_fab_from_disk
    first, again, copied = (build_fab_from_disk(path) for path in (app, app, copy))
    (copy / "clients" / "guard.py").write_text("GUARD = False\n")
    edited = build_fab_from_disk(copy)

    # Assert: the same files give the same bytes; any edit another hash
    assert bundle_sha256(first) == bundle_sha256(again) == bundle_sha256(copied)
    assert bundle_sha256(edited) != bundle_sha256(first)


# ---------------------------------------------------------------------- the loop


@dataclasses.dataclass
class FakeChannel:
    """One task as the fake SuperNode hands it out; records what the loop does."""

    task: TaskInput
    pushed: list[Message] = dataclasses.field(default_factory=list)
    finished: list[tuple[Context | None, bool, str]] = dataclasses.field(
        default_factory=list
    )
    closed: bool = False

    def start_heartbeat(self) -> None:
        pass

    def pull(self) -> TaskInput:
        return self.task

    def push_reply(self, reply: Message, context: Context) -> None:
        assert context is self.task.context
        self.pushed.append(reply)

    def finish(self, context: Context | None, *, completed: bool, details: str) -> None:
        self.finished.append((context, completed, details))

    def close(self) -> None:
        self.closed = True


class FakeRuntime:
    """Hands out the given channels, then stops the server (or runs ``when_idle``)."""

    def __init__(
        self,
        channels: list[FakeChannel],
        *,
        when_idle: Callable[[], None] | None = None,
        failures: int = 0,
    ) -> None:
        self.channels = list(channels)
        self.when_idle = when_idle
        self.failures = failures
        self.server: Server | None = None

    def acquire(self) -> str | None:
        if self.failures:
            self.failures -= 1
            raise httpx.ConnectError("connection refused")
        if self.channels:
            return str(len(self.channels))
        if self.when_idle is not None:
            self.when_idle()
        elif self.server is not None:
            self.server.stopping.set()
        return None

    def open_task(self, token: str) -> FakeChannel:
        return self.channels.pop(0)

    def close(self) -> None:
        pass


def serve(runtime: FakeRuntime, app: Callable[[Message, Context], Message]) -> Server:
    server = Server(runtime, app, poll_s=0.01)
    runtime.server = server
    server.serve()
    return server


@pytest.fixture
def sigterm_handled_by() -> Iterator[Callable[[Server], None]]:
    """Install a Server's SIGTERM handler for one test; restore the old one after."""
    previous = signal.getsignal(signal.SIGTERM)

    def install(server: Server) -> None:
        signal.signal(signal.SIGTERM, server.request_stop)

    yield install
    signal.signal(signal.SIGTERM, previous)


def test_the_loop_answers_each_task_and_goes_on_after_a_failure(
    context: Context, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: three tasks of an approved bundle; the app fails on the first and
    # keeps node state on the others (as UG-MCL keeps its teacher)
    fab = bundle("GUARD = True\n")
    approve(state_dir(context) / APPROVALS_FILE, bundle_sha256(fab), source="sha256")
    channels = [FakeChannel(hello_task(context, fab, f"m{i}")) for i in range(3)]
    calls = []

    def app(message: Message, node: Context) -> Message:
        calls.append(message.metadata.message_id)
        if len(calls) == 1:
            raise RuntimeError(f"cannot read {state_dir(context)}/secret.nii.gz")
        node.state["seen"] = ConfigRecord({"count": len(calls)})
        return site_app(message, node)

    # Execute
    with caplog.at_level(logging.ERROR, logger="sitebridge.serve"):
        server = serve(FakeRuntime(channels), app)

    # Assert: every task answered and ended, one at a time, in order
    assert calls == ["m0", "m1", "m2"]
    assert server.tasks_served == 3
    failed, *served = channels
    (error_reply,) = failed.pushed
    assert error_reply.error.code == protocol.SITE_ERROR_CODE
    assert "failed on this message (RuntimeError)" in reason_of(error_reply)
    assert "secret.nii.gz" not in reason_of(error_reply)  # that stays in the log
    assert "secret.nii.gz" in caplog.text
    assert failed.finished[0][1] is False
    for channel in served:
        (reply,) = channel.pushed
        assert not reply.has_error(), reason_of(reply)
        finished_context, completed, _ = channel.finished[0]
        assert completed
        assert finished_context is context
    assert context.state["seen"]["count"] == 3  # type: ignore[index]
    assert all(channel.closed for channel in channels)
    # The error reply left the site, so it is ledgered too (as an error), and
    # anchored like every reply.
    assert ledger_entries(context) == [
        (protocol.HELLO, "error"),
        (protocol.HELLO, "released"),
        (protocol.HELLO, "released"),
    ]
    first = Ledger(state_dir(context) / "ledger.jsonl").entries()[0]
    unanchored, anchor = protocol.LedgerAnchor.split_reason(reason_of(error_reply))
    assert anchor == protocol.LedgerAnchor(0, first.entry_hash)
    assert first.egress == measure_error(unanchored)


def test_sigterm_during_a_task_answers_it_and_stops(
    context: Context, sigterm_handled_by: Callable[[Server], None]
) -> None:
    # Prepare: the app is interrupted by SIGTERM; a second task waits
    fab = bundle("GUARD = True\n")
    approve(state_dir(context) / APPROVALS_FILE, bundle_sha256(fab), source="sha256")
    interrupted = FakeChannel(hello_task(context, fab, "m0"))
    waiting = FakeChannel(hello_task(context, fab, "m1"))

    def app(message: Message, node: Context) -> Message:
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the task")

    runtime = FakeRuntime([interrupted, waiting])
    server = Server(runtime, app, poll_s=0.01)
    sigterm_handled_by(server)

    # Execute
    server.serve()

    # Assert: the interrupted task got an error reply and ended; nothing else ran
    (reply,) = interrupted.pushed
    assert "was stopped during this message" in reason_of(reply)
    assert interrupted.finished[0][1] is False
    assert waiting.pushed == []
    assert runtime.channels == [waiting]
    assert server.stopping.is_set()


def test_sigterm_when_idle_stops_the_loop(
    sigterm_handled_by: Callable[[Server], None],
) -> None:
    # Prepare: the SIGTERM arrives while the loop looks for a task
    runtime = FakeRuntime([], when_idle=lambda: signal.raise_signal(signal.SIGTERM))
    server = Server(runtime, site_app, poll_s=0.01)
    sigterm_handled_by(server)

    # Execute
    server.serve()

    # Assert
    assert server.stopping.is_set()
    assert server.tasks_served == 0


def test_an_unreachable_supernode_is_waited_for_and_said_once(
    context: Context, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the Runtime API refuses three looks, then hands out a task
    fab = bundle("GUARD = True\n")
    channel = FakeChannel(hello_task(context, fab))

    # Execute
    with caplog.at_level(logging.INFO, logger="sitebridge.serve"):
        serve(FakeRuntime([channel], failures=3), site_app)

    # Assert: one warning for the outage, one note when it ended; the task then ran
    assert caplog.text.count("does not answer") == 1
    assert "answers again" in caplog.text
    assert channel.pushed[0].error.code == protocol.EGRESS_BLOCKED_CODE


# ------------------------------------------------------------------- pulling a task


class FakeRuntimeClient:
    """The SuperNode's Runtime API for one task, as protobuf answers.

    Its message's objects become available after ``unavailable`` pulls of each.
    """

    def __init__(self, task: TaskInput, *, unavailable: int) -> None:
        self.task = task
        self.unavailable = unavailable
        message = task.message
        message.metadata.__dict__["_message_id"] = message.object_id
        self.tree = get_object_tree(message)
        self.objects = {
            object_id: obj.deflate()
            for object_id, obj in get_all_nested_objects(message).items()
        }
        self.tries: dict[str, int] = {}

    def PullTaskInput(self, _request: object) -> PullTaskInputResponse:  # noqa: N802
        fab = Fab(bundle_sha256(self.task.fab_content), self.task.fab_content, {})
        return PullTaskInputResponse(
            context=context_to_proto(self.task.context),
            run=run_to_proto(Run.create_empty(self.task.run_id)),
            fab=fab_to_proto(fab),
            task_id=1,
        )

    def PullMessages(self, _request: object) -> PullAppMessagesResponse:  # noqa: N802
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(self.task.message)],
            message_object_trees=[self.tree],
        )

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802
        tries = self.tries[request.object_id] = self.tries.get(request.object_id, 0) + 1
        if tries <= self.unavailable:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(
            object_found=True,
            object_available=True,
            object_content=self.objects[request.object_id],
        )

    def ConfirmMessageReceived(  # noqa: N802
        self, _request: object
    ) -> ConfirmMessageReceivedResponse:
        return ConfirmMessageReceivedResponse()

    def close(self) -> None:
        pass


def channel_with(client: FakeRuntimeClient, newer_task: bool) -> TaskChannel:
    channel = TaskChannel("127.0.0.1:1", "token", newer_task=lambda: newer_task)
    channel._client = client  # type: ignore[assignment]
    return channel


def test_a_pull_waits_for_content_that_is_still_arriving(context: Context) -> None:
    # Prepare: the content arrives on the second look; no newer task is pending
    task = hello_task(context, bundle("GUARD = True\n"))
    client = FakeRuntimeClient(task, unavailable=1)

    # Execute
    pulled = channel_with(client, newer_task=False).pull()

    # Assert
    assert pulled.message.metadata.message_type == protocol.HELLO
    assert pulled.fab_content == task.fab_content
    assert pulled.context.node_config == context.node_config
    assert max(client.tries.values()) == 2


def test_a_pull_gives_up_a_message_the_supernode_abandoned(context: Context) -> None:
    # Prepare: the content never arrives, and a newer task is pending (the
    # SuperNode moved on after the run was stopped while this message arrived)
    client = FakeRuntimeClient(
        hello_task(context, bundle("GUARD = True\n")), unavailable=10**9
    )

    # Execute / Assert: given up at the first look, not after Flower's two hours
    with pytest.raises(TaskAbandonedError, match="the SuperNode abandoned this"):
        channel_with(client, newer_task=True).pull()
    assert max(client.tries.values()) == 1


class AbandonedChannel(FakeChannel):
    """A task whose message the SuperNode never delivers."""

    def pull(self) -> TaskInput:
        raise TaskAbandonedError("the SuperNode abandoned this message")


def test_the_loop_skips_an_abandoned_task_without_a_reply(
    context: Context, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the first task's pull says it was abandoned; the second is served
    fab = bundle("GUARD = True\n")
    abandoned = AbandonedChannel(hello_task(context, fab, "m0"))
    served = FakeChannel(hello_task(context, fab, "m1"))

    # Execute
    with caplog.at_level(logging.WARNING, logger="sitebridge.serve"):
        serve(FakeRuntime([abandoned, served]), site_app)

    # Assert: no reply for the abandoned task (its run is over), and it ended
    assert abandoned.pushed == []
    assert abandoned.finished == [(None, False, "the SuperNode abandoned this message")]
    assert "task skipped: the SuperNode abandoned this message" in caplog.text
    assert len(served.pushed) == 1
