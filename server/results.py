"""The phases' results as typed records: what each phase persists and the report reads.

Each phase returns (and saves in the run store, ``phases/<phase>.json``) one frozen
record below; the runner reloads it on resume and the report reads it by attribute.
The JSON form is written and read once, generically, over the records' fields
(:meth:`Record.to_document`, :meth:`Record.from_document`): nested records become
objects, tuples lists, and a field marked :data:`FLATTEN` (a mapping whose keys are
dynamic, such as a site's reply figures keyed by their wire keys) is spread over the
record's own object and collects, when read, every key no other field claims. A
document that does not fit its record is refused with the file and the key named.

Reply figures that came over the wire stay mappings of wire fields (their keys are
spelled in :mod:`core.protocol`, and :mod:`core.protocol`'s reply records read them);
everything the coordinator itself decided is a typed field.

Every model and predictor a result names carries its :class:`LabelUse`: which of the
target's labels it was made with, derived by the phase from what happened (a
fine-tuning step at the target, the consensus's atlases, a semi-supervised round
with the target's labelled cases, the candidates an adaptation mixed). The report
groups predictors by it: label-free and few-label are never mixed
(docs/methods.md#label-free-and-few-label). A result file from before label
provenance is refused, naming the key, rather than read as label-free.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Final, TypeVar

from core import protocol

# In an affinity result's profile figures: whether the profile carried the label term
# (its other keys are the profile reply's wire keys).
PROFILE_LABEL_TERM: Final = "label-term"
# Field metadata: the field's mapping is spread over the record's own JSON object.
FLATTEN: Final = {"flatten": True}
# Field metadata: the field is left out of the JSON object while it holds its default.
OMIT_DEFAULT: Final = {"omit_default": True}
# Field metadata: the field came with label provenance; a file without it was written
# before, and is refused (its predictors cannot be told label-free or few-label).
SINCE_LABEL_USE: Final = {"since": "label provenance"}
# The report's predictor groups (docs/methods.md#label-free-and-few-label).
LABEL_FREE: Final = "label-free"
FEW_LABEL: Final = "few-label"

RecordT = TypeVar("RecordT", bound="Record")


class ResultError(ValueError):
    """A persisted phase result does not fit its record (names the file and key)."""


class Record:
    """Mixin of the dataclasses the generic JSON codec (de)serialises."""

    __slots__ = ()

    def to_document(self) -> dict[str, Any]:
        """The record as a JSON-ready mapping (NaN stays NaN: the store nulls it)."""
        document: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if field.metadata.get("omit_default") and value == _default(field):
                continue
            if field.metadata.get("flatten"):
                document.update({key: _encode(item) for key, item in value.items()})
            else:
                document[field.name] = _encode(value)
        return document

    @classmethod
    def from_document(
        cls: type[RecordT], document: Mapping[str, Any], *, where: str = ""
    ) -> RecordT:
        """The record read back from :meth:`to_document`'s form.

        Raises:
            ResultError: a field is missing or of the wrong type (naming ``where``
                and the key).
        """
        return _decode_record(cls, document, where or cls.__name__)


def _default(field: dataclasses.Field[Any]) -> Any:
    """A field's default value (its factory's product), or MISSING."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_document()
    if isinstance(value, Mapping):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    return value


def _decode_record(
    cls: type[RecordT], document: Mapping[str, Any], where: str
) -> RecordT:
    if not isinstance(document, Mapping):
        raise ResultError(f"{where}: expected an object, got {document!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    claimed = {field.name for field in fields if not field.metadata.get("flatten")}
    values: dict[str, Any] = {}
    for field in fields:
        if field.metadata.get("flatten"):
            values[field.name] = {
                key: value for key, value in document.items() if key not in claimed
            }
        elif field.name in document:
            values[field.name] = _decode(
                hints[field.name], document[field.name], f"{where}: {field.name}"
            )
        elif field.metadata.get("since"):
            raise ResultError(
                f"{where}: missing key {field.name!r}: the file was written by a "
                f"SiteBridge from before {field.metadata['since']}, so it cannot say "
                "which models used the target's labels; start a new run"
            )
        elif (
            field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        ):
            raise ResultError(f"{where}: missing key {field.name!r}")
    return cls(**values)


def _decode(kind: Any, value: Any, where: str) -> Any:
    """``value`` read as ``kind`` (a type hint), or ResultError naming ``where``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _decode(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ResultError(f"{where}: expected a list, got {value!r}")
        return tuple(
            _decode(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ResultError(f"{where}: expected an object, got {value!r}")
        return {
            str(key): _decode(args[1], item, f"{where}.{key}")
            for key, item in value.items()
        }
    if isinstance(kind, type) and issubclass(kind, Record):
        return _decode_record(kind, value, where)
    if kind is float:
        if value is None:  # a non-finite figure, nulled when it was written
            return math.nan
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: no JSON form for {kind!r}")
    raise ResultError(f"{where}: expected {kind.__name__}, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LabelUse(Record):
    """Which of the target's labels a model or predictor was made with.

    ``via`` says, one line each, what used them ("SeqTran candidate fine-tuned at A
    on 2 labelled cases"); empty means label-free. ``cases`` is the most labelled
    target training cases one of those uses stood on, ``atlases`` how many of the
    target's atlases had their labels registered (atlas labels are target labels).

    Example:
        >>> LabelUse().group
        'label-free'
        >>> fine_tuned = LabelUse(via=("fine-tuned at A on 2 labelled cases",), cases=2)
        >>> LabelUse.joined([LabelUse(), fine_tuned, fine_tuned]) == fine_tuned
        True
        >>> fine_tuned.group
        'few-label'
    """

    via: tuple[str, ...] = ()
    cases: int = 0
    atlases: int = 0

    @property
    def label_free(self) -> bool:
        """Whether no target label went into it."""
        return not self.via

    @property
    def group(self) -> str:
        """:data:`LABEL_FREE` or :data:`FEW_LABEL`, the report's group."""
        return LABEL_FREE if self.label_free else FEW_LABEL

    @classmethod
    def joined(cls, uses: Iterable[LabelUse]) -> LabelUse:
        """What a model made from all of ``uses`` used: every use, each once."""
        listed = list(uses)
        via = tuple(dict.fromkeys(line for use in listed for line in use.via))
        return cls(
            via=via,
            cases=max((use.cases for use in listed), default=0),
            atlases=max((use.atlases for use in listed), default=0),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PhaseResult(Record):
    """A finished phase's result; ``PHASE`` is its name in the run store."""

    PHASE: ClassVar[str] = ""


# --------------------------------------------------------------------- discover


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveredSite(Record):
    """A site that said hello: its name, its node and its hello reply's fields."""

    name: str
    node_id: int
    hello: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=FLATTEN)

    @property
    def reply(self) -> protocol.HelloReply:
        """The hello reply (counts, modality, class names) as its wire record."""
        return protocol.HelloReply.from_fields(self.hello)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DiscoverResult(PhaseResult):
    """Who answered, under which names, which is the target, who did not answer."""

    PHASE: ClassVar[str] = "discover"
    sites: tuple[DiscoveredSite, ...]
    target: str
    missing: dict[str, str]  # node id -> why it did not say hello


# ------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PlanResult(PhaseResult):
    """The sites' fingerprints and the resolution plan derived from them.

    ``fingerprints``: site -> its fingerprint reply's wire fields
    (protocol.FingerprintReply); ``plan``: the plan's document (``plan.json``,
    core.planning.rules.ResolutionPlan), empty when no site released a fingerprint;
    ``applied``: the values the run took (``image-size``, ``batch-size``,
    ``ct-window``), from the plan where the run config left them to it.
    """

    PHASE: ClassVar[str] = "plan"
    fingerprints: dict[str, dict[str, Any]]
    plan: dict[str, Any]
    applied: dict[str, Any]
    missing: dict[str, str]  # site -> why it released no fingerprint


# -------------------------------------------------------------- source training


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SourceTrainingResult(PhaseResult):
    """Each source's training reply figures (protocol.TrainReply's wire fields)."""

    PHASE: ClassVar[str] = "source-training"
    training: dict[str, dict[str, Any]]
    missing: dict[str, str]  # source -> why no model arrived

    def postprocess(self) -> dict[str, bool]:
        """Per source, whether it decided its model keeps the largest component.

        From each reply's ``postprocess.largest-component`` (read alone: a figure
        the store wrote as null must not make the decision unreadable); a source
        that sent none (a site of an earlier release) decided off.
        """
        key = protocol.field_key(protocol.TrainReply, "largest_component")
        return {name: fields.get(key) == 1 for name, fields in self.training.items()}


# --------------------------------------------------------------------- affinity


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TransferPathRecord(Record):
    """The chosen SeqTran path: its sites in order and what it costs."""

    nodes: tuple[str, ...]
    cost: float
    path_length: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AffinityResult(PhaseResult):
    """SeqTran: the profiles' figures, the matrices, the path and its fine-tuning.

    ``matrices`` holds what :func:`server.phases.affinity.choose_affinity_path`
    computed (affinity and distance matrices, the source graph), spread over the
    record's object; ``steps`` each fine-tuning step's reply figures and site;
    ``label_use`` what the transferred model used of the target's labels.
    """

    PHASE: ClassVar[str] = "affinity"
    target: str
    profiles: dict[str, dict[str, Any]]
    missing: dict[str, str]
    path: TransferPathRecord | None = None
    steps: tuple[dict[str, Any], ...] = ()
    model: str | None = None
    # What the transferred model used of the target's labels (label-free without one).
    label_use: LabelUse = dataclasses.field(metadata=SINCE_LABEL_USE)
    stopped: str | None = None
    matrices: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=FLATTEN)


# -------------------------------------------------------------- transferability


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PairWeights(Record):
    """TGMA's weights of the main and auxiliary models."""

    main: float
    aux: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PairSelection(Record):
    """One TGMA choice: the candidates it chose among, main, aux and their weights.

    ``voters`` (all of ``candidates`` under the paper's rule, the main and those
    agreeing with it under the agreement rule) are the models whose ITM mixes the
    adaptation's pseudo-labels; ``label_use`` is the candidates', joined.
    """

    candidates: tuple[str, ...]
    main: str
    aux: str | None
    weights: PairWeights
    label_use: LabelUse
    voters: tuple[str, ...] = ()  # empty: every candidate votes (the paper's rule)

    @property
    def voting(self) -> tuple[str, ...]:
        """The candidates whose ITM mixes the pseudo-labels (sent to adaptation)."""
        return self.voters or self.candidates


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TransferabilityResult(PhaseResult):
    """The target's LFTM scores and the main/auxiliary choices.

    ``itm`` is None when the target released the DTM only (``release.lftm``).
    ``candidates`` holds each scored candidate's label use. ``label_free`` is TGMA
    among the candidates that never saw a target label; ``few_label`` the choice
    among all of them, when some did (None otherwise). ``selection`` is the rule that
    chose (``transfer.selection``); ``agreement`` (rows in ``sources`` order) is None
    from a site that sent none.
    """

    PHASE: ClassVar[str] = "transferability"
    metric: str
    release: str
    sources: tuple[str, ...]
    itm: tuple[tuple[float, ...], ...] | None
    dtm: dict[str, float]
    candidates: dict[str, LabelUse] = dataclasses.field(metadata=SINCE_LABEL_USE)
    label_free: PairSelection = dataclasses.field(metadata=SINCE_LABEL_USE)
    few_label: PairSelection | None = dataclasses.field(metadata=SINCE_LABEL_USE)
    selection: str = "dtm"
    agreement: tuple[tuple[float, ...], ...] | None = None

    @property
    def selections(self) -> tuple[PairSelection, ...]:
        """The label-free choice, then the few-label one if there is one."""
        return (self.label_free,) + (
            () if self.few_label is None else (self.few_label,)
        )


# ------------------------------------------------------------------- adaptation


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdaptedPair(Record):
    """One adaptation at the target: its adapted models and reply figures.

    The models are ``<prefix>:<name>`` in the evaluation and ``<prefix>-<name>`` in
    the run store, for each name in ``models`` (``main``, ``aux``).
    """

    prefix: str
    models: tuple[str, ...]
    label_use: LabelUse
    reply: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=FLATTEN)

    def evaluation_names(self) -> dict[str, str]:
        """Each adapted model's name in the run store -> its name in the evaluation.

        Example:
            >>> AdaptedPair(prefix="adapted", models=("aux", "main"),
            ...             label_use=LabelUse()).evaluation_names()
            {'adapted-aux': 'adapted:aux', 'adapted-main': 'adapted:main'}
        """
        return {
            f"{self.prefix}-{name}": f"{self.prefix}:{name}" for name in self.models
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdaptationResult(PhaseResult):
    """The target's adaptations: the label-free pair, and the few-label one if any."""

    PHASE: ClassVar[str] = "adaptation"
    site: str
    label_free: AdaptedPair = dataclasses.field(metadata=SINCE_LABEL_USE)
    few_label: AdaptedPair | None = dataclasses.field(metadata=SINCE_LABEL_USE)

    @property
    def pairs(self) -> tuple[AdaptedPair, ...]:
        """The label-free adaptation, then the few-label one if there is one."""
        return (self.label_free,) + (
            () if self.few_label is None else (self.few_label,)
        )


# -------------------------------------------------------------------- consensus


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusResult(PhaseResult):
    """The consensus models' names and the target's figures, or why it was skipped.

    ``outcome`` holds the consensus reply's figures (data parameters, STAPLE
    sensitivities, label Dice, Spearman correlations), spread over the object.
    """

    PHASE: ClassVar[str] = "consensus"
    models: tuple[str, ...]
    # What the consensus models used of the target's labels (label sources, start
    # model, atlases); label-free when skipped.
    label_use: LabelUse = dataclasses.field(metadata=SINCE_LABEL_USE)
    skipped: str | None = dataclasses.field(default=None, metadata=OMIT_DEFAULT)
    sources: tuple[str, ...] = dataclasses.field(default=(), metadata=OMIT_DEFAULT)
    outcome: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=FLATTEN)


# ---------------------------------------------------------------------- semisup


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupRound(Record):
    """One federated round: the averaged student's Dice per site, who missed it."""

    round: int
    dice: dict[str, float]
    missing: dict[str, str]
    train: dict[str, dict[str, Any]]  # site -> its semisup reply figures


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FederatedSemisup(Record):
    """The federated rounds: participants, rounds (round 0 scores the start)."""

    sites: tuple[str, ...]
    rounds: tuple[SemisupRound, ...]
    stopped: str | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TargetSemisup(Record):
    """The target's refinement: its reply figures, or why it is missing."""

    site: str
    missing: str | None = dataclasses.field(default=None, metadata=OMIT_DEFAULT)
    reply: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=FLATTEN)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupResult(PhaseResult):
    """UG-MCL at the target and as federated rounds; the models by scope."""

    PHASE: ClassVar[str] = "semisup"
    variant: str
    labelled_fraction: float
    start: str
    target: TargetSemisup | None
    federated: FederatedSemisup | None
    models: tuple[str, ...]
    # Scope -> what that model used of the target's labels.
    label_use: dict[str, LabelUse] = dataclasses.field(metadata=SINCE_LABEL_USE)


# ------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationResult(PhaseResult):
    """Mean Dice and HD95 per predictor on the target's evaluation cases.

    Under the target's DP the Dice are noised and HD95 withheld (nan); ``privacy``
    holds the release's DP figures (:data:`core.protocol.DP_METRICS`).
    ``label_use`` says, per predictor, what it used of the target's labels (its
    models' uses joined): the report's groups. ``segmented`` is the predictor whose
    segmentation of every target image the target wrote under its state folder
    (``segmentations`` volumes; "" and 0: none asked or none written).
    """

    PHASE: ClassVar[str] = "evaluation"
    site: str
    num_cases: int
    dice: dict[str, float]
    hd95_mm: dict[str, float]
    label_use: dict[str, LabelUse] = dataclasses.field(metadata=SINCE_LABEL_USE)
    privacy: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=FLATTEN)
    # The predictor whose segmentations the target wrote at home, and how many.
    segmented: str = dataclasses.field(default="", metadata=OMIT_DEFAULT)
    segmentations: int = dataclasses.field(default=0, metadata=OMIT_DEFAULT)
    # The Flower run id they were written under: ``segmentations/run-<id>/``.
    segmentations_run: int = dataclasses.field(default=0, metadata=OMIT_DEFAULT)
    # The predictors the target post-processed (the largest connected component per
    # class, docs/methods.md#post-processing), whose ``dice``/``hd95_mm`` are
    # post-processed, and their figures before it.
    postprocessed: tuple[str, ...] = dataclasses.field(
        default=(), metadata=OMIT_DEFAULT
    )
    dice_raw: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata=OMIT_DEFAULT
    )
    hd95_raw_mm: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata=OMIT_DEFAULT
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RunResults:
    """Every phase's result of one run; None for a phase that has not finished."""

    discover: DiscoverResult | None = None
    plan: PlanResult | None = None
    source_training: SourceTrainingResult | None = None
    affinity: AffinityResult | None = None
    transferability: TransferabilityResult | None = None
    adaptation: AdaptationResult | None = None
    consensus: ConsensusResult | None = None
    semisup: SemisupResult | None = None
    evaluation: EvaluationResult | None = None
