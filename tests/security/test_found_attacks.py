"""Attacks beyond the issue's list, found while writing this suite.

- A handler (a new action, or a bug) that writes ``policy.*`` or ``ledger.*``
  settings, or names a metric after something the request never used, would carry
  data out under names the reply schemas let through: the guard blocks it.
- Weights that are not the run's declared architecture (an extra array shaped like
  a label map, a layer of another shape) are refused by the handler: nothing is
  computed with them, and nothing leaves.
- The run config cannot point a deployed site at another folder.
- ``train.consensus`` scores its consensus labels on whole evaluation cases, as
  ``evaluate`` does, whatever the run's ``data.max-slices-per-case`` (this suite
  found it scoring the slices the coordinator chose; closed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.guard import egress_guard
from core import protocol
from core.privacy.policy import Rule
from core.training.networks import Arrays
from tests.security.attacker import (
    assert_refused,
    assert_released,
    assert_site_error,
    evaluate_content,
    metrics_of,
    reason_of,
    with_request,
)
from tests.security.conftest import OpenSite
from tests.unit.clients.messages import build_candidates


def forging_app(message_type: str, forged: Mapping[str, object]) -> ClientApp:
    """The site's guard around a handler that adds ``forged`` to an honest reply."""
    guarded = ClientApp(mods=[egress_guard])
    category, _, action = message_type.partition(".")
    register = getattr(guarded, category)

    def handler(message: Message, _context: Context) -> Message:
        content = RecordDict()
        if message_type == protocol.HELLO:
            hello = protocol.HelloReply(
                site="A",
                modality="synthetic-MR",
                labelled=2,
                unlabelled=0,
                evaluation=6,
                class_names=("background", "organ"),
            )
            content[protocol.REPLY_KEY] = ConfigRecord(
                {**hello.to_fields(), **forged}  # type: ignore[dict-item]
            )
        else:
            content[protocol.METRICS_KEY] = MetricRecord(
                {"num-cases": 6, "dice.all": 0.5, **forged}  # type: ignore[dict-item]
            )
        return Message(content, reply_to=message)

    (register(action) if action else register())(handler)
    return guarded


@pytest.mark.parametrize(
    ("message_type", "forged", "message"),
    [
        pytest.param(
            protocol.HELLO,
            {"policy.case-ids": "a_000,a_001"},
            "reply/policy.case-ids was set by the handler; policy.* settings are the "
            "guard's alone",
            id="policy-setting",
        ),
        pytest.param(
            protocol.HELLO,
            {protocol.LEDGER_INDEX_FIELD: 0, protocol.LEDGER_HASH_FIELD: "0" * 64},
            "reply/ledger.entry-hash was set by the handler; ledger.* settings are the "
            "guard's alone",
            id="ledger-anchor",
        ),
        pytest.param(
            protocol.EVALUATE,
            # The reason names the case by index, as every reason leaving the site.
            {"dice.a_001": 0.9},
            "metrics/dice.case #1 names 'case #1', which is not a model or predictor "
            "of the request",
            id="metric-named-after-a-case",
        ),
    ],
)
def test_a_handler_cannot_carry_data_out_under_names_the_schema_lets_through(
    open_site: OpenSite,
    models: dict[str, Arrays],
    message_type: str,
    forged: dict[str, object],
    message: str,
) -> None:
    # Prepare
    site = open_site("A")
    content = None
    if message_type == protocol.EVALUATE:
        content = evaluate_content({"fg": models["fg"]}, {"all": [("fg", 1.0)]})

    # Execute
    reply = site.send(message_type, content, app=forging_app(message_type, forged))

    # Assert
    entry = assert_refused(
        site, reply, Rule.UNDECLARED_FIELD, message, blocked_reply=True
    )
    assert entry.egress is not None
    assert "a_001" not in reason_of(reply)


def off_manifest(weights: Arrays, how: str) -> Arrays:
    """``weights`` with a label-map-shaped array added, or a layer reshaped."""
    changed = dict(weights)
    if how == "extra-array":
        changed["prediction"] = np.ones((1, 64, 64), np.float32)
    else:
        name = sorted(weights)[0]
        changed[name] = np.zeros((*weights[name].shape, 2), np.float32)
    return changed


@pytest.mark.parametrize("how", ["extra-array", "reshaped-layer"])
@pytest.mark.parametrize("message_type", [protocol.EVALUATE, protocol.LFTM])
def test_weights_that_are_not_the_runs_architecture_are_refused(
    open_site: OpenSite, models: dict[str, Arrays], how: str, message_type: str
) -> None:
    # Prepare
    site = open_site("A")
    crafted = {"x": off_manifest(models["fg"], how)}
    content = (
        evaluate_content(crafted, {"all": [("x", 1.0)]})
        if message_type == protocol.EVALUATE
        else build_candidates(crafted)
    )

    # Execute
    reply = site.send(message_type, content)

    # Assert: named, ledgered, nothing released
    assert_site_error(site, reply, "weights do not match the model manifest")
    assert [entry.decision for entry in site.entries()] == ["error"]


def test_the_run_config_cannot_point_a_deployed_site_at_another_folder(
    open_site: OpenSite, federation: Path
) -> None:
    # Prepare: the coordinator names another federation folder in its run config
    site = open_site("A")

    # Execute
    reply = site.send(
        protocol.HELLO,
        run_overrides={
            "federation.dir": str(federation.parent),
            "federation.cache-dir": str(federation.parent / "elsewhere"),
        },
    )

    # Assert: the site serves the folder its own node config names
    assert_released(site, reply)
    settings = reply.content.config_records[protocol.REPLY_KEY]
    assert (settings["site"], settings["labelled"]) == ("A", 2)
    assert not (federation.parent / "elsewhere").exists()


def consensus_on(
    open_site: OpenSite, models: dict[str, Arrays], slices: int, run_id: int
) -> float:
    """``label-dice.majority`` of two all-foreground sources, at ``slices`` per case."""
    site = open_site("A")
    request = protocol.ConsensusRequest(label_sources=("fg1", "fg2"), start="fg1")
    reply = site.send(
        protocol.CONSENSUS,
        with_request({"fg1": models["fg"], "fg2": models["fg"]}, request.to_fields()),
        run_id=run_id,
        run_overrides={"data.max-slices-per-case": slices},
    )
    assert_released(site, reply)
    return float(metrics_of(reply)["label-dice.majority"])  # type: ignore[arg-type]


def test_consensus_scores_evaluation_cases_whole_whatever_the_run_asks(
    open_site: OpenSite, models: dict[str, Arrays]
) -> None:
    # Execute: the same label sources, the run asking 1 slice per case, then all
    one_slice = consensus_on(open_site, models, slices=1, run_id=1)
    every_slice = consensus_on(open_site, models, slices=0, run_id=2)

    # Assert: the site scored whole cases both times
    assert one_slice == every_slice
