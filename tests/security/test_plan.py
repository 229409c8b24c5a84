"""Attack class: the resolution plan and the fingerprint, as a malicious coordinator
would use them.

The plan travels with every request once the coordinator has one, so it is a new way
for a coordinator to choose sizes: a site holds planned sizes to its limits exactly as
it holds the run's, takes from the plan only what its run config leaves to it, and
refuses a malformed plan naming the field. The fingerprint (``query.fingerprint``)
has no parameter, but its CT intensity term stands on the site's labelled cases: it
stays home below ``limits.min-cases`` of them, is noised and charged where the site
requires DP, and each fingerprint counts against ``limits.max-fingerprints-per-run``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from core import protocol
from core.privacy.policy import Rule
from core.training.networks import Arrays
from tests.conftest import copy_as_ct_site
from tests.security.attacker import (
    assert_refused,
    assert_released,
    assert_site_error,
    metrics_of,
)
from tests.security.conftest import OpenSite

DP_POLICY = {"dp.required": True, "dp.noise-multiplier": 2.0}


def planned(plan: Mapping[str, object], weights: Arrays | None = None) -> RecordDict:
    """A request's content carrying ``plan`` (and initial weights when given)."""
    content = RecordDict()
    content[protocol.PLAN_KEY] = ConfigRecord(dict(plan))  # type: ignore[arg-type]
    if weights is not None:
        from server.records import to_array_record

        content[protocol.WEIGHTS_KEY] = to_array_record(weights)
    return content


def as_ct_site(federation: Path, tmp_path: Path, name: str) -> Path:
    """A copy of site A whose ``dataset.json`` says CT."""
    return copy_as_ct_site(federation / "A", tmp_path / "sites" / name)


def test_a_planned_image_size_above_the_cap_is_refused_before_any_work(
    open_site: OpenSite, models: dict[str, Arrays], handler_calls: list[str]
) -> None:
    # Prepare: the run leaves the image size to the plan
    site = open_site("A")
    content = planned(
        {"image-size": 4096, "batch-size": 4, "spacing-mm": 1.5}, models["init"]
    )

    # Execute: a plan asking for slices far finer than the site allows
    reply = site.send(
        protocol.TRAIN_SOURCE, content, run_overrides={"data.image-size": 0}
    )

    # Assert
    assert_refused(
        site,
        reply,
        Rule.LIMIT_EXCEEDED,
        "data.image-size is 4096, limits.max-image-size allows 512",
    )
    assert handler_calls == []


def test_a_planned_batch_size_above_the_cap_is_refused(
    open_site: OpenSite, models: dict[str, Arrays]
) -> None:
    site = open_site("A")
    content = planned(
        {"image-size": 16, "batch-size": 100_000, "spacing-mm": 1.5}, models["init"]
    )

    reply = site.send(
        protocol.TRAIN_SOURCE, content, run_overrides={"train.batch-size": 0}
    )

    assert_refused(
        site,
        reply,
        Rule.LIMIT_EXCEEDED,
        "train.batch-size is 100000, limits.max-batch-size allows 256",
    )


def test_a_plan_cannot_override_what_the_run_config_sets(
    open_site: OpenSite, models: dict[str, Arrays]
) -> None:
    # Prepare: the run sets 16 px; the plan says 4096, beyond every cap
    site = open_site("A")
    content = planned(
        {"image-size": 4096, "batch-size": 100_000, "spacing-mm": 1.5}, models["init"]
    )

    # Execute
    reply = site.send(protocol.TRAIN_SOURCE, content)

    # Assert: the run's values stood, so nothing breached a limit and it trained
    assert_released(site, reply)
    assert metrics_of(reply)["num-cases"] == 2


@pytest.mark.parametrize(
    ("plan", "fragment"),
    [
        (
            {"image-size": 20, "batch-size": 4, "spacing-mm": 1.5},
            "plan field 'image-size' must be a multiple of 8, >= 16, got 20",
        ),
        (
            {
                "image-size": 16,
                "batch-size": 4,
                "spacing-mm": 1.5,
                "ct-window": [300.0, -100.0, 40.0, 50.0],
            },
            "plan field 'ct-window' must be four finite numbers",
        ),
        (
            {"image-size": 16, "batch-size": 0, "spacing-mm": 1.5},
            "plan field 'batch-size' must be >= 1, got 0",
        ),
        (
            {"image-size": 16, "batch-size": 4, "spacing-mm": 1.5, "data-dir": "/etc"},
            "the request's resolution plan has unknown fields ['data-dir']",
        ),
        ({"batch-size": 4, "spacing-mm": 1.5}, "image-size"),
        (
            {"image-size": 16, "batch-size": 4, "spacing-mm": 0.0},
            "plan field 'spacing-mm' must be in [0.01, 100] mm, got 0.0",
        ),
    ],
)
def test_a_malformed_plan_is_refused_naming_the_field(
    open_site: OpenSite, plan: dict[str, object], fragment: str
) -> None:
    site = open_site("A")

    reply = site.send(protocol.HELLO, planned(plan))

    assert_site_error(site, reply, "the request's resolution plan", fragment)


def test_the_ct_intensity_term_stays_home_below_min_cases(
    open_site: OpenSite, federation: Path, tmp_path: Path
) -> None:
    # Prepare: a CT site with one labelled training case
    directory = as_ct_site(federation, tmp_path, "ct-one-label")
    (directory / "labelsTr" / "a_001.nii.gz").unlink()
    site = open_site("A", directory=directory)

    # Execute
    reply = site.send(protocol.FINGERPRINT)

    # Assert: the geometry leaves, nothing of the one case's intensities does
    entry = assert_released(site, reply)
    metrics = metrics_of(reply)
    assert metrics["num-images"] == 2
    assert metrics["num-labelled"] == 0
    assert "ct-intensities" not in metrics
    assert entry.egress is not None
    assert "metrics/ct-intensities" not in entry.egress.metrics


def test_a_ct_fingerprint_under_dp_is_noised_and_charged(
    open_site: OpenSite, federation: Path, tmp_path: Path
) -> None:
    # Prepare: the same CT site, exact and under the site's DP policy
    directory = as_ct_site(federation, tmp_path, "ct-dp")
    exact_site = open_site("A", directory=directory)
    private_site = open_site("A", directory=directory, policy=DP_POLICY)

    # Execute
    exact = metrics_of(exact_site.send(protocol.FINGERPRINT))
    private_reply = private_site.send(protocol.FINGERPRINT)

    # Assert: the exact term is released as is, the private one noised and charged
    assert exact["dp.epsilon-spent"] == 0.0
    assert len(exact["ct-intensities"]) == 5  # type: ignore[arg-type]
    assert_released(private_site, private_reply)
    private = metrics_of(private_reply)
    assert private["dp.noise-multiplier"] >= 2.0  # type: ignore[operator]
    assert private["dp.epsilon-spent"] > 0  # type: ignore[operator]
    assert private["ct-intensities"] != exact["ct-intensities"]
    accountant = private_site.accountant()
    assert private["dp.epsilon-total"] == pytest.approx(accountant.epsilon(1e-5))
    assert private["spacing-mm"] == exact["spacing-mm"]  # geometry: exact


def test_fingerprints_count_against_the_per_run_cap(open_site: OpenSite) -> None:
    site = open_site("A")

    replies = [site.send(protocol.FINGERPRINT) for _ in range(3)]

    for reply in replies[:2]:
        assert_released(site, reply)
    assert_refused(
        site,
        replies[2],
        Rule.LIMIT_EXCEEDED,
        "limits.max-fingerprints-per-run allows 2 per run",
    )
    assert site.query_book() == {"1": {"fingerprints": 2}}
