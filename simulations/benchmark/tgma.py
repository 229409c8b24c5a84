"""The ``tgma`` benchmark: leave-one-site-out TGMA against its baselines.

Leave-one-site-out over the synthetic federation: every site is the target in turn and
the others are its sources. Per target it reports the Dice of each source alone, the
uniform average of all sources, the TGMA pipeline with LFTM under the paper's DTM
selection and under SiteBridge's agreement selection (``transfer.selection``), the same
pipeline with the entropy score in place of LFTM, and a target-supervised oracle (the
target's own model trained on its labels), plus the Spearman correlation between each
score's DTM and the sources' true Dice on the target. It calls the same site jobs the
ClientApp calls (``core.training.job``, ``core.transfer.job``,
``core.training.evaluation``), without Flower in between. This module owns the run,
its JSON document and the table between the ``<!-- benchmark:tgma -->`` markers of
``docs/tgma-benchmark.md``; the command line is ``simulations.benchmark``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import torch

from core import metrics
from core.config import (
    ConfigValue,
    RunConfig,
    SelectionRule,
    TransferMetric,
    load_default_config,
)
from core.data.dataset import index_site, list_site_dirs
from core.logs import Countdown
from core.planning.rules import resolve_normalisation
from core.training.evaluation import evaluate_predictors
from core.training.job import build_initial_weights, train_source_model
from core.training.networks import Arrays
from core.transfer.job import (
    Transferability,
    adapt_target,
    score_candidates,
    select_pair,
)
from core.transfer.transferability import SourceSelection, predicts_by_ensemble
from simulations.benchmark.output import (
    describe_machine,
    leave_one_out_federation,
    log_progress,
    plan_offline,
)

TGMA_MARKER: Final = "benchmark:tgma"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdaptationResult:
    """One target's TGMA run with one transferability score."""

    dtm: dict[str, float]  # per source, as the score ranked them
    main: str
    aux: str | None
    voters: tuple[str, ...]
    dice: float  # the adapted main + aux pair, weighted
    dice_main_only: float
    dice_voters: float  # the voters' uniform average, not adapted


def spearman(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Spearman's rho (``core.metrics.spearman``); 0 when undefined.

    A constant side has no ranking information, and the benchmark averages rho over
    targets, so an undefined rho counts as no correlation rather than NaN.
    """
    return metrics.spearman(scores, truth, undefined=0.0)


def _evaluate_adaptation(
    site_dir: Path,
    sources: Mapping[str, Arrays],
    config: RunConfig,
    metric: TransferMetric,
    rules: Sequence[SelectionRule],
) -> dict[SelectionRule, AdaptationResult]:
    """Score with ``metric`` once; per selection rule, adapt and evaluate the pair."""
    metric_config = dataclasses.replace(
        config, transfer=dataclasses.replace(config.transfer, metric=metric)
    )
    transferability = score_candidates(site_dir, sources, metric_config)
    return {
        rule: _adapt_selected(
            site_dir,
            sources,
            metric_config,
            transferability,
            select_pair(transferability, config.transfer, rule=rule),
        )
        for rule in rules
    }


def _adapt_selected(
    site_dir: Path,
    sources: Mapping[str, Arrays],
    metric_config: RunConfig,
    transferability: Transferability,
    selection: SourceSelection,
) -> AdaptationResult:
    """Adapt the selected pair on pseudo-labels from its voters; evaluate it."""
    voters = {name: sources[name] for name in selection.voters}
    adaptation = adapt_target(
        site_dir,
        voters,
        metric_config,
        main=selection.main,
        aux=selection.aux,
        weight_main=selection.weight_main,
        weight_aux=selection.weight_aux,
    )
    models: dict[str, Arrays] = {
        **{f"source:{name}": weights for name, weights in voters.items()},
        "main": adaptation.main_weights,
    }
    pair = [("main", selection.weight_main)]
    if adaptation.aux_weights is not None:
        models["aux"] = adaptation.aux_weights
        pair.append(("aux", selection.weight_aux))
    ensemble = [(f"source:{name}", 1.0 / len(voters)) for name in sorted(voters)]
    scores = evaluate_predictors(
        site_dir,
        models,
        {"pair": pair, "main": [("main", 1.0)], "voters": ensemble},
        metric_config,
        with_hd95=False,
    )
    return AdaptationResult(
        dtm=transferability.dtm,
        main=selection.main,
        aux=selection.aux,
        voters=selection.voters,
        dice=scores["pair"].dice,
        dice_main_only=scores["main"].dice,
        dice_voters=scores["voters"].dice,
    )


def run_tgma(
    config: RunConfig,
    *,
    federation_dir: Path,
    plan: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Leave-one-site-out TGMA benchmark; returns the JSON document.

    ``plan`` (the resolution plan ``config`` was planned with) is recorded in the
    document. Each site prepares its data as it would in the pipeline: ``auto``
    normalisation resolved by its own modality.
    """
    started = time.perf_counter()
    site_dirs = {path.name: path for path in list_site_dirs(federation_dir)}
    site_configs = {
        name: resolve_normalisation(config, index_site(path).modality)
        for name, path in site_dirs.items()
    }
    initial = build_initial_weights(config)
    models: dict[str, Arrays] = {}
    trained = Countdown(len(site_dirs))
    for name, path in site_dirs.items():
        result = train_source_model(path, site_configs[name], initial_weights=initial)
        models[name] = result.weights
        log_progress(
            f"trained {name}: loss {result.final_loss:.3f}, source {trained.tick()}"
        )
    targets: dict[str, dict[str, object]] = {}
    evaluated = Countdown(len(site_dirs))
    for target, path in site_dirs.items():
        sources = {name: weights for name, weights in models.items() if name != target}
        predictors = {name: [(name, 1.0)] for name in sources}
        predictors["uniform"] = [(name, 1.0 / len(sources)) for name in sources]
        target_config = site_configs[target]
        baseline = evaluate_predictors(
            path,
            models,
            {**predictors, "oracle": [(target, 1.0)]},
            target_config,
            with_hd95=False,
        )
        source_only = {name: baseline[name].dice for name in sources}
        by_rule = _evaluate_adaptation(
            path,
            sources,
            target_config,
            TransferMetric.LFTM,
            (SelectionRule.DTM, SelectionRule.AGREEMENT),
        )
        lftm, agreed = by_rule[SelectionRule.DTM], by_rule[SelectionRule.AGREEMENT]
        entropy = _evaluate_adaptation(
            path, sources, target_config, TransferMetric.ENTROPY, (SelectionRule.DTM,)
        )[SelectionRule.DTM]
        truth = [source_only[name] for name in sorted(sources)]
        by_ensemble = predicts_by_ensemble(
            agreed.voters,
            rule=SelectionRule.AGREEMENT,
            min_voters=config.transfer.ensemble_min_voters,
        )
        targets[target] = {
            "source_only": source_only,
            "uniform": baseline["uniform"].dice,
            "entropy": entropy.dice,
            "tgma": lftm.dice,
            "tgma_main_only": lftm.dice_main_only,
            # TGMA as the pipeline predicts under the agreement selection: the
            # voters' average with enough voters, else the adapted pair.
            "tgma_agreement": agreed.dice_voters if by_ensemble else agreed.dice,
            "tgma_agreement_pair": agreed.dice,
            "tgma_agreement_main_only": agreed.dice_main_only,
            "tgma_agreement_voters": agreed.dice_voters,
            "tgma_agreement_by_ensemble": by_ensemble,
            "oracle": baseline["oracle"].dice,
            "best_source": max(source_only.values()),
            "spearman_lftm": spearman([lftm.dtm[n] for n in sorted(sources)], truth),
            "spearman_entropy": spearman(
                [entropy.dtm[n] for n in sorted(sources)], truth
            ),
            "dtm_lftm": lftm.dtm,
            "dtm_entropy": entropy.dtm,
            "selected_lftm": [lftm.main, lftm.aux],
            "selected_agreement": [agreed.main, agreed.aux],
            "voters_agreement": list(agreed.voters),
            "selected_entropy": [entropy.main, entropy.aux],
        }
        row = targets[target]
        log_progress(
            f"target {target}: tgma {row['tgma']:.3f} "
            f"(agreement {row['tgma_agreement']:.3f}) entropy {row['entropy']:.3f} "
            f"uniform {row['uniform']:.3f} best source {row['best_source']:.3f} "
            f"oracle {row['oracle']:.3f}, target {evaluated.tick()}"
        )
    mean_keys = (
        "uniform",
        "entropy",
        "tgma",
        "tgma_main_only",
        "tgma_agreement",
        "tgma_agreement_pair",
        "tgma_agreement_main_only",
        "tgma_agreement_voters",
        "oracle",
        "best_source",
        "spearman_lftm",
        "spearman_entropy",
    )
    mean: dict[str, float] = {
        key: float(np.mean([row[key] for row in targets.values()])) for key in mean_keys
    }
    mean["source_only"] = float(
        np.mean(
            [
                np.mean(list(row["source_only"].values()))  # type: ignore[attr-defined]
                for row in targets.values()
            ]
        )
    )
    gap = mean["oracle"] - mean["source_only"]
    mean["gap_closed"] = (mean["tgma"] - mean["source_only"]) / gap if gap > 0 else 0.0
    mean["gap_closed_agreement"] = (
        (mean["tgma_agreement"] - mean["source_only"]) / gap if gap > 0 else 0.0
    )
    return {
        "machine": describe_machine(),
        "seconds": time.perf_counter() - started,
        "federation": str(federation_dir),
        "synthetic_seed": config.federation.synthetic_seed,
        "synthetic_shift": str(config.federation.synthetic_shift),
        "ensemble_min_voters": config.transfer.ensemble_min_voters,
        "data": {
            "resample": config.data.resample.value,
            "image_size": config.data.image_size,
            "spacing_mm": config.data.spacing_mm,
            "batch_size": config.train.batch_size,
        },
        **({"plan": dict(plan)} if plan else {}),
        "targets": targets,
        "mean": mean,
    }


def _voters(row: Mapping[str, object]) -> str:
    """A target's voter count (``*``: TGMA predicted by their average); '' for means.

    Documents from before the voter ensemble carry no flag: their TGMA agreement is
    the adapted pair.
    """
    voters = row.get("voters_agreement")
    if not isinstance(voters, list):
        return ""
    return f"{len(voters)}{'*' if row.get('tgma_agreement_by_ensemble') else ''}"


def format_tgma_table(document: Mapping[str, object]) -> str:
    """Markdown summary table of a TGMA benchmark document."""
    mean = document["mean"]
    assert isinstance(mean, Mapping)
    targets = document["targets"]
    assert isinstance(targets, Mapping)
    lines = [
        "| target | mean single source | best single source | uniform | entropy | "
        "TGMA | TGMA main only | TGMA agreement | agreement pair | "
        "agreement main only | voters | oracle | Spearman LFTM | Spearman entropy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in [*targets.items(), ("**mean**", mean)]:
        single = row["source_only"]
        single_value = (
            float(np.mean(list(single.values())))
            if isinstance(single, Mapping)
            else float(single)
        )
        lines.append(
            f"| {name} | {single_value:.3f} | {row['best_source']:.3f} | "
            f"{row['uniform']:.3f} | {row['entropy']:.3f} | {row['tgma']:.3f} | "
            f"{row['tgma_main_only']:.3f} | {row['tgma_agreement']:.3f} | "
            f"{row.get('tgma_agreement_pair', row['tgma_agreement']):.3f} | "
            f"{row['tgma_agreement_main_only']:.3f} | {_voters(row)} | "
            f"{row['oracle']:.3f} | "
            f"{row['spearman_lftm']:.2f} | {row['spearman_entropy']:.2f} |"
        )
    lines.append("")
    min_voters = document.get("ensemble_min_voters", 0)
    predictor = (
        "the voters' uniform average with at least "
        f"{min_voters} voters (`transfer.ensemble-min-voters`; marked *), else "
        "the adapted pair"
        if min_voters
        else "the adapted pair"
    )
    lines.append(
        "TGMA agreement is the pipeline's predictor under the agreement selection: "
        f"{predictor}; voters: the candidates that agree with the main. "
        f"TGMA closes {100 * mean['gap_closed']:.0f}% of the gap between the mean "
        f"single source and the oracle with the paper's DTM selection, "
        f"{100 * mean['gap_closed_agreement']:.0f}% with the agreement selection. "
        f"Synthetic seed {document.get('synthetic_seed', 0)}, "
        f"{document.get('synthetic_shift', 'wide')} shift; measured on "
        f"{document['machine']} in {document['seconds']:.0f} s."
    )
    return "\n".join(lines)


def run_tgma_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``tgma`` subcommand from its parsed arguments; return the document."""
    config = load_default_config(**overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    federation = leave_one_out_federation(args, config)
    planned, plan = plan_offline(config, federation)
    return run_tgma(planned, federation_dir=federation, plan=plan)
