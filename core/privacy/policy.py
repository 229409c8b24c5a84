"""Site policy: what a site answers and releases, and the pure checks of every reply.

Owns the site's ``policy.toml`` model (:class:`SitePolicy`, :func:`read_policy`, the
safe :func:`default_policy` that ``deploy/policy.template.toml`` documents), the
stricter-wins merge with the run config (:func:`resolve_policy` ->
:class:`AppliedPolicy`) and the egress rules applied to a description of a reply
(:func:`check_reply`). The Flower mod that builds that description and blocks replies
lives in ``clients/guard.py``. The ``[limits]`` table's model and checks are
:mod:`core.privacy.limits`. Pure: stdlib (``tomllib``), ``core.protocol`` and
``core.privacy.limits`` only; never imports flwr, torch or numpy.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Final, TypeVar

from core.coerce import as_bool, as_float, as_int
from core.privacy.limits import (
    SiteLimits,
    default_limits,
    parse_limits,
    to_limit_fields,
)
from core.protocol import (
    ADAPT,
    AGREEMENT_PREFIX,
    APPLIED_POLICY_PREFIX,
    CONSENSUS,
    EVALUATE,
    FINETUNE,
    FINGERPRINT,
    HELLO,
    LFTM,
    METRICS_KEY,
    MODEL_KEY_PREFIX,
    PROFILE,
    REPLY_KEY,
    REPLY_SCHEMAS,
    SEMISUP,
    TRAIN_SOURCE,
    WEIGHTS_KEY,
    ReplySchema,
    model_name,
)

POLICY_FILE: Final = "policy.toml"
# Every action a site can be asked for; a new action in core.protocol must be added
# here (and to deploy/policy.template.toml) before a policy can name it.
ACTIONS: Final[tuple[str, ...]] = (
    HELLO,
    FINGERPRINT,
    TRAIN_SOURCE,
    LFTM,
    ADAPT,
    CONSENSUS,
    SEMISUP,
    PROFILE,
    FINETUNE,
    EVALUATE,
)
BYTES_PER_MB: Final = 1_000_000  # "MB" in max-reply-mb is decimal (SI)
# float64/int64: no model parameter needs more, so a larger element smuggles data.
MAX_BYTES_PER_ELEMENT: Final = 8
APPLIED_PREFIX: Final = APPLIED_POLICY_PREFIX  # key prefix of AppliedPolicy.to_fields()


class PolicyError(ValueError):
    """A policy file that cannot be parsed or holds an invalid value.

    The message is ``"<file>: <problem naming the TOML key>"``.
    """

    def __init__(self, detail: str, *, source: str = POLICY_FILE) -> None:
        super().__init__(f"{source}: {detail}")
        self.detail = detail
        self.source = source


class LftmRelease(StrEnum):
    """What of the target's LFTM may leave: ITM rows, or only per-source means (DTM)."""

    INSTANCE = "instance"
    DOMAIN = "domain"


class Rule(StrEnum):
    """Stable ids of the egress rules; a :class:`Violation` names one."""

    ACTION_NOT_ANSWERED = "action-not-answered"
    UNKNOWN_RECORD = "unknown-record"
    UNDECLARED_FIELD = "undeclared-field"
    WEIGHTS_MAY_NOT_LEAVE = "weights-may-not-leave"
    ARRAY_NOT_IN_MANIFEST = "array-not-in-manifest"
    ARRAY_SHAPE_MISMATCH = "array-shape-mismatch"
    ARRAY_SIZE_MISMATCH = "array-size-mismatch"
    OVERSIZED_REPLY = "oversized-reply"
    OVERSIZED_CONFIG_VALUE = "oversized-config-value"
    INSTANCE_LFTM_NOT_ALLOWED = "instance-lftm-not-allowed"
    TOO_MANY_METRIC_VALUES = "too-many-metric-values"
    MALFORMED_FIELD = "malformed-field"
    LIMIT_EXCEEDED = "limit-exceeded"
    NO_DP_FORM = "no-dp-form"
    BUNDLE_NOT_APPROVED = "bundle-not-approved"


def _require(condition: bool, key: str, rule: str, value: object) -> None:
    if not condition:
        raise PolicyError(f"{key} must be {rule}, got {value!r}")


def _positive(value: float | None) -> bool:
    return value is None or (math.isfinite(value) and value > 0)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SitePolicy:
    """A site's own policy, as its ``policy.toml`` states it (owned by the site).

    ``noise_multiplier``/``target_epsilon`` bind whenever DP-SGD runs here (because
    this policy or the run requires it); ε is sample-level, at ``delta``, cumulative
    over every run and phase that trained on this site's labelled data, and
    ``epsilon_budget`` caps that total. The site's own accountant computes it.
    ``limits`` are the ``[limits]`` table (:mod:`core.privacy.limits`) and
    ``semisup_labelled_fraction`` the share of the site's labelled cases that
    semi-supervised training may treat as labelled (the site's choice, not the run's).
    """

    answers: frozenset[str]
    lftm_release: LftmRelease
    weights_may_leave: bool
    dp_required: bool
    noise_multiplier: float | None
    target_epsilon: float | None
    delta: float
    epsilon_budget: float
    max_reply_mb: float
    max_config_value_bytes: int
    limits: SiteLimits
    semisup_labelled_fraction: float

    def __post_init__(self) -> None:
        _require(
            0.0 < self.semisup_labelled_fraction <= 1.0,
            "semisup.labelled-fraction",
            "in (0, 1]",
            self.semisup_labelled_fraction,
        )
        unknown = sorted(self.answers - set(ACTIONS))
        if unknown:
            raise PolicyError(
                f"actions.answer has unknown actions {', '.join(map(repr, unknown))};"
                f" valid actions: {', '.join(sorted(ACTIONS))}"
            )
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise PolicyError(
                "dp.noise-multiplier and dp.target-epsilon are exclusive; set one"
            )
        if self.dp_required and self.noise_multiplier is self.target_epsilon is None:
            raise PolicyError(
                "dp.required is true: set dp.noise-multiplier or dp.target-epsilon"
            )
        _require(
            _positive(self.noise_multiplier),
            "dp.noise-multiplier",
            "> 0",
            self.noise_multiplier,
        )
        _require(
            _positive(self.target_epsilon),
            "dp.target-epsilon",
            "> 0",
            self.target_epsilon,
        )
        _require(0.0 < self.delta < 1.0, "dp.delta", "in (0, 1)", self.delta)
        _require(
            _positive(self.epsilon_budget),
            "dp.budget-epsilon",
            "> 0",
            self.epsilon_budget,
        )
        _require(
            self.target_epsilon is None or self.target_epsilon <= self.epsilon_budget,
            "dp.target-epsilon",
            f"<= dp.budget-epsilon ({self.epsilon_budget!r})",
            self.target_epsilon,
        )
        _require(
            _positive(self.max_reply_mb),
            "release.max-reply-mb",
            "> 0",
            self.max_reply_mb,
        )
        _require(
            self.max_config_value_bytes >= 1,
            "release.max-config-value-bytes",
            ">= 1",
            self.max_config_value_bytes,
        )


def default_policy() -> SitePolicy:
    """The safe defaults that ``deploy/policy.template.toml`` documents.

    Example:
        >>> policy = default_policy()
        >>> policy.lftm_release.value, policy.dp_required, policy.max_reply_mb
        ('domain', False, 64.0)
    """
    return SitePolicy(
        answers=frozenset(ACTIONS),
        lftm_release=LftmRelease.DOMAIN,
        weights_may_leave=True,
        dp_required=False,
        noise_multiplier=1.0,
        target_epsilon=None,
        delta=1e-5,
        epsilon_budget=10.0,
        max_reply_mb=64.0,
        max_config_value_bytes=4096,
        limits=default_limits(),
        semisup_labelled_fraction=1.0,
    )


# TOML table -> its keys. Every key of the first three tables is required except the
# two exclusive ways of setting DP noise. The [limits] and [semisup] tables came later:
# they and their keys are optional (a policy written before them keeps working with the
# safe defaults), but an unknown key in them is an error all the same.
_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "actions": ("answer",),
    "release": ("lftm", "weights-may-leave", "max-reply-mb", "max-config-value-bytes"),
    "dp": ("required", "noise-multiplier", "target-epsilon", "delta", "budget-epsilon"),
    "limits": tuple(key[len("limits.") :] for key in to_limit_fields(default_limits())),
    "semisup": ("labelled-fraction",),
}
_OPTIONAL_TABLES: Final = frozenset({"limits", "semisup"})
_OPTIONAL: Final = frozenset({"dp.noise-multiplier", "dp.target-epsilon"})


def _flatten(document: Mapping[str, object]) -> dict[str, object]:
    """Dotted key -> raw value, rejecting unknown tables and keys by name."""
    flat: dict[str, object] = {}
    for table_name, table in document.items():
        if table_name not in _KEYS:
            valid = ", ".join(f"[{name}]" for name in _KEYS)
            what = f"table [{table_name}]" if isinstance(table, dict) else table_name
            raise PolicyError(f"unknown {what}; valid tables: {valid}")
        if not isinstance(table, dict):
            raise PolicyError(f"{table_name} must be a table, got {table!r}")
        for name, value in table.items():
            if name not in _KEYS[table_name]:
                valid = ", ".join(_KEYS[table_name])
                raise PolicyError(
                    f"unknown key {table_name}.{name}; valid keys in [{table_name}]: "
                    f"{valid}"
                )
            flat[f"{table_name}.{name}"] = value
    for table_name, names in _KEYS.items():
        if table_name in _OPTIONAL_TABLES:
            continue
        for name in names:
            key = f"{table_name}.{name}"
            if key not in flat and key not in _OPTIONAL:
                raise PolicyError(f"{key} is missing")
    return flat


def _actions(key: str, raw: object) -> frozenset[str]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise PolicyError(f"{key} must be a list of action names, got {raw!r}")
    return frozenset(raw)


def _release(key: str, raw: object) -> LftmRelease:
    if not isinstance(raw, str) or raw not in {m.value for m in LftmRelease}:
        allowed = ", ".join(repr(member.value) for member in LftmRelease)
        raise PolicyError(f"{key} must be one of {allowed}, got {raw!r}")
    return LftmRelease(raw)


_Value = TypeVar("_Value")
_Policy = TypeVar("_Policy", "SitePolicy", "AppliedPolicy")


def _limits(flat: Mapping[str, object]) -> SiteLimits:
    table = {
        key[len("limits.") :]: value
        for key, value in flat.items()
        if key.startswith("limits.")
    }
    try:
        return parse_limits(table)
    except ValueError as error:
        raise PolicyError(str(error)) from None


def _typed(
    coerce: Callable[..., _Value], flat: Mapping[str, object], key: str
) -> _Value:
    """``flat[key]`` through ``coerce``; a KeyError when missing, as ``_build`` says."""
    return coerce(flat[key], key, error=PolicyError)


def _build(kind: type[_Policy], flat: Mapping[str, object]) -> _Policy:
    """Build either policy from dotted ``policy.toml`` keys (KeyError when missing)."""
    noise = flat.get("dp.noise-multiplier")
    target = flat.get("dp.target-epsilon")
    fraction = flat.get("semisup.labelled-fraction", 1.0)
    return kind(
        answers=_actions("actions.answer", flat["actions.answer"]),
        lftm_release=_release("release.lftm", flat["release.lftm"]),
        weights_may_leave=_typed(as_bool, flat, "release.weights-may-leave"),
        max_reply_mb=_typed(as_float, flat, "release.max-reply-mb"),
        max_config_value_bytes=_typed(as_int, flat, "release.max-config-value-bytes"),
        dp_required=_typed(as_bool, flat, "dp.required"),
        noise_multiplier=None
        if noise is None
        else as_float(noise, "dp.noise-multiplier", error=PolicyError),
        target_epsilon=None
        if target is None
        else as_float(target, "dp.target-epsilon", error=PolicyError),
        delta=_typed(as_float, flat, "dp.delta"),
        epsilon_budget=_typed(as_float, flat, "dp.budget-epsilon"),
        limits=_limits(flat),
        semisup_labelled_fraction=as_float(
            fraction, "semisup.labelled-fraction", error=PolicyError
        ),
    )


def read_policy(path: Path) -> SitePolicy:
    """Read and validate a site's ``policy.toml``.

    Args:
        path: the policy file (``<site-dir>/policy.toml`` or node config ``policy``).

    Returns:
        The validated policy.

    Raises:
        PolicyError: on malformed TOML, an unknown table or key, a missing key or an
            invalid value; the message names ``path`` and the TOML key.
        OSError: when ``path`` cannot be read.
    """
    with path.open("rb") as handle:
        try:
            document = tomllib.load(handle)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise PolicyError(f"not valid TOML: {error}", source=str(path)) from None
    try:
        return _build(SitePolicy, _flatten(document))
    except PolicyError as error:
        raise PolicyError(error.detail, source=str(path)) from None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AppliedPolicy:
    """The policy in force for one run at one site: the stricter of site and run.

    When both ``noise_multiplier`` and ``target_epsilon`` are set, both bind: DP-SGD
    uses at least that noise and must end at or below that ε (at ``delta``).
    """

    answers: frozenset[str]
    lftm_release: LftmRelease
    weights_may_leave: bool
    dp_required: bool
    noise_multiplier: float | None
    target_epsilon: float | None
    delta: float
    epsilon_budget: float
    max_reply_mb: float
    max_config_value_bytes: int
    limits: SiteLimits
    semisup_labelled_fraction: float

    def __post_init__(self) -> None:
        if self.dp_required and self.noise_multiplier is self.target_epsilon is None:
            raise PolicyError(
                "DP is required but neither dp.noise-multiplier nor dp.target-epsilon"
                " is set by the site policy or the run config"
            )
        _require(
            _positive(self.noise_multiplier),
            "noise-multiplier",
            "> 0",
            self.noise_multiplier,
        )
        _require(
            _positive(self.target_epsilon), "target-epsilon", "> 0", self.target_epsilon
        )
        _require(_positive(self.max_reply_mb), "max-reply-mb", "> 0", self.max_reply_mb)

    @property
    def max_reply_bytes(self) -> int:
        """The reply size limit in bytes (``max_reply_mb`` in decimal MB)."""
        return math.floor(self.max_reply_mb * BYTES_PER_MB)

    def to_fields(self) -> dict[str, bool | int | float | str]:
        """Flatten for a reply's ConfigRecord: what was applied.

        Keys are the ``policy.toml`` keys under ``policy.``; an unset noise multiplier
        or target ε is left out, and the answered actions are one sorted, comma-joined
        string.

        Example:
            >>> applied = resolve_policy(
            ...     default_policy(), run_dp_required=True, run_noise_multiplier=None,
            ...     run_target_epsilon=3.0, run_max_reply_mb=None)
            >>> fields = applied.to_fields()
            >>> fields["policy.dp.required"], fields["policy.dp.target-epsilon"]
            (True, 3.0)
        """
        fields: dict[str, bool | int | float | str] = {
            "actions.answer": ",".join(sorted(self.answers)),
            "release.lftm": self.lftm_release.value,
            "release.weights-may-leave": self.weights_may_leave,
            "release.max-reply-mb": self.max_reply_mb,
            "release.max-config-value-bytes": self.max_config_value_bytes,
            "dp.required": self.dp_required,
            "dp.delta": self.delta,
            "dp.budget-epsilon": self.epsilon_budget,
            "semisup.labelled-fraction": self.semisup_labelled_fraction,
            **to_limit_fields(self.limits),
        }
        if self.noise_multiplier is not None:
            fields["dp.noise-multiplier"] = self.noise_multiplier
        if self.target_epsilon is not None:
            fields["dp.target-epsilon"] = self.target_epsilon
        return {f"{APPLIED_PREFIX}{key}": value for key, value in fields.items()}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> AppliedPolicy:
        """Parse :meth:`to_fields` output (other keys are ignored).

        Raises:
            PolicyError: when a key is missing or has the wrong type.
        """
        flat = {
            key[len(APPLIED_PREFIX) :]: value
            for key, value in fields.items()
            if key.startswith(APPLIED_PREFIX)
        }
        answers = flat.get("actions.answer")
        if isinstance(answers, str):
            flat["actions.answer"] = [name for name in answers.split(",") if name]
        try:
            return _build(cls, flat)
        except KeyError as error:
            raise PolicyError(
                f"{APPLIED_PREFIX}{error.args[0]} is missing", source="applied policy"
            ) from None
        except PolicyError as error:
            raise PolicyError(error.detail, source="applied policy") from None


def _stricter(
    site: float | None, run: float | None, *, larger_is_stricter: bool
) -> float | None:
    values = [value for value in (site, run) if value is not None]
    if not values:
        return None
    return max(values) if larger_is_stricter else min(values)


def resolve_policy(
    site: SitePolicy,
    *,
    run_dp_required: bool,
    run_noise_multiplier: float | None,
    run_target_epsilon: float | None,
    run_max_reply_mb: float | None,
    run_delta: float | None = None,
) -> AppliedPolicy:
    """Merge the site policy with the run config; the stricter wins per field.

    DP is required if either side requires it; the larger noise multiplier, the
    smaller target ε, the smaller δ and the smaller reply limit apply. Everything
    else (answered actions, LFTM release, whether weights leave, the ε budget, the
    query limits, the semi-supervised labelled fraction) is the site's alone.

    Args:
        site: the site's own policy.
        run_dp_required: whether the run config asks for DP-SGD.
        run_noise_multiplier: the run's noise multiplier, or None.
        run_target_epsilon: the run's target ε, or None.
        run_max_reply_mb: the run's reply limit in MB, or None.
        run_delta: the run's target δ, or None.

    Returns:
        The policy to enforce and to report with every reply.

    Raises:
        PolicyError: when DP is required but no side sets its noise or target ε, or
            a run value is out of range.

    Example:
        >>> applied = resolve_policy(
        ...     default_policy(), run_dp_required=True, run_noise_multiplier=0.5,
        ...     run_target_epsilon=None, run_max_reply_mb=200.0)
        >>> applied.dp_required, applied.noise_multiplier, applied.max_reply_mb
        (True, 1.0, 64.0)
    """
    return AppliedPolicy(
        answers=site.answers,
        lftm_release=site.lftm_release,
        weights_may_leave=site.weights_may_leave,
        dp_required=site.dp_required or run_dp_required,
        noise_multiplier=_stricter(
            site.noise_multiplier, run_noise_multiplier, larger_is_stricter=True
        ),
        target_epsilon=_stricter(
            site.target_epsilon, run_target_epsilon, larger_is_stricter=False
        ),
        delta=min(site.delta, run_delta) if run_delta is not None else site.delta,
        epsilon_budget=site.epsilon_budget,
        max_reply_mb=min(site.max_reply_mb, run_max_reply_mb)
        if run_max_reply_mb is not None
        else site.max_reply_mb,
        max_config_value_bytes=site.max_config_value_bytes,
        limits=site.limits,
        semisup_labelled_fraction=site.semisup_labelled_fraction,
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ArrayDescription:
    """One array of a reply: its record, name, shape and size in bytes."""

    record: str
    name: str
    shape: tuple[int, ...]
    nbytes: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReplyDescription:
    """What a reply would carry, as the egress guard sees it (no values).

    ``metric_records``: record key -> metric name -> number of values (1 for a
    scalar, n for a list). ``config_records``: record key -> config key -> value
    size in bytes. ``total_bytes``: the whole reply's content.
    """

    message_type: str
    arrays: tuple[ArrayDescription, ...]
    metric_records: dict[str, dict[str, int]]
    config_records: dict[str, dict[str, int]]
    total_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class Violation:
    """One broken egress rule: its stable id and what exactly broke it."""

    rule: Rule
    detail: str

    def __str__(self) -> str:
        return f"{self.rule.value} ({self.detail})"


def _allowed_array_records(schema: ReplySchema) -> str:
    allowed = [repr(WEIGHTS_KEY)] if schema.weights else []
    allowed += [repr(f"{MODEL_KEY_PREFIX}{name}") for name in schema.models]
    return ", ".join(allowed) or "none"


def _check_records(reply: ReplyDescription, schema: ReplySchema) -> list[Violation]:
    """Records the action's schema does not declare (e.g. weights in an evaluate)."""

    def array_record_allowed(key: str) -> bool:
        if key == WEIGHTS_KEY:
            return schema.weights
        name = model_name(key)
        return bool(name) and name in schema.models

    found: list[tuple[str, str, str]] = [
        ("array", key, _allowed_array_records(schema))
        for key in sorted({array.record for array in reply.arrays})
        if not array_record_allowed(key)
    ]
    metric_allowed = repr(METRICS_KEY) if schema.metrics else "none"
    found += [
        ("metric", key, metric_allowed)
        for key in sorted(reply.metric_records)
        if key != METRICS_KEY or not schema.metrics
    ]
    found += [
        ("config", key, repr(REPLY_KEY))
        for key in sorted(reply.config_records)
        if key != REPLY_KEY
    ]
    return [
        Violation(
            Rule.UNKNOWN_RECORD,
            f"{kind} record {key!r} is not part of a {reply.message_type!r} reply "
            f"(allowed: {allowed})",
        )
        for kind, key, allowed in found
    ]


def _check_fields(reply: ReplyDescription, schema: ReplySchema) -> list[Violation]:
    """Metric and setting names the action's schema does not declare.

    This is what stops a scalar that is not part of the contract (an image's mean
    intensity, a case count by name) even when it is small.
    """
    found = [
        (f"{METRICS_KEY}/{name}", schema.metrics)
        for name in sorted(reply.metric_records.get(METRICS_KEY, {}))
        if not schema.allows_metric(name)
    ]
    found += [
        (f"{REPLY_KEY}/{name}", schema.settings)
        for name in sorted(reply.config_records.get(REPLY_KEY, {}))
        if not schema.allows_setting(name)
    ]
    return [
        Violation(
            Rule.UNDECLARED_FIELD,
            f"{where} is not a field of the {reply.message_type!r} reply (declared:"
            f" {', '.join(declared) or 'none'})",
        )
        for where, declared in found
    ]


def _check_arrays(
    reply: ReplyDescription,
    policy: AppliedPolicy,
    manifest: Mapping[str, tuple[int, ...]],
) -> list[Violation]:
    violations: list[Violation] = []
    if reply.arrays and not policy.weights_may_leave:
        size = sum(array.nbytes for array in reply.arrays)
        violations.append(
            Violation(
                Rule.WEIGHTS_MAY_NOT_LEAVE,
                f"{len(reply.arrays)} arrays ({size} bytes) in a reply, but"
                " release.weights-may-leave is false",
            )
        )
    for array in reply.arrays:
        where = f"{array.record}/{array.name}"
        expected = manifest.get(array.name)
        if expected is None:
            violations.append(
                Violation(
                    Rule.ARRAY_NOT_IN_MANIFEST,
                    f"{where} with shape {array.shape} is not a parameter of the"
                    " declared model",
                )
            )
        elif tuple(array.shape) != tuple(expected):
            violations.append(
                Violation(
                    Rule.ARRAY_SHAPE_MISMATCH,
                    f"{where} has shape {array.shape}, the manifest declares"
                    f" {tuple(expected)}",
                )
            )
        elif array.nbytes > math.prod(expected) * MAX_BYTES_PER_ELEMENT:
            violations.append(
                Violation(
                    Rule.ARRAY_SIZE_MISMATCH,
                    f"{where} is {array.nbytes} bytes, more than"
                    f" {MAX_BYTES_PER_ELEMENT} per element of shape {tuple(expected)}",
                )
            )
    return violations


def _check_sizes(reply: ReplyDescription, policy: AppliedPolicy) -> list[Violation]:
    violations: list[Violation] = []
    if reply.total_bytes > policy.max_reply_bytes:
        violations.append(
            Violation(
                Rule.OVERSIZED_REPLY,
                f"reply is {reply.total_bytes} bytes, the applied max-reply-mb"
                f" {policy.max_reply_mb!r} allows {policy.max_reply_bytes}",
            )
        )
    limit = policy.max_config_value_bytes
    violations += [
        Violation(
            Rule.OVERSIZED_CONFIG_VALUE,
            f"{record}/{key} is {size} bytes, release.max-config-value-bytes"
            f" allows {limit}",
        )
        for record, values in sorted(reply.config_records.items())
        for key, size in sorted(values.items())
        if size > limit
    ]
    return violations


def _check_metrics(
    reply: ReplyDescription,
    policy: AppliedPolicy,
    max_metric_values: int,
    num_candidates: int,
) -> list[Violation]:
    violations: list[Violation] = []
    lftm = reply.message_type == LFTM
    domain_only = lftm and policy.lftm_release is LftmRelease.DOMAIN
    for record, counts in sorted(reply.metric_records.items()):
        for name, count in sorted(counts.items()):
            if lftm and name.startswith(AGREEMENT_PREFIX):
                # A row of the candidates' agreement matrix: one mean over the
                # site's cases per candidate, whatever the release.
                if count > num_candidates:
                    violations.append(
                        Violation(
                            Rule.TOO_MANY_METRIC_VALUES,
                            f"{record}/{name} holds {count} values, at most"
                            f" {num_candidates} (one per candidate sent) may leave",
                        )
                    )
                continue
            if domain_only and count > 1:
                violations.append(
                    Violation(
                        Rule.INSTANCE_LFTM_NOT_ALLOWED,
                        f"{record}/{name} holds {count} per-instance values, but"
                        " release.lftm is 'domain' (per-source means only)",
                    )
                )
            if count > max_metric_values:
                violations.append(
                    Violation(
                        Rule.TOO_MANY_METRIC_VALUES,
                        f"{record}/{name} holds {count} values, at most"
                        f" {max_metric_values} may leave",
                    )
                )
    return violations


def check_reply(
    reply: ReplyDescription,
    *,
    policy: AppliedPolicy,
    manifest: Mapping[str, tuple[int, ...]],
    max_metric_values: int,
    num_candidates: int = 0,
) -> list[Violation]:
    """Check a reply against the applied policy and the run's model manifest.

    Only the records and field names the action's ``core.protocol.REPLY_SCHEMAS``
    entry declares may appear; every array must be a parameter of the declared model
    (same name and shape, at most 8 bytes per element), so images, labels and
    prediction maps cannot leave.

    Args:
        reply: what the reply would carry.
        policy: the policy applied for this run.
        manifest: parameter name -> shape of the model architecture declared for the
            run.
        max_metric_values: the longest metric list that may leave (e.g. the number
            of target cases, for ITM columns).
        num_candidates: models the request sent; the longest row of an LFTM
            reply's agreement matrix (``agree.<source>``) that may leave, under
            either release.

    Returns:
        Every violation, in rule order; empty when the reply may leave.

    Example:
        >>> reply = ReplyDescription(
        ...     message_type="evaluate", arrays=(), metric_records={"metrics": {
        ...     "dice.A": 1, "image.intensity-histogram": 4096}}, config_records={},
        ...     total_bytes=33000)
        >>> policy = resolve_policy(
        ...     default_policy(), run_dp_required=False, run_noise_multiplier=None,
        ...     run_target_epsilon=None, run_max_reply_mb=None)
        >>> [v.rule.value for v in check_reply(
        ...     reply, policy=policy, manifest={}, max_metric_values=64)]
        ['undeclared-field', 'too-many-metric-values']
    """
    if max_metric_values < 1:
        raise ValueError(f"max_metric_values must be >= 1, got {max_metric_values}")
    violations: list[Violation] = []
    if reply.message_type not in policy.answers:
        answered = ", ".join(sorted(policy.answers)) or "none"
        violations.append(
            Violation(
                Rule.ACTION_NOT_ANSWERED,
                f"{reply.message_type!r} is not in actions.answer (answered:"
                f" {answered})",
            )
        )
    schema = REPLY_SCHEMAS.get(reply.message_type, ReplySchema())
    violations += _check_records(reply, schema)
    violations += _check_fields(reply, schema)
    violations += _check_arrays(reply, policy, manifest)
    violations += _check_sizes(reply, policy)
    violations += _check_metrics(reply, policy, max_metric_values, num_candidates)
    return violations


def describe_violations(violations: Sequence[Violation]) -> str:
    """One line for an error reply and the ledger.

    Example:
        >>> describe_violations([Violation(Rule.OVERSIZED_REPLY, "70 MB")])
        'blocked by egress policy: oversized-reply (70 MB)'
        >>> describe_violations([])
        'allowed by egress policy'
    """
    if not violations:
        return "allowed by egress policy"
    return "blocked by egress policy: " + "; ".join(map(str, violations))
