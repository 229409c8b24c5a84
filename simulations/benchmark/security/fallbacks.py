"""How an adversarial coordinator plans around a site's limits, and adapts to refusals.

An :class:`AttackPlan` says what the attacker asks for next: the run config it
declares, the run id, the cells (their side) and how many crafted models mix into
one predictor, how many predictors and models one request carries, how many query
units one run and the whole site will answer. A defended site says its limits in
every reply (the applied policy's ``policy.limits.*`` settings, ``query.hello``'s
included), so the attacker first fits its plan to them (:func:`plan_within_limits`)
and spends exactly what the site allows: a new run id when a per-run cap binds,
cells coarse enough for the query budget, never a refused mixture.

When a site refuses all the same (it does not say its limits, or a privacy budget
runs out), the reason names each rule or limit it applied (``core.privacy.limits`` and
``clients/guard.py`` write them: "limit-exceeded (the request has 49 predictors,
limits.max-predictors-per-request allows 48)"; several breaches are joined by
"; "). Each breach goes through :data:`FALLBACKS` in order; the first function that
recognises it returns a weaker plan (or one marked ``stopped``), and the attack goes
on with the plan every breach made. Each fallback is one small function, so the
matching stays next to the text it reads. Used by
:mod:`simulations.benchmark.security.attacks` and
:mod:`simulations.benchmark.security.queries`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Final

from core import protocol
from core.config import ConfigValue, RunConfig, load_run_config
from core.privacy.limits import CANDIDATES, LABEL_SOURCES, PREDICTORS
from simulations.benchmark.security.patterns import PixelCode

MAX_SINGLE_MODELS: Final = 256  # cells a one-model-per-predictor code may need
SMALLEST_IMAGE: Final = 16  # data.image-size must be a multiple of 8, >= 16
# The guard's refusals start so; a handler's (a privacy budget) do not. Only the
# guard refuses before the site charges a request's query units.
GUARD_REFUSAL: Final = "blocked by egress policy"
_BREACH_SEPARATOR: Final = re.compile(r";\s(?=[a-z][a-z-]+ \()")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AttackPlan:
    """What the attacker asks for next; every refusal makes it weaker.

    Attributes:
        run_config: the coordinator-chosen run config (flat, as Flower sends it).
        run_id: the run the next message belongs to.
        block: cell side in pixels (1 = single pixels).
        digits: crafted models per predictor.
        predictors_per_request: cells one request asks about.
        models_per_request: the most models one request carries (0 = no cap).
        units_per_run: query units one run may be charged (0 = no cap known).
        budget: query units the site answers in all (0 = no cap known).
        whole_image: ask once about the whole-image predictor too (``evaluate``).
        stopped: why the attack gave up ("" while it goes on).
    """

    run_config: Mapping[str, ConfigValue]
    run_id: int = 1
    block: int = 1
    digits: int = 2
    predictors_per_request: int = 1024
    models_per_request: int = 0
    units_per_run: int = 0
    budget: int = 0
    whole_image: bool = False
    stopped: str = ""

    @property
    def config(self) -> RunConfig:
        """The parsed run config."""
        return load_run_config(self.run_config)

    def code(self) -> PixelCode:
        """The cells and crafted models this plan asks about."""
        return PixelCode(
            size=self.config.data.image_size, block=self.block, digits=self.digits
        )


def allowed_by(reason: str, key: str) -> int | None:
    """The cap a refusal quotes for ``limits.<key>`` ("... allows N"), if any.

    Example:
        >>> allowed_by("the request has 49 predictors, limits.max-predictors-per-"
        ...            "request allows 48", "max-predictors-per-request")
        48
        >>> allowed_by("limits.max-label-grid allows 32", "max-image-size") is None
        True
    """
    found = re.search(rf"limits\.{re.escape(key)} allows (\d+)", reason)
    return None if found is None else int(found.group(1))


def split_breaches(reason: str) -> list[str]:
    """A refusal's reason as one text per breach, without the ledger anchor.

    Example:
        >>> split_breaches("blocked by egress policy: limit-exceeded (a, b); "
        ...                f"limit-exceeded (c) [site ledger entry 3 {'ab' * 32}]")
        ['blocked by egress policy: limit-exceeded (a, b)', 'limit-exceeded (c)']
    """
    text, _anchor = protocol.LedgerAnchor.split_reason(reason)
    return [part for part in _BREACH_SEPARATOR.split(text) if part]


Fallback = Callable[[AttackPlan, str], AttackPlan | None]


def stop_when_budget_spent(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """A cumulative budget binds: ask for less, down to one query, then stop.

    Neither refusal says what is left: the query budget's ("the site's query budget
    (limits.query-budget 5000 units over all runs) has no room for this request's
    48") does not tell one run what other runs used, and a privacy budget's ("the
    site's budget is epsilon 10 ...") has no remainder in queries. Halving the
    request finds what still fits in a few tries.
    """
    if "budget" not in reason.lower():
        return None
    if plan.predictors_per_request > 1:
        return dataclasses.replace(
            plan, predictors_per_request=plan.predictors_per_request // 2
        )
    return dataclasses.replace(plan, stopped=f"budget spent: {reason}")


def stop_when_action_refused(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """The site does not answer this action at all: no weaker request helps.

    Not answered by its policy, not without DP at a site that requires it, or its
    reply is weights a site keeps home.
    """
    text = reason.lower()
    if not any(
        rule in text
        for rule in (
            "action-not-answered",
            "not in actions.answer",
            "no-dp-form",
            "weights-may-not-leave",
        )
    ):
        return None
    return dataclasses.replace(plan, stopped=f"action refused: {reason}")


def stop_when_too_few_cases(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """A minimum of cases behind an aggregate: the coordinator cannot lower it."""
    text = reason.lower()
    if "min-cases" not in text and (
        "cases" not in text or not ("minimum" in text or "at least" in text)
    ):
        return None
    return dataclasses.replace(plan, stopped=f"too few cases: {reason}")


def new_run_when_run_limit(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """A per-run limit: the next run id starts a fresh count."""
    text = reason.lower()
    if not any(word in text for word in ("per run", "per-run", "this run")):
        return None
    return dataclasses.replace(plan, run_id=plan.run_id + 1)


def _image_size_within(cap: int) -> int:
    """The largest valid ``data.image-size`` (a multiple of 8) up to ``cap``."""
    return max(SMALLEST_IMAGE, cap // 8 * 8)


def sizes_within_caps(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """A capped size the attacker chose: down to the cap the refusal quotes.

    ``data.image-size`` goes to the largest multiple of 8 the cap allows;
    ``model.channels`` loses its deepest levels (``limits.max-levels``) or narrows
    each level to the widest allowed (``limits.max-channels``). Without a quoted cap
    the size is halved.
    """
    flat = dict(plan.run_config)
    config = plan.config
    channels, strides = config.model.channels, config.model.strides
    if "data.image-size" in reason and config.data.image_size > SMALLEST_IMAGE:
        cap = allowed_by(reason, "max-image-size")
        flat["data.image-size"] = _image_size_within(
            config.data.image_size // 2 if cap is None else cap
        )
    elif "limits.max-levels" in reason and len(channels) > 2:
        levels = allowed_by(reason, "max-levels") or len(channels) - 1
        flat["model.channels"] = ",".join(map(str, channels[: max(2, levels)]))
        flat["model.strides"] = ",".join(map(str, strides[: max(2, levels) - 1]))
    elif "channels" in reason and min(channels) > 2:
        cap = allowed_by(reason, "max-channels")
        flat["model.channels"] = ",".join(
            str(max(2, c // 2 if cap is None else min(c, cap))) for c in channels
        )
    else:
        return None
    if flat == dict(plan.run_config):
        return None
    return dataclasses.replace(plan, run_config=flat)


def fewer_models_per_predictor(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """Mixtures are restricted: fewer models per predictor, cells coarse enough.

    ``models-per-predictor`` style limit names match too ("per-predictor"), and
    limits on a consensus request's label sources (a cell's models are those). With
    a quoted cap below the plan's digits the code takes that many digits; otherwise
    one model per predictor, on cells coarse enough to need few models.
    """
    text = reason.lower()
    if plan.digits == 1 or not any(
        word in text
        for word in (
            "mixture",
            "mixes",
            "weight",
            "members",
            "per predictor",
            "per-predictor",
            "label source",  # consensus: a cell's models are its label sources
            "label-source",
        )
    ):
        return None
    cap = allowed_by(reason, "max-models-per-predictor") or allowed_by(
        reason, "max-label-sources-per-request"
    )
    if cap is not None and 2 <= cap < plan.digits:
        return dataclasses.replace(plan, digits=cap)
    block = plan.block
    while (plan.config.data.image_size // block) ** 2 > MAX_SINGLE_MODELS:
        block *= 2
    return dataclasses.replace(plan, digits=1, block=block)


def fewer_models_per_request(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """Requests carry too many models: the quoted cap, else half as many."""
    text = reason.lower()
    if "model" not in text or "request" not in text:
        return None
    current = plan.models_per_request or len(plan.code().patterns()) + 1
    cap = allowed_by(reason, "max-models-per-request")
    wanted = current // 2 if cap is None else min(current - 1, cap)
    if wanted < plan.digits:
        return None
    return dataclasses.replace(plan, models_per_request=wanted)


def fewer_predictors_per_request(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """Too many predictors (or any other reason): the quoted cap, else half as many."""
    if plan.predictors_per_request <= 1:
        return None
    cap = allowed_by(reason, "max-predictors-per-request")
    wanted = (
        plan.predictors_per_request // 2
        if cap is None
        else min(plan.predictors_per_request - 1, cap)
    )
    return dataclasses.replace(plan, predictors_per_request=max(1, wanted))


def coarser_cells_when_values_vanish(
    plan: AttackPlan, values: Mapping[int, float], whole: float
) -> AttackPlan | None:
    """Every cell scored 0 although the site has foreground: values are rounded.

    One pixel moves a mean Dice by about ``2 / (C (1 + y))``; rounded away, it is
    lost, and cells of twice the side are tried (down to four cells a side).
    """
    if not values or any(values.values()) or not whole > 0:
        return None
    if plan.code().cells_per_side <= 4:
        return None
    return dataclasses.replace(plan, block=plan.block * 2)


# In order: the first that applies to a breach makes the next plan.
FALLBACKS: Final[tuple[Fallback, ...]] = (
    stop_when_action_refused,
    stop_when_budget_spent,
    stop_when_too_few_cases,
    new_run_when_run_limit,
    sizes_within_caps,
    fewer_models_per_predictor,
    fewer_models_per_request,
    fewer_predictors_per_request,
)


def adapt_to_refusal(
    plan: AttackPlan, reason: str, *, first_of_run: bool
) -> tuple[AttackPlan, str]:
    """The plan after a refusal and the fallbacks taken ("" when the attack stops).

    Every breach the reason lists is met in turn (one fallback each), so a request
    that broke two limits is not refused twice. A per-run limit that refuses a
    run's very first request is no per-run limit: a new run would be refused the
    same way, so that fallback is skipped then.
    """
    taken: list[str] = []
    for breach in split_breaches(reason):
        for fallback in FALLBACKS:
            if fallback is new_run_when_run_limit and first_of_run:
                continue
            weaker = fallback(plan, breach)
            if weaker is None:
                continue
            if weaker.stopped:
                return dataclasses.replace(plan, stopped=weaker.stopped), ""
            plan = weaker
            taken.append(fallback.__name__)
            break
    if not taken:
        return dataclasses.replace(plan, stopped=f"refused: {reason}"), ""
    return plan, "+".join(dict.fromkeys(taken))


# --------------------------------------------------------- planning within limits

# What one request of each kind is charged, per cell, and the caps that bind it:
# the per-request cap on cells, the per-run cap on units.
_KIND_CAPS: Final = {
    PREDICTORS: ("max-predictors-per-request", "max-predictors-per-run"),
    CANDIDATES: ("max-models-per-request", "max-candidates-per-run"),
    LABEL_SOURCES: ("max-label-sources-per-request", "max-label-sources-per-run"),
}


def units_per_cell(plan: AttackPlan, kind: str) -> int:
    """Query units one cell costs: its label sources (consensus), else one."""
    return plan.digits if kind == LABEL_SOURCES else 1


def advertised_limits(settings: Mapping[str, object]) -> dict[str, int]:
    """``limits.*`` caps a reply's applied policy states (``policy.limits.<key>``).

    Example:
        >>> advertised_limits({"policy.limits.min-cases": 2, "site": "A",
        ...                    "policy.limits.max-request-seconds": 60.0})
        {'min-cases': 2, 'max-request-seconds': 60}
    """
    prefix = f"{protocol.APPLIED_POLICY_PREFIX}limits."
    return {
        key[len(prefix) :]: int(value)
        for key, value in settings.items()
        if key.startswith(prefix) and isinstance(value, int | float)
    }


def plan_within_limits(
    plan: AttackPlan, limits: Mapping[str, int], *, kind: str
) -> AttackPlan:
    """``plan`` fitted to the limits a site advertised, before it asks anything.

    Image size and model width within their caps; mixtures of at most the allowed
    models; requests within the per-request caps; the per-run cap recorded (the
    attack moves to a new run id when it binds); cells coarse enough that every cell
    fits the query budget (the whole-image predictor only when it fits too).

    Args:
        plan: the attacker's wish.
        limits: :func:`advertised_limits` of a reply (empty: the plan unchanged).
        kind: what a cell is charged as: ``core.privacy.limits.PREDICTORS`` (evaluate),
            ``CANDIDATES`` (LFTM) or ``LABEL_SOURCES`` (consensus).
    """
    if not limits:
        return plan
    flat = dict(plan.run_config)
    config = plan.config
    if config.data.image_size > limits.get("max-image-size", math.inf):
        flat["data.image-size"] = _image_size_within(limits["max-image-size"])
    if max(config.model.channels) > limits.get("max-channels", math.inf):
        cap = limits["max-channels"]
        flat["model.channels"] = ",".join(
            str(min(c, cap)) for c in config.model.channels
        )
    plan = dataclasses.replace(plan, run_config=flat)
    request_key, run_key = _KIND_CAPS[kind]
    digits = plan.digits
    if kind == PREDICTORS:
        digits = min(digits, limits.get("max-models-per-predictor", digits))
    if kind == LABEL_SOURCES:
        digits = min(digits, limits.get(request_key, digits))
    if digits != plan.digits:
        plan = dataclasses.replace(plan, digits=max(1, digits))
    per_request = plan.predictors_per_request
    if kind != LABEL_SOURCES:  # consensus: one cell per request, whatever the cap
        per_request = min(per_request, limits.get(request_key, per_request))
    plan = dataclasses.replace(
        plan,
        predictors_per_request=max(1, per_request),
        models_per_request=limits.get("max-models-per-request", 0),
        units_per_run=limits.get(run_key, 0),
        budget=limits.get("query-budget", 0),
    )
    return _cells_within_budget(plan, kind)


def _cells_within_budget(plan: AttackPlan, kind: str) -> AttackPlan:
    """The finest cells whose every cell the query budget pays for."""
    if not plan.budget:
        return plan
    block, size = plan.block, plan.config.data.image_size
    cost = units_per_cell(plan, kind)
    while (size // block) ** 2 * cost > plan.budget and size % (2 * block) == 0:
        block *= 2
    cells = (size // block) ** 2
    whole = plan.whole_image and cells * cost + 1 <= plan.budget
    return dataclasses.replace(plan, block=block, whole_image=whole)
