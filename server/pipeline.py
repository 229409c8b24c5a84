"""The coordinator's phases (docs/architecture.md#the-phases), in order.

discover -> source training -> affinity (SeqTran) -> transferability -> adaptation ->
consensus -> semisup -> evaluation.

Each phase sends one kind of message, waits for the replies, records which sites did
not answer and why, persists its result to the run store before the next phase starts,
and returns it. Only weights, scores and aggregate metrics arrive here; the
coordinator never sees an image, a label or a prediction map.

This module holds the short phases; the affinity phase is in
``server/pipeline_affinity.py``, the semisup phase in ``server/pipeline_semisup.py``
and the message sending and ledger in ``server/coordinator.py``. ``server/runner.py``
calls them in order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.serverapp import Grid

from core import protocol
from core.jobs import Transferability, build_initial_weights
from core.models import Arrays
from core.transferability import select_sources
from server import records
from server.coordinator import (
    ADAPTED_START,
    SITE_NAME_PATTERN,
    Coordinator,
    Log,
    PhaseError,
    SiteInfo,
    ask_target,
    names_by_site,
    validate_site_name,
)


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
        coordinator.log(
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
        coordinator.log(f"node {node} did not say hello: {reason}")
    return sites, failed


def discover(
    coordinator: Coordinator, *, nodes: list[int], default_target: str | None
) -> tuple[dict[int, SiteInfo], str]:
    """Phase 1: ask every node who it is; choose the target site."""
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
    coordinator.store.save_phase(
        "discover",
        {
            "sites": [
                {"name": site.name, "node_id": node, **site.hello.to_fields()}
                for node, site in sorted(sites.items(), key=lambda item: item[1].name)
            ],
            "target": target,
            "missing": {str(node): reason for node, reason in failed.items()},
        },
    )
    coordinator.log(f"discover: sites {names}, target {target}")
    return sites, target


def rediscover(
    coordinator: Coordinator, *, nodes: list[int], saved: Mapping[str, Any]
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
    if saved["target"] not in names:
        raise PhaseError(
            f"resume: target site {saved['target']!r} is not among the sites that "
            f"answered {names}; failures: {failed}"
        )
    known = {site["name"] for site in saved["sites"]}
    coordinator.log(
        f"resume: sites {names} answered; the run's sites were {sorted(known)}"
    )
    return sites


def train_sources(
    coordinator: Coordinator, sources: Mapping[int, SiteInfo]
) -> dict[str, Arrays]:
    """Phase 2: every source trains a model on its own labels; keep the weights."""
    config = coordinator.config
    initial = build_initial_weights(config)
    coordinator.log(f"source training at {sorted(s.name for s in sources.values())}")
    replies = coordinator.ask(
        {node: records.build_request(weights=initial) for node in sources},
        protocol.TRAIN_SOURCE,
    )
    models, training = {}, {}
    failed = dict(replies.failed)
    for node, reply in replies.ok.items():
        name = sources[node].name
        try:
            weights = records.read_weights(reply.content)
            report = protocol.TrainReply.from_fields(
                records.read_metrics(reply.content)
            )
        except ValueError as error:
            failed[node] = f"malformed reply: {error}"
            continue
        models[name] = weights
        coordinator.store.save_model(f"source-{name}", weights)
        training[name] = report.to_fields()
        privacy = (
            f", DP epsilon {report.epsilon_spent:.3f} (site total "
            f"{report.epsilon_total:.3f}, delta {report.delta:g})"
            if report.private
            else ""
        )
        coordinator.log(
            f"source {name}: loss {report.loss:.4f}, {report.num_examples} "
            f"examples{privacy}"
        )
    required = min(config.federation.min_sites, len(sources))
    if len(models) < max(required, 1):
        raise PhaseError(
            f"source training: {len(models)} source model(s) arrived, "
            f"{required} needed; failures: {names_by_site(sources, failed)}",
            phase="source-training",
            missing=names_by_site(sources, failed),
        )
    missing = names_by_site(sources, failed)
    coordinator.store.save_phase(
        "source-training", {"training": training, "missing": missing}
    )
    return models


def transferability(
    coordinator: Coordinator, target: SiteInfo, models: Mapping[str, Arrays]
) -> dict[str, Any]:
    """Phase 4: the target scores every source model (ITM); choose main/aux by DTM."""
    reply = ask_target(
        coordinator,
        target,
        records.build_request(models=models),
        protocol.LFTM,
        "transferability",
    )
    lftm = protocol.LftmReply.from_fields(
        records.read_settings(reply.content), records.read_metrics(reply.content)
    )
    itm = lftm.itm_rows()
    dtm = (
        lftm.dtm
        if itm is None
        else Transferability(metric=lftm.metric, sources=lftm.sources, itm=itm).dtm
    )
    selection = select_sources(dtm)
    result = {
        "metric": lftm.metric,
        "release": lftm.release,
        "sources": list(lftm.sources),
        "itm": itm,
        "dtm": dtm,
        "main": selection.main,
        "aux": selection.aux,
        "weights": {"main": selection.weight_main, "aux": selection.weight_aux},
    }
    coordinator.store.save_phase("transferability", result)
    coordinator.log(
        "DTM "
        + ", ".join(f"{n} {v:.3f}" for n, v in dtm.items())
        + f" -> main {selection.main}, aux {selection.aux}"
    )
    return result


def adaptation(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    selection: Mapping[str, Any],
) -> dict[str, Arrays]:
    """Phase 5: the target adapts the main/aux pair on its own images."""
    request = protocol.AdaptRequest(
        main=selection["main"],
        aux=selection["aux"] or "",
        weight_main=selection["weights"]["main"],
        weight_aux=selection["weights"]["aux"],
    )
    reply = ask_target(
        coordinator,
        target,
        records.build_request(settings=request.to_fields(), models=models),
        protocol.ADAPT,
        "adaptation",
    )
    adapted = records.read_named_models(reply.content)
    if "main" not in adapted:
        raise PhaseError(f"adaptation: target {target.name} returned no adapted model")
    for name, weights in adapted.items():
        coordinator.store.save_model(f"adapted-{name}", weights)
    outcome = protocol.AdaptReply.from_fields(records.read_metrics(reply.content))
    coordinator.store.save_phase(
        "adaptation",
        {**outcome.to_fields(), "site": target.name, "models": sorted(adapted)},
    )
    coordinator.log(
        f"adaptation: {outcome.num_examples} examples, "
        f"{outcome.pseudo_label_foreground:.3f} pseudo-foreground, "
        f"{outcome.seconds:.1f} s at the target"
    )
    return adapted


def consensus(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    adapted: Mapping[str, Arrays],
) -> dict[str, Arrays]:
    """Phase 6: the target fuses the sources' predictions (and its atlases' labels).

    The target builds its noisy label set, learns DeepSTAPLE data parameters, keeps
    the consensus labels and trains the adapted main model on each consensus; only
    aggregate figures and those models come back.
    """
    request = protocol.ConsensusRequest(
        label_sources=tuple(sorted(models)), start=ADAPTED_START
    )
    try:
        reply = ask_target(
            coordinator,
            target,
            records.build_request(
                settings=request.to_fields(),
                models={**models, ADAPTED_START: adapted["main"]},
            ),
            protocol.CONSENSUS,
            "consensus",
        )
    except PhaseError as error:
        if not error.refused:
            raise
        # The target's policy refuses consensus (e.g. it requires DP, which
        # DeepSTAPLE has no form of): an optional phase, so the run goes on.
        reason = error.missing.get(target.name, str(error))
        coordinator.store.save_phase("consensus", {"skipped": reason, "models": []})
        coordinator.log(f"consensus: skipped, the target refused it: {reason}")
        return {}
    trained = records.read_named_models(reply.content)
    if "deepstaple" not in trained:
        raise PhaseError(
            f"consensus: target {target.name} returned no DeepSTAPLE-trained model"
        )
    outcome = protocol.ConsensusReply.from_fields(records.read_metrics(reply.content))
    for method, weights in trained.items():
        coordinator.store.save_model(f"consensus-{method}", weights)
    coordinator.store.save_phase(
        "consensus",
        {
            **dataclasses.asdict(outcome),
            "sources": sorted(outcome.data_parameter),
            "models": sorted(trained),
        },
    )
    coordinator.log(
        f"consensus: {outcome.num_labels} noisy labels on {outcome.num_images} "
        "images; mean data parameter "
        + ", ".join(f"{n} {v:.3f}" for n, v in outcome.data_parameter.items())
        + f"; {outcome.seconds:.1f} s at the target"
    )
    return trained


def build_predictors(
    sources: list[str],
    selection: Mapping[str, Any],
    *,
    adapted: bool,
    later_models: Sequence[str] = (),
) -> dict[str, list[tuple[str, float]]]:
    """The predictors every report compares.

    Each source alone, their uniform average, the TGMA pair and its main model, and
    each model the later phases trained, alone. Model names are ``source:<name>``,
    ``adapted:main``/``adapted:aux``, ``consensus:<method>`` and
    ``semisup:<scope>``.

    Example:
        >>> sel = {"main": "B", "aux": "C", "weights": {"main": 0.6, "aux": 0.4}}
        >>> sorted(build_predictors(["B", "C"], sel, adapted=True,
        ...                         later_models=["consensus:deepstaple"]))
        ['consensus:deepstaple', 'source:B', 'source:C', 'tgma', 'tgma-main', 'uniform']
    """
    predictors: dict[str, list[tuple[str, float]]] = {
        f"source:{name}": [(f"source:{name}", 1.0)] for name in sources
    }
    predictors["uniform"] = [(f"source:{name}", 1.0 / len(sources)) for name in sources]
    if adapted:
        pair = [("adapted:main", float(selection["weights"]["main"]))]
        if selection["aux"]:
            pair.append(("adapted:aux", float(selection["weights"]["aux"])))
        predictors["tgma"] = pair
        predictors["tgma-main"] = [("adapted:main", 1.0)]
    for name in later_models:
        predictors[name] = [(name, 1.0)]
    return predictors


def evaluation(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    adapted: Mapping[str, Arrays],
    selection: Mapping[str, Any],
    later_models: Mapping[str, Arrays] | None = None,
) -> dict[str, Any]:
    """Phase 8: the target scores every predictor on its evaluation labels.

    ``later_models`` are the consensus and semisup phases' models under their
    ``consensus:<method>``/``semisup:<scope>`` names.
    """
    later_models = later_models or {}
    named = {f"source:{name}": weights for name, weights in models.items()}
    named.update({f"adapted:{name}": weights for name, weights in adapted.items()})
    named.update(later_models)
    predictors = build_predictors(
        sorted(models),
        selection,
        adapted=bool(adapted),
        later_models=sorted(later_models),
    )
    request = protocol.EvaluateRequest(predictors=predictors)
    reply = ask_target(
        coordinator,
        target,
        records.build_request(settings=request.to_fields(), models=named),
        protocol.EVALUATE,
        "evaluation",
    )
    scores = protocol.EvaluateReply.from_fields(records.read_metrics(reply.content))
    result = {
        "site": target.name,
        "num_cases": scores.num_cases,
        "dice": scores.dice,
        "hd95_mm": scores.hd95_mm,
        # Under the target's DP the Dice are noised and HD95 withheld; the figures
        # say what the release cost.
        **{
            key: value
            for key, value in scores.to_fields().items()
            if key in protocol.DP_METRICS
        },
    }
    coordinator.store.save_phase("evaluation", result)
    coordinator.log(
        "evaluation: "
        + ", ".join(f"{name} {value:.3f}" for name, value in scores.dice.items())
    )
    return result
