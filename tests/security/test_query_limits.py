"""Attack class 2: rebuilding a label map from scores the coordinator parametrises.

``evaluate`` returns a Dice per predictor, ``query.lftm`` a score per candidate and
``train.consensus`` figures per label source: each a function of the site's data that
the coordinator shapes with crafted models. A thousand single-pixel predictors mixed
from two crafted models (with negative weights, or cut to one slice per case) rebuild
an evaluation label map pixel for pixel. Under the default policy the site refuses
each of those requests before any work, counts what it answers per run and in total
(requests sent at once included), scores every evaluation case whole, and rounds
what leaves to 3 decimals.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest
from flwr.app import Message

from core import protocol
from core.config import RunConfig
from core.privacy.limits import default_limits, whole_case_config
from core.privacy.policy import Rule
from core.training.evaluation import evaluate_predictors
from core.training.networks import Arrays
from tests.security.attacker import (
    assert_refused,
    assert_released,
    evaluate_content,
    metrics_of,
    with_request,
)
from tests.security.conftest import OpenSite
from tests.unit.clients.messages import build_candidates

Predictors = dict[str, list[tuple[str, float]]]
LIMITS: Final = default_limits()


def visible(names: list[str]) -> list[str]:
    """State files an attack could have caused (lock files left aside)."""
    return [name for name in names if not name.startswith(".")]


# ------------------------------------------------------------------------ evaluate


@pytest.mark.parametrize("count", [1000, LIMITS.max_predictors_per_request + 1])
def test_a_thousand_crafted_predictors_in_one_request_are_refused_before_any_work(
    open_site: OpenSite,
    models: dict[str, Arrays],
    handler_calls: list[str],
    count: int,
) -> None:
    # Prepare: the attack, every predictor a mix of two crafted models
    site = open_site("A")
    predictors = {
        f"pixel-{k}": [("fg", k / count), ("bg", 1 - k / count)] for k in range(count)
    }

    # Execute
    reply = site.send(
        protocol.EVALUATE,
        evaluate_content({"fg": models["fg"], "bg": models["bg"]}, predictors),
    )

    # Assert
    assert_refused(
        site,
        reply,
        Rule.LIMIT_EXCEEDED,
        f"the request has {count} predictors, limits.max-predictors-per-request "
        "allows 48",
    )
    assert handler_calls == []
    assert visible(site.state_files()) == ["ledger.jsonl"]  # nothing charged


MIXTURES = [
    pytest.param(
        {"p": [("fg", 1.5), ("bg", -0.5)]},
        "predictor 'p' has weight -0.5 for model 'bg'; mixture weights must be finite "
        "and >= 0",
        id="negative-weight",
    ),
    pytest.param(
        {"p": [("fg", 0.5), ("bg", 0.2)]},
        "predictor 'p' weights sum to 0.7; a mixture's weights must sum to 1",
        id="not-summing-to-1",
    ),
    pytest.param(
        {"p": [("fg", math.nan), ("bg", 1.0)]},
        "predictor 'p' has weight nan for model 'fg'",
        id="nan-weight",
    ),
    pytest.param(
        {"p": [("fg", 0.5), ("fg", 0.5)]},
        "predictor 'p' names a model twice",
        id="model-twice",
    ),
    pytest.param(
        {"p": [(f"m{k}", 1 / 9) for k in range(9)]},
        "predictor 'p' mixes 9 models, limits.max-models-per-predictor allows 8",
        id="nine-models",
    ),
    pytest.param({"p": []}, "predictor 'p' names no model", id="no-model"),
]


@pytest.mark.parametrize(("predictors", "message"), MIXTURES)
def test_a_predictor_that_is_not_a_mixture_of_a_few_models_is_refused(
    open_site: OpenSite,
    models: dict[str, Arrays],
    handler_calls: list[str],
    predictors: Predictors,
    message: str,
) -> None:
    # Prepare: a negative weight scores the difference of two crafted models
    site = open_site("A")
    carried = {"fg": models["fg"], "bg": models["bg"]}
    carried.update({f"m{k}": models["bg"] for k in range(9)})

    # Execute
    reply = site.send(protocol.EVALUATE, evaluate_content(carried, predictors))

    # Assert
    assert_refused(site, reply, Rule.LIMIT_EXCEEDED, message)
    assert handler_calls == []
    assert visible(site.state_files()) == ["ledger.jsonl"]


def background_predictors(count: int, prefix: str) -> Predictors:
    return {f"{prefix}-{k}": [("bg", 1.0)] for k in range(count)}


def test_predictors_past_the_per_run_cap_are_refused_and_a_new_run_counts_afresh(
    open_site: OpenSite, models: dict[str, Arrays], handler_calls: list[str]
) -> None:
    # Prepare: the default caps are 48 per request and 64 per run
    site = open_site("A")
    carried = {"bg": models["bg"]}

    # Execute
    first = site.send(
        protocol.EVALUATE,
        evaluate_content(carried, background_predictors(48, "a")),
        run_id=1,
    )
    calls_after_first = len(handler_calls)
    over = site.send(
        protocol.EVALUATE,
        evaluate_content(carried, background_predictors(17, "b")),
        run_id=1,
    )
    calls_after_over = len(handler_calls)
    next_run = site.send(
        protocol.EVALUATE,
        evaluate_content(carried, background_predictors(17, "b")),
        run_id=2,
    )

    # Assert: the request that crosses 64 is refused whole, before running
    assert_released(site, first)
    assert calls_after_first == calls_after_over == 1
    assert_refused(
        site,
        over,
        Rule.LIMIT_EXCEEDED,
        "this run already had 48 predictors answered and asks for 17 more; "
        "limits.max-predictors-per-run allows 64 per run",
    )
    # ... and the next run starts from zero (the cumulative budget still counts)
    assert_released(site, next_run)
    assert len(metrics_of(next_run)) > 17
    assert site.query_book() == {"1": {"predictors": 48}, "2": {"predictors": 17}}


def test_requests_sent_at_once_cannot_share_out_the_per_run_cap_twice(
    open_site: OpenSite, models: dict[str, Arrays]
) -> None:
    # Prepare: two requests of 48 predictors (96 > 64) reach the app together
    site = open_site("A")
    carried = {"bg": models["bg"]}
    start = threading.Barrier(2)
    replies: dict[str, Message] = {}

    def ask(message_id: str) -> None:
        content = evaluate_content(carried, background_predictors(48, message_id))
        start.wait()
        replies[message_id] = site.send(
            protocol.EVALUATE, content, message_id=message_id
        )

    # Execute
    threads = [threading.Thread(target=ask, args=(f"m{n}",)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert: one answered, the other refused naming the cap; 48 charged
    answered = [mid for mid, reply in replies.items() if not reply.has_error()]
    refused = [mid for mid, reply in replies.items() if reply.has_error()]
    assert len(answered) == len(refused) == 1
    assert_released(site, replies[answered[0]])
    assert_refused(
        site,
        replies[refused[0]],
        Rule.LIMIT_EXCEEDED,
        "this run already had 48 predictors answered and asks for 48 more",
        message_id=refused[0],
    )
    assert site.query_book() == {"1": {"predictors": 48}}


def test_the_cumulative_query_budget_refuses_once_spent_across_runs_and_kinds(
    open_site: OpenSite, models: dict[str, Arrays], handler_calls: list[str]
) -> None:
    # Prepare: the default budget (5000 units) would take ~100 requests to spend
    site = open_site("A", policy={"limits.query-budget": 10})
    carried = {"bg": models["bg"]}

    # Execute: every request in a run of its own, as a coordinator may start them
    replies = [
        site.send(
            protocol.EVALUATE,
            evaluate_content(carried, background_predictors(count, f"r{run}")),
            run_id=run,
            message_id=f"m{run}",
        )
        for run, count in ((1, 6), (2, 5), (3, 4), (4, 1))
    ]
    candidates = site.send(
        protocol.LFTM, build_candidates(carried), run_id=5, message_id="m5"
    )

    # Assert
    assert_released(site, replies[0])
    assert_refused(
        site,
        replies[1],
        Rule.LIMIT_EXCEEDED,
        "the site's query budget (limits.query-budget 10 units over all runs) has no "
        "room for this request's 5",
        message_id="m2",
    )
    assert_released(site, replies[2])
    assert_refused(
        site,
        replies[3],
        Rule.LIMIT_EXCEEDED,
        "(limits.query-budget 10 units over all runs) has no room for this request's 1",
        message_id="m4",
    )
    assert_refused(
        site,
        candidates,
        Rule.LIMIT_EXCEEDED,
        "(limits.query-budget 10 units over all runs) has no room for this request's 1",
        message_id="m5",
    )
    assert len(handler_calls) == 2
    assert site.query_book() == {"1": {"predictors": 6}, "3": {"predictors": 4}}


def test_released_metrics_are_rounded_to_three_decimals(
    open_site: OpenSite,
    models: dict[str, Arrays],
    config: RunConfig,
) -> None:
    # Prepare: the site's own exact scores of the same predictors
    site = open_site("A")
    predictors: Predictors = {
        "fg": [("fg", 1.0)],
        "mix": [("fg", 0.6), ("init", 0.4)],
    }
    carried = {"fg": models["fg"], "init": models["init"]}
    exact = evaluate_predictors(
        site.directory, carried, predictors, whole_case_config(config, LIMITS)
    )

    # Execute
    reply = site.send(protocol.EVALUATE, evaluate_content(carried, predictors))

    # Assert: 3 decimals leave; the exact values had more
    assert_released(site, reply)
    released = metrics_of(reply)
    for name, scores in exact.items():
        for key, value in (("dice", scores.dice), ("hd95", scores.hd95_mm)):
            assert released[f"{key}.{name}"] == round(value, 3)
            assert round(value, 3) != value
    assert released["num-cases"] == 6


@pytest.mark.parametrize("asked", [1, 3])
def test_an_evaluation_case_is_scored_over_all_its_slices_whatever_the_run_asks(
    open_site: OpenSite,
    models: dict[str, Arrays],
    config: RunConfig,
    asked: int,
) -> None:
    # Prepare: what a site that scored only the asked slices would release
    site = open_site("A")
    carried = {"fg": models["fg"]}
    predictors: Predictors = {"all": [("fg", 1.0)]}
    cut = dataclasses.replace(
        config, data=dataclasses.replace(config.data, max_slices_per_case=asked)
    )
    on_cut_cases = evaluate_predictors(site.directory, carried, predictors, cut)
    whole = evaluate_predictors(
        site.directory, carried, predictors, whole_case_config(config, LIMITS)
    )

    # Execute
    reply = site.send(
        protocol.EVALUATE,
        evaluate_content(carried, predictors),
        run_overrides={"data.max-slices-per-case": asked},
    )

    # Assert: the Dice of whole cases, not of the asked slices
    assert_released(site, reply)
    assert metrics_of(reply)["dice.all"] == round(whole["all"].dice, 3)
    assert round(on_cut_cases["all"].dice, 3) != round(whole["all"].dice, 3)


def test_evaluate_on_fewer_evaluation_cases_than_min_cases_is_refused(
    open_site: OpenSite,
    site_copy: Callable[[str, str], Path],
    models: dict[str, Arrays],
    handler_calls: list[str],
) -> None:
    # Prepare: a site with one evaluation case (a mean Dice over it is that case)
    directory = site_copy("A", "one-case")
    for folder in ("imagesTs", "labelsTs"):
        for path in sorted((directory / folder).iterdir())[1:]:
            path.unlink()
    site = open_site("A", directory=directory)

    # Execute
    reply = site.send(
        protocol.EVALUATE,
        evaluate_content({"fg": models["fg"]}, {"all": [("fg", 1.0)]}),
    )

    # Assert
    assert_refused(
        site,
        reply,
        Rule.LIMIT_EXCEEDED,
        "evaluate stands on 1 evaluation cases, limits.min-cases requires 2",
    )
    assert handler_calls == []


# --------------------------------------------------------------- query.lftm, consensus


def test_more_lftm_candidates_than_a_request_may_carry_are_refused(
    open_site: OpenSite, models: dict[str, Arrays], handler_calls: list[str]
) -> None:
    # Prepare
    site = open_site("A")
    candidates = {f"cell-{k}": models["bg"] for k in range(33)}

    # Execute
    reply = site.send(protocol.LFTM, build_candidates(candidates))

    # Assert
    assert_refused(
        site,
        reply,
        Rule.LIMIT_EXCEEDED,
        "the request carries 33 models, limits.max-models-per-request allows 32",
    )
    assert handler_calls == []
    assert visible(site.state_files()) == ["ledger.jsonl"]


def test_lftm_candidates_count_against_the_per_run_cap(
    open_site: OpenSite, models: dict[str, Arrays], handler_calls: list[str]
) -> None:
    # Prepare: 64 candidates per run by default, 32 per request
    site = open_site("A")

    def candidates(prefix: str, count: int) -> dict[str, Arrays]:
        return {f"{prefix}-{k}": models["bg"] for k in range(count)}

    # Execute
    answered = [
        site.send(
            protocol.LFTM, build_candidates(candidates(f"c{n}", 32)), message_id=f"m{n}"
        )
        for n in (1, 2)
    ]
    over = site.send(protocol.LFTM, build_candidates(candidates("c3", 1)))

    # Assert
    for reply in answered:
        assert_released(site, reply)
        assert len([k for k in metrics_of(reply) if k.startswith("dtm.")]) == 32
    assert_refused(
        site,
        over,
        Rule.LIMIT_EXCEEDED,
        "this run already had 64 candidates answered and asks for 1 more; "
        "limits.max-candidates-per-run allows 64 per run",
    )
    assert len(handler_calls) == 2
    assert site.query_book() == {"1": {"candidates": 64}}


def test_more_consensus_label_sources_than_allowed_are_refused(
    open_site: OpenSite, models: dict[str, Arrays], handler_calls: list[str]
) -> None:
    # Prepare: each label source is one more consensus figure about the site's labels
    site = open_site("A")
    sources = tuple(f"cell-{k}" for k in range(17))
    request = protocol.ConsensusRequest(label_sources=sources, start=sources[0])

    # Execute
    reply = site.send(
        protocol.CONSENSUS,
        with_request({name: models["bg"] for name in sources}, request.to_fields()),
    )

    # Assert
    assert_refused(
        site,
        reply,
        Rule.LIMIT_EXCEEDED,
        "the request names 17 label sources, limits.max-label-sources-per-request "
        "allows 16",
    )
    assert handler_calls == []
    assert visible(site.state_files()) == ["ledger.jsonl"]
