"""The site's query limits: parsing, size caps, request rules, the query book."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from core.config import load_default_config
from core.privacy.limits import (
    CANDIDATES,
    LABEL_SOURCES,
    PREDICTORS,
    CaseCounts,
    LimitError,
    SiteLimits,
    cap_slices_per_case,
    charge_queries,
    check_cases,
    check_request,
    check_run_sizes,
    default_limits,
    label_term_allowed,
    parse_limits,
    read_query_book,
    round_metric_fields,
)

LIMITS = default_limits()


def test_parse_limits_keeps_defaults_for_absent_keys() -> None:
    # Execute
    limits = parse_limits({"min-cases": 5, "max-request-seconds": 60})

    # Assert
    assert limits == dataclasses.replace(LIMITS, min_cases=5, max_request_seconds=60.0)
    assert parse_limits({}) == LIMITS


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max-queries": 3}, "unknown key limits.max-queries; valid keys:"),
        ({"min-cases": "2"}, "limits.min-cases must be an integer, got '2'"),
        ({"min-cases": True}, "limits.min-cases must be an integer, got True"),
        ({"min-cases": 0}, "limits.min-cases must be >= 1, got 0"),
        ({"max-epochs": -1}, "limits.max-epochs must be >= 1, got -1"),
        ({"query-budget": -1}, "limits.query-budget must be >= 0 (0 = no cap)"),
        ({"metric-decimals": 16}, "limits.metric-decimals must be <= 15, got 16"),
        (
            {"max-request-seconds": float("inf")},
            "limits.max-request-seconds must be >= 0 (0 = no cap), got inf",
        ),
    ],
)
def test_parse_limits_names_the_key(table: dict[str, object], message: str) -> None:
    # Execute / Assert
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        parse_limits(table)


@pytest.mark.parametrize(
    ("overrides", "message_type", "expected"),
    [
        (
            {"data.image-size": 1024},
            "train.source",
            "data.image-size is 1024, limits.max-image-size allows 512",
        ),
        ({"data.image-size": 1024}, "query.hello", None),
        (
            {
                "model.channels": "8,16,32,64,128,256,512",
                "model.strides": "2,2,2,2,2,2",
            },
            "evaluate",
            "model.channels has 7 levels, limits.max-levels allows 6",
        ),
        (
            {"model.channels": "8,1024", "model.strides": "2"},
            "query.lftm",
            "model.channels has a level of 1024 channels, limits.max-channels",
        ),
        (
            {"train.epochs": 500},
            "train.source",
            "train.epochs is 500, limits.max-epochs allows 200",
        ),
        (
            {"adapt.epochs": 201},
            "train.adapt",
            "adapt.epochs is 201, limits.max-epochs allows 200",
        ),
        (
            {"consensus.refine-epochs": 300},
            "train.consensus",
            "consensus.refine-epochs is 300",
        ),
        (
            {"semisup.passes": 64},
            "train.semisup",
            "semisup.passes is 64, limits.max-passes allows 16",
        ),
        (
            {"semisup.local-iterations": 9000},
            "train.semisup",
            "semisup.local-iterations is 9000",
        ),
        (
            {"affinity.label-grid": 64},
            "query.profile",
            "affinity.label-grid is 64, limits.max-label-grid allows 32",
        ),
        (
            {"affinity.image-size": 256},
            "query.profile",
            "affinity.image-size is 256, limits.max-profile-image-size allows 128",
        ),
        (
            {"affinity.quantiles": 1001},
            "query.profile",
            "affinity.quantiles is 1001, limits.max-quantiles allows 101",
        ),
        (
            {"affinity.foreground-quantiles": 500},
            "query.profile",
            "affinity.foreground-quantiles is 500",
        ),
        (
            {"affinity.polarity-quantiles": 5000},
            "query.profile",
            "affinity.polarity-quantiles is 5000, limits.max-quantiles allows 101",
        ),
        (
            {"affinity.finetune-epochs": 999},
            "train.finetune",
            "affinity.finetune-epochs is 999",
        ),
        (
            {"train.batch-size": 1000},
            "train.source",
            "train.batch-size is 1000, limits.max-batch-size allows 256",
        ),
    ],
)
def test_check_run_sizes_refuses_what_the_action_would_use(
    overrides: dict[str, object], message_type: str, expected: str | None
) -> None:
    # Prepare
    config = load_default_config(**overrides)  # type: ignore[arg-type]

    # Execute
    breaches = check_run_sizes(config, LIMITS, message_type)

    # Assert
    if expected is None:
        assert breaches == []
    else:
        assert len(breaches) == 1
        assert expected in breaches[0]


def test_the_defaults_pass_every_action() -> None:
    # Prepare
    config = load_default_config()

    # Execute / Assert: the demo's own settings are within the default limits
    for message_type in (
        "query.hello",
        "train.source",
        "train.finetune",
        "query.lftm",
        "train.adapt",
        "train.consensus",
        "train.semisup",
        "query.profile",
        "evaluate",
    ):
        assert check_run_sizes(config, LIMITS, message_type) == []


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([("a", 1.0)], []),
        ([("a", 0.3), ("b", 0.7)], []),
        ([("a", 1 / 3), ("b", 1 / 3), ("c", 1 / 3)], []),
        (
            [("a", 1.5), ("b", -0.5)],
            ["weight -0.5 for model 'b'; mixture weights must be finite and >= 0"],
        ),
        (
            [("a", 0.5), ("b", 0.2)],
            ["weights sum to 0.7; a mixture's weights must sum to 1"],
        ),
        ([("a", float("nan"))], ["weight nan for model 'a'"]),
        ([("a", 0.5), ("a", 0.5)], ["names a model twice"]),
        ([], ["names no model"]),
        (
            [(f"m{k}", 1 / 9) for k in range(9)],
            ["mixes 9 models, limits.max-models-per-predictor allows 8"],
        ),
    ],
)
def test_predictors_must_be_mixtures_of_a_few_models(
    members: list[tuple[str, float]], expected: list[str]
) -> None:
    # Execute
    breaches = check_request(LIMITS, models=9, predictors={"p": members})

    # Assert
    assert len(breaches) == len(expected)
    for breach, fragment in zip(breaches, expected, strict=True):
        assert breach.startswith("predictor 'p' ")
        assert fragment in breach


def test_check_request_counts_models_predictors_sources_and_iterations() -> None:
    # Prepare
    many = {f"p{k}": [("a", 1.0)] for k in range(49)}

    # Execute
    breaches = check_request(
        LIMITS, models=33, predictors=many, label_sources=17, iterations=5001
    )

    # Assert
    assert breaches == [
        "the request carries 33 models, limits.max-models-per-request allows 32",
        "the request has 49 predictors, limits.max-predictors-per-request allows 48",
        "the request names 17 label sources, limits.max-label-sources-per-request "
        "allows 16",
        "the request asks for 5001 iterations, limits.max-iterations allows 5000",
    ]


@pytest.mark.parametrize(
    ("message_type", "counts", "expected"),
    [
        (
            "evaluate",
            CaseCounts(labelled=5, unlabelled=0, evaluation=1),
            "evaluate stands on 1 evaluation cases",
        ),
        (
            "query.lftm",
            CaseCounts(labelled=0, unlabelled=1, evaluation=9),
            "query.lftm stands on 1 training images",
        ),
        (
            "train.source",
            CaseCounts(labelled=1, unlabelled=9, evaluation=9),
            "train.source stands on 1 labelled training cases",
        ),
        ("query.profile", CaseCounts(labelled=0, unlabelled=2, evaluation=0), None),
        ("query.hello", CaseCounts(labelled=0, unlabelled=1, evaluation=0), None),
    ],
)
def test_min_cases_behind_every_release(
    message_type: str, counts: CaseCounts, expected: str | None
) -> None:
    # Execute
    breaches = check_cases(LIMITS, message_type, counts)

    # Assert
    if expected is None:
        assert breaches == []
    else:
        assert breaches == [f"{expected}, limits.min-cases requires 2"]


def test_label_term_needs_min_cases_labelled() -> None:
    # Execute / Assert
    assert not label_term_allowed(LIMITS, 1)
    assert label_term_allowed(LIMITS, 2)
    assert not label_term_allowed(dataclasses.replace(LIMITS, min_cases=5), 4)


def test_slices_per_case_are_held_to_the_sites_cap() -> None:
    # Prepare
    capped = dataclasses.replace(LIMITS, max_slices_per_case=3)

    # Execute / Assert: 0 means "all" on either side; the run may ask for fewer
    for asked, cap_limits, expected in (
        (0, LIMITS, 0),
        (0, capped, 3),
        (8, capped, 3),
        (2, capped, 2),
        (8, LIMITS, 8),
    ):
        config = load_default_config(**{"data.max-slices-per-case": asked})
        assert cap_slices_per_case(config, cap_limits).data.max_slices_per_case == (
            expected
        )


def test_query_book_charges_per_run_and_in_total(tmp_path: Path) -> None:
    # Prepare
    book = tmp_path / "state" / "queries.json"
    limits = dataclasses.replace(
        LIMITS, max_predictors_per_run=10, query_budget=25, max_candidates_per_run=10
    )

    # Execute
    first = charge_queries(book, run_id="1", units={PREDICTORS: 6}, limits=limits)
    with pytest.raises(LimitError) as per_run:
        charge_queries(book, run_id="1", units={PREDICTORS: 5}, limits=limits)
    charge_queries(book, run_id="2", units={PREDICTORS: 10}, limits=limits)
    charge_queries(book, run_id="3", units={CANDIDATES: 9}, limits=limits)
    with pytest.raises(LimitError) as total:
        charge_queries(book, run_id="4", units={LABEL_SOURCES: 1}, limits=limits)

    # Assert
    assert (first.units, first.run_totals, first.total) == (
        {PREDICTORS: 6},
        {PREDICTORS: 6},
        6,
    )
    assert str(per_run.value) == (
        "this run already had 6 predictors answered and asks for 5 more; "
        "limits.max-predictors-per-run allows 10 per run"
    )
    assert str(total.value) == (
        "the site's query budget (limits.query-budget 25 units over all runs) has no "
        "room for this request's 1"
    )
    assert read_query_book(book) == {
        "1": {PREDICTORS: 6},
        "2": {PREDICTORS: 10},
        "3": {CANDIDATES: 9},
    }


def test_a_malformed_query_book_is_refused_naming_it(tmp_path: Path) -> None:
    # Prepare
    book = tmp_path / "queries.json"
    book.write_text(json.dumps({"runs": {"1": {"predictors": "many"}}}))

    # Execute / Assert
    with pytest.raises(ValueError, match=f"{book}: not a valid query book"):
        charge_queries(book, run_id="1", units={PREDICTORS: 1}, limits=LIMITS)


def _charge_in_process(book: str, run_id: str, results: object) -> None:
    limits = dataclasses.replace(LIMITS, query_budget=40)
    outcomes = []
    for _ in range(10):
        try:
            charge_queries(
                Path(book), run_id=run_id, units={PREDICTORS: 3}, limits=limits
            )
            outcomes.append(True)
        except LimitError:
            outcomes.append(False)
    results.put(outcomes)  # type: ignore[attr-defined]


def test_concurrent_charges_never_exceed_the_budget(tmp_path: Path) -> None:
    # Prepare: 4 processes and 4 threads, each asking 10 times for 3 units; 40 fit
    book = tmp_path / "queries.json"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [
        context.Process(target=_charge_in_process, args=(str(book), f"p{k}", results))
        for k in range(4)
    ]
    threads = [
        threading.Thread(target=_charge_in_process, args=(str(book), f"t{k}", results))
        for k in range(4)
    ]

    # Execute
    for worker in (*processes, *threads):
        worker.start()
    for worker in (*processes, *threads):
        worker.join(timeout=120)
    granted = sum(sum(results.get(timeout=10)) for _ in range(8))

    # Assert: exactly 13 charges of 3 fit under 40, whatever the interleaving
    assert granted == 13
    book_total = sum(sum(kinds.values()) for kinds in read_query_book(book).values())
    assert book_total == 39


def test_metrics_are_rounded_but_dp_fields_and_times_are_not() -> None:
    # Execute
    rounded = round_metric_fields(
        {
            "dice.a": 0.123456,
            "hd95.a": float("nan"),
            "itm.b": [0.11111, 0.99999],
            "num-cases": 6,
            "seconds": 12.345678,
            "dp.epsilon-spent": 1.234567,
        },
        2,
    )

    # Assert
    assert rounded["dice.a"] == 0.12
    assert rounded["itm.b"] == [0.11, 1.0]
    assert rounded["num-cases"] == 6
    assert rounded["seconds"] == 12.345678
    assert rounded["dp.epsilon-spent"] == 1.234567
    assert rounded["hd95.a"] != rounded["hd95.a"]  # nan stays nan


def test_site_limits_type_is_frozen_and_complete() -> None:
    # Assert: every field has a documented key in the template
    template = (
        Path(__file__).resolve().parents[4] / "deploy" / "policy.template.toml"
    ).read_text()
    for field in dataclasses.fields(SiteLimits):
        assert f"\n{field.name.replace('_', '-')} = " in template, field.name
