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
import re
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

Scalar: TypeAlias = bool | int | float | str
FieldValue: TypeAlias = Scalar | list[int] | list[float] | list[str]
Fields: TypeAlias = dict[str, FieldValue]

# Message types (Flower category, then the action name).
HELLO: Final = "query.hello"
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


def _require(
    fields: Mapping[str, object], key: str, kind: type | tuple[type, ...]
) -> object:
    if key not in fields:
        raise ValueError(f"payload field {key!r} is missing")
    value = fields[key]
    numeric = kind is int or (isinstance(kind, tuple) and int in kind)
    if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
        raise ValueError(f"payload field {key!r} has the wrong type: {value!r}")
    return value


def _str(fields: Mapping[str, object], key: str) -> str:
    return str(_require(fields, key, str))


def _int(fields: Mapping[str, object], key: str) -> int:
    value = _require(fields, key, int)
    assert isinstance(value, int)
    return value


def _float(fields: Mapping[str, object], key: str) -> float:
    value = _require(fields, key, (int, float))
    assert isinstance(value, int | float)
    return float(value)


def _float_list(fields: Mapping[str, object], key: str) -> list[float]:
    values = _list(fields, key)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"payload field {key!r} must hold numbers only")
    return [float(v) for v in values]  # type: ignore[arg-type]


def _list(fields: Mapping[str, object], key: str) -> list[object]:
    value = _require(fields, key, list)
    assert isinstance(value, list)
    return value


# The DP figures a reply carries when the site released it under DP (0 without DP):
# epsilon of this release and the site's cumulative epsilon, per slice (the unit
# DP-SGD protects; the accountant's) and per patient (group privacy over the slices a
# case contributes, ``dp.slices-per-case``; nan when the site can't state it), at
# ``dp.delta``, and the noise multiplier. Every reply type that can be a DP release
# carries the same fields.
DP_METRICS: Final = (
    "dp.epsilon-spent",
    "dp.epsilon-total",
    "dp.delta",
    "dp.noise-multiplier",
    "dp.patient-epsilon-spent",
    "dp.patient-epsilon-total",
    "dp.slices-per-case",
)
_DP_ATTRIBUTES: Final = (
    "epsilon_spent",
    "epsilon_total",
    "delta",
    "noise_multiplier",
    "patient_epsilon_spent",
    "patient_epsilon_total",
    "slices_per_case",
)
# Fields a site of an earlier release did not send; they default to 0 when absent.
_DP_OPTIONAL: Final = frozenset(
    {"dp.patient-epsilon-spent", "dp.patient-epsilon-total", "dp.slices-per-case"}
)


def dp_to_fields(reply: object) -> Fields:
    """The DP figures of a reply (its ``epsilon_spent`` ... attributes), flattened."""
    return {
        key: getattr(reply, attribute)
        for key, attribute in zip(DP_METRICS, _DP_ATTRIBUTES, strict=True)
    }


def dp_from_fields(
    fields: Mapping[str, object], *, optional: bool = False
) -> dict[str, Any]:
    """The DP figures of a reply's metrics, as keyword arguments of its dataclass.

    Args:
        fields: the reply's metrics.
        optional: every DP field may be absent (reply types that carried none in
            earlier releases); else only the patient-level ones may.
    """
    parsed: dict[str, Any] = {}
    for key, attribute in zip(DP_METRICS, _DP_ATTRIBUTES, strict=True):
        if key not in fields and (optional or key in _DP_OPTIONAL):
            parsed[attribute] = 0
        elif attribute == "slices_per_case":
            parsed[attribute] = _int(fields, key)
        else:
            parsed[attribute] = _float(fields, key)
    return parsed


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DpFigures:
    """The DP figures of a reply that may be a DP release (all 0 without DP).

    Epsilon of this release and the site's cumulative epsilon after it, per slice (the
    unit DP-SGD protects; what the site's budget caps) and per patient (group privacy
    over ``slices_per_case`` slices of one case; nan when the site can't state it),
    all at ``delta``; and the noise multiplier. Reply types that can be DP releases
    derive from it, so the fields are declared and serialised once
    (:func:`dp_to_fields`, :func:`dp_from_fields`).
    """

    epsilon_spent: float = 0.0
    epsilon_total: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    patient_epsilon_spent: float = 0.0
    patient_epsilon_total: float = 0.0
    slices_per_case: int = 0

    @property
    def private(self) -> bool:
        """Whether the site released this under DP (with Gaussian noise)."""
        return self.noise_multiplier > 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HelloReply:
    """What a site says about itself: counts only, never case names."""

    site: str
    modality: str
    labelled: int
    unlabelled: int
    evaluation: int
    class_names: tuple[str, ...]

    def to_fields(self) -> Fields:
        """Flatten for a ConfigRecord."""
        return {
            "site": self.site,
            "modality": self.modality,
            "labelled": self.labelled,
            "unlabelled": self.unlabelled,
            "evaluation": self.evaluation,
            "class-names": list(self.class_names),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> HelloReply:
        """Parse a reply's ConfigRecord."""
        names = _list(fields, "class-names")
        return cls(
            site=_str(fields, "site"),
            modality=_str(fields, "modality"),
            labelled=_int(fields, "labelled"),
            unlabelled=_int(fields, "unlabelled"),
            evaluation=_int(fields, "evaluation"),
            class_names=tuple(str(name) for name in names),
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

    def to_fields(self) -> Fields:
        """Flatten for a MetricRecord."""
        return {
            "num-examples": self.num_examples,
            "num-cases": self.num_cases,
            "loss": self.loss,
            "seconds": self.seconds,
            **dp_to_fields(self),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> TrainReply:
        """Parse a reply's MetricRecord."""
        return cls(
            num_examples=_int(fields, "num-examples"),
            num_cases=_int(fields, "num-cases"),
            loss=_float(fields, "loss"),
            seconds=_float(fields, "seconds"),
            **dp_from_fields(fields),
        )


# What of the target's LFTM a reply carries (the site policy's ``release.lftm``).
INSTANCE_RELEASE: Final = "instance"  # ITM: one score per target case and source
DOMAIN_RELEASE: Final = "domain"  # DTM only: one mean per source


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LftmReply:
    """The target's transferability scores: ITM columns, or only the DTM.

    ``instance`` release carries per-case columns (rows in an order fixed at the site
    but never named, so no case identity leaves); ``domain`` release carries one mean
    per source and ``itm_columns`` is None.
    """

    metric: str
    sources: tuple[str, ...]
    release: str
    itm_columns: dict[str, list[float]] | None  # source -> one score per case
    dtm: dict[str, float]  # source -> mean over the target's cases

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
        )

    def to_fields(self) -> tuple[Fields, Fields]:
        """Flatten to (ConfigRecord fields, MetricRecord fields)."""
        settings: Fields = {
            "metric": self.metric,
            "sources": list(self.sources),
            "release": self.release,
        }
        metrics: Fields
        if self.itm_columns is not None:
            metrics = {
                f"itm.{name}": list(self.itm_columns[name]) for name in self.sources
            }
        else:
            metrics = {f"dtm.{name}": self.dtm[name] for name in self.sources}
        return settings, metrics

    @classmethod
    def from_fields(
        cls, settings: Mapping[str, object], metrics: Mapping[str, object]
    ) -> LftmReply:
        """Parse a reply's ConfigRecord and MetricRecord."""
        sources = tuple(str(name) for name in _list(settings, "sources"))
        release = _str(settings, "release")
        metric = _str(settings, "metric")
        if release == DOMAIN_RELEASE:
            dtm = {name: _float(metrics, f"dtm.{name}") for name in sources}
            return cls(
                metric=metric,
                sources=sources,
                release=release,
                itm_columns=None,
                dtm=dtm,
            )
        columns = {name: _float_list(metrics, f"itm.{name}") for name in sources}
        lengths = {len(column) for column in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"ITM columns differ in length: {sorted(lengths)}")
        return cls.from_itm(metric, sources, columns, release=release)

    def itm_rows(self) -> tuple[tuple[float, ...], ...] | None:
        """ITM as rows (cases) by columns (``sources`` order); None for domain."""
        if self.itm_columns is None:
            return None
        columns = [self.itm_columns[name] for name in self.sources]
        return tuple(tuple(row) for row in zip(*columns, strict=True))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdaptRequest:
    """Which candidates form the pair and with which fixed weights."""

    main: str
    aux: str  # "" when there is no auxiliary source
    weight_main: float
    weight_aux: float

    def to_fields(self) -> Fields:
        """Flatten for a ConfigRecord."""
        return {
            "main": self.main,
            "aux": self.aux,
            "weight-main": self.weight_main,
            "weight-aux": self.weight_aux,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> AdaptRequest:
        """Parse a request's ConfigRecord."""
        return cls(
            main=_str(fields, "main"),
            aux=_str(fields, "aux"),
            weight_main=_float(fields, "weight-main"),
            weight_aux=_float(fields, "weight-aux"),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdaptReply(DpFigures):
    """How adaptation went; adapted ``model.main``/``model.aux`` travel beside it."""

    num_examples: int  # target slices seen over all epochs
    # fraction of target pixels pseudo-labelled foreground (nan: withheld under DP)
    pseudo_label_foreground: float
    seconds: float

    def to_fields(self) -> Fields:
        """Flatten for a MetricRecord."""
        return {
            "num-examples": self.num_examples,
            "pseudo-label-foreground": self.pseudo_label_foreground,
            "seconds": self.seconds,
            **dp_to_fields(self),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> AdaptReply:
        """Parse a reply's MetricRecord."""
        return cls(
            num_examples=_int(fields, "num-examples"),
            pseudo_label_foreground=_float(fields, "pseudo-label-foreground"),
            seconds=_float(fields, "seconds"),
            **dp_from_fields(fields, optional=True),
        )


# What a consensus is built from and what a model is trained on, in the reply's
# ``label-dice.*`` and ``model.<method>`` names: TGMA's ITM-weighted pseudo-labels and
# the three fusions of the noisy labels.
CONSENSUS_METHODS: Final = ("itm", "majority", "staple", "deepstaple")
# A consensus reply names the k-th atlas at the site (case-id order) "atlas-<k>",
# never by its case name.
ATLAS_SOURCE_PREFIX: Final = "atlas-"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusRequest:
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

    def to_fields(self) -> Fields:
        """Flatten for a ConfigRecord."""
        return {"label-sources": list(self.label_sources), "start": self.start}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> ConsensusRequest:
        """Parse a request's ConfigRecord."""
        sources = _list(fields, "label-sources")
        if not all(isinstance(name, str) for name in sources):
            raise ValueError("payload field 'label-sources' must hold names only")
        return cls(
            label_sources=tuple(str(name) for name in sources),
            start=_str(fields, "start"),
        )


def _prefixed(fields: Mapping[str, object], prefix: str) -> dict[str, float]:
    return {
        key[len(prefix) :]: _float(fields, key)
        for key in fields
        if key.startswith(prefix)
    }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusReply:
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
    data_parameter: dict[str, float]
    staple_sensitivity: dict[str, float]
    agreement: dict[str, float]
    label_dice: dict[str, float]
    spearman_dp: float
    spearman_staple: float

    def to_fields(self) -> Fields:
        """Flatten for a MetricRecord."""
        fields: Fields = {
            "num-images": self.num_images,
            "num-labels": self.num_labels,
            "num-atlases": self.num_atlases,
            "seconds": self.seconds,
            "spearman-dp": self.spearman_dp,
            "spearman-staple": self.spearman_staple,
        }
        for prefix, values in (
            ("data-parameter.", self.data_parameter),
            ("staple-sensitivity.", self.staple_sensitivity),
            ("agreement.", self.agreement),
            ("label-dice.", self.label_dice),
        ):
            fields.update({f"{prefix}{name}": value for name, value in values.items()})
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> ConsensusReply:
        """Parse a reply's MetricRecord."""
        return cls(
            num_images=_int(fields, "num-images"),
            num_labels=_int(fields, "num-labels"),
            num_atlases=_int(fields, "num-atlases"),
            seconds=_float(fields, "seconds"),
            data_parameter=_prefixed(fields, "data-parameter."),
            staple_sensitivity=_prefixed(fields, "staple-sensitivity."),
            agreement=_prefixed(fields, "agreement."),
            label_dice=_prefixed(fields, "label-dice."),
            spearman_dp=_float(fields, "spearman-dp"),
            spearman_staple=_float(fields, "spearman-staple"),
        )


# Which schedule a train.semisup message belongs to: the refinement at the target, or
# the federated rounds. Each keeps its own teacher in the site's node state.
SEMISUP_SCOPES: Final = ("target", "federated")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupRequest:
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

    def to_fields(self) -> Fields:
        """Flatten for a ConfigRecord."""
        return {
            "scope": self.scope,
            "round": self.round,
            "rounds": self.rounds,
            "iterations": self.iterations,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> SemisupRequest:
        """Parse a request's ConfigRecord."""
        return cls(
            scope=_str(fields, "scope"),
            round=_int(fields, "round"),
            rounds=_int(fields, "rounds"),
            iterations=_int(fields, "iterations"),
        )


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

    def to_fields(self) -> Fields:
        """Flatten for a MetricRecord."""
        return {
            "num-examples": self.num_examples,
            "num-labelled": self.num_labelled,
            "num-unlabelled": self.num_unlabelled,
            "supervised-loss": self.supervised_loss,
            "consistency-loss": self.consistency_loss,
            "cross-task-loss": self.cross_task_loss,
            "certain-fraction": self.certain_fraction,
            "seconds": self.seconds,
            **dp_to_fields(self),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> SemisupReply:
        """Parse a reply's MetricRecord."""
        return cls(
            num_examples=_int(fields, "num-examples"),
            num_labelled=_int(fields, "num-labelled"),
            num_unlabelled=_int(fields, "num-unlabelled"),
            supervised_loss=_float(fields, "supervised-loss"),
            consistency_loss=_float(fields, "consistency-loss"),
            cross_task_loss=_float(fields, "cross-task-loss"),
            certain_fraction=_float(fields, "certain-fraction"),
            seconds=_float(fields, "seconds"),
            **dp_from_fields(fields),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProfileReply(DpFigures):
    """A site's SeqTran task profile (``core.task_profile.SiteProfile``) on the wire.

    The image term's quantile function and, for a site with labelled training cases,
    the label term's mean foreground map (flattened, ``label_grid^3`` values) and
    foreground-fraction quantiles; a site without labels sends neither and
    ``label_grid`` 0. With DP (a site policy that requires it) the values are noised
    and ``epsilon_spent`` is this release's ε, ``epsilon_total`` the site's cumulative
    ε after it, both at ``delta``; the four DP fields are 0 for an exact profile.
    """

    image_quantiles: tuple[float, ...]
    quantile_clip: float
    label_grid: int
    mean_label_map: tuple[float, ...] | None
    foreground_quantiles: tuple[float, ...] | None
    num_images: int
    num_labelled: int

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
        }

    @classmethod
    def from_profile_values(
        cls, values: Mapping[str, object], *, epsilon_total: float = 0.0
    ) -> ProfileReply:
        """The reply of a profile written by ``SiteProfile.to_dict``.

        Raises:
            ValueError: a value has the wrong type.
        """
        fields: dict[str, object] = {
            "image-quantiles": values["image_quantiles"],
            "quantile-clip": values["quantile_clip"],
            "label-grid": values["label_grid"] or 0,
            "num-images": values["num_images"],
            "num-labelled": values["num_labelled"],
            "dp.epsilon-spent": values["epsilon"] or 0.0,
            "dp.epsilon-total": epsilon_total,
            "dp.delta": values["delta"] or 0.0,
            "dp.noise-multiplier": values["noise_multiplier"] or 0.0,
        }
        for key in ("mean_label_map", "foreground_quantiles"):
            if values[key] is not None:
                fields[key.replace("_", "-")] = values[key]
        return cls.from_fields(fields)

    def to_fields(self) -> Fields:
        """Flatten for a MetricRecord (the label term only when there is one)."""
        fields: Fields = {
            "image-quantiles": list(self.image_quantiles),
            "quantile-clip": self.quantile_clip,
            "label-grid": self.label_grid,
            "num-images": self.num_images,
            "num-labelled": self.num_labelled,
            **dp_to_fields(self),
        }
        if self.mean_label_map is not None and self.foreground_quantiles is not None:
            fields["mean-label-map"] = list(self.mean_label_map)
            fields["foreground-quantiles"] = list(self.foreground_quantiles)
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> ProfileReply:
        """Parse a reply's MetricRecord."""
        with_labels = "mean-label-map" in fields or "foreground-quantiles" in fields
        return cls(
            image_quantiles=tuple(_float_list(fields, "image-quantiles")),
            quantile_clip=_float(fields, "quantile-clip"),
            label_grid=_int(fields, "label-grid"),
            mean_label_map=(
                tuple(_float_list(fields, "mean-label-map")) if with_labels else None
            ),
            foreground_quantiles=(
                tuple(_float_list(fields, "foreground-quantiles"))
                if with_labels
                else None
            ),
            num_images=_int(fields, "num-images"),
            num_labelled=_int(fields, "num-labelled"),
            **dp_from_fields(fields),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateRequest:
    """Predictors to score: name -> ``[(model name, weight), ...]`` (a softmax mix)."""

    predictors: dict[str, list[tuple[str, float]]]

    def to_fields(self) -> Fields:
        """Flatten for a ConfigRecord (the table travels as one JSON string)."""
        return {"predictors": json.dumps(self.predictors, sort_keys=True)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> EvaluateRequest:
        """Parse a request's ConfigRecord."""
        try:
            table = json.loads(_str(fields, "predictors"))
            predictors = {
                str(name): [(str(model), float(weight)) for model, weight in members]
                for name, members in table.items()
            }
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(
                f"payload field 'predictors' is malformed: {error}"
            ) from None
        return cls(predictors=predictors)

    def model_names(self) -> list[str]:
        """Every model any predictor uses, sorted."""
        return sorted(
            {model for members in self.predictors.values() for model, _ in members}
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateReply(DpFigures):
    """Aggregate metrics per predictor: mean Dice and HD95 (mm) over the cases."""

    num_cases: int
    dice: dict[str, float]
    hd95_mm: dict[str, float]

    def to_fields(self) -> Fields:
        """Flatten for a MetricRecord."""
        fields: Fields = {"num-cases": self.num_cases, **dp_to_fields(self)}
        fields.update({f"dice.{name}": value for name, value in self.dice.items()})
        fields.update({f"hd95.{name}": value for name, value in self.hd95_mm.items()})
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> EvaluateReply:
        """Parse a reply's MetricRecord."""
        dice = {
            key[5:]: _float(fields, key) for key in fields if key.startswith("dice.")
        }
        hd95 = {
            key[5:]: _float(fields, key) for key in fields if key.startswith("hd95.")
        }
        return cls(
            num_cases=_int(fields, "num-cases"),
            dice=dice,
            hd95_mm=hd95,
            **dp_from_fields(fields, optional=True),
        )


# Every reply's settings may also carry the policy applied at the site, under this
# prefix (``core.policy.AppliedPolicy.to_fields``), so the coordinator sees what bound.
APPLIED_POLICY_PREFIX: Final = "policy."

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
    what its replies said (``core.ledger_match``).

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
            isinstance(index, int)
            and not isinstance(index, bool)
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


REPLY_SCHEMAS: Final[dict[str, ReplySchema]] = {
    HELLO: ReplySchema(
        settings=(
            "site",
            "modality",
            "labelled",
            "unlabelled",
            "evaluation",
            "class-names",
        )
    ),
    TRAIN_SOURCE: ReplySchema(
        metrics=("num-examples", "num-cases", "loss", "seconds", *DP_METRICS),
        weights=True,
    ),
    LFTM: ReplySchema(
        settings=("metric", "sources", "release"), metrics=("itm.*", "dtm.*")
    ),
    ADAPT: ReplySchema(
        metrics=("num-examples", "pseudo-label-foreground", "seconds", *DP_METRICS),
        models=("main", "aux"),
    ),
    CONSENSUS: ReplySchema(
        metrics=(
            "num-images",
            "num-labels",
            "num-atlases",
            "seconds",
            "spearman-dp",
            "spearman-staple",
            "data-parameter.*",
            "staple-sensitivity.*",
            "agreement.*",
            "label-dice.*",
        ),
        models=CONSENSUS_METHODS,
    ),
    SEMISUP: ReplySchema(
        metrics=(
            "num-examples",
            "num-labelled",
            "num-unlabelled",
            "supervised-loss",
            "consistency-loss",
            "cross-task-loss",
            "certain-fraction",
            "seconds",
            *DP_METRICS,
        ),
        weights=True,
    ),
    PROFILE: ReplySchema(
        metrics=(
            "image-quantiles",
            "quantile-clip",
            "label-grid",
            "mean-label-map",
            "foreground-quantiles",
            "num-images",
            "num-labelled",
            *DP_METRICS,
        )
    ),
    EVALUATE: ReplySchema(metrics=("num-cases", "dice.*", "hd95.*", *DP_METRICS)),
}
# A fine-tuning step of a transfer path replies as a source training does.
REPLY_SCHEMAS[FINETUNE] = REPLY_SCHEMAS[TRAIN_SOURCE]
