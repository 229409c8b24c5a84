"""A site's query limits: how much a coordinator may ask of it, per request, in total.

The egress guard decides *what* may leave a site; these limits decide *how much*. Every
channel a site policy allows (Dice per predictor, a score per candidate, a consensus
figure per label source, a profile) is a function of the site's data that the
coordinator parametrises, and an unlimited number of such values, at full precision,
rebuilds a label map. So a site caps, in the ``[limits]`` table of its ``policy.toml``
(:class:`SiteLimits`):

- the number of models, predictors and label sources of one request, and per run
  (and of task profiles per run: each is another view of the same cases);
- the mixtures a predictor may be (non-negative weights summing to 1 over a few
  models: the rule of :func:`check_request`, not a setting);
- a cumulative query budget over every run, persisted beside the privacy accountant
  (:func:`charge_queries`);
- the fewest cases any released aggregate may stand on (:func:`check_cases`);
- the precision of released metrics (:func:`round_metric_fields`);
- every size the run config chooses (:func:`check_run_sizes`), and the wall time of one
  request.

Pure: stdlib and :mod:`core.config` only; the Flower mod that applies these is
``clients/guard.py``. Never imports flwr, torch or numpy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from core.coerce import as_float, as_int
from core.config import RunConfig
from core.protocol import DP_KEY_PREFIX
from core.storage import hold_exclusive_lock, write_atomically

QUERIES_FILE: Final = "queries.json"
# A predictor's mixture weights must sum to 1 within this (floating-point) tolerance.
WEIGHT_SUM_TOLERANCE: Final = 1e-6

# Kinds of query units, as counted per run and against the cumulative budget.
PREDICTORS: Final = "predictors"  # evaluate: one Dice (and HD95) per predictor
CANDIDATES: Final = "candidates"  # query.lftm: one score per candidate model
LABEL_SOURCES: Final = "label-sources"  # train.consensus: figures per label source
PROFILES: Final = "profiles"  # query.profile: one task profile
FINGERPRINTS: Final = "fingerprints"  # query.fingerprint: one site fingerprint
QUERY_KINDS: Final = (PREDICTORS, CANDIDATES, LABEL_SOURCES, PROFILES, FINGERPRINTS)


class LimitError(ValueError):
    """A request that a site limit refuses; the message names the ``limits.*`` key."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteLimits:
    """The ``[limits]`` table of a site policy (owned by the site).

    Every field is a cap a coordinator cannot raise; ``0`` means "no cap" only where
    the field says so. The defaults (:func:`default_limits`) let the demo and the
    benchmarks run unchanged while refusing the attacks the adversarial tests make.
    """

    max_models_per_request: int
    max_predictors_per_request: int
    max_models_per_predictor: int
    max_label_sources_per_request: int
    max_candidates_per_run: int
    max_predictors_per_run: int
    max_label_sources_per_run: int
    max_profiles_per_run: int
    max_fingerprints_per_run: int
    query_budget: int  # query units over every run (0 = none)
    min_cases: int
    metric_decimals: int
    max_image_size: int
    max_profile_image_size: int
    max_label_grid: int
    max_quantiles: int
    max_channels: int
    max_levels: int
    max_epochs: int
    max_iterations: int
    max_passes: int
    max_batch_size: int
    max_slices_per_case: int  # 0 = every slice of a case may be used
    max_request_seconds: float  # 0 = no wall-clock cap

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            key = limit_key(field.name)
            may_be_zero = field.name in _ZERO_MEANS_NONE
            if isinstance(value, float):
                valid = math.isfinite(value) and value >= 0
            else:
                valid = value >= (0 if may_be_zero else 1)
            if not valid:
                rule = ">= 0 (0 = no cap)" if may_be_zero else ">= 1"
                raise ValueError(f"{key} must be {rule}, got {value!r}")
        if self.metric_decimals > 15:
            raise ValueError(
                f"limits.metric-decimals must be <= 15, got {self.metric_decimals}"
            )


_ZERO_MEANS_NONE: Final = frozenset(
    {"query_budget", "max_slices_per_case", "max_request_seconds", "metric_decimals"}
)


def limit_key(field_name: str) -> str:
    """The ``policy.toml`` key of a :class:`SiteLimits` field.

    Example:
        >>> limit_key("max_models_per_request")
        'limits.max-models-per-request'
    """
    return "limits." + field_name.replace("_", "-")


def default_limits() -> SiteLimits:
    """The safe defaults that ``deploy/policy.template.toml`` documents.

    Example:
        >>> limits = default_limits()
        >>> limits.max_predictors_per_request, limits.min_cases, limits.metric_decimals
        (48, 2, 3)
    """
    return SiteLimits(
        max_models_per_request=32,
        max_predictors_per_request=48,
        max_models_per_predictor=8,
        max_label_sources_per_request=16,
        max_candidates_per_run=64,
        max_predictors_per_run=64,
        max_label_sources_per_run=32,
        max_profiles_per_run=2,
        max_fingerprints_per_run=2,
        query_budget=5000,
        min_cases=2,
        metric_decimals=3,
        max_image_size=512,
        max_profile_image_size=128,
        max_label_grid=32,
        max_quantiles=101,
        max_channels=512,
        max_levels=6,
        max_epochs=200,
        max_iterations=5000,
        max_passes=16,
        max_batch_size=256,
        max_slices_per_case=0,
        max_request_seconds=21600.0,
    )


def parse_limits(table: Mapping[str, object]) -> SiteLimits:
    """Build :class:`SiteLimits` from a ``[limits]`` table; absent keys keep defaults.

    The table is optional (a policy written before it existed keeps working, with the
    safe defaults), but an unknown key is an error, so a misspelled limit can never
    silently fall back to its default.

    Raises:
        ValueError: an unknown key, a value of the wrong type or out of range (the
            message names the ``limits.*`` key).
    """
    defaults = default_limits()
    values: dict[str, object] = {}
    known = {field.name: field for field in dataclasses.fields(SiteLimits)}
    for name, raw in table.items():
        field_name = name.replace("-", "_")
        if field_name not in known:
            valid = ", ".join(limit_key(field)[len("limits.") :] for field in known)
            raise ValueError(f"unknown key limits.{name}; valid keys: {valid}")
        default = getattr(defaults, field_name)
        coerce = as_float if isinstance(default, float) else as_int
        values[field_name] = coerce(raw, f"limits.{name}")
    return dataclasses.replace(defaults, **values)  # type: ignore[arg-type]


def to_limit_fields(limits: SiteLimits) -> dict[str, int | float]:
    """``limits.*`` key -> value, as a reply's applied policy reports them."""
    return {
        limit_key(field.name): getattr(limits, field.name)
        for field in dataclasses.fields(limits)
    }


# --- sizes the run config chooses ----------------------------------------------------

SizeGetter = Callable[[RunConfig], int]
# (limits field, run-config key, getter, message types whose work it sizes). A size is
# checked only where it matters, so an unrelated setting never refuses an action.
_DATA_ACTIONS: Final = (
    "train.source",
    "train.finetune",
    "query.lftm",
    "train.adapt",
    "train.consensus",
    "train.semisup",
    "evaluate",
)
_SIZES: Final[tuple[tuple[str, str, SizeGetter, tuple[str, ...]], ...]] = (
    ("max_image_size", "data.image-size", lambda c: c.data.image_size, _DATA_ACTIONS),
    ("max_levels", "model.channels", lambda c: len(c.model.channels), _DATA_ACTIONS),
    ("max_channels", "model.channels", lambda c: max(c.model.channels), _DATA_ACTIONS),
    ("max_epochs", "train.epochs", lambda c: c.train.epochs, ("train.source",)),
    (
        "max_batch_size",
        "train.batch-size",
        lambda c: c.train.batch_size,
        ("train.source", "train.finetune"),
    ),
    ("max_epochs", "adapt.epochs", lambda c: c.adapt.epochs, ("train.adapt",)),
    (
        "max_batch_size",
        "adapt.batch-size",
        lambda c: c.adapt.batch_size,
        ("train.adapt",),
    ),
    (
        "max_epochs",
        "consensus.epochs",
        lambda c: c.consensus.epochs,
        ("train.consensus",),
    ),
    (
        "max_epochs",
        "consensus.refine-epochs",
        lambda c: c.consensus.refine_epochs,
        ("train.consensus",),
    ),
    (
        "max_batch_size",
        "consensus.batch-size",
        lambda c: c.consensus.batch_size,
        ("train.consensus",),
    ),
    (
        "max_iterations",
        "semisup.iterations",
        lambda c: c.semisup.iterations,
        ("train.semisup",),
    ),
    (
        "max_iterations",
        "semisup.local-iterations",
        lambda c: c.semisup.local_iterations,
        ("train.semisup",),
    ),
    ("max_passes", "semisup.passes", lambda c: c.semisup.passes, ("train.semisup",)),
    (
        "max_batch_size",
        "semisup.labelled-batch",
        lambda c: c.semisup.labelled_batch,
        ("train.semisup",),
    ),
    (
        "max_batch_size",
        "semisup.unlabelled-batch",
        lambda c: c.semisup.unlabelled_batch,
        ("train.semisup",),
    ),
    (
        "max_profile_image_size",
        "affinity.image-size",
        lambda c: c.affinity.image_size,
        ("query.profile",),
    ),
    (
        "max_label_grid",
        "affinity.label-grid",
        lambda c: c.affinity.label_grid,
        ("query.profile",),
    ),
    (
        "max_quantiles",
        "affinity.quantiles",
        lambda c: c.affinity.quantiles,
        ("query.profile",),
    ),
    (
        "max_quantiles",
        "affinity.foreground-quantiles",
        lambda c: c.affinity.foreground_quantiles,
        ("query.profile",),
    ),
    (
        "max_quantiles",
        "affinity.polarity-quantiles",
        lambda c: c.affinity.polarity_quantiles,
        ("query.profile",),
    ),
    (
        "max_epochs",
        "affinity.finetune-epochs",
        lambda c: c.affinity.finetune_epochs,
        ("train.finetune",),
    ),
)


def check_run_sizes(
    config: RunConfig, limits: SiteLimits, message_type: str
) -> list[str]:
    """Every size of ``config`` that ``message_type``'s work uses beyond its cap.

    Returns:
        One line per breach, naming the run-config key, its value and the limit.

    Example:
        >>> from core.config import load_default_config
        >>> config = load_default_config(**{"train.epochs": 500})
        >>> check_run_sizes(config, default_limits(), "train.source")
        ['train.epochs is 500, limits.max-epochs allows 200']
        >>> check_run_sizes(config, default_limits(), "evaluate")
        []
    """
    breaches = []
    for field_name, key, get, actions in _SIZES:
        if message_type not in actions:
            continue
        value, cap = get(config), getattr(limits, field_name)
        if value > cap:
            measured = (
                f"has {value} levels"
                if field_name == "max_levels"
                else f"is {value}"
                if field_name != "max_channels"
                else f"has a level of {value} channels"
            )
            breaches.append(f"{key} {measured}, {limit_key(field_name)} allows {cap}")
    return breaches


def cap_slices_per_case(config: RunConfig, limits: SiteLimits) -> RunConfig:
    """``config`` with ``data.max-slices-per-case`` held to the site's cap.

    The site's ``limits.max-slices-per-case`` bounds how many slices of one case any
    action uses (it also bounds what one patient contributes to a DP-SGD training);
    the run may ask for fewer, never more. 0 on either side means "every slice".

    Example:
        >>> from core.config import load_default_config
        >>> capped = cap_slices_per_case(
        ...     load_default_config(), dataclasses.replace(default_limits(),
        ...     max_slices_per_case=4))
        >>> capped.data.max_slices_per_case
        4
    """
    cap, asked = limits.max_slices_per_case, config.data.max_slices_per_case
    if cap == 0 or 0 < asked <= cap:
        return config
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, max_slices_per_case=cap)
    )


def whole_case_config(config: RunConfig, limits: SiteLimits) -> RunConfig:
    """``config`` for a release about evaluation labels: every slice of each case.

    The run's ``data.max-slices-per-case`` (a speed setting) does not choose which
    slices of a case a Dice is computed over: the site evaluates each case as a
    volume, up to its own ``limits.max-slices-per-case``. Otherwise a coordinator
    could cut each evaluation case down to one slice and aim crafted predictors at
    single pixels of it.

    Example:
        >>> from core.config import load_default_config
        >>> config = load_default_config(**{"data.max-slices-per-case": 1})
        >>> whole_case_config(config, default_limits()).data.max_slices_per_case
        0
    """
    return dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data, max_slices_per_case=limits.max_slices_per_case
        ),
    )


# --- what one request asks for ------------------------------------------------------


def check_request(
    limits: SiteLimits,
    *,
    models: int,
    predictors: Mapping[str, Sequence[tuple[str, float]]] | None = None,
    label_sources: int | None = None,
    iterations: int | None = None,
) -> list[str]:
    """Every per-request limit the request breaks; one line each, naming the limit.

    Predictors must be mixtures: at most ``max-models-per-predictor`` distinct models,
    weights finite, non-negative and summing to 1. A negative weight would let two
    models' difference (not a prediction) be scored, which is how a few crafted models
    become any region the coordinator wants measured.

    Example:
        >>> check_request(default_limits(), models=2,
        ...               predictors={"p": [("a", 1.5), ("b", -0.5)]})
        ... # doctest: +ELLIPSIS
        ["predictor 'p' has weight -0.5 for model 'b'; mixture weights must be ..."]
        >>> check_request(default_limits(), models=2,
        ...               predictors={"p": [("a", 0.25), ("b", 0.75)]})
        []
    """
    breaches = []
    if models > limits.max_models_per_request:
        breaches.append(
            f"the request carries {models} models, "
            f"limits.max-models-per-request allows {limits.max_models_per_request}"
        )
    if predictors is not None:
        if len(predictors) > limits.max_predictors_per_request:
            breaches.append(
                f"the request has {len(predictors)} predictors, limits.max-"
                f"predictors-per-request allows {limits.max_predictors_per_request}"
            )
        for name, members in sorted(predictors.items()):
            breaches += _check_mixture(name, members, limits.max_models_per_predictor)
    if (
        label_sources is not None
        and label_sources > limits.max_label_sources_per_request
    ):
        breaches.append(
            f"the request names {label_sources} label sources, limits.max-label-"
            f"sources-per-request allows {limits.max_label_sources_per_request}"
        )
    if iterations is not None and iterations > limits.max_iterations:
        breaches.append(
            f"the request asks for {iterations} iterations, limits.max-iterations "
            f"allows {limits.max_iterations}"
        )
    return breaches


def _check_mixture(
    name: str, members: Sequence[tuple[str, float]], max_models: int
) -> list[str]:
    models = [model for model, _ in members]
    if not members:
        return [f"predictor {name!r} names no model"]
    if len(set(models)) != len(models):
        return [f"predictor {name!r} names a model twice"]
    if len(models) > max_models:
        return [
            f"predictor {name!r} mixes {len(models)} models, "
            f"limits.max-models-per-predictor allows {max_models}"
        ]
    weights = [weight for _, weight in members]
    bad = [
        f"predictor {name!r} has weight {weight!r} for model {model!r}; mixture "
        "weights must be finite and >= 0"
        for model, weight in members
        if not (math.isfinite(weight) and weight >= 0)
    ]
    if bad:
        return bad
    if abs(math.fsum(weights) - 1.0) > WEIGHT_SUM_TOLERANCE:
        return [
            f"predictor {name!r} weights sum to {math.fsum(weights)!r}; a mixture's "
            "weights must sum to 1"
        ]
    return []


# --- cases behind a release -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CaseCounts:
    """How many cases a site holds, by split (counts only, as ``query.hello`` says)."""

    labelled: int
    unlabelled: int
    evaluation: int


# What each action's released aggregates stand on.
_CASES_BEHIND: Final[dict[str, tuple[str, Callable[[CaseCounts], int]]]] = {
    "train.source": ("labelled training cases", lambda c: c.labelled),
    "train.finetune": ("labelled training cases", lambda c: c.labelled),
    "query.lftm": ("training images", lambda c: c.labelled + c.unlabelled),
    "train.adapt": ("training images", lambda c: c.labelled + c.unlabelled),
    "train.consensus": ("training images", lambda c: c.labelled + c.unlabelled),
    "train.semisup": ("training images", lambda c: c.labelled + c.unlabelled),
    "query.profile": ("training images", lambda c: c.labelled + c.unlabelled),
    "query.fingerprint": ("training images", lambda c: c.labelled + c.unlabelled),
    "evaluate": ("evaluation cases", lambda c: c.evaluation),
}


def check_cases(limits: SiteLimits, message_type: str, counts: CaseCounts) -> list[str]:
    """Whether the cases ``message_type``'s release stands on reach ``min-cases``.

    A mean over one case is that case; ``limits.min-cases`` is the fewest cases any
    aggregate (a mean Dice, a DTM, a profile, a trained model) may be computed from.
    A task profile's label term has its own check (:func:`label_term_allowed`).

    Example:
        >>> counts = CaseCounts(labelled=3, unlabelled=0, evaluation=1)
        >>> check_cases(default_limits(), "evaluate", counts)
        ['evaluate stands on 1 evaluation cases, limits.min-cases requires 2']
        >>> check_cases(default_limits(), "train.source", counts)
        []
    """
    if message_type not in _CASES_BEHIND:
        return []
    what, count = _CASES_BEHIND[message_type]
    found = count(counts)
    if found >= limits.min_cases:
        return []
    return [
        f"{message_type} stands on {found} {what}, limits.min-cases requires "
        f"{limits.min_cases}"
    ]


def label_term_allowed(limits: SiteLimits, labelled: int) -> bool:
    """Whether a task profile may carry its label term (mean map, fractions).

    Example:
        >>> limits = default_limits()
        >>> label_term_allowed(limits, 1), label_term_allowed(limits, 2)
        (False, True)
    """
    return labelled >= limits.min_cases


# --- the cumulative query budget ------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QueryCharge:
    """What a request was charged, and the site's totals after it."""

    run_id: str
    units: dict[str, int]  # kind -> units of this request
    run_totals: dict[str, int]  # kind -> this run's units so far, with this request
    total: int  # every unit of every run


_RUN_CAPS: Final = {
    PREDICTORS: "max_predictors_per_run",
    CANDIDATES: "max_candidates_per_run",
    LABEL_SOURCES: "max_label_sources_per_run",
    PROFILES: "max_profiles_per_run",
    FINGERPRINTS: "max_fingerprints_per_run",
}


def read_query_book(path: Path) -> dict[str, dict[str, int]]:
    """Run id -> kind -> units charged, from the site's query book (empty if absent).

    Raises:
        ValueError: the file exists but is not a valid query book (naming it).
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text())
        runs = document["runs"]
        book = {
            str(run): {str(kind): int(units) for kind, units in kinds.items()}
            for run, kinds in runs.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid query book ({error})") from None
    return book


def charge_queries(
    path: Path, *, run_id: str, units: Mapping[str, int], limits: SiteLimits
) -> QueryCharge:
    """Charge a request's query units to the site's book, or refuse it unchanged.

    Runs under an exclusive lock from the check to the write (two requests arriving
    at once can't both fit into what is left). The charge is made before the work
    runs, so a request that then fails still counts: conservative, as the work may
    have released something before failing.

    Args:
        path: the site's query book (``<state-dir>/queries.json``).
        run_id: the Flower run the request belongs to.
        units: query kind -> units this request asks for.
        limits: the site's limits (per-run caps and the cumulative budget).

    Returns:
        The charge and the totals after it.

    Raises:
        LimitError: a per-run cap or the cumulative budget would be exceeded (naming
            the ``limits.*`` key); nothing was charged.
        ValueError: the book exists but is malformed (naming the file).
    """
    path = Path(path)
    asked = {kind: int(count) for kind, count in units.items() if count}
    with hold_exclusive_lock(path.with_name(path.name + ".lock")):
        book = read_query_book(path)
        run = dict(book.get(run_id, {}))
        for kind, count in sorted(asked.items()):
            cap = getattr(limits, _RUN_CAPS[kind])
            if run.get(kind, 0) + count > cap:
                raise LimitError(
                    f"this run already had {run.get(kind, 0)} {kind} answered and asks "
                    f"for {count} more; limits.{_RUN_CAPS[kind].replace('_', '-')} "
                    f"allows {cap} per run"
                )
        spent = sum(sum(kinds.values()) for kinds in book.values())
        wanted = sum(asked.values())
        if limits.query_budget and spent + wanted > limits.query_budget:
            # How much other runs used stays at the site (the site's log has it):
            # a coordinator learns only that this request does not fit.
            raise LimitError(
                f"the site's query budget (limits.query-budget {limits.query_budget} "
                f"units over all runs) has no room for this request's {wanted}"
            )
        for kind, count in asked.items():
            run[kind] = run.get(kind, 0) + count
        book[run_id] = run
        with write_atomically(path) as temporary:
            temporary.write_text(json.dumps({"runs": book}, indent=1) + "\n")
    return QueryCharge(run_id=run_id, units=asked, run_totals=run, total=spent + wanted)


# --- precision of what leaves ---------------------------------------------------------

# Metric fields left at full precision: the DP accounting (public mechanism settings)
# and wall times, which describe the run, not the data.
_EXACT_PREFIXES: Final = (DP_KEY_PREFIX,)
_EXACT_FIELDS: Final = frozenset({"seconds"})

MetricValue = int | float | list[int] | list[float]


def round_metric_fields(
    fields: Mapping[str, MetricValue], decimals: int
) -> dict[str, MetricValue]:
    """``fields`` with every data-derived float rounded to ``decimals`` places.

    A metric's last digits are where a crafted query hides its answer (a Dice that
    changes by 1e-5 when one pixel does); rounding keeps what a report needs and drops
    that. Integers, DP accounting fields (``dp.*``) and ``seconds`` are left as they
    are; ``decimals == 0`` rounds to whole numbers.

    Example:
        >>> round_metric_fields({"dice.a": 0.912345, "num-cases": 6,
        ...                      "dp.delta": 1e-05, "itm.b": [0.11111]}, 3)
        {'dice.a': 0.912, 'num-cases': 6, 'dp.delta': 1e-05, 'itm.b': [0.111]}
    """

    def rounded_scalar(value: float) -> float:
        return round(value, decimals) if math.isfinite(value) else value

    def rounded(value: MetricValue) -> MetricValue:
        if isinstance(value, float):
            return rounded_scalar(value)
        if isinstance(value, list):
            return [
                rounded_scalar(item) if isinstance(item, float) else item
                for item in value
            ]
        return value

    return {
        key: value
        if key in _EXACT_FIELDS or key.startswith(_EXACT_PREFIXES)
        else rounded(value)
        for key, value in fields.items()
    }
