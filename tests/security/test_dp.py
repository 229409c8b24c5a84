"""Attack classes 4-6: getting labelled data out of a site that requires DP.

A site whose policy says ``dp.required = true`` must release nothing computed from
its labelled data except under DP, charged to its accountant (class 4): not through
an action with no DP form (``train.consensus``), not by a run config that asks for
less noise or no DP, not by a run's ``semisup.labelled-fraction`` that moves labelled
cases into the non-private part of UG-MCL. Two DP trainings sent at once must not
both fit a budget that holds one (class 5), and what the accountant records must be
exactly the mechanism that then ran (class 6: sample rate B/N and ceil(N/B) steps
per epoch, the Poisson loader's own schedule).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from typing import Final

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from clients import records
from core import protocol
from core.affinity.profile import build_site_profile, profile_settings
from core.config import ConfigValue, RunConfig, load_run_config
from core.data.dataset import build_slice_set, index_site
from core.privacy.dp import AccountantState
from core.privacy.limits import default_limits, whole_case_config
from core.privacy.policy import Rule
from core.semisup.job import initial_student_weights
from core.training.evaluation import evaluate_predictors
from core.training.networks import Arrays
from tests.security.attacker import (
    assert_refused,
    assert_released,
    assert_site_error,
    evaluate_content,
    metrics_of,
    with_request,
)
from tests.security.conftest import OpenSite
from tests.unit.clients.messages import DP_POLICY

NOISE: Final = 2.0  # DP_POLICY's dp.noise-multiplier
DELTA: Final = 1e-5  # the template's dp.delta
# What a coordinator puts in its run config to get exact answers from a DP site.
WEAKER_RUN: Final[dict[str, ConfigValue]] = {
    "privacy.dp": False,
    "privacy.noise-multiplier": 0.5,
}

Content = Callable[[dict[str, Arrays], RunConfig], RecordDict]


def weights_content(weights: Arrays) -> RecordDict:
    return RecordDict({protocol.WEIGHTS_KEY: records.to_array_record(weights)})


def semisup_content(models: dict[str, Arrays], config: RunConfig) -> RecordDict:
    content = weights_content(initial_student_weights(config))
    request = protocol.SemisupRequest(
        scope="federated", round=1, rounds=1, iterations=2
    )
    content[protocol.REQUEST_KEY] = ConfigRecord(dict(request.to_fields()))
    return content


def adapt_content(models: dict[str, Arrays], _config: RunConfig) -> RecordDict:
    request = protocol.AdaptRequest(main="m", aux="", weight_main=1.0, weight_aux=0.0)
    return with_request({"m": models["init"]}, request.to_fields())


DP_ACTIONS = [
    pytest.param(protocol.TRAIN_SOURCE, "B", lambda _m, _c: RecordDict(), id="source"),
    pytest.param(
        protocol.FINETUNE,
        "B",
        lambda m, _c: weights_content(m["init"]),
        id="finetune",
    ),
    pytest.param(protocol.ADAPT, "A", adapt_content, id="adapt"),
    pytest.param(protocol.SEMISUP, "A", semisup_content, id="semisup"),
    pytest.param(protocol.PROFILE, "A", lambda _m, _c: RecordDict(), id="profile"),
    pytest.param(
        protocol.EVALUATE,
        "A",
        lambda m, _c: evaluate_content({"fg": m["fg"]}, {"all": [("fg", 1.0)]}),
        id="evaluate",
    ),
]


@pytest.mark.parametrize(("message_type", "site_name", "content"), DP_ACTIONS)
def test_every_release_of_labelled_data_at_a_dp_site_is_private_and_charged(
    open_site: OpenSite,
    models: dict[str, Arrays],
    config: RunConfig,
    message_type: str,
    site_name: str,
    content: Content,
) -> None:
    # Prepare: the run config asks for no DP and little noise
    site = open_site(site_name, policy=DP_POLICY)

    # Execute
    reply = site.send(message_type, content(models, config), run_overrides=WEAKER_RUN)

    # Assert: the site's DP bound, and the release was charged to its accountant
    entry = assert_released(site, reply)
    metrics = metrics_of(reply)
    assert metrics["dp.noise-multiplier"] >= NOISE  # type: ignore[operator]
    assert metrics["dp.epsilon-spent"] > 0  # type: ignore[operator]
    accountant = site.accountant()
    assert len(accountant.history) == 1
    assert accountant.history[0][0] >= NOISE
    assert metrics["dp.epsilon-total"] == pytest.approx(accountant.epsilon(DELTA))
    assert entry.epsilon_spent == metrics["dp.epsilon-spent"]
    assert entry.policy["policy.dp.required"] is True


def test_consensus_at_a_dp_site_is_refused_before_any_work(
    open_site: OpenSite, models: dict[str, Arrays], handler_calls: list[str]
) -> None:
    # Prepare
    site = open_site("A", policy=DP_POLICY)
    request = protocol.ConsensusRequest(label_sources=("m",), start="m")

    # Execute
    reply = site.send(
        protocol.CONSENSUS,
        with_request({"m": models["init"]}, request.to_fields()),
        run_overrides=WEAKER_RUN,
    )

    # Assert
    assert_refused(
        site,
        reply,
        Rule.NO_DP_FORM,
        "this site requires DP (dp.required in the site's policy), and "
        "'train.consensus' has no DP form",
        "nothing was run",
    )
    assert handler_calls == []
    assert [name for name in site.state_files() if not name.startswith(".")] == [
        "ledger.jsonl"
    ]


@pytest.mark.parametrize(
    ("policy", "run_fraction", "labelled", "unlabelled"),
    [
        # The run asks to treat half of the labelled cases as unlabelled (no DP).
        pytest.param(DP_POLICY, 0.5, 2, 0, id="dp-run-fraction-ignored"),
        # The site's own fraction under DP: the case set aside is left out.
        pytest.param(
            {**DP_POLICY, "semisup.labelled-fraction": 0.5},
            1.0,
            1,
            0,
            id="dp-site-fraction-leaves-out",
        ),
        # Without DP the same setting makes the set-aside case an unlabelled one.
        pytest.param(
            {"semisup.labelled-fraction": 0.5},
            1.0,
            1,
            1,
            id="no-dp-site-fraction-moves",
        ),
    ],
)
def test_semisup_labelled_fraction_is_the_sites_and_never_leaks_past_dp(
    open_site: OpenSite,
    models: dict[str, Arrays],
    config: RunConfig,
    policy: dict[str, object],
    run_fraction: float,
    labelled: int,
    unlabelled: int,
) -> None:
    # Prepare: site A has two labelled training cases and no unlabelled one
    site = open_site("A", policy=policy)

    # Execute
    reply = site.send(
        protocol.SEMISUP,
        semisup_content(models, config),
        run_overrides={"semisup.labelled-fraction": run_fraction},
    )

    # Assert
    assert_released(site, reply)
    result = protocol.SemisupReply.from_fields(metrics_of(reply))
    assert (result.num_labelled, result.num_unlabelled) == (labelled, unlabelled)
    assert result.private == bool(policy.get("dp.required"))
    assert len(site.accountant().history) == int(result.private)


def test_evaluate_at_a_dp_site_releases_noised_dice_and_charges_each_predictor(
    open_site: OpenSite, models: dict[str, Arrays], config: RunConfig
) -> None:
    # Prepare: six predictors of the same model, and the site's exact Dice of it
    site = open_site("A", policy=DP_POLICY)
    predictors = {f"same-{k}": [("fg", 1.0)] for k in range(6)}
    exact = evaluate_predictors(
        site.directory,
        {"fg": models["fg"]},
        {"all": [("fg", 1.0)]},
        whole_case_config(config, default_limits()),
    )["all"].dice

    # Execute
    reply = site.send(
        protocol.EVALUATE, evaluate_content({"fg": models["fg"]}, predictors)
    )

    # Assert: each Dice noised (sd noise / 6 cases), HD95 withheld, 6 releases charged
    assert_released(site, reply)
    released = protocol.EvaluateReply.from_fields(metrics_of(reply))
    assert released.private
    assert set(released.dice.values()) != {round(exact, 3)}
    assert all(0.0 <= value <= 1.0 for value in released.dice.values())
    assert all(math.isnan(value) for value in released.hd95_mm.values())
    accountant = site.accountant()
    assert accountant.history == ((NOISE, 1.0, 6),)
    assert accountant.units_per_case == (1,)
    assert released.epsilon_spent == pytest.approx(accountant.epsilon(DELTA))


def test_a_profile_at_a_dp_site_is_noised_and_charged(open_site: OpenSite) -> None:
    # Prepare: the exact profile (what a site without DP would release)
    site = open_site("A", policy=DP_POLICY)
    config = load_run_config(site.run_config)
    exact = build_site_profile(site.directory, profile_settings(config.affinity))
    assert exact.mean_label_map is not None

    # Execute
    reply = site.send(protocol.PROFILE, run_overrides=WEAKER_RUN)

    # Assert
    assert_released(site, reply)
    released = protocol.ProfileReply.from_fields(metrics_of(reply))
    assert released.private
    assert released.mean_label_map is not None
    exact_map = [round(float(value), 3) for value in exact.mean_label_map.ravel()]
    assert list(released.mean_label_map) != exact_map
    assert released.epsilon_spent > 0
    assert len(site.accountant().history) == 1


# -------------------------------------------------------------- class 5: the race


def one_training_entry(open_site: OpenSite) -> tuple[float, float, int]:
    """What one DP train.source at site B records (on a scratch state folder)."""
    scratch = open_site("B", policy=DP_POLICY)
    assert_released(scratch, scratch.send(protocol.TRAIN_SOURCE))
    (entry,) = scratch.accountant().history
    return entry


def test_dp_trainings_arriving_at_once_never_exceed_the_budget(
    open_site: OpenSite,
) -> None:
    # Prepare: a budget that holds one training and not two
    entry = one_training_entry(open_site)
    one = AccountantState((entry,)).epsilon(DELTA)
    two = AccountantState((entry, entry)).epsilon(DELTA)
    budget = round((one + two) / 2, 3)
    site = open_site("B", policy={**DP_POLICY, "dp.budget-epsilon": budget})
    contenders = 3
    start = threading.Barrier(contenders)
    replies: dict[int, Message] = {}

    def train(number: int) -> None:
        start.wait()
        replies[number] = site.send(protocol.TRAIN_SOURCE, message_id=f"m{number}")

    # Execute: the trainings reach the site's app at the same moment
    threads = [threading.Thread(target=train, args=(n,)) for n in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert: one trained; each loser was refused naming the budget
    answered = [reply for reply in replies.values() if not reply.has_error()]
    refused = [reply for reply in replies.values() if reply.has_error()]
    assert len(answered) == 1
    assert len(refused) == contenders - 1
    for reply in refused:
        assert_site_error(
            site,
            reply,
            "PrivacyBudgetError: refused before training",
            f"the site's budget is epsilon {budget:g} at delta 1e-05",
        )
    accountant = site.accountant()
    assert accountant.history == (entry,)
    assert accountant.epsilon(DELTA) <= budget
    decisions = sorted(ledgered.decision for ledgered in site.entries())
    assert decisions == ["error"] * (contenders - 1) + ["released"]


# ------------------------------------------------------ class 6: the approved plan


def test_the_recorded_epsilon_is_the_plan_that_ran(
    open_site: OpenSite, config: RunConfig
) -> None:
    # Prepare: N = 6 slices at B, B = 5: a rate of 5/6 and ceil(6/5) = 2 steps per
    # epoch (round(6/5) = 1 would under-count the Poisson loader's steps)
    site = open_site("B", policy=DP_POLICY)
    run = {"train.batch-size": 5, "train.epochs": 2}
    asked = dataclasses.replace(
        config, train=dataclasses.replace(config.train, batch_size=5, epochs=2)
    )
    index = index_site(site.directory)
    slices = build_slice_set(index.labelled, data=asked.data, with_labels=True)
    assert len(slices) == 6
    expected = (NOISE, 5 / 6, 2 * math.ceil(6 / 5))
    assert expected[2] != 2 * round(6 / 5)

    # Execute
    reply = site.send(protocol.TRAIN_SOURCE, run_overrides=run)

    # Assert: the accountant holds exactly that mechanism, and the reply its epsilon
    entry = assert_released(site, reply)
    result = protocol.TrainReply.from_fields(metrics_of(reply))
    accountant = site.accountant()
    assert accountant.history == (expected,)
    assert accountant.units_per_case == (3,)  # each case gives 3 slices
    planned = AccountantState((expected,), (3,))
    assert result.epsilon_spent == pytest.approx(planned.epsilon(DELTA))
    assert result.patient_epsilon_spent == pytest.approx(planned.patient_epsilon(DELTA))
    assert result.slices_per_case == 3
    assert entry.epsilon_total == result.epsilon_total <= 10.0
