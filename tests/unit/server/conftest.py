"""Fixtures of the coordinator tests; the ``pipeline`` marker for whole-run tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(scope="module", autouse=True)
def task_identity() -> Iterator[None]:
    """What a ServerApp process has set before its main runs (Message needs it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# Module fixtures that run every phase once through the real ClientApp.
WHOLE_RUN_FIXTURES = frozenset({"full_run", "uninterrupted"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``pipeline`` every test that reads a whole run (before -m selects)."""
    for item in items:
        if WHOLE_RUN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pipeline)
