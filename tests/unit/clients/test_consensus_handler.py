"""The ``train.consensus`` action through the site's real ClientApp, guard included.

Target A (or a copy holding atlases) is sent B's and C's tiny source models and an
``adapted:main`` model; its state (ledger, consensus labels) lives in a tmp folder
given as node config ``state-dir``. The guard's check of the names a consensus reply
may use (methods, ``atlas-<k>``) is also driven directly, with a stand-in handler.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from clients import records
from clients.app import app as site_app
from clients.guard import declared_manifest, egress_guard
from core import protocol
from core.config import ConfigValue, RunConfig, load_run_config
from core.consensus import job as consensus_job
from core.consensus.registration import RegistrationSettings
from core.data.dataset import index_site
from core.privacy.ledger import Ledger, verify_ledger
from core.privacy.policy import Rule
from core.training.job import build_initial_weights, train_source_model
from core.training.networks import Arrays, Manifest
from tests.unit.clients.messages import (
    MESSAGE_ID,
    assert_site_error,
    build_candidates,
    build_message,
    build_site_context,
    reason_of,
    write_policy,
)

TARGET: Final = "A"
SOURCES: Final = ("B", "C")
START: Final = "adapted:main"
REQUEST: Final = protocol.ConsensusRequest(label_sources=SOURCES, start=START)
MODEL_KEYS: Final = {
    protocol.model_key(method) for method in protocol.CONSENSUS_METHODS
}


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config(run_config: dict[str, ConfigValue]) -> RunConfig:
    return load_run_config(run_config)


@pytest.fixture(scope="module")
def manifest(config: RunConfig) -> Manifest:
    return declared_manifest(config.model, config.data)


@pytest.fixture(scope="module")
def models(federation: Path, config: RunConfig) -> dict[str, Arrays]:
    """B's and C's tiny source models, and the run's initial weights as the start."""
    initial = build_initial_weights(config)
    trained = {
        name: train_source_model(
            federation / name, config, initial_weights=initial
        ).weights
        for name in SOURCES
    }
    return {**trained, START: initial}


@pytest.fixture(scope="module")
def atlas_site(federation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of A holding one atlas: B's first labelled case."""
    site = Path(
        shutil.copytree(federation / TARGET, tmp_path_factory.mktemp("atlas") / "A")
    )
    case = index_site(federation / "B").labelled[0]
    assert case.label_path is not None
    (site / "atlases" / "imagesTr").mkdir(parents=True)
    (site / "atlases" / "labelsTr").mkdir()
    shutil.copy(
        case.image_path, site / "atlases" / "imagesTr" / f"{case.case_id}_0000.nii.gz"
    )
    shutil.copy(
        case.label_path, site / "atlases" / "labelsTr" / f"{case.case_id}.nii.gz"
    )
    return site


def consensus_message(models: Mapping[str, Arrays]) -> Message:
    """:data:`REQUEST` with ``models``' weights."""
    content = build_candidates(models)
    # build_candidates takes scalar settings; label-sources is a list.
    content[protocol.REQUEST_KEY] = ConfigRecord(dict(REQUEST.to_fields()))
    return build_message(content, protocol.CONSENSUS)


def reply_text(message: Message) -> str:
    """Every key and scalar value a reply carries, as one string."""
    parts: list[str] = []
    for key, record in message.content.items():
        parts.append(key)
        if isinstance(record, ArrayRecord):
            parts.extend(record.keys())
        else:
            parts.extend(f"{name}={value!r}" for name, value in record.items())
    return "\n".join(parts)


def assert_blocked(reply: Message, rule: Rule, *fragments: str) -> None:
    reason = reason_of(reply)
    assert reply.has_error()
    assert reply.error.code == protocol.EGRESS_BLOCKED_CODE, reason[:500]
    assert reply.metadata.reply_to_message_id == MESSAGE_ID
    assert f"{rule.value} (" in reason, reason[:500]
    for fragment in fragments:
        assert fragment in reason, reason[:500]


@dataclasses.dataclass(frozen=True)
class Served:
    """One train.consensus request answered by the real app at A."""

    state_dir: Path
    reply: Message


@pytest.fixture(scope="module")
def served(
    federation: Path,
    run_config: dict[str, ConfigValue],
    models: dict[str, Arrays],
    tmp_path_factory: pytest.TempPathFactory,
) -> Served:
    state_dir = tmp_path_factory.mktemp("served") / "state"
    context = build_site_context(run_config, federation / TARGET, state_dir)
    return Served(state_dir, site_app(consensus_message(models), context))


# --------------------------------------------------------------- the real handler


def test_consensus_reply_carries_aggregates_and_one_model_per_method(
    served: Served, manifest: Manifest
) -> None:
    # Prepare
    reply = served.reply
    assert not reply.has_error(), reply.error.reason

    # Execute
    result = protocol.ConsensusReply.from_fields(reply.content[protocol.METRICS_KEY])

    # Assert
    assert reply.metadata.reply_to_message_id == MESSAGE_ID
    assert result.num_images == 8
    assert result.num_atlases == 0
    assert tuple(result.data_parameter) == SOURCES
    assert tuple(result.staple_sensitivity) == SOURCES
    assert tuple(result.agreement) == SOURCES
    assert tuple(result.label_dice) == protocol.CONSENSUS_METHODS
    assert all(0.0 <= value <= 1.0 for value in result.label_dice.values())
    assert set(reply.content.array_records) == MODEL_KEYS
    for key in MODEL_KEYS:
        weights = records.from_array_record(reply.content.array_records[key])
        assert {name: tuple(array.shape) for name, array in weights.items()} == (
            manifest
        )
    assert set(reply.content.keys()) == {
        protocol.METRICS_KEY,
        protocol.REPLY_KEY,  # the applied policy, added by the guard
        *MODEL_KEYS,
    }


def test_consensus_reply_names_no_case(served: Served, federation: Path) -> None:
    # Prepare
    index = index_site(federation / TARGET)
    case_ids = [c.case_id for c in (*index.labelled, *index.evaluation)]

    # Execute
    text = reply_text(served.reply)

    # Assert
    assert len(case_ids) == 8
    assert [case_id for case_id in case_ids if case_id in text] == []


def test_consensus_labels_stay_in_the_sites_state_folder(
    served: Served, federation: Path
) -> None:
    # Prepare
    folder = served.state_dir / "consensus" / "run-1"
    training = index_site(federation / TARGET).labelled

    # Execute
    written = sorted(path.name for path in (folder / "deepstaple").iterdir())

    # Assert
    assert written == sorted(f"{case.case_id}.nii.gz" for case in training)
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        protocol.CONSENSUS_METHODS
    )
    assert not (federation / TARGET / "consensus").exists()


def test_consensus_reply_is_recorded_in_the_ledger(served: Served) -> None:
    # Prepare
    path = served.state_dir / "ledger.jsonl"

    # Execute
    (entry,) = Ledger(path).entries()

    # Assert
    assert entry.message_type == protocol.CONSENSUS
    assert entry.released
    assert entry.sender == TARGET
    assert entry.egress is not None
    assert {release.record for release in entry.egress.arrays} == MODEL_KEYS
    assert "metrics/data-parameter.B" in entry.egress.metrics
    assert verify_ledger(path).ok


def test_atlas_names_pass_the_guard(
    atlas_site: Path,
    run_config: dict[str, ConfigValue],
    models: dict[str, Arrays],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the default registration takes ~3 s per image on 2 cores
    fast = RegistrationSettings(
        affine_iterations=10,
        bspline_iterations=2,
        shrink_factors=(2,),
        smoothing_sigmas_voxels=(1.0,),
    )
    monkeypatch.setattr(consensus_job, "RegistrationSettings", lambda: fast)
    context = build_site_context(
        run_config,
        atlas_site,
        tmp_path / "state",
        run_overrides={"consensus.baselines": False},
    )

    # Execute
    reply = site_app(consensus_message(models), context)

    # Assert
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content[protocol.METRICS_KEY]
    assert "data-parameter.atlas-1" in metrics
    assert "label-dice.deepstaple" in metrics
    result = protocol.ConsensusReply.from_fields(metrics)
    assert result.num_atlases == 1
    assert tuple(result.data_parameter) == (*SOURCES, "atlas-1")
    assert set(reply.content.array_records) == {protocol.model_key("deepstaple")}
    assert "b_000" not in reply_text(reply)  # the atlas's case name stays home
    (entry,) = Ledger(tmp_path / "state" / "ledger.jsonl").entries()
    assert entry.released


def test_weights_may_not_leave_refuses_consensus_before_it_runs(
    federation: Path,
    run_config: dict[str, ConfigValue],
    models: dict[str, Arrays],
    tmp_path: Path,
) -> None:
    # Prepare
    policy = write_policy(tmp_path, {"release.weights-may-leave": False})
    state_dir = tmp_path / "state"
    context = build_site_context(
        run_config, federation / TARGET, state_dir, policy=policy
    )

    # Execute
    reply = site_app(consensus_message(models), context)

    # Assert
    assert_blocked(
        reply,
        Rule.WEIGHTS_MAY_NOT_LEAVE,
        "a 'train.consensus' reply is trained weights",
        "weights-may-leave is false in the site's policy; nothing was run",
    )
    assert sorted(path.name for path in state_dir.iterdir()) == ["ledger.jsonl"]
    (entry,) = Ledger(state_dir / "ledger.jsonl").entries()
    assert entry.decision == f"blocked: {Rule.WEIGHTS_MAY_NOT_LEAVE.value}"
    # Only the refusal's reason left, and the entry says so.
    assert entry.egress is not None
    assert entry.egress.arrays == ()


def test_error_start_model_not_sent_and_the_node_keeps_serving(
    federation: Path,
    run_config: dict[str, ConfigValue],
    models: dict[str, Arrays],
    tmp_path: Path,
) -> None:
    # Prepare
    sent = {name: models[name] for name in SOURCES}
    context = build_site_context(run_config, federation / TARGET, tmp_path / "state")

    # Execute
    failed = site_app(consensus_message(sent), context)
    answered = site_app(build_message(RecordDict(), protocol.HELLO, "m2"), context)

    # Assert
    assert_site_error(
        failed,
        "ValueError",
        "models ['adapted:main'] are named in the request but were not sent",
        "(sent: ['B', 'C'])",
    )
    assert not (tmp_path / "state" / "consensus").exists()
    assert not answered.has_error(), answered.error.reason
    assert answered.metadata.reply_to_message_id == "m2"
    first, second = Ledger(tmp_path / "state" / "ledger.jsonl").entries()
    assert (first.message_type, first.decision) == (protocol.CONSENSUS, "error")
    assert (second.message_type, second.released) == (protocol.HELLO, True)


# ------------------------------------------------- the guard's consensus names


def stand_in_reply(names: Mapping[str, str], manifest: Manifest) -> RecordDict:
    """A consensus reply whose wildcard fields use ``names`` (prefix -> name)."""
    reply = protocol.ConsensusReply(
        num_images=8,
        num_labels=48,
        num_atlases=1,
        seconds=1.0,
        data_parameter={"B": 0.1, "C": 0.2, "atlas-1": 0.0},
        staple_sensitivity={"B": 0.9, "C": 0.8, "atlas-1": 0.7},
        agreement={"B": 0.9, "C": 0.8, "atlas-1": 0.7},
        label_dice=dict.fromkeys(protocol.CONSENSUS_METHODS, 0.5),
        spearman_dp=0.1,
        spearman_staple=0.2,
    )
    metrics = reply.to_fields()
    metrics.update({f"{prefix}.{name}": 0.5 for prefix, name in names.items()})
    content = RecordDict({protocol.METRICS_KEY: MetricRecord(metrics)})  # type: ignore[arg-type]
    weights = {name: np.zeros(shape, np.float32) for name, shape in manifest.items()}
    for method in protocol.CONSENSUS_METHODS:
        content[protocol.model_key(method)] = records.to_array_record(weights)
    return content


@pytest.mark.parametrize(
    ("site", "names", "blocked"),
    [
        ("atlases", {}, None),
        ("atlases", {"data-parameter": "atlas-9"}, "atlas-9"),
        ("atlases", {"label-dice": "patient-x"}, "patient-x"),
        # A case name is redacted even in a refusal: its index goes out instead.
        ("atlases", {"agreement": "b_000"}, "case #"),
        ("plain", {}, "atlas-1"),  # A itself holds no atlas
    ],
    ids=["declared", "atlas-beyond-count", "patient-name", "atlas-case-id", "no-atlas"],
)
def test_guard_lets_consensus_name_only_methods_and_held_atlases(
    federation: Path,
    atlas_site: Path,
    run_config: dict[str, ConfigValue],
    manifest: Manifest,
    tmp_path: Path,
    site: str,
    names: dict[str, str],
    blocked: str | None,
) -> None:
    # Prepare
    def stand_in(message: Message, _context: Context) -> Message:
        return Message(stand_in_reply(names, manifest), reply_to=message)

    guarded = ClientApp(mods=[egress_guard])
    guarded.train("consensus")(stand_in)
    site_dir = atlas_site if site == "atlases" else federation / TARGET
    context = build_site_context(run_config, site_dir, tmp_path / "state")
    request = RecordDict(
        {
            protocol.REQUEST_KEY: ConfigRecord(dict(REQUEST.to_fields())),
            **{protocol.model_key(name): ArrayRecord() for name in (*SOURCES, START)},
        }
    )

    # Execute
    reply = guarded(build_message(request, protocol.CONSENSUS), context)

    # Assert
    (entry,) = Ledger(tmp_path / "state" / "ledger.jsonl").entries()
    if blocked is None:
        assert not reply.has_error(), reply.error.reason
        assert entry.released
    else:
        assert_blocked(
            reply,
            Rule.UNDECLARED_FIELD,
            f"names {blocked!r}" if blocked != "case #" else "names 'case #",
            "which is not a model or predictor of the request",
        )
        assert "b_000" not in reply.error.reason
        assert entry.decision == f"blocked: {Rule.UNDECLARED_FIELD.value}"
