"""``sitebridge-serve``: the site's own ClientApp process, beside its SuperNode.

In a deployment the coordinator submits an app bundle (a zip of ``clients/``,
``core/``, ``server/``, ...) with ``flwr run``; a SuperNode in Flower's default
``subprocess`` isolation installs that bundle and imports *its* ``clients.app``, so a
coordinator who edits ``clients/guard.py`` before ``flwr run`` switches off the egress
guard, the policy, the ledger and the accountant at every site. The site therefore
starts its SuperNode with ``--isolation process`` (no ClientApp of its own) and runs
this process next to it (``deploy/start-supernode.sh`` starts both). For each
ClientApp task of the SuperNode, one at a time, it:

1. pulls the message, the node's context and the run's bundle (``clients/runtime_api``);
2. hashes the bundle itself (SHA-256 of its bytes, never the hash the coordinator's
   SuperLink states) and looks it up in the site's approvals
   (``<state-dir>/approved-bundles.json``, ``sitebridge site approve``);
3. approved: runs the SiteBridge ClientApp *installed at the site*
   (``clients.app.app``, imported once when this process starts; nothing of the bundle
   is unpacked, imported or run) on the message and context, exactly as Flower's
   ``flwr-clientapp`` would, and pushes the reply and the context (the node's state,
   e.g. UG-MCL's teacher, lives on between messages);
4. not approved: replies with an error (``EGRESS_BLOCKED_CODE``) naming the bundle's
   SHA-256 and the command that approves it, keeps a copy of the bundle under
   ``<state-dir>/bundles/`` for review, and appends the refusal to the site's ledger
   (``blocked: bundle-not-approved``), like every other reply.

An exception in one task becomes an error reply for that task (ledgered; the reason
names no path, the site's log has the details) and the loop goes on. SIGTERM or
SIGINT stops the process: idle, at once; during a task, the task is interrupted,
answered with an error saying the site stopped, and ended. The state dir is the
same one the ClientApp uses: ``node_config["state-dir"]``, else
``<site-dir>/.sitebridge``. Its lines and the ClientApp's go to stdout in SiteBridge's
one format (``core/logs.py``) at the site's ``--log-level``, which no run config
overrides.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Final, Protocol

import httpx
from flwr.app import Context, Error, Message

from clients.runtime_api import (
    RuntimeApi,
    RuntimeApiError,
    TaskAbandonedError,
    TaskInput,
)
from clients.site import DEFAULT_STATE_DIR, LEDGER_FILE, SITE_DIR_KEY, STATE_DIR_KEY
from core import protocol
from core.logs import add_log_level_option, configure_logging, get_logger, log_level_of
from core.privacy.approvals import (
    APPROVALS_FILE,
    ApprovalError,
    bundle_sha256,
    is_approved,
    keep_refused_bundle,
)
from core.privacy.egress import measure_error
from core.privacy.ledger import BLOCKED_PREFIX, EGRESS, ERROR, Ledger

LOGGER = get_logger("serve")

BUNDLE_NOT_APPROVED: Final = "bundle-not-approved"  # the rule in the site's ledger
APPROVE_COMMAND: Final = "sitebridge site approve --state-dir <state-dir> {sha256}"
DEFAULT_POLL_S: Final = 0.5
_MAX_IDLE_BACKOFF_S: Final = 10.0

App = Callable[[Message, Context], Message]


class StopServing(BaseException):
    """SIGTERM/SIGINT arrived during a task (nothing in a handler may catch it)."""


class SiteConfigError(ValueError):
    """The SuperNode's node config names no site folder."""


def site_state(context: Context) -> tuple[str, Path]:
    """The site's name (its folder's name, as the ClientApp says) and state dir.

    Raises:
        SiteConfigError: the SuperNode was started without ``site-dir``.
    """
    node_config = context.node_config
    if SITE_DIR_KEY not in node_config:
        raise SiteConfigError(
            f"the SuperNode's node config has no {SITE_DIR_KEY!r}: start it with "
            "deploy/start-supernode.sh --site-dir DIR"
        )
    site_dir = Path(str(node_config[SITE_DIR_KEY])).expanduser()
    if STATE_DIR_KEY in node_config:
        return site_dir.name, Path(str(node_config[STATE_DIR_KEY])).expanduser()
    return site_dir.name, site_dir / DEFAULT_STATE_DIR


def refusal_reason(sha256: str) -> str:
    """What a coordinator reads when the site refuses its bundle (no site path)."""
    return (
        f"this site runs only app bundles its IT approved; bundle SHA-256 {sha256} "
        f"is not approved. Site IT: review the copy kept at "
        f"<state-dir>/bundles/{sha256}.fab, then approve it with "
        f"`{APPROVE_COMMAND.format(sha256=sha256)}`"
    )


def _ledger_reply(
    state_dir: Path,
    site: str,
    message: Message,
    reason: str,
    *,
    decision: str,
) -> protocol.LedgerAnchor:
    """Append the error reply that leaves for ``message`` to the site's ledger.

    Returns:
        The entry's anchor, which the reply's reason then carries (as every reply's
        does), so the coordinator's ledger can vouch for this one too.
    """
    entry = Ledger(state_dir / LEDGER_FILE).append(
        run_id=str(message.metadata.run_id),
        message_type=message.metadata.message_type,
        sender=site,
        direction=EGRESS,
        egress=measure_error(reason),
        decision=decision,
        policy={},
        epsilon_spent=0.0,
        epsilon_total=0.0,
    )
    return protocol.LedgerAnchor(entry.index, entry.entry_hash)


def refuse(task: TaskInput, sha256: str, *, why: str = "") -> Message:
    """The ledgered refusal of a bundle the site did not approve.

    Args:
        task: the task whose bundle is refused.
        sha256: the bundle's SHA-256.
        why: an extra sentence for the site's log (never sent).
    """
    site, state_dir = site_state(task.context)
    try:
        _kept, where = keep_refused_bundle(state_dir, task.fab_content)
    except OSError as error:  # the copy is for review; the refusal stands without
        where = f"not kept: {error}"
    reason = refusal_reason(sha256)
    anchor = _ledger_reply(
        state_dir,
        site,
        task.message,
        reason,
        decision=BLOCKED_PREFIX + BUNDLE_NOT_APPROVED,
    )
    LOGGER.warning(
        "run %s: %s refused: bundle %s is not approved in %s (%s)%s; approve it "
        "with: sitebridge site approve --state-dir %s %s",
        task.run_id,
        task.message.metadata.message_type,
        sha256,
        state_dir / APPROVALS_FILE,
        where,
        f"; {why}" if why else "",
        state_dir,
        sha256,
    )
    return Message(
        Error(code=protocol.EGRESS_BLOCKED_CODE, reason=anchor.anchor_reason(reason)),
        reply_to=task.message,
    )


def handle(task: TaskInput, app: App) -> Message:
    """Answer one task: the installed app's reply when its bundle is approved.

    Raises:
        SiteConfigError: the node config names no site (nothing can be ledgered).
    """
    site, state_dir = site_state(task.context)
    sha256 = bundle_sha256(task.fab_content)
    approvals = state_dir / APPROVALS_FILE
    try:
        approved = is_approved(approvals, sha256)
    except ApprovalError as error:
        # Fail closed: a broken approvals file approves nothing.
        return refuse(task, sha256, why=f"the approvals file is unusable: {error}")
    if not approved:
        return refuse(task, sha256)
    LOGGER.info(
        "run %s: %s for site %s (bundle %s approved)",
        task.run_id,
        task.message.metadata.message_type,
        site,
        sha256[:12],
    )
    return app(task.message, task.context)


def failure_reply(task: TaskInput, reason: str) -> Message:
    """An error reply for a task this process could not answer; ledgered if it can."""
    try:
        site, state_dir = site_state(task.context)
        anchor = _ledger_reply(state_dir, site, task.message, reason, decision=ERROR)
        reason = anchor.anchor_reason(reason)
    except (SiteConfigError, OSError, ValueError) as error:
        LOGGER.error("the error reply could not be ledgered: %s", error)
    return Message(
        Error(code=protocol.SITE_ERROR_CODE, reason=reason), reply_to=task.message
    )


class Channel(Protocol):
    """One claimed task (``TaskChannel``, or a test's fake)."""

    def start_heartbeat(self) -> None:
        """Keep the task's claim alive while it runs."""
        ...

    def pull(self) -> TaskInput:
        """The task's message, context and bundle."""
        ...

    def push_reply(self, reply: Message, context: Context) -> None:
        """Deliver the reply."""
        ...

    def finish(self, context: Context | None, *, completed: bool, details: str) -> None:
        """End the task, keeping the node's context."""
        ...

    def close(self) -> None:
        """Release the channel."""
        ...


class Runtime(Protocol):
    """What the serve loop needs of the SuperNode (``RuntimeApi``, or a test's fake)."""

    def acquire(self) -> str | None:
        """The token of a claimed task, or None when there is none."""
        ...

    def open_task(self, token: str) -> Channel:
        """The channel of the claimed task."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


class Server:
    """Acquires the SuperNode's ClientApp tasks one at a time and answers each.

    Args:
        runtime: the SuperNode's Runtime API.
        app: the installed ClientApp (``clients.app.app``).
        poll_s: how long to wait between two looks for a task when idle.
    """

    def __init__(self, runtime: Runtime, app: App, *, poll_s: float = DEFAULT_POLL_S):
        self.runtime = runtime
        self.app = app
        self.poll_s = poll_s
        self.stopping = threading.Event()
        self.tasks_served = 0
        self._in_task = False

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        """Signal handler: stop when idle; interrupt the running task (once)."""
        already = self.stopping.is_set()
        self.stopping.set()
        LOGGER.info("%s received: stopping", signal.Signals(signum).name)
        if self._in_task and not already:
            raise StopServing(signal.Signals(signum).name)

    def serve(self, *, max_tasks: int | None = None) -> None:
        """Serve tasks until stopped (or ``max_tasks`` were served)."""
        backoff = self.poll_s
        unreachable = False
        while not self.stopping.is_set():
            if max_tasks is not None and self.tasks_served >= max_tasks:
                return
            try:
                token = self.runtime.acquire()
            except httpx.HTTPError as error:
                if not unreachable:
                    LOGGER.warning(
                        "the SuperNode's Runtime API does not answer (%s); waiting "
                        "for it",
                        error,
                    )
                unreachable = True
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, _MAX_IDLE_BACKOFF_S)
                continue
            if unreachable:
                LOGGER.info("the SuperNode's Runtime API answers again")
            unreachable, backoff = False, self.poll_s
            if token is None:
                self.stopping.wait(self.poll_s)
                continue
            self.serve_task(self.runtime.open_task(token))

    def serve_task(self, channel: Channel) -> None:
        """Pull, answer and end one claimed task; never raises (but StopServing)."""
        task: TaskInput | None = None
        reply: Message | None = None
        completed, details = False, "the site's app failed before the task's input"
        self._in_task = True
        try:
            channel.start_heartbeat()
            task = channel.pull()
            if self.stopping.is_set():
                raise StopServing("stopping")
            reply = handle(task, self.app)
            completed, details = True, ""
        except StopServing:
            details = "the site's SiteBridge app was stopped during this message"
            if task is not None:
                reply = failure_reply(task, details)
        except TaskAbandonedError as error:
            # Nobody waits for a reply: the run is over. No reply, or the
            # SuperNode would hold it for its next message.
            LOGGER.warning("task skipped: %s", error)
            details = str(error)
        except Exception as error:  # any failure answers this task; the loop goes on
            LOGGER.exception("task failed")
            details = (
                f"the site's SiteBridge app failed on this message "
                f"({type(error).__name__}); the site's log has the details"
            )
            if task is not None:
                reply = failure_reply(task, details)
        finally:
            self._in_task = False
        self.tasks_served += 1
        try:
            if reply is not None and task is not None:
                channel.push_reply(reply, task.context)
        except (RuntimeApiError, ValueError) as error:
            LOGGER.error("the reply was not delivered to the SuperNode: %s", error)
            completed, details = False, "the reply could not be pushed"
        finally:
            channel.finish(
                None if task is None else task.context,
                completed=completed,
                details=details,
            )
            channel.close()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``sitebridge-serve``."""
    parser = argparse.ArgumentParser(
        prog="sitebridge-serve",
        description="Serve a SuperNode started with --isolation process: answer each "
        "task with the SiteBridge installed here, for app bundles this site approved.",
    )
    parser.add_argument(
        "--runtime-api",
        default="127.0.0.1:9094",
        help="host:port of the SuperNode's Runtime API (its --host/--port; loopback)",
    )
    parser.add_argument(
        "--superexec-auth-secret-file",
        type=Path,
        help="the shared secret file the SuperNode was started with, if any",
    )
    parser.add_argument(
        "--poll-interval-s",
        type=float,
        default=DEFAULT_POLL_S,
        help=f"seconds between looks for a task when idle (default {DEFAULT_POLL_S})",
    )
    add_log_level_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sitebridge-serve`` console script."""
    args = build_parser().parse_args(argv)
    # The site's own level: the ClientApp run here keeps it, whatever a run config
    # says (clients.app.site_logging).
    configure_logging(log_level_of(args))
    secret = None
    if args.superexec_auth_secret_file is not None:
        try:
            secret = args.superexec_auth_secret_file.read_bytes()
        except OSError as error:
            print(
                f"sitebridge-serve: error: {args.superexec_auth_secret_file}: {error}",
                file=sys.stderr,
            )
            return 2
        if not secret:
            print(
                f"sitebridge-serve: error: {args.superexec_auth_secret_file} is empty",
                file=sys.stderr,
            )
            return 2
    if not args.poll_interval_s > 0:
        print("sitebridge-serve: error: --poll-interval-s must be > 0", file=sys.stderr)
        return 2
    # Imported once, here: the app, the guard and torch load before the first task.
    from clients.app import app

    runtime = RuntimeApi(args.runtime_api, secret=secret)
    server = Server(runtime, app, poll_s=args.poll_interval_s)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, server.request_stop)
    LOGGER.info(
        "serving the SuperNode at %s with the installed SiteBridge (%s)",
        args.runtime_api,
        Path(__file__).resolve().parent.parent,
    )
    try:
        server.serve()
    finally:
        runtime.close()
    LOGGER.info("stopped after %d task(s)", server.tasks_served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
