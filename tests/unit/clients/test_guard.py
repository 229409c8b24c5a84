"""The egress guard, proven through real ClientApps on a tiny synthetic federation.

Every test calls a ``ClientApp`` (``app(message, context)``) so the guard mod runs:
either the site's real app (``clients.app.app``) or a separate
``ClientApp(mods=[egress_guard])`` on which a test registers a deliberately
misbehaving handler. Each site's state (ledger, accountant) lives in a tmp folder
given as node config ``state-dir``, and policies are tmp files given as node config
``policy``, so nothing is written into the shared federation's site folders.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from clients import records
from clients.app import app as site_app
from clients.guard import declared_manifest, egress_guard
from core import cli, protocol
from core.config import ConfigValue, RunConfig, load_run_config
from core.privacy.dp import (
    ACCOUNTANT_FILE,
    AccountantState,
    read_accountant_state,
    write_accountant_state,
)
from core.privacy.egress import measure_content, measure_error
from core.privacy.ledger import Egress, Ledger, LedgerError, verify_ledger
from core.privacy.policy import ACTIONS, AppliedPolicy, Rule
from core.training.networks import Manifest
from tests.unit.clients.messages import (
    DP_POLICY,
    MESSAGE_ID,
    assert_site_error,
    build_message,
    build_site_context,
    policy_text,
    reason_of,
    write_policy,
)

SOURCE: Final = "B"  # a site with labelled training cases
BLOCKED: Final = "blocked by egress policy: "

Handler = Callable[[Message, Context], Message]
ContentFactory = Callable[[Manifest], RecordDict]


# -------------------------------------------------------------------------- helpers


def build_guarded_app(handlers: Mapping[str, Handler]) -> ClientApp:
    """A ClientApp with the site's egress guard and the given handlers."""
    guarded = ClientApp(mods=[egress_guard])
    for message_type, handler in handlers.items():
        category, _, action = message_type.partition(".")
        register = getattr(guarded, category)
        (register(action) if action else register())(handler)
    return guarded


def build_handler(
    factory: Callable[[], RecordDict], calls: list[str] | None = None
) -> Handler:
    """A handler replying fresh ``factory()`` content; records each call."""

    def handler(message: Message, _context: Context) -> Message:
        if calls is not None:
            calls.append(message.metadata.message_type)
        return Message(factory(), reply_to=message)

    return handler


def hello_settings(**changes: ConfigValue | list[str]) -> dict[str, object]:
    fields: dict[str, object] = dict(
        protocol.HelloReply(
            site=SOURCE,
            modality="synthetic-MR",
            labelled=2,
            unlabelled=0,
            evaluation=6,
            class_names=("background", "organ"),
        ).to_fields()
    )
    fields.update(changes)
    return fields


def hello_content(**changes: ConfigValue | list[str]) -> RecordDict:
    return RecordDict({protocol.REPLY_KEY: ConfigRecord(hello_settings(**changes))})  # type: ignore[arg-type]


def manifest_weights(manifest: Manifest) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name, shape in manifest.items()}


def weights_content(weights: Mapping[str, np.ndarray]) -> RecordDict:
    return RecordDict({protocol.WEIGHTS_KEY: records.to_array_record(weights)})


def source_reply(manifest: Manifest, **changes: object) -> RecordDict:
    """A well-formed ``train.source`` reply: weights and figures with a decision."""
    fields: dict[str, object] = dict(
        protocol.TrainReply(
            num_examples=4,
            num_cases=2,
            loss=0.5,
            seconds=1.0,
            largest_component=1,
            dice_raw=0.75,
            dice_postprocessed=0.8125,
        ).to_fields()
    )
    fields.update(changes)
    content = weights_content(manifest_weights(manifest))
    content[protocol.METRICS_KEY] = MetricRecord(fields)  # type: ignore[arg-type]
    return content


def ledger_of(state_dir: Path) -> Ledger:
    return Ledger(state_dir / "ledger.jsonl")


def applied_fields(reply: Message) -> dict[str, object]:
    settings = reply.content.config_records[protocol.REPLY_KEY]
    return {
        key: value
        for key, value in settings.items()
        if key.startswith(protocol.APPLIED_POLICY_PREFIX)
    }


def send_over_the_wire(content: RecordDict) -> RecordDict:
    """``content`` as the coordinator receives it: serialised and parsed again."""
    proto = recorddict_to_proto(content)
    return recorddict_from_proto(type(proto).FromString(proto.SerializeToString()))


def released_reason(reply: Message) -> Egress:
    """What an error reply released: its reason without the ledger anchor."""
    reason, anchor = protocol.LedgerAnchor.split_reason(reason_of(reply))
    assert anchor is not None, reason_of(reply)
    return measure_error(reason)


def assert_blocked(reply: Message, *rules: Rule) -> None:
    reason = reason_of(reply)
    assert reply.has_error()
    assert reply.error.code == protocol.EGRESS_BLOCKED_CODE, reason[:500]
    assert reply.metadata.reply_to_message_id == MESSAGE_ID
    assert not reply.has_content()
    assert reason.startswith(BLOCKED), reason[:500]
    for rule in rules:
        assert f"{rule.value} (" in reason, reason[:500]


def decision(*rules: Rule) -> str:
    return "blocked: " + ", ".join(rule.value for rule in rules)


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config(run_config: dict[str, ConfigValue]) -> RunConfig:
    return load_run_config(run_config)


@pytest.fixture(scope="module")
def manifest(config: RunConfig) -> Manifest:
    return declared_manifest(config.model, config.data)


@dataclasses.dataclass(frozen=True)
class Served:
    """hello, train.source, hello answered by the real app at site B."""

    state_dir: Path
    replies: list[Message]
    received: list[RecordDict]  # each reply's content after the wire


@pytest.fixture(scope="module")
def served(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path_factory: pytest.TempPathFactory,
) -> Served:
    state_dir = tmp_path_factory.mktemp("served") / "state"
    context = build_site_context(run_config, federation / SOURCE, state_dir)
    replies = [
        site_app(build_message(RecordDict(), message_type, f"m{number}"), context)
        for number, message_type in enumerate(
            (protocol.HELLO, protocol.TRAIN_SOURCE, protocol.HELLO)
        )
    ]
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
    received = [send_over_the_wire(reply.content) for reply in replies]
    return Served(state_dir=state_dir, replies=replies, received=received)


# ------------------------------------------------------------ a misbehaving handler


# An evaluate request for the predictor "uniform" (of model B): the only wildcard
# names (dice.*, itm.*) a reply may use are those the request introduced.
UNIFORM_REQUEST = protocol.EvaluateRequest(
    predictors={"uniform": [("B", 1.0)]}
).to_fields()


def request_content() -> RecordDict:
    """A request naming predictor "uniform" and candidate model "B"."""
    return RecordDict(
        {
            protocol.REQUEST_KEY: ConfigRecord(dict(UNIFORM_REQUEST)),  # type: ignore[arg-type]
            protocol.model_key("B"): ArrayRecord(),
        }
    )


def leaky_evaluate(message: Message, _context: Context) -> Message:
    """Evaluate that leaks a prediction map and image statistics when asked to."""
    request = records.read_request(message.content)
    metrics: dict[str, float | int | list[float]] = {
        "num-cases": 6,
        "dice.uniform": 0.8,
    }
    content = RecordDict()
    if request.get("leak", False):
        prediction = np.zeros((1, 32, 32), np.float32)
        prediction[0, 8:24, 8:24] = 1.0
        content["prediction"] = records.to_array_record({"segmentation": prediction})
        metrics["image.mean-intensity"] = 0.42
        metrics["image.intensity-histogram"] = [float(n) for n in range(16)]
    content[protocol.METRICS_KEY] = MetricRecord(metrics)  # type: ignore[arg-type]
    return Message(content, reply_to=message)


def test_leaking_handler_is_blocked_and_the_site_keeps_serving(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    leaky = ClientApp(mods=[egress_guard])
    leaky.evaluate()(leaky_evaluate)
    context = build_site_context(run_config, federation / SOURCE, tmp_path / "state")
    leak = RecordDict(
        {protocol.REQUEST_KEY: ConfigRecord({"leak": True, **UNIFORM_REQUEST})}
    )
    honest = RecordDict(
        {protocol.REQUEST_KEY: ConfigRecord({"leak": False, **UNIFORM_REQUEST})}
    )
    expected_rules = (
        Rule.UNKNOWN_RECORD,
        Rule.UNDECLARED_FIELD,
        Rule.ARRAY_NOT_IN_MANIFEST,
        Rule.TOO_MANY_METRIC_VALUES,
    )

    # Execute
    blocked = leaky(build_message(leak, protocol.EVALUATE), context)
    answered = leaky(build_message(honest, protocol.EVALUATE, "m2"), context)

    # Assert: the leak never left, and the reason names every broken rule
    assert_blocked(blocked, *expected_rules)
    reason = reason_of(blocked)
    assert "array record 'prediction' is not part of a 'evaluate' reply" in reason
    assert "metrics/image.mean-intensity is not a field" in reason
    assert "metrics/image.intensity-histogram is not a field" in reason
    assert "prediction/segmentation with shape (1, 32, 32)" in reason
    assert "metrics/image.intensity-histogram holds 16 values, at most 2" in reason
    # ... the ledger records what it would have been
    first, second = ledger_of(tmp_path / "state").entries()
    assert first.decision == decision(*expected_rules)
    assert first.message_type == protocol.EVALUATE
    assert first.sender == SOURCE
    assert first.egress is not None
    assert [(a.record, a.name, a.shape) for a in first.egress.arrays] == [
        ("prediction", "segmentation", (1, 32, 32))
    ]
    assert first.egress.arrays[0].nbytes == 32 * 32 * 4
    assert first.egress.metrics["metrics/image.intensity-histogram"] == 16
    assert first.egress.metrics["metrics/image.mean-intensity"] == 1
    # ... and the same app instance then answers an honest request normally
    assert not answered.has_error(), answered.error.reason
    assert answered.metadata.reply_to_message_id == "m2"
    assert dict(answered.content[protocol.METRICS_KEY]) == {
        "num-cases": 6,
        "dice.uniform": 0.8,
    }
    assert second.released
    assert (
        second.egress
        == measure_content(answered.content, message_type=protocol.EVALUATE).egress
    )
    assert verify_ledger(tmp_path / "state" / "ledger.jsonl").ok


# ----------------------------------------------------------- every rule, via guard


def _with_first(
    manifest: Manifest, value: Callable[[tuple[int, ...]], np.ndarray]
) -> RecordDict:
    """Manifest weights whose first parameter is replaced by ``value(shape)``."""
    weights = manifest_weights(manifest)
    first = sorted(weights)[0]
    weights[first] = value(manifest[first])
    return weights_content(weights)


RULE_CASES = [
    pytest.param(
        protocol.HELLO,
        {},
        lambda _m: RecordDict(
            {
                protocol.REPLY_KEY: ConfigRecord(hello_settings()),  # type: ignore[arg-type]
                "image-stats": MetricRecord({"image.mean-intensity": 0.42}),
            }
        ),
        (Rule.UNKNOWN_RECORD,),
        "metric record 'image-stats' is not part of a 'query.hello' reply",
        id="unknown-record",
    ),
    pytest.param(
        protocol.HELLO,
        {},
        lambda _m: hello_content(**{"case-ids": ["B_000", "B_001"]}),
        (Rule.UNDECLARED_FIELD,),
        "reply/case-ids is not a field of the 'query.hello' reply",
        id="undeclared-field",
    ),
    pytest.param(
        protocol.HELLO,
        {},
        # A name under the applied-policy prefix is still the handler's own field.
        lambda _m: hello_content(**{"policy.image-histogram": ",".join(["0.5"] * 100)}),
        (Rule.UNDECLARED_FIELD,),
        "reply/policy.image-histogram was set by the handler",
        id="undeclared-field-under-policy-prefix",
    ),
    pytest.param(
        protocol.TRAIN_SOURCE,
        {},
        lambda m: weights_content(
            {**manifest_weights(m), "prediction": np.ones((1, 32, 32), np.float32)}
        ),
        (Rule.ARRAY_NOT_IN_MANIFEST,),
        "weights/prediction with shape (1, 32, 32) is not a parameter",
        id="array-not-in-manifest",
    ),
    pytest.param(
        protocol.TRAIN_SOURCE,
        {},
        lambda m: _with_first(m, lambda shape: np.zeros((*shape, 2), np.float32)),
        (Rule.ARRAY_SHAPE_MISMATCH,),
        "the manifest declares",
        id="array-shape-mismatch",
    ),
    pytest.param(
        protocol.TRAIN_SOURCE,
        {},
        # Reachable with a real array: complex128 has 16 bytes per element, so a
        # parameter of the declared name and shape carries twice what float64 could.
        lambda m: _with_first(m, lambda shape: np.zeros(shape, np.complex128)),
        (Rule.ARRAY_SIZE_MISMATCH,),
        "more than 8 per element",
        id="array-size-mismatch",
    ),
    pytest.param(
        protocol.EVALUATE,
        {"release.weights-may-leave": False},
        # Not refused up front (evaluate returns no weights), so checked on the way out.
        lambda m: weights_content(manifest_weights(m)),
        (Rule.UNKNOWN_RECORD, Rule.WEIGHTS_MAY_NOT_LEAVE),
        "release.weights-may-leave is false",
        id="weights-may-not-leave",
    ),
    pytest.param(
        protocol.HELLO,
        {"release.max-reply-mb": 0.0001},
        lambda _m: hello_content(),
        (Rule.OVERSIZED_REPLY,),
        "the applied max-reply-mb 0.0001 allows 100",
        id="oversized-reply",
    ),
    pytest.param(
        protocol.EVALUATE,
        {"release.max-reply-mb": 0.001},
        # A metric *name* can carry data too; the reply limit counts names.
        lambda _m: RecordDict(
            {
                protocol.METRICS_KEY: MetricRecord(
                    {"num-cases": 6, "dice." + "x" * 2000: 0.5}
                )
            }
        ),
        # Both rules: the name is unrequested, and it is too long for the limit.
        (Rule.UNDECLARED_FIELD, Rule.OVERSIZED_REPLY),
        "the applied max-reply-mb 0.001 allows 1000",
        id="oversized-reply-in-names",
    ),
    pytest.param(
        protocol.EVALUATE,
        {},
        # A wildcard name the request never used could carry a case id out.
        lambda _m: RecordDict(
            {protocol.METRICS_KEY: MetricRecord({"num-cases": 6, "dice.B_000": 0.9})}
        ),
        (Rule.UNDECLARED_FIELD,),
        "metrics/dice.B_000 names 'B_000', which is not a model or predictor of the"
        " request",
        id="undeclared-field-unrequested-name",
    ),
    pytest.param(
        protocol.HELLO,
        {},
        lambda _m: hello_content(site="x" * 5000),
        (Rule.OVERSIZED_CONFIG_VALUE,),
        "reply/site is 5002 bytes, release.max-config-value-bytes allows 4096",
        id="oversized-config-value",
    ),
    pytest.param(
        protocol.LFTM,
        {"release.lftm": "domain"},
        lambda _m: RecordDict(
            {
                protocol.REPLY_KEY: ConfigRecord(
                    {"metric": "lftm", "sources": [SOURCE], "release": "instance"}
                ),
                protocol.METRICS_KEY: MetricRecord({"itm.B": [0.2, 0.4]}),
            }
        ),
        (Rule.INSTANCE_LFTM_NOT_ALLOWED,),
        "metrics/itm.B holds 2 per-instance values, but release.lftm is 'domain'",
        id="instance-lftm-not-allowed",
    ),
    pytest.param(
        protocol.EVALUATE,
        {},
        lambda _m: RecordDict(
            {
                protocol.METRICS_KEY: MetricRecord(
                    {"num-cases": 6, "dice.uniform": [0.5] * 64}
                )
            }
        ),
        # A Dice is one number, so the list is malformed too.
        (Rule.MALFORMED_FIELD, Rule.TOO_MANY_METRIC_VALUES),
        "metrics/dice.uniform holds 64 values, at most 2 may leave",
        id="too-many-metric-values",
    ),
    pytest.param(
        protocol.TRAIN_SOURCE,
        {},
        # The post-processing decision is 0 or 1: a fraction could carry a figure.
        lambda m: source_reply(m, **{"postprocess.largest-component": 0.5}),
        (Rule.MALFORMED_FIELD,),
        "metrics: payload field 'postprocess.largest-component' must be an integer,"
        " got 0.5",
        id="malformed-field",
    ),
    pytest.param(
        protocol.TRAIN_SOURCE,
        {},
        lambda m: source_reply(m, **{"postprocess.largest-component": 2}),
        (Rule.MALFORMED_FIELD,),
        "payload field 'postprocess.largest-component' must be one of 0, 1, got 2",
        id="malformed-field-value",
    ),
    pytest.param(
        protocol.TRAIN_SOURCE,
        {},
        # Under a declared scalar name, a list (within the case count) is malformed.
        lambda m: source_reply(m, **{"postprocess.dice-raw": [0.5, 0.25]}),
        (Rule.MALFORMED_FIELD,),
        "payload field 'postprocess.dice-raw' must be a number, got [0.5, 0.25]",
        id="malformed-field-list",
    ),
]


def test_a_source_reply_with_its_postprocessing_decision_passes(
    federation: Path,
    run_config: dict[str, ConfigValue],
    manifest: Manifest,
    tmp_path: Path,
) -> None:
    # Prepare
    guarded = build_guarded_app(
        {protocol.TRAIN_SOURCE: build_handler(lambda: source_reply(manifest))}
    )
    context = build_site_context(run_config, federation / SOURCE, tmp_path / "state")

    # Execute
    reply = guarded(build_message(request_content(), protocol.TRAIN_SOURCE), context)

    # Assert
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content.metric_records[protocol.METRICS_KEY]
    decided = protocol.TrainReply.from_fields(dict(metrics))
    assert decided.postprocess
    assert (decided.dice_raw, decided.dice_postprocessed) == (0.75, 0.812)


@pytest.mark.parametrize(
    ("message_type", "policy", "factory", "rules", "detail"), RULE_CASES
)
def test_guard_blocks_each_rule(
    federation: Path,
    run_config: dict[str, ConfigValue],
    manifest: Manifest,
    tmp_path: Path,
    message_type: str,
    policy: dict[str, object],
    factory: ContentFactory,
    rules: tuple[Rule, ...],
    detail: str,
) -> None:
    # Prepare
    guarded = build_guarded_app(
        {message_type: build_handler(lambda: factory(manifest))}
    )
    context = build_site_context(
        run_config,
        federation / SOURCE,
        tmp_path / "state",
        policy=write_policy(tmp_path, policy),
    )

    # Execute
    reply = guarded(build_message(request_content(), message_type), context)

    # Assert
    assert_blocked(reply, *rules)
    assert detail in reason_of(reply)
    (entry,) = ledger_of(tmp_path / "state").entries()
    assert entry.decision == decision(*rules)
    assert entry.message_type == message_type
    attempted = measure_content(factory(manifest), message_type=message_type).egress
    assert entry.egress is not None
    assert entry.egress.arrays == attempted.arrays
    assert entry.egress.metrics == attempted.metrics


def test_action_not_in_the_policy_is_refused_before_its_handler_runs(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    calls: list[str] = []
    guarded = build_guarded_app(
        {
            protocol.TRAIN_SOURCE: build_handler(RecordDict, calls),
            protocol.HELLO: build_handler(hello_content, calls),
        }
    )
    policy = write_policy(tmp_path, {"actions.answer": [protocol.HELLO]})
    context = build_site_context(
        run_config, federation / SOURCE, tmp_path / "state", policy=policy
    )

    # Execute
    refused = guarded(build_message(RecordDict(), protocol.TRAIN_SOURCE), context)
    calls_after_refusal = list(calls)
    answered = guarded(build_message(RecordDict(), protocol.HELLO, "m2"), context)

    # Assert
    assert calls_after_refusal == []
    assert_blocked(refused, Rule.ACTION_NOT_ANSWERED)
    assert "'train.source' is not in actions.answer of the site's policy" in reason_of(
        refused
    )
    assert not answered.has_error(), answered.error.reason
    assert calls == [protocol.HELLO]
    first, second = ledger_of(tmp_path / "state").entries()
    assert (first.decision, first.egress) == (
        decision(Rule.ACTION_NOT_ANSWERED),
        released_reason(refused),
    )
    assert second.released


@pytest.mark.parametrize(
    "message_type", [protocol.TRAIN_SOURCE, protocol.ADAPT], ids=["source", "adapt"]
)
def test_weights_may_not_leave_refuses_training_before_it_runs(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    message_type: str,
) -> None:
    # Prepare: with DP required, any training would write the site's accountant
    policy = write_policy(tmp_path, {**DP_POLICY, "release.weights-may-leave": False})
    context = build_site_context(
        run_config, federation / SOURCE, tmp_path / "state", policy=policy
    )

    # Execute
    reply = site_app(build_message(RecordDict(), message_type), context)

    # Assert
    assert_blocked(reply, Rule.WEIGHTS_MAY_NOT_LEAVE)
    assert f"a {message_type!r} reply is trained weights" in reason_of(reply)
    assert (
        "weights-may-leave is false in the site's policy; nothing was run"
        in reason_of(reply)
    )
    assert sorted(path.name for path in (tmp_path / "state").iterdir()) == [
        "ledger.jsonl"
    ]
    (entry,) = ledger_of(tmp_path / "state").entries()
    assert (entry.decision, entry.egress) == (
        decision(Rule.WEIGHTS_MAY_NOT_LEAVE),
        released_reason(reply),
    )
    assert entry.policy["policy.release.weights-may-leave"] is False


def test_every_rule_is_proven_through_the_guard() -> None:
    # Prepare
    proven_elsewhere = {
        Rule.ACTION_NOT_ANSWERED,  # test_action_not_in_the_policy_is_refused_...
        Rule.LIMIT_EXCEEDED,  # test_limits.py and tests/security/
        Rule.NO_DP_FORM,  # test_limits.py and tests/security/
        Rule.BUNDLE_NOT_APPROVED,  # the site's app process (clients/serve.py)
    }

    # Execute
    proven = {rule for case in RULE_CASES for rule in case.values[3]}

    # Assert: a new rule needs a guard test too
    assert proven | proven_elsewhere == set(Rule)


# ------------------------------------------------- handler failures and error text


@pytest.mark.parametrize("how", ["raises", "returns-error"])
def test_handler_failure_becomes_a_recorded_site_error(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path, how: str
) -> None:
    # Prepare
    def failing(message: Message, _context: Context) -> Message:
        if how == "raises":
            raise RuntimeError("boom at the site")
        return Message(
            Error(
                code=protocol.SITE_ERROR_CODE, reason="RuntimeError: boom at the site"
            ),
            reply_to=message,
        )

    guarded = build_guarded_app({protocol.HELLO: failing})
    context = build_site_context(run_config, federation / SOURCE, tmp_path / "state")

    # Execute
    reply = guarded(build_message(RecordDict(), protocol.HELLO), context)

    # Assert
    assert_site_error(reply, "RuntimeError: boom at the site")
    (entry,) = ledger_of(tmp_path / "state").entries()
    assert entry.decision == "error"
    assert entry.egress == released_reason(reply)


@pytest.mark.parametrize("how", ["raises", "returns-error"])
def test_error_text_cannot_carry_data_past_the_config_value_limit(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path, how: str
) -> None:
    # Prepare: an "error" whose reason is the image's intensity histogram
    histogram = ",".join(str(n) for n in range(2000))

    def leaking(message: Message, _context: Context) -> Message:
        if how == "raises":
            raise ValueError(f"histogram {histogram}")
        return Message(
            Error(code=protocol.SITE_ERROR_CODE, reason=f"histogram {histogram}"),
            reply_to=message,
        )

    guarded = build_guarded_app({protocol.HELLO: leaking})
    context = build_site_context(run_config, federation / SOURCE, tmp_path / "state")

    # Execute
    reply = guarded(build_message(RecordDict(), protocol.HELLO), context)

    # Assert
    assert_blocked(reply, Rule.OVERSIZED_CONFIG_VALUE)
    assert histogram not in reason_of(reply)
    assert "release.max-config-value-bytes allows 4096" in reason_of(reply)
    (entry,) = ledger_of(tmp_path / "state").entries()
    assert entry.decision == decision(Rule.OVERSIZED_CONFIG_VALUE)
    assert entry.egress is not None
    assert entry.egress.total_bytes > 4096


def test_a_broken_ledger_fails_closed(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: a ledger whose last line was cut off
    context = build_site_context(run_config, federation / SOURCE, tmp_path / "state")
    site_app(build_message(RecordDict(), protocol.HELLO), context)
    path = tmp_path / "state" / "ledger.jsonl"
    path.write_bytes(path.read_bytes()[:-10])

    # Execute / Assert: nothing is released without its ledger entry
    with pytest.raises(LedgerError, match="the last line is incomplete"):
        site_app(build_message(RecordDict(), protocol.HELLO, "m2"), context)


# --------------------------------------------------------- the applied policy, bound


def test_every_allowed_reply_carries_the_applied_policy(served: Served) -> None:
    # Prepare
    entries = ledger_of(served.state_dir).entries()

    # Execute
    applied = [applied_fields(reply) for reply in served.replies]

    # Assert
    assert len(entries) == len(served.replies) == 3
    for fields, entry in zip(applied, entries, strict=True):
        assert fields == entry.policy
        policy = AppliedPolicy.from_fields(fields)
        assert policy.answers == frozenset(ACTIONS)
        assert policy.max_reply_mb == 64.0
    assert set(served.replies[1].content.keys()) == {
        protocol.METRICS_KEY,
        protocol.WEIGHTS_KEY,
        protocol.REPLY_KEY,
    }


STRICTER_CASES = [
    pytest.param(
        {},
        {"privacy.max-reply-mb": 32.0},
        {"policy.release.max-reply-mb": 32.0},
        id="run-reply-limit-smaller",
    ),
    pytest.param(
        {"release.max-reply-mb": 16.0},
        {"privacy.max-reply-mb": 32.0},
        {"policy.release.max-reply-mb": 16.0},
        id="site-reply-limit-smaller",
    ),
    pytest.param(
        {},
        {"privacy.dp": True, "privacy.target-epsilon": 3.0},
        {
            "policy.dp.required": True,
            "policy.dp.target-epsilon": 3.0,
            "policy.dp.noise-multiplier": 1.0,
        },
        id="run-requires-dp",
    ),
    pytest.param(
        {"dp.required": True},
        {"privacy.dp": False},
        {"policy.dp.required": True},
        id="site-requires-dp",
    ),
    pytest.param(
        {"dp.noise-multiplier": 1.5},
        {"privacy.noise-multiplier": 0.5},
        {"policy.dp.noise-multiplier": 1.5},
        id="site-noise-larger",
    ),
    pytest.param(
        {},
        {"privacy.noise-multiplier": 2.0},
        {"policy.dp.noise-multiplier": 2.0, "policy.dp.required": False},
        id="run-noise-larger",
    ),
    pytest.param(
        {"dp.noise-multiplier": None, "dp.target-epsilon": 2.0},
        {"privacy.target-epsilon": 4.0},
        {"policy.dp.target-epsilon": 2.0},
        id="site-epsilon-smaller",
    ),
    pytest.param(
        {},
        {"privacy.delta": 1e-7},
        {"policy.dp.delta": 1e-7},
        id="run-delta-smaller",
    ),
]


@pytest.mark.parametrize(("policy", "run", "expected"), STRICTER_CASES)
def test_the_stricter_of_site_policy_and_run_config_is_applied(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    policy: dict[str, object],
    run: dict[str, ConfigValue],
    expected: dict[str, object],
) -> None:
    # Prepare
    context = build_site_context(
        run_config,
        federation / SOURCE,
        tmp_path / "state",
        policy=write_policy(tmp_path, policy),
        run_overrides=run,
    )

    # Execute
    reply = site_app(build_message(RecordDict(), protocol.HELLO), context)

    # Assert
    assert not reply.has_error(), reply.error.reason
    applied = applied_fields(reply)
    assert {key: applied.get(key) for key in expected} == expected
    (entry,) = ledger_of(tmp_path / "state").entries()
    assert entry.policy == applied


def test_run_config_reply_limit_binds_when_smaller_than_the_sites(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: the site allows 64 MB, the run only 100 bytes
    context = build_site_context(
        run_config,
        federation / SOURCE,
        tmp_path / "state",
        policy=write_policy(tmp_path),
        run_overrides={"privacy.max-reply-mb": 0.0001},
    )

    # Execute
    reply = site_app(build_message(RecordDict(), protocol.HELLO), context)

    # Assert
    assert_blocked(reply, Rule.OVERSIZED_REPLY)
    assert "the applied max-reply-mb 0.0001 allows 100" in reason_of(reply)
    (entry,) = ledger_of(tmp_path / "state").entries()
    assert entry.policy["policy.release.max-reply-mb"] == 0.0001


def test_run_config_dp_binds_when_the_site_does_not_require_it(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    context = build_site_context(
        run_config,
        federation / SOURCE,
        tmp_path / "state",
        run_overrides={"privacy.dp": True, "privacy.target-epsilon": 3.0},
    )

    # Execute
    reply = site_app(build_message(RecordDict(), protocol.TRAIN_SOURCE), context)

    # Assert
    assert not reply.has_error(), reply.error.reason
    result = protocol.TrainReply.from_fields(reply.content[protocol.METRICS_KEY])
    assert result.private
    assert result.noise_multiplier >= 1.0  # the site's noise binds as well
    assert 0.0 < result.epsilon_spent <= 3.0 + 0.01
    assert applied_fields(reply)["policy.dp.required"] is True
    assert (tmp_path / "state" / ACCOUNTANT_FILE).is_file()


# ------------------------------------------------------------ ledger and audit trail


def test_released_entries_digest_what_the_coordinator_receives(
    federation: Path, manifest: Manifest, served: Served
) -> None:
    # Prepare
    entries = ledger_of(served.state_dir).entries()

    # Execute
    digests = [
        measure_content(content, message_type=entry.message_type).egress.digest
        for content, entry in zip(served.received, entries, strict=True)
    ]

    # Assert
    assert [entry.message_type for entry in entries] == [
        protocol.HELLO,
        protocol.TRAIN_SOURCE,
        protocol.HELLO,
    ]
    assert all(entry.released for entry in entries)
    assert all(entry.sender == SOURCE for entry in entries)
    assert all(entry.run_id == "1" for entry in entries)
    assert [entry.egress.digest for entry in entries if entry.egress] == digests
    assert len(set(digests[:2])) == 2
    train = entries[1].egress
    assert train is not None
    assert {a.name: a.shape for a in train.arrays} == manifest
    assert {a.record for a in train.arrays} == {protocol.WEIGHTS_KEY}
    assert train.metrics["metrics/loss"] == 1
    assert not (federation / SOURCE / ".sitebridge").exists()


def test_audit_verify_accepts_the_guards_ledger(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    path = served.state_dir / "ledger.jsonl"

    # Execute
    status = cli.main(["audit", "verify", str(path)])

    # Assert
    assert status == 0
    assert "OK: 3 entries, chain intact" in capsys.readouterr().out


def _edit_train_entry(lines: list[str]) -> list[str]:
    """Hide that weights left: empty the train.source entry's arrays, no rehash."""
    entry = json.loads(lines[1])
    entry["egress"]["arrays"] = []
    return [
        lines[0],
        json.dumps(entry, sort_keys=True, separators=(",", ":")),
        lines[2],
    ]


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        pytest.param(_edit_train_entry, "edited: entry_hash does not match", id="edit"),
        pytest.param(
            lambda lines: [lines[0], lines[2]],
            "out of sequence: recorded index 2, expected 1",
            id="delete",
        ),
        pytest.param(
            lambda lines: [lines[0], lines[2], lines[1]],
            "out of sequence: recorded index 2, expected 1",
            id="swap",
        ),
    ],
)
def test_audit_verify_names_the_first_tampered_entry(
    served: Served,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tamper: Callable[[list[str]], list[str]],
    problem: str,
) -> None:
    # Prepare: a tampered copy of the ledger the guard wrote
    lines = (served.state_dir / "ledger.jsonl").read_text().splitlines()
    path = tmp_path / "ledger.jsonl"
    path.write_text("\n".join(tamper(lines)) + "\n")

    # Execute
    status = cli.main(["audit", "verify", str(path)])

    # Assert
    assert status != 0
    assert f"entry at line 2 (index 1): {problem}" in capsys.readouterr().err


# --------------------------------------------------------------- DP under the guard


def test_dp_training_spends_epsilon_cumulatively(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    context = build_site_context(
        run_config,
        federation / SOURCE,
        tmp_path / "state",
        policy=write_policy(tmp_path, DP_POLICY),
    )
    accountant = tmp_path / "state" / ACCOUNTANT_FILE

    # Execute
    first = site_app(build_message(RecordDict(), protocol.TRAIN_SOURCE), context)
    history_after_first = read_accountant_state(accountant).history
    second = site_app(build_message(RecordDict(), protocol.TRAIN_SOURCE, "m2"), context)

    # Assert
    results = []
    for reply in (first, second):
        assert not reply.has_error(), reply.error.reason
        results.append(
            protocol.TrainReply.from_fields(reply.content[protocol.METRICS_KEY])
        )
    assert results[0].epsilon_spent > 0
    assert results[0].epsilon_total == pytest.approx(results[0].epsilon_spent)
    assert results[0].noise_multiplier == 2.0
    assert results[1].epsilon_total > results[0].epsilon_total
    assert len(history_after_first) == 1
    assert len(read_accountant_state(accountant).history) == 2
    entries = ledger_of(tmp_path / "state").entries()
    assert [(e.epsilon_spent, e.epsilon_total) for e in entries] == [
        (r.epsilon_spent, r.epsilon_total) for r in results
    ]
    assert all(entry.policy["policy.dp.required"] is True for entry in entries)


@pytest.mark.parametrize(
    ("history", "budget", "spent"),
    [((), 1.0, "0.000 is spent"), (((2.0, 1.0, 1),), 3.0, "2.166 is spent")],
    ids=["fresh-accountant", "earlier-training"],
)
def test_dp_training_over_budget_is_refused_before_training(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    history: tuple[tuple[float, float, int], ...],
    budget: float,
    spent: str,
) -> None:
    # Prepare
    accountant = tmp_path / "state" / ACCOUNTANT_FILE
    if history:
        write_accountant_state(AccountantState(history), accountant)
    before = accountant.read_bytes() if history else None
    policy = write_policy(tmp_path, {**DP_POLICY, "dp.budget-epsilon": budget})
    context = build_site_context(
        run_config, federation / SOURCE, tmp_path / "state", policy=policy
    )

    # Execute
    reply = site_app(build_message(RecordDict(), protocol.TRAIN_SOURCE), context)

    # Assert
    assert_site_error(
        reply,
        "PrivacyBudgetError",
        "refused before training",
        f"budget is epsilon {budget:g}",
        spent,
    )
    assert (accountant.read_bytes() if accountant.exists() else None) == before
    (entry,) = ledger_of(tmp_path / "state").entries()
    assert entry.decision == "error"
    assert entry.egress == released_reason(reply)
    assert (entry.epsilon_spent, entry.epsilon_total) == (0.0, 0.0)


# ------------------------------------------------------------------ policy problems


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[release\nlftm = ", "not valid TOML"),
        (None, "names no readable file"),
        ("[release]\ncolour = 'red'\n", "unknown key release.colour"),
        ("[actions]\nanswer = ['query.hello']\n", "release.lftm is missing"),
        (
            policy_text({"actions.answer": ["query.steal"]}),
            "actions.answer has unknown actions 'query.steal'",
        ),
    ],
    ids=["not-toml", "missing-file", "unknown-key", "missing-key", "unknown-action"],
)
def test_unusable_policy_refuses_everything_and_ledgers_the_refusal(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    text: str | None,
    fragment: str,
) -> None:
    # Prepare
    policy = tmp_path / "policy.toml"
    if text is not None:
        policy.write_text(text)
    calls: list[str] = []
    guarded = build_guarded_app({protocol.HELLO: build_handler(hello_content, calls)})
    context = build_site_context(
        run_config, federation / SOURCE, tmp_path / "state", policy=policy
    )

    # Execute
    replies = [
        app(build_message(RecordDict(), protocol.HELLO), context)
        for app in (guarded, site_app)
    ]

    # Assert
    for reply in replies:
        assert_site_error(reply, "PolicyError: <path>: ", fragment)
        assert str(tmp_path) not in reason_of(reply)
    assert calls == []
    entries = ledger_of(tmp_path / "state").entries()
    assert [(entry.decision, entry.policy) for entry in entries] == [("error", {})] * 2
    assert [entry.egress for entry in entries] == [
        released_reason(reply) for reply in replies
    ]
