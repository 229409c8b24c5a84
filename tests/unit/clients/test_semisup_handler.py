"""The ``train.semisup`` action through the site's real ClientApp, guard included.

Site A (two labelled cases in the tiny federation) is sent a student for two rounds
with one node Context, as a SuperNode keeps it between messages: the first round
leaves a teacher in the node state, the second uses it. A site whose policy requires
DP trains the supervised part with DP-SGD and spends epsilon in its accountant.
Refusals (budget, BatchNorm under DP, bad rounds, no labels) and the wire form of the
request are checked too.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients import records
from clients.app import app as site_app
from clients.guard import declared_student_manifest
from core import protocol
from core.config import ConfigValue, RunConfig, load_run_config
from core.data.dataset import index_site
from core.privacy.dp import ACCOUNTANT_FILE, read_accountant_state
from core.privacy.ledger import Ledger, verify_ledger
from core.semisup.job import initial_student_weights, load_semisup_data
from core.training.networks import Arrays
from tests.unit.clients.messages import (
    DP_POLICY,
    assert_site_error,
    build_message,
    build_site_context,
    write_policy,
)

SITE: Final = "A"
TEACHER_KEY: Final = "semisup.teacher.federated"
NORM_KEY: Final = "semisup.norm.federated"


@pytest.fixture(scope="module")
def config(run_config: dict[str, ConfigValue]) -> RunConfig:
    return load_run_config(run_config)


@pytest.fixture(scope="module")
def student(config: RunConfig) -> Arrays:
    return initial_student_weights(config)


def semisup_message(
    student: Arrays, *, round_number: int = 1, rounds: int = 2, iterations: int = 2
) -> Message:
    content = RecordDict()
    content[protocol.WEIGHTS_KEY] = records.to_array_record(student)
    content[protocol.REQUEST_KEY] = ConfigRecord(
        dict(
            protocol.SemisupRequest(
                scope="federated",
                round=round_number,
                rounds=rounds,
                iterations=iterations,
            ).to_fields()
        )
    )
    return build_message(content, protocol.SEMISUP)


@pytest.fixture(scope="module")
def two_rounds(
    federation: Path,
    run_config: dict[str, ConfigValue],
    student: Arrays,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Context, Path, list[Message]]:
    """Rounds 1 and 2 at A with one Context; (context, state folder, replies)."""
    state_dir = tmp_path_factory.mktemp("semisup") / "state"
    context = build_site_context(run_config, federation / SITE, state_dir)
    first = site_app(semisup_message(student, round_number=1), context)
    assert not first.has_error(), first.error.reason
    teacher_after_first = records.from_array_record(
        context.state.array_records[TEACHER_KEY]
    )
    second = site_app(
        semisup_message(records.read_weights(first.content), round_number=2), context
    )
    context.state["first-teacher"] = records.to_array_record(teacher_after_first)
    return context, state_dir, [first, second]


def test_semisup_reply_is_the_student_and_round_figures(
    two_rounds: tuple[Context, Path, list[Message]], config: RunConfig
) -> None:
    # Prepare
    _context, _state, replies = two_rounds
    manifest = declared_student_manifest(
        config.model, config.data, shared_head=config.semisup.shared_head
    )

    # Execute
    results = [
        protocol.SemisupReply.from_fields(reply.content[protocol.METRICS_KEY])
        for reply in replies
    ]

    # Assert
    for reply, result in zip(replies, results, strict=True):
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.keys()) == {
            protocol.METRICS_KEY,
            protocol.WEIGHTS_KEY,
            protocol.REPLY_KEY,  # the applied policy, added by the guard
        }
        weights = records.read_weights(reply.content)
        assert {name: value.shape for name, value in weights.items()} == manifest
        assert result.num_labelled == 2
        assert result.num_unlabelled == 0
        # No unlabelled image at A: each step draws labelled samples only.
        assert result.num_examples == 2 * config.semisup.labelled_batch
        assert np.isfinite(result.supervised_loss)
        assert 0.0 <= result.certain_fraction <= 1.0


def test_the_teacher_stays_in_the_node_state_and_carries_over(
    two_rounds: tuple[Context, Path, list[Message]],
) -> None:
    # Prepare
    context, _state, replies = two_rounds

    # Execute
    first = records.from_array_record(context.state.array_records["first-teacher"])
    second = records.from_array_record(context.state.array_records[TEACHER_KEY])
    sent = records.read_weights(replies[1].content)

    # Assert: round 2 moved the kept teacher on; it is not the student that left
    assert set(first) == set(second) == set(sent)
    assert any(not np.array_equal(first[name], second[name]) for name in first)
    assert any(not np.array_equal(second[name], sent[name]) for name in sent)


def test_semisup_replies_are_recorded_without_case_names(
    two_rounds: tuple[Context, Path, list[Message]], federation: Path
) -> None:
    # Prepare
    _context, state_dir, replies = two_rounds
    case_ids = [case.case_id for case in index_site(federation / SITE).labelled]

    # Execute
    entries = Ledger(state_dir / "ledger.jsonl").entries()
    text = "\n".join(str(dict(reply.content.metric_records)) for reply in replies)

    # Assert
    assert [entry.message_type for entry in entries] == [protocol.SEMISUP] * 2
    assert all(entry.released for entry in entries)
    assert verify_ledger(state_dir / "ledger.jsonl").ok
    assert [case_id for case_id in case_ids if case_id in text] == []


def test_labelled_fraction_sets_labels_aside(
    federation: Path,
    run_config: dict[str, ConfigValue],
    student: Arrays,
    tmp_path: Path,
) -> None:
    # Prepare: A's own policy keeps one of its two labelled cases labelled; the
    # run's semisup.labelled-fraction is the site's to set, so the run's 1.0 (the
    # default) does not count
    policy = write_policy(tmp_path, {"semisup.labelled-fraction": 0.5})
    context = build_site_context(
        run_config, federation / SITE, tmp_path / "state", policy=policy
    )

    # Execute
    reply = site_app(semisup_message(student, iterations=1), context)

    # Assert
    result = protocol.SemisupReply.from_fields(reply.content[protocol.METRICS_KEY])
    assert (result.num_labelled, result.num_unlabelled) == (1, 1)
    semisup = load_run_config(run_config).semisup
    assert result.num_examples == semisup.labelled_batch + semisup.unlabelled_batch


def test_a_site_that_requires_dp_trains_semisup_privately(
    federation: Path,
    run_config: dict[str, ConfigValue],
    student: Arrays,
    config: RunConfig,
    tmp_path: Path,
) -> None:
    # Prepare
    policy = write_policy(tmp_path, DP_POLICY)
    state = tmp_path / "state"
    context = build_site_context(run_config, federation / SITE, state, policy=policy)
    slices = len(load_semisup_data(federation / SITE, config).labelled)
    rate = min(1.0, config.semisup.labelled_batch / slices)

    # Execute: two rounds, the accountant persisted in between
    first = site_app(semisup_message(student, round_number=1), context)
    history_after_first = read_accountant_state(state / ACCOUNTANT_FILE).history
    second = site_app(
        semisup_message(records.read_weights(first.content), round_number=2), context
    )

    # Assert
    results = []
    for reply in (first, second):
        assert not reply.has_error(), reply.error.reason
        results.append(
            protocol.SemisupReply.from_fields(reply.content[protocol.METRICS_KEY])
        )
    assert history_after_first == ((2.0, rate, 2),)
    assert read_accountant_state(state / ACCOUNTANT_FILE).history == (
        (2.0, rate, 2),
        (2.0, rate, 2),
    )
    assert results[0].epsilon_spent > 0
    assert results[0].epsilon_total == pytest.approx(results[0].epsilon_spent)
    assert results[1].epsilon_total > results[0].epsilon_total
    assert results[1].epsilon_total == pytest.approx(
        read_accountant_state(state / ACCOUNTANT_FILE).epsilon(1e-5)
    )
    for result in results:
        assert result.private
        assert (result.noise_multiplier, result.delta) == (2.0, 1e-5)
        assert result.supervised_loss == 0.0  # withheld: outside the guarantee
        assert result.num_examples == round(2 * rate * slices)
    entries = Ledger(state / "ledger.jsonl").entries()
    assert [(e.epsilon_spent, e.epsilon_total) for e in entries] == [
        (r.epsilon_spent, r.epsilon_total) for r in results
    ]
    assert all(entry.released for entry in entries)
    assert TEACHER_KEY in context.state.array_records


def test_semisup_without_dp_spends_no_epsilon(
    two_rounds: tuple[Context, Path, list[Message]],
) -> None:
    # Prepare
    _context, state_dir, replies = two_rounds

    # Execute
    results = [
        protocol.SemisupReply.from_fields(reply.content[protocol.METRICS_KEY])
        for reply in replies
    ]

    # Assert: the dp.* keys are sent as zeros; no accountant file
    assert all(not result.private for result in results)
    assert all(result.epsilon_total == 0.0 for result in results)
    assert all(result.supervised_loss > 0 for result in results)
    assert not (state_dir / ACCOUNTANT_FILE).exists()


def test_a_dp_site_over_budget_refuses_semisup_before_training(
    federation: Path,
    run_config: dict[str, ConfigValue],
    student: Arrays,
    tmp_path: Path,
) -> None:
    # Prepare
    policy = write_policy(tmp_path, {**DP_POLICY, "dp.budget-epsilon": 0.01})
    state = tmp_path / "state"
    context = build_site_context(run_config, federation / SITE, state, policy=policy)

    # Execute
    reply = site_app(semisup_message(student), context)

    # Assert
    assert_site_error(
        reply,
        "PrivacyBudgetError: refused before training: the site's budget is epsilon "
        "0.01 at delta 1e-05; 0.000 is spent and this training (2 steps, noise 2.000",
    )
    assert not (state / ACCOUNTANT_FILE).exists()
    assert TEACHER_KEY not in context.state.array_records


def test_a_dp_site_refuses_semisup_for_a_batch_norm_model(
    federation: Path,
    run_config: dict[str, ConfigValue],
    student: Arrays,
    tmp_path: Path,
) -> None:
    # Prepare
    policy = write_policy(tmp_path, DP_POLICY)
    context = build_site_context(
        run_config,
        federation / SITE,
        tmp_path / "state",
        policy=policy,
        run_overrides={"model.norm": "batch"},
    )

    # Execute
    reply = site_app(semisup_message(student), context)

    # Assert
    assert_site_error(
        reply, "model.norm 'batch' keeps running statistics across samples"
    )
    assert not (tmp_path / "state" / ACCOUNTANT_FILE).exists()


def test_a_site_without_labels_refuses_semisup(
    federation: Path,
    run_config: dict[str, ConfigValue],
    student: Arrays,
    tmp_path: Path,
) -> None:
    # Prepare: a copy of A without labelsTr
    site = Path(shutil.copytree(federation / SITE, tmp_path / SITE))
    shutil.rmtree(site / "labelsTr")
    context = build_site_context(run_config, site, tmp_path / "state")

    # Execute
    reply = site_app(semisup_message(student), context)

    # Assert
    assert_site_error(reply, "no labelled training cases (labelsTr)")


def test_a_student_of_another_architecture_is_refused(
    federation: Path,
    run_config: dict[str, ConfigValue],
    student: Arrays,
    tmp_path: Path,
) -> None:
    # Prepare: the plain segmentation weights, without the distance head
    plain = {k: v for k, v in student.items() if not k.startswith("distance_head.")}
    context = build_site_context(run_config, federation / SITE, tmp_path / "state")

    # Execute
    reply = site_app(semisup_message(plain), context)

    # Assert
    assert_site_error(reply, "weights do not match the model manifest", "missing")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"scope": "local", "round": 1, "rounds": 1, "iterations": 1},
            "payload field 'scope' must be one of ('target', 'federated')",
        ),
        (
            {"scope": "target", "round": 3, "rounds": 2, "iterations": 1},
            "payload field 'round' must be in 1..rounds (2), got 3",
        ),
        (
            {"scope": "target", "round": 1, "rounds": 1, "iterations": 0},
            "payload field 'iterations' must be >= 1, got 0",
        ),
    ],
)
def test_semisup_request_is_validated(fields: dict[str, object], message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(message)):
        protocol.SemisupRequest.from_fields(fields)


def test_semisup_request_numbers_steps_across_rounds() -> None:
    # Prepare
    request = protocol.SemisupRequest(
        scope="federated", round=3, rounds=4, iterations=50
    )

    # Execute / Assert
    assert (request.start_step, request.total_steps) == (100, 200)
    assert protocol.SemisupRequest.from_fields(request.to_fields()) == request


def test_a_global_teacher_is_not_kept_and_local_norm_is(
    federation: Path,
    run_config: dict[str, ConfigValue],
    student: Arrays,
    tmp_path: Path,
) -> None:
    # Prepare: FedBN and a global teacher; round 2 is sent other norm parameters
    settings = {**run_config, "semisup.teacher": "global", "semisup.local-norm": True}
    context = build_site_context(settings, federation / SITE, tmp_path / "state")
    first = site_app(semisup_message(student, round_number=1), context)
    assert not first.has_error(), first.error.reason
    kept = records.from_array_record(context.state.array_records[NORM_KEY])
    sent = {
        name: value + (1.0 if name in kept else 0.0)
        for name, value in records.read_weights(first.content).items()
    }

    # Execute
    second = site_app(semisup_message(sent, round_number=2, iterations=1), context)

    # Assert: no teacher in the node state; the norm entries kept are the student's
    assert not second.has_error(), second.error.reason
    assert TEACHER_KEY not in context.state.array_records
    assert kept
    assert all(name.endswith((".weight", ".bias")) for name in kept)
    replied = records.read_weights(second.content)
    # One SGD step at the site's own values moves them far less than the +1 sent.
    assert all(np.abs(replied[name] - kept[name]).max() < 0.5 for name in kept)
