"""The evaluation phase: every predictor scored on the target's labelled cases.

``build_predictors`` names the predictors (each candidate alone, the uniform average
of the label-free ones, each TGMA choice's predictor (its adapted pair, or its
voters' average) and its main model, the consensus and semisup models);
``model_label_use`` says what every evaluated model used of the target's labels,
from the phases' results. The target sends back mean Dice and HD95 per
predictor, never per-case figures; the result records each predictor's label use
(its models' uses joined), by which the report groups them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Final

from core import protocol
from core.config import SelectionRule
from core.training.networks import Arrays
from core.transfer.transferability import predicts_by_ensemble
from server import records
from server.coordinator import (
    ADAPTED_START,
    Coordinator,
    SiteInfo,
    ask_target,
)
from server.phases.adaptation import FEW_LABEL_PREFIX, LABEL_FREE_PREFIX
from server.phases.affinity import SEQTRAN_CANDIDATE
from server.results import (
    AdaptationResult,
    ConsensusResult,
    EvaluationResult,
    LabelUse,
    PairSelection,
    SemisupResult,
    TransferabilityResult,
)

# Each TGMA pair's predictor names by the prefix of its adapted models.
TGMA_PREDICTORS: Final = {LABEL_FREE_PREFIX: "tgma", FEW_LABEL_PREFIX: "tgma-few-label"}


def _pair_predictors(
    prefix: str, selection: PairSelection, *, ensemble: bool
) -> dict[str, list[tuple[str, float]]]:
    """TGMA's predictor and its parts: the adapted pair, its main alone.

    With ``ensemble`` (:func:`core.transfer.transferability.predicts_by_ensemble`)
    TGMA's predictor is the voters' uniform average, and the adapted pair is still
    reported, as ``<name>-pair``.
    """
    pair = [(f"{prefix}:main", selection.weights.main)]
    if selection.aux:
        pair.append((f"{prefix}:aux", selection.weights.aux))
    name = TGMA_PREDICTORS[prefix]
    predictors = {name: pair, f"{name}-main": [(f"{prefix}:main", 1.0)]}
    if ensemble:
        voters = sorted(selection.voting)
        predictors[name] = [(f"source:{voter}", 1.0 / len(voters)) for voter in voters]
        predictors[f"{name}-pair"] = pair
    return predictors


def build_predictors(
    selection: TransferabilityResult,
    *,
    adapted: Collection[str],
    later_models: Sequence[str] = (),
    ensemble_min_voters: int = 0,
) -> dict[str, list[tuple[str, float]]]:
    """The predictors every report compares.

    Each candidate alone (``source:<name>``), the uniform average of the label-free
    candidates (``uniform``: a few-label one would make it few-label), each TGMA
    pair whose models were adapted (``adapted`` holds their names: ``tgma`` and
    ``tgma-main`` from ``adapted:main``/``adapted:aux``, ``tgma-few-label`` and
    ``tgma-few-label-main`` from ``adapted-few-label:...``), and each model the
    later phases trained, alone (``consensus:<method>``, ``semisup:<scope>``). A
    TGMA choice with at least ``ensemble_min_voters`` voters under the agreement
    selection predicts by their uniform average, its adapted pair then reported as
    ``tgma-pair`` (``tgma-few-label-pair``).

    Example:
        >>> from server.results import LabelUse, PairSelection, PairWeights
        >>> pair = PairSelection(candidates=("B", "C"), main="B", aux="C",
        ...     weights=PairWeights(main=0.6, aux=0.4), label_use=LabelUse())
        >>> sel = TransferabilityResult(metric="lftm", release="instance",
        ...     sources=("B", "C"), itm=None, dtm={"B": 0.8, "C": 0.7},
        ...     candidates={"B": LabelUse(), "C": LabelUse()}, label_free=pair,
        ...     few_label=None)
        >>> sorted(build_predictors(sel, adapted=["adapted:main", "adapted:aux"],
        ...                         later_models=["consensus:deepstaple"]))
        ['consensus:deepstaple', 'source:B', 'source:C', 'tgma', 'tgma-main', 'uniform']
    """
    sources = sorted(selection.sources)
    predictors: dict[str, list[tuple[str, float]]] = {
        f"source:{name}": [(f"source:{name}", 1.0)] for name in sources
    }
    label_free = [name for name in sources if selection.candidates[name].label_free]
    predictors["uniform"] = [
        (f"source:{name}", 1.0 / len(label_free)) for name in label_free
    ]
    for prefix, pair in (
        (LABEL_FREE_PREFIX, selection.label_free),
        (FEW_LABEL_PREFIX, selection.few_label),
    ):
        if pair is not None and f"{prefix}:main" in adapted:
            ensemble = predicts_by_ensemble(
                pair.voting,
                rule=SelectionRule(selection.selection),
                min_voters=ensemble_min_voters,
            )
            predictors.update(_pair_predictors(prefix, pair, ensemble=ensemble))
    for name in later_models:
        predictors[name] = [(name, 1.0)]
    return predictors


def model_label_use(
    selection: TransferabilityResult,
    adaptation: AdaptationResult | None = None,
    consensus: ConsensusResult | None = None,
    semisup: SemisupResult | None = None,
) -> dict[str, LabelUse]:
    """What every model the evaluation may score used of the target's labels.

    Keyed by the models' evaluation names (``source:<name>``, ``adapted:main``,
    ``consensus:<method>``, ...), from the phases' persisted results.
    """
    uses = {f"source:{name}": use for name, use in selection.candidates.items()}
    for pair in () if adaptation is None else adaptation.pairs:
        uses.update({name: pair.label_use for name in pair.evaluation_names().values()})
    if consensus is not None:
        uses.update({f"consensus:{m}": consensus.label_use for m in consensus.models})
    if semisup is not None:
        uses.update({f"semisup:{s}": semisup.label_use[s] for s in semisup.models})
    return uses


def model_postprocess(
    decisions: Mapping[str, bool],
    selection: TransferabilityResult,
    *,
    models: Collection[str],
    seqtran_from: str | None = None,
    semisup_start: str = ADAPTED_START,
) -> dict[str, bool]:
    """Whether each evaluated model's predictions keep the largest component.

    A model inherits the decision of the source model it was made from
    (docs/methods.md#post-processing): ``source:<name>`` its source's own decision;
    the SeqTran candidate that of the source its path started from
    (``seqtran_from``); an adapted model that of the candidate it adapted (the
    pair's main or aux); the consensus and semisup models that of the adapted main
    they were trained from (``adapted:main``; semisup from a fresh student when
    ``semisup_start`` is not it: off). A model of unknown lineage is off.

    Args:
        decisions: per source, its decision (``SourceTrainingResult.postprocess``).
        selection: the transferability result (the pairs' main and aux).
        models: the evaluated models' names.
        seqtran_from: the first site of the SeqTran path, if there is a candidate.
        semisup_start: what the semisup students started from.

    Example:
        >>> from server.results import LabelUse, PairSelection, PairWeights
        >>> pair = PairSelection(candidates=("B", "C"), main="C", aux="B",
        ...     weights=PairWeights(main=0.6, aux=0.4), label_use=LabelUse())
        >>> sel = TransferabilityResult(metric="lftm", release="instance",
        ...     sources=("B", "C"), itm=None, dtm={"B": 0.7, "C": 0.8},
        ...     candidates={"B": LabelUse(), "C": LabelUse()}, label_free=pair,
        ...     few_label=None)
        >>> flags = model_postprocess({"B": True, "C": False}, sel, models=[
        ...     "source:B", "adapted:main", "adapted:aux", "consensus:staple"])
        >>> [name for name, on in flags.items() if on]
        ['source:B', 'adapted:aux']
    """
    own = dict(decisions)
    if seqtran_from is not None:
        own[SEQTRAN_CANDIDATE] = decisions.get(seqtran_from, False)
    flags = {f"source:{name}": own.get(name, False) for name in selection.sources}
    for prefix, pair in (
        (LABEL_FREE_PREFIX, selection.label_free),
        (FEW_LABEL_PREFIX, selection.few_label),
    ):
        if pair is None:
            continue
        flags[f"{prefix}:main"] = own.get(pair.main, False)
        if pair.aux:
            flags[f"{prefix}:aux"] = own.get(pair.aux, False)
    start = flags.get(ADAPTED_START, False)
    result = {}
    for name in models:
        if name.startswith("consensus:"):
            result[name] = start
        elif name.startswith("semisup:"):
            result[name] = start and semisup_start == ADAPTED_START
        else:
            result[name] = flags.get(name, False)
    return result


def postprocessed_predictors(
    predictors: Mapping[str, Sequence[tuple[str, float]]],
    model_flags: Mapping[str, bool],
) -> tuple[str, ...]:
    """The predictors the target post-processes: a weighted majority of their models.

    A predictor is post-processed when the models whose source decided "on" carry
    more than half of its weight (a single model: its own decision; a tie: off, as
    nnU-Net keeps a post-processing only when it is shown to help).

    Example:
        >>> postprocessed_predictors(
        ...     {"b": [("B", 1.0)], "pair": [("B", 0.6), ("C", 0.4)],
        ...      "even": [("B", 0.5), ("C", 0.5)]}, {"B": True, "C": False})
        ('b', 'pair')
    """
    chosen = []
    for name, members in predictors.items():
        total = sum(weight for _, weight in members)
        on = sum(weight for model, weight in members if model_flags.get(model, False))
        if total > 0 and on > total / 2:
            chosen.append(name)
    return tuple(chosen)


def run(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    adapted: Mapping[str, Arrays],
    selection: TransferabilityResult,
    later_models: Mapping[str, Arrays] | None = None,
    *,
    label_use: Mapping[str, LabelUse],
    postprocess: Mapping[str, bool] | None = None,
) -> EvaluationResult:
    """Phase 8: the target scores every predictor on its evaluation labels.

    ``models`` are the candidates by name, ``adapted`` the adapted models by their
    evaluation names (``adapted:main``, ...), ``later_models`` the consensus and
    semisup phases' models under their ``consensus:<method>``/``semisup:<scope>``
    names; ``label_use`` what each of them used of the target's labels
    (:func:`model_label_use`); ``postprocess`` whether each model's source decided
    to keep the largest component (:func:`model_postprocess`; None: none did). The
    predictors :func:`postprocessed_predictors` picks are post-processed at the
    target, which sends their raw figures too.
    """
    later_models = later_models or {}
    named = {f"source:{name}": weights for name, weights in models.items()}
    named.update(adapted)
    named.update(later_models)
    predictors = build_predictors(
        selection,
        adapted=set(adapted),
        later_models=sorted(later_models),
        ensemble_min_voters=coordinator.config.transfer.ensemble_min_voters,
    )
    segment = coordinator.config.output.target_segmentations
    if segment and segment not in predictors:
        coordinator.warn(
            f"evaluation: output.target-segmentations names {segment!r}, which this "
            "run did not produce; the target writes no segmentations"
        )
        segment = ""
    postprocessed = postprocessed_predictors(predictors, postprocess or {})
    request = protocol.EvaluateRequest(
        predictors=predictors, segment=segment, postprocess=postprocessed
    )
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
        label_use={
            name: LabelUse.joined(label_use[model] for model, _ in members)
            for name, members in predictors.items()
        },
        # Under the target's DP the Dice are noised and HD95 withheld; the figures
        # say what the release cost.
        privacy={
            key: value
            for key, value in scores.to_fields().items()
            if key in protocol.DP_METRICS
        },
        segmented=segment if scores.segmentations else "",
        segmentations=scores.segmentations,
        segmentations_run=reply.metadata.run_id if scores.segmentations else 0,
        postprocessed=postprocessed,
        dice_raw=dict(scores.dice_raw),
        hd95_raw_mm=dict(scores.hd95_raw_mm),
    )
    coordinator.store.save_result(result)
    coordinator.log(
        "evaluation: "
        + ", ".join(f"{name} {value:.3f}" for name, value in scores.dice.items())
    )
    if postprocessed:
        coordinator.log(
            "evaluation: post-processed (largest component; raw Dice): "
            + ", ".join(
                f"{name} ({scores.dice_raw.get(name, float('nan')):.3f})"
                for name in postprocessed
            )
        )
    return result
