"""Attack class 7: every size is the coordinator's to choose.

Image size, label grid, quantile counts, channels, levels, epochs, iterations, passes
and batch sizes come with the run config (and a UG-MCL round's iterations with the
request): without caps a coordinator sizes a site's memory and time, and the finer
the release the more it says about one case. Under the default policy every size
above its cap is refused before any work, naming the run-config key, its value and
the ``limits.*`` key; the site's cap on slices per case binds whatever the run asks;
and a request past ``limits.max-request-seconds`` is stopped.
"""

from __future__ import annotations

import pytest
from flwr.app import RecordDict

from core import protocol
from core.config import ConfigValue
from core.privacy.policy import Rule
from tests.security.attacker import (
    assert_refused,
    assert_released,
    assert_site_error,
    metrics_of,
    reason_of,
    with_request,
)
from tests.security.conftest import OpenSite

SIZES: list[tuple[str, dict[str, ConfigValue], str]] = [
    (
        protocol.TRAIN_SOURCE,
        {"data.image-size": 520},
        "data.image-size is 520, limits.max-image-size allows 512",
    ),
    (
        protocol.EVALUATE,
        {"data.image-size": 520},
        "data.image-size is 520, limits.max-image-size allows 512",
    ),
    (
        protocol.PROFILE,
        {"affinity.image-size": 129},
        "affinity.image-size is 129, limits.max-profile-image-size allows 128",
    ),
    (
        protocol.PROFILE,
        {"affinity.label-grid": 33},
        "affinity.label-grid is 33, limits.max-label-grid allows 32",
    ),
    (
        protocol.PROFILE,
        {"affinity.quantiles": 102},
        "affinity.quantiles is 102, limits.max-quantiles allows 101",
    ),
    (
        protocol.PROFILE,
        {"affinity.foreground-quantiles": 102},
        "affinity.foreground-quantiles is 102, limits.max-quantiles allows 101",
    ),
    (
        protocol.LFTM,
        {"model.channels": "4,513"},
        "model.channels has a level of 513 channels, limits.max-channels allows 512",
    ),
    (
        protocol.TRAIN_SOURCE,
        {
            "model.channels": "4,4,4,4,4,4,4",
            "model.strides": "2,2,2,2,2,2",
            "data.image-size": 128,
        },
        "model.channels has 7 levels, limits.max-levels allows 6",
    ),
    (
        protocol.TRAIN_SOURCE,
        {"train.epochs": 201},
        "train.epochs is 201, limits.max-epochs allows 200",
    ),
    (
        protocol.ADAPT,
        {"adapt.epochs": 201},
        "adapt.epochs is 201, limits.max-epochs allows 200",
    ),
    (
        protocol.CONSENSUS,
        {"consensus.epochs": 201},
        "consensus.epochs is 201, limits.max-epochs allows 200",
    ),
    (
        protocol.CONSENSUS,
        {"consensus.refine-epochs": 201},
        "consensus.refine-epochs is 201, limits.max-epochs allows 200",
    ),
    (
        protocol.FINETUNE,
        {"affinity.finetune-epochs": 201},
        "affinity.finetune-epochs is 201, limits.max-epochs allows 200",
    ),
    (
        protocol.SEMISUP,
        {"semisup.iterations": 5001},
        "semisup.iterations is 5001, limits.max-iterations allows 5000",
    ),
    (
        protocol.SEMISUP,
        {"semisup.local-iterations": 5001},
        "semisup.local-iterations is 5001, limits.max-iterations allows 5000",
    ),
    (
        protocol.SEMISUP,
        {"semisup.passes": 17},
        "semisup.passes is 17, limits.max-passes allows 16",
    ),
    (
        protocol.TRAIN_SOURCE,
        {"train.batch-size": 257},
        "train.batch-size is 257, limits.max-batch-size allows 256",
    ),
    (
        protocol.FINETUNE,
        {"train.batch-size": 257},
        "train.batch-size is 257, limits.max-batch-size allows 256",
    ),
    (
        protocol.ADAPT,
        {"adapt.batch-size": 257},
        "adapt.batch-size is 257, limits.max-batch-size allows 256",
    ),
    (
        protocol.CONSENSUS,
        {"consensus.batch-size": 257},
        "consensus.batch-size is 257, limits.max-batch-size allows 256",
    ),
    (
        protocol.SEMISUP,
        {"semisup.labelled-batch": 257},
        "semisup.labelled-batch is 257, limits.max-batch-size allows 256",
    ),
    (
        protocol.SEMISUP,
        {"semisup.unlabelled-batch": 257},
        "semisup.unlabelled-batch is 257, limits.max-batch-size allows 256",
    ),
]


@pytest.mark.parametrize(
    ("message_type", "sizes", "message"),
    SIZES,
    ids=[f"{case[0]}:{','.join(case[1])}" for case in SIZES],
)
def test_a_size_above_its_cap_is_refused_before_any_work_naming_the_limit(
    open_site: OpenSite,
    handler_calls: list[str],
    message_type: str,
    sizes: dict[str, ConfigValue],
    message: str,
) -> None:
    # Prepare
    site = open_site("A")

    # Execute
    reply = site.send(message_type, run_overrides=sizes)

    # Assert: one breach, named; no handler ran, nothing but the ledger was written
    entry = assert_refused(site, reply, Rule.LIMIT_EXCEEDED, message)
    assert reason_of(reply).count("limit-exceeded (") == 1
    assert handler_calls == []
    assert [name for name in site.state_files() if not name.startswith(".")] == [
        "ledger.jsonl"
    ]
    assert entry.policy["policy.limits.max-epochs"] == 200


def test_a_semisup_round_asking_more_iterations_than_the_cap_is_refused(
    open_site: OpenSite, handler_calls: list[str]
) -> None:
    # Prepare: the iterations of a round travel in the request, not the run config
    site = open_site("A")
    request = protocol.SemisupRequest(
        scope="federated", round=1, rounds=1, iterations=5001
    )

    # Execute
    reply = site.send(protocol.SEMISUP, with_request({}, request.to_fields()))

    # Assert
    assert_refused(
        site,
        reply,
        Rule.LIMIT_EXCEEDED,
        "the request asks for 5001 iterations, limits.max-iterations allows 5000",
    )
    assert handler_calls == []


@pytest.mark.parametrize("asked", [3, 0], ids=["three", "all"])
def test_the_sites_cap_on_slices_per_case_binds_whatever_the_run_asks(
    open_site: OpenSite, asked: int
) -> None:
    # Prepare: the site lets each case give at most 2 slices
    site = open_site("B", policy={"limits.max-slices-per-case": 2})

    # Execute
    reply = site.send(
        protocol.TRAIN_SOURCE, run_overrides={"data.max-slices-per-case": asked}
    )

    # Assert: 2 cases x 2 slices, one epoch
    assert_released(site, reply)
    result = protocol.TrainReply.from_fields(metrics_of(reply))
    assert (result.num_cases, result.num_examples) == (2, 4)


def test_a_request_past_the_time_cap_is_stopped(open_site: OpenSite) -> None:
    # Prepare: a cap so small that any request is past it at its first report
    site = open_site("B", policy={"limits.max-request-seconds": 1e-9})

    # Execute
    reply = site.send(protocol.TRAIN_SOURCE, RecordDict())

    # Assert: stopped, said so, ledgered; no weights left
    assert_site_error(
        site,
        reply,
        "LimitError: the request ran past limits.max-request-seconds (1e-09 s) and "
        "was stopped",
    )
