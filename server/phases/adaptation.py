"""The adaptation phase (TGMA, docs/methods.md#tgma): the target adapts the pair.

The target adapts the chosen main/auxiliary pair on its unlabelled images and sends
back the adapted weights, saved as ``adapted-<name>`` in the run store.
"""

from __future__ import annotations

from collections.abc import Mapping

from core import protocol
from core.training.networks import Arrays
from server import records
from server.coordinator import (
    Coordinator,
    PhaseError,
    SiteInfo,
    ask_target,
)
from server.results import AdaptationResult, TransferabilityResult


def run(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    selection: TransferabilityResult,
) -> tuple[AdaptationResult, dict[str, Arrays]]:
    """Phase 5: the target adapts the main/aux pair on its images; result, models.

    Only the pseudo-label voters (``selection.voters``) are sent: the target's
    pseudo-labels are formed from the candidates it receives.
    """
    request = protocol.AdaptRequest(
        main=selection.main,
        aux=selection.aux or "",
        weight_main=selection.weights.main,
        weight_aux=selection.weights.aux,
    )
    reply = ask_target(
        coordinator,
        target,
        records.build_request(
            settings=request.to_fields(), models=selection.voter_models(models)
        ),
        protocol.ADAPT,
        "adaptation",
    )
    adapted = records.read_named_models(reply.content)
    if "main" not in adapted:
        raise PhaseError(f"adaptation: target {target.name} returned no adapted model")
    for name, weights in adapted.items():
        coordinator.store.save_model(f"adapted-{name}", weights)
    outcome = protocol.AdaptReply.from_fields(records.read_metrics(reply.content))
    result = AdaptationResult(
        site=target.name, models=tuple(sorted(adapted)), reply=outcome.to_fields()
    )
    coordinator.store.save_result(result)
    coordinator.log(
        f"adaptation: {outcome.num_examples} examples, "
        f"{outcome.pseudo_label_foreground:.3f} pseudo-foreground, "
        f"{outcome.seconds:.1f} s at the target"
    )
    return result, adapted
