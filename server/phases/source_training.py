"""The source-training phase: every labelled source trains a model on its own data.

Only weights and how they were trained arrive; the models are saved in the run store.
"""

from __future__ import annotations

from collections.abc import Mapping

from core import protocol
from core.training.job import build_initial_weights
from core.training.networks import Arrays
from server import records
from server.coordinator import (
    Coordinator,
    PhaseError,
    SiteInfo,
    names_by_site,
)
from server.results import SourceTrainingResult


def run(
    coordinator: Coordinator, sources: Mapping[int, SiteInfo]
) -> tuple[SourceTrainingResult, dict[str, Arrays]]:
    """Phase 2: every source trains a model on its own labels; result, weights."""
    config = coordinator.config
    initial = build_initial_weights(config)
    coordinator.log(f"source training at {sorted(s.name for s in sources.values())}")
    replies = coordinator.ask(
        {node: records.build_request(weights=initial) for node in sources},
        protocol.TRAIN_SOURCE,
    )
    models, training = {}, {}
    failed = dict(replies.failed)
    for node, reply in replies.ok.items():
        name = sources[node].name
        try:
            weights = records.read_weights(reply.content)
            report = protocol.TrainReply.from_fields(
                records.read_metrics(reply.content)
            )
        except ValueError as error:
            failed[node] = f"malformed reply: {error}"
            continue
        models[name] = weights
        coordinator.store.save_model(f"source-{name}", weights)
        training[name] = report.to_fields()
        privacy = (
            f", DP epsilon {report.epsilon_spent:.3f} (site total "
            f"{report.epsilon_total:.3f}, delta {report.delta:g})"
            if report.private
            else ""
        )
        decided = (
            ""
            if report.largest_component is None
            else f", largest component {'on' if report.postprocess else 'off'}"
            + (
                ""
                if report.dice_raw is None or report.dice_postprocessed is None
                else f" (its Dice {report.dice_raw:.3f} raw, "
                f"{report.dice_postprocessed:.3f} post-processed)"
            )
        )
        coordinator.log(
            f"source {name}: loss {report.loss:.4f}, {report.num_examples} "
            f"examples{privacy}{decided}"
        )
    required = min(config.federation.min_sites, len(sources))
    if len(models) < max(required, 1):
        raise PhaseError(
            f"source training: {len(models)} source model(s) arrived, "
            f"{required} needed; failures: {names_by_site(sources, failed)}",
            phase="source-training",
            missing=names_by_site(sources, failed),
        )
    missing = names_by_site(sources, failed)
    result = SourceTrainingResult(training=training, missing=missing)
    coordinator.store.save_result(result)
    return result, models
