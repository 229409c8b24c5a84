"""The egress guard: one Flower mod around every handler of the site's ClientApp.

For every message it resolves the site's applied policy (site policy and run config,
the stricter wins) and then:

1. refuses, before the handler runs, an action the policy does not answer, and an
   action whose reply is trained weights when the policy keeps weights home (no
   training is wasted on a reply that could never leave);
2. runs the handler; any exception the handler let through becomes an error reply,
   and an error reason longer than ``release.max-config-value-bytes`` is blocked
   (an error's text must not carry data either);
3. adds the applied policy to the reply's settings (``policy.*``), so the
   coordinator sees what bound;
4. measures the reply (``core.egress``) and checks it against the policy and the
   model manifest declared for the run (``core.policy.check_reply``): only the
   action's declared records and fields, model parameters of the declared names and
   shapes, and values within the size limits may leave;
5. appends one hash-chained entry to the site's ledger: what left (or would have),
   its digest, the decision, the policy and the epsilon spent;
6. replaces a blocked reply by an error reply naming the broken rules.

The node keeps serving after every refusal. Everything in here is the site's: the
coordinator cannot switch the guard off, and a new action gets it by being
registered on the same ``ClientApp``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from clients.site import SiteSetup, resolve_setup
from core import protocol
from core.config import DataConfig, ModelConfig
from core.data import SiteDataError, index_site
from core.dual_task import build_dual_task_model
from core.egress import ERROR_FIELD, measure_content, measure_error
from core.ledger import BLOCKED_PREFIX, EGRESS, RELEASED, Egress
from core.models import Manifest, build_model, get_manifest
from core.policy import (
    PolicyError,
    Rule,
    Violation,
    check_reply,
    describe_violations,
)
from core.registration import index_atlases

LOGGER = logging.getLogger("sitebridge.guard")


@functools.lru_cache(maxsize=8)
def declared_manifest(model: ModelConfig, data: DataConfig) -> Manifest:
    """Parameter names and shapes of the model architecture declared for the run."""
    return get_manifest(build_model(model, data=data))


@functools.lru_cache(maxsize=8)
def declared_student_manifest(
    model: ModelConfig, data: DataConfig, *, shared_head: bool
) -> Manifest:
    """Parameter names and shapes of the run's dual-task student (``train.semisup``)."""
    return get_manifest(build_dual_task_model(model, data, shared_head=shared_head))


def _reply_manifest(setup: SiteSetup, message_type: str) -> Manifest:
    """The architecture a reply's arrays must match: the student for semisup."""
    config = setup.config
    if message_type == protocol.SEMISUP:
        return declared_student_manifest(
            config.model, config.data, shared_head=config.semisup.shared_head
        )
    return declared_manifest(config.model, config.data)


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


def _epsilon(reply: Message) -> tuple[float, float]:
    """(spent, cumulative) epsilon a training reply reports; zeros otherwise."""
    metrics = reply.content.metric_records.get(protocol.METRICS_KEY, MetricRecord())
    spent = metrics.get("dp.epsilon-spent", 0.0)
    total = metrics.get("dp.epsilon-total", 0.0)
    return float(spent), float(total)  # type: ignore[arg-type]


def _record(
    setup: SiteSetup,
    message: Message,
    *,
    egress: Egress | None,
    violations: list[Violation],
    epsilon: tuple[float, float] = (0.0, 0.0),
) -> None:
    decision = (
        BLOCKED_PREFIX + ", ".join(dict.fromkeys(v.rule.value for v in violations))
        if violations
        else RELEASED
    )
    setup.ledger.append(
        run_id=str(message.metadata.run_id),
        message_type=message.metadata.message_type,
        sender=setup.site.name,
        direction=EGRESS,
        egress=egress,
        decision=decision,
        policy=setup.policy.to_fields(),
        epsilon_spent=epsilon[0],
        epsilon_total=epsilon[1],
    )


def _max_metric_values(setup: SiteSetup, message_type: str) -> int:
    """The longest metric list that may leave.

    One value per training case (ITM); for a task profile, the lengths the run's
    ``affinity`` settings declare (``K`` quantiles, the ``G^3`` mean foreground map,
    ``K_f`` foreground quantiles), which the site computed itself.
    """
    try:
        index = index_site(setup.site.directory)
        cases = len(index.labelled) + len(index.unlabelled)
    except SiteDataError:
        cases = 1
    if message_type == protocol.PROFILE:
        affinity = setup.config.affinity
        return max(
            1,
            cases,
            affinity.quantiles,
            affinity.label_grid**3,
            affinity.foreground_quantiles,
        )
    return max(1, cases)


def _requested_names(message: Message) -> set[str]:
    """Names the request itself introduced: its models and predictors."""
    content = message.content
    names = {
        name
        for key in content.array_records
        if (name := protocol.model_name(key)) is not None
    }
    request = content.config_records.get(protocol.REQUEST_KEY, ConfigRecord())
    if "predictors" in request:
        # A malformed table has already failed the handler; then no name is requested.
        with contextlib.suppress(ValueError):
            names |= set(protocol.EvaluateRequest.from_fields(request).predictors)
    return names


def _site_names(message: Message, setup: SiteSetup) -> set[str]:
    """Names a consensus reply may use beyond the request's: methods and atlases.

    The methods are fixed by the protocol; atlases are numbered ``atlas-1`` up to the
    number the site holds, so a name says nothing but a position.
    """
    if message.metadata.message_type != protocol.CONSENSUS:
        return set()
    try:
        atlases = len(index_atlases(setup.site.directory))
    except SiteDataError:
        atlases = 0
    return set(protocol.CONSENSUS_METHODS) | {
        f"{protocol.ATLAS_SOURCE_PREFIX}{k}" for k in range(1, atlases + 1)
    }


def _unrequested_names(
    message: Message, reply: Message, setup: SiteSetup
) -> list[Violation]:
    """Wildcard fields (``dice.*``, ``itm.*``...) whose name the request never used.

    The schema lets ``dice.<predictor>`` through for any name; without this check the
    name itself could carry data (a case id, a patient name) out of the site.
    """
    schema = protocol.REPLY_SCHEMAS.get(message.metadata.message_type)
    if schema is None:
        return []
    requested = _requested_names(message) | _site_names(message, setup)
    violations = []
    for record_key, patterns, fields in (
        (
            protocol.METRICS_KEY,
            schema.metrics,
            reply.content.metric_records.get(protocol.METRICS_KEY, MetricRecord()),
        ),
        (
            protocol.REPLY_KEY,
            schema.settings,
            reply.content.config_records.get(protocol.REPLY_KEY, ConfigRecord()),
        ),
    ):
        prefixes = [pattern[:-1] for pattern in patterns if pattern.endswith(".*")]
        for key in sorted(fields):
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is not None and key[len(prefix) :] not in requested:
                violations.append(
                    Violation(
                        Rule.UNDECLARED_FIELD,
                        f"{record_key}/{key} names {key[len(prefix) :]!r}, which is"
                        " not a model or predictor of the request",
                    )
                )
    return violations


def _with_applied_policy(reply: Message, fields: Mapping[str, object]) -> None:
    settings = reply.content.config_records.get(protocol.REPLY_KEY)
    if settings is None:
        reply.content[protocol.REPLY_KEY] = ConfigRecord(dict(fields))  # type: ignore[arg-type]
    else:
        settings.update(fields)  # type: ignore[arg-type]


def _handler_policy_fields(reply: Message) -> list[Violation]:
    """``policy.*`` settings the handler wrote itself: only the guard writes those.

    The reply schemas let every ``policy.*`` setting through (the applied policy), so
    without this check a handler could carry any data out under such a name.
    """
    settings = reply.content.config_records.get(protocol.REPLY_KEY, ConfigRecord())
    return [
        Violation(
            Rule.UNDECLARED_FIELD,
            f"{protocol.REPLY_KEY}/{key} was set by the handler; "
            f"{protocol.APPLIED_POLICY_PREFIX}* settings are the guard's alone",
        )
        for key in sorted(settings)
        if key.startswith(protocol.APPLIED_POLICY_PREFIX)
    ]


def _check_error(setup: SiteSetup, egress: Egress) -> list[Violation]:
    """An error reason is released text: it gets the config-value size limit."""
    limit = setup.policy.max_config_value_bytes
    if egress.total_bytes <= limit:
        return []
    return [
        Violation(
            Rule.OVERSIZED_CONFIG_VALUE,
            f"{ERROR_FIELD} is {egress.total_bytes} bytes, "
            f"release.max-config-value-bytes allows {limit}",
        )
    ]


def _refuse_before_running(setup: SiteSetup, message_type: str) -> Violation | None:
    """The rule a message breaks before any work, or None when it may run."""
    if message_type not in setup.policy.answers:
        return Violation(
            Rule.ACTION_NOT_ANSWERED,
            f"{message_type!r} is not in actions.answer of {setup.policy_source}",
        )
    schema = protocol.REPLY_SCHEMAS.get(message_type)
    returns_weights = schema is not None and (schema.weights or bool(schema.models))
    if returns_weights and not setup.policy.weights_may_leave:
        return Violation(
            Rule.WEIGHTS_MAY_NOT_LEAVE,
            f"a {message_type!r} reply is trained weights, but release."
            f"weights-may-leave is false in {setup.policy_source}; nothing was run",
        )
    return None


def egress_guard(
    message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Flower mod: check, record and (if needed) block every reply of the site."""
    message_type = message.metadata.message_type
    try:
        setup = resolve_setup(context)
    except (SiteDataError, PolicyError, ValueError, OSError) as error:
        # Without a site or a readable policy nothing may be answered (there is no
        # policy to check against); the reply says why, and no data is read.
        reason = f"{type(error).__name__}: {error}"
        LOGGER.error("%s refused: %s", message_type, reason)
        return _error_reply(message, protocol.SITE_ERROR_CODE, reason)

    refusal = _refuse_before_running(setup, message_type)
    if refusal is not None:
        _record(setup, message, egress=None, violations=[refusal])
        return _error_reply(
            message, protocol.EGRESS_BLOCKED_CODE, describe_violations([refusal])
        )

    try:
        reply = call_next(message, context)
    except Exception as error:  # the guard must answer for any failure
        LOGGER.exception("%s handler raised", message_type)
        reply = _error_reply(
            message, protocol.SITE_ERROR_CODE, f"{type(error).__name__}: {error}"
        )
    if reply.has_error():
        error_egress = measure_error(reply.error.reason or "")
        violations = _check_error(setup, error_egress)
        _record(setup, message, egress=error_egress, violations=violations)
        if violations:
            reason = describe_violations(violations)
            LOGGER.error("%s error reply blocked: %s", message_type, reason)
            return _error_reply(message, protocol.EGRESS_BLOCKED_CODE, reason)
        return reply

    forged = _handler_policy_fields(reply) + _unrequested_names(message, reply, setup)
    _with_applied_policy(reply, setup.policy.to_fields())
    measured = measure_content(reply.content, message_type=message_type)
    violations = forged + check_reply(
        measured.description,
        policy=setup.policy,
        manifest=_reply_manifest(setup, message_type),
        max_metric_values=_max_metric_values(setup, message_type),
    )
    epsilon = _epsilon(reply)
    _record(
        setup, message, egress=measured.egress, violations=violations, epsilon=epsilon
    )
    if violations:
        reason = describe_violations(violations)
        LOGGER.error("%s reply blocked: %s", message_type, reason)
        print(f"[site {setup.site.name}] {message_type}: {reason}", flush=True)
        return _error_reply(message, protocol.EGRESS_BLOCKED_CODE, reason)
    return reply
