"""The wire contract: action names, record keys, typed payloads (docs/architecture.md).

Both apps import this module; neither spells a message type or record key anywhere
else. Payloads are frozen dataclasses that flatten to and from plain scalar mappings
(what Flower's ``ConfigRecord``/``MetricRecord`` hold); model weights travel separately
as ``dict[str, numpy array]`` under :data:`WEIGHTS_KEY` or ``model.<name>`` keys. The
conversion to Flower records lives in one small ``records.py`` on each side. Plain
Python: never imports flwr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from collections.abc import Mapping
from types import UnionType
from typing import Any, ClassVar, Final, Self, TypeAlias, Union

from core.coerce import FieldReader, is_integer

Scalar: TypeAlias = bool | int | float | str
FieldValue: TypeAlias = Scalar | list[int] | list[float] | list[str]
Fields: TypeAlias = dict[str, FieldValue]

# Message types (Flower category, then the action name).
HELLO: Final = "query.hello"
FINGERPRINT: Final = "query.fingerprint"
TRAIN_SOURCE: Final = "train.source"
LFTM: Final = "query.lftm"
ADAPT: Final = "train.adapt"
CONSENSUS: Final = "train.consensus"
SEMISUP: Final = "train.semisup"
PROFILE: Final = "query.profile"
FINETUNE: Final = "train.finetune"
EVALUATE: Final = "evaluate"

# Error code of a reply in which the site reports a problem with its data or the request
# (above Flower's own codes, 0-8). The reason names the file and the problem.
SITE_ERROR_CODE: Final = 100
# Error code of a reply the site's egress guard blocked; the reason names the rules.
EGRESS_BLOCKED_CODE: Final = 101

# Record keys inside a message's RecordDict.
REQUEST_KEY: Final = "request"  # ConfigRecord: the request payload
REPLY_KEY: Final = "reply"  # ConfigRecord: the reply payload's settings and names
METRICS_KEY: Final = "metrics"  # MetricRecord: the reply payload's numbers
WEIGHTS_KEY: Final = "weights"  # ArrayRecord: one model's weights
MODEL_KEY_PREFIX: Final = "model."  # ArrayRecord per named model: "model.<name>"
# ConfigRecord in every request once the coordinator has a resolution plan
# (:class:`PlanSettings`): the values the site's run config leaves to the plan.
PLAN_KEY: Final = "plan"


def model_key(name: str) -> str:
    """Record key of the named model's weights.

    Example:
        >>> model_key("B")
        'model.B'
    """
    return f"{MODEL_KEY_PREFIX}{name}"


def model_name(key: str) -> str | None:
    """Inverse of :func:`model_key`; None for keys that are not model keys."""
    return key[len(MODEL_KEY_PREFIX) :] if key.startswith(MODEL_KEY_PREFIX) else None


# A site's name: it becomes part of file names at the coordinator (models, reports), so
# a name is a short token that can't climb out of a folder ("../x") or hide a path.
SITE_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_site_name(name: str) -> str:
    """``name`` when it is a valid site name, else a ValueError saying why.

    The coordinator checks every name it will use (a registered name, or in
    simulation the name a hello says) before it touches a path.

    Example:
        >>> check_site_name("hospital-a")
        'hospital-a'
        >>> check_site_name("../runs")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: site name '../runs' is not 1-64 letters, digits, '.', '_' or '-' ...
    """
    if not SITE_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"site name {name!r} is not 1-64 letters, digits, '.', '_' or '-' "
            "starting with a letter or digit"
        )
    return name


def _payload(fields: Mapping[str, object]) -> FieldReader:
    """Typed getters over a payload's fields; errors say ``payload field '<key>'``."""
    return FieldReader(fields, "payload field")


# ---------------------------------------------------------------------------------
# The generic codec. A record's field travels under its name in kebab case
# (``num_examples`` -> ``num-examples``) unless its metadata names another key
# (:func:`wire`); its annotation says how: int, float, str and bool as they are;
# ``tuple[str, ...]`` and ``tuple[float, ...]`` as lists; ``X | None`` only when not
# None; ``dict[str, float]`` as one key per entry, ``<key>.<name>`` (a per-name
# table: the names are sources, methods or predictors). Keys go in one order: the
# fixed keys (the record's own fields, then the fields it inherits, each in
# declaration order), then the keys that vary (optional fields, per-name tables).
# Records with dynamic key layouts (:class:`LftmReply`, :class:`EvaluateRequest`,
# :class:`LedgerAnchor`) write their own methods.
# ---------------------------------------------------------------------------------

_WIRE_KEY: Final = "wire-key"
_MAY_BE_ABSENT: Final = "wire-may-be-absent"


def wire(key: str | None = None, *, may_be_absent: bool = False) -> dict[str, object]:
    """A record field's metadata: its wire key and whether a payload may omit it.

    ``key`` None keeps the rule's key; an omitted field parses as its default.

    Example:
        >>> field = dataclasses.field(default=0.0, metadata=wire("dp.delta"))
    """
    metadata: dict[str, object] = {_MAY_BE_ABSENT: may_be_absent}
    if key is not None:
        metadata[_WIRE_KEY] = key
    return metadata


@dataclasses.dataclass(frozen=True, slots=True)
class _WireField:
    name: str  # the attribute
    key: str  # the wire key (a per-name table's prefix without the dot)
    kind: str  # "scalar", "str-tuple", "float-tuple" or "table"
    scalar: type | None  # int, float, str or bool for a scalar
    nullable: bool  # ``X | None``: sent only when not None
    may_be_absent: bool  # parses as the field's default when absent
    default: object


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _wire_field(
    field: dataclasses.Field[Any], hint: Any, absent_ok: frozenset[str]
) -> _WireField:
    args = typing.get_args(hint)
    nullable = type(None) in args and typing.get_origin(hint) in (Union, UnionType)
    if nullable:
        (hint,) = [arg for arg in args if arg is not type(None)]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, float, str, bool):
        kind, scalar = "scalar", hint
    elif origin is tuple and args in ((str, ...), (float, ...)):
        kind, scalar = ("str-tuple" if args[0] is str else "float-tuple"), None
    elif origin is dict and args == (str, float):
        kind, scalar = "table", None
    else:
        raise TypeError(f"record field {field.name!r} has no wire form: {hint!r}")
    return _WireField(
        name=field.name,
        key=str(field.metadata.get(_WIRE_KEY, _kebab(field.name))),
        kind=kind,
        scalar=scalar,
        nullable=nullable,
        may_be_absent=bool(field.metadata.get(_MAY_BE_ABSENT))
        or field.name in absent_ok,
        default=field.default,
    )


_DECLARED: Final[dict[type, tuple[_WireField, ...]]] = {}


def _declared(cls: type) -> tuple[_WireField, ...]:
    """The record's fields: its own first, then each base class's, as declared."""
    if cls in _DECLARED:
        return _DECLARED[cls]
    hints = typing.get_type_hints(cls)
    absent_ok = frozenset(getattr(cls, "absent_ok", ()))
    fields = {field.name: field for field in dataclasses.fields(cls)}
    names = dict.fromkeys(
        name
        for klass in cls.__mro__
        for name in vars(klass).get("__annotations__", {})
        if name in fields
    )
    declared = tuple(
        _wire_field(fields[name], hints[name], absent_ok) for name in names
    )
    _DECLARED[cls] = declared
    return declared


def _declared_field(cls: type, name: str) -> _WireField:
    return next(field for field in _declared(cls) if field.name == name)


def _layout(cls: type) -> tuple[_WireField, ...]:
    """The record's fields in wire order: fixed keys first, then varying ones."""
    declared = _declared(cls)
    fixed = [
        field for field in declared if field.kind != "table" and not field.nullable
    ]
    return (*fixed, *(field for field in declared if field not in fixed))


def record_keys(cls: type) -> tuple[str, ...]:
    """A record type's wire keys, in declaration order (own fields, then inherited).

    A per-name table's key reads ``<key>.*``.

    Example:
        >>> record_keys(AdaptRequest)
        ('main', 'aux', 'weight-main', 'weight-aux')
    """
    return tuple(
        f"{field.key}.*" if field.kind == "table" else field.key
        for field in _declared(cls)
    )


def field_key(cls: type, name: str) -> str:
    """The wire key of a record type's field ``name``.

    Example:
        >>> field_key(TrainReply, "epsilon_spent")
        'dp.epsilon-spent'
    """
    for field in _layout(cls):
        if field.name == name:
            return field.key
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def record_to_fields(record: WireRecord) -> Fields:
    """A record's fields, flattened by the codec's rules."""
    fields: Fields = {}
    for field in _layout(record.__class__):
        value = getattr(record, field.name)
        if field.kind == "table":
            fields.update({f"{field.key}.{name}": v for name, v in value.items()})
        elif field.nullable and value is None:
            continue
        elif field.kind != "scalar":
            fields[field.key] = list(value)
        else:
            fields[field.key] = value
    return fields


def _read_value(field: _WireField, reader: FieldReader) -> Any:
    """One present non-table field's value, type-checked; errors name its key."""
    if field.kind == "str-tuple":
        return tuple(reader.get_str_list(field.key))
    if field.kind == "float-tuple":
        return tuple(reader.get_float_list(field.key))
    if field.scalar is int:
        return reader.get_int(field.key)
    if field.scalar is float:
        return reader.get_float(field.key)
    if field.scalar is bool:
        return reader.get_bool(field.key)
    return reader.get_str(field.key)


def _check_allowed(cls: type, field: _WireField, value: object) -> None:
    """A value outside the record's ``allowed_values`` for the field: ValueError."""
    allowed = getattr(cls, "allowed_values", {}).get(field.name)
    if allowed is not None and value is not None and value not in allowed:
        raise ValueError(
            f"payload field {field.key!r} must be one of "
            f"{', '.join(map(repr, allowed))}, got {value!r}"
        )


def record_values(cls: type, fields: Mapping[str, object]) -> dict[str, Any]:
    """Parse a payload into a record type's keyword arguments, checking each type."""
    reader = _payload(fields)
    values: dict[str, Any] = {}
    for field in _layout(cls):
        if field.kind == "table":
            prefix = f"{field.key}."
            values[field.name] = {
                key[len(prefix) :]: reader.get_float(key)
                for key in fields
                if key.startswith(prefix)
            }
        elif field.key not in fields and (field.nullable or field.may_be_absent):
            values[field.name] = None if field.nullable else field.default
        else:
            values[field.name] = _read_value(field, reader)
        _check_allowed(cls, field, values[field.name])
    return values


def field_problems(cls: type, fields: Mapping[str, object]) -> list[str]:
    """What is wrong with the fields of ``cls`` that ``fields`` holds, one line each.

    Only the present fields are checked, each against its declared type (and the
    record's ``allowed_values``), so a partial payload is judged field by field:
    the egress guard's ``malformed-field`` rule. Keys the record does not declare
    are the schema's business, not this check's.

    Example:
        >>> field_problems(TrainReply, {"loss": [0.5, 0.25], "num-cases": 3})
        ["payload field 'loss' must be a number, got [0.5, 0.25]"]
    """
    reader = _payload(fields)
    problems: list[str] = []
    for field in _layout(cls):
        if field.kind == "table":
            prefix = f"{field.key}."
            keys = [key for key in fields if key.startswith(prefix)]
        else:
            keys = [field.key] if field.key in fields else []
        for key in keys:
            try:
                if field.kind == "table":
                    reader.get_float(key)
                else:
                    _check_allowed(cls, field, _read_value(field, reader))
            except ValueError as error:
                problems.append(str(error))
    return problems


class WireRecord:
    """Mixin of the records the generic codec (de)serialises.

    A subclass names in ``absent_ok`` the fields a payload may leave out (fields
    an earlier release did not send); they parse as their defaults.
    """

    __slots__ = ()
    absent_ok: ClassVar[frozenset[str]] = frozenset()

    def to_fields(self) -> Fields:
        """Flatten for a ConfigRecord (requests, hello) or a MetricRecord (replies)."""
        return record_to_fields(self)

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> Self:
        """Parse a message's ConfigRecord or MetricRecord."""
        return cls(**record_values(cls, fields))


# The DP figures' wire keys (:class:`DpFigures`).
DP_KEY_PREFIX: Final = "dp."  # every DP figure's key starts with it
DP_EPSILON_SPENT: Final = "dp.epsilon-spent"
DP_EPSILON_TOTAL: Final = "dp.epsilon-total"
DP_DELTA: Final = "dp.delta"
DP_NOISE_MULTIPLIER: Final = "dp.noise-multiplier"
DP_PATIENT_EPSILON_SPENT: Final = "dp.patient-epsilon-spent"
DP_PATIENT_EPSILON_TOTAL: Final = "dp.patient-epsilon-total"
DP_SLICES_PER_CASE: Final = "dp.slices-per-case"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DpFigures(WireRecord):
    """The DP figures of a reply that may be a DP release (all 0 without DP).

    Epsilon of this release and the site's cumulative epsilon after it, per slice (the
    unit DP-SGD protects; what the site's budget caps) and per patient (group privacy
    over ``slices_per_case`` slices of one case; nan when the site can't state it),
    all at ``delta``; and the noise multiplier. Reply types that can be DP releases
    derive from it, so the fields are declared and serialised once, under
    :data:`DP_METRICS`. The patient-level fields were not sent by sites of an earlier
    release; they parse as 0 when absent.
    """

    epsilon_spent: float = dataclasses.field(
        default=0.0, metadata=wire(DP_EPSILON_SPENT)
    )
    epsilon_total: float = dataclasses.field(
        default=0.0, metadata=wire(DP_EPSILON_TOTAL)
    )
    delta: float = dataclasses.field(default=0.0, metadata=wire(DP_DELTA))
    noise_multiplier: float = dataclasses.field(
        default=0.0, metadata=wire(DP_NOISE_MULTIPLIER)
    )
    patient_epsilon_spent: float = dataclasses.field(
        default=0.0, metadata=wire(DP_PATIENT_EPSILON_SPENT, may_be_absent=True)
    )
    patient_epsilon_total: float = dataclasses.field(
        default=0.0, metadata=wire(DP_PATIENT_EPSILON_TOTAL, may_be_absent=True)
    )
    slices_per_case: int = dataclasses.field(
        default=0, metadata=wire(DP_SLICES_PER_CASE, may_be_absent=True)
    )

    @property
    def private(self) -> bool:
        """Whether the site released this under DP (with Gaussian noise)."""
        return self.noise_multiplier > 0


# The DP figures' wire keys, in order: every reply type that can be a DP release
# carries them.
DP_METRICS: Final = record_keys(DpFigures)
# Every DP figure's attribute: reply types that carried none in an earlier release
# name these in ``absent_ok``.
_DP_FIELDS: Final = frozenset(field.name for field in dataclasses.fields(DpFigures))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HelloReply(WireRecord):
    """What a site says about itself: counts only, never case names."""

    site: str
    modality: str
    labelled: int
    unlabelled: int
    evaluation: int
    class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FingerprintReply(DpFigures):
    """A site's fingerprint on the wire (core.planning.fingerprint): numbers only.

    The geometry (median spacing along ``(x, y, z)`` and size along ``(z, y, x)``)
    stands on ``num_images`` training images; the CT intensity term (the foreground's
    0.5, 50 and 99.5 percentiles, mean and sd in HU, each a mean over cases) on
    ``num_labelled`` labelled cases, and comes only from a CT site with at least
    ``limits.min-cases`` of them. With DP it is noised and the DP fields say what it
    cost; they are 0 for an exact fingerprint. The modality is the hello's.
    """

    num_images: int
    num_labelled: int
    spacing_mm: tuple[float, ...]
    shape: tuple[float, ...]
    ct_intensities: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for key, values, count in (
            ("spacing-mm", self.spacing_mm, 3),
            ("shape", self.shape, 3),
            ("ct-intensities", self.ct_intensities or (1.0,) * 5, 5),
        ):
            if len(values) != count or not all(
                math.isfinite(value) for value in values
            ):
                raise ValueError(
                    f"payload field {key!r} must hold {count} finite numbers, got "
                    f"{list(values)!r}"
                )
        if min(self.spacing_mm) <= 0 or min(self.shape) < 1:
            raise ValueError(
                "payload fields 'spacing-mm' and 'shape' must be positive, got "
                f"{list(self.spacing_mm)!r} and {list(self.shape)!r}"
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PlanSettings(WireRecord):
    """The resolution plan's values a site applies (``PLAN_KEY`` of every request).

    Only where the site's run config leaves a value to the plan
    (``data.image-size = 0``, ``train.batch-size = 0``, ``data.spacing-mm = 0``, an
    empty ``data.ct-window``);
    a site checks the planned sizes against its limits as it checks the run's.
    """

    image_size: int
    batch_size: int
    spacing_mm: float  # in-plane target spacing
    ct_window: tuple[float, ...] | None = None  # clip low, clip high, mean, sd (HU)

    def __post_init__(self) -> None:
        if not (self.image_size >= 16 and self.image_size % 8 == 0):
            raise ValueError(
                "plan field 'image-size' must be a multiple of 8, >= 16, got "
                f"{self.image_size!r}"
            )
        if not (math.isfinite(self.spacing_mm) and 0.01 <= self.spacing_mm <= 100):
            raise ValueError(
                "plan field 'spacing-mm' must be in [0.01, 100] mm, got "
                f"{self.spacing_mm!r}"
            )
        if self.batch_size < 1:
            raise ValueError(
                f"plan field 'batch-size' must be >= 1, got {self.batch_size!r}"
            )
        window = self.ct_window
        if window is not None and not (
            len(window) == 4
            and all(math.isfinite(value) for value in window)
            and window[0] < window[1]
            and window[3] > 0
        ):
            raise ValueError(
                "plan field 'ct-window' must be four finite numbers 'clip-low, "
                f"clip-high, mean, sd' with clip-low < clip-high and sd > 0, got "
                f"{list(window)!r}"
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainReply(DpFigures):
    """How a training action went; the weights travel beside it.

    With DP-SGD, ``epsilon_spent`` is this training's ε and ``epsilon_total`` the
    site's cumulative ε after it, both at ``delta``; all four DP fields are 0 without
    DP.
    """

    num_examples: int  # samples (slices) seen, never batches
    num_cases: int
    loss: float
    seconds: float
    # docs/methods.md#post-processing: the source site's decision to keep the
    # largest connected component per class of its model's predictions (1 on, 0
    # off; a MetricRecord holds no bool), and the mean Dice of its labelled
    # evaluation cases without and with it. Sent by ``train.source`` only: absent
    # from a fine-tuning step's reply and from sites of an earlier release (off).
    largest_component: int | None = dataclasses.field(
        default=None, metadata=wire("postprocess.largest-component")
    )
    dice_raw: float | None = dataclasses.field(
        default=None, metadata=wire("postprocess.dice-raw")
    )
    dice_postprocessed: float | None = dataclasses.field(
        default=None, metadata=wire("postprocess.dice")
    )

    allowed_values: ClassVar[dict[str, tuple[int, ...]]] = {"largest_component": (0, 1)}

    def __post_init__(self) -> None:
        _check_allowed(
            TrainReply,
            _declared_field(TrainReply, "largest_component"),
            self.largest_component,
        )

    @property
    def postprocess(self) -> bool:
        """Whether the source decided its predictions keep the largest component."""
        return self.largest_component == 1


# What of the target's LFTM a reply carries (the site policy's ``release.lftm``).
INSTANCE_RELEASE: Final = "instance"  # ITM: one score per target case and source
DOMAIN_RELEASE: Final = "domain"  # DTM only: one mean per source
ITM_PREFIX: Final = "itm."  # metrics key of a source's ITM column: "itm.<source>"
DTM_PREFIX: Final = "dtm."  # metrics key of a source's DTM mean: "dtm.<source>"
# metrics key of a source's row of the agreement matrix, in ``sources`` order: the mean
# per-case Dice between its predictions and each other source's ("agree.<source>")
AGREEMENT_PREFIX: Final = "agree."
# The settings of an LFTM reply: the metric, the sources (column order), the release.
_LFTM_METRIC: Final = "metric"
_LFTM_SOURCES: Final = "sources"
_LFTM_RELEASE: Final = "release"
LFTM_SETTINGS: Final = (_LFTM_METRIC, _LFTM_SOURCES, _LFTM_RELEASE)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LftmReply:
    """The target's transferability scores: ITM columns, or only the DTM.

    ``instance`` release carries per-case columns (rows in an order fixed at the site
    but never named, so no case identity leaves); ``domain`` release carries one mean
    per source and ``itm_columns`` is None. Either release carries ``agreement``, one
    row per source of means over the target's cases (the agreement selection's input);
    None from a site of an earlier release, which sent none.
    """

    metric: str
    sources: tuple[str, ...]
    release: str
    itm_columns: dict[str, list[float]] | None  # source -> one score per case
    dtm: dict[str, float]  # source -> mean over the target's cases
    agreement: dict[str, list[float]] | None = None  # source -> row, ``sources`` order

    def __post_init__(self) -> None:
        if self.release not in (INSTANCE_RELEASE, DOMAIN_RELEASE):
            raise ValueError(
                f"payload field 'release' must be {INSTANCE_RELEASE!r} or "
                f"{DOMAIN_RELEASE!r}, got {self.release!r}"
            )
        if (self.release == INSTANCE_RELEASE) != (self.itm_columns is not None):
            raise ValueError(
                "ITM columns travel with instance release only, and must then be set"
            )

    @classmethod
    def from_itm(
        cls,
        metric: str,
        sources: tuple[str, ...],
        itm: dict[str, list[float]],
        *,
        release: str,
        agreement: dict[str, list[float]] | None = None,
    ) -> LftmReply:
        """Build the reply for ``release`` from full ITM columns (DTM = their means).

        Example:
            >>> reply = LftmReply.from_itm(
            ...     "lftm", ("B",), {"B": [0.2, 0.4]}, release="domain")
            >>> reply.itm_columns, round(reply.dtm["B"], 6)
            (None, 0.3)
        """
        dtm = {name: sum(itm[name]) / max(len(itm[name]), 1) for name in sources}
        return cls(
            metric=metric,
            sources=sources,
            release=release,
            itm_columns=dict(itm) if release == INSTANCE_RELEASE else None,
            dtm=dtm,
            agreement=agreement,
        )

    def to_fields(self) -> tuple[Fields, Fields]:
        """Flatten to (ConfigRecord fields, MetricRecord fields)."""
        settings: Fields = {
            _LFTM_METRIC: self.metric,
            _LFTM_SOURCES: list(self.sources),
            _LFTM_RELEASE: self.release,
        }
        metrics: Fields
        if self.itm_columns is not None:
            metrics = {
                f"{ITM_PREFIX}{name}": list(self.itm_columns[name])
                for name in self.sources
            }
        else:
            metrics = {f"{DTM_PREFIX}{name}": self.dtm[name] for name in self.sources}
        if self.agreement is not None:
            metrics.update(
                {
                    f"{AGREEMENT_PREFIX}{name}": list(self.agreement[name])
                    for name in self.sources
                }
            )
        return settings, metrics

    @classmethod
    def from_fields(
        cls, settings: Mapping[str, object], metrics: Mapping[str, object]
    ) -> LftmReply:
        """Parse a reply's ConfigRecord and MetricRecord."""
        config, numbers = _payload(settings), _payload(metrics)
        sources = tuple(str(name) for name in config.get_list(_LFTM_SOURCES))
        release = config.get_str(_LFTM_RELEASE)
        metric = config.get_str(_LFTM_METRIC)
        agreement = None
        if any(f"{AGREEMENT_PREFIX}{name}" in metrics for name in sources):
            agreement = {
                name: numbers.get_float_list(f"{AGREEMENT_PREFIX}{name}")
                for name in sources
            }
            for name, row in agreement.items():
                if len(row) != len(sources):
                    raise ValueError(
                        f"payload field '{AGREEMENT_PREFIX}{name}' has {len(row)} "
                        f"values for {len(sources)} sources"
                    )
        if release == DOMAIN_RELEASE:
            dtm = {name: numbers.get_float(f"{DTM_PREFIX}{name}") for name in sources}
            return cls(
                metric=metric,
                sources=sources,
                release=release,
                itm_columns=None,
                dtm=dtm,
                agreement=agreement,
            )
        columns = {
            name: numbers.get_float_list(f"{ITM_PREFIX}{name}") for name in sources
        }
        lengths = {len(column) for column in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"ITM columns differ in length: {sorted(lengths)}")
        return cls.from_itm(
            metric, sources, columns, release=release, agreement=agreement
        )

    def agreement_by_name(self) -> dict[str, dict[str, float]] | None:
        """``agreement[i][j]`` keyed by source names; None when the site sent none."""
        if self.agreement is None:
            return None
        return {
            first: dict(zip(self.sources, self.agreement[first], strict=True))
            for first in self.sources
        }

    def itm_rows(self) -> tuple[tuple[float, ...], ...] | None:
        """ITM as rows (cases) by columns (``sources`` order); None for domain."""
        if self.itm_columns is None:
            return None
        columns = [self.itm_columns[name] for name in self.sources]
        return tuple(tuple(row) for row in zip(*columns, strict=True))


# The adapted models an adapt reply carries, as ``model.<name>``.
ADAPT_MAIN_MODEL: Final = "main"
ADAPT_AUX_MODEL: Final = "aux"  # only when the pair has an auxiliary source
ADAPT_MODELS: Final = (ADAPT_MAIN_MODEL, ADAPT_AUX_MODEL)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdaptRequest(WireRecord):
    """Which candidates form the pair and with which fixed weights."""

    main: str
    aux: str  # "" when there is no auxiliary source
    weight_main: float
    weight_aux: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdaptReply(DpFigures):
    """How adaptation went; adapted ``model.main``/``model.aux`` travel beside it."""

    # Sites of an earlier release sent no DP figures with this reply.
    absent_ok: ClassVar[frozenset[str]] = _DP_FIELDS

    num_examples: int  # target slices seen over all epochs
    # fraction of target pixels pseudo-labelled foreground (nan: withheld under DP)
    pseudo_label_foreground: float
    seconds: float


# What a consensus is built from and what a model is trained on, in the reply's
# ``label-dice.*`` and ``model.<method>`` names: TGMA's ITM-weighted pseudo-labels and
# the three fusions of the noisy labels.
CONSENSUS_METHODS: Final = ("itm", "majority", "staple", "deepstaple")
# A consensus reply names the k-th atlas at the site (case-id order) "atlas-<k>",
# never by its case name.
ATLAS_SOURCE_PREFIX: Final = "atlas-"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusRequest(WireRecord):
    """Which sent models label the target's images, and which one is refined.

    ``label_sources`` name the candidate models whose predictions become noisy labels
    (each target image gets one label per source, plus one per atlas at the site);
    ``start`` names the sent model that is trained further on each consensus.
    """

    label_sources: tuple[str, ...]
    start: str

    def __post_init__(self) -> None:
        if not self.label_sources:
            raise ValueError("payload field 'label-sources' names no model")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusReply(WireRecord):
    """Aggregate quality figures of a consensus run; the labels stay at the site.

    Per noisy-label source (a candidate model's name, or ``atlas-<k>`` for the k-th
    atlas, never its case name): the mean raw data parameter over the target's
    images, the mean STAPLE sensitivity, and the mean Dice agreement with the
    DeepSTAPLE consensus. When the target has evaluation labels: each method's
    consensus Dice against them (``label_dice``) and the Spearman correlations of
    data parameters and STAPLE sensitivities with the labels' true Dice, over the
    evaluation images (nan when undefined). The refined models travel beside it as
    ``model.<method>``.
    """

    num_images: int  # target cases labelled (training and evaluation images)
    num_labels: int  # noisy label instances (2-D slices x label sources)
    num_atlases: int
    seconds: float
    spearman_dp: float
    spearman_staple: float
    data_parameter: dict[str, float]  # "data-parameter.<source>"
    staple_sensitivity: dict[str, float]  # "staple-sensitivity.<source>"
    agreement: dict[str, float]  # "agreement.<source>"
    label_dice: dict[str, float]  # "label-dice.<method>"


# Which schedule a train.semisup message belongs to: the refinement at the target, or
# the federated rounds. Each keeps its own teacher in the site's node state.
SEMISUP_SCOPES: Final = ("target", "federated")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupRequest(WireRecord):
    """One round of semi-supervised training; the student travels as ``weights``.

    Rounds are numbered from 1; a site runs ``iterations`` steps, numbered globally as
    ``(round - 1) * iterations ...`` so its ramps span all ``rounds``.
    """

    scope: str
    round: int
    rounds: int
    iterations: int

    def __post_init__(self) -> None:
        if self.scope not in SEMISUP_SCOPES:
            raise ValueError(
                f"payload field 'scope' must be one of {SEMISUP_SCOPES}, "
                f"got {self.scope!r}"
            )
        if not 1 <= self.round <= self.rounds:
            raise ValueError(
                f"payload field 'round' must be in 1..rounds ({self.rounds}), "
                f"got {self.round}"
            )
        if self.iterations < 1:
            raise ValueError(
                f"payload field 'iterations' must be >= 1, got {self.iterations}"
            )

    @property
    def start_step(self) -> int:
        """The global number of this round's first step."""
        return (self.round - 1) * self.iterations

    @property
    def total_steps(self) -> int:
        """Steps over all rounds (the length of the ramps)."""
        return self.rounds * self.iterations


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupReply(DpFigures):
    """How a site's round went; the updated student travels beside it as ``weights``.

    ``num_examples`` (samples seen, labelled and unlabelled) is the FedAvg weight.
    With DP-SGD (a site policy that requires it), ``epsilon_spent`` is the round's ε
    and ``epsilon_total`` the site's cumulative ε after it, both at ``delta``, for the
    labelled slices (unlabelled images are not covered); ``num_examples`` counts the
    expected labelled draws; and ``supervised_loss`` is 0, withheld: a loss on the
    labelled slices is not covered by the guarantee. The four DP fields are 0 without
    DP; they are always sent, as FedAvg needs the same metric keys from every site.
    """

    num_examples: int
    num_labelled: int  # labelled cases used
    num_unlabelled: int  # unlabelled cases used (including labels set aside)
    supervised_loss: float
    consistency_loss: float
    cross_task_loss: float
    certain_fraction: float  # share of pixels under the uncertainty threshold
    seconds: float


# The label term of a profile: both fields or neither.
_LABEL_TERM: Final = ("mean_label_map", "foreground_quantiles")
_POLARITY_TERM: Final = ("foreground_intensities", "shell_intensities")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProfileReply(DpFigures):
    """A site's SeqTran task profile on the wire (core.affinity.profile).

    The image term's quantile function and, for a site with labelled training cases,
    the label term's mean foreground map (flattened, ``label_grid^3`` values) and
    foreground-fraction quantiles; a site without labels sends neither and
    ``label_grid`` 0. With DP (a site policy that requires it) the values are noised
    and ``epsilon_spent`` is this release's ε, ``epsilon_total`` the site's cumulative
    ε after it, both at ``delta``; the four DP fields are 0 for an exact profile.
    The polarity term (docs/methods.md#polarity-term), the foreground and shell
    intensity quantiles, comes only with a label term and only when the run weighs
    it; both fields or neither.
    """

    image_quantiles: tuple[float, ...]
    quantile_clip: float
    label_grid: int
    mean_label_map: tuple[float, ...] | None
    foreground_quantiles: tuple[float, ...] | None
    num_images: int
    num_labelled: int
    foreground_intensities: tuple[float, ...] | None = None
    shell_intensities: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        has_map = self.mean_label_map is not None
        if has_map != (self.foreground_quantiles is not None):
            raise ValueError(
                "payload fields 'mean-label-map' and 'foreground-quantiles' must come "
                "together (a label term) or not at all"
            )
        if has_map != (self.label_grid > 0):
            raise ValueError(
                f"payload field 'label-grid' is {self.label_grid}, which must be > 0 "
                "exactly when a label term is sent"
            )
        has_polarity = self.foreground_intensities is not None
        if has_polarity != (self.shell_intensities is not None):
            raise ValueError(
                "payload fields 'foreground-intensities' and 'shell-intensities' must "
                "come together (a polarity term) or not at all"
            )
        if has_polarity and not has_map:
            raise ValueError(
                "payload fields 'foreground-intensities' and 'shell-intensities' (a "
                "polarity term) come only with a label term"
            )

    def profile_values(
        self, site: str
    ) -> dict[str, str | int | float | list[float] | None]:
        """The values ``SiteProfile.from_dict`` rebuilds and checks the profile from."""
        private = self.private
        return {
            "site": site,
            "image_quantiles": list(self.image_quantiles),
            "quantile_clip": self.quantile_clip,
            "label_grid": self.label_grid or None,
            "mean_label_map": (
                None if self.mean_label_map is None else list(self.mean_label_map)
            ),
            "foreground_quantiles": (
                None
                if self.foreground_quantiles is None
                else list(self.foreground_quantiles)
            ),
            "num_images": self.num_images,
            "num_labelled": self.num_labelled,
            "noise_multiplier": self.noise_multiplier if private else None,
            "delta": self.delta if private else None,
            "epsilon": self.epsilon_spent if private else None,
            "foreground_intensities": (
                None
                if self.foreground_intensities is None
                else list(self.foreground_intensities)
            ),
            "shell_intensities": (
                None if self.shell_intensities is None else list(self.shell_intensities)
            ),
        }

    @classmethod
    def from_profile_values(
        cls, values: Mapping[str, object], *, epsilon_total: float = 0.0
    ) -> ProfileReply:
        """The reply of a profile written by ``SiteProfile.to_dict``.

        Raises:
            ValueError: a value has the wrong type.
        """
        attributes: dict[str, object] = {
            "image_quantiles": values["image_quantiles"],
            "quantile_clip": values["quantile_clip"],
            "label_grid": values["label_grid"] or 0,
            "num_images": values["num_images"],
            "num_labelled": values["num_labelled"],
            "epsilon_spent": values["epsilon"] or 0.0,
            "epsilon_total": epsilon_total,
            "delta": values["delta"] or 0.0,
            "noise_multiplier": values["noise_multiplier"] or 0.0,
        }
        for name in (*_LABEL_TERM, *_POLARITY_TERM):
            if values.get(name) is not None:
                attributes[name] = values[name]
        return cls.from_fields(
            {field_key(cls, name): value for name, value in attributes.items()}
        )

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> Self:
        """Parse a reply's MetricRecord: each optional term's two fields, or neither."""
        for term in (_LABEL_TERM, _POLARITY_TERM):
            keys = [field_key(cls, name) for name in term]
            if any(key in fields for key in keys):
                for key in keys:
                    _payload(fields).get(key)  # "... is missing" names the absent one
        return cls(**record_values(cls, fields))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateRequest:
    """Predictors to score: name -> ``[(model name, weight), ...]`` (a softmax mix).

    ``segment`` names one of them whose segmentations of every image the site writes
    as NIfTI under its own state folder (never sent back); "" writes none. It only
    ever selects a predictor: the folder is the site's choice, so no name the
    coordinator sends becomes a path. ``postprocess`` names the predictors whose
    predictions keep only the largest connected component per class before they
    are scored or written (docs/methods.md#post-processing); each must be a
    predictor, named once.
    """

    predictors: dict[str, list[tuple[str, float]]]
    segment: str = ""
    postprocess: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.segment and self.segment not in self.predictors:
            raise ValueError(
                f"payload field 'segment' names {self.segment!r}, which is not one "
                "of the predictors"
            )
        unknown = [name for name in self.postprocess if name not in self.predictors]
        if unknown:
            raise ValueError(
                f"payload field 'postprocess' names {unknown}, which are not "
                "predictors of the request"
            )
        if len(set(self.postprocess)) != len(self.postprocess):
            raise ValueError(
                f"payload field 'postprocess' names a predictor twice: "
                f"{list(self.postprocess)}"
            )

    def to_fields(self) -> Fields:
        """Flatten for a ConfigRecord (the table travels as one JSON string)."""
        fields: Fields = {"predictors": json.dumps(self.predictors, sort_keys=True)}
        if self.segment:
            fields["segment"] = self.segment
        if self.postprocess:
            fields["postprocess"] = list(self.postprocess)
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> EvaluateRequest:
        """Parse a request's ConfigRecord (``segment``, ``postprocess``: optional)."""
        try:
            table = json.loads(_payload(fields).get_str("predictors"))
            predictors = {
                str(name): [(str(model), float(weight)) for model, weight in members]
                for name, members in table.items()
            }
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(
                f"payload field 'predictors' is malformed: {error}"
            ) from None
        segment = _payload(fields).get_str("segment") if "segment" in fields else ""
        postprocess = (
            tuple(_payload(fields).get_str_list("postprocess"))
            if "postprocess" in fields
            else ()
        )
        return cls(predictors=predictors, segment=segment, postprocess=postprocess)

    def model_names(self) -> list[str]:
        """Every model any predictor uses, sorted."""
        return sorted(
            {model for members in self.predictors.values() for model, _ in members}
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateReply(DpFigures):
    """Aggregate metrics per predictor: mean Dice and HD95 (mm) over the cases."""

    # Sites of an earlier release sent no DP figures with this reply.
    absent_ok: ClassVar[frozenset[str]] = _DP_FIELDS

    num_cases: int
    dice: dict[str, float]  # "dice.<predictor>"
    hd95_mm: dict[str, float] = dataclasses.field(
        metadata=wire("hd95")
    )  # "hd95.<predictor>"
    # Volumes the site wrote for the request's ``segment`` (kept at the site); sites
    # of an earlier release send none.
    segmentations: int = dataclasses.field(default=0, metadata=wire(may_be_absent=True))
    # For each predictor the request named in ``postprocess``: its figures before
    # post-processing ("dice-raw.<predictor>", "hd95-raw.<predictor>"), so the
    # effect can be reported; ``dice``/``hd95`` are then the post-processed ones.
    dice_raw: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata=wire("dice-raw")
    )
    hd95_raw_mm: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata=wire("hd95-raw")
    )


# Every reply's settings may also carry the policy applied at the site, under this
# prefix (``core.privacy.policy.AppliedPolicy.to_fields``), so the coordinator sees what
# bound.
APPLIED_POLICY_PREFIX: Final = "policy."


def applied_policy_key(policy_key: str) -> str:
    """The reply settings key of a ``policy.toml`` key the site applied.

    Example:
        >>> applied_policy_key("dp.budget-epsilon")
        'policy.dp.budget-epsilon'
    """
    return f"{APPLIED_POLICY_PREFIX}{policy_key}"


# Every reply also carries its anchor: the index and hash of the site's own ledger
# entry for it. The settings below hold it (an error reply, which has only a reason,
# carries it at the end of the reason). Neither side digests the anchor: it is added
# after the site's ledger recorded the reply's digest.
LEDGER_ANCHOR_PREFIX: Final = "ledger."
LEDGER_INDEX_FIELD: Final = "ledger.entry-index"
LEDGER_HASH_FIELD: Final = "ledger.entry-hash"
_ANCHORED_REASON: Final = re.compile(
    r"^(?P<reason>.*) \[site ledger entry (?P<index>\d+) (?P<hash>[0-9a-f]{64})\]$",
    re.DOTALL,
)


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerAnchor:
    """Where a reply is recorded in its site's ledger: the entry's index and hash.

    The coordinator keeps the anchor of every reply in its own ledger, so a site's
    ledger that was rewritten (its hashes recomputed) or cut short no longer matches
    what its replies said (``core.privacy.ledger_match``).

    Example:
        >>> anchor = LedgerAnchor(3, "ab" * 32)
        >>> LedgerAnchor.split_reason(anchor.anchor_reason("bad case")) == (
        ...     "bad case", anchor)
        True
        >>> LedgerAnchor.from_settings(anchor.to_fields()) == anchor
        True
    """

    index: int
    entry_hash: str

    def to_fields(self) -> Fields:
        """The reply settings that carry the anchor."""
        return {LEDGER_INDEX_FIELD: self.index, LEDGER_HASH_FIELD: self.entry_hash}

    def to_json(self) -> dict[str, object]:
        """The anchor as a ledger entry records it."""
        return {"index": self.index, "hash": self.entry_hash}

    @classmethod
    def from_settings(cls, settings: Mapping[str, object]) -> LedgerAnchor | None:
        """The anchor in a reply's settings; None when it has none (or a bad one)."""
        index, entry_hash = (
            settings.get(LEDGER_INDEX_FIELD),
            settings.get(LEDGER_HASH_FIELD),
        )
        if (
            is_integer(index)
            and isinstance(entry_hash, str)
            and re.fullmatch(r"[0-9a-f]{64}", entry_hash)
        ):
            return cls(index, entry_hash)
        return None

    def anchor_reason(self, reason: str) -> str:
        """An error reason with this anchor appended."""
        return f"{reason} [site ledger entry {self.index} {self.entry_hash}]"

    @classmethod
    def split_reason(cls, reason: str) -> tuple[str, LedgerAnchor | None]:
        """An error reason without its anchor, and the anchor (None when absent)."""
        matched = _ANCHORED_REASON.match(reason)
        if matched is None:
            return reason, None
        return matched["reason"], cls(int(matched["index"]), matched["hash"])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReplySchema:
    """The records and field names one action's reply may carry, and nothing else.

    The egress guard holds every reply to its action's schema. A name ending in
    ``.*`` stands for the prefix followed by any name (a source, a predictor).
    """

    settings: tuple[str, ...] = ()  # keys of the REPLY_KEY ConfigRecord
    metrics: tuple[str, ...] = ()  # keys of the METRICS_KEY MetricRecord
    weights: bool = False  # whether a WEIGHTS_KEY ArrayRecord may appear
    models: tuple[str, ...] = ()  # names allowed as model.<name> ArrayRecords

    def allows_setting(self, key: str) -> bool:
        """Whether ``key`` may appear in the reply's settings.

        The applied policy (``policy.*``) and the ledger anchor (``ledger.*``) may
        appear in every reply; the egress guard alone writes them.
        """
        return key.startswith(
            (APPLIED_POLICY_PREFIX, LEDGER_ANCHOR_PREFIX)
        ) or _matches(key, self.settings)

    def allows_metric(self, key: str) -> bool:
        """Whether ``key`` may appear in the reply's metrics.

        Example:
            >>> REPLY_SCHEMAS[EVALUATE].allows_metric("dice.tgma")
            True
            >>> REPLY_SCHEMAS[EVALUATE].allows_metric("image.mean")
            False
        """
        return _matches(key, self.metrics)


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(
        key.startswith(pattern[:-1]) and len(key) > len(pattern) - 1
        if pattern.endswith(".*")
        else key == pattern
        for pattern in patterns
    )


# Each schema lists its record type's wire keys (``record_keys``): a key is spelled
# once, where the record declares its field.
REPLY_SCHEMAS: Final[dict[str, ReplySchema]] = {
    HELLO: ReplySchema(settings=record_keys(HelloReply)),
    FINGERPRINT: ReplySchema(metrics=record_keys(FingerprintReply)),
    TRAIN_SOURCE: ReplySchema(metrics=record_keys(TrainReply), weights=True),
    LFTM: ReplySchema(
        settings=LFTM_SETTINGS,
        metrics=(f"{ITM_PREFIX}*", f"{DTM_PREFIX}*", f"{AGREEMENT_PREFIX}*"),
    ),
    ADAPT: ReplySchema(metrics=record_keys(AdaptReply), models=ADAPT_MODELS),
    CONSENSUS: ReplySchema(
        metrics=record_keys(ConsensusReply), models=CONSENSUS_METHODS
    ),
    SEMISUP: ReplySchema(metrics=record_keys(SemisupReply), weights=True),
    PROFILE: ReplySchema(metrics=record_keys(ProfileReply)),
    EVALUATE: ReplySchema(metrics=record_keys(EvaluateReply)),
}
# A fine-tuning step of a transfer path replies as a source training does.
REPLY_SCHEMAS[FINETUNE] = REPLY_SCHEMAS[TRAIN_SOURCE]

# The metric FedAvg weighs a training reply by: its samples seen.
FEDAVG_WEIGHT_KEY: Final = field_key(SemisupReply, "num_examples")
