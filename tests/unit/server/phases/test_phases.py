"""The coordinator's phases, run end to end against the real ClientApp.

A :class:`FakeGrid` stands in for Flower's Grid: it assigns message ids at push time
(as the real grid does) and hands each message to the real ClientApp with the Context
of the node's site, so every phase exercises both sides of the wire contract on a tiny
synthetic federation without any Flower daemon.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core import protocol
from core.affinity.matrix import affinity_matrices, normalise
from core.affinity.profile import build_site_profile, profile_settings
from core.config import ConfigValue, RunConfig, load_run_config
from core.data.dataset import index_site
from core.privacy.egress import measure_content
from core.privacy.ledger import EGRESS, INGRESS, Ledger, verify_ledger
from core.privacy.ledger_match import match_ledgers
from core.privacy.policy import ACTIONS, AppliedPolicy, LftmRelease
from core.semisup.dual_task import build_dual_task_model
from core.training.job import build_initial_weights
from core.training.networks import Arrays, build_model, get_manifest
from server import phases, records
from server.coordinator import (
    ADAPTED_START,
    COORDINATOR,
    Coordinator,
    PhaseError,
    SiteInfo,
    validate_site_name,
)
from server.report import build_report, format_markdown, write_report
from server.results import (
    FEW_LABEL,
    LABEL_FREE,
    AdaptationResult,
    AffinityResult,
    ConsensusResult,
    EvaluationResult,
    LabelUse,
    PairSelection,
    PairWeights,
    RunResults,
    SemisupResult,
    TransferabilityResult,
)
from server.store import RunStore, to_strict_json
from tests.unit.clients.messages import write_policy
from tests.unit.server.fake_grid import NODES, FakeGrid, build_grid

BROKEN_NODE = 14  # serves a site folder that does not exist
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class PipelineRun:
    """Everything one end-to-end run of the phases produced."""

    grid: FakeGrid
    store: RunStore
    config: RunConfig
    sites: dict[int, SiteInfo]
    target: str
    source_models: dict[str, Arrays]
    affinity: AffinityResult
    models: dict[str, Arrays]  # the source models and the SeqTran candidate
    selection: TransferabilityResult
    adaptation: AdaptationResult
    adapted: dict[str, Arrays]  # by evaluation name: adapted:main, ...
    consensus_result: ConsensusResult
    consensus: dict[str, Arrays]
    semisup_result: SemisupResult
    semisup: dict[str, Arrays]
    evaluation: EvaluationResult
    log: list[str]
    coordinator: Coordinator


# ------------------------------------------------------------------------- fixtures


def build_config(
    run_config: Mapping[str, ConfigValue], **overrides: ConfigValue
) -> RunConfig:
    return load_run_config({**run_config, **overrides})


def build_coordinator(
    grid: FakeGrid, config: RunConfig, run_dir: Path, log: list[str] | None = None
) -> Coordinator:
    return Coordinator(
        grid=grid,  # type: ignore[arg-type]
        config=config,
        store=RunStore(run_dir),
        log=(log if log is not None else []).append,
    )


def site_info(node: int, name: str, *, labelled: int = 2) -> SiteInfo:
    hello = protocol.HelloReply(
        site=name,
        modality="synthetic-MR",
        labelled=labelled,
        unlabelled=0,
        evaluation=6,
        class_names=("background", "organ"),
    )
    return SiteInfo(node, hello)


@pytest.fixture(scope="module")
def full_run(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path_factory: pytest.TempPathFactory,
) -> PipelineRun:
    """Every phase, discover to evaluation, with the paper's DTM selection.

    The agreement selection (the default) has its own test below; under the paper's
    rule every choice is predictable from the DTM alone.
    """
    config = load_run_config({**run_config, "transfer.selection": "dtm"})
    grid = build_grid(federation, run_config)
    log: list[str] = []
    coordinator = build_coordinator(
        grid, config, tmp_path_factory.mktemp("runs") / "1", log
    )
    nodes = phases.discovery.wait_for_nodes(
        grid, expected=3, wait_s=1.0, log=log.append
    )
    discovered, sites = phases.discovery.discover(
        coordinator, nodes=nodes, default_target="A"
    )
    target = discovered.target
    target_site = next(site for site in sites.values() if site.name == target)
    sources = {node: site for node, site in sites.items() if site.name != target}
    _, sources_models = phases.source_training.run(coordinator, sources)
    affinity, transferred = phases.affinity.run(
        coordinator, sites, target_site, sources_models
    )
    assert transferred is not None
    models = {**sources_models, phases.affinity.SEQTRAN_CANDIDATE: transferred}
    candidate_use = {name: LabelUse() for name in sources_models}
    candidate_use[phases.affinity.SEQTRAN_CANDIDATE] = affinity.label_use
    selection = phases.transferability.run(
        coordinator, target_site, models, candidate_use
    )
    adaptation, adapted = phases.adaptation.run(
        coordinator, target_site, models, selection
    )
    start_use = adaptation.label_free.label_use
    consensus_result, consensus = phases.consensus.run(
        coordinator,
        target_site,
        models,
        adapted,
        candidates=selection.candidates,
        start=start_use,
    )
    semisup_result, semisup = phases.semisup.run(
        coordinator, sites, target_site, adapted, start_use=start_use
    )
    evaluation = phases.evaluation.run(
        coordinator,
        target_site,
        models,
        adapted,
        selection,
        {
            **{f"consensus:{method}": w for method, w in consensus.items()},
            **{f"semisup:{scope}": w for scope, w in semisup.items()},
        },
        label_use=phases.evaluation.model_label_use(
            selection, adaptation, consensus_result, semisup_result
        ),
    )
    return PipelineRun(
        grid=grid,
        store=coordinator.store,
        config=config,
        sites=sites,
        target=target,
        source_models=sources_models,
        affinity=affinity,
        models=models,
        selection=selection,
        adaptation=adaptation,
        adapted=adapted,
        consensus_result=consensus_result,
        consensus=consensus,
        semisup_result=semisup_result,
        semisup=semisup,
        evaluation=evaluation,
        log=log,
        coordinator=coordinator,
    )


def manifest_of(weights: Arrays) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in weights.items()}


# -------------------------------------------------------------------------- discover


def test_discover_finds_every_site_and_persists(full_run: PipelineRun) -> None:
    # Prepare / Execute: the full_run fixture ran the phases.
    saved = full_run.store.load_phase("discover")

    # Assert
    assert {node: site.name for node, site in full_run.sites.items()} == NODES
    assert full_run.target == "A"
    assert all(site.hello.labelled == 2 for site in full_run.sites.values())
    assert saved is not None
    assert saved["target"] == "A"
    assert [site["name"] for site in saved["sites"]] == ["A", "B", "C"]
    assert saved["missing"] == {}


@pytest.mark.parametrize(
    ("target_site", "default_target", "expected"),
    [("", "A", "A"), ("B", "A", "B"), ("C", None, "C"), ("", "B", "B")],
    ids=["federation-default", "config-overrides", "config-only", "other-default"],
)
def test_discover_picks_target_from_config_or_default(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    target_site: str,
    default_target: str | None,
    expected: str,
) -> None:
    # Prepare
    config = build_config(run_config, **{"federation.target-site": target_site})
    coordinator = build_coordinator(
        build_grid(federation, run_config), config, tmp_path
    )

    # Execute
    discovered, _ = phases.discovery.discover(
        coordinator, nodes=sorted(NODES), default_target=default_target
    )
    target = discovered.target

    # Assert
    assert target == expected
    assert coordinator.store.load_phase("discover")["target"] == expected


@pytest.mark.parametrize(
    ("target_site", "default_target"),
    [("", None), ("Z", "A"), ("", "Z")],
    ids=["no-target", "config-unknown", "default-unknown"],
)
def test_discover_rejects_unknown_target(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    target_site: str,
    default_target: str | None,
) -> None:
    # Prepare
    config = build_config(run_config, **{"federation.target-site": target_site})
    coordinator = build_coordinator(
        build_grid(federation, run_config), config, tmp_path
    )

    # Execute / Assert
    with pytest.raises(PhaseError, match=r"target site .* federation\.target-site"):
        phases.discovery.discover(
            coordinator, nodes=sorted(NODES), default_target=default_target
        )
    assert coordinator.store.load_phase("discover") is None


def test_discover_records_a_node_that_never_replies(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    config = build_config(run_config)
    grid = build_grid(federation, run_config, drop=[13])
    coordinator = build_coordinator(grid, config, tmp_path)

    # Execute
    discovered, sites = phases.discovery.discover(
        coordinator, nodes=sorted(NODES), default_target="A"
    )
    target = discovered.target

    # Assert
    assert sorted(site.name for site in sites.values()) == ["A", "B"]
    assert target == "A"
    missing = coordinator.store.load_phase("discover")["missing"]
    assert list(missing) == ["13"]
    assert missing["13"] == "no reply within 3600 s"


def test_discover_records_an_error_reply(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    config = build_config(run_config)
    grid = build_grid(federation, run_config, {**NODES, BROKEN_NODE: "D"})
    coordinator = build_coordinator(grid, config, tmp_path)

    # Execute
    _, sites = phases.discovery.discover(
        coordinator, nodes=sorted(grid.get_node_ids()), default_target="A"
    )

    # Assert
    assert sorted(site.name for site in sites.values()) == ["A", "B", "C"]
    missing = coordinator.store.load_phase("discover")["missing"]
    assert list(missing) == [str(BROKEN_NODE)]
    assert missing[str(BROKEN_NODE)].startswith(f"error {protocol.SITE_ERROR_CODE}: ")
    assert "site folder not found" in missing[str(BROKEN_NODE)]


def test_discover_fails_when_too_few_sites_answer(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    config = build_config(run_config, **{"federation.min-sites": 3})
    grid = build_grid(federation, run_config, drop=[13])
    coordinator = build_coordinator(grid, config, tmp_path)

    # Execute / Assert
    with pytest.raises(PhaseError, match=r"only 2 site\(s\) answered.*min-sites is 3"):
        phases.discovery.discover(coordinator, nodes=sorted(NODES), default_target="A")


def test_wait_for_nodes_returns_sorted_ids_without_waiting(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Prepare
    grid = build_grid(federation, run_config, {13: "C", 11: "A", 12: "B"})
    log: list[str] = []

    # Execute
    nodes = phases.discovery.wait_for_nodes(
        grid, expected=3, wait_s=5.0, log=log.append
    )

    # Assert
    assert nodes == [11, 12, 13]
    assert log == ["3 of 3 expected nodes connected"]


# Registered names as a deployment's grid reports them (register-site.sh --name).
REGISTERED = {11: "hospital-a", 12: "hospital-b", 13: "hospital-c"}
POSER = 15  # a fourth registered node whose folder is named like site A


def test_discover_names_each_node_by_its_registered_name(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: the folders say A, B and C; the keys were registered as hospital-*
    config = build_config(run_config, **{"federation.target-site": "hospital-a"})
    grid = build_grid(federation, run_config, names=REGISTERED)
    log: list[str] = []
    coordinator = build_coordinator(grid, config, tmp_path, log)

    # Execute
    discovered, sites = phases.discovery.discover(
        coordinator, nodes=sorted(NODES), default_target=None
    )
    target = discovered.target

    # Assert: the registered names win, each mismatch is logged, the ledger agrees
    assert {node: site.name for node, site in sites.items()} == REGISTERED
    assert target == "hospital-a"
    assert (
        "node 11 says it is site 'A', but its key is registered as 'hospital-a': "
        "it takes part as 'hospital-a'"
    ) in log
    saved = coordinator.store.load_phase("discover")
    assert [site["site"] for site in saved["sites"]] == sorted(REGISTERED.values())
    replies = [e for e in coordinator.ledger.entries() if e.direction == INGRESS]
    assert sorted(entry.sender for entry in replies) == sorted(REGISTERED.values())


def test_a_node_whose_folder_is_named_like_another_site_does_not_become_it(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: node 15 serves a folder named A, its key is registered as D
    config = build_config(run_config, **{"federation.target-site": "A"})
    names = {11: "A", 12: "B", 13: "C", POSER: "D"}
    grid = build_grid(federation, run_config, {**NODES, POSER: "A"}, names=names)
    log: list[str] = []
    coordinator = build_coordinator(grid, config, tmp_path, log)

    # Execute
    discovered, sites = phases.discovery.discover(
        coordinator, nodes=sorted(grid.get_node_ids()), default_target=None
    )
    target = discovered.target

    # Assert: it takes part as D (the run's operator then sees a fourth site)
    assert sites[POSER].name == "D"
    assert target == "A"
    assert sites[11].name == "A"
    assert f"node {POSER} says it is site 'A', but its key is registered as 'D'" in (
        "\n".join(log)
    )


def test_discover_refuses_two_nodes_registered_under_one_name_naming_them(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: a second key registered as B (by hand, past register-site.sh)
    config = build_config(run_config)
    grid = build_grid(federation, run_config, names={11: "A", 12: "B", 13: "B"})
    coordinator = build_coordinator(grid, config, tmp_path)

    # Execute / Assert
    with pytest.raises(
        PhaseError,
        match=r"several nodes are the same site \('B': nodes 12, 13\); each site is "
        r"one registered key",
    ):
        phases.discovery.discover(coordinator, nodes=sorted(NODES), default_target="A")
    assert coordinator.store.load_phase("discover") is None


@pytest.mark.parametrize(
    ("names", "node", "says"),
    [
        (
            {11: "A", 12: "B", 13: "../../escape"},
            13,
            "node 13: site name '../../escape' is not 1-64 letters, digits",
        ),
        (
            {11: "A", 12: "B"},
            13,
            "node 13: its key was registered without a name, so it has no site "
            "identity (it says 'C')",
        ),
    ],
    ids=["unsafe-name", "unnamed-key"],
)
def test_discover_leaves_out_a_node_without_a_safe_registered_name(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    names: dict[int, str],
    node: int,
    says: str,
) -> None:
    # Prepare
    config = build_config(run_config)
    grid = build_grid(federation, run_config, names=names)
    coordinator = build_coordinator(grid, config, tmp_path)

    # Execute
    _, sites = phases.discovery.discover(
        coordinator, nodes=sorted(NODES), default_target="A"
    )

    # Assert: left out, and the reason is the run's record
    assert node not in sites
    missing = coordinator.store.load_phase("discover")["missing"]
    assert missing[str(node)].startswith(says)


@pytest.mark.parametrize(
    "name", ["A", "hospital-a", "site_2.v1", "x" * 64], ids=lambda name: name[:12]
)
def test_validate_site_name_accepts_one_safe_path_component(name: str) -> None:
    assert validate_site_name(name, 7) == name


@pytest.mark.parametrize(
    "name", ["", "..", "../a", "a/b", ".hidden", "-a", "a b", "x" * 65, "é"]
)
def test_validate_site_name_refuses_anything_else_naming_the_node(name: str) -> None:
    with pytest.raises(PhaseError, match=r"^node 7: site name .* is not 1-64 letters"):
        validate_site_name(name, 7)


def test_wait_for_nodes_refuses_more_nodes_than_expected_naming_them(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Prepare: a fourth registered node is online for a three-site run
    names = {11: "A", 12: "B", 13: "C", POSER: "D"}
    grid = build_grid(federation, run_config, {**NODES, POSER: "A"}, names=names)

    # Execute / Assert
    with pytest.raises(
        PhaseError,
        match=r"^discover: 4 nodes are connected, 3 expected .*: nodes 11 \('A'\), "
        r"12 \('B'\), 13 \('C'\), 15 \('D'\)\. Unregister the nodes",
    ):
        phases.discovery.wait_for_nodes(grid, expected=3, wait_s=1.0, log=[].append)


# -------------------------------------------------------------------- source training


def test_train_sources_returns_and_persists_one_model_per_source(
    full_run: PipelineRun,
) -> None:
    # Prepare
    config = full_run.config
    expected_manifest = get_manifest(build_model(config.model, data=config.data))
    saved = full_run.store.load_phase("source-training")

    # Execute: each source's model as the store kept it
    kept = {name: full_run.store.load_model(f"source-{name}") for name in ("B", "C")}

    # Assert
    assert sorted(full_run.source_models) == ["B", "C"]
    for name, weights in full_run.source_models.items():
        assert manifest_of(weights) == expected_manifest
        assert (full_run.store.run_dir / "models" / f"source-{name}.npz").is_file()
        assert all(np.array_equal(kept[name][k], weights[k]) for k in weights)
    assert saved is not None
    assert sorted(saved["training"]) == ["B", "C"]
    for metrics in saved["training"].values():
        assert protocol.TrainReply.from_fields(metrics).num_examples == 2 * 3 * 1
    assert saved["missing"] == {}


def test_train_sources_sends_the_seeded_initial_weights(full_run: PipelineRun) -> None:
    # Prepare
    expected = build_initial_weights(full_run.config)

    # Execute
    sent = full_run.grid.sent_of_type(protocol.TRAIN_SOURCE)

    # Assert
    assert sorted(m.metadata.dst_node_id for m in sent) == [12, 13]
    for message in sent:
        weights = records.read_weights(message.content)
        assert manifest_of(weights) == manifest_of(expected)
        assert all(np.array_equal(weights[k], expected[k]) for k in expected)


def test_train_sources_proceeds_without_a_failing_source(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    config = build_config(run_config, **{"federation.min-sites": 2})
    grid = build_grid(federation, run_config, {**NODES, BROKEN_NODE: "D"})
    coordinator = build_coordinator(grid, config, tmp_path)
    sources = {
        12: site_info(12, "B"),
        13: site_info(13, "C"),
        BROKEN_NODE: site_info(BROKEN_NODE, "D"),
    }

    # Execute
    _, models = phases.source_training.run(coordinator, sources)

    # Assert
    assert sorted(models) == ["B", "C"]
    saved = coordinator.store.load_phase("source-training")
    assert sorted(saved["training"]) == ["B", "C"]
    assert list(saved["missing"]) == ["D"]
    assert saved["missing"]["D"].startswith(f"error {protocol.SITE_ERROR_CODE}: ")
    assert "site folder not found" in saved["missing"]["D"]
    assert not (coordinator.store.run_dir / "models" / "source-D.npz").exists()


@pytest.mark.parametrize(
    ("min_sites", "sources", "drop", "expected"),
    [
        (
            3,
            {12: "B", 13: "C", BROKEN_NODE: "D"},
            (),
            r"2 source model\(s\) arrived, 3",
        ),
        (2, {12: "B", BROKEN_NODE: "D"}, (), r"1 source model\(s\) arrived, 2 needed"),
        (2, {12: "B", 13: "C"}, (12,), r"1 source model\(s\) arrived, 2 needed"),
    ],
    ids=["min-sites-3-one-error", "two-sources-one-error", "two-sources-one-silent"],
)
def test_train_sources_fails_when_too_few_models_arrive(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    min_sites: int,
    sources: dict[int, str],
    drop: tuple[int, ...],
    expected: str,
) -> None:
    # Prepare
    config = build_config(run_config, **{"federation.min-sites": min_sites})
    grid = build_grid(federation, run_config, {**NODES, BROKEN_NODE: "D"}, drop=drop)
    coordinator = build_coordinator(grid, config, tmp_path)
    infos = {node: site_info(node, name) for node, name in sources.items()}
    failing = "D" if BROKEN_NODE in sources else "B"

    # Execute / Assert
    with pytest.raises(PhaseError, match=expected) as caught:
        phases.source_training.run(coordinator, infos)
    assert f"'{failing}'" in str(caught.value)
    assert coordinator.store.load_phase("source-training") is None


def test_train_sources_reports_a_silent_source_as_timed_out(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    config = build_config(run_config, **{"federation.reply-timeout-s": 2.5})
    grid = build_grid(federation, run_config, drop=[13])
    coordinator = build_coordinator(grid, config, tmp_path)
    sources = {12: site_info(12, "B"), 13: site_info(13, "C")}

    # Execute
    with pytest.raises(PhaseError) as caught:
        phases.source_training.run(coordinator, sources)

    # Assert: min-sites 2 of 2 sources; C is named with the reason
    assert "'C': 'no reply within 2.5 s'" in str(caught.value)


# ------------------------------------------------------------------ affinity (SeqTran)


def test_affinity_profiles_every_site_and_fine_tunes_along_the_path(
    full_run: PipelineRun,
) -> None:
    # Prepare
    result = full_run.affinity
    saved = full_run.store.load_phase("affinity")
    nodes = {site.name: node for node, site in full_run.sites.items()}

    # Execute
    profiled = full_run.grid.sent_of_type(protocol.PROFILE)
    finetuned = full_run.grid.sent_of_type(protocol.FINETUNE)

    # Assert: every site published; the path starts at a source and ends at A
    assert sorted(m.metadata.dst_node_id for m in profiled) == [11, 12, 13]
    assert set(result.profiles) == {"A", "B", "C"}
    assert result.matrices["sites"] == ["B", "C", "A"]
    assert result.matrices["label_term"] is True  # every site holds labelled cases
    distance = np.array(result.matrices["distance"])
    assert distance.shape == (3, 3)
    assert np.all(np.diag(distance) == 0.0)
    assert np.all(distance >= 0.0)
    assert result.path is not None
    path = list(result.path.nodes)
    assert path[0] in ("B", "C")
    assert path[-1] == "A"
    assert len(path) <= 3
    # Fine-tuned at each later site of the path, then at the labelled target.
    expected_steps = [*path[1:-1], "A"]
    assert [step["site"] for step in result.steps] == expected_steps
    assert [m.metadata.dst_node_id for m in finetuned] == [
        nodes[name] for name in expected_steps
    ]
    first = records.read_weights(finetuned[0].content)
    start = full_run.source_models[path[0]]
    assert all(np.array_equal(first[k], start[k]) for k in start)
    transferred = full_run.models[phases.affinity.SEQTRAN_CANDIDATE]
    assert manifest_of(transferred) == manifest_of(start)
    assert any(not np.array_equal(transferred[k], start[k]) for k in start)
    assert result.model == phases.affinity.SEQTRAN_CANDIDATE
    assert result.stopped is None
    # A's 2 labelled cases chose the path (the polarity term: the defaults weigh it
    # and not the label term) and trained the last step.
    assert result.matrices["weights"]["label"] == 0.0
    assert result.matrices["polarity_term"] is True
    assert result.label_use == LabelUse(
        via=(
            "SeqTran path chosen with A's polarity term (2 labelled cases)",
            "SeqTran candidate fine-tuned at A on 2 labelled cases",
        ),
        cases=2,
    )
    assert result.label_use.group == FEW_LABEL
    graph = result.matrices["graph"]
    assert graph["landmarks"] == "case-fraction"
    assert graph["communities"] == []
    assert graph["one_factor_removed"] == []
    assert path[0] in graph["starts"]
    assert saved == json.loads(json.dumps(to_strict_json(result.to_document())))
    assert full_run.store.load_result(AffinityResult) == result


def test_affinity_refused_finetune_leaves_the_run_going_without_a_model(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: every site's policy leaves train.finetune unanswered
    sites_dir = Path(shutil.copytree(federation, tmp_path / "federation"))
    answers = [action for action in ACTIONS if action != protocol.FINETUNE]
    for name in "ABC":
        write_policy(sites_dir / name, {"actions.answer": answers})
    config = load_run_config(run_config)
    grid = build_grid(sites_dir, run_config)
    coordinator = build_coordinator(grid, config, tmp_path / "1")
    _, sites = phases.discovery.discover(
        coordinator, nodes=grid.get_node_ids(), default_target="A"
    )
    target_site = next(site for site in sites.values() if site.name == "A")
    models = {"B": build_initial_weights(config), "C": build_initial_weights(config)}

    # Execute
    result, transferred = phases.affinity.run(coordinator, sites, target_site, models)

    # Assert
    assert transferred is None
    assert result.model is None
    assert result.path is not None
    assert result.stopped is not None
    assert result.stopped.startswith("step 1 at ")
    assert "'train.finetune' is not in actions.answer" in result.stopped
    assert coordinator.store.load_phase("affinity") is not None


def test_affinity_without_the_targets_profile_records_why(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: the target (node 11) never replies to anything
    config = load_run_config(run_config)
    grid = build_grid(federation, run_config, drop=[11])
    coordinator = build_coordinator(grid, config, tmp_path / "1")
    sites = {node: site_info(node, name) for node, name in NODES.items()}
    models = {"B": build_initial_weights(config)}

    # Execute
    result, transferred = phases.affinity.run(coordinator, sites, sites[11], models)

    # Assert
    assert transferred is None
    assert result.stopped == "no profile from the target A"
    assert result.missing == {
        "A": f"no reply within {config.federation.reply_timeout_s:g} s"
    }
    assert grid.sent_of_type(protocol.FINETUNE) == []


def hello_as(node: int, name: str, modality: str, label: str) -> SiteInfo:
    info = site_info(node, name)
    hello = dataclasses.replace(
        info.hello, modality=modality, class_names=("background", label)
    )
    return SiteInfo(node, hello)


@pytest.mark.parametrize(
    ("communities", "path", "stopped"),
    [
        # One community {B, C}; B and C tie on the landmark score, B wins by name;
        # B -> C -> A keeps to the steps the one-factor rule left.
        (1, ["B", "C", "A"], None),
        (
            3,
            None,
            "no transfer path: affinity.communities = 3 is more than the 2 sources "
            "['B', 'C']; set it to at most 2",
        ),
    ],
)
def test_affinity_with_communities_records_them_and_the_removed_steps(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    communities: int,
    path: list[str] | None,
    stopped: str | None,
) -> None:
    # Prepare: B (CT, tumour) differs from the target A (MR, organ) in both factors,
    # from C (CT, organ) in the label only
    config = build_config(
        run_config,
        **{
            "affinity.landmarks": "communities",
            "affinity.communities": communities,
            "affinity.one-factor-edges": True,
        },
    )
    grid = build_grid(federation, run_config)
    coordinator = build_coordinator(grid, config, tmp_path / "1")
    sites = {
        11: hello_as(11, "A", "MR", "organ"),
        12: hello_as(12, "B", "CT", "tumour"),
        13: hello_as(13, "C", "CT", "organ"),
    }
    models = {"B": build_initial_weights(config), "C": build_initial_weights(config)}

    # Execute
    result, transferred = phases.affinity.run(coordinator, sites, sites[11], models)

    # Assert
    assert result.stopped == stopped
    if path is None:
        assert result.path is None
        assert transferred is None
        assert "graph" not in result.matrices
        return
    assert result.path is not None
    assert list(result.path.nodes) == path
    assert result.matrices["graph"] == {
        "landmarks": "communities",
        "starts": ["B"],
        "communities": [{"members": ["B", "C"], "landmark": "B"}],
        "one_factor_removed": [["A", "B"]],
    }
    assert transferred is not None


def test_affinity_rejects_a_source_named_like_the_candidate(
    full_run: PipelineRun, tmp_path: Path
) -> None:
    # Prepare
    coordinator = build_coordinator(full_run.grid, full_run.config, tmp_path / "1")
    target = next(site for site in full_run.sites.values() if site.name == "A")

    # Execute / Assert
    with pytest.raises(PhaseError, match="a source site is named 'seqtran'"):
        phases.affinity.run(
            coordinator,
            full_run.sites,
            target,
            {phases.affinity.SEQTRAN_CANDIDATE: full_run.source_models["B"]},
        )


def test_path_for_an_unlabelled_target_uses_the_image_term_only(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Prepare: A's profile without its label term (nor, then, a polarity term)
    config = load_run_config(run_config)
    settings = profile_settings(config.affinity)
    profiles = {name: build_site_profile(federation / name, settings) for name in "ABC"}
    profiles["A"] = dataclasses.replace(
        profiles["A"],
        mean_label_map=None,
        foreground_quantiles=None,
        num_labelled=0,
        foreground_intensities=None,
        shell_intensities=None,
    )

    # Execute
    choice, matrices = phases.affinity.choose_affinity_path(
        config, profiles, ["C", "B"], "A", factors={}
    )
    image_only = config.affinity.image_weight * np.array(
        normalise(*affinity_matrices(profiles, with_labels=False))[0].values
    )

    # Assert
    assert matrices["label_term"] is False
    assert matrices["label_similarity"] is None
    assert matrices["weights"]["label"] == 0.0
    assert matrices["polarity_term"] is False
    assert matrices["weights"]["polarity"] == 0.0
    order = [list("ABC").index(name) for name in matrices["sites"]]
    np.testing.assert_allclose(
        matrices["distance"], image_only[np.ix_(order, order)], atol=1e-12
    )
    assert choice.path.nodes[-1] == "A"


# ------------------------------------------------------------------- transferability


def test_transferability_chooses_main_and_aux_by_dtm(full_run: PipelineRun) -> None:
    # Prepare
    selection = full_run.selection
    saved = full_run.store.load_phase("transferability")
    index = index_site(Path(str(full_run.config.federation.dir)) / "A")

    # Execute
    ranked = sorted(selection.dtm, key=lambda name: (-selection.dtm[name], name))

    # Assert
    assert selection.metric == "lftm"
    # The SeqTran candidate is scored beside the source models.
    assert selection.sources == ("B", "C", phases.affinity.SEQTRAN_CANDIDATE)
    assert set(selection.dtm) == {"B", "C", phases.affinity.SEQTRAN_CANDIDATE}
    assert all(0.0 <= value <= 1.0 for value in selection.dtm.values())
    # TGMA proper chooses among the label-free candidates only; the few-label
    # choice among all of them, the SeqTran candidate (fine-tuned at A) included.
    assert selection.candidates == {
        "B": LabelUse(),
        "C": LabelUse(),
        phases.affinity.SEQTRAN_CANDIDATE: full_run.affinity.label_use,
    }
    label_free = [name for name in ranked if name in ("B", "C")]
    assert selection.label_free.candidates == ("B", "C")
    assert (selection.label_free.main, selection.label_free.aux) == tuple(label_free)
    assert selection.label_free.label_use == LabelUse()
    few = selection.few_label
    assert few is not None
    assert few.candidates == ("B", "C", phases.affinity.SEQTRAN_CANDIDATE)
    assert (few.main, few.aux) == (ranked[0], ranked[1])
    assert few.label_use == full_run.affinity.label_use
    for pair in (selection.label_free, few):
        weights = pair.weights
        assert weights.main + weights.aux == pytest.approx(1.0)
        assert weights.main >= weights.aux >= 0.0
    # The default site policy releases only the per-source means (domain level).
    assert selection.release == "domain"
    assert selection.itm is None
    assert index.num_cases > 0
    assert saved is not None
    assert saved["dtm"] == pytest.approx(selection.dtm)
    assert saved["label_free"]["main"] == selection.label_free.main
    assert saved["few_label"]["candidates"] == list(few.candidates)
    # What the runner reloads on resume is what the phase returned.
    assert full_run.store.load_result(TransferabilityResult) == selection


def test_transferability_sends_only_source_models_to_the_target(
    full_run: PipelineRun,
) -> None:
    # Prepare / Execute
    sent = full_run.grid.sent_of_type(protocol.LFTM)

    # Assert
    assert [m.metadata.dst_node_id for m in sent] == [11]
    assert set(sent[0].content.keys()) == {"model.B", "model.C", "model.seqtran"}


def test_transferability_keeps_the_agreement_and_lets_every_candidate_vote(
    full_run: PipelineRun,
) -> None:
    # Prepare
    selection = full_run.selection
    sent = full_run.grid.sent_of_type(protocol.ADAPT)

    # Assert: the paper's rule (full_run's); the target sent its agreement matrix
    assert selection.selection == "dtm"
    assert selection.agreement is not None
    matrix = np.array(selection.agreement)
    assert matrix.shape == (3, 3)
    np.testing.assert_allclose(matrix, matrix.T)
    assert ((matrix >= 0.0) & (matrix <= 1.0)).all()
    # every candidate of each choice went to its adaptation, to vote
    assert len(sent) == len(selection.selections)
    for pair, message in zip(selection.selections, sent, strict=True):
        assert pair.voting == pair.candidates
        assert {key for key in message.content if key.startswith("model.")} == {
            f"model.{name}" for name in pair.candidates
        }


def test_agreement_selection_sends_only_the_voters_to_adaptation(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    full_run: PipelineRun,
) -> None:
    # Prepare: no two distinct candidates agree perfectly, so each main stands alone
    config = build_config(
        run_config,
        **{"transfer.selection": "agreement", "transfer.agreement-threshold": 1.0},
    )
    grid = build_grid(federation, run_config)
    log: list[str] = []
    coordinator = build_coordinator(grid, config, tmp_path, log)
    target = site_info(11, "A")

    # Execute
    selection = phases.transferability.run(
        coordinator, target, full_run.models, full_run.selection.candidates
    )
    _, adapted = phases.adaptation.run(coordinator, target, full_run.models, selection)

    # Assert
    assert selection.selection == "agreement"
    for pair in selection.selections:
        assert (pair.aux, pair.voters) == (None, (pair.main,))
        assert (pair.weights.main, pair.weights.aux) == (1.0, 0.0)
    sent = grid.sent_of_type(protocol.ADAPT)
    assert [
        {key for key in message.content if key.startswith("model.")} for message in sent
    ] == [{f"model.{pair.main}"} for pair in selection.selections]
    assert "adapted:main" in adapted
    assert "adapted:aux" not in adapted
    assert coordinator.store.load_result(TransferabilityResult) == selection
    assert any("agreement selection" in line for line in log)


@pytest.mark.parametrize("phase", ["transferability", "adaptation", "evaluation"])
def test_target_phase_fails_naming_the_target(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    full_run: PipelineRun,
    phase: str,
) -> None:
    # Prepare
    config = build_config(run_config)
    grid = build_grid(federation, run_config, {BROKEN_NODE: "D"})
    coordinator = build_coordinator(grid, config, tmp_path)
    target = site_info(BROKEN_NODE, "D")
    models, selection = full_run.models, full_run.selection
    calls = {
        "transferability": lambda: phases.transferability.run(
            coordinator, target, models, full_run.selection.candidates
        ),
        "adaptation": lambda: phases.adaptation.run(
            coordinator, target, models, selection
        ),
        "evaluation": lambda: phases.evaluation.run(
            coordinator,
            target,
            models,
            full_run.adapted,
            selection,
            label_use=phases.evaluation.model_label_use(selection),
        ),
    }

    # Execute / Assert
    with pytest.raises(PhaseError, match=rf"{phase}: target D failed: error 100: "):
        calls[phase]()
    assert coordinator.store.load_phase(phase) is None


def test_target_that_never_replies_times_out(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    full_run: PipelineRun,
) -> None:
    # Prepare
    config = build_config(run_config)
    grid = build_grid(federation, run_config, drop=[11])
    coordinator = build_coordinator(grid, config, tmp_path)

    # Execute / Assert
    with pytest.raises(PhaseError, match=r"target A failed: no reply within 3600 s"):
        phases.transferability.run(
            coordinator,
            site_info(11, "A"),
            full_run.models,
            full_run.selection.candidates,
        )


# ------------------------------------------------------------------ adaptation, eval


def test_adaptation_returns_and_persists_adapted_models(full_run: PipelineRun) -> None:
    # Prepare
    selection = full_run.selection
    saved = full_run.store.load_phase("adaptation")
    messages = full_run.grid.sent_of_type(protocol.ADAPT)

    # Execute
    requests = [
        protocol.AdaptRequest.from_fields(
            message.content.config_records[protocol.REQUEST_KEY]
        )
        for message in messages
    ]
    sent = [
        {protocol.model_name(key) for key in message.content.array_records}
        for message in messages
    ]

    # Assert: label-free TGMA gets the label-free candidates alone (its pseudo-labels
    # mix no model that saw A's labels); the few-label one gets every candidate
    assert sent == [{"B", "C"}, {"B", "C", phases.affinity.SEQTRAN_CANDIDATE}]
    assert selection.few_label is not None
    for request, pair in zip(
        requests, (selection.label_free, selection.few_label), strict=True
    ):
        assert request.main == pair.main
        assert request.aux == (pair.aux or "")
        assert request.weight_main + request.weight_aux == pytest.approx(1.0)
    assert set(full_run.adapted) == {
        "adapted:main",
        "adapted:aux",
        "adapted-few-label:main",
        "adapted-few-label:aux",
    }
    for name, weights in full_run.adapted.items():
        assert manifest_of(weights) == manifest_of(full_run.models["B"])
        stored = name.replace(":", "-")
        assert (full_run.store.run_dir / "models" / f"{stored}.npz").is_file()
    adaptation = full_run.adaptation
    assert adaptation.label_free.label_use == LabelUse()
    assert adaptation.few_label is not None
    assert adaptation.few_label.label_use == full_run.affinity.label_use
    assert full_run.store.load_result(AdaptationResult) == adaptation
    assert phases.adaptation.reload(full_run.store, adaptation).keys() == (
        full_run.adapted.keys()
    )
    assert saved is not None
    for pair in ("label_free", "few_label"):
        assert protocol.AdaptReply.from_fields(saved[pair]).num_examples == 2 * 3 * 1


CONSENSUS_MODELS = {f"consensus:{method}" for method in protocol.CONSENSUS_METHODS}


def test_consensus_sends_sources_and_adapted_main_and_persists(
    full_run: PipelineRun,
) -> None:
    # Prepare
    saved = full_run.store.load_phase("consensus")

    # Execute
    (message,) = full_run.grid.sent_of_type(protocol.CONSENSUS)
    request = protocol.ConsensusRequest.from_fields(
        message.content.config_records[protocol.REQUEST_KEY]
    )
    sent_models = {protocol.model_name(key) for key in message.content.array_records}

    # Assert: the labels stay at the target; figures and trained models come back.
    # The label sources are the label-free candidates: the SeqTran one is left out.
    assert request.label_sources == ("B", "C")
    assert request.start == ADAPTED_START
    assert sent_models == {"B", "C", ADAPTED_START}
    assert full_run.consensus_result.label_use == LabelUse()
    assert set(full_run.consensus) == set(protocol.CONSENSUS_METHODS)
    for method, weights in full_run.consensus.items():
        assert manifest_of(weights) == manifest_of(full_run.models["B"])
        assert (full_run.store.run_dir / "models" / f"consensus-{method}.npz").is_file()
    assert saved is not None
    assert saved["sources"] == ["B", "C"]
    assert saved["label_use"] == {"via": [], "cases": 0, "atlases": 0}
    assert saved["models"] == sorted(protocol.CONSENSUS_METHODS)
    assert set(saved["label_dice"]) == set(protocol.CONSENSUS_METHODS)
    assert all(0.0 <= value <= 1.0 for value in saved["label_dice"].values())
    assert saved["num_images"] == 2 + 6  # A's training and evaluation images
    (reply_entry,) = [
        entry
        for entry in full_run.coordinator.ledger.entries()
        if entry.message_type == protocol.CONSENSUS and entry.direction == "ingress"
    ]
    assert reply_entry.egress is not None
    assert len(reply_entry.egress.arrays) == len(full_run.consensus) * len(
        full_run.models["B"]
    )


def test_consensus_refused_by_a_dp_target_is_skipped_and_the_run_goes_on(
    full_run: PipelineRun,
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
) -> None:
    # Prepare: the target's policy requires DP, which DeepSTAPLE has no form of
    grid = build_grid(federation, run_config)
    policy = write_policy(tmp_path, {"dp.required": True})
    grid.contexts[11].node_config["policy"] = str(policy)
    grid.contexts[11].node_config["state-dir"] = str(tmp_path / "state")
    log: list[str] = []
    coordinator = build_coordinator(grid, full_run.config, tmp_path / "run", log)
    target = site_info(11, "A")

    # Execute
    result, trained = phases.consensus.run(
        coordinator,
        target,
        {"B": full_run.models["B"]},
        full_run.adapted,
        candidates={"B": LabelUse()},
        start=LabelUse(),
    )

    # Assert: nothing was trained, the phase says why, and the report shows it
    assert trained == {}
    assert result.models == ()
    assert result.label_use == LabelUse()
    assert result.skipped is not None
    assert "no-dp-form" in result.skipped
    assert coordinator.store.load_result(ConsensusResult) == result
    saved = coordinator.store.load_phase("consensus")
    assert saved is not None
    assert saved["models"] == []
    assert "no-dp-form" in saved["skipped"]
    assert any(
        line.startswith("consensus: skipped, the target refused") for line in log
    )
    report = build_report(
        run_id=1,
        config={},
        results=RunResults(consensus=result),
        phase_seconds={},
    )
    assert (
        "Skipped: the target refused it (error 101: blocked by egress policy: "
        "no-dp-form" in format_markdown(report)
    )


def add_atlas(site: Path, source: Path) -> None:
    """Give ``site`` one atlas: ``source``'s first labelled case."""
    case = index_site(source).labelled[0]
    assert case.label_path is not None
    (site / "atlases" / "imagesTr").mkdir(parents=True)
    (site / "atlases" / "labelsTr").mkdir()
    shutil.copy(case.image_path, site / "atlases" / "imagesTr" / "atlas_0000.nii.gz")
    shutil.copy(case.label_path, site / "atlases" / "labelsTr" / "atlas.nii.gz")


@pytest.mark.parametrize("setting", ["all-label-sources", "target-atlas"])
def test_consensus_is_few_label_with_a_few_label_source_or_an_atlas(
    full_run: PipelineRun,
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    setting: str,
) -> None:
    # Prepare: the SeqTran candidate labels too, or A holds an atlas (B's case)
    sites_dir = Path(shutil.copytree(federation, tmp_path / "federation"))
    overrides: dict[str, ConfigValue] = {}
    if setting == "all-label-sources":
        overrides["consensus.label-sources"] = "all"
    else:
        add_atlas(sites_dir / "A", sites_dir / "B")
    grid = build_grid(sites_dir, run_config)
    config = build_config(run_config, **overrides)
    coordinator = build_coordinator(grid, config, tmp_path / "run")

    # Execute
    result, trained = phases.consensus.run(
        coordinator,
        site_info(11, "A"),
        full_run.models,
        full_run.adapted,
        candidates=full_run.selection.candidates,
        start=full_run.adaptation.label_free.label_use,
    )

    # Assert: the consensus models are few-label, and say through what
    (message,) = grid.sent_of_type(protocol.CONSENSUS)
    request = protocol.ConsensusRequest.from_fields(
        message.content.config_records[protocol.REQUEST_KEY]
    )
    assert set(trained) == set(protocol.CONSENSUS_METHODS)
    assert result.label_use.group == FEW_LABEL
    if setting == "all-label-sources":
        assert request.label_sources == ("B", "C", phases.affinity.SEQTRAN_CANDIDATE)
        assert result.label_use == full_run.affinity.label_use
    else:
        assert request.label_sources == ("B", "C")
        assert result.sources == ("B", "C", "atlas-1")
        assert result.label_use == LabelUse(
            via=("consensus with labels registered from 1 of A's atlases",),
            atlases=1,
        )


SEMISUP_MODELS = {"semisup:target", "semisup:federated"}


def test_semisup_refines_at_the_target_and_runs_federated_rounds(
    full_run: PipelineRun,
) -> None:
    # Prepare
    saved = full_run.store.load_phase("semisup")
    config = full_run.config.semisup
    student_manifest = get_manifest(
        build_dual_task_model(full_run.config.model, full_run.config.data)
    )

    # Execute
    sent = full_run.grid.sent_of_type(protocol.SEMISUP)
    requests = [
        protocol.SemisupRequest.from_fields(
            m.content.config_records[protocol.REQUEST_KEY]
        )
        for m in sent
    ]

    # Assert: one target message, then one per site and round
    assert len(sent) == 1 + config.rounds * 3
    assert [(r.scope, r.round) for r in requests[:2]] == [
        ("target", 1),
        ("federated", 1),
    ]
    for message in sent:
        weights = records.read_weights(message.content)
        assert manifest_of(weights) == student_manifest
    assert set(full_run.semisup) == {"target", "federated"}
    for scope, weights in full_run.semisup.items():
        assert manifest_of(weights) == manifest_of(full_run.models["B"])
        assert (full_run.store.run_dir / "models" / f"semisup-{scope}.npz").is_file()
    assert saved is not None
    assert saved["start"] == ADAPTED_START
    assert saved["target"]["site"] == "A"
    assert saved["target"]["num-labelled"] == 2
    federated = saved["federated"]
    assert federated["sites"] == ["A", "B", "C"]
    assert federated["stopped"] is None
    assert [entry["round"] for entry in federated["rounds"]] == [0, 1, 2]
    for entry in federated["rounds"]:
        assert set(entry["dice"]) == {"A", "B", "C"}
        assert all(0.0 <= value <= 1.0 for value in entry["dice"].values())
    assert set(federated["rounds"][1]["train"]) == {"A", "B", "C"}
    # Each site keeps its own teacher in its node state, never sent.
    for node, context in full_run.grid.contexts.items():
        if node in full_run.sites:
            assert "semisup.teacher.federated" in context.state.array_records
    target_node = next(n for n, s in full_run.sites.items() if s.name == "A")
    assert "semisup.teacher.target" in (
        full_run.grid.contexts[target_node].state.array_records
    )
    # Both students trained on A's 2 labelled cases: few-label.
    assert full_run.semisup_result.label_use == {
        "federated": LabelUse(
            via=("federated UG-MCL rounds trained at A on 2 labelled cases",),
            cases=2,
        ),
        "target": LabelUse(via=("UG-MCL refined at A on 2 labelled cases",), cases=2),
    }


def test_semisup_rounds_average_the_students_by_samples(
    full_run: PipelineRun,
) -> None:
    # Prepare: round 2's messages carry round 1's FedAvg of the three students
    round_two = [
        m
        for m in full_run.grid.sent_of_type(protocol.SEMISUP)
        if m.content.config_records[protocol.REQUEST_KEY]["round"] == 2
    ]

    # Execute
    students = [records.read_weights(m.content) for m in round_two]

    # Assert: every site got the same average
    assert len(students) == 3
    for student in students[1:]:
        for name, value in student.items():
            np.testing.assert_array_equal(value, students[0][name])


def test_semisup_refused_everywhere_leaves_the_run_going(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: every site's own policy leaves train.semisup unanswered
    sites_dir = Path(shutil.copytree(federation, tmp_path / "federation"))
    answers = [action for action in ACTIONS if action != protocol.SEMISUP]
    for name in "ABC":
        write_policy(sites_dir / name, {"actions.answer": answers})
    config = load_run_config(run_config)
    grid = build_grid(sites_dir, run_config)
    coordinator = build_coordinator(grid, config, tmp_path / "1")
    discovered, sites = phases.discovery.discover(
        coordinator, nodes=grid.get_node_ids(), default_target="A"
    )
    target = discovered.target
    target_site = next(site for site in sites.values() if site.name == target)

    # Execute
    result, models = phases.semisup.run(
        coordinator, sites, target_site, {}, start_use=LabelUse()
    )

    # Assert: recorded, and nothing raised
    saved = coordinator.store.load_phase("semisup")
    assert models == {}
    assert result.label_use == {}
    assert saved is not None
    assert saved["start"] == "initial"
    assert "'train.semisup' is not in actions.answer" in saved["target"]["missing"]
    assert saved["federated"]["stopped"].startswith("round 1: 0 site(s) replied")
    assert [entry["round"] for entry in saved["federated"]["rounds"]] == [0]


def test_semisup_sites_must_name_answering_sites(
    full_run: PipelineRun, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    config = build_config(run_config, **{"semisup.sites": "A,Z"})
    coordinator = build_coordinator(full_run.grid, config, tmp_path / "1")

    # Execute / Assert
    with pytest.raises(
        PhaseError, match=re.escape("semisup.sites names ['Z'], which did not answer")
    ):
        phases.semisup.semisup_federated(coordinator, full_run.sites, {})


def test_semisup_sites_must_hold_labels(
    tmp_path: Path, full_run: PipelineRun, run_config: dict[str, ConfigValue]
) -> None:
    # Prepare: B said it holds no labelled case
    config = build_config(run_config, **{"semisup.sites": "A,B"})
    coordinator = build_coordinator(full_run.grid, config, tmp_path / "1")
    sites = {11: site_info(11, "A"), 12: site_info(12, "B", labelled=0)}

    # Execute / Assert
    with pytest.raises(PhaseError, match=r"names \['B'\], which hold no labelled"):
        phases.semisup.semisup_federated(coordinator, sites, {})


def test_evaluation_scores_every_predictor_and_persists(full_run: PipelineRun) -> None:
    # Prepare
    label_free = {"source:B", "source:C", "uniform", "tgma", "tgma-main"}
    label_free |= CONSENSUS_MODELS
    few_label = {"source:seqtran", "tgma-few-label", "tgma-few-label-main"}
    few_label |= SEMISUP_MODELS
    expected = label_free | few_label
    saved = full_run.store.load_phase("evaluation")

    # Execute
    (message,) = [
        m
        for m in full_run.grid.sent_of_type(protocol.EVALUATE)
        if "predictors" in m.content.config_records[protocol.REQUEST_KEY]
        and "tgma" in m.content.config_records[protocol.REQUEST_KEY]["predictors"]
    ]
    sent_models = {protocol.model_name(key) for key in message.content.array_records}

    # Assert
    assert sent_models == {
        "source:B",
        "source:C",
        "source:seqtran",
        "adapted:main",
        "adapted:aux",
        "adapted-few-label:main",
        "adapted-few-label:aux",
        *CONSENSUS_MODELS,
        *SEMISUP_MODELS,
    }
    request = protocol.EvaluateRequest.from_fields(
        message.content.config_records[protocol.REQUEST_KEY]
    )
    assert request.predictors["uniform"] == [("source:B", 0.5), ("source:C", 0.5)]
    # The target wrote TGMA's segmentation of each of its images at home.
    assert request.segment == "tgma"
    target_dir = Path(str(full_run.config.federation.dir)) / "A"
    index = index_site(target_dir)
    images = (*index.training_images, *index.evaluation_images)
    assert full_run.evaluation.segmented == "tgma"
    assert full_run.evaluation.segmentations == len(images)
    folder = (
        target_dir
        / ".sitebridge"
        / "segmentations"
        / f"run-{full_run.evaluation.segmentations_run}"
    )
    assert sorted(path.name for path in folder.glob("*.nii.gz")) == sorted(
        f"{case.case_id}.nii.gz" for case in images
    )
    assert full_run.evaluation.site == "A"
    assert full_run.evaluation.num_cases == 6
    assert set(full_run.evaluation.dice) == expected
    assert all(0.0 <= v <= 1.0 for v in full_run.evaluation.dice.values())
    assert saved is not None
    assert set(saved["dice"]) == expected
    # Each predictor's provenance, from what its models went through
    uses = full_run.evaluation.label_use
    assert {name for name, use in uses.items() if use.group == LABEL_FREE} == (
        label_free
    )
    assert {name for name, use in uses.items() if use.group == FEW_LABEL} == (few_label)
    seqtran_use = full_run.affinity.label_use
    for name in ("source:seqtran", "tgma-few-label", "tgma-few-label-main"):
        assert uses[name] == seqtran_use
    assert uses["semisup:target"].via == ("UG-MCL refined at A on 2 labelled cases",)
    assert all(use.cases == 2 for use in uses.values() if not use.label_free)
    assert full_run.store.load_result(EvaluationResult) == full_run.evaluation


def test_phases_log_one_line_each(full_run: PipelineRun) -> None:
    # Prepare / Execute
    text = "\n".join(full_run.log)

    # Assert
    for fragment in (
        "discover: sites",
        "source training at",
        "DTM ",
        "affinity: path ",
        "adaptation (label-free, candidates B, C):",
        "adaptation (few-label, candidates B, C, seqtran):",
        "consensus:",
        "semisup at target A:",
        "semisup round 2/2:",
        "evaluation:",
    ):
        assert fragment in text


FINE_TUNED = LabelUse(via=("fine-tuned at A on 2 labelled cases",), cases=2)


def selection_of(
    main: str, aux: str | None, weight: float, *, few_label: str | None = None
) -> TransferabilityResult:
    """A transferability result choosing ``main`` (weight) and ``aux`` (the rest).

    ``few_label`` names a candidate that used the target's labels: the few-label
    choice is then ``few_label`` as main and ``main`` as aux, at the same weights.
    """
    names = (main,) if aux is None else (main, aux)
    weights = PairWeights(main=weight, aux=round(1.0 - weight, 10))
    candidates = {name: LabelUse() for name in names}
    few: PairSelection | None = None
    if few_label is not None:
        candidates[few_label] = FINE_TUNED
        few = PairSelection(
            candidates=(*names, few_label),
            main=few_label,
            aux=main,
            weights=weights,
            label_use=FINE_TUNED,
        )
    return TransferabilityResult(
        metric="lftm",
        release="domain",
        sources=tuple(candidates),
        itm=None,
        dtm={},
        candidates=candidates,
        label_free=PairSelection(
            candidates=names, main=main, aux=aux, weights=weights, label_use=LabelUse()
        ),
        few_label=few,
    )


LABEL_FREE_ADAPTED = ("adapted:main", "adapted:aux")
BOTH_ADAPTED = (*LABEL_FREE_ADAPTED, "adapted-few-label:main", "adapted-few-label:aux")
BUILD_PREDICTOR_CASES = [
    (
        selection_of("B", "C", 0.6),
        LABEL_FREE_ADAPTED,
        {
            "source:B": [("source:B", 1.0)],
            "source:C": [("source:C", 1.0)],
            "uniform": [("source:B", 0.5), ("source:C", 0.5)],
            "tgma": [("adapted:main", 0.6), ("adapted:aux", 0.4)],
            "tgma-main": [("adapted:main", 1.0)],
        },
    ),
    (
        selection_of("B", None, 1.0),
        ("adapted:main",),
        {
            "source:B": [("source:B", 1.0)],
            "uniform": [("source:B", 1.0)],
            "tgma": [("adapted:main", 1.0)],
            "tgma-main": [("adapted:main", 1.0)],
        },
    ),
    (
        selection_of("C", "B", 0.7, few_label="seqtran"),
        BOTH_ADAPTED,
        {
            "source:B": [("source:B", 1.0)],
            "source:C": [("source:C", 1.0)],
            "source:seqtran": [("source:seqtran", 1.0)],
            # the uniform average of the label-free candidates only
            "uniform": [("source:B", 0.5), ("source:C", 0.5)],
            "tgma": [("adapted:main", 0.7), ("adapted:aux", 0.3)],
            "tgma-main": [("adapted:main", 1.0)],
            "tgma-few-label": [
                ("adapted-few-label:main", 0.7),
                ("adapted-few-label:aux", 0.3),
            ],
            "tgma-few-label-main": [("adapted-few-label:main", 1.0)],
        },
    ),
    (
        selection_of("C", "B", 0.7, few_label="seqtran"),
        (),
        {
            "source:B": [("source:B", 1.0)],
            "source:C": [("source:C", 1.0)],
            "source:seqtran": [("source:seqtran", 1.0)],
            "uniform": [("source:B", 0.5), ("source:C", 0.5)],
        },
    ),
]


@pytest.mark.parametrize(
    ("selection", "adapted", "expected"),
    BUILD_PREDICTOR_CASES,
    ids=["pair", "main-only", "with-few-label", "not-adapted"],
)
def test_build_predictors(
    selection: TransferabilityResult,
    adapted: tuple[str, ...],
    expected: dict[str, list[tuple[str, float]]],
) -> None:
    # Prepare / Execute
    predictors = phases.evaluation.build_predictors(selection, adapted=adapted)

    # Assert
    assert predictors == expected
    request = protocol.EvaluateRequest(predictors=predictors)
    assert protocol.EvaluateRequest.from_fields(request.to_fields()) == request


def three_voters(selection: str) -> TransferabilityResult:
    """Four label-free candidates; main D and aux C, with B voting too."""
    names = ("B", "C", "D", "E")
    return TransferabilityResult(
        metric="lftm",
        release="domain",
        sources=names,
        itm=None,
        dtm={},
        candidates={name: LabelUse() for name in names},
        label_free=PairSelection(
            candidates=names,
            main="D",
            aux="C",
            weights=PairWeights(main=0.6, aux=0.4),
            label_use=LabelUse(),
            voters=("B", "C", "D"),
        ),
        few_label=None,
        selection=selection,
    )


@pytest.mark.parametrize("min_voters", [2, 3])
def test_build_predictors_predicts_by_the_voters_when_enough_agree(
    min_voters: int,
) -> None:
    # Execute
    predictors = phases.evaluation.build_predictors(
        three_voters("agreement"),
        adapted=LABEL_FREE_ADAPTED,
        ensemble_min_voters=min_voters,
    )

    # Assert: TGMA is the voters' average; the adapted pair is still reported.
    third = 1.0 / 3.0
    assert predictors["tgma"] == [
        ("source:B", third),
        ("source:C", third),
        ("source:D", third),
    ]
    assert predictors["tgma-pair"] == [("adapted:main", 0.6), ("adapted:aux", 0.4)]
    assert predictors["tgma-main"] == [("adapted:main", 1.0)]
    assert predictors["uniform"] == [(f"source:{n}", 0.25) for n in "BCDE"]


@pytest.mark.parametrize(
    ("selection", "min_voters"),
    [("agreement", 4), ("agreement", 0), ("dtm", 3)],
    ids=["too-few-voters", "never", "paper-rule"],
)
def test_build_predictors_keeps_the_pair_otherwise(
    selection: str, min_voters: int
) -> None:
    # Execute
    predictors = phases.evaluation.build_predictors(
        three_voters(selection),
        adapted=LABEL_FREE_ADAPTED,
        ensemble_min_voters=min_voters,
    )

    # Assert
    assert predictors["tgma"] == [("adapted:main", 0.6), ("adapted:aux", 0.4)]
    assert "tgma-pair" not in predictors


def test_transferability_refuses_when_no_candidate_is_label_free(
    full_run: PipelineRun,
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
) -> None:
    # Prepare: say that every candidate saw A's labels
    grid = build_grid(federation, run_config)
    coordinator = build_coordinator(grid, full_run.config, tmp_path / "1")
    target = site_info(11, "A")

    # Execute / Assert
    with pytest.raises(
        PhaseError,
        match=r"^transferability: every candidate \(B, C\) used the target's labels, "
        r"so there is no label-free TGMA$",
    ):
        phases.transferability.run(
            coordinator,
            target,
            {"B": full_run.models["B"], "C": full_run.models["C"]},
            {"B": FINE_TUNED, "C": FINE_TUNED},
        )
    assert coordinator.store.load_phase("transferability") is None


# -------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def written_report(full_run: PipelineRun) -> tuple[dict[str, Any], str]:
    store = full_run.store
    results = store.load_results()
    report = build_report(
        run_id=1,
        config={"train.epochs": 1},
        results=RunResults(
            discover=results.discover,
            source_training=results.source_training,
            affinity=results.affinity,
            transferability=full_run.selection,
            adaptation=results.adaptation,
            consensus=results.consensus,
            semisup=results.semisup,
            evaluation=full_run.evaluation,
        ),
        phase_seconds={"discover": 0.1, "source-training": 1.0},
    )
    markdown = write_report(store, report)
    return report, markdown


def test_report_json_holds_sites_transferability_and_dice(
    full_run: PipelineRun, written_report: tuple[dict[str, Any], str]
) -> None:
    # Prepare
    path = full_run.store.run_dir / "report.json"

    # Execute
    document = json.loads(path.read_text())

    # Assert
    assert [(s["name"], s["role"]) for s in document["sites"]] == [
        ("A", "target"),
        ("B", "source"),
        ("C", "source"),
    ]
    for site in document["sites"]:
        assert site["cases"] == {"labelled": 2, "unlabelled": 0, "evaluation": 6}
    transfer = document["transferability"]
    assert {"dtm", "candidates", "label_free", "few_label"} <= set(transfer)
    assert set(transfer["dtm"]) == {"B", "C", phases.affinity.SEQTRAN_CANDIDATE}
    chosen = transfer["label_free"]
    assert chosen["main"] == full_run.selection.label_free.main
    assert chosen["weights"]["main"] + chosen["weights"]["aux"] == pytest.approx(1)
    assert transfer["few_label"]["label_use"]["cases"] == 2
    dice = document["evaluation"]["dice"]
    assert {"source:B", "source:C", "uniform", "tgma"} <= set(dice)
    # One field per predictor gives its group
    groups = document["evaluation"]["groups"]
    assert set(groups) == set(dice)
    assert groups == {
        name: use.group for name, use in full_run.evaluation.label_use.items()
    }
    assert groups["tgma"] == "label-free"
    assert groups["tgma-few-label"] == "few-label"
    assert document["target"] == "A"
    assert document["missing"] == {"discover": {}, "source-training": {}}
    assert document == json.loads(json.dumps(written_report[0]))


def test_report_writes_markdown_and_plots(
    full_run: PipelineRun, written_report: tuple[dict[str, Any], str]
) -> None:
    # Prepare
    report, markdown = written_report

    # Execute
    formatted = format_markdown(report)

    # Assert
    assert formatted == markdown
    assert (full_run.store.run_dir / "report.md").read_text() == markdown
    assert "Target site **A**" in markdown
    assert f"main **{full_run.selection.label_free.main}**" in markdown
    assert "among the label-free candidates (B, C)" in markdown
    assert "Few-label TGMA, with seqtran (which used the target's labels)" in markdown
    for name in ("source:B", "source:C", "uniform", "tgma", "tgma-few-label"):
        assert f"| {name} |" in markdown
    assert (
        f"A wrote `tgma`'s segmentation of each of its "
        f"{full_run.evaluation.segmentations} images as NIfTI" in markdown
    )
    for plot in ("dtm.png", "dice.png"):
        path = full_run.store.run_dir / plot
        assert path.read_bytes()[:8] == PNG_MAGIC


def markdown_groups(markdown: str) -> dict[str, list[str]]:
    """The evaluation tables of a report.md: heading -> predictors, in order."""
    evaluation = markdown.split("## Evaluation on ", 1)[1].split("\n## ", 1)[0]
    groups: dict[str, list[str]] = {}
    heading = ""
    for line in evaluation.splitlines():
        if line.startswith("### "):
            heading = line.removeprefix("### ")
            groups[heading] = []
        elif heading and line.startswith("| ") and not line.startswith("| predictor"):
            groups[heading].append(line.split(" | ", 1)[0].removeprefix("| "))
    return groups


def test_report_never_puts_a_few_label_predictor_under_label_free(
    full_run: PipelineRun, written_report: tuple[dict[str, Any], str]
) -> None:
    # Prepare
    _, markdown = written_report
    uses = full_run.evaluation.label_use

    # Execute
    groups = markdown_groups(markdown)

    # Assert: two tables, each holding exactly its group, every predictor once
    assert list(groups) == [
        "label-free",
        "few-label (used 2 labelled target cases)",
    ]
    assert groups["label-free"] == [name for name in uses if uses[name].label_free]
    few = groups["few-label (used 2 labelled target cases)"]
    assert few == [name for name in uses if not uses[name].label_free]
    assert sorted(groups["label-free"] + few) == sorted(full_run.evaluation.dice)
    assert "source:seqtran" in few
    assert "semisup:target" in few
    assert "| source:seqtran | " in markdown.split("### few-label", 1)[1]
    assert "SeqTran candidate fine-tuned at A on 2 labelled cases |" in markdown
    # The sections of the few-label models say so too
    assert "(few-label: SeqTran path chosen with A's polarity term" in markdown
    assert "the consensus models are label-free" in markdown


def test_report_of_a_label_free_run_has_one_group(full_run: PipelineRun) -> None:
    # Prepare: the evaluation as if every predictor were label-free
    evaluation = dataclasses.replace(
        full_run.evaluation,
        label_use={name: LabelUse() for name in full_run.evaluation.dice},
    )

    # Execute
    markdown = format_markdown(
        build_report(
            run_id=4,
            config={},
            results=RunResults(evaluation=evaluation),
            phase_seconds={},
        )
    )

    # Assert
    assert list(markdown_groups(markdown)) == ["label-free"]
    assert "### few-label" not in markdown


def test_report_lists_missing_sites(full_run: PipelineRun) -> None:
    # Prepare
    store = full_run.store
    results = store.load_results()
    assert results.source_training is not None
    source_training = dataclasses.replace(
        results.source_training, missing={"D": "no reply within 3600 s"}
    )

    # Execute
    report = build_report(
        run_id=2,
        config={},
        results=dataclasses.replace(results, source_training=source_training),
        phase_seconds={},
    )
    markdown = format_markdown(report)

    # Assert
    assert report["missing"]["source-training"] == {"D": "no reply within 3600 s"}
    assert "## Missing sites" in markdown
    assert "- source-training: D: no reply within 3600 s" in markdown


def reject_constant(token: str) -> float:
    raise ValueError(f"{token} is not valid JSON")


def test_report_json_is_valid_json_when_hd95_is_undefined(
    full_run: PipelineRun, tmp_path: Path
) -> None:
    # Prepare
    store = RunStore(tmp_path / "run")
    evaluation = dataclasses.replace(
        full_run.evaluation,
        hd95_mm={name: float("nan") for name in full_run.evaluation.dice},
    )
    report = build_report(
        run_id=3,
        config={},
        results=dataclasses.replace(
            full_run.store.load_results(), evaluation=evaluation
        ),
        phase_seconds={},
    )

    # Execute
    write_report(store, report)

    # Assert
    text = (store.run_dir / "report.json").read_text()
    json.loads(text, parse_constant=reject_constant)


# -------------------------------------------------------------------------- ledgers


def site_ledger(run: PipelineRun, site: str) -> Ledger:
    """The site's own ledger (these contexts set no state-dir: the default)."""
    folder = Path(str(run.config.federation.dir)) / site
    return Ledger(folder / ".sitebridge" / "ledger.jsonl")


def test_coordinator_ledger_records_each_request_and_reply(
    full_run: PipelineRun,
) -> None:
    # Prepare
    path = full_run.store.run_dir / "ledger.jsonl"
    sent = full_run.grid.sent
    finetuned = [step["site"] for step in full_run.affinity.steps]
    expected_sequence = []
    for message_type, count in (
        (protocol.HELLO, 3),
        (protocol.TRAIN_SOURCE, 2),
        (protocol.PROFILE, 3),
        *[(protocol.FINETUNE, 1)] * len(finetuned),
        (protocol.LFTM, 1),
        (protocol.ADAPT, 1),  # label-free TGMA
        (protocol.ADAPT, 1),  # then with the SeqTran candidate (few-label)
        (protocol.CONSENSUS, 1),
        (protocol.SEMISUP, 1),  # at the target
        (protocol.EVALUATE, 3),  # round 0 of the federated rounds
        (protocol.SEMISUP, 3),
        (protocol.EVALUATE, 3),
        (protocol.SEMISUP, 3),
        (protocol.EVALUATE, 3),
        (protocol.EVALUATE, 1),  # the evaluation phase
    ):
        expected_sequence += [(EGRESS, message_type)] * count
        expected_sequence += [(INGRESS, message_type)] * count

    # Execute
    result = verify_ledger(path)
    entries = Ledger(path).entries()

    # Assert
    assert result.ok, result.problem
    assert [(e.direction, e.message_type) for e in entries] == expected_sequence
    requests = [e for e in entries if e.direction == EGRESS]
    assert len(requests) == len(sent) == 29 + len(finetuned)
    assert all(e.sender == COORDINATOR for e in requests)
    assert [e.egress.digest for e in requests if e.egress] == [
        measure_content(m.content, message_type=m.metadata.message_type).egress.digest
        for m in sent
    ]
    replies = sorted(
        (e.message_type, e.sender) for e in entries if e.direction == INGRESS
    )
    assert replies == sorted(
        [(protocol.HELLO, name) for name in "ABC"]
        + [(protocol.TRAIN_SOURCE, name) for name in "BC"]
        + [(protocol.PROFILE, name) for name in "ABC"]
        + [(protocol.FINETUNE, name) for name in finetuned]
        + [(protocol.ADAPT, "A")]
        + [
            (t, "A")
            for t in (
                protocol.LFTM,
                protocol.ADAPT,
                protocol.CONSENSUS,
                protocol.SEMISUP,
                protocol.EVALUATE,
            )
        ]
        # the federated rounds: 2 rounds of training, 3 of evaluation, at each site
        + [(protocol.SEMISUP, name) for name in "ABC"] * 2
        + [(protocol.EVALUATE, name) for name in "ABC"] * 3
    )


def test_each_reply_received_matches_the_sites_own_ledger_entry(
    full_run: PipelineRun,
) -> None:
    # Prepare
    received = [
        entry
        for entry in Ledger(full_run.store.run_dir / "ledger.jsonl").entries()
        if entry.direction == INGRESS
    ]

    # Execute
    site_entries = {site: site_ledger(full_run, site).entries() for site in "ABC"}

    # Assert
    for site in "ABC":
        result = verify_ledger(site_ledger(full_run, site).path)
        assert result.ok, result.problem
    for entry in received:
        assert entry.egress is not None
        released = {
            site_entry.egress.digest: site_entry
            for site_entry in site_entries[entry.sender]
            if site_entry.released
            and site_entry.egress is not None
            and site_entry.message_type == entry.message_type
        }
        assert entry.egress.digest in released, (entry.sender, entry.message_type)
        match = released[entry.egress.digest]
        assert match.egress == entry.egress
        assert match.sender == entry.sender
        assert match.policy == full_run.coordinator.applied_policies[entry.sender]


def test_every_reply_is_anchored_in_its_sites_ledger(full_run: PipelineRun) -> None:
    # Prepare
    coordinator = Ledger(full_run.store.run_dir / "ledger.jsonl").entries()

    # Execute
    matches = {
        site: match_ledgers(
            site_ledger(full_run, site).entries(), coordinator, site=site
        )
        for site in "ABC"
    }

    # Assert: requests are "sent", replies "received" with the site entry's anchor,
    # and each site's ledger holds every anchor with the same hash and digest
    assert {entry.decision for entry in coordinator if entry.direction == EGRESS} == {
        "sent"
    }
    replies = [entry for entry in coordinator if entry.direction == INGRESS]
    assert {entry.decision for entry in replies} == {"received"}
    assert all(entry.anchor is not None for entry in replies)
    for site, match in matches.items():
        assert match.ok, (site, match.problems)
        assert match.anchors == sum(entry.sender == site for entry in replies)
        assert match.not_received == ()


def test_coordinator_keeps_each_sites_applied_policy(full_run: PipelineRun) -> None:
    # Prepare / Execute
    applied = full_run.coordinator.applied_policies

    # Assert
    assert sorted(applied) == ["A", "B", "C"]
    for fields in applied.values():
        assert all(key.startswith(protocol.APPLIED_POLICY_PREFIX) for key in fields)
        policy = AppliedPolicy.from_fields(fields)
        assert policy.lftm_release is LftmRelease.DOMAIN
        assert policy.weights_may_leave
        assert not policy.dp_required
