"""Fixtures of the adversarial suite: one tiny federation, sites to attack, tools.

The federation is written once per session (three synthetic sites, two labelled
training and six evaluation cases each, 64 x 64 x 10 volumes) and never written to:
every site under attack keeps its state (ledger, accountant, query book) in a folder
of the test's own, and a site whose data a test changes is a copy. Images are
resized to 16 x 16 (``data.image-size``), the smallest the run config allows, so the
whole folder stays within its time budget on two CPU cores. ``federation`` and
``run_config`` override the module-scoped fixtures of ``tests/conftest.py`` here (one
federation per session; 16 px instead of 32).
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

import clients.app
from core.config import ConfigValue, RunConfig, load_run_config, read_default_run_config
from core.data.synthetic import write_federation
from core.training.job import build_initial_weights
from core.training.networks import Arrays
from tests.conftest import TINY_RUN_CONFIG
from tests.security.attacker import SiteUnderAttack, constant_model
from tests.unit.clients.messages import write_policy

OpenSite = Callable[..., SiteUnderAttack]


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sites A, B and C (read only: tests copy a site before changing it)."""
    folder = tmp_path_factory.mktemp("security") / "federation"
    write_federation(folder, seed=0, num_sites=3, num_train_cases=2)
    return folder


@pytest.fixture(scope="session")
def run_config(
    federation: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ConfigValue]:
    """The coordinator's run config: pyproject defaults, tiny sizes, 16 px images."""
    flat = read_default_run_config()
    flat.update(TINY_RUN_CONFIG)
    flat["data.image-size"] = 16
    flat["federation.dir"] = str(federation)
    flat["federation.cache-dir"] = str(tmp_path_factory.mktemp("cache"))
    return flat


@pytest.fixture(scope="session")
def config(run_config: dict[str, ConfigValue]) -> RunConfig:
    return load_run_config(run_config)


@pytest.fixture(scope="session")
def models(config: RunConfig) -> dict[str, Arrays]:
    """Pre-built models of the run's architecture: crafted ones and a fresh one."""
    return {
        "fg": constant_model(config, foreground=True),
        "bg": constant_model(config, foreground=False),
        "init": build_initial_weights(config),
    }


@pytest.fixture
def open_site(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> OpenSite:
    """Open a site for attack: ``open_site("A", policy={...}, directory=...)``.

    ``policy`` None leaves the node without a policy file: the safe defaults apply,
    exactly as at a site that never wrote one. A mapping writes a policy file from
    the template's defaults with those keys changed. Each call gets a fresh state
    folder.
    """
    numbers = itertools.count()

    def open_(
        name: str = "A",
        *,
        policy: Mapping[str, object] | None = None,
        directory: Path | None = None,
    ) -> SiteUnderAttack:
        number = next(numbers)
        policy_path = None
        if policy is not None:
            folder = tmp_path / f"policy-{number}"
            folder.mkdir()
            policy_path = write_policy(folder, policy)
        return SiteUnderAttack(
            directory=directory or federation / name,
            state_dir=tmp_path / f"state-{name}-{number}",
            run_config=run_config,
            policy=policy_path,
        )

    return open_


@pytest.fixture
def site_copy(federation: Path, tmp_path: Path) -> Callable[[str, str], Path]:
    """``site_copy("A", "hospital")``: a copy of a site to change, under a new name."""

    def copy(name: str, new_name: str) -> Path:
        target = tmp_path / "sites" / new_name
        shutil.copytree(federation / name, target)
        return target

    return copy


@pytest.fixture
def handler_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every time a handler of the site's app started (its site setup resolved).

    Each handler of ``clients.app`` resolves its site first, inside the guard; a
    request refused before running never gets there. The list stays empty when no
    handler ran.
    """
    calls: list[str] = []
    resolve = getattr(clients.app, "resolve_setup")  # noqa: B009 - not re-exported

    def recording(context, message=None):  # type: ignore[no-untyped-def]
        calls.append(str(context.node_config.get("site-dir")))
        return resolve(context, message)

    monkeypatch.setattr(clients.app, "resolve_setup", recording)
    return calls


@pytest.fixture(scope="module")
def coordinator_process() -> Iterator[None]:
    """What a ServerApp process has set before its main runs (a Message needs it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
