"""Attack classes 9 and 11: sites the coordinator must not take at their word.

Class 9: a site's name becomes part of file names at the coordinator (its model,
its report rows); a site that says it is ``../escape`` must not write outside the
run folder. Class 11: a site's identity is the name its key was registered under,
not what its folder is called: two nodes claiming one name, or more nodes than the
run expects, are refused naming the nodes, and a node whose folder is named like the
target takes part under its registered name. The phases run against the real
ClientApp through a grid that delivers each message to it (no Flower daemon).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar, Final

import pytest
from flwr.app import Context, Message

from clients.app import app as site_app
from core import protocol
from core.config import ConfigValue, load_run_config
from core.training.networks import Arrays
from server import phases
from server.coordinator import Coordinator, PhaseError
from server.results import PhaseResult
from server.store import RunStore
from tests.security.attacker import grid_of_sites
from tests.unit.server import fake_grid
from tests.unit.server.fake_grid import FakeGrid

pytestmark = pytest.mark.usefixtures("coordinator_process")

NODES: Final = {11: "A", 12: "B", 13: "C"}  # node id -> site folder
App = Callable[[Message, Context], Message]


def coordinator_of(
    grid: FakeGrid,
    run_config: Mapping[str, ConfigValue],
    run_dir: Path,
    log: list[str] | None = None,
) -> Coordinator:
    return Coordinator(
        grid=grid,  # type: ignore[arg-type]
        config=load_run_config(run_config),
        store=RunStore(run_dir),
        log=(log if log is not None else []).append,
    )


def claiming(claims: Mapping[int, str]) -> App:
    """The site app, except that these nodes' hello replies claim another name."""

    def app(message: Message, context: Context) -> Message:
        reply = site_app(message, context)
        claim = claims.get(context.node_id)
        if claim is not None and message.metadata.message_type == protocol.HELLO:
            reply.content.config_records[protocol.REPLY_KEY]["site"] = claim
        return reply

    return app


def escaped(root: Path) -> list[Path]:
    """Files or folders named like the escape anywhere under ``root``."""
    return [path for path in root.rglob("*") if "escape" in path.name]


# ------------------------------------------------------------ class 9: site names


@pytest.mark.parametrize(
    "claim", ["../escape", "../../escape/x", "/tmp/escape", "..", "escape\n"]
)
def test_a_site_claiming_a_path_as_its_name_is_left_out_naming_the_node(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    claim: str,
) -> None:
    # Prepare: a simulation (no registered names): node 13 says who it is
    monkeypatch.setattr(fake_grid, "client_app", claiming({13: claim}))
    grid = grid_of_sites(federation, run_config, NODES, tmp_path / "sites")
    log: list[str] = []
    coordinator = coordinator_of(grid, run_config, tmp_path / "runs" / "1", log)

    # Execute
    discovered, sites = phases.discovery.discover(
        coordinator, nodes=sorted(NODES), default_target="A"
    )
    target = discovered.target

    # Assert: left out with the reason, recorded; nothing written under its name
    assert sorted(site.name for site in sites.values()) == ["A", "B"]
    assert target == "A"
    missing = coordinator.store.load_phase("discover")["missing"]  # type: ignore[index]
    assert re.match(
        rf"node 13: site name {re.escape(repr(claim))} is not 1-64 letters",
        missing["13"],
    )
    assert any(line.startswith("node 13 did not say hello: node 13:") for line in log)
    assert escaped(tmp_path) == []


def test_a_node_registered_under_a_path_is_left_out_naming_the_node(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: a deployment: the grid reports each key's registered name
    names = {11: "A", 12: "B", 13: "../../escape"}
    grid = grid_of_sites(federation, run_config, NODES, tmp_path / "sites", names=names)
    coordinator = coordinator_of(grid, run_config, tmp_path / "runs" / "1")

    # Execute
    _, sites = phases.discovery.discover(
        coordinator, nodes=sorted(NODES), default_target="A"
    )

    # Assert
    assert 13 not in sites
    missing = coordinator.store.load_phase("discover")["missing"]  # type: ignore[index]
    assert missing["13"].startswith(
        "node 13: site name '../../escape' is not 1-64 letters"
    )
    assert escaped(tmp_path) == []


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EscapingResult(PhaseResult):
    """A phase result whose name climbs out of the run folder."""

    PHASE: ClassVar[str] = "../../escape"


@pytest.mark.parametrize(
    "write",
    [
        lambda store, _w, _o: store.write_json("../escape.json", {"x": 1}),
        lambda store, _w, _o: store.write_text("phases/../../escape.txt", "x"),
        lambda store, _w, _o: store.save_result(EscapingResult()),
        lambda store, weights, _o: store.save_model("../../escape", weights),
        lambda store, _w, outside: store.write_text(str(outside), "x"),
    ],
    ids=["json", "text", "phase", "model", "absolute"],
)
def test_the_run_store_refuses_any_path_outside_the_run_folder(
    tmp_path: Path,
    models: dict[str, Arrays],
    write: Callable[[RunStore, Arrays, Path], Path],
) -> None:
    # Prepare
    store = RunStore(tmp_path / "runs" / "1")

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"refusing to write .*: it leaves the run folder"
    ):
        write(store, models["init"], tmp_path / "escape-absolute.txt")
    assert escaped(tmp_path) == []


# ------------------------------------------------------------- class 11: identity


def test_two_nodes_registered_under_one_name_are_refused_naming_the_node_ids(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: a second key registered as B (by hand, past register-site.sh)
    names = {11: "A", 12: "B", 13: "B"}
    grid = grid_of_sites(federation, run_config, NODES, tmp_path / "sites", names=names)
    coordinator = coordinator_of(grid, run_config, tmp_path / "runs" / "1")

    # Execute / Assert
    with pytest.raises(
        PhaseError,
        match=r"several nodes are the same site \('B': nodes 12, 13\); each site is "
        r"one registered key",
    ):
        phases.discovery.discover(coordinator, nodes=sorted(NODES), default_target="A")
    assert coordinator.store.load_phase("discover") is None


def test_two_folders_named_like_the_target_are_refused_in_a_simulation(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: no registered names; node 15 serves a copy named like the target
    nodes = {**NODES, 15: "A"}
    grid = grid_of_sites(federation, run_config, nodes, tmp_path / "sites")
    coordinator = coordinator_of(grid, run_config, tmp_path / "runs" / "1")

    # Execute / Assert
    with pytest.raises(PhaseError, match=r"\('A': nodes 11, 15\)"):
        phases.discovery.discover(coordinator, nodes=sorted(nodes), default_target="A")


def test_more_nodes_than_expected_are_refused_naming_them(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: a fourth registered node is online for a three-site run
    names = {11: "A", 12: "B", 13: "C", 15: "D"}
    grid = grid_of_sites(
        federation, run_config, {**NODES, 15: "A"}, tmp_path / "sites", names=names
    )
    log: list[str] = []

    # Execute / Assert
    with pytest.raises(
        PhaseError,
        match=r"^discover: 4 nodes are connected, 3 expected .*: nodes 11 \('A'\), "
        r"12 \('B'\), 13 \('C'\), 15 \('D'\)\. Unregister the nodes",
    ):
        phases.discovery.wait_for_nodes(
            grid,  # type: ignore[arg-type]
            expected=3,
            wait_s=0.0,
            log=log.append,
        )


def test_a_node_whose_folder_is_named_like_the_target_takes_part_as_its_key(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: node 15 serves a folder named A; its key is registered as D
    names = {11: "A", 12: "B", 13: "C", 15: "D"}
    nodes = {**NODES, 15: "A"}
    grid = grid_of_sites(federation, run_config, nodes, tmp_path / "sites", names=names)
    log: list[str] = []
    coordinator = coordinator_of(grid, run_config, tmp_path / "runs" / "1", log)

    # Execute
    discovered, sites = phases.discovery.discover(
        coordinator, nodes=sorted(nodes), default_target="A"
    )
    target = discovered.target

    # Assert: the target is the node registered as A, the poser is D
    assert target == "A"
    assert {node: site.name for node, site in sites.items()} == names
    assert "node 15 says it is site 'A', but its key is registered as 'D'" in (
        "\n".join(log)
    )
