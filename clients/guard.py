"""The egress guard: one Flower mod around every handler of the site's ClientApp.

For every message it resolves the site's applied policy (site policy and run config,
the stricter wins) and then:

1. refuses, before the handler runs, an action the policy does not answer, an action
   whose reply is trained weights when the policy keeps weights home, an action with
   no DP form at a site that requires DP, and a request beyond the site's query
   limits (``core.privacy.limits``: sizes, models, predictors and label sources per
   request, the fewest cases behind a release); then charges the request's query units
   to the site's query book (per run and cumulative), refusing it when they don't fit.
   No work is wasted on a reply that could never leave;
2. runs the handler; any exception the handler let through becomes an error reply;
   an error's reason is redacted (cases by index, no file name, no absolute path;
   the site's log keeps the original) and blocked when longer than
   ``release.max-config-value-bytes`` (an error's text must not carry data either);
3. rounds the reply's data-derived metrics to ``limits.metric-decimals`` and adds
   the applied policy to its settings (``policy.*``), so the coordinator sees what
   bound;
4. measures the reply (``core.privacy.egress``) and checks it against the policy and the
   model manifest declared for the run (``core.privacy.policy.check_reply``): only the
   action's declared records and fields, model parameters of the declared names and
   shapes, and values within the size limits may leave;
5. appends one hash-chained entry to the site's ledger for every reply, refusals and
   errors included: what left, its digest, the decision (``released``, ``error`` or
   ``blocked: <rules>``), the policy and the epsilon spent;
6. replaces a blocked reply by an error reply naming the broken rules, and anchors
   every reply in the ledger: the reply carries its entry's index and hash
   (``ledger.*`` settings, or the end of an error's reason), which the coordinator
   records, so a rewritten or truncated site ledger is caught
   (``core.privacy.ledger_match``).

The node keeps serving after every refusal. Everything in here is the site's: in a
deployment the site runs the SiteBridge it installed (see ``docs/deployment.md``), so
the coordinator cannot switch the guard off, and a new action gets it by being
registered on the same ``ClientApp``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from clients.site import (
    SITE_DIR_KEY,
    SiteSetup,
    locate_state_leniently,
    resolve_setup,
)
from core import protocol
from core.config import DataConfig, ModelConfig
from core.consensus.registration import index_atlases
from core.data.dataset import SiteDataError, index_site
from core.data.site import redact_site_text
from core.logs import get_logger
from core.privacy.egress import ERROR_FIELD, measure_content, measure_error
from core.privacy.ledger import BLOCKED_PREFIX, EGRESS, ERROR, RELEASED, Egress, Ledger
from core.privacy.limits import (
    CANDIDATES,
    FINGERPRINTS,
    LABEL_SOURCES,
    PREDICTORS,
    PROFILES,
    CaseCounts,
    LimitError,
    charge_queries,
    check_cases,
    check_request,
    check_run_sizes,
    round_metric_fields,
)
from core.privacy.policy import (
    PolicyError,
    Rule,
    Violation,
    check_reply,
    describe_violations,
)
from core.semisup.dual_task import build_dual_task_model
from core.training.networks import Manifest, build_model, get_manifest

# The guard's lines go to sitebridge.site.<name>.guard; this one only before the
# site is known.
LOGGER = get_logger("guard")
LEDGER_FILE = "ledger.jsonl"
# Actions that train on a site's labelled data or release statistics of it but have no
# DP form here; a site that requires DP refuses them before any work.
NO_DP_FORM: dict[str, str] = {
    protocol.CONSENSUS: (
        "DeepSTAPLE fits a data parameter per noisy label of this site's images and "
        "trains models on consensus labels, for which no DP-SGD form is implemented"
    ),
}


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
    spent = metrics.get(protocol.DP_EPSILON_SPENT, 0.0)
    total = metrics.get(protocol.DP_EPSILON_TOTAL, 0.0)
    return float(spent), float(total)  # type: ignore[arg-type]


def _decision(violations: list[Violation], *, error: bool) -> str:
    if violations:
        return BLOCKED_PREFIX + ", ".join(
            dict.fromkeys(violation.rule.value for violation in violations)
        )
    return ERROR if error else RELEASED


def _record(
    setup: SiteSetup,
    message: Message,
    *,
    egress: Egress | None,
    decision: str,
    epsilon: tuple[float, float] = (0.0, 0.0),
) -> protocol.LedgerAnchor:
    """Append the reply's ledger entry; return its anchor (index and hash)."""
    entry = setup.ledger.append(
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
    setup.site.logger("guard").debug(
        "%s %s: %d bytes, ledger entry %d",
        message.metadata.message_type,
        decision,
        0 if egress is None else egress.total_bytes,
        entry.index,
    )
    return protocol.LedgerAnchor(entry.index, entry.entry_hash)


def _redact(setup: SiteSetup, reason: str) -> str:
    return redact_site_text(
        reason, site_dir=setup.site.directory, state_dir=setup.state_dir
    )


def _error_reply_recorded(
    setup: SiteSetup,
    message: Message,
    *,
    code: int,
    reason: str,
    violations: list[Violation],
) -> Message:
    """An error reply whose (redacted) reason is ledgered and anchored."""
    reason = _redact(setup, reason)
    anchor = _record(
        setup,
        message,
        egress=measure_error(reason),
        decision=_decision(violations, error=True),
    )
    return _error_reply(message, code, anchor.anchor_reason(reason))


def _max_metric_values(setup: SiteSetup, message_type: str) -> int:
    """The longest metric list that may leave.

    One value per training case (ITM); for a task profile, the lengths the run's
    ``affinity`` settings declare (``K`` quantiles, the ``G^3`` mean foreground map,
    ``K_f`` foreground quantiles, ``K_p`` polarity quantiles), which the site computed
    itself.
    """
    try:
        index = index_site(setup.site.directory)
        cases = len(index.labelled) + len(index.unlabelled)
    except SiteDataError:
        cases = 1
    if message_type == protocol.FINGERPRINT:
        return max(1, cases, 5)  # the five CT intensity statistics
    if message_type == protocol.PROFILE:
        affinity = setup.config.affinity
        return max(
            1,
            cases,
            affinity.quantiles,
            affinity.label_grid**3,
            affinity.foreground_quantiles,
            affinity.polarity_quantiles,
        )
    return max(1, cases)


def _requested_models(message: Message) -> set[str]:
    """The names of the models the request sent."""
    return {
        name
        for key in message.content.array_records
        if (name := protocol.model_name(key)) is not None
    }


def _requested_names(message: Message) -> set[str]:
    """Names the request itself introduced: its models and predictors."""
    content = message.content
    names = _requested_models(message)
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
    """``policy.*``/``ledger.*`` settings the handler wrote: only the guard does.

    The reply schemas let every ``policy.*`` setting (the applied policy) and every
    ``ledger.*`` setting (the anchor) through, so without this check a handler could
    carry any data out under such a name.
    """
    settings = reply.content.config_records.get(protocol.REPLY_KEY, ConfigRecord())
    return [
        Violation(
            Rule.UNDECLARED_FIELD,
            f"{protocol.REPLY_KEY}/{key} was set by the handler; "
            f"{key.split('.')[0]}.* settings are the guard's alone",
        )
        for key in sorted(settings)
        if key.startswith(
            (protocol.APPLIED_POLICY_PREFIX, protocol.LEDGER_ANCHOR_PREFIX)
        )
    ]


# The record each action's reply metrics must fit, field by field (malformed-field).
_METRIC_RECORDS: dict[str, type] = {
    protocol.TRAIN_SOURCE: protocol.TrainReply,
    protocol.FINETUNE: protocol.TrainReply,
    protocol.ADAPT: protocol.AdaptReply,
    protocol.CONSENSUS: protocol.ConsensusReply,
    protocol.SEMISUP: protocol.SemisupReply,
    protocol.PROFILE: protocol.ProfileReply,
    protocol.EVALUATE: protocol.EvaluateReply,
}


def _malformed_fields(message: Message, reply: Message) -> list[Violation]:
    """Declared metric fields whose value does not fit the field's type.

    The schema says which names may leave; this says what each may hold: a scalar
    field one number of its type (an integer field an integer, the post-processing
    decision 0 or 1), so a list or an odd value cannot ride under a declared name.
    """
    record = _METRIC_RECORDS.get(message.metadata.message_type)
    if record is None:
        return []
    metrics = reply.content.metric_records.get(protocol.METRICS_KEY, MetricRecord())
    return [
        Violation(Rule.MALFORMED_FIELD, f"{protocol.METRICS_KEY}: {problem}")
        for problem in protocol.field_problems(record, dict(metrics))
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


def _refuse_before_running(setup: SiteSetup, message: Message) -> list[Violation]:
    """The rules a message breaks before any work; empty when it may run."""
    message_type = message.metadata.message_type
    policy = setup.policy
    if message_type not in policy.answers:
        return [
            Violation(
                Rule.ACTION_NOT_ANSWERED,
                f"{message_type!r} is not in actions.answer of {setup.policy_name}",
            )
        ]
    schema = protocol.REPLY_SCHEMAS.get(message_type)
    returns_weights = schema is not None and (schema.weights or bool(schema.models))
    if returns_weights and not policy.weights_may_leave:
        return [
            Violation(
                Rule.WEIGHTS_MAY_NOT_LEAVE,
                f"a {message_type!r} reply is trained weights, but release."
                f"weights-may-leave is false in {setup.policy_name}; nothing was run",
            )
        ]
    if policy.dp_required and message_type in NO_DP_FORM:
        return [
            Violation(
                Rule.NO_DP_FORM,
                f"this site requires DP (dp.required in {setup.policy_name}), and "
                f"{message_type!r} has no DP form: {NO_DP_FORM[message_type]}; "
                "nothing was run",
            )
        ]
    breaches = check_run_sizes(setup.config, policy.limits, message_type)
    breaches += _request_breaches(setup, message)
    counts = _case_counts(setup)
    if counts is not None:
        breaches += check_cases(policy.limits, message_type, counts)
    return [Violation(Rule.LIMIT_EXCEEDED, breach) for breach in breaches]


def _request_breaches(setup: SiteSetup, message: Message) -> list[str]:
    """Per-request limits: models carried, predictors, label sources, iterations.

    A request too malformed to count is left to its handler, which refuses it.
    """
    content, message_type = message.content, message.metadata.message_type
    models = sum(protocol.model_name(key) is not None for key in content.array_records)
    request = content.config_records.get(protocol.REQUEST_KEY, ConfigRecord())
    predictors = label_sources = iterations = None
    with contextlib.suppress(ValueError):
        if message_type == protocol.EVALUATE:
            predictors = protocol.EvaluateRequest.from_fields(request).predictors
        elif message_type == protocol.CONSENSUS:
            label_sources = len(
                protocol.ConsensusRequest.from_fields(request).label_sources
            )
        elif message_type == protocol.SEMISUP:
            iterations = protocol.SemisupRequest.from_fields(request).iterations
    return check_request(
        setup.policy.limits,
        models=models,
        predictors=predictors,
        label_sources=label_sources,
        iterations=iterations,
    )


def _case_counts(setup: SiteSetup) -> CaseCounts | None:
    """The site's case counts; None when its data can't be indexed.

    The handler then fails with the reason.
    """
    try:
        index = index_site(setup.site.directory)
    except SiteDataError:
        return None
    return CaseCounts(
        labelled=len(index.labelled),
        unlabelled=len(index.unlabelled),
        evaluation=len(index.evaluation),
    )


def _query_units(message: Message) -> dict[str, int]:
    """What a request counts against the site's query book."""
    content, message_type = message.content, message.metadata.message_type
    request = content.config_records.get(protocol.REQUEST_KEY, ConfigRecord())
    with contextlib.suppress(ValueError):
        if message_type == protocol.EVALUATE:
            # A post-processed predictor's raw figures are one more release.
            evaluate = protocol.EvaluateRequest.from_fields(request)
            return {PREDICTORS: len(evaluate.predictors) + len(evaluate.postprocess)}
        if message_type == protocol.CONSENSUS:
            sources = protocol.ConsensusRequest.from_fields(request).label_sources
            return {LABEL_SOURCES: len(sources)}
    if message_type == protocol.LFTM:
        return {
            CANDIDATES: sum(
                protocol.model_name(key) is not None for key in content.array_records
            )
        }
    if message_type == protocol.PROFILE:
        return {PROFILES: 1}
    if message_type == protocol.FINGERPRINT:
        return {FINGERPRINTS: 1}
    return {}


def _charge(setup: SiteSetup, message: Message) -> Violation | None:
    """Charge the request's query units; the violation when they don't fit."""
    units = _query_units(message)
    if not units:
        return None
    try:
        charge_queries(
            setup.query_book_path,
            run_id=str(message.metadata.run_id),
            units=units,
            limits=setup.policy.limits,
        )
    except LimitError as error:
        return Violation(Rule.LIMIT_EXCEEDED, str(error))
    return None


def _round_metrics(setup: SiteSetup, reply: Message) -> None:
    metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
    if metrics is None:
        return
    rounded = round_metric_fields(dict(metrics), setup.policy.limits.metric_decimals)
    for key, value in rounded.items():
        metrics[key] = value


def _refuse_unresolved(message: Message, context: Context, error: Exception) -> Message:
    """The reply to a message whose site setup failed, ledgered where possible.

    Without a readable policy nothing may be answered; the reply says why (redacted),
    and when the site and its state folder can be found all the same the reply is
    ledgered like every other.
    """
    message_type = message.metadata.message_type
    reason = f"{type(error).__name__}: {error}"
    located = locate_state_leniently(context)
    logger = LOGGER if located is None else located[0].logger("guard")
    logger.error("%s refused: %s", message_type, reason)
    if located is None:
        # No site, so no ledger to write to; the text still leaves no path.
        named = context.node_config.get(SITE_DIR_KEY)
        site_dir = None if named is None else Path(str(named)).expanduser()
        return _error_reply(
            message,
            protocol.SITE_ERROR_CODE,
            redact_site_text(reason, site_dir=site_dir),
        )
    site, state_dir = located
    reason = redact_site_text(reason, site_dir=site.directory, state_dir=state_dir)
    entry = Ledger(state_dir / LEDGER_FILE).append(
        run_id=str(message.metadata.run_id),
        message_type=message_type,
        sender=site.name,
        direction=EGRESS,
        egress=measure_error(reason),
        decision=ERROR,
        policy={},
        epsilon_spent=0.0,
        epsilon_total=0.0,
    )
    anchor = protocol.LedgerAnchor(entry.index, entry.entry_hash)
    return _error_reply(message, protocol.SITE_ERROR_CODE, anchor.anchor_reason(reason))


def egress_guard(
    message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Flower mod: check, record and (if needed) block every reply of the site."""
    message_type = message.metadata.message_type
    try:
        setup = resolve_setup(context, message)
    except (SiteDataError, PolicyError, ValueError, OSError) as error:
        return _refuse_unresolved(message, context, error)

    refusals = _refuse_before_running(setup, message)
    if not refusals:
        charge = _charge(setup, message)
        refusals = [] if charge is None else [charge]
    if refusals:
        reason = describe_violations(refusals)
        setup.site.logger("guard").error("%s refused: %s", message_type, reason)
        return _error_reply_recorded(
            setup,
            message,
            code=protocol.EGRESS_BLOCKED_CODE,
            reason=reason,
            violations=refusals,
        )

    try:
        reply = call_next(message, context)
    except Exception as error:  # the guard must answer for any failure
        setup.site.logger("guard").exception("%s handler raised", message_type)
        reply = _error_reply(
            message, protocol.SITE_ERROR_CODE, f"{type(error).__name__}: {error}"
        )
    if reply.has_error():
        reason = _redact(setup, reply.error.reason or "")
        attempted = measure_error(reason)
        violations = _check_error(setup, attempted)
        if violations:
            blocked = describe_violations(violations)
            setup.site.logger("guard").error(
                "%s error reply blocked: %s", message_type, blocked
            )
            # The entry records the text that was stopped, as for any blocked reply.
            anchor = _record(
                setup,
                message,
                egress=attempted,
                decision=_decision(violations, error=True),
            )
            return _error_reply(
                message, protocol.EGRESS_BLOCKED_CODE, anchor.anchor_reason(blocked)
            )
        return _error_reply_recorded(
            setup, message, code=reply.error.code, reason=reason, violations=[]
        )

    forged = _handler_policy_fields(reply) + _unrequested_names(message, reply, setup)
    _round_metrics(setup, reply)
    forged += _malformed_fields(message, reply)
    _with_applied_policy(reply, setup.policy.to_fields())
    measured = measure_content(reply.content, message_type=message_type)
    violations = forged + check_reply(
        measured.description,
        policy=setup.policy,
        manifest=_reply_manifest(setup, message_type),
        max_metric_values=_max_metric_values(setup, message_type),
        num_candidates=len(_requested_models(message)),
    )
    if violations:
        reason = describe_violations(violations)
        setup.site.logger("guard").error("%s reply blocked: %s", message_type, reason)
        # What left is the refusal's reason, not the blocked content; the entry
        # records what would have left, so an auditor sees what was stopped.
        anchor = _record(
            setup,
            message,
            egress=measured.egress,
            decision=_decision(violations, error=True),
            epsilon=_epsilon(reply),
        )
        return _error_reply(
            message,
            protocol.EGRESS_BLOCKED_CODE,
            anchor.anchor_reason(_redact(setup, reason)),
        )
    anchor = _record(
        setup,
        message,
        egress=measured.egress,
        decision=RELEASED,
        epsilon=_epsilon(reply),
    )
    _with_applied_policy(reply, anchor.to_fields())
    return reply
