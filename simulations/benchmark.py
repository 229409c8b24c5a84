"""Benchmarks: ``python -m simulations.benchmark tgma|privacy|scale --out FILE``.

Leave-one-site-out over the synthetic federation: every site is the target in turn and
the others are its sources. Per target it reports the Dice of each source alone, the
uniform average of all sources, the TGMA pipeline with LFTM, the same pipeline with the
entropy score in place of LFTM, and a target-supervised oracle (the target's own model
trained on its labels), plus the Spearman correlation between each score's DTM and the
sources' true Dice on the target. It calls the same ``core.jobs`` functions the
ClientApp calls, without Flower in between, and regenerates the README table between
the ``<!-- benchmark:tgma -->`` markers.

``privacy`` trains a source model without DP and with DP-SGD at several target
epsilons on a dedicated synthetic federation with more cases per site, audits each
model for membership inference (``core.audit``) on the source's own training cases
versus its held-out cases, and measures each model's Dice on the default target; it
regenerates the table between the ``<!-- benchmark:privacy -->`` markers.

``scale`` runs the coordinator's discover, source-training and transferability phases
in a real Flower simulation (``flwr run .``, ``last-phase=transferability``) on tiny
synthetic federations of 4, 8, 16 and 32 sites, and reports each phase's wall time,
the messages it exchanged and the coordinator's peak memory, as recorded in each run's
``report.json`` and ledger; it regenerates the table between the
``<!-- benchmark:scale -->`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from core import protocol
from core.audit import (
    MiaAttack,
    attack_membership,
    build_audit_cases,
    train_reference_losses,
)
from core.config import ConfigValue, RunConfig, TransferMetric, load_default_config
from core.data import index_site, list_site_dirs, read_federation_target
from core.jobs import (
    adapt_target,
    build_initial_weights,
    evaluate_predictors,
    score_candidates,
    train_source_model,
)
from core.ledger import EGRESS, INGRESS, Ledger, LedgerEntry
from core.models import Arrays
from core.privacy import DpSettings
from core.synthetic import (
    EVALUATION_CASES_PER_SITE,
    GENERATOR_VERSION,
    ensure_builtin_federation,
    write_federation,
)
from core.transferability import select_sources
from simulations.simulate import format_run_config, run_simulation

README_MARKER = "benchmark:tgma"
PRIVACY_MARKER = "benchmark:privacy"
SCALE_MARKER = "benchmark:scale"

# The phases the scale benchmark runs (transferability needs the source models), and
# the action each phase sends.
SCALE_PHASES = ("discover", "source-training", "transferability")
PHASE_OF_ACTION = {
    protocol.HELLO: "discover",
    protocol.TRAIN_SOURCE: "source-training",
    protocol.LFTM: "transferability",
}
# Tiny on purpose: the scale benchmark measures how the coordinator's cost grows with
# the number of sites, not accuracy.
SCALE_RUN_CONFIG: dict[str, ConfigValue] = {
    "last-phase": "transferability",
    "data.image-size": 32,
    "data.max-slices-per-case": 4,
    "train.epochs": 1,
    "model.channels": "8,16,32",
    "model.strides": "2,2",
}


def describe_machine() -> str:
    """One line naming the CPU/GPU, core count and library versions."""
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return (
        f"{device}, {torch.get_num_threads()} torch threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def spearman(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Spearman's rho; 0 when either side is constant (no ranking information)."""
    if len(set(scores)) < 2 or len(set(truth)) < 2:
        return 0.0
    value = float(spearmanr(scores, truth).statistic)
    return 0.0 if math.isnan(value) else value


def _log(line: str) -> None:
    print(line, flush=True)


def _adapted_dice(
    site_dir: Path,
    sources: Mapping[str, Arrays],
    config: RunConfig,
    metric: TransferMetric,
) -> dict[str, object]:
    """Run selection + adaptation with ``metric`` and evaluate the adapted pair."""
    metric_config = dataclasses.replace(
        config, transfer=dataclasses.replace(config.transfer, metric=metric)
    )
    transferability = score_candidates(site_dir, sources, metric_config)
    selection = select_sources(transferability.dtm)
    adaptation = adapt_target(
        site_dir,
        sources,
        metric_config,
        main=selection.main,
        aux=selection.aux,
        weight_main=selection.weight_main,
        weight_aux=selection.weight_aux,
    )
    models: dict[str, Arrays] = {"main": adaptation.main_weights}
    pair = [("main", selection.weight_main)]
    if adaptation.aux_weights is not None:
        models["aux"] = adaptation.aux_weights
        pair.append(("aux", selection.weight_aux))
    scores = evaluate_predictors(
        site_dir,
        models,
        {"pair": pair, "main": [("main", 1.0)]},
        metric_config,
        with_hd95=False,
    )
    return {
        "dtm": transferability.dtm,
        "main": selection.main,
        "aux": selection.aux,
        "dice": scores["pair"].dice,
        "dice_main_only": scores["main"].dice,
    }


def run_tgma(config: RunConfig, *, federation_dir: Path) -> dict[str, object]:
    """Leave-one-site-out TGMA benchmark; returns the JSON document."""
    started = time.perf_counter()
    site_dirs = {path.name: path for path in list_site_dirs(federation_dir)}
    initial = build_initial_weights(config)
    models: dict[str, Arrays] = {}
    for name, path in site_dirs.items():
        result = train_source_model(path, config, initial_weights=initial)
        models[name] = result.weights
        _log(f"trained {name}: loss {result.final_loss:.3f} ({result.seconds:.1f} s)")
    targets: dict[str, dict[str, object]] = {}
    for target, path in site_dirs.items():
        sources = {name: weights for name, weights in models.items() if name != target}
        predictors = {name: [(name, 1.0)] for name in sources}
        predictors["uniform"] = [(name, 1.0 / len(sources)) for name in sources]
        baseline = evaluate_predictors(
            path,
            models,
            {**predictors, "oracle": [(target, 1.0)]},
            config,
            with_hd95=False,
        )
        source_only = {name: baseline[name].dice for name in sources}
        lftm = _adapted_dice(path, sources, config, TransferMetric.LFTM)
        entropy = _adapted_dice(path, sources, config, TransferMetric.ENTROPY)
        truth = [source_only[name] for name in sorted(sources)]
        targets[target] = {
            "source_only": source_only,
            "uniform": baseline["uniform"].dice,
            "entropy": entropy["dice"],
            "tgma": lftm["dice"],
            "tgma_main_only": lftm["dice_main_only"],
            "oracle": baseline["oracle"].dice,
            "best_source": max(source_only.values()),
            "spearman_lftm": spearman([lftm["dtm"][n] for n in sorted(sources)], truth),  # type: ignore[index]
            "spearman_entropy": spearman(
                [entropy["dtm"][n] for n in sorted(sources)], truth
            ),  # type: ignore[index]
            "dtm_lftm": lftm["dtm"],
            "dtm_entropy": entropy["dtm"],
            "selected_lftm": [lftm["main"], lftm["aux"]],
            "selected_entropy": [entropy["main"], entropy["aux"]],
        }
        row = targets[target]
        _log(
            f"target {target}: tgma {row['tgma']:.3f} entropy {row['entropy']:.3f} "
            f"uniform {row['uniform']:.3f} best source {row['best_source']:.3f} "
            f"oracle {row['oracle']:.3f}"
        )
    mean_keys = (
        "uniform",
        "entropy",
        "tgma",
        "tgma_main_only",
        "oracle",
        "best_source",
        "spearman_lftm",
        "spearman_entropy",
    )
    mean: dict[str, float] = {
        key: float(np.mean([row[key] for row in targets.values()]))  # type: ignore[misc]
        for key in mean_keys
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
    return {
        "machine": describe_machine(),
        "seconds": time.perf_counter() - started,
        "federation": str(federation_dir),
        "targets": targets,
        "mean": mean,
    }


def format_table(document: Mapping[str, object]) -> str:
    """Markdown summary table of a TGMA benchmark document."""
    mean = document["mean"]
    assert isinstance(mean, Mapping)
    targets = document["targets"]
    assert isinstance(targets, Mapping)
    lines = [
        "| target | mean single source | best single source | uniform | entropy | "
        "TGMA | TGMA main only | oracle | Spearman LFTM | Spearman entropy |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
            f"{row['tgma_main_only']:.3f} | {row['oracle']:.3f} | "
            f"{row['spearman_lftm']:.2f} | {row['spearman_entropy']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"TGMA closes {100 * mean['gap_closed']:.0f}% of the gap between the mean "
        f"single source and the oracle. Measured on {document['machine']} in "
        f"{document['seconds']:.0f} s."
    )
    return "\n".join(lines)


def ensure_privacy_federation(
    cache_dir: Path, *, seed: int, num_sites: int, members: int, nonmembers: int
) -> Path:
    """A synthetic federation whose sites hold ``members`` + ``nonmembers`` cases.

    The built-in generator (same seed and sites, so the same site styles as the TGMA
    benchmark's federation) writes ``members + nonmembers`` labelled cases per site;
    cases after the first ``members`` of each site's ``imagesTr`` then move to
    ``imagesTs``, so every site has ``members`` training cases and ``nonmembers``
    held-out cases drawn from the same distribution. Generated once per parameters.
    """
    if nonmembers < EVALUATION_CASES_PER_SITE:
        raise ValueError(
            f"nonmembers must be >= {EVALUATION_CASES_PER_SITE}, got {nonmembers}"
        )
    folder = Path(cache_dir) / (
        f"privacy-v{GENERATOR_VERSION}-seed{seed}-sites{num_sites}-"
        f"members{members}-nonmembers{nonmembers}"
    )
    if folder.exists():
        return folder
    _log(f"generating the privacy benchmark federation in {folder}")
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    write_federation(
        staging,
        seed=seed,
        num_sites=num_sites,
        num_train_cases=members + nonmembers - EVALUATION_CASES_PER_SITE,
        progress=_log,
    )
    for site in list_site_dirs(staging):
        for case in index_site(site).labelled[members:]:
            assert case.label_path is not None
            for path, folder_name in (
                (case.image_path, "imagesTs"),
                (case.label_path, "labelsTs"),
            ):
                path.rename(site / folder_name / path.name)
    _log(f"every site: {members} training and {nonmembers} held-out cases")
    # Another process may finish it first; its result is the same.
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def choose_source(
    target: str, sites: Sequence[str], tgma_json: Path
) -> tuple[str, str]:
    """The source site for ``target`` and why: the TGMA benchmark's best, if recorded.

    Falls back to the site after the target in name order (its nearest neighbour on
    the synthetic continuum) when ``tgma_json`` has no row for ``target``.
    """
    if tgma_json.is_file():
        targets = json.loads(tgma_json.read_text()).get("targets", {})
        single = targets.get(target, {}).get("source_only", {})
        candidates = {name: dice for name, dice in single.items() if name in sites}
        if candidates:
            best = max(candidates, key=candidates.__getitem__)
            return best, (
                f"best single source for target {target} in {tgma_json} "
                f"(Dice {candidates[best]:.3f})"
            )
    others = [name for name in sites if name != target]
    return others[0], f"nearest site to {target} on the synthetic continuum"


def run_privacy(
    config: RunConfig,
    *,
    federation_dir: Path,
    source: str | None,
    epsilons: Sequence[float],
    references: int,
    resamples: int,
    seed: int,
    tgma_json: Path,
) -> dict[str, object]:
    """Train, attack and evaluate a source model without DP and at each epsilon."""
    started = time.perf_counter()
    sites = [path.name for path in list_site_dirs(federation_dir)]
    target = read_federation_target(federation_dir) or sites[0]
    if source is None:
        source, reason = choose_source(target, sites, tgma_json)
    else:
        reason = "chosen on the command line"
    _log(f"source {source} ({reason}), target {target}")
    source_dir, target_dir = federation_dir / source, federation_dir / target
    cases = build_audit_cases(source_dir, config)
    # The reference models never see the audited models, so one set serves them all.
    reference = train_reference_losses(
        cases, config, references=references, seed=seed, progress=_log
    )
    models: list[dict[str, object]] = []
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="sitebridge-privacy-") as scratch:
        for epsilon in [None, *epsilons]:
            dp = (
                None
                if epsilon is None
                else DpSettings(
                    noise_multiplier=None,
                    target_epsilon=epsilon,
                    delta=config.privacy.delta,
                    max_grad_norm=config.privacy.max_grad_norm,
                    # Never binding: each model has its own fresh accountant.
                    budget_epsilon=10 * epsilon,
                )
            )
            name = "no DP" if epsilon is None else f"DP eps {epsilon:g}"
            training = train_source_model(
                source_dir,
                config,
                dp=dp,
                accountant_path=Path(scratch) / f"accountant-{len(models)}.json",
                progress=_log,
            )
            dice = evaluate_predictors(
                target_dir,
                {name: training.weights},
                {name: [(name, 1.0)]},
                config,
                with_hd95=False,
            )[name].dice
            heldout = evaluate_predictors(
                source_dir,
                {name: training.weights},
                {name: [(name, 1.0)]},
                config,
                with_hd95=False,
            )[name].dice
            private = training.privacy
            model: dict[str, object] = {
                "epsilon": epsilon,
                "epsilon_spent": None if private is None else private.epsilon_spent,
                "noise_multiplier": None
                if private is None
                else private.noise_multiplier,
                "sample_rate": None if private is None else private.sample_rate,
                "steps": None if private is None else private.steps,
                "dice": dice,
                "dice_source_heldout": heldout,
                "final_loss": training.final_loss,
                "train_seconds": training.seconds,
            }
            models.append(model)
            for result in attack_membership(
                cases,
                training.weights,
                config,
                attacks=list(MiaAttack),
                reference=reference,
                resamples=resamples,
                seed=seed,
            ):
                runs.append(
                    {
                        "epsilon": epsilon,
                        "epsilon_spent": model["epsilon_spent"],
                        "dice": dice,
                        "mia_auc": result.auc,
                        "mia_auc_ci": list(result.ci),
                        "attack": result.attack,
                        "n_members": result.n_members,
                        "n_nonmembers": result.n_nonmembers,
                    }
                )
                _log(
                    f"{name}: Dice on {target} {dice:.3f}, {result.attack} AUC "
                    f"{result.auc:.3f} [{result.ci[0]:.3f}, {result.ci[1]:.3f}]"
                )
    return {
        "machine": describe_machine(),
        "seconds": time.perf_counter() - started,
        "settings": {
            "federation": str(federation_dir),
            "target": target,
            "source": source,
            "source_choice": reason,
            "members": cases.num_members,
            "nonmembers": len(cases.slices.case_ids) - cases.num_members,
            "slices_per_case": len(cases.slices) / len(cases.slices.case_ids),
            "references": references,
            "bootstrap_resamples": resamples,
            "seed": seed,
            "epochs": config.train.epochs,
            "batch_size": config.train.batch_size,
            "learning_rate": config.train.learning_rate,
            "augment": config.train.augment,
            "image_size": config.data.image_size,
            "channels": list(config.model.channels),
            "delta": config.privacy.delta,
            "max_grad_norm": config.privacy.max_grad_norm,
        },
        "models": models,
        "runs": runs,
    }


def format_privacy_table(document: Mapping[str, object]) -> str:
    """Markdown table of a privacy benchmark document: one row per model."""
    settings = document["settings"]
    runs = document["runs"]
    assert isinstance(settings, Mapping)
    assert isinstance(runs, Sequence)
    attacks = list(dict.fromkeys(str(run["attack"]) for run in runs))
    rows: dict[object, dict[str, object]] = {}
    for run in runs:
        row = rows.setdefault(run["epsilon"], {"run": run})
        interval = run["mia_auc_ci"]
        row[str(run["attack"])] = (
            f"{run['mia_auc']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
        )
    lines = [
        f"| model | ε target | ε spent (δ = {settings['delta']:g}) | "
        f"Dice on {settings['target']} | "
        + " | ".join(f"{attack} AUC [95% CI]" for attack in attacks)
        + " |",
        "|---|---|---|---|" + "---|" * len(attacks),
    ]
    for epsilon, row in rows.items():
        run = row["run"]
        assert isinstance(run, Mapping)
        spent = run.get("epsilon_spent")
        lines.append(
            f"| {'no DP' if epsilon is None else 'DP-SGD'} | "
            f"{'-' if epsilon is None else f'{epsilon:g}'} | "
            f"{'∞' if spent is None else f'{spent:.2f}'} | {run['dice']:.3f} | "
            + " | ".join(str(row.get(attack, "-")) for attack in attacks)
            + " |"
        )
    lines.append("")
    lines.append(
        f"Source {settings['source']} ({settings['members']} training cases = "
        f"members, {settings['nonmembers']} held-out cases = non-members, "
        f"{settings['slices_per_case']:g} slices each), {settings['epochs']} epochs; "
        f"calibrated-loss uses {settings['references']} reference models; "
        f"{settings['bootstrap_resamples']} bootstrap resamples. Measured on "
        f"{document['machine']} in {document['seconds']:.0f} s."
    )
    return "\n".join(lines)


def parse_site_counts(text: str) -> list[int]:
    """Site counts from a comma-separated list, ascending, each at least 3.

    Example:
        >>> parse_site_counts("8,4, 32,16,8")
        [4, 8, 16, 32]
    """
    counts = sorted({int(value) for value in text.split(",") if value.strip()})
    if not counts or counts[0] < 3:
        raise ValueError(f"--sites needs site counts of at least 3, got {text!r}")
    return counts


def _site_counts_argument(text: str) -> list[int]:
    try:
        return parse_site_counts(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def count_phase_messages(
    entries: Iterable[LedgerEntry],
) -> dict[str, dict[str, int]]:
    """Requests, replies and bytes per phase, from the coordinator's ledger.

    An action no phase of :data:`PHASE_OF_ACTION` sends is counted under its own name.
    """
    counts: dict[str, dict[str, int]] = {}
    for entry in entries:
        phase = PHASE_OF_ACTION.get(entry.message_type, entry.message_type)
        row = counts.setdefault(
            phase, {"requests": 0, "replies": 0, "bytes_sent": 0, "bytes_received": 0}
        )
        size = 0 if entry.egress is None else entry.egress.total_bytes
        if entry.direction == EGRESS:
            row["requests"] += 1
            row["bytes_sent"] += size
        elif entry.direction == INGRESS:
            row["replies"] += 1
            row["bytes_received"] += size
    return counts


def build_scale_entry(
    report: Mapping[str, object],
    *,
    messages: Mapping[str, Mapping[str, int]],
    flwr_run_seconds: float,
) -> dict[str, object]:
    """One site count's entry of the scale document, from its run's ``report.json``."""
    phase_seconds = report["phase_seconds"]
    coordinator = report["coordinator"]
    sources = report["source_training"]
    assert isinstance(phase_seconds, Mapping)
    assert isinstance(coordinator, Mapping)
    assert isinstance(sources, Mapping)
    return {
        "seconds": {
            phase: float(phase_seconds[phase])
            for phase in SCALE_PHASES
            if phase in phase_seconds
        },
        "peak_rss_mb": float(coordinator["peak_rss_mb"]),
        "peak_rss_mb_after_phase": dict(coordinator["peak_rss_mb_after_phase"]),
        "flwr_run_seconds": flwr_run_seconds,
        "source_models": len(sources),
        "messages": {phase: dict(row) for phase, row in messages.items()},
        "run_id": report["run_id"],
        "error": report["error"],
    }


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """Least-squares line through the points: slope, intercept and R².

    None with fewer than two distinct x values.

    Example:
        >>> fit_line([4, 8, 16], [3.0, 5.0, 9.0])
        {'slope': 0.5, 'intercept': 1.0, 'r2': 1.0}
    """
    if len(set(xs)) < 2:
        return None
    slope, intercept = (float(value) for value in np.polyfit(xs, ys, 1))
    predicted = np.polyval([slope, intercept], xs)
    spread = float(np.sum((np.asarray(ys) - np.mean(ys)) ** 2))
    residual = float(np.sum((np.asarray(ys) - predicted) ** 2))
    return {
        "slope": round(slope, 6),
        "intercept": round(intercept, 6),
        "r2": round(1.0 - residual / spread, 6) if spread > 0 else 1.0,
    }


def fit_scale_growth(
    sites: Mapping[str, Mapping[str, object]],
) -> dict[str, dict[str, float] | None]:
    """Per phase (and the whole run, and peak memory): cost per added site.

    Fits a line over the site counts that finished without error; the slope of a
    phase is seconds per added site, that of ``peak_rss_mb`` MiB per added site.
    """
    finished = {
        int(count): entry for count, entry in sites.items() if not entry.get("error")
    }
    counts = sorted(finished)

    def series(pick: str, phase: str | None = None) -> list[float]:
        values = []
        for count in counts:
            value = finished[count][pick]
            if phase is not None:
                assert isinstance(value, Mapping)
                value = value[phase]
            values.append(float(value))  # type: ignore[arg-type]
        return values

    growth: dict[str, dict[str, float] | None] = {
        phase: fit_line(counts, series("seconds", phase)) for phase in SCALE_PHASES
    }
    growth["flwr_run"] = fit_line(counts, series("flwr_run_seconds"))
    growth["peak_rss_mb"] = fit_line(counts, series("peak_rss_mb"))
    return growth


def summarise_repeats(runs: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """One site count's entry from its repeated runs: medians of the times.

    Seconds per phase and the ``flwr run`` wall time are medians over the runs that
    finished (robust to a burst of other work on the machine); peak memory is the
    largest seen. Messages and source models come from the first finished run (they
    do not change between repeats). Every run is kept under ``repeats``.
    """
    finished = [run for run in runs if not run.get("error")]
    if not finished:
        return {
            "error": runs[0].get("error", "no run"),
            "flwr_run_seconds": float(
                np.median([float(run["flwr_run_seconds"]) for run in runs])  # type: ignore[arg-type]
            ),
            "repeats": [dict(run) for run in runs],
        }

    def values(key: str) -> list[Mapping[str, float]]:
        return [run[key] for run in finished]  # type: ignore[misc]

    phases = [phase for phase in SCALE_PHASES if phase in values("seconds")[0]]
    after_phase = values("peak_rss_mb_after_phase")
    loads = [load for run in runs for load in run.get("load_average_1min", [])]  # type: ignore[attr-defined]
    first = finished[0]
    return {
        "seconds": {
            phase: float(np.median([row[phase] for row in values("seconds")]))
            for phase in phases
        },
        "peak_rss_mb": max(float(run["peak_rss_mb"]) for run in finished),  # type: ignore[arg-type]
        "peak_rss_mb_after_phase": {
            phase: max(row[phase] for row in after_phase if phase in row)
            for phase in after_phase[0]
        },
        "flwr_run_seconds": float(
            np.median([float(run["flwr_run_seconds"]) for run in finished])  # type: ignore[arg-type]
        ),
        "source_models": first["source_models"],
        "messages": first["messages"],
        "load_average_1min": [min(loads), max(loads)] if loads else [],
        "failed_repeats": len(runs) - len(finished),
        "error": None,
        "repeats": [dict(run) for run in runs],
    }


def _run_scale_once(
    count: int,
    *,
    federation: Path,
    folder: Path,
    run_config: Mapping[str, ConfigValue],
    timeout_s: float,
) -> dict[str, object]:
    """One ``flwr run`` at ``count`` sites; its entry, or its error."""
    runs = folder / "runs"
    overrides = {
        **run_config,
        "federation.dir": str(federation),
        "output.runs-dir": str(runs),
    }
    _log(f"[scale] {count} sites: flwr run ({format_run_config(overrides)})")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        exit_code = run_simulation(
            num_supernodes=count,
            run_config=format_run_config(overrides),
            flwr_home=folder / "flwr-home",
            timeout_s=timeout_s,
        )
    except subprocess.TimeoutExpired:
        exit_code = 124
    wall = time.perf_counter() - started
    # Other work on the machine slows a run down: record how busy it was.
    load = [load_before, os.getloadavg()[0]]
    reports = sorted(runs.glob("*/report.json")) if runs.is_dir() else []
    if exit_code != 0 or len(reports) != 1:
        error = f"flwr run exited with {exit_code}; {len(reports)} reports in {runs}"
        _log(f"[scale] {count} sites: FAILED ({error})")
        return {"error": error, "flwr_run_seconds": wall, "load_average_1min": load}
    report = json.loads(reports[0].read_text())
    messages = count_phase_messages(
        Ledger(reports[0].parent / "ledger.jsonl").entries()
    )
    entry = build_scale_entry(report, messages=messages, flwr_run_seconds=wall)
    entry["load_average_1min"] = load
    phases = ", ".join(
        f"{phase} {seconds:.1f} s"
        for phase, seconds in entry["seconds"].items()  # type: ignore[attr-defined]
    )
    _log(
        f"[scale] {count} sites: {phases}; coordinator peak RSS "
        f"{entry['peak_rss_mb']:.0f} MiB; flwr run {wall:.0f} s; load "
        f"{load[0]:.1f} -> {load[1]:.1f}"
    )
    return entry


def run_scale(
    site_counts: Sequence[int],
    *,
    cases_per_site: int,
    run_config: Mapping[str, ConfigValue],
    seed: int,
    work_dir: Path,
    timeout_s: float,
    repeats: int = 1,
) -> dict[str, object]:
    """Simulate the first phases at each site count; return the scale document.

    Each site count gets one synthetic federation and, per repeat, a fresh Flower
    home and runs folder under ``work_dir``. Repeats are interleaved (4, 8, 16, 32,
    4, 8, ...) so that a burst of other work on the machine does not land on one
    site count only. A run that fails is recorded with its error and the others
    still run.
    """
    started = time.perf_counter()
    federations: dict[int, Path] = {}
    for count in site_counts:
        federations[count] = work_dir / f"sites-{count}" / "federation"
        _log(f"[scale] {count} sites: writing the federation {federations[count]}")
        write_federation(
            federations[count],
            seed=seed,
            num_sites=count,
            num_train_cases=cases_per_site,
        )
    runs: dict[int, list[dict[str, object]]] = {count: [] for count in site_counts}
    for repeat in range(1, repeats + 1):
        for count in site_counts:
            _log(f"[scale] repeat {repeat} of {repeats}")
            runs[count].append(
                _run_scale_once(
                    count,
                    federation=federations[count],
                    folder=work_dir / f"sites-{count}" / f"repeat-{repeat}",
                    run_config=run_config,
                    timeout_s=timeout_s,
                )
            )
    sites = {str(count): summarise_repeats(runs[count]) for count in site_counts}
    cpus = os.cpu_count() or 1
    actors = max(1, cpus // 2)
    return {
        "machine": describe_machine(),
        "seconds": time.perf_counter() - started,
        "settings": {
            "site_counts": list(site_counts),
            "repeats": repeats,
            "training_cases_per_site": cases_per_site,
            "evaluation_cases_per_site": EVALUATION_CASES_PER_SITE,
            "synthetic_seed": seed,
            "run_config": dict(run_config),
            "flwr": importlib.metadata.version("flwr"),
            "cpus": cpus,
        },
        "notes": (
            "seconds: each phase's wall time in the coordinator (report.json "
            "phase_seconds), the median over the repeats; source-training runs "
            "because transferability needs the source models. peak_rss_mb: ru_maxrss "
            "of the process running the ServerApp (the largest over the repeats), "
            "which in simulation is the flwr-simulation process that also hosts the "
            "Ray driver; the ClientApp actors are separate processes and not counted. "
            "Flower's default client resources (2 CPUs per ClientApp actor) give "
            f"{actors} actor(s) on this {cpus}-CPU machine, so sites are served "
            + ("one after another" if actors == 1 else f"{actors} at a time")
            + ". discover includes starting the Ray actors and the ClientApp's "
            "imports. flwr_run_seconds: the whole `flwr run` (SuperLink start, app "
            "install, simulation start-up and shutdown included), median. messages: "
            "coordinator ledger entries per phase (requests = egress, replies = "
            "ingress). load_average_1min: the lowest and highest 1-minute load "
            "average read before and after each run (other work on the machine "
            "slows the runs). repeats: every run, in the order run."
        ),
        "sites": sites,
        "growth": fit_scale_growth(sites),
    }


def list_failed_site_counts(document: Mapping[str, object]) -> list[str]:
    """The site counts whose run failed, in a scale document; [] for other documents.

    Example:
        >>> list_failed_site_counts({"sites": {"4": {}, "8": {"error": "timeout"}}})
        ['8']
    """
    sites = document.get("sites", {})
    assert isinstance(sites, Mapping)
    return [count for count, entry in sites.items() if entry.get("error")]


def _describe_scale_runs(
    sites: Mapping[str, Mapping[str, object]], *, repeats: int
) -> str:
    loads = [
        load
        for entry in sites.values()
        for load in entry.get("load_average_1min", [])  # type: ignore[attr-defined]
    ]
    runs = (
        f"Times are medians of {repeats} interleaved runs per site count"
        if repeats > 1
        else "One run per site count"
    )
    busy = (
        f"; the 1-minute load average during the runs was {min(loads):.1f}-"
        f"{max(loads):.1f}."
        if loads
        else "."
    )
    return runs + busy


def format_scale_table(document: Mapping[str, object]) -> str:
    """Markdown table of a scale document: one row per site count, then the growth."""
    sites = document["sites"]
    settings = document["settings"]
    growth = document["growth"]
    assert isinstance(sites, Mapping)
    assert isinstance(settings, Mapping)
    assert isinstance(growth, Mapping)
    lines = [
        "| sites | source models | discover (s) | source training (s) | "
        "transferability (s) | `flwr run` (s) | coordinator peak RSS (MiB) | "
        "requests (replies): discover, source training, transferability | "
        "MB sent in transferability |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for count, entry in sites.items():
        if entry.get("error"):
            lines.append(f"| {count} | failed: {entry['error']} |" + " |" * 7)
            continue
        seconds, messages = entry["seconds"], entry["messages"]
        exchanged = ", ".join(
            f"{row['requests']} ({row['replies']})"
            for row in (
                messages.get(phase, {"requests": 0, "replies": 0})
                for phase in SCALE_PHASES
            )
        )
        sent_mb = messages.get("transferability", {}).get("bytes_sent", 0) / 1e6
        lines.append(
            f"| {count} | {entry['source_models']} | "
            + " | ".join(f"{seconds.get(phase, 0.0):.1f}" for phase in SCALE_PHASES)
            + f" | {entry['flwr_run_seconds']:.0f} | {entry['peak_rss_mb']:.0f} | "
            f"{exchanged} | {sent_mb:.2f} |"
        )
    lines.append("")
    slopes = [
        f"{name} {fit['slope']:+.2f} s per added site (R² {fit['r2']:.2f})"
        for name, fit in (
            (phase.replace("-", " "), growth.get(phase)) for phase in SCALE_PHASES
        )
        if fit is not None
    ]
    memory = growth.get("peak_rss_mb")
    if slopes:
        lines.append(
            "Least-squares growth over "
            f"{', '.join(str(count) for count in sites)} sites: "
            + "; ".join(slopes)
            + (
                f"; coordinator peak RSS {memory['slope']:+.2f} MiB per added site "
                f"(from {memory['intercept']:.0f} MiB at zero sites)."
                if memory is not None
                else "."
            )
        )
        lines.append("")
    run_config = settings["run_config"]
    assert isinstance(run_config, Mapping)
    lines.append(
        f"Each site: {settings['training_cases_per_site']} training cases, "
        f"image size {run_config['data.image-size']}, at most "
        f"{run_config['data.max-slices-per-case']} slices per case, "
        f"{run_config['train.epochs']} epoch{'s' * (run_config['train.epochs'] != 1)}, "
        f"U-Net channels "
        f"{run_config['model.channels']}; `last-phase=transferability`. "
        "Peak RSS is the flwr-simulation process (the ServerApp and the Ray driver; "
        "the ClientApp actor is a separate process). "
        + _describe_scale_runs(sites, repeats=int(settings.get("repeats", 1)))
        + f" Measured on {document['machine']}, flwr {settings['flwr']}, in "
        f"{document['seconds']:.0f} s."
    )
    return "\n".join(lines)


def update_readme(readme: Path, marker: str, table: str) -> None:
    """Replace the text between ``<!-- marker -->`` and ``<!-- /marker -->``."""
    text = readme.read_text()
    pattern = re.compile(
        rf"(<!-- {re.escape(marker)} -->\n).*?(<!-- /{re.escape(marker)} -->)",
        re.DOTALL,
    )
    if not pattern.search(text):
        raise ValueError(f"{readme}: no <!-- {marker} --> ... <!-- /{marker} --> block")
    readme.write_text(
        pattern.sub(lambda match: f"{match.group(1)}{table}\n{match.group(2)}", text)
    )


def _add_common_options(command: argparse.ArgumentParser, out: str) -> None:
    command.add_argument("--out", type=Path, default=Path(out))
    command.add_argument(
        "--federation-dir",
        type=Path,
        default=None,
        help="a federation folder; default: a synthetic one generated in --cache-dir",
    )
    command.add_argument("--cache-dir", type=Path, default=Path("data"))
    command.add_argument(
        "--readme",
        type=Path,
        default=Path("README.md"),
        help="README whose table block is regenerated ('' to skip)",
    )
    command.add_argument(
        "--table-from",
        type=Path,
        default=None,
        help="only regenerate the README table from an existing benchmark JSON",
    )
    command.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override, e.g. --set train.epochs=10",
    )


def _add_scale_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--out", type=Path, default=Path("benchmarks/scale.json"))
    command.add_argument(
        "--readme",
        type=Path,
        default=Path("README.md"),
        help="README whose table block is regenerated ('' to skip)",
    )
    command.add_argument(
        "--table-from",
        type=Path,
        default=None,
        help="only regenerate the README table from an existing benchmark JSON",
    )
    command.add_argument(
        "--sites",
        type=_site_counts_argument,
        default=[4, 8, 16, 32],
        help="site counts, comma-separated (default 4,8,16,32)",
    )
    command.add_argument(
        "--cases-per-site",
        type=int,
        default=2,
        help="labelled training cases per site (default 2)",
    )
    command.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per site count, interleaved; times are medians (default 3)",
    )
    command.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    command.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep federations and runs here; default: a temporary folder, removed",
    )
    command.add_argument(
        "--timeout-s",
        type=float,
        default=3600.0,
        help="limit for each flwr run (default 3600)",
    )
    command.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override, e.g. --set train.epochs=2",
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.benchmark", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tgma = commands.add_parser("tgma", help="leave-one-site-out TGMA benchmark")
    _add_common_options(tgma, "benchmarks/tgma.json")
    privacy = commands.add_parser(
        "privacy", help="membership-inference AUC and Dice without DP and with DP-SGD"
    )
    _add_common_options(privacy, "benchmarks/privacy.json")
    privacy.add_argument(
        "--members", type=int, default=32, help="training cases per site (default 32)"
    )
    privacy.add_argument(
        "--nonmembers",
        type=int,
        default=32,
        help="held-out cases per site (default 32)",
    )
    privacy.add_argument(
        "--epsilons",
        default="1,3,8",
        help="DP-SGD target epsilons, comma-separated (default 1,3,8)",
    )
    privacy.add_argument(
        "--source",
        default=None,
        help="source site; default: the best single source for the target in "
        "benchmarks/tgma.json",
    )
    privacy.add_argument("--references", type=int, default=4)
    privacy.add_argument("--bootstrap", type=int, default=1000)
    privacy.add_argument("--seed", type=int, default=0)
    scale = commands.add_parser(
        "scale",
        help="wall time per phase and coordinator peak memory at 4, 8, 16, 32 sites "
        "(real Flower simulations)",
    )
    _add_scale_options(scale)
    args = parser.parse_args(argv)
    marker, formatter = {
        "tgma": (README_MARKER, format_table),
        "privacy": (PRIVACY_MARKER, format_privacy_table),
        "scale": (SCALE_MARKER, format_scale_table),
    }[args.command]
    overrides: dict[str, bool | int | float | str] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in '0123456789-tf["' else value
    if args.table_from is not None:
        table = formatter(json.loads(args.table_from.read_text()))
        print(table)
        update_readme(args.readme, marker, table)
        return 0
    if args.command == "scale":
        document = _run_scale_command(args, overrides)
    else:
        document = _run_model_benchmark(args, overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    table = formatter(document)
    print(table)
    if args.readme.is_file():  # --readme "" is Path("."), a folder: skip
        update_readme(args.readme, marker, table)
    return 1 if list_failed_site_counts(document) else 0


def _run_scale_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    run_config = {**SCALE_RUN_CONFIG, **overrides}
    # Fail on a mistyped --set now, not after the first simulation.
    load_default_config(**run_config)
    with contextlib.ExitStack() as stack:
        work_dir = args.work_dir or Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(
                    prefix="sitebridge-scale-", ignore_cleanup_errors=True
                )
            )
        )
        return run_scale(
            args.sites,
            cases_per_site=args.cases_per_site,
            run_config=run_config,
            seed=args.seed,
            work_dir=work_dir.resolve(),
            timeout_s=args.timeout_s,
            repeats=args.repeats,
        )


def _run_model_benchmark(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    config = load_default_config(**overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.command == "tgma":
        federation = args.federation_dir or ensure_builtin_federation(
            args.cache_dir,
            seed=config.federation.synthetic_seed,
            num_sites=config.federation.synthetic_sites,
            num_train_cases=config.federation.synthetic_cases,
            progress=_log,
        )
        document = run_tgma(config, federation_dir=federation)
    else:
        federation = args.federation_dir or ensure_privacy_federation(
            args.cache_dir,
            seed=config.federation.synthetic_seed,
            num_sites=config.federation.synthetic_sites,
            members=args.members,
            nonmembers=args.nonmembers,
        )
        document = run_privacy(
            config,
            federation_dir=federation,
            source=args.source,
            epsilons=[float(value) for value in args.epsilons.split(",") if value],
            references=args.references,
            resamples=args.bootstrap,
            seed=args.seed,
            tgma_json=Path("benchmarks/tgma.json"),
        )
    return document


if __name__ == "__main__":
    sys.exit(main())
