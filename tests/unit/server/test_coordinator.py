"""How the coordinator exchanges messages with a Flower grid (server.coordinator)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from server import coordinator
from server.coordinator import exchange


class SlowGrid(Grid):
    """A Flower Grid whose replies appear after a number of pulls each."""

    def __init__(self, pulls_before_reply: dict[str, int]) -> None:
        self.pulls_before_reply = dict(pulls_before_reply)
        self.pulls = 0

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        # The message type's action stands in for the id the SuperLink assigns.
        return [message.metadata.message_type.split(".")[1] for message in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        replies = []
        for message_id in message_ids:
            if self.pulls >= self.pulls_before_reply[message_id]:
                reply = Message(RecordDict(), dst_node_id=1, message_type="query.hello")
                reply.metadata.__dict__["_reply_to_message_id"] = message_id
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("the coordinator polls itself, not at Flower's 3 s")


def message(name: str) -> Message:
    return Message(RecordDict(), dst_node_id=1, message_type=f"query.{name}")


def test_replies_are_pulled_until_every_one_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: no real sleeping; the second reply comes on the fourth pull
    slept: list[float] = []
    monkeypatch.setattr(coordinator.time, "sleep", slept.append)
    grid = SlowGrid({"a": 1, "b": 4})

    # Execute
    replies = exchange(grid, [message("a"), message("b")], timeout=60.0)

    # Assert: both replies; the waits grow from the first interval
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert grid.pulls == 4
    assert slept == pytest.approx([0.05, 0.075, 0.1125])


def test_a_reply_that_never_comes_ends_at_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter(float(second) for second in range(1000))
    monkeypatch.setattr(coordinator.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(coordinator.time, "sleep", lambda _seconds: None)
    grid = SlowGrid({"a": 1, "b": 10_000})

    replies = exchange(grid, [message("a"), message("b")], timeout=5.0)

    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert grid.pulls <= 6
