"""The transferability phase (TGMA, docs/methods.md#tgma): LFTM scores, main and aux.

The target scores every candidate on its own unlabelled images (ITM, per case, names
withheld) and measures how far their predictions agree; the coordinator chooses the
main and auxiliary sources and the pseudo-label voters by ``transfer.selection``: once
among the candidates that never saw a target label (TGMA proper, label-free) and, when
some candidate did (the SeqTran model fine-tuned at the target), once among all of
them (few-label; docs/methods.md#label-free-and-few-label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from core import protocol
from core.config import SelectionRule
from core.training.networks import Arrays
from core.transfer.job import Transferability
from core.transfer.transferability import select_sources
from server import records
from server.coordinator import (
    Coordinator,
    PhaseError,
    SiteInfo,
    ask_target,
)
from server.results import LabelUse, PairSelection, PairWeights, TransferabilityResult


def choose_pair(
    dtm: Mapping[str, float],
    candidates: Sequence[str],
    label_use: Mapping[str, LabelUse],
    *,
    rule: SelectionRule = SelectionRule.DTM,
    agreement: Mapping[str, Mapping[str, float]] | None = None,
    threshold: float = 0.5,
) -> PairSelection:
    """Main, aux and voters by ``rule`` among ``candidates`` alone; label use joined.

    Example:
        >>> few = LabelUse(via=("fine-tuned at A",), cases=2)
        >>> pair = choose_pair({"B": 0.6, "C": 0.8, "seqtran": 0.9}, ["B", "C"],
        ...                    {"B": LabelUse(), "C": LabelUse(), "seqtran": few})
        >>> pair.main, pair.aux, pair.label_use.group
        ('C', 'B', 'label-free')
    """
    selection = select_sources(
        {name: dtm[name] for name in candidates},
        rule=rule,
        agreement=agreement,
        threshold=threshold,
    )
    return PairSelection(
        candidates=tuple(candidates),
        main=selection.main,
        aux=selection.aux,
        weights=PairWeights(main=selection.weight_main, aux=selection.weight_aux),
        label_use=LabelUse.joined(label_use[name] for name in candidates),
        voters=selection.voters,
    )


def run(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    label_use: Mapping[str, LabelUse],
) -> TransferabilityResult:
    """Phase 4: the target scores every candidate (ITM); choose main/aux by DTM.

    ``label_use`` says what each candidate used of the target's labels. TGMA's
    choice (``label_free``) is among the label-free candidates only, so its
    adaptation never mixes a model that saw a target label into its pseudo-labels;
    when some candidate is few-label, a second choice among all of them
    (``few_label``) is made for the few-label TGMA.

    Under ``transfer.selection = "agreement"`` a target that sent no agreement (an
    earlier release) gets the paper's DTM selection, with a warning.

    Raises:
        PhaseError: the target failed, or no candidate is label-free.
    """
    reply = ask_target(
        coordinator,
        target,
        records.build_request(models=models),
        protocol.LFTM,
        "transferability",
    )
    lftm = protocol.LftmReply.from_fields(
        records.read_settings(reply.content), records.read_metrics(reply.content)
    )
    itm = lftm.itm_rows()
    dtm = (
        lftm.dtm
        if itm is None
        else Transferability(metric=lftm.metric, sources=lftm.sources, itm=itm).dtm
    )
    uses = {name: label_use[name] for name in lftm.sources}
    label_free = [name for name in lftm.sources if uses[name].label_free]
    if not label_free:
        raise PhaseError(
            f"transferability: every candidate ({', '.join(lftm.sources)}) used the "
            "target's labels, so there is no label-free TGMA"
        )
    transfer = coordinator.config.transfer
    agreement = lftm.agreement_by_name()
    rule = transfer.selection
    if rule is SelectionRule.AGREEMENT and agreement is None:
        coordinator.warn(
            f"transferability: target {target.name} sent no agreement between the "
            "candidates (an earlier release); selecting by DTM alone"
        )
        rule = SelectionRule.DTM

    def choose(candidates: Sequence[str]) -> PairSelection:
        return choose_pair(
            dtm,
            candidates,
            uses,
            rule=rule,
            agreement=agreement,
            threshold=transfer.agreement_threshold,
        )

    free_pair = choose(label_free)
    few_pair = (
        None if len(label_free) == len(lftm.sources) else choose(list(lftm.sources))
    )
    result = TransferabilityResult(
        metric=lftm.metric,
        release=lftm.release,
        sources=tuple(lftm.sources),
        itm=None if itm is None else tuple(tuple(row) for row in itm),
        dtm=dict(dtm),
        candidates=uses,
        label_free=free_pair,
        few_label=few_pair,
        selection=rule.value,
        agreement=None
        if lftm.agreement is None
        else tuple(tuple(lftm.agreement[name]) for name in lftm.sources),
    )
    coordinator.store.save_result(result)
    choices = [
        f"{pair.label_use.group}: main {pair.main}, aux {pair.aux}, pseudo-labels "
        f"from {', '.join(pair.voting)}"
        for pair in result.selections
    ]
    coordinator.log(
        "DTM "
        + ", ".join(f"{n} {v:.3f}" for n, v in dtm.items())
        + f" -> ({rule.value} selection) "
        + "; ".join(choices)
    )
    return result
