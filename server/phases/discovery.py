"""The discover phase: who answers, under which site name, and which is the target.

``wait_for_nodes`` waits for the federation's SuperNodes; ``discover`` asks each
node for its ``hello`` (site name, cases, applied policy) and chooses the target;
``rediscover`` does the same on resume, against the names the run saved.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

from flwr.serverapp import Grid

from core import protocol
from server import records
from server.coordinator import (
    SITE_NAME_PATTERN,
    Coordinator,
    Log,
    PhaseError,
    SiteInfo,
    validate_site_name,
)
from server.results import DiscoveredSite, DiscoverResult


def registered_names(grid: Grid) -> dict[int, str]:
    """Node id -> the name its key was registered under, where the grid knows one.

    In a deployment Flower 1.39's grid reports, per node, the name given at
    registration (``flwr supernode register --name``, which ``register-site.sh``
    sets to the site's name): the coordinator's own record of who holds the key. In
    simulation nodes have no such name, and the map is empty.
    """
    return {int(node.node_id): str(node.name) for node in grid.get_nodes() if node.name}


def wait_for_nodes(grid: Grid, *, expected: int, wait_s: float, log: Log) -> list[int]:
    """Wait until ``expected`` nodes are connected or ``wait_s`` passes.

    Raises:
        PhaseError: more nodes than expected are connected (naming each node and its
            registered name): one of them would take part as a site the run did
            not plan for, possibly posing as another.
    """
    deadline = time.monotonic() + wait_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    log(f"{len(nodes)} of {expected} expected nodes connected")
    if 0 < expected < len(nodes):
        names = registered_names(grid)
        described = ", ".join(
            f"{node} ({names[node]!r})" if node in names else str(node)
            for node in sorted(nodes)
        )
        raise PhaseError(
            f"discover: {len(nodes)} nodes are connected, {expected} expected "
            f"(federation.expected-sites, or the federation's site folders): nodes "
            f"{described}. Unregister the nodes that are no site of this run "
            "(flwr supernode unregister <node-id>) or set federation.expected-sites"
        )
    return sorted(nodes)


def _site_name(
    coordinator: Coordinator, node: int, said: str, registered: Mapping[int, str]
) -> str:
    """The node's site name: its registered name if it has one, else what it said.

    ``registered`` is empty in simulation (the federation folder is the operator's
    own); when the grid knows registered names (a deployment), every node must have
    one.

    Raises:
        PhaseError: the name is unsafe, or a deployment node has no registered name.
    """
    if not registered:
        return validate_site_name(said, node)
    if node not in registered:
        raise PhaseError(
            f"node {node}: its key was registered without a name, so it has no "
            f"site identity (it says {said[:80]!r}); register it with "
            "deploy/register-site.sh KEY.pub NAME"
        )
    name = validate_site_name(registered[node], node)
    if said != name:
        coordinator.warn(
            f"node {node} says it is site {said[:80]!r}, but its key is registered "
            f"as {name!r}: it takes part as {name!r}"
        )
    return name


def _refuse_duplicates(sites: Mapping[int, SiteInfo]) -> None:
    """Raise naming the nodes when two or more nodes are the same site."""
    nodes_of: dict[str, list[int]] = {}
    for node, site in sites.items():
        nodes_of.setdefault(site.name, []).append(node)
    duplicates = {
        name: sorted(nodes) for name, nodes in nodes_of.items() if len(nodes) > 1
    }
    if duplicates:
        described = "; ".join(
            f"{name!r}: nodes {', '.join(map(str, nodes))}"
            for name, nodes in sorted(duplicates.items())
        )
        raise PhaseError(
            f"discover: several nodes are the same site ({described}); each site is "
            "one registered key: unregister the others (flwr supernode unregister "
            "<node-id>)"
        )


def _say_hello(
    coordinator: Coordinator, nodes: list[int]
) -> tuple[dict[int, SiteInfo], dict[int, str]]:
    """Ask every node who it is; name each by its registered name where it has one.

    Raises:
        PhaseError: two nodes are the same site.
    """
    registered = registered_names(coordinator.grid)
    # Ledger entries of the hello replies already name each node as registered.
    coordinator.site_names.update(
        {
            node: name
            for node, name in registered.items()
            if SITE_NAME_PATTERN.fullmatch(name)
        }
    )
    replies = coordinator.ask(
        {node: records.build_request() for node in nodes}, protocol.HELLO
    )
    sites, failed = {}, dict(replies.failed)
    for node, reply in replies.ok.items():
        try:
            hello = protocol.HelloReply.from_fields(
                records.read_settings(reply.content)
            )
            name = _site_name(coordinator, node, hello.site, registered)
        except ValueError as error:
            failed[node] = f"malformed reply: {error}"
            continue
        except PhaseError as error:
            failed[node] = str(error)
            continue
        sites[node] = SiteInfo(node, dataclasses.replace(hello, site=name))
    _refuse_duplicates(sites)
    coordinator.site_names.update({node: site.name for node, site in sites.items()})
    for node, reason in failed.items():
        coordinator.warn(f"node {node} did not say hello: {reason}")
    return sites, failed


def discover(
    coordinator: Coordinator, *, nodes: list[int], default_target: str | None
) -> tuple[DiscoverResult, dict[int, SiteInfo]]:
    """Phase 1: ask every node who it is; choose the target. Result, live sites."""
    config = coordinator.config
    sites, failed = _say_hello(coordinator, nodes)
    if len(sites) < config.federation.min_sites:
        raise PhaseError(
            f"discover: only {len(sites)} site(s) answered, federation."
            f"min-sites is {config.federation.min_sites}; failures: "
            f"{failed}",
            phase="discover",
            missing={coordinator.site_name(node): why for node, why in failed.items()},
        )
    target = config.federation.target_site or default_target
    names = sorted(site.name for site in sites.values())
    if not target or target not in names:
        raise PhaseError(
            f"discover: target site {target!r} is not among the sites that "
            f"answered {names}; set federation.target-site"
        )
    result = DiscoverResult(
        sites=tuple(
            DiscoveredSite(name=site.name, node_id=node, hello=site.hello.to_fields())
            for node, site in sorted(sites.items(), key=lambda item: item[1].name)
        ),
        target=target,
        missing={str(node): reason for node, reason in failed.items()},
    )
    coordinator.store.save_result(result)
    coordinator.log(f"discover: sites {names}, target {target}")
    return result, sites


def rediscover(
    coordinator: Coordinator, *, nodes: list[int], saved: DiscoverResult
) -> dict[int, SiteInfo]:
    """Map the sites of a resumed run onto this run's nodes (hello, not persisted).

    Node ids belong to a Flower run (in simulation they change with every run), so a
    resumed run asks every node who it is again; the saved discover result stays the
    run's record. Only the target must answer: the finished phases do not need the
    others, and later phases proceed without the missing ones as usual.

    Raises:
        PhaseError: the saved target did not answer.
    """
    sites, failed = _say_hello(coordinator, nodes)
    names = sorted(site.name for site in sites.values())
    if saved.target not in names:
        raise PhaseError(
            f"resume: target site {saved.target!r} is not among the sites that "
            f"answered {names}; failures: {failed}"
        )
    known = {site.name for site in saved.sites}
    coordinator.log(
        f"resume: sites {names} answered; the run's sites were {sorted(known)}"
    )
    return sites
