"""The consensus phase (DeepSTAPLE, docs/methods.md#deepstaple) at the target.

The target fuses its label sources (the candidates' predictions, atlases) by majority
vote, STAPLE and DeepSTAPLE, trains the adapted main model on each consensus and
sends back only those models and aggregate figures. By default
(``consensus.label-sources = "label-free"``) the label sources are the candidates
that never saw a target label, so the consensus is label-free unless the target's
atlases join (their labels are target labels); the result records which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from core import protocol
from core.config import ConsensusSources
from core.training.networks import Arrays
from server import records
from server.coordinator import (
    ADAPTED_START,
    Coordinator,
    PhaseError,
    SiteInfo,
    ask_target,
)
from server.results import ConsensusResult, LabelUse


def consensus_label_use(
    target: str,
    *,
    sources: Mapping[str, LabelUse],
    start: LabelUse,
    num_atlases: int,
) -> LabelUse:
    """What the consensus models used of ``target``'s labels.

    Their label sources' uses, the start model's, and the atlases: a label
    registered from one of the target's atlases is a target label.

    Example:
        >>> consensus_label_use("A", sources={"B": LabelUse()}, start=LabelUse(),
        ...                     num_atlases=0).group
        'label-free'
        >>> consensus_label_use("A", sources={"B": LabelUse()}, start=LabelUse(),
        ...                     num_atlases=3).via
        ("consensus with labels registered from 3 of A's atlases",)
    """
    atlases = (
        [
            LabelUse(
                via=(
                    f"consensus with labels registered from {num_atlases} of "
                    f"{target}'s atlases",
                ),
                atlases=num_atlases,
            )
        ]
        if num_atlases
        else []
    )
    return LabelUse.joined([*sources.values(), start, *atlases])


def run(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    adapted: Mapping[str, Arrays],
    *,
    candidates: Mapping[str, LabelUse],
    start: LabelUse,
) -> tuple[ConsensusResult, dict[str, Arrays]]:
    """Phase 6: the target fuses the sources' predictions (and its atlases' labels).

    The target builds its noisy label set, learns DeepSTAPLE data parameters, keeps
    the consensus labels and trains the adapted main model (``adapted[ADAPTED_START]``,
    whose label use is ``start``) on each consensus; only aggregate figures and those
    models come back. ``candidates`` holds each candidate's label use: with
    ``consensus.label-sources = "label-free"`` only the label-free ones label.
    """
    label_free_only = (
        coordinator.config.consensus.label_sources is ConsensusSources.LABEL_FREE
    )
    sources = {
        name: candidates[name]
        for name in sorted(models)
        if candidates[name].label_free or not label_free_only
    }
    request = protocol.ConsensusRequest(
        label_sources=tuple(sources), start=ADAPTED_START
    )
    try:
        reply = ask_target(
            coordinator,
            target,
            records.build_request(
                settings=request.to_fields(),
                models={
                    **{name: models[name] for name in sources},
                    ADAPTED_START: adapted[ADAPTED_START],
                },
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
        skipped = ConsensusResult(models=(), label_use=LabelUse(), skipped=reason)
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
        label_use=consensus_label_use(
            target.name, sources=sources, start=start, num_atlases=outcome.num_atlases
        ),
        sources=tuple(sorted(outcome.data_parameter)),
        outcome=dataclasses.asdict(outcome),
    )
    coordinator.store.save_result(result)
    coordinator.log(
        f"consensus: {outcome.num_labels} noisy labels on {outcome.num_images} "
        "images; mean data parameter "
        + ", ".join(f"{n} {v:.3f}" for n, v in outcome.data_parameter.items())
        + f"; {outcome.seconds:.1f} s at the target; {result.label_use.group}"
    )
    return result, trained
