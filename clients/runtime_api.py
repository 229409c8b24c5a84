"""The SuperNode's Runtime API as the site's own ClientApp process uses it.

The only module that touches Flower internals below its public app API. A SuperNode
started with ``--isolation process`` starts no ``flower-superexec``: an external process
acquires each ClientApp task from the SuperNode's Runtime API (protobuf over plain HTTP
on loopback) and runs it. ``clients/serve.py`` is that process; this module is its
wire, written after Flower 1.39's own ``flower-superexec`` loop
(``flwr/supercore/superexec/run_superexec.py``) and ``flwr-clientapp``
(``flwr/supernode/runtime/run_clientapp.py``). It relies on these Flower 1.39
functions and classes (Flower is pinned to 1.39.x; re-check them on an upgrade):

- ``flwr.supercore.runtime.RuntimeHttpClient`` (``AcquireTask``, ``PullTaskInput``,
  ``PushTaskOutput``, ``SendTaskHeartbeat`` and, through the functions below,
  ``PullMessages``, ``PushMessages``, ``PullObject``, ``PushObject``,
  ``ConfirmMessageReceived``);
- ``flwr.supercore.interceptors``: ``RuntimeVersionHttpInterceptor``,
  ``RuntimeTokenHttpInterceptor``, ``SuperExecAuthHttpInterceptor``;
- ``flwr.supernode.runtime.run_clientapp.push_message``, and the steps of its
  ``pull_task_input`` (re-done here, see below): ``flwr.common.serde``'s
  ``context_from_proto``, ``run_from_proto``, ``fab_from_proto`` and
  ``context_to_proto``, ``flwr.supercore.inflatable``'s
  ``pull_and_inflate_object_from_tree``, ``make_pull_object_fn_protobuf``,
  ``make_confirm_message_received_fn_protobuf``, ``ObjectUnavailableError`` and
  ``ObjectPullError``, and ``flwr.supercore.task_identity.TaskIdentity``;
- ``flwr.supercore.heartbeat.HeartbeatSender`` and ``flwr.supercore.constant.TaskType``.

Flower's own helpers are not used where they act on the whole process:
``make_simple_http_retry_invoker`` sends SIGINT to the process on an HTTP 401 and
``make_task_heartbeat_fn_http`` on a refused heartbeat, right for a process per task,
wrong for one that serves task after task. Retries here are bounded and per call.

``pull_task_input`` is re-done for one case a process per task never notices: when a
run is stopped while the SuperNode receives one of its messages, Flower 1.39's
SuperNode leaves that message's task pending with its content never stored
(``_pull_and_store_message`` lets ``RunNotRunningException`` pass), and the task's
puller waits up to two hours for it. One process serving task after task would stop
serving the site. The SuperNode receives one message at a time, so a task still
waiting for its content while a newer task is pending was abandoned: its pull gives up
(:class:`TaskAbandonedError`), and the task ends without a reply (the run is over).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

import httpx
from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    fab_from_proto,
    run_from_proto,
)
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullPendingTasksRequest,
    PullTaskInputRequest,
    PushTaskOutputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message

from core.logs import get_logger

LOGGER = get_logger("serve")

# Flower's sub-statuses of a finished task (flwr.common.constant.SubStatus).
COMPLETED: Final = "completed"
FAILED: Final = "failed"
# Runtime API methods the SuperNode authenticates with the SuperExec secret.
_AUTHENTICATED_METHODS: Final = frozenset(
    {
        "/flwr.proto.Runtime/AcquireTask",
        "/flwr.proto.Runtime/PullPendingTasks",
        "/flwr.proto.Runtime/ClaimTask",
    }
)
# Loopback calls: a SuperNode that is restarting answers within seconds or not at all.
# Only idempotent calls are retried (finishing a task); pulling and pushing are not.
_CALL_TRIES: Final = 5
_FIRST_RETRY_S: Final = 0.5

T = TypeVar("T")


class RuntimeApiError(RuntimeError):
    """A Runtime API call failed after its retries."""


class TaskAbandonedError(RuntimeApiError):
    """The SuperNode will never deliver this task's message (its run was stopped)."""


_ABANDONED: Final = "the SuperNode abandoned this message"


@dataclasses.dataclass(frozen=True, slots=True)
class TaskInput:
    """What a ClientApp task gets: the message, the node's context, and the bundle."""

    message: Message
    context: Context
    fab_content: bytes
    run_id: int


def _with_retries(call: Callable[[], T], what: str, *, tries: int = _CALL_TRIES) -> T:
    """``call()``, retried on transport errors and 5xx answers with backoff."""
    delay = _FIRST_RETRY_S
    for attempt in range(1, tries + 1):
        try:
            return call()
        except httpx.HTTPStatusError as error:
            if error.response.status_code < 500 or attempt == tries:
                raise RuntimeApiError(
                    f"{what}: HTTP {error.response.status_code} from the SuperNode"
                ) from error
            reason = f"HTTP {error.response.status_code}"
        except httpx.TransportError as error:
            if attempt == tries:
                raise RuntimeApiError(
                    f"{what}: the SuperNode's Runtime API did not answer ({error})"
                ) from error
            reason = str(error) or type(error).__name__
        LOGGER.warning(
            "%s failed (%s); retry %d in %.1f s", what, reason, attempt, delay
        )
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # the loop returns or raises


class RuntimeApi:
    """The SuperNode's Runtime API: acquire ClientApp tasks.

    Args:
        address: ``host:port`` of the SuperNode's Runtime API (plain HTTP, loopback).
        secret: the SuperExec shared secret the SuperNode was started with
            (``--superexec-auth-secret-file``), or None when it runs without one.
    """

    def __init__(self, address: str, *, secret: bytes | None = None) -> None:
        self.address = address
        interceptors: list[object] = [
            RuntimeVersionHttpInterceptor(component_name="SuperExec")
        ]
        if secret is not None:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods=_AUTHENTICATED_METHODS
                )
            )
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,
            root_certificates=None,
            interceptors=interceptors,  # type: ignore[arg-type]
            retry_invoker=None,
        )

    def acquire(self) -> str | None:
        """Claim the oldest pending ClientApp task; its token, or None when idle.

        Raises:
            httpx.HTTPError: the SuperNode did not answer (the caller waits and
                tries again: the SuperNode may be starting or restarting).
        """
        response = self._client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        )
        if response.HasField("task") and response.token:
            return str(response.token)
        return None

    def open_task(self, token: str) -> TaskChannel:
        """The channel of one claimed task (its token authenticates every call)."""
        return TaskChannel(self.address, token, newer_task=self.has_pending_task)

    def has_pending_task(self) -> bool:
        """Whether a task waits to be acquired (False when the SuperNode is silent)."""
        try:
            response = self._client.PullPendingTasks(PullPendingTasksRequest())
        except httpx.HTTPError:
            return False
        return len(response.tasks) > 0

    def close(self) -> None:
        """Close the HTTP connection."""
        self._client.close()


class TaskChannel:
    """One claimed ClientApp task: pull its input, push its reply and its end.

    A heartbeat keeps the task's claim alive while it runs (the SuperNode replies
    with an error on the task's behalf when the claim expires).
    """

    def __init__(
        self, address: str, token: str, *, newer_task: Callable[[], bool]
    ) -> None:
        self._newer_task = newer_task
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=None,
        )
        self._heartbeat: HeartbeatSender | None = None
        self.cancelled = threading.Event()  # the SuperNode no longer runs the task

    def start_heartbeat(self) -> None:
        """Send the task's heartbeat in the background until :meth:`close`."""
        self._heartbeat = HeartbeatSender(self._beat)
        self._heartbeat.start()

    def _beat(self) -> bool:
        """One heartbeat: True when it was delivered (False: retried with backoff)."""
        try:
            response = self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as error:
            if error.response.status_code >= 500:
                return False
            response = None
        if response is None or not response.success:
            # The run was stopped or the claim expired: nothing to retry. The task
            # runs to its end (a training can't be interrupted safely), and its
            # push is then refused.
            if not self.cancelled.is_set():
                LOGGER.warning("the SuperNode no longer runs this task (heartbeat)")
            self.cancelled.set()
        return True

    def pull(self) -> TaskInput:
        """The task's message, the node's context, its run and bundle.

        As Flower 1.39's ``pull_task_input``, but the wait for the message's content
        ends as soon as the SuperNode has moved on to a newer task.

        Raises:
            TaskAbandonedError: the SuperNode abandoned the message.
            RuntimeApiError: the SuperNode did not hand them over.
        """
        # Not retried: the SuperNode activates the task on the first pull.
        try:
            return _with_retries(self._pull, "pulling the task input", tries=1)
        except ObjectPullError as error:
            if _ABANDONED in str(error):
                raise TaskAbandonedError(
                    f"{_ABANDONED}: its content never arrived and a newer task is "
                    "pending (the run was stopped while the message arrived)"
                ) from error
            raise RuntimeApiError(f"pulling the task input: {error}") from error

    def _pull(self) -> TaskInput:
        response = self._client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = response.task_id
        TaskIdentity.run_id = response.run.run_id
        TaskIdentity.node_id = response.context.node_id
        context = context_from_proto(response.context)
        run = run_from_proto(response.run)
        fab = fab_from_proto(response.fab)
        messages = self._client.PullMessages(PullAppMessagesRequest())
        if not messages.messages_list:
            raise RuntimeApiError("the SuperNode handed over no message")
        node = Node(node_id=context.node_id)
        object_tree = messages.message_object_trees[0]
        pull_object = make_pull_object_fn_protobuf(
            self._client.PullObject, node, context.run_id
        )

        def pull_unless_abandoned(object_id: str) -> bytes:
            try:
                return pull_object(object_id)
            except ObjectUnavailableError:
                if self._newer_task():
                    raise ObjectPullError(object_id, _ABANDONED) from None
                raise

        message = pull_and_inflate_object_from_tree(
            object_tree,
            pull_unless_abandoned,
            make_confirm_message_received_fn_protobuf(
                self._client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
        )
        # The inflated message lacks its own id (its object id), as in Flower.
        message.metadata.__dict__["_message_id"] = object_tree.object_id
        return TaskInput(
            message=message,
            context=context,
            fab_content=bytes(fab.content),
            run_id=int(run.run_id),
        )

    def push_reply(self, reply: Message, context: Context) -> None:
        """Push the reply message (and every object it holds) to the SuperNode.

        Raises:
            RuntimeApiError: the SuperNode refused it or did not answer.
        """
        # Not retried: a second push of the same message would be refused.
        _with_retries(
            lambda: push_message(self._client, reply, context),
            "pushing the reply",
            tries=1,
        )

    def finish(self, context: Context | None, *, completed: bool, details: str) -> None:
        """Tell the SuperNode the task ended, with the node's context to keep.

        The context carries the node's state between messages of a run (e.g.
        UG-MCL's teacher). Never raises: the task is over either way.
        """
        request = PushTaskOutputRequest(
            context=context_to_proto(context) if context is not None else None,
            sub_status=COMPLETED if completed else FAILED,
            details=details,
        )
        try:
            _with_retries(
                lambda: self._client.PushTaskOutput(request), "finishing the task"
            )
        except RuntimeApiError as error:
            LOGGER.error("%s", error)

    def close(self) -> None:
        """Stop the heartbeat and close the HTTP connection."""
        if self._heartbeat is not None and self._heartbeat.is_running:
            self._heartbeat.stop()
        self._client.close()
