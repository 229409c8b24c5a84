from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping

import pytest

from core.protocol import (
    ADAPT,
    CONSENSUS,
    CONSENSUS_METHODS,
    DP_METRICS,
    EVALUATE,
    HELLO,
    LFTM,
    MODEL_KEY_PREFIX,
    REPLY_SCHEMAS,
    SEMISUP,
    TRAIN_SOURCE,
    AdaptReply,
    AdaptRequest,
    ConsensusReply,
    ConsensusRequest,
    EvaluateReply,
    EvaluateRequest,
    HelloReply,
    LftmReply,
    SemisupReply,
    TrainReply,
    model_key,
    model_name,
)

HELLO_REPLY = HelloReply(
    site="B",
    modality="synthetic-MR",
    labelled=12,
    unlabelled=0,
    evaluation=6,
    class_names=("background", "organ"),
)
TRAIN_REPLY = TrainReply(num_examples=360, num_cases=12, loss=0.25, seconds=3.5)
ADAPT_REQUEST = AdaptRequest(main="C", aux="B", weight_main=0.6, weight_aux=0.4)
ADAPT_REPLY = AdaptReply(num_examples=120, pseudo_label_foreground=0.07, seconds=9.0)
CONSENSUS_REQUEST = ConsensusRequest(label_sources=("B", "C"), start="adapted:main")
CONSENSUS_REPLY = ConsensusReply(
    num_images=18,
    num_labels=900,
    num_atlases=1,
    seconds=60.0,
    data_parameter={"B": 0.4, "C": 0.3, "atlas-1": -0.2},
    staple_sensitivity={"B": 0.9, "C": 0.8, "atlas-1": 0.5},
    agreement={"B": 0.95, "C": 0.9, "atlas-1": 0.6},
    label_dice={"itm": 0.8, "majority": 0.7, "staple": 0.75, "deepstaple": 0.85},
    spearman_dp=0.8,
    spearman_staple=0.6,
)
SEMISUP_REPLY = SemisupReply(
    num_examples=400,
    num_labelled=2,
    num_unlabelled=5,
    supervised_loss=0.0,
    consistency_loss=0.01,
    cross_task_loss=0.2,
    certain_fraction=0.7,
    seconds=12.0,
    epsilon_spent=0.8,
    epsilon_total=2.5,
    delta=1e-5,
    noise_multiplier=1.2,
)
EVALUATE_REQUEST = EvaluateRequest(
    predictors={
        "tgma": [("main", 0.6), ("aux", 0.4)],
        "source.B": [("B", 1.0)],
        "uniform": [("B", 0.5), ("C", 0.5)],
    }
)
EVALUATE_REPLY = EvaluateReply(
    num_cases=6,
    dice={"tgma": 0.8, "source.B": 0.5},
    hd95_mm={"tgma": 4.5, "source.B": 12.0},
)
Payload = (
    HelloReply
    | TrainReply
    | AdaptRequest
    | AdaptReply
    | ConsensusRequest
    | ConsensusReply
    | EvaluateRequest
    | EvaluateReply
)
LFTM_REPLY = LftmReply.from_itm(
    "lftm",
    ("C", "B"),
    {"B": [1.0, 0.5, 0.0], "C": [0.25, 0.75, 1.0]},
    release="instance",
)
INSTANCE = {"release": "instance"}


@pytest.mark.parametrize(
    "payload",
    [
        HELLO_REPLY,
        TRAIN_REPLY,
        ADAPT_REQUEST,
        AdaptRequest(main="C", aux="", weight_main=1.0, weight_aux=0.0),
        ADAPT_REPLY,
        CONSENSUS_REQUEST,
        CONSENSUS_REPLY,
        ConsensusReply(
            num_images=1,
            num_labels=0,
            num_atlases=0,
            seconds=0.0,
            data_parameter={},
            staple_sensitivity={},
            agreement={},
            label_dice={},
            spearman_dp=0.0,
            spearman_staple=0.0,
        ),
        EVALUATE_REQUEST,
        EvaluateRequest(predictors={}),
        EVALUATE_REPLY,
        EvaluateReply(num_cases=0, dice={}, hd95_mm={}),
    ],
    ids=lambda payload: type(payload).__name__,
)
def test_single_record_payload_round_trip(payload: Payload) -> None:
    # Execute
    fields = payload.to_fields()
    parsed = type(payload).from_fields(fields)

    # Assert
    assert parsed == payload
    assert all(
        isinstance(value, bool | int | float | str | list) for value in fields.values()
    )


def test_hello_reply_fields_use_kebab_case_and_lists() -> None:
    # Execute
    fields = HELLO_REPLY.to_fields()

    # Assert
    assert fields == {
        "site": "B",
        "modality": "synthetic-MR",
        "labelled": 12,
        "unlabelled": 0,
        "evaluation": 6,
        "class-names": ["background", "organ"],
    }


def test_lftm_reply_round_trip_and_rows() -> None:
    # Execute
    settings, metrics = LFTM_REPLY.to_fields()
    parsed = LftmReply.from_fields(settings, metrics)

    # Assert
    assert settings == {"metric": "lftm", "sources": ["C", "B"], **INSTANCE}
    assert metrics == {"itm.C": [0.25, 0.75, 1.0], "itm.B": [1.0, 0.5, 0.0]}
    assert parsed == LFTM_REPLY
    assert parsed.itm_rows() == ((0.25, 1.0), (0.75, 0.5), (1.0, 0.0))
    assert parsed.dtm == {"C": pytest.approx(2 / 3), "B": pytest.approx(0.5)}


def test_lftm_reply_domain_release_carries_only_means() -> None:
    # Prepare
    reply = LftmReply.from_itm(
        "lftm", ("C", "B"), {"B": [1.0, 0.5], "C": [0.25, 0.75]}, release="domain"
    )

    # Execute
    settings, metrics = reply.to_fields()
    parsed = LftmReply.from_fields(settings, metrics)

    # Assert
    assert settings == {"metric": "lftm", "sources": ["C", "B"], "release": "domain"}
    assert metrics == {"dtm.C": 0.5, "dtm.B": 0.75}
    assert parsed == reply
    assert parsed.itm_columns is None
    assert parsed.itm_rows() is None


def test_lftm_reply_carries_the_agreement_rows_in_either_release() -> None:
    # Prepare
    agreement = {"C": [1.0, 0.25], "B": [0.25, 0.5]}
    for release in ("instance", "domain"):
        reply = LftmReply.from_itm(
            "lftm",
            ("C", "B"),
            {"B": [1.0, 0.5], "C": [0.25, 0.75]},
            release=release,
            agreement=agreement,
        )

        # Execute
        settings, metrics = reply.to_fields()
        parsed = LftmReply.from_fields(settings, metrics)

        # Assert
        assert metrics["agree.C"] == [1.0, 0.25]
        assert metrics["agree.B"] == [0.25, 0.5]
        assert parsed == reply
        assert parsed.agreement_by_name() == {
            "C": {"C": 1.0, "B": 0.25},
            "B": {"C": 0.25, "B": 0.5},
        }


def test_lftm_reply_of_an_earlier_site_has_no_agreement() -> None:
    # Execute
    settings, metrics = LFTM_REPLY.to_fields()
    parsed = LftmReply.from_fields(settings, metrics)

    # Assert
    assert parsed.agreement is None
    assert parsed.agreement_by_name() is None


@pytest.mark.parametrize(
    ("agreement", "message"),
    [
        ({"agree.C": [1.0], "agree.B": [0.2, 1.0]}, "'agree.C' has 1 values for 2"),
        ({"agree.C": [1.0, 0.2]}, "payload field 'agree.B' is missing"),
        ({"agree.C": "high", "agree.B": [0.2, 1.0]}, "'agree.C' must be a list"),
    ],
)
def test_lftm_reply_refuses_a_malformed_agreement(
    agreement: dict[str, object], message: str
) -> None:
    # Prepare
    settings, metrics = LFTM_REPLY.to_fields()

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        LftmReply.from_fields(settings, {**metrics, **agreement})


@pytest.mark.parametrize(
    ("release", "itm", "message"),
    [
        ("cohort", None, "payload field 'release' must be 'instance' or 'domain'"),
        ("domain", {"B": [1.0]}, "ITM columns travel with instance release only"),
        ("instance", None, "ITM columns travel with instance release only"),
    ],
)
def test_lftm_reply_release_must_match_its_content(
    release: str, itm: dict[str, list[float]] | None, message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        LftmReply(
            metric="lftm",
            sources=("B",),
            release=release,
            itm_columns=itm,
            dtm={"B": 1.0},
        )


def test_lftm_reply_parses_integer_scores_as_floats() -> None:
    # Execute
    parsed = LftmReply.from_fields(
        {"metric": "entropy", "sources": ["A"], **INSTANCE}, {"itm.A": [1, 0]}
    )

    # Assert
    assert parsed.itm_columns == {"A": [1.0, 0.0]}
    assert all(isinstance(value, float) for value in parsed.itm_columns["A"])
    assert parsed.itm_rows() == ((1.0,), (0.0,))


def test_lftm_reply_without_sources_has_no_rows() -> None:
    # Execute
    parsed = LftmReply.from_fields({"metric": "lftm", "sources": [], **INSTANCE}, {})

    # Assert
    assert parsed.sources == ()
    assert parsed.itm_rows() == ()


def test_lftm_reply_rejects_columns_of_unequal_length() -> None:
    # Prepare
    settings = {"metric": "lftm", "sources": ["B", "C"], **INSTANCE}
    metrics = {"itm.B": [1.0, 0.5], "itm.C": [0.5]}

    # Execute / Assert
    with pytest.raises(
        ValueError, match=re.escape("ITM columns differ in length: [1, 2]")
    ):
        LftmReply.from_fields(settings, metrics)


@pytest.mark.parametrize(
    ("settings", "metrics", "field", "problem"),
    [
        ({"sources": ["B"], **INSTANCE}, {"itm.B": [1.0]}, "metric", "is missing"),
        ({"metric": "lftm", **INSTANCE}, {}, "sources", "is missing"),
        ({"metric": "lftm", "sources": ["B"]}, {}, "release", "is missing"),
        ({"metric": "lftm", "sources": ["B"], **INSTANCE}, {}, "itm.B", "is missing"),
        (
            {"metric": "lftm", "sources": ["B"], "release": "domain"},
            {},
            "dtm.B",
            "is missing",
        ),
        (
            {"metric": "lftm", "sources": "B", **INSTANCE},
            {},
            "sources",
            "must be ",
        ),
        ({"metric": 1, "sources": [], **INSTANCE}, {}, "metric", "must be "),
        (
            {"metric": "lftm", "sources": ["B"], **INSTANCE},
            {"itm.B": 0.5},
            "itm.B",
            "must be ",
        ),
    ],
)
def test_lftm_reply_errors_name_the_field(
    settings: dict[str, object], metrics: dict[str, object], field: str, problem: str
) -> None:
    # Execute / Assert
    with pytest.raises(
        ValueError, match=rf"payload field '{re.escape(field)}' {problem}"
    ):
        LftmReply.from_fields(settings, metrics)


def test_lftm_reply_non_numeric_score_names_the_field() -> None:
    # Prepare
    settings = {"metric": "lftm", "sources": ["B"], **INSTANCE}
    metrics = {"itm.B": [0.5, "high"]}

    # Execute / Assert
    with pytest.raises(ValueError, match=r"payload field 'itm\.B'"):
        LftmReply.from_fields(settings, metrics)


def _without(fields: Mapping[str, object], key: str) -> dict[str, object]:
    return {name: value for name, value in fields.items() if name != key}


def _with(fields: Mapping[str, object], key: str, value: object) -> dict[str, object]:
    return {**fields, key: value}


@pytest.mark.parametrize(
    ("parse", "fields", "field", "problem"),
    [
        (
            HelloReply.from_fields,
            _without(HELLO_REPLY.to_fields(), "site"),
            "site",
            "is missing",
        ),
        (
            HelloReply.from_fields,
            _without(HELLO_REPLY.to_fields(), "class-names"),
            "class-names",
            "is missing",
        ),
        (
            HelloReply.from_fields,
            _with(HELLO_REPLY.to_fields(), "labelled", "12"),
            "labelled",
            "must be ",
        ),
        (
            HelloReply.from_fields,
            _with(HELLO_REPLY.to_fields(), "evaluation", True),
            "evaluation",
            "must be ",
        ),
        (
            HelloReply.from_fields,
            _with(HELLO_REPLY.to_fields(), "class-names", "background,organ"),
            "class-names",
            "must be ",
        ),
        (
            TrainReply.from_fields,
            _without(TRAIN_REPLY.to_fields(), "num-examples"),
            "num-examples",
            "is missing",
        ),
        (
            TrainReply.from_fields,
            _with(TRAIN_REPLY.to_fields(), "num-examples", 360.0),
            "num-examples",
            "must be ",
        ),
        (
            TrainReply.from_fields,
            _with(TRAIN_REPLY.to_fields(), "loss", "0.25"),
            "loss",
            "must be ",
        ),
        (
            SemisupReply.from_fields,
            _without(SEMISUP_REPLY.to_fields(), "dp.epsilon-total"),
            "dp.epsilon-total",
            "is missing",
        ),
        (
            AdaptRequest.from_fields,
            _without(ADAPT_REQUEST.to_fields(), "aux"),
            "aux",
            "is missing",
        ),
        (
            AdaptRequest.from_fields,
            _with(ADAPT_REQUEST.to_fields(), "main", None),
            "main",
            "must be ",
        ),
        (
            AdaptRequest.from_fields,
            _with(ADAPT_REQUEST.to_fields(), "weight-main", "0.6"),
            "weight-main",
            "must be ",
        ),
        (
            AdaptReply.from_fields,
            _without(ADAPT_REPLY.to_fields(), "pseudo-label-foreground"),
            "pseudo-label-foreground",
            "is missing",
        ),
        (
            AdaptReply.from_fields,
            _with(ADAPT_REPLY.to_fields(), "seconds", [9.0]),
            "seconds",
            "must be ",
        ),
        (
            ConsensusRequest.from_fields,
            _without(CONSENSUS_REQUEST.to_fields(), "start"),
            "start",
            "is missing",
        ),
        (
            ConsensusRequest.from_fields,
            _with(CONSENSUS_REQUEST.to_fields(), "label-sources", "B"),
            "label-sources",
            "must be ",
        ),
        (
            ConsensusRequest.from_fields,
            _with(CONSENSUS_REQUEST.to_fields(), "label-sources", [1, 2]),
            "label-sources",
            "must be a list of names",
        ),
        (
            ConsensusRequest.from_fields,
            _with(CONSENSUS_REQUEST.to_fields(), "label-sources", []),
            "label-sources",
            "names no model",
        ),
        (
            ConsensusReply.from_fields,
            _without(CONSENSUS_REPLY.to_fields(), "spearman-dp"),
            "spearman-dp",
            "is missing",
        ),
        (
            ConsensusReply.from_fields,
            _with(CONSENSUS_REPLY.to_fields(), "data-parameter.B", "0.4"),
            "data-parameter.B",
            "must be ",
        ),
        (EvaluateRequest.from_fields, {}, "predictors", "is missing"),
        (
            EvaluateRequest.from_fields,
            {"predictors": {"tgma": [["main", 1.0]]}},
            "predictors",
            "must be ",
        ),
        (
            EvaluateReply.from_fields,
            _without(EVALUATE_REPLY.to_fields(), "num-cases"),
            "num-cases",
            "is missing",
        ),
        (
            EvaluateReply.from_fields,
            _with(EVALUATE_REPLY.to_fields(), "dice.tgma", "0.8"),
            "dice.tgma",
            "must be ",
        ),
        (
            EvaluateReply.from_fields,
            _with(EVALUATE_REPLY.to_fields(), "hd95.extra", None),
            "hd95.extra",
            "must be ",
        ),
    ],
)
def test_payload_errors_name_the_field(
    parse: Callable[[Mapping[str, object]], object],
    fields: dict[str, object],
    field: str,
    problem: str,
) -> None:
    # Execute / Assert
    with pytest.raises(
        ValueError, match=rf"payload field '{re.escape(field)}' {problem}"
    ):
        parse(fields)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",  # not an object
        json.dumps({"tgma": 3}),  # members not a list
        json.dumps({"tgma": [["main"]]}),  # member without a weight
        json.dumps({"tgma": [["main", "heavy"]]}),  # weight not a number
        json.dumps({"tgma": [["main", 0.5, "extra"]]}),
    ],
)
def test_evaluate_request_rejects_malformed_predictors(text: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="payload field 'predictors' is malformed"):
        EvaluateRequest.from_fields({"predictors": text})


def test_evaluate_request_model_names_are_sorted_and_unique() -> None:
    # Execute / Assert
    assert EVALUATE_REQUEST.model_names() == ["B", "C", "aux", "main"]
    assert EvaluateRequest(predictors={}).model_names() == []


def test_evaluate_reply_fields_and_nan_hd95() -> None:
    # Prepare
    reply = EvaluateReply(
        num_cases=2, dice={"pair.main": 0.5}, hd95_mm={"pair.main": math.nan}
    )

    # Execute
    fields = reply.to_fields()
    parsed = EvaluateReply.from_fields(fields)

    # Assert
    assert set(fields) == {
        "num-cases",
        "dice.pair.main",
        "hd95.pair.main",
        "segmentations",
    } | set(DP_METRICS)
    assert parsed.dice == {"pair.main": 0.5}
    assert math.isnan(parsed.hd95_mm["pair.main"])
    assert not parsed.private


def test_evaluate_request_segment_travels_only_when_set() -> None:
    # Prepare
    predictors = {"tgma": [("main", 1.0)]}

    # Execute
    plain = EvaluateRequest(predictors=predictors).to_fields()
    segmenting = EvaluateRequest(predictors=predictors, segment="tgma")

    # Assert: a request without it is what an earlier release sent
    assert set(plain) == {"predictors"}
    assert EvaluateRequest.from_fields(plain).segment == ""
    assert EvaluateRequest.from_fields(segmenting.to_fields()) == segmenting


@pytest.mark.parametrize("segment", ["other", "../tgma", "tgma/x"])
def test_evaluate_request_refuses_a_segment_that_names_no_predictor(
    segment: str,
) -> None:
    # Prepare
    fields = {"predictors": '{"tgma": [["main", 1.0]]}', "segment": segment}

    # Execute / Assert
    with pytest.raises(
        ValueError,
        match=rf"^payload field 'segment' names {re.escape(repr(segment))}, which is "
        "not one of the predictors$",
    ):
        EvaluateRequest.from_fields(fields)


def test_replies_from_an_earlier_release_parse_without_the_new_dp_fields() -> None:
    # Prepare: a site of an earlier release sent no patient-level figures, and no
    # DP figures at all on evaluate and adapt
    train = {
        key: value
        for key, value in TRAIN_REPLY.to_fields().items()
        if not key.startswith(("dp.patient", "dp.slices"))
    }
    evaluate = {"num-cases": 2, "dice.a": 0.5, "hd95.a": 1.0}

    # Execute
    parsed_train = TrainReply.from_fields(train)
    parsed_evaluate = EvaluateReply.from_fields(evaluate)

    # Assert
    assert parsed_train.patient_epsilon_total == 0
    assert parsed_train.slices_per_case == 0
    assert parsed_evaluate.epsilon_spent == 0
    assert parsed_evaluate.dice == {"a": 0.5}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (TRAIN_REPLY, "loss"),
        (ADAPT_REQUEST, "weight-main"),
        (ADAPT_REPLY, "pseudo-label-foreground"),
        (EVALUATE_REPLY, "dice.tgma"),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_bool_is_rejected_where_a_number_is_expected(
    payload: Payload, field: str
) -> None:
    # Prepare
    fields = _with(payload.to_fields(), field, True)

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"payload field '{field}' must be a number"):
        type(payload).from_fields(fields)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("B", "model.B"),
        ("main", "model.main"),
        ("site.with.dots", "model.site.with.dots"),
    ],
)
def test_model_key_and_name_are_inverse(name: str, key: str) -> None:
    # Execute / Assert
    assert model_key(name) == key
    assert model_name(key) == name
    assert key.startswith(MODEL_KEY_PREFIX)


@pytest.mark.parametrize("key", ["weights", "request", "models.B", "B"])
def test_model_name_is_none_for_other_keys(key: str) -> None:
    # Execute / Assert
    assert model_name(key) is None


def test_action_names_are_distinct() -> None:
    # Execute / Assert
    assert len({HELLO, TRAIN_SOURCE, LFTM, ADAPT, CONSENSUS, EVALUATE}) == 6


def test_consensus_reply_schema_allows_its_figures_and_method_models() -> None:
    # Prepare
    schema = REPLY_SCHEMAS[CONSENSUS]

    # Execute / Assert
    assert all(schema.allows_metric(key) for key in CONSENSUS_REPLY.to_fields())
    assert not schema.allows_metric("labels.case_001")
    assert schema.models == CONSENSUS_METHODS
    assert not schema.weights


def test_semisup_reply_carries_its_dp_figures_under_its_schema() -> None:
    # Prepare
    schema = REPLY_SCHEMAS[SEMISUP]
    plain = dataclasses.replace(
        SEMISUP_REPLY,
        epsilon_spent=0.0,
        epsilon_total=0.0,
        delta=0.0,
        noise_multiplier=0.0,
    )

    # Execute
    fields = SEMISUP_REPLY.to_fields()

    # Assert: the same keys with and without DP (FedAvg needs them), all declared
    assert SemisupReply.from_fields(fields) == SEMISUP_REPLY
    assert set(fields) == set(plain.to_fields()) == set(schema.metrics)
    assert (fields["dp.epsilon-spent"], fields["dp.epsilon-total"]) == (0.8, 2.5)
    assert (fields["dp.delta"], fields["dp.noise-multiplier"]) == (1e-5, 1.2)
    assert SEMISUP_REPLY.private
    assert not plain.private
    assert schema.weights
