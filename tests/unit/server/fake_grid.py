"""A stand-in for Flower's Grid that delivers messages to the real ClientApp.

Shared by the coordinator tests: it assigns message ids at push time (as the real grid
does) and hands each message to the real ClientApp with the Context of the node's
site, so the phases exercise both sides of the wire contract without a Flower daemon.
Each grid is one Flower run with a run id of its own, as every ``flwr run`` has: the
sites' per-run query limits count per run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from clients.app import app as client_app
from core.config import ConfigValue

NODES = {11: "A", 12: "B", 13: "C"}  # node id -> site folder
_RUN_IDS = itertools.count(1001)  # one Flower run id per grid


class ServerAppKilled(BaseException):
    """Stands in for the ServerApp process dying (nothing in it may catch this)."""


class FakeGrid:
    """A Grid that delivers each message to the real ClientApp of its node.

    Args:
        contexts: node id -> that node's Context (its ``node_config`` names the site).
        drop: nodes whose messages are swallowed (they never reply).
        kill_at: a message type; sending it "kills the ServerApp" (raises
            :class:`ServerAppKilled` before anything is delivered).
        names: node id -> the name its key was registered under (a deployment's
            grid reports them; a simulation's has none).
    """

    def __init__(
        self,
        contexts: Mapping[int, Context],
        *,
        drop: Iterable[int] = (),
        kill_at: str | None = None,
        names: Mapping[int, str] | None = None,
    ):
        self.contexts = dict(contexts)
        self.drop = set(drop)
        self.kill_at = kill_at
        self.names = dict(names or {})
        self.sent: list[Message] = []
        self._ids = itertools.count(1)
        self.run_id = next(iter(self.contexts.values())).run_id if contexts else 1

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def get_nodes(self) -> list[NodeInfo]:
        return [
            NodeInfo(node_id=node, name=self.names.get(node, ""))
            for node in self.contexts
        ]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        if any(m.metadata.message_type == self.kill_at for m in messages):
            raise ServerAppKilled(self.kill_at)
        replies = []
        for message in messages:
            # The real grid refuses a message that was already pushed.
            assert message.metadata.message_id == ""
            assert message.metadata.reply_to_message_id == ""
            message.metadata.__dict__["_message_id"] = f"msg-{next(self._ids)}"
            # The ServerApp stamps its run's id on every message (here: TaskIdentity).
            message.metadata.__dict__["_run_id"] = self.run_id
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.drop:
                continue
            reply = client_app(message, self.contexts[node])
            reply.metadata.__dict__["_reply_to_message_id"] = (
                message.metadata.message_id
            )
            replies.append(reply)
        return replies

    def sent_of_type(self, message_type: str) -> list[Message]:
        return [m for m in self.sent if m.metadata.message_type == message_type]


def build_grid(
    federation: Path,
    run_config: Mapping[str, ConfigValue],
    nodes: Mapping[int, str] = NODES,
    *,
    drop: Iterable[int] = (),
    kill_at: str | None = None,
    names: Mapping[int, str] | None = None,
) -> FakeGrid:
    run_id = next(_RUN_IDS)
    contexts = {
        node: Context(
            run_id=run_id,
            node_id=node,
            node_config={"site-dir": str(federation / site)},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for node, site in nodes.items()
    }
    return FakeGrid(contexts, drop=drop, kill_at=kill_at, names=names)
