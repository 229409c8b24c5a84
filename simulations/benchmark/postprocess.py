"""The ``postprocess`` benchmark: the largest-connected-component rule, measured.

Leave-one-site-out over the synthetic federation, as ``tgma``: every site trains its
source model and decides, on its own labelled evaluation cases, whether its
predictions keep the largest 3-D connected component per class
(``core.training.postprocess.decide_largest_component``, nnU-Net's rule: on only when
it strictly raises the mean Dice). Then every site is the target in turn: it scores
each other site's model alone, their uniform average and TGMA as the pipeline predicts
under the agreement selection (the adapted pair, or the voters' average), each raw,
post-processed, and as the rule decides (a predictor follows the sources that carry
most of its weight, ``server.phases.evaluation.postprocessed_predictors``), in Dice
and HD95. It calls the site jobs the ClientApp calls, without Flower in between. This
module owns the run, its JSON document and the table between the
``<!-- benchmark:postprocess -->`` markers of ``docs/postprocess-benchmark.md``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from core.config import ConfigValue, RunConfig, SelectionRule, load_default_config
from core.data.dataset import list_site_dirs
from core.logs import Countdown
from core.metrics import SegmentationScores
from core.privacy.limits import default_limits, whole_case_config
from core.training.evaluation import score_predictors
from core.training.job import build_initial_weights, train_source_model
from core.training.networks import Arrays
from core.training.postprocess import decide_largest_component
from core.transfer.job import adapt_target, score_candidates, select_pair
from core.transfer.transferability import predicts_by_ensemble
from server.phases.evaluation import postprocessed_predictors
from simulations.benchmark.output import (
    describe_machine,
    leave_one_out_federation,
    log_progress,
)

POSTPROCESS_MARKER: Final = "benchmark:postprocess"
# The predictors of each target's rows: every source alone (summarised as their
# mean), the uniform average of the sources, and TGMA.
SINGLE: Final = "single sources"
VARIANTS: Final = ("raw", "decided", "always")


def _figures(
    raw: SegmentationScores, post: SegmentationScores, *, decided: bool
) -> dict[str, Any]:
    """One predictor's Dice and HD95 raw, post-processed always, and as decided."""
    chosen = post if decided else raw
    return {
        "postprocessed": decided,
        "dice": {"raw": raw.dice, "always": post.dice, "decided": chosen.dice},
        "hd95_mm": {
            "raw": raw.hd95_mm,
            "always": post.hd95_mm,
            "decided": chosen.hd95_mm,
        },
    }


def _tgma(
    site_dir: Path, sources: Mapping[str, Arrays], config: RunConfig
) -> tuple[dict[str, Arrays], list[tuple[str, float]], dict[str, str]]:
    """TGMA at the target under the agreement selection, as the pipeline predicts.

    Returns the models it adds (adapted ``main``/``aux``), its predictor's members,
    and each added model's source (whose decision it inherits).
    """
    transferability = score_candidates(site_dir, sources, config)
    selection = select_pair(
        transferability, config.transfer, rule=SelectionRule.AGREEMENT
    )
    voters = {name: sources[name] for name in selection.voters}
    adaptation = adapt_target(
        site_dir,
        voters,
        config,
        main=selection.main,
        aux=selection.aux,
        weight_main=selection.weight_main,
        weight_aux=selection.weight_aux,
    )
    models = {"adapted:main": adaptation.main_weights}
    lineage = {"adapted:main": selection.main}
    pair = [("adapted:main", selection.weight_main)]
    if adaptation.aux_weights is not None and selection.aux is not None:
        models["adapted:aux"] = adaptation.aux_weights
        lineage["adapted:aux"] = selection.aux
        pair.append(("adapted:aux", selection.weight_aux))
    if predicts_by_ensemble(
        selection.voters,
        rule=SelectionRule.AGREEMENT,
        min_voters=config.transfer.ensemble_min_voters,
    ):
        ordered = sorted(selection.voters)
        return models, [(name, 1.0 / len(ordered)) for name in ordered], lineage
    return models, pair, lineage


def run_postprocess(config: RunConfig, *, federation_dir: Path) -> dict[str, object]:
    """The leave-one-site-out post-processing benchmark; returns the JSON document."""
    started = time.perf_counter()
    limits = default_limits()
    whole = whole_case_config(config, limits)
    site_dirs = {path.name: path for path in list_site_dirs(federation_dir)}
    initial = build_initial_weights(config)
    models: dict[str, Arrays] = {}
    decisions: dict[str, dict[str, Any]] = {}
    trained = Countdown(len(site_dirs))
    for name, path in site_dirs.items():
        result = train_source_model(path, config, initial_weights=initial)
        models[name] = result.weights
        decision = decide_largest_component(
            path, result.weights, whole, min_cases=limits.min_cases
        )
        decisions[name] = {
            "postprocess": decision.enabled,
            "dice_raw": decision.dice_raw,
            "dice_postprocessed": decision.dice_postprocessed,
        }
        log_progress(
            f"trained {name}: loss {result.final_loss:.3f}, largest component "
            f"{'on' if decision.enabled else 'off'} ({decision.reason}), "
            f"source {trained.tick()}"
        )
    targets: dict[str, dict[str, Any]] = {}
    evaluated = Countdown(len(site_dirs))
    for target, path in site_dirs.items():
        sources = {name: weights for name, weights in models.items() if name != target}
        added, tgma, lineage = _tgma(path, sources, config)
        flags = {name: decisions[name]["postprocess"] for name in sources}
        flags.update({model: flags[source] for model, source in lineage.items()})
        predictors: dict[str, list[tuple[str, float]]] = {
            name: [(name, 1.0)] for name in sorted(sources)
        }
        predictors["uniform"] = [(name, 1.0 / len(sources)) for name in sorted(sources)]
        predictors["tgma"] = tgma
        decided = set(postprocessed_predictors(predictors, flags))
        scored = score_predictors(
            path,
            {**sources, **added},
            predictors,
            whole,
            postprocess=list(predictors),
        )
        rows = {
            name: _figures(
                scored.raw[name], scored.scores[name], decided=name in decided
            )
            for name in predictors
        }
        targets[target] = {
            "sources": {name: rows[name] for name in sorted(sources)},
            "uniform": rows["uniform"],
            "tgma": {**rows["tgma"], "members": [list(m) for m in tgma]},
        }
        log_progress(
            f"target {target}: tgma Dice {rows['tgma']['dice']['raw']:.3f} raw, "
            f"{rows['tgma']['dice']['decided']:.3f} as decided, target "
            f"{evaluated.tick()}"
        )
    return {
        "machine": describe_machine(),
        "seconds": time.perf_counter() - started,
        "federation": str(federation_dir),
        "synthetic_seed": config.federation.synthetic_seed,
        "synthetic_shift": str(config.federation.synthetic_shift),
        "decisions": decisions,
        "targets": targets,
        "mean": _means(targets),
    }


def _mean(values: Sequence[float]) -> float:
    """Mean of the defined values (nan when none is)."""
    finite = [value for value in values if value is not None and math.isfinite(value)]
    return float(np.mean(finite)) if finite else math.nan


def _single(row: Mapping[str, Any], metric: str, variant: str) -> float:
    """The mean over a target's single sources of one figure."""
    return _mean([source[metric][variant] for source in row["sources"].values()])


def _means(targets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per predictor kind, each figure's mean over the targets."""
    means: dict[str, Any] = {}
    for kind in (SINGLE, "uniform", "tgma"):
        means[kind] = {
            metric: {
                variant: _mean(
                    [
                        _single(row, metric, variant)
                        if kind == SINGLE
                        else row[kind][metric][variant]
                        for row in targets.values()
                    ]
                )
                for variant in VARIANTS
            }
            for metric in ("dice", "hd95_mm")
        }
    return means


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _row_cells(figures: Mapping[str, Any]) -> str:
    dice, hd95 = figures["dice"], figures["hd95_mm"]
    return " | ".join(
        [
            *(_number(dice[variant], 3) for variant in VARIANTS),
            *(_number(hd95[variant], 2) for variant in VARIANTS),
        ]
    )


def format_postprocess_table(document: Mapping[str, object]) -> str:
    """Markdown tables of a post-processing benchmark document."""
    decisions = document["decisions"]
    targets = document["targets"]
    mean = document["mean"]
    assert isinstance(decisions, Mapping)
    assert isinstance(targets, Mapping)
    assert isinstance(mean, Mapping)
    lines = [
        "| source | its Dice raw | its Dice post-processed | decision |",
        "|---|---|---|---|",
    ]
    for name, decision in decisions.items():
        lines.append(
            f"| {name} | {_number(decision['dice_raw'], 4)} | "
            f"{_number(decision['dice_postprocessed'], 4)} | "
            f"{'on' if decision['postprocess'] else 'off'} |"
        )
    lines += [
        "",
        "| target | predictor | post-processed | Dice raw | Dice as decided | "
        "Dice always | HD95 raw (mm) | HD95 as decided (mm) | HD95 always (mm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target, row in targets.items():
        sources = row["sources"]
        on = sum(figures["postprocessed"] for figures in sources.values())
        single = {
            metric: {variant: _single(row, metric, variant) for variant in VARIANTS}
            for metric in ("dice", "hd95_mm")
        }
        lines.append(
            f"| {target} | {SINGLE} (mean) | {on} of {len(sources)} | "
            f"{_row_cells(single)} |"
        )
        for kind in ("uniform", "tgma"):
            flag = "yes" if row[kind]["postprocessed"] else "no"
            lines.append(f"| {target} | {kind} | {flag} | {_row_cells(row[kind])} |")
    for kind in (SINGLE, "uniform", "tgma"):
        lines.append(f"| **mean** | {kind} |  | {_row_cells(mean[kind])} |")
    lines += [
        "",
        "Raw: the predictions as the network made them; always: every prediction "
        "post-processed; as decided: post-processed where the rule says so (a "
        "source's own decision; uniform and TGMA follow the sources carrying most "
        "of their weight). HD95 is the mean over the cases where it is defined. "
        f"Synthetic seed {document.get('synthetic_seed', 0)}, "
        f"{document.get('synthetic_shift', 'wide')} shift; measured on "
        f"{document['machine']} in {document['seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def run_postprocess_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``postprocess`` subcommand from its parsed arguments."""
    config = load_default_config(**overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    federation = leave_one_out_federation(args, config)
    return run_postprocess(config, federation_dir=federation)
