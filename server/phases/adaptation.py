"""The adaptation phase (TGMA, docs/methods.md#tgma): the target adapts the pair.

The target adapts the chosen main/auxiliary pair on its unlabelled images and sends
back the adapted weights. TGMA proper is the label-free choice: only the label-free
candidates are sent, so its pseudo-labels' ITM mixes no model that saw a target label;
its models are ``adapted:<name>`` (``adapted-<name>`` in the run store). When the
transferability phase also chose among all candidates (a few-label one among them),
a second adaptation sends all of them: ``adapted-few-label:<name>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from core import protocol
from core.training.networks import Arrays
from server import records
from server.coordinator import (
    Coordinator,
    PhaseError,
    SiteInfo,
    ask_target,
)
from server.results import (
    AdaptationResult,
    AdaptedPair,
    PairSelection,
    TransferabilityResult,
)
from server.store import RunStore

LABEL_FREE_PREFIX: Final = "adapted"  # adapted:main is where consensus/semisup start
FEW_LABEL_PREFIX: Final = "adapted-few-label"


def _adapt(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    selection: PairSelection,
    prefix: str,
) -> tuple[AdaptedPair, dict[str, Arrays]]:
    """One adaptation of ``selection``'s pair over its candidates alone."""
    request = protocol.AdaptRequest(
        main=selection.main,
        aux=selection.aux or "",
        weight_main=selection.weights.main,
        weight_aux=selection.weights.aux,
    )
    candidates = {name: models[name] for name in selection.voting}
    reply = ask_target(
        coordinator,
        target,
        records.build_request(settings=request.to_fields(), models=candidates),
        protocol.ADAPT,
        "adaptation",
    )
    adapted = records.read_named_models(reply.content)
    if "main" not in adapted:
        raise PhaseError(f"adaptation: target {target.name} returned no adapted model")
    outcome = protocol.AdaptReply.from_fields(records.read_metrics(reply.content))
    pair = AdaptedPair(
        prefix=prefix,
        models=tuple(sorted(adapted)),
        label_use=selection.label_use,
        reply=outcome.to_fields(),
    )
    coordinator.log(
        f"adaptation ({selection.label_use.group}, candidates "
        f"{', '.join(selection.voting)}): {outcome.num_examples} examples, "
        f"{outcome.pseudo_label_foreground:.3f} pseudo-foreground, "
        f"{outcome.seconds:.1f} s at the target"
    )
    names = pair.evaluation_names()
    return pair, {
        names[f"{prefix}-{name}"]: weights for name, weights in adapted.items()
    }


def run(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    selection: TransferabilityResult,
) -> tuple[AdaptationResult, dict[str, Arrays]]:
    """Phase 5: the target adapts each chosen pair on its images; result, models.

    Returns the phase's result and the adapted models by their evaluation names
    (``adapted:main``, ``adapted:aux``, ``adapted-few-label:main``, ...), saved in
    the run store under their pair's ``<prefix>-<name>``.
    """
    label_free, adapted = _adapt(
        coordinator, target, models, selection.label_free, LABEL_FREE_PREFIX
    )
    few_label: AdaptedPair | None = None
    if selection.few_label is not None:
        few_label, few_models = _adapt(
            coordinator, target, models, selection.few_label, FEW_LABEL_PREFIX
        )
        adapted.update(few_models)
    result = AdaptationResult(
        site=target.name, label_free=label_free, few_label=few_label
    )
    for pair in result.pairs:
        for stored, name in pair.evaluation_names().items():
            coordinator.store.save_model(stored, adapted[name])
    coordinator.store.save_result(result)
    return result, adapted


def reload(store: RunStore, result: AdaptationResult) -> dict[str, Arrays]:
    """The adapted models of a persisted result, by their evaluation names."""
    return {
        name: store.load_model(stored)
        for pair in result.pairs
        for stored, name in pair.evaluation_names().items()
    }
