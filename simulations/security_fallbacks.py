"""How an adversarial coordinator adapts to a site that refuses: plans and fallbacks.

An :class:`AttackPlan` says what the attacker asks for next: the run config it
declares, the run id, the cells (their side) and how many crafted models mix into
one predictor, how many predictors and models one request carries. When a site
refuses, its error reason (which names the rule or limit it applied) goes through
:data:`FALLBACKS` in order; the first function that recognises the reason returns
a weaker plan (or one marked ``stopped``), and the attack goes on with it. Each
fallback is one small function, so the matching can be tuned to the limits a
defended site really enforces. Used by :mod:`simulations.security_attacks` and
:mod:`simulations.security_queries`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Final

from core.config import ConfigValue, RunConfig, load_run_config
from simulations.security_patterns import PixelCode

MAX_SINGLE_MODELS: Final = 256  # cells a one-model-per-predictor code may need


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
        stopped: why the attack gave up ("" while it goes on).
    """

    run_config: Mapping[str, ConfigValue]
    run_id: int = 1
    block: int = 1
    digits: int = 2
    predictors_per_request: int = 1024
    models_per_request: int = 0
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


Fallback = Callable[[AttackPlan, str], AttackPlan | None]


def stop_when_budget_spent(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """A cumulative budget is spent: nothing more will be answered."""
    if "budget" not in reason.lower():
        return None
    return dataclasses.replace(plan, stopped=f"budget spent: {reason}")


def stop_when_action_refused(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """The site does not answer this action at all: no weaker request helps."""
    text = reason.lower()
    if "action-not-answered" not in text and "not in actions.answer" not in text:
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


def smaller_sizes(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """A capped size the attacker chose (image size, channels): halve it."""
    flat = dict(plan.run_config)
    config = plan.config
    if "image-size" in reason and config.data.image_size > 16:
        flat["data.image-size"] = max(16, config.data.image_size // 2 // 8 * 8)
    elif "channels" in reason and min(config.model.channels) > 2:
        flat["model.channels"] = ",".join(
            str(max(2, c // 2)) for c in config.model.channels
        )
    else:
        return None
    return dataclasses.replace(plan, run_config=flat)


def fewer_models_per_predictor(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """Mixtures are restricted: one model per predictor, cells coarse enough to pay.

    ``models-per-predictor`` style limit names match too ("per-predictor"), and
    limits on a consensus request's label sources (a cell's models are those).
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
    block = plan.block
    while (plan.config.data.image_size // block) ** 2 > MAX_SINGLE_MODELS:
        block *= 2
    return dataclasses.replace(plan, digits=1, block=block)


def fewer_models_per_request(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """Requests carry too many models: halve how many one request carries."""
    text = reason.lower()
    if "model" not in text or "request" not in text:
        return None
    current = plan.models_per_request or len(plan.code().patterns())
    if current <= plan.digits:
        return None
    return dataclasses.replace(plan, models_per_request=max(plan.digits, current // 2))


def fewer_predictors_per_request(plan: AttackPlan, reason: str) -> AttackPlan | None:
    """Too many predictors (or any other reason): halve the predictors per request."""
    if plan.predictors_per_request <= 1:
        return None
    return dataclasses.replace(
        plan, predictors_per_request=plan.predictors_per_request // 2
    )


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


# In order: the first that applies to a refusal's reason makes the next plan.
FALLBACKS: Final[tuple[Fallback, ...]] = (
    stop_when_action_refused,
    stop_when_budget_spent,
    stop_when_too_few_cases,
    new_run_when_run_limit,
    smaller_sizes,
    fewer_models_per_predictor,
    fewer_models_per_request,
    fewer_predictors_per_request,
)


def adapt_to_refusal(
    plan: AttackPlan, reason: str, *, first_of_run: bool
) -> tuple[AttackPlan, str]:
    """The plan after a refusal and the fallback's name ("" when the attack stops).

    A per-run limit that refuses a run's very first request is no per-run limit:
    a new run would be refused the same way, so that fallback is skipped then.
    """
    for fallback in FALLBACKS:
        if fallback is new_run_when_run_limit and first_of_run:
            continue
        weaker = fallback(plan, reason)
        if weaker is not None:
            return weaker, "" if weaker.stopped else fallback.__name__
    return dataclasses.replace(plan, stopped=f"refused: {reason}"), ""
