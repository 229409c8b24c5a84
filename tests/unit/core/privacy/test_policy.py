from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from core.privacy.limits import default_limits, to_limit_fields
from core.privacy.policy import (
    ACTIONS,
    AppliedPolicy,
    ArrayDescription,
    LftmRelease,
    PolicyError,
    ReplyDescription,
    Rule,
    SitePolicy,
    Violation,
    check_reply,
    default_policy,
    describe_violations,
    read_policy,
    resolve_policy,
)
from core.protocol import (
    EVALUATE,
    HELLO,
    LFTM,
    METRICS_KEY,
    REPLY_KEY,
    REQUEST_KEY,
    TRAIN_SOURCE,
    WEIGHTS_KEY,
    model_key,
)

TEMPLATE = Path(__file__).resolve().parents[4] / "deploy" / "policy.template.toml"

POLICY_TOML = """\
[actions]
answer = [
  "query.hello", "query.fingerprint", "train.source", "query.lftm", "train.adapt",
  "train.consensus", "train.semisup", "query.profile", "train.finetune", "evaluate",
]

[release]
lftm = "domain"
weights-may-leave = true
max-reply-mb = 64.0
max-config-value-bytes = 4096

[dp]
required = false
noise-multiplier = 1.0
delta = 1e-5
budget-epsilon = 10.0

[limits]
min-cases = 2

[semisup]
labelled-fraction = 1.0
"""

MANIFEST: dict[str, tuple[int, ...]] = {
    "encoder.conv.weight": (16, 1, 3, 3),
    "encoder.conv.bias": (16,),
}
WEIGHT_BYTES = 16 * 9 * 4


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _applied(**changes: object) -> AppliedPolicy:
    applied = resolve_policy(
        default_policy(),
        run_dp_required=False,
        run_noise_multiplier=None,
        run_target_epsilon=None,
        run_max_reply_mb=None,
    )
    return dataclasses.replace(applied, **changes)  # type: ignore[arg-type]


def _weights(record: str = WEIGHTS_KEY) -> tuple[ArrayDescription, ...]:
    return (
        ArrayDescription(
            record=record,
            name="encoder.conv.weight",
            shape=(16, 1, 3, 3),
            nbytes=WEIGHT_BYTES,
        ),
        ArrayDescription(
            record=record, name="encoder.conv.bias", shape=(16,), nbytes=64
        ),
    )


def _source_reply(**changes: object) -> ReplyDescription:
    reply = ReplyDescription(
        message_type=TRAIN_SOURCE,
        arrays=_weights(),
        metric_records={
            METRICS_KEY: {"num-examples": 1, "num-cases": 1, "loss": 1, "seconds": 1}
        },
        config_records={},
        total_bytes=WEIGHT_BYTES + 64 + 200,
    )
    return dataclasses.replace(reply, **changes)  # type: ignore[arg-type]


def _check(
    reply: ReplyDescription, policy: AppliedPolicy | None = None
) -> list[Violation]:
    return check_reply(
        reply, policy=policy or _applied(), manifest=MANIFEST, max_metric_values=32
    )


# --- reading the policy -------------------------------------------------------------


def test_template_is_the_default_policy() -> None:
    # Execute
    policy = read_policy(TEMPLATE)

    # Assert
    assert policy == default_policy()


def test_base_toml_of_these_tests_is_the_default_policy(tmp_path: Path) -> None:
    # Execute
    policy = read_policy(_write(tmp_path, POLICY_TOML))

    # Assert
    assert policy == default_policy()


def test_read_policy_parses_every_key(tmp_path: Path) -> None:
    # Prepare
    text = """\
[actions]
answer = ["query.hello", "evaluate", "evaluate"]
[release]
lftm = "instance"
weights-may-leave = false
max-reply-mb = 8
max-config-value-bytes = 512
[dp]
required = true
target-epsilon = 3
delta = 1e-6
budget-epsilon = 8.0
[limits]
max-predictors-per-request = 4
min-cases = 5
max-request-seconds = 60
[semisup]
labelled-fraction = 0.5
"""
    expected = SitePolicy(
        answers=frozenset({HELLO, EVALUATE}),
        lftm_release=LftmRelease.INSTANCE,
        weights_may_leave=False,
        dp_required=True,
        noise_multiplier=None,
        target_epsilon=3.0,
        delta=1e-6,
        epsilon_budget=8.0,
        max_reply_mb=8.0,
        max_config_value_bytes=512,
        limits=dataclasses.replace(
            default_limits(),
            max_predictors_per_request=4,
            min_cases=5,
            max_request_seconds=60.0,
        ),
        semisup_labelled_fraction=0.5,
    )

    # Execute
    policy = read_policy(_write(tmp_path, text))

    # Assert
    assert policy == expected
    assert isinstance(policy.max_reply_mb, float)
    assert isinstance(policy.target_epsilon, float)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("delta = 1e-5", "delta = 2.0", "dp.delta must be in (0, 1), got 2.0"),
        ("delta = 1e-5", "delta = 0.0", "dp.delta must be in (0, 1), got 0.0"),
        ("delta = 1e-5", "delta = true", "dp.delta must be a number, got True"),
        (
            "budget-epsilon = 10.0",
            "budget-epsilon = -1.0",
            "dp.budget-epsilon must be > 0, got -1.0",
        ),
        (
            "budget-epsilon = 10.0",
            "budget-epsilon = inf",
            "dp.budget-epsilon must be > 0, got inf",
        ),
        (
            "noise-multiplier = 1.0",
            "noise-multiplier = 0.0",
            "dp.noise-multiplier must be > 0, got 0.0",
        ),
        (
            "noise-multiplier = 1.0",
            "target-epsilon = -3.0",
            "dp.target-epsilon must be > 0, got -3.0",
        ),
        (
            "noise-multiplier = 1.0",
            "target-epsilon = 12.0",
            "dp.target-epsilon must be <= dp.budget-epsilon (10.0), got 12.0",
        ),
        (
            "noise-multiplier = 1.0",
            "noise-multiplier = 1.0\ntarget-epsilon = 3.0",
            "dp.noise-multiplier and dp.target-epsilon are exclusive",
        ),
        (
            "required = false\nnoise-multiplier = 1.0",
            "required = true",
            "dp.required is true: set dp.noise-multiplier or dp.target-epsilon",
        ),
        ("required = false", 'required = "no"', "dp.required must be true or false"),
        (
            "max-reply-mb = 64.0",
            "max-reply-mb = 0",
            "release.max-reply-mb must be > 0, got 0.0",
        ),
        (
            "max-config-value-bytes = 4096",
            "max-config-value-bytes = 0",
            "release.max-config-value-bytes must be >= 1, got 0",
        ),
        (
            "max-config-value-bytes = 4096",
            "max-config-value-bytes = 4096.0",
            "release.max-config-value-bytes must be an integer, got 4096.0",
        ),
        (
            "weights-may-leave = true",
            "weights-may-leave = 1",
            "release.weights-may-leave must be true or false, got 1",
        ),
        (
            'lftm = "domain"',
            'lftm = "cases"',
            "release.lftm must be one of 'instance', 'domain', got 'cases'",
        ),
        (
            'answer = [\n  "query.hello", "query.fingerprint", "train.source", '
            '"query.lftm", "train.adapt",\n  "train.consensus", "train.semisup", '
            '"query.profile", "train.finetune", "evaluate",\n]',
            'answer = "evaluate"',
            "actions.answer must be a list of action names, got 'evaluate'",
        ),
        (
            '"evaluate",\n]',
            '"evaluate", "query.images",\n]',
            "actions.answer has unknown actions 'query.images'; valid actions: "
            "evaluate, query.fingerprint, query.hello, query.lftm, query.profile, "
            "train.adapt, train.consensus, train.finetune, train.semisup, train.source",
        ),
        ("delta = 1e-5\n", "", "dp.delta is missing"),
        ('lftm = "domain"\n', "", "release.lftm is missing"),
        (
            "[actions]",
            "[actions]\nrefuse = []",
            "unknown key actions.refuse; valid keys in [actions]: answer",
        ),
        (
            "budget-epsilon = 10.0",
            "budget-epsilon = 10.0\nmax-grad-norm = 1.0",
            "unknown key dp.max-grad-norm; valid keys in [dp]:",
        ),
        (
            "[dp]",
            "[egress]\nstrict = true\n[dp]",
            "unknown table [egress]; valid tables: [actions], [release], [dp], "
            "[limits], [semisup]",
        ),
        (
            "[actions]",
            "version = 2\n[actions]",
            "unknown version; valid tables: [actions], [release], [dp], [limits]",
        ),
        (
            "min-cases = 2",
            "min-cases = 2\nmax-queries = 5",
            "unknown key limits.max-queries; valid keys in [limits]: "
            "max-models-per-request,",
        ),
        ("min-cases = 2", "min-cases = 0", "limits.min-cases must be >= 1, got 0"),
        (
            "min-cases = 2",
            "min-cases = 2.5",
            "limits.min-cases must be an integer, got 2.5",
        ),
        (
            "min-cases = 2",
            "max-request-seconds = -1",
            "limits.max-request-seconds must be >= 0 (0 = no cap), got -1.0",
        ),
        (
            "min-cases = 2",
            "max-request-seconds = true",
            "limits.max-request-seconds must be a number, got True",
        ),
        (
            "labelled-fraction = 1.0",
            "labelled-fraction = 0.0",
            "semisup.labelled-fraction must be in (0, 1], got 0.0",
        ),
    ],
)
def test_read_policy_errors_name_file_and_key(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    # Prepare
    assert old in POLICY_TOML
    path = _write(tmp_path, POLICY_TOML.replace(old, new, 1))

    # Execute
    with pytest.raises(PolicyError) as caught:
        read_policy(path)

    # Assert
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert caught.value.source == str(path)


def test_read_policy_names_file_on_malformed_toml(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, POLICY_TOML.replace("required = false", "required = "))

    # Execute / Assert
    with pytest.raises(PolicyError, match=re.escape(f"{path}: not valid TOML")):
        read_policy(path)


def test_read_policy_rejects_a_table_given_as_a_scalar(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, 'dp = "off"\n' + POLICY_TOML.split("[dp]")[0])

    # Execute / Assert
    with pytest.raises(PolicyError, match="dp must be a table, got 'off'"):
        read_policy(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"delta": 2.0}, "policy.toml: dp.delta must be in (0, 1), got 2.0"),
        ({"max_reply_mb": float("nan")}, "release.max-reply-mb must be > 0, got nan"),
        ({"answers": frozenset({"train.images"})}, "actions.answer has unknown"),
    ],
)
def test_site_policy_validates_on_construction(
    changes: dict[str, object], message: str
) -> None:
    # Execute / Assert
    with pytest.raises(PolicyError, match=re.escape(message)):
        dataclasses.replace(default_policy(), **changes)  # type: ignore[arg-type]


def test_default_policy_answers_every_action_and_keeps_itm_home() -> None:
    # Execute
    policy = default_policy()

    # Assert
    assert policy.answers == frozenset(ACTIONS)
    assert policy.lftm_release is LftmRelease.DOMAIN
    assert policy.weights_may_leave
    assert not policy.dp_required


# --- resolving against the run config -----------------------------------------------


@pytest.mark.parametrize(
    ("site_changes", "run", "expected"),
    [
        ({}, {"run_dp_required": True}, {"dp_required": True}),
        ({"dp_required": True}, {"run_dp_required": False}, {"dp_required": True}),
        ({}, {}, {"dp_required": False, "noise_multiplier": 1.0}),
        ({}, {"run_noise_multiplier": 0.5}, {"noise_multiplier": 1.0}),
        ({}, {"run_noise_multiplier": 2.5}, {"noise_multiplier": 2.5}),
        (
            {"noise_multiplier": None},
            {"run_noise_multiplier": 0.5},
            {"noise_multiplier": 0.5},
        ),
        (
            {"noise_multiplier": None, "target_epsilon": 3.0},
            {"run_target_epsilon": 8.0},
            {"target_epsilon": 3.0},
        ),
        (
            {"noise_multiplier": None, "target_epsilon": 3.0},
            {"run_target_epsilon": 1.0},
            {"target_epsilon": 1.0},
        ),
        (
            {},
            {"run_target_epsilon": 3.0},
            {"noise_multiplier": 1.0, "target_epsilon": 3.0},
        ),
        ({}, {"run_max_reply_mb": 200.0}, {"max_reply_mb": 64.0}),
        ({}, {"run_max_reply_mb": 8.0}, {"max_reply_mb": 8.0}),
        ({}, {"run_delta": 1e-7}, {"delta": 1e-7}),
        ({}, {"run_delta": 1e-3}, {"delta": 1e-5}),
        (
            {"lftm_release": LftmRelease.INSTANCE, "weights_may_leave": False},
            {"run_dp_required": True},
            {"lftm_release": LftmRelease.INSTANCE, "weights_may_leave": False},
        ),
    ],
)
def test_resolve_policy_takes_the_stricter_side(
    site_changes: dict[str, object],
    run: dict[str, object],
    expected: dict[str, object],
) -> None:
    # Prepare
    site = dataclasses.replace(default_policy(), **site_changes)  # type: ignore[arg-type]
    arguments: dict[str, object] = {
        "run_dp_required": False,
        "run_noise_multiplier": None,
        "run_target_epsilon": None,
        "run_max_reply_mb": None,
        **run,
    }

    # Execute
    applied = resolve_policy(site, **arguments)  # type: ignore[arg-type]

    # Assert
    actual = {name: getattr(applied, name) for name in expected}
    assert actual == expected
    assert applied.answers == site.answers
    assert applied.epsilon_budget == site.epsilon_budget


def test_resolve_policy_refuses_required_dp_without_noise_or_target() -> None:
    # Prepare
    site = dataclasses.replace(default_policy(), noise_multiplier=None)

    # Execute / Assert
    with pytest.raises(PolicyError, match="DP is required but neither"):
        resolve_policy(
            site,
            run_dp_required=True,
            run_noise_multiplier=None,
            run_target_epsilon=None,
            run_max_reply_mb=None,
        )


def test_applied_policy_fields_are_flat_and_round_trip() -> None:
    # Prepare
    applied = resolve_policy(
        default_policy(),
        run_dp_required=True,
        run_noise_multiplier=None,
        run_target_epsilon=3.0,
        run_max_reply_mb=16.0,
    )

    # Execute
    fields = applied.to_fields()

    # Assert
    assert fields == {
        "policy.actions.answer": (
            "evaluate,query.fingerprint,query.hello,query.lftm,query.profile,"
            "train.adapt,train.consensus,train.finetune,train.semisup,train.source"
        ),
        "policy.release.lftm": "domain",
        "policy.release.weights-may-leave": True,
        "policy.release.max-reply-mb": 16.0,
        "policy.release.max-config-value-bytes": 4096,
        "policy.dp.required": True,
        "policy.dp.noise-multiplier": 1.0,
        "policy.dp.target-epsilon": 3.0,
        "policy.dp.delta": 1e-5,
        "policy.dp.budget-epsilon": 10.0,
        "policy.semisup.labelled-fraction": 1.0,
        **{
            f"policy.{key}": value
            for key, value in to_limit_fields(default_limits()).items()
        },
    }
    assert AppliedPolicy.from_fields({"metric": "lftm", **fields}) == applied


def test_applied_policy_from_fields_names_a_missing_key() -> None:
    # Prepare
    fields = _applied().to_fields()
    del fields["policy.dp.delta"]

    # Execute / Assert
    with pytest.raises(PolicyError, match=r"policy\.dp\.delta is missing"):
        AppliedPolicy.from_fields(fields)


# --- checking replies ---------------------------------------------------------------


def test_allowed_source_training_reply_passes() -> None:
    # Prepare
    reply = _source_reply(
        arrays=_weights(),
        config_records={REPLY_KEY: {"policy.release.lftm": 6, "policy.dp.delta": 8}},
    )

    # Execute
    violations = _check(reply)

    # Assert
    assert violations == []
    assert describe_violations(violations) == "allowed by egress policy"


def test_named_model_records_are_allowed() -> None:
    # Prepare
    reply = _source_reply(
        message_type="train.adapt",
        arrays=_weights(model_key("main")) + _weights(model_key("aux")),
        metric_records={
            METRICS_KEY: {"num-examples": 1, "pseudo-label-foreground": 1, "seconds": 1}
        },
    )

    # Execute / Assert
    assert _check(reply) == []


def test_model_records_the_action_does_not_declare_are_blocked() -> None:
    # Prepare: an adapt reply may carry model.main/model.aux, nothing else
    reply = _source_reply(
        message_type="train.adapt",
        arrays=_weights(model_key("target-copy")),
        metric_records={METRICS_KEY: {"num-examples": 1}},
    )

    # Execute
    violations = _check(reply)

    # Assert
    assert violations == [
        Violation(
            Rule.UNKNOWN_RECORD,
            "array record 'model.target-copy' is not part of a 'train.adapt' reply"
            " (allowed: 'model.main', 'model.aux')",
        )
    ]


def test_undeclared_scalar_fields_are_blocked() -> None:
    # Prepare: small scalars, but not part of the contract (raw image statistics)
    reply = _source_reply(
        message_type=EVALUATE,
        arrays=(),
        metric_records={
            METRICS_KEY: {"num-cases": 1, "dice.tgma": 1, "image.mean-intensity": 1}
        },
        config_records={REPLY_KEY: {"case-name": 12, "policy.dp.delta": 8}},
    )

    # Execute
    violations = _check(reply)

    # Assert
    assert violations == [
        Violation(
            Rule.UNDECLARED_FIELD,
            "metrics/image.mean-intensity is not a field of the 'evaluate' reply"
            " (declared: num-cases, dice.*, hd95.*, segmentations, dice-raw.*,"
            " hd95-raw.*, dp.epsilon-spent, dp.epsilon-total,"
            " dp.delta, dp.noise-multiplier, dp.patient-epsilon-spent,"
            " dp.patient-epsilon-total, dp.slices-per-case)",
        ),
        Violation(
            Rule.UNDECLARED_FIELD,
            "reply/case-name is not a field of the 'evaluate' reply (declared: none)",
        ),
    ]


def test_misbehaving_reply_with_prediction_map_and_image_statistics_is_blocked() -> (
    None
):
    # Prepare: what a buggy or malicious handler might try to send home
    prediction = ArrayDescription(
        record=WEIGHTS_KEY, name="prediction", shape=(1, 64, 64), nbytes=64 * 64 * 4
    )
    reply = _source_reply(
        message_type=EVALUATE,
        arrays=(prediction,),
        metric_records={METRICS_KEY: {"dice.A": 1, "image.intensity-histogram": 4096}},
    )

    # Execute
    violations = _check(reply)

    # Assert
    assert violations == [
        Violation(
            Rule.UNKNOWN_RECORD,
            "array record 'weights' is not part of a 'evaluate' reply (allowed: none)",
        ),
        Violation(
            Rule.UNDECLARED_FIELD,
            "metrics/image.intensity-histogram is not a field of the 'evaluate' reply"
            " (declared: num-cases, dice.*, hd95.*, segmentations, dice-raw.*,"
            " hd95-raw.*, dp.epsilon-spent, dp.epsilon-total,"
            " dp.delta, dp.noise-multiplier, dp.patient-epsilon-spent,"
            " dp.patient-epsilon-total, dp.slices-per-case)",
        ),
        Violation(
            Rule.ARRAY_NOT_IN_MANIFEST,
            "weights/prediction with shape (1, 64, 64) is not a parameter of the"
            " declared model",
        ),
        Violation(
            Rule.TOO_MANY_METRIC_VALUES,
            "metrics/image.intensity-histogram holds 4096 values, at most 32 may leave",
        ),
    ]
    assert describe_violations(violations).startswith(
        "blocked by egress policy: unknown-record (array record 'weights'"
    )
    assert "; array-not-in-manifest (weights/prediction" in describe_violations(
        violations
    )
    assert "; too-many-metric-values (" in describe_violations(violations)


def test_image_shaped_array_under_a_parameter_name_is_blocked() -> None:
    # Prepare
    image = ArrayDescription(
        record=WEIGHTS_KEY,
        name="encoder.conv.weight",
        shape=(1, 1, 64, 64),
        nbytes=64 * 64 * 4,
    )

    # Execute
    violations = _check(_source_reply(arrays=(image,)))

    # Assert
    assert violations == [
        Violation(
            Rule.ARRAY_SHAPE_MISMATCH,
            "weights/encoder.conv.weight has shape (1, 1, 64, 64), the manifest"
            " declares (16, 1, 3, 3)",
        )
    ]


def test_array_with_more_than_eight_bytes_per_element_is_blocked() -> None:
    # Prepare
    smuggler = ArrayDescription(
        record=WEIGHTS_KEY, name="encoder.conv.bias", shape=(16,), nbytes=16 * 4096
    )

    # Execute
    violations = _check(_source_reply(arrays=(smuggler,)))

    # Assert
    assert [v.rule for v in violations] == [Rule.ARRAY_SIZE_MISMATCH]
    assert "weights/encoder.conv.bias is 65536 bytes" in violations[0].detail


def test_weights_are_blocked_when_they_may_not_leave() -> None:
    # Execute
    violations = _check(_source_reply(), _applied(weights_may_leave=False))

    # Assert
    assert violations == [
        Violation(
            Rule.WEIGHTS_MAY_NOT_LEAVE,
            f"2 arrays ({WEIGHT_BYTES + 64} bytes) in a reply, but"
            " release.weights-may-leave is false",
        )
    ]


def test_domain_release_blocks_itm_rows_but_allows_domain_means() -> None:
    # Prepare
    reply = ReplyDescription(
        message_type=LFTM,
        arrays=(),
        metric_records={METRICS_KEY: {"dtm.A": 1, "itm.B": 12}},
        config_records={REPLY_KEY: {"metric": 4, "sources": 8, "release": 8}},
        total_bytes=400,
    )

    # Execute
    domain = _check(reply)
    instance = _check(reply, _applied(lftm_release=LftmRelease.INSTANCE))

    # Assert
    assert domain == [
        Violation(
            Rule.INSTANCE_LFTM_NOT_ALLOWED,
            "metrics/itm.B holds 12 per-instance values, but release.lftm is"
            " 'domain' (per-source means only)",
        )
    ]
    assert instance == []


def test_agreement_rows_leave_under_either_release_one_value_per_candidate() -> None:
    # Prepare: three candidates sent; one row too long for them
    reply = ReplyDescription(
        message_type=LFTM,
        arrays=(),
        metric_records={METRICS_KEY: {"dtm.A": 1, "agree.A": 3, "agree.B": 12}},
        config_records={},
        total_bytes=400,
    )

    # Execute
    domain = check_reply(
        reply,
        policy=_applied(),
        manifest=MANIFEST,
        max_metric_values=32,
        num_candidates=3,
    )
    instance = check_reply(
        reply,
        policy=_applied(lftm_release=LftmRelease.INSTANCE),
        manifest=MANIFEST,
        max_metric_values=32,
        num_candidates=3,
    )

    # Assert: the three-value row is no per-instance release; the long one is refused
    expected = [
        Violation(
            Rule.TOO_MANY_METRIC_VALUES,
            "metrics/agree.B holds 12 values, at most 3 (one per candidate sent)"
            " may leave",
        )
    ]
    assert domain == expected
    assert instance == expected


def test_domain_release_allows_scalar_dtm_only_reply() -> None:
    # Prepare
    reply = ReplyDescription(
        message_type=LFTM,
        arrays=(),
        metric_records={METRICS_KEY: {"dtm.A": 1, "dtm.B": 1}},
        config_records={},
        total_bytes=100,
    )

    # Execute / Assert
    assert _check(reply) == []


def test_action_not_answered_is_blocked() -> None:
    # Prepare
    policy = _applied(answers=frozenset({HELLO, EVALUATE}))

    # Execute
    violations = _check(_source_reply(), policy)

    # Assert
    assert violations == [
        Violation(
            Rule.ACTION_NOT_ANSWERED,
            "'train.source' is not in actions.answer (answered: evaluate, query.hello)",
        )
    ]


@pytest.mark.parametrize(
    ("run_max_reply_mb", "total_bytes", "expected"),
    [
        (None, 64_000_000, []),
        (None, 64_000_001, [Rule.OVERSIZED_REPLY]),
        (1.0, 1_000_001, [Rule.OVERSIZED_REPLY]),
        (1.0, 999_999, []),
    ],
)
def test_oversized_reply_is_blocked(
    run_max_reply_mb: float | None, total_bytes: int, expected: list[Rule]
) -> None:
    # Prepare
    policy = resolve_policy(
        default_policy(),
        run_dp_required=False,
        run_noise_multiplier=None,
        run_target_epsilon=None,
        run_max_reply_mb=run_max_reply_mb,
    )

    # Execute
    violations = _check(_source_reply(total_bytes=total_bytes), policy)

    # Assert
    assert [v.rule for v in violations] == expected
    if expected:
        assert f"reply is {total_bytes} bytes" in violations[0].detail


def test_oversized_config_value_is_blocked() -> None:
    # Prepare
    reply = _source_reply(
        config_records={
            REPLY_KEY: {
                "policy.release.lftm": 6,
                "policy.dump": 4097,
                "policy.more": 9000,
            }
        }
    )

    # Execute
    violations = _check(reply)

    # Assert
    assert violations == [
        Violation(
            Rule.OVERSIZED_CONFIG_VALUE,
            "reply/policy.dump is 4097 bytes, release.max-config-value-bytes"
            " allows 4096",
        ),
        Violation(
            Rule.OVERSIZED_CONFIG_VALUE,
            "reply/policy.more is 9000 bytes, release.max-config-value-bytes"
            " allows 4096",
        ),
    ]


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        (
            {"config_records": {REQUEST_KEY: {"policy.x": 4}}},
            "config record 'request' is not part of a 'train.source' reply (allowed:"
            " 'reply')",
        ),
        (
            {
                "metric_records": {
                    METRICS_KEY: {"loss": 1},
                    "stats": {"mean": 1},
                }
            },
            "metric record 'stats' is not part of a 'train.source' reply (allowed:"
            " 'metrics')",
        ),
        (
            {"config_records": {METRICS_KEY: {"policy.loss": 8}}},
            "config record 'metrics' is not part of a 'train.source' reply (allowed:"
            " 'reply')",
        ),
        (
            {"arrays": _weights("images")},
            "array record 'images' is not part of a 'train.source' reply (allowed:"
            " 'weights')",
        ),
        (
            {"arrays": _weights("model.")},
            "array record 'model.' is not part of a 'train.source' reply",
        ),
    ],
)
def test_unknown_record_is_blocked(changes: dict[str, object], detail: str) -> None:
    # Execute
    violations = _check(_source_reply(**changes))

    # Assert
    assert [v.rule for v in violations] == [Rule.UNKNOWN_RECORD]
    assert detail in violations[0].detail


def test_check_reply_returns_every_violation_in_rule_order() -> None:
    # Prepare
    policy = _applied(answers=frozenset({HELLO}), weights_may_leave=False)
    reply = ReplyDescription(
        message_type=LFTM,
        arrays=(
            ArrayDescription(
                record="labels", name="label", shape=(64, 64), nbytes=4096
            ),
        ),
        metric_records={METRICS_KEY: {"itm.A": 40, "case.volume": 1}},
        config_records={REPLY_KEY: {"policy.cases": 5000}},
        total_bytes=70_000_000,
    )

    # Execute
    violations = _check(reply, policy)

    # Assert
    assert [v.rule.value for v in violations] == [
        "action-not-answered",
        "unknown-record",
        "undeclared-field",
        "weights-may-not-leave",
        "array-not-in-manifest",
        "oversized-reply",
        "oversized-config-value",
        "instance-lftm-not-allowed",
        "too-many-metric-values",
    ]


def test_check_reply_rejects_a_nonpositive_metric_limit() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="max_metric_values must be >= 1"):
        check_reply(
            _source_reply(), policy=_applied(), manifest=MANIFEST, max_metric_values=0
        )


def test_rule_ids_are_stable() -> None:
    # Assert
    assert {rule.value for rule in Rule} == {
        "action-not-answered",
        "unknown-record",
        "undeclared-field",
        "weights-may-not-leave",
        "array-not-in-manifest",
        "array-shape-mismatch",
        "array-size-mismatch",
        "oversized-reply",
        "oversized-config-value",
        "instance-lftm-not-allowed",
        "too-many-metric-values",
        "malformed-field",
        "limit-exceeded",
        "no-dp-form",
        "bundle-not-approved",
    }
