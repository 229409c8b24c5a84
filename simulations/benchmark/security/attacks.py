"""Reconstruction attacks of an adversarial coordinator, against the real ClientApp.

Every message goes to ``clients.app.app`` exactly as a SuperNode delivers it (explicit
metadata, a ``Context`` whose node config names the site folder, its state folder and,
when given, its policy file), so the egress guard, the ledger and every handler run
as they do at a hospital. The attacks:

- ``evaluate`` (issue 20, class 2a): single-cell predictors, each an even mixture of
  crafted pattern models (:mod:`simulations.benchmark.security.patterns`); the mean Dice
  of each is decoded into label maps (:mod:`simulations.benchmark.security.decode`).
- ``consensus`` (class 2b): the same cells, as label sources of ``train.consensus``;
  the strict majority of a cell's stripe models is that cell, and the reply's
  ``label-dice.majority`` is its Dice against the evaluation labels. One cell per
  request (the other three methods fuse the same sources, so they add no cell).
- ``lftm`` (class 2b): the pattern models as candidates of ``query.lftm``.
- ``profile`` (class 3): one ``query.profile`` whose run config asks for a label grid
  as fine as the case.

A defended site states its limits in every reply (``query.hello``'s included); the
cell attacks read them first and plan within them
(:func:`simulations.benchmark.security.fallbacks.plan_within_limits`): a new run id
whenever a per-run cap binds, cells coarse enough for the query budget, a stop when it
is spent. A site may refuse all the same. An error reply is recorded with its reason,
never raised; the attack then moves to the strongest thing still allowed, through the
small, explicit functions of :mod:`simulations.benchmark.security.fallbacks` (each reads
the reason and returns a weaker plan, or None when it does not apply), and stops when
none applies or a budget is spent.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from clients import records
from clients.app import app as site_app
from core import protocol
from core.config import ConfigValue
from core.training.networks import Arrays
from simulations.benchmark.security.fallbacks import (
    GUARD_REFUSAL,
    AttackPlan,
    adapt_to_refusal,
    advertised_limits,
    coarser_cells_when_values_vanish,
    plan_within_limits,
    units_per_cell,
)
from simulations.benchmark.security.patterns import (
    PixelCode,
    craft_code_models,
    craft_pattern_model,
    pattern_probabilities,
    predictor_regions,
)

COORDINATOR_NODE: Final = 1
SITE_NODE: Final = 7
ALL_FOREGROUND: Final = "all"  # the one predictor that paints the whole image
WHOLE: Final = -1  # the whole-image predictor among the cells a request asks about
MAX_REFUSALS: Final = 64  # a site that refuses this often has won; stop asking


# --------------------------------------------------------------------- the channel


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteReply:
    """What came back: the metrics and settings, or the error reason."""

    error: str | None
    metrics: Mapping[str, object]
    settings: Mapping[str, object]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteChannel:
    """One site's ClientApp, reached as its SuperNode would deliver messages.

    Attributes:
        site_dir: the site folder (``node_config["site-dir"]``).
        state_dir: the site's ledger and accountant folder.
        policy: the site's policy file (``node_config["policy"]``), or None for the
            site's own ``policy.toml`` or the safe defaults.
    """

    site_dir: Path
    state_dir: Path
    policy: Path | None = None

    def send(
        self,
        message_type: str,
        content: RecordDict,
        *,
        run_id: int,
        run_config: Mapping[str, ConfigValue],
    ) -> SiteReply:
        """Deliver one message; an error reply (or a crash) comes back as ``error``."""
        node_config: dict[str, ConfigValue] = {
            "site-dir": str(self.site_dir),
            "state-dir": str(self.state_dir),
        }
        if self.policy is not None:
            node_config["policy"] = str(self.policy)
        metadata = Metadata(
            run_id=run_id,
            message_id=uuid.uuid4().hex,
            src_node_id=COORDINATOR_NODE,
            dst_node_id=SITE_NODE,
            reply_to_message_id="",
            group_id="",
            created_at=time.time(),
            ttl=3600,
            message_type=message_type,
        )
        context = Context(
            run_id=run_id,
            node_id=SITE_NODE,
            node_config=node_config,
            state=RecordDict(),
            run_config=dict(run_config),
        )
        try:
            # Message(content, metadata=...) is how the SuperNode builds what it
            # delivers; the public overloads only build messages to send.
            message = Message(content, metadata=metadata)  # type: ignore[call-overload]
            reply = site_app(message, context)
        except Exception as error:  # a site that crashes has answered too
            return SiteReply(
                error=f"{type(error).__name__}: {error}", metrics={}, settings={}
            )
        if reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            return SiteReply(error=reason, metrics={}, settings={})
        content_ = reply.content
        return SiteReply(
            error=None,
            metrics=dict(content_.metric_records.get(protocol.METRICS_KEY, {})),
            settings=dict(content_.config_records.get(protocol.REPLY_KEY, {})),
        )


def request_content(
    models: Mapping[str, Arrays], settings: Mapping[str, object]
) -> RecordDict:
    """A request carrying ``model.<name>`` weights and its settings."""
    content = RecordDict()
    for name, weights in models.items():
        content[protocol.model_key(name)] = records.to_array_record(weights)
    content[protocol.REQUEST_KEY] = ConfigRecord(dict(settings))  # type: ignore[arg-type]
    return content


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteHello:
    """What ``query.hello`` told the attacker: the evaluation cases and the limits.

    Attributes:
        evaluation: evaluation cases the site averages over (0 when refused).
        limits: the ``limits.*`` caps its applied policy states (empty when it
            says none).
        error: the refusal's reason, or None.
    """

    evaluation: int
    limits: dict[str, int]
    error: str | None


def say_hello(
    channel: SiteChannel, run_config: Mapping[str, ConfigValue], run_id: int
) -> SiteHello:
    """Ask ``query.hello``: the case counts and the limits every reply states."""
    reply = channel.send(
        protocol.HELLO, RecordDict(), run_id=run_id, run_config=run_config
    )
    if reply.error is not None:
        return SiteHello(evaluation=0, limits={}, error=reply.error)
    return SiteHello(
        evaluation=int(protocol.HelloReply.from_fields(reply.settings).evaluation),
        limits=advertised_limits(reply.settings),
        error=None,
    )


# ------------------------------------------------------------------- cell attacks


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CellMeasurements:
    """What a cell attack measured, and what it cost.

    Attributes:
        plan: the plan the values were measured under (its code gives the cells).
        values: cell -> the returned mean Dice of that cell's predictor.
        all_foreground: the Dice of the whole-image predictor (nan if not measured).
        num_cases: the evaluation cases the site averages over (``query.hello``).
        queries: predictors (or label-source sets) the site scored.
        requests: messages sent, refused ones included.
        runs: run ids the attack used (a new one whenever a per-run cap bound).
        units: query units the site charged, as the attacker counts them.
        limits: the ``limits.*`` caps the site advertised (empty: none).
        refusals: one entry per error reply: request number, reason, fallback taken.
        adaptations: weaker plans taken without a refusal (values rounded away).
        crafting: what crafting the pattern models cost (offline).
        seconds: wall time of the whole attack, crafting included.
    """

    plan: AttackPlan
    values: dict[int, float]
    all_foreground: float
    num_cases: int
    queries: int
    requests: int
    runs: int
    units: int
    limits: dict[str, int]
    refusals: tuple[dict[str, object], ...]
    adaptations: tuple[dict[str, object], ...]
    crafting: dict[str, object]
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CraftedSet:
    """The pattern models of one construction, checked offline.

    Attributes:
        models: the code's pattern models and the whole-image one, by name.
        cost: what crafting them cost (models, training steps, seconds).
        unusable: cells whose predictor does not paint exactly its cell (a model
            that did not converge); they are never asked about.
        margin: the smallest ``|p(fg) - p(bg)|`` of any usable cell predictor: how
            far from a tie the site's arithmetic may drift (float16 on a GPU site)
            before a region changes.
    """

    models: dict[str, Arrays]
    cost: dict[str, object]
    unusable: frozenset[int]
    margin: float


# Crafted sets by (code, model, data, seed), reused within one process: crafting is
# the attacker's offline work, done once per construction (a reuse costs nothing and
# is reported as such).
_CRAFTED: dict[tuple[object, ...], CraftedSet] = {}


def crafted_models(plan: AttackPlan, costs: list[dict[str, object]]) -> CraftedSet:
    """The plan's crafted set; what crafting it cost goes into ``costs``."""
    config = plan.config
    code = plan.code()
    key = (code, config.model, config.data, config.train.seed)
    if key in _CRAFTED:
        crafted = _CRAFTED[key]
        costs.append(
            {**crafted.cost, "seconds": 0.0, "training_steps": 0, "reused": True}
        )
        return crafted
    models, cost = craft_code_models(config, code, seed=config.train.seed)
    everything = craft_pattern_model(
        config,
        np.ones((code.size, code.size), dtype=bool),
        on_level=code.on_level(),
        seed=config.train.seed + len(models),
    )
    models[ALL_FOREGROUND] = everything.weights
    unusable, margin = _check_regions(plan, models)
    cost = {
        **cost,
        "models": len(models),
        "training_steps": int(_number(cost["training_steps"])) + everything.steps,
        "seconds": round(_number(cost["seconds"]) + everything.seconds, 2),
        "unusable_cells": len(unusable),
        "min_margin": round(margin, 4),
    }
    if len(_CRAFTED) >= 4:  # a few constructions at most; weights are megabytes
        _CRAFTED.clear()
    crafted = CraftedSet(models=models, cost=cost, unusable=unusable, margin=margin)
    _CRAFTED[key] = crafted
    costs.append(cost)
    return crafted


def _check_regions(
    plan: AttackPlan, models: Mapping[str, Arrays]
) -> tuple[frozenset[int], float]:
    """Offline: cells whose predictor misses its cell; the others' smallest margin."""
    code = plan.code()
    maps = pattern_probabilities(models, plan.config)
    predictors = {cell: code.members(cell) for cell in range(code.num_cells)}
    unusable, margins = set(), []
    for cell, region in predictor_regions(maps, predictors).items():
        if np.array_equal(region.foreground, code.cell_map(cell)):
            margins.append(region.margin)
        else:
            unusable.add(cell)
    return frozenset(unusable), min(margins, default=0.0)


def _next_batch(plan: AttackPlan, cells: Sequence[int], room: int) -> list[int]:
    """The first cells of ``cells`` one request may ask about.

    At most ``room`` cells, and no more models than the plan's cap (the whole-image
    predictor, :data:`WHOLE`, needs its own model).
    """
    code = plan.code()
    batch: list[int] = []
    models: set[str] = set()
    for cell in cells:
        needed = (
            {ALL_FOREGROUND}
            if cell == WHOLE
            else {name for name, _ in code.members(cell)}
        )
        over_models = (
            plan.models_per_request and len(models | needed) > plan.models_per_request
        )
        if batch and (len(batch) >= room or over_models):
            break
        batch.append(cell)
        models |= needed
    return batch


def _tile_order(code: PixelCode, tile: int) -> list[int]:
    """Cells in square tiles of ``tile`` cells a side (few stripes per tile)."""
    side = code.cells_per_side
    return [
        row * side + column
        for top in range(0, side, tile)
        for left in range(0, side, tile)
        for row in range(top, min(top + tile, side))
        for column in range(left, min(left + tile, side))
    ]


Ask = Callable[
    [SiteChannel, AttackPlan, Mapping[str, Arrays], Sequence[int]],
    tuple[dict[int, float], float, str | None],
]


@dataclasses.dataclass(slots=True, kw_only=True)
class _Spending:
    """The attacker's own count of what the site charged it."""

    run: int = 0  # query units charged in the current run
    total: int = 0  # query units charged at the site
    runs: int = 1  # run ids used

    def charge(self, units: int) -> None:
        self.run += units
        self.total += units

    def new_run(self) -> None:
        self.run = 0
        self.runs += 1


def _room(plan: AttackPlan, spending: _Spending, cost: int) -> tuple[int, str]:
    """Cells the next request may ask about; or 0 and why.

    ``run``: this run's cap is used (a new run id); ``budget``: the query budget is
    spent; ``cap``: a run's cap is below what one cell costs (both stop the attack).
    """
    room = plan.predictors_per_request
    if plan.budget:
        left = plan.budget - spending.total
        if left < cost:
            return 0, "budget"
        room = min(room, left // cost)
    if plan.units_per_run:
        if plan.units_per_run < cost:  # not even a fresh run pays for one cell
            return 0, "cap"
        left_in_run = plan.units_per_run - spending.run
        if left_in_run < cost:
            return 0, "run"
        room = min(room, left_in_run // cost)
    return room, ""


def measure_cells(
    channel: SiteChannel,
    plan: AttackPlan,
    ask: Ask,
    *,
    kind: str,
    progress: Callable[[str], None],
) -> CellMeasurements:
    """Ask about every cell of the plan's code, within the site's limits.

    ``query.hello`` first: its applied policy states the site's limits, and the plan
    is fitted to them (:func:`plan_within_limits`): when the run's cap is reached the
    attack moves to a new run id, and it stops when the query budget is spent. A
    refusal all the same goes through the fallbacks; one that changes the code (other
    cells, other models) starts the cells over, dropping values measured under the
    old code.

    Args:
        channel: the site.
        plan: the attacker's wish, before the site's limits.
        ask: ``ask(channel, plan, models, cells)`` sends one request and returns the
            cells' values, the whole-image value (nan if not asked) and the error
            (None if none); :data:`WHOLE` among the cells asks for the whole image.
        kind: what a cell is charged as (``core.privacy.limits.PREDICTORS``,
        ``CANDIDATES``
            or ``LABEL_SOURCES``).
        progress: called with progress lines.
    """
    started = time.perf_counter()
    costs: list[dict[str, object]] = []
    refusals: list[dict[str, object]] = []
    adaptations: list[dict[str, object]] = []
    hello = say_hello(channel, plan.run_config, plan.run_id)
    requests, queries = 1, 0
    values: dict[int, float] = {}
    whole = math.nan
    if hello.error is not None:
        refusals.append(
            {
                "request": requests,
                "message_type": protocol.HELLO,
                "reason": hello.error,
                "fallback": "",
            }
        )
        plan = dataclasses.replace(plan, stopped=f"refused: {hello.error}")
    else:
        plan = plan_within_limits(plan, hello.limits, kind=kind)
    spending = _Spending()
    run_requests = 0
    crafted: CraftedSet | None = None
    crafted_for: AttackPlan | None = None
    while not plan.stopped:
        code = plan.code()
        if crafted_for is None or (crafted_for.code(), crafted_for.config) != (
            code,
            plan.config,
        ):
            crafted, crafted_for = crafted_models(plan, costs), plan
        assert crafted is not None
        tile = max(1, (plan.models_per_request or 2 * code.cells_per_side) // 2)
        pending = [WHOLE] if plan.whole_image and math.isnan(whole) else []
        pending += [
            cell
            for cell in _tile_order(code, tile)
            if cell not in values and cell not in crafted.unusable
        ]
        if pending == [WHOLE] or not pending:
            coarser = coarser_cells_when_values_vanish(plan, values, whole)
            if coarser is None:
                break
            adaptations.append(
                {
                    "after_request": requests,
                    "reason": f"every cell scored 0, the whole image {whole:.4g}",
                    "fallback": coarser_cells_when_values_vanish.__name__,
                }
            )
            plan, values = coarser, {}
            continue
        cost = units_per_cell(plan, kind)
        room, bound = _room(plan, spending, cost)
        if bound == "run":
            plan = dataclasses.replace(plan, run_id=plan.run_id + 1)
            spending.new_run()
            run_requests = 0
            continue
        if bound == "budget":
            plan = dataclasses.replace(
                plan,
                stopped=f"query budget spent: {spending.total} of the "
                f"{plan.budget} units the site answers",
            )
            break
        if bound == "cap":
            plan = dataclasses.replace(
                plan,
                stopped=f"a cell costs {cost} units, the site answers "
                f"{plan.units_per_run} a run",
            )
            break
        batch = _next_batch(plan, pending, room)
        requests += 1
        run_requests += 1
        found, whole_value, error = ask(channel, plan, crafted.models, batch)
        if error is None:
            spending.charge(len(batch) * cost)
            values.update(found)
            queries += len(found) + (0 if math.isnan(whole_value) else 1)
            whole = whole_value if math.isnan(whole) else whole
            if len(values) % 256 < len(found):
                progress(f"  {len(values)}/{code.num_cells} cells measured")
            continue
        if not error.startswith(GUARD_REFUSAL):
            # Refused by the handler, after the site charged the request.
            spending.charge(len(batch) * cost)
        weaker, fallback = adapt_to_refusal(plan, error, first_of_run=run_requests == 1)
        refusals.append({"request": requests, "reason": error, "fallback": fallback})
        progress(f"  refused ({error[:160]}); fallback: {fallback or 'stop'}")
        if weaker.run_id != plan.run_id:
            spending.new_run()
            run_requests = 0
        if weaker.code() != code or weaker.run_config != plan.run_config:
            values, whole = {}, math.nan
        plan = weaker
        if len(refusals) >= MAX_REFUSALS:
            plan = dataclasses.replace(plan, stopped=f"{MAX_REFUSALS} refusals")
    return CellMeasurements(
        plan=plan,
        values=values,
        all_foreground=whole,
        num_cases=hello.evaluation,
        queries=queries,
        requests=requests,
        runs=spending.runs,
        units=spending.total,
        limits=hello.limits,
        refusals=tuple(refusals),
        adaptations=tuple(adaptations),
        crafting=_total_cost(costs),
        seconds=time.perf_counter() - started,
    )


def _number(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _total_cost(costs: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """What crafting every construction the attack used cost, offline."""

    def total(key: str) -> float:
        return math.fsum(_number(cost[key]) for cost in costs)

    return {
        "models": int(total("models")),
        "training_steps": int(total("training_steps")),
        "seconds": round(total("seconds"), 2),
        "reused": any(cost.get("reused", False) for cost in costs),
        "unusable_cells": int(total("unusable_cells")),
        "min_margin": min(
            (_number(cost["min_margin"]) for cost in costs), default=math.nan
        ),
        "unconverged": [
            name
            for cost in costs
            for name in cost["unconverged"]  # type: ignore[attr-defined]
        ],
    }


def ask_evaluate(
    channel: SiteChannel,
    plan: AttackPlan,
    models: Mapping[str, Arrays],
    cells: Sequence[int],
) -> tuple[dict[int, float], float, str | None]:
    """One ``evaluate`` request: a predictor per cell (:data:`WHOLE`: whole image)."""
    code = plan.code()
    predictors = {f"c{cell}": code.members(cell) for cell in cells if cell != WHOLE}
    if WHOLE in cells:
        predictors[ALL_FOREGROUND] = [(ALL_FOREGROUND, 1.0)]
    used = {name for members in predictors.values() for name, _ in members}
    content = request_content(
        {name: models[name] for name in sorted(used)},
        protocol.EvaluateRequest(predictors=predictors).to_fields(),
    )
    reply = channel.send(
        protocol.EVALUATE, content, run_id=plan.run_id, run_config=plan.run_config
    )
    if reply.error is not None:
        return {}, math.nan, reply.error
    dice = protocol.EvaluateReply.from_fields(reply.metrics).dice
    found = {
        cell: dice[f"c{cell}"] for cell in cells if cell != WHOLE and f"c{cell}" in dice
    }
    return found, dice.get(ALL_FOREGROUND, math.nan), None


def ask_consensus(
    channel: SiteChannel,
    plan: AttackPlan,
    models: Mapping[str, Arrays],
    cells: Sequence[int],
) -> tuple[dict[int, float], float, str | None]:
    """One ``train.consensus`` request: the first cell's models as label sources."""
    cell = cells[0]
    sources = [name for name, _ in plan.code().members(cell)]
    content = request_content(
        {name: models[name] for name in sources},
        protocol.ConsensusRequest(
            label_sources=tuple(sources), start=sources[0]
        ).to_fields(),
    )
    reply = channel.send(
        protocol.CONSENSUS, content, run_id=plan.run_id, run_config=plan.run_config
    )
    if reply.error is not None:
        return {}, math.nan, reply.error
    label_dice = protocol.ConsensusReply.from_fields(reply.metrics).label_dice
    return {cell: label_dice["majority"]}, math.nan, None
