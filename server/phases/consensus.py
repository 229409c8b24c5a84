"""The consensus phase (DeepSTAPLE, docs/methods.md#deepstaple) at the target.

The target fuses its label sources (the candidates' and the adapted model's
predictions, atlases) by majority vote, STAPLE and DeepSTAPLE, trains one model per
consensus and sends back only those models and aggregate figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from core import protocol
from core.training.networks import Arrays
from server import records
from server.coordinator import (
    ADAPTED_START,
    Coordinator,
    PhaseError,
    SiteInfo,
    ask_target,
)
from server.results import ConsensusResult


def run(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    adapted: Mapping[str, Arrays],
) -> tuple[ConsensusResult, dict[str, Arrays]]:
    """Phase 6: the target fuses the sources' predictions (and its atlases' labels).

    The target builds its noisy label set, learns DeepSTAPLE data parameters, keeps
    the consensus labels and trains the adapted main model on each consensus; only
    aggregate figures and those models come back.
    """
    request = protocol.ConsensusRequest(
        label_sources=tuple(sorted(models)), start=ADAPTED_START
    )
    try:
        reply = ask_target(
            coordinator,
            target,
            records.build_request(
                settings=request.to_fields(),
                models={**models, ADAPTED_START: adapted["main"]},
            ),
            protocol.CONSENSUS,
            "consensus",
        )
    except PhaseError as error:
        if not error.refused:
            raise
        # The target's policy refuses consensus (e.g. it requires DP, which
        # DeepSTAPLE has no form of): an optional phase, so the run goes on.
        reason = error.missing.get(target.name, str(error))
        skipped = ConsensusResult(models=(), skipped=reason)
        coordinator.store.save_result(skipped)
        coordinator.warn(f"consensus: skipped, the target refused it: {reason}")
        return skipped, {}
    trained = records.read_named_models(reply.content)
    if "deepstaple" not in trained:
        raise PhaseError(
            f"consensus: target {target.name} returned no DeepSTAPLE-trained model"
        )
    outcome = protocol.ConsensusReply.from_fields(records.read_metrics(reply.content))
    for method, weights in trained.items():
        coordinator.store.save_model(f"consensus-{method}", weights)
    result = ConsensusResult(
        models=tuple(sorted(trained)),
        sources=tuple(sorted(outcome.data_parameter)),
        outcome=dataclasses.asdict(outcome),
    )
    coordinator.store.save_result(result)
    coordinator.log(
        f"consensus: {outcome.num_labels} noisy labels on {outcome.num_images} "
        "images; mean data parameter "
        + ", ".join(f"{n} {v:.3f}" for n, v in outcome.data_parameter.items())
        + f"; {outcome.seconds:.1f} s at the target"
    )
    return result, trained
