"""The pipeline part of the ``consensus`` benchmark: consensus from source predictions.

For each target site in turn (the others are its sources), it runs what the federation
runs -- TGMA transferability and adaptation, then the ``train.consensus`` job with the
sources' predictions as noisy labels -- and reports, on the target's evaluation labels:
the consensus Dice of TGMA's ITM pseudo-labels, majority vote, STAPLE and DeepSTAPLE,
the Dice of the adapted model trained on each, the Spearman correlation of the
learned data parameters (and of STAPLE's sensitivities) with each noisy label's true
Dice, and their within-case AUROC separating good label sources from wrong ones
(:data:`core.consensus.job.GOOD_LABEL_DICE`). With several data-parameter
granularities (``--granularities``) DeepSTAPLE and its trained model are repeated
for each on the same TGMA step and noisy labels, side by side; so are the
data-parameter priors (``--priors``, ``consensus.dp-prior``), at the first
granularity. It calls the same
``core`` functions as the ClientApp, without Flower in between.
The controlled part and the table live in :mod:`simulations.benchmark.consensus`;
this module also holds the subcommand's options and the run of both parts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np

from core.config import (
    ConfigValue,
    ConsensusGranularity,
    ConsensusPrior,
    RunConfig,
    load_default_config,
)
from core.consensus.job import ConsensusOutcome, run_consensus
from core.data.dataset import list_site_dirs
from core.logs import Countdown
from core.protocol import CONSENSUS_METHODS
from core.training.evaluation import evaluate_predictors
from core.training.job import build_initial_weights, train_source_model
from core.training.networks import Arrays
from core.transfer.job import adapt_target, score_candidates, select_pair
from simulations.benchmark.consensus import build_controlled_config, run_controlled
from simulations.benchmark.output import (
    describe_machine,
    leave_one_out_federation,
    log_progress,
)

ADAPTED_MAIN: Final = "adapted:main"


def _mean(values: Sequence[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


def _with_variant(
    config: RunConfig,
    granularity: ConsensusGranularity,
    prior: ConsensusPrior,
    *,
    baselines: bool,
) -> RunConfig:
    consensus = dataclasses.replace(
        config.consensus, granularity=granularity, dp_prior=prior, baselines=baselines
    )
    return dataclasses.replace(config, consensus=consensus)


def _variant_figures(outcome: ConsensusOutcome, trained: float) -> dict[str, object]:
    return {
        "deepstaple": outcome.label_dice["deepstaple"],
        "trained": trained,
        "spearman_dp": outcome.spearman_dp,
        "auroc_dp": outcome.auroc_dp,
        "data_parameter": outcome.data_parameter,
        "consensus_seconds": outcome.seconds,
    }


def _run_target(
    target_dir: Path,
    sources: Mapping[str, Arrays],
    config: RunConfig,
    granularities: Sequence[ConsensusGranularity],
    priors: Sequence[ConsensusPrior] = (),
) -> dict[str, object]:
    """TGMA then consensus at one target; scores on its evaluation labels.

    The first (granularity, prior) run fuses every method and trains on each; every
    further granularity (at the first prior) and every further prior (at the first
    granularity) repeats only DeepSTAPLE and its trained model (same noisy labels,
    same seed). ``priors`` empty: ``consensus.dp-prior`` only, and no ``prior``
    section in the row.
    """
    chosen_priors = list(priors) or [config.consensus.dp_prior]
    transferability = score_candidates(target_dir, sources, config)
    selection = select_pair(transferability, config.transfer)
    adapted = adapt_target(
        target_dir,
        {name: sources[name] for name in selection.voters},
        config,
        main=selection.main,
        aux=selection.aux,
        weight_main=selection.weight_main,
        weight_aux=selection.weight_aux,
    )
    variants = [(granularity, chosen_priors[0]) for granularity in granularities]
    variants += [(granularities[0], prior) for prior in chosen_priors[1:]]
    by_variant: dict[tuple[ConsensusGranularity, ConsensusPrior], ConsensusOutcome] = {}
    for number, (granularity, prior) in enumerate(variants):
        log_progress(f"[consensus] data parameters per {granularity}, {prior} prior")
        by_variant[granularity, prior] = run_consensus(
            target_dir,
            {**sources, ADAPTED_MAIN: adapted.main_weights},
            _with_variant(config, granularity, prior, baselines=number == 0),
            label_sources=sorted(sources),
            start=ADAPTED_MAIN,
            labels_dir=None,
            progress=log_progress,
        )
    outcomes = {g: by_variant[g, chosen_priors[0]] for g in granularities}
    prior_outcomes = {p: by_variant[granularities[0], p] for p in chosen_priors}
    outcome = outcomes[granularities[0]]
    models = {f"consensus:{m}": weights for m, weights in outcome.models.items()}
    models.update(
        {
            f"deepstaple:{granularity}": other.models["deepstaple"]
            for granularity, other in outcomes.items()
        }
    )
    models.update(
        {
            f"deepstaple-prior:{prior}": other.models["deepstaple"]
            for prior, other in prior_outcomes.items()
        }
    )
    models.update({f"source:{name}": weights for name, weights in sources.items()})
    models[ADAPTED_MAIN] = adapted.main_weights
    predictors = {name: [(name, 1.0)] for name in models}
    scores = evaluate_predictors(
        target_dir, models, predictors, config, with_hd95=False
    )
    row: dict[str, object] = {
        **{method: outcome.label_dice[method] for method in CONSENSUS_METHODS},
        "spearman_dp": outcome.spearman_dp,
        "spearman_staple": outcome.spearman_staple,
        "auroc_dp": outcome.auroc_dp,
        "auroc_staple": outcome.auroc_staple,
        "granularity": {
            str(granularity): _variant_figures(
                other, scores[f"deepstaple:{granularity}"].dice
            )
            for granularity, other in outcomes.items()
        },
        "trained": {
            method: scores[f"consensus:{method}"].dice for method in outcome.models
        },
        "tgma_main": scores[ADAPTED_MAIN].dice,
        "source_only": {name: scores[f"source:{name}"].dice for name in sources},
        "dtm": transferability.dtm,
        "data_parameter": outcome.data_parameter,
        "staple_sensitivity": outcome.staple_sensitivity,
        "consensus_seconds": outcome.seconds,
    }
    if priors:
        row["prior"] = {
            str(prior): _variant_figures(
                other, scores[f"deepstaple-prior:{prior}"].dice
            )
            for prior, other in prior_outcomes.items()
        }
    return row


def run_consensus_pipeline(
    config: RunConfig,
    *,
    federation_dir: Path,
    targets: Sequence[str] = (),
    granularities: Sequence[ConsensusGranularity] = (),
    priors: Sequence[ConsensusPrior] = (),
) -> dict[str, object]:
    """Leave-one-site-out consensus from source predictions; the ``pipeline`` part.

    Args:
        config: the run config (``consensus`` settings included).
        federation_dir: a folder of site folders.
        targets: the sites to use as target in turn; empty = every site.
        granularities: the data-parameter granularities DeepSTAPLE runs with, side
            by side; the first one's figures are the document's ``deepstaple`` ones.
            Empty = ``consensus.granularity`` only.
        priors: the data-parameter priors DeepSTAPLE runs with, side by side at the
            first granularity (a ``prior`` section per target and in the summary);
            the first one's figures are the document's ``deepstaple`` ones. Empty =
            ``consensus.dp-prior`` only, no ``prior`` section.

    Raises:
        ValueError: a named target is not a site of the federation, or a
            granularity or prior is named twice.
    """
    started = time.perf_counter()
    site_dirs = {path.name: path for path in list_site_dirs(federation_dir)}
    unknown = sorted(set(targets) - set(site_dirs))
    if unknown:
        raise ValueError(
            f"targets {unknown} are not sites of {federation_dir} "
            f"(sites: {sorted(site_dirs)})"
        )
    chosen_granularities = list(granularities) or [config.consensus.granularity]
    if len(set(chosen_granularities)) < len(chosen_granularities):
        raise ValueError(
            f"granularities {[str(g) for g in chosen_granularities]} name one twice"
        )
    if len(set(priors)) < len(priors):
        raise ValueError(f"priors {[str(p) for p in priors]} name one twice")
    # Every method is compared, so the baselines are always trained here.
    config = dataclasses.replace(
        config, consensus=dataclasses.replace(config.consensus, baselines=True)
    )
    chosen = list(targets) or sorted(site_dirs)
    initial = build_initial_weights(config)
    models: dict[str, Arrays] = {}
    # A site that is only ever the target needs no source model.
    source_names = [name for name in site_dirs if chosen != [name]]
    trained = Countdown(len(source_names))
    for name in source_names:
        result = train_source_model(site_dirs[name], config, initial_weights=initial)
        models[name] = result.weights
        log_progress(
            f"trained {name}: loss {result.final_loss:.3f}, source {trained.tick()}"
        )
    rows: dict[str, dict[str, object]] = {}
    evaluated = Countdown(len(chosen))
    for target in chosen:
        sources = {name: weights for name, weights in models.items() if name != target}
        rows[target] = _run_target(
            site_dirs[target], sources, config, chosen_granularities, priors
        )
        row = rows[target]
        log_progress(
            f"target {target}: consensus Dice "
            + ", ".join(f"{m} {row[m]:.3f}" for m in CONSENSUS_METHODS)
            + f"; Spearman DP {row['spearman_dp']:.2f}, AUROC DP "
            f"{row['auroc_dp']:.2f} STAPLE {row['auroc_staple']:.2f}, "
            f"target {evaluated.tick()}"
        )
    summary: dict[str, object] = {
        key: _mean([float(row[key]) for row in rows.values()])  # type: ignore[arg-type]
        for key in (
            *CONSENSUS_METHODS,
            "spearman_dp",
            "spearman_staple",
            "auroc_dp",
            "auroc_staple",
            "tgma_main",
        )
    }
    summary["granularity"] = {
        str(granularity): {
            key: _mean(
                [
                    float(row["granularity"][str(granularity)][key])  # type: ignore[index]
                    for row in rows.values()
                ]
            )
            for key in ("deepstaple", "trained", "spearman_dp", "auroc_dp")
        }
        for granularity in chosen_granularities
    }
    if priors:
        summary["prior"] = {
            str(prior): {
                key: _mean(
                    [
                        float(row["prior"][str(prior)][key])  # type: ignore[index]
                        for row in rows.values()
                    ]
                )
                for key in ("deepstaple", "trained", "spearman_dp", "auroc_dp")
            }
            for prior in priors
        }
    summary["trained"] = {
        method: _mean(
            [row["trained"][method] for row in rows.values()]  # type: ignore[index]
        )
        for method in CONSENSUS_METHODS
    }
    summary["targets"] = rows
    summary["epochs"] = {
        "source": config.train.epochs,
        "adapt": config.adapt.epochs,
        "deepstaple": config.consensus.epochs,
        "refine": config.consensus.refine_epochs,
    }
    summary["seconds"] = time.perf_counter() - started
    return summary


def add_consensus_options(command: argparse.ArgumentParser) -> None:
    """The ``consensus`` subcommand's own options."""
    command.add_argument(
        "--targets",
        default="",
        help="comma-separated target sites of the pipeline part; default: every site",
    )
    command.add_argument(
        "--skip-pipeline",
        action="store_true",
        help="run only the controlled part",
    )
    command.add_argument(
        "--granularities",
        default="",
        help="comma-separated data-parameter granularities DeepSTAPLE runs with side "
        "by side in the pipeline part (slice, case); default: consensus.granularity",
    )
    command.add_argument(
        "--priors",
        default="",
        help="comma-separated data-parameter priors DeepSTAPLE runs with side by "
        "side in the pipeline part, at the first granularity (none, dtm, agreement); "
        "default: consensus.dp-prior, without a prior section",
    )


def parse_granularities(text: str) -> list[ConsensusGranularity]:
    """``--granularities``' comma-separated values; empty = none named.

    Raises:
        ValueError: a value is not a granularity (the message names the option).

    Example:
        >>> [str(g) for g in parse_granularities("case,slice")]
        ['case', 'slice']
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    allowed = [str(g) for g in ConsensusGranularity]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"--granularities: {unknown} are not among {allowed}")
    return [ConsensusGranularity(name) for name in names]


def parse_priors(text: str) -> list[ConsensusPrior]:
    """``--priors``' comma-separated values; empty = none named.

    Raises:
        ValueError: a value is not a prior (the message names the option).

    Example:
        >>> [str(p) for p in parse_priors("none, dtm")]
        ['none', 'dtm']
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    allowed = [str(p) for p in ConsensusPrior]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"--priors: {unknown} are not among {allowed}")
    return [ConsensusPrior(name) for name in names]


def run_consensus_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run both parts of the ``consensus`` benchmark; return the JSON document."""
    started = time.perf_counter()
    config = load_default_config(**overrides)
    granularities = parse_granularities(args.granularities)
    priors = parse_priors(getattr(args, "priors", ""))
    federation = leave_one_out_federation(args, config)
    log_progress("== controlled noisy labels")
    controlled = run_controlled(
        build_controlled_config(overrides), federation_dir=federation
    )
    document: dict[str, object] = {
        "machine": describe_machine(),
        "federation": str(federation),
        "controlled": controlled,
    }
    if not args.skip_pipeline:
        log_progress("== consensus from source-model predictions (pipeline)")
        targets = [name for name in args.targets.split(",") if name]
        document["pipeline"] = run_consensus_pipeline(
            config,
            federation_dir=federation,
            targets=targets,
            granularities=granularities,
            priors=priors,
        )
    document["seconds"] = time.perf_counter() - started
    return document
