"""The evaluation phase: every predictor scored on the target's labelled cases.

``build_predictors`` names the predictors (each source alone, uniform, TGMA and its
main model, the consensus and semisup models); the target sends back mean Dice and
HD95 per predictor, never per-case figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from core import protocol
from core.training.networks import Arrays
from server import records
from server.coordinator import (
    Coordinator,
    SiteInfo,
    ask_target,
)
from server.results import EvaluationResult, TransferabilityResult


def build_predictors(
    sources: list[str],
    selection: TransferabilityResult,
    *,
    adapted: bool,
    later_models: Sequence[str] = (),
) -> dict[str, list[tuple[str, float]]]:
    """The predictors every report compares.

    Each source alone, their uniform average, the TGMA pair and its main model, and
    each model the later phases trained, alone. Model names are ``source:<name>``,
    ``adapted:main``/``adapted:aux``, ``consensus:<method>`` and
    ``semisup:<scope>``.

    Example:
        >>> from server.results import PairWeights
        >>> sel = TransferabilityResult(metric="lftm", release="instance",
        ...     sources=("B", "C"), itm=None, dtm={"B": 0.8, "C": 0.7}, main="B",
        ...     aux="C", weights=PairWeights(main=0.6, aux=0.4))
        >>> sorted(build_predictors(["B", "C"], sel, adapted=True,
        ...                         later_models=["consensus:deepstaple"]))
        ['consensus:deepstaple', 'source:B', 'source:C', 'tgma', 'tgma-main', 'uniform']
    """
    predictors: dict[str, list[tuple[str, float]]] = {
        f"source:{name}": [(f"source:{name}", 1.0)] for name in sources
    }
    predictors["uniform"] = [(f"source:{name}", 1.0 / len(sources)) for name in sources]
    if adapted:
        pair = [("adapted:main", selection.weights.main)]
        if selection.aux:
            pair.append(("adapted:aux", selection.weights.aux))
        predictors["tgma"] = pair
        predictors["tgma-main"] = [("adapted:main", 1.0)]
    for name in later_models:
        predictors[name] = [(name, 1.0)]
    return predictors


def run(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    adapted: Mapping[str, Arrays],
    selection: TransferabilityResult,
    later_models: Mapping[str, Arrays] | None = None,
) -> EvaluationResult:
    """Phase 8: the target scores every predictor on its evaluation labels.

    ``later_models`` are the consensus and semisup phases' models under their
    ``consensus:<method>``/``semisup:<scope>`` names.
    """
    later_models = later_models or {}
    named = {f"source:{name}": weights for name, weights in models.items()}
    named.update({f"adapted:{name}": weights for name, weights in adapted.items()})
    named.update(later_models)
    predictors = build_predictors(
        sorted(models),
        selection,
        adapted=bool(adapted),
        later_models=sorted(later_models),
    )
    request = protocol.EvaluateRequest(predictors=predictors)
    reply = ask_target(
        coordinator,
        target,
        records.build_request(settings=request.to_fields(), models=named),
        protocol.EVALUATE,
        "evaluation",
    )
    scores = protocol.EvaluateReply.from_fields(records.read_metrics(reply.content))
    result = EvaluationResult(
        site=target.name,
        num_cases=scores.num_cases,
        dice=dict(scores.dice),
        hd95_mm=dict(scores.hd95_mm),
        # Under the target's DP the Dice are noised and HD95 withheld; the figures
        # say what the release cost.
        privacy={
            key: value
            for key, value in scores.to_fields().items()
            if key in protocol.DP_METRICS
        },
    )
    coordinator.store.save_result(result)
    coordinator.log(
        "evaluation: "
        + ", ".join(f"{name} {value:.3f}" for name, value in scores.dice.items())
    )
    return result
