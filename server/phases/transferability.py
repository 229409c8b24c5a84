"""The transferability phase (TGMA, docs/methods.md#tgma): LFTM scores, main and aux.

The target scores every candidate on its own unlabelled images (ITM, per case, names
withheld) and measures how far their predictions agree; the coordinator chooses the
main and auxiliary sources and the pseudo-label voters by ``transfer.selection``.
"""

from __future__ import annotations

from collections.abc import Mapping

from core import protocol
from core.config import SelectionRule
from core.training.networks import Arrays
from core.transfer.job import Transferability
from core.transfer.transferability import select_sources
from server import records
from server.coordinator import (
    Coordinator,
    SiteInfo,
    ask_target,
)
from server.results import PairWeights, TransferabilityResult


def run(
    coordinator: Coordinator, target: SiteInfo, models: Mapping[str, Arrays]
) -> TransferabilityResult:
    """Phase 4: the target scores every source model (ITM); choose main/aux.

    Under ``transfer.selection = "agreement"`` a target that sent no agreement (an
    earlier release) gets the paper's DTM selection, with a warning.
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
    transfer = coordinator.config.transfer
    agreement = lftm.agreement_by_name()
    rule = transfer.selection
    if rule is SelectionRule.AGREEMENT and agreement is None:
        coordinator.warn(
            f"transferability: target {target.name} sent no agreement between the "
            "candidates (an earlier release); selecting by DTM alone"
        )
        rule = SelectionRule.DTM
    selection = select_sources(
        dtm,
        rule=rule,
        agreement=agreement,
        threshold=transfer.agreement_threshold,
    )
    result = TransferabilityResult(
        metric=lftm.metric,
        release=lftm.release,
        sources=tuple(lftm.sources),
        itm=None if itm is None else tuple(tuple(row) for row in itm),
        dtm=dict(dtm),
        main=selection.main,
        aux=selection.aux,
        weights=PairWeights(main=selection.weight_main, aux=selection.weight_aux),
        selection=rule.value,
        agreement=None
        if lftm.agreement is None
        else tuple(tuple(lftm.agreement[name]) for name in lftm.sources),
        voters=selection.voters,
    )
    coordinator.store.save_result(result)
    coordinator.log(
        "DTM "
        + ", ".join(f"{n} {v:.3f}" for n, v in dtm.items())
        + f" -> main {selection.main}, aux {selection.aux} ({rule.value} selection; "
        f"pseudo-labels from {', '.join(selection.voters)})"
    )
    return result
