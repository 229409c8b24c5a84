"""What the federation adds: the simulated pipeline's phases against direct calls.

The ``perf`` benchmark's third measurement (``--overhead``). The pipeline runs as a
real local Flower simulation (``python -m simulations.simulate``: a SuperLink, Ray,
one ClientApp per site behind the egress guard, the coordinator's ledger), and its
run folder's ``timings.json`` gives each phase's wall time. The same work is then
done by calling the same core functions directly in this process, one site after
the other: each site's hello (``index_site``), fingerprint, each source's
``train_source_model``, the target's ``score_candidates`` and ``adapt_target`` of the
pair the run chose, and ``evaluate_predictors`` of the run's predictors. Per phase
the ratio simulated / direct is reported (target: at most
:data:`OVERHEAD_TARGET_RATIO`), and what the simulation's wall time holds outside
its phases (Flower, Ray and the apps starting and stopping) apart.

The optional phases (affinity, consensus, semi-supervised) are left out so that each
measured phase has one direct counterpart; so are the target's segmentations and the
post-processing decisions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from core.config import ConfigValue, RunConfig, load_default_config
from core.data.dataset import index_site, list_site_dirs
from core.planning.fingerprint import compute_fingerprint
from core.planning.rules import derive_plan
from core.training.evaluation import evaluate_predictors
from core.training.job import build_initial_weights, train_source_model
from core.training.networks import Arrays
from core.transfer.job import adapt_target, score_candidates
from server.phases.evaluation import build_predictors
from server.results import TransferabilityResult
from simulations.benchmark.output import log_progress
from simulations.simulate import REPO_ROOT, format_run_config

OVERHEAD_TARGET_RATIO: Final = 1.10
# The run the overhead is measured on: the mandatory phases only, small enough to
# repeat, large enough that a phase is seconds, not milliseconds.
OVERHEAD_RUN: Final[dict[str, ConfigValue]] = {
    "affinity.enabled": False,
    "consensus.enabled": False,
    "semisup.enabled": False,
    "output.target-segmentations": "",
    # The sources' post-processing decisions and the evaluation's post-processed
    # scores have no direct-call counterpart below.
    "postprocess.largest-component": "off",
    "train.epochs": 5,
    "adapt.epochs": 2,
}
# Discover is the run's first message: in a simulation it waits for Ray to start
# each site's ClientApp actor and import the app, so it counts as start-up, not as
# a phase's work.
START_UP_PHASE: Final = "discover"
MEASURED_PHASES: Final = (
    "plan",
    "source-training",
    "transferability",
    "adaptation",
    "evaluation",
)


def run_simulated(
    overrides: Mapping[str, ConfigValue], *, num_sites: int, runs_dir: Path
) -> tuple[float, dict[str, float], Path]:
    """The simulation's wall time, its phases' seconds and its run folder."""
    run_config = format_run_config({**overrides, "output.runs-dir": str(runs_dir)})
    command = [
        sys.executable,
        "-m",
        "simulations.simulate",
        "--num-supernodes",
        str(num_sites),
        "--run-config",
        run_config,
        "--flwr-home",
        str(runs_dir / ".flwr-home"),
    ]
    started = time.perf_counter()
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(
            f"the simulated run failed ({completed.returncode}): "
            f"{(completed.stdout + completed.stderr)[-3000:]}"
        )
    (run_dir,) = [path for path in runs_dir.iterdir() if path.name.isdigit()]
    seconds = json.loads((run_dir / "timings.json").read_text())["seconds"]
    return wall, {str(key): float(value) for key, value in seconds.items()}, run_dir


def run_direct(
    config: RunConfig, federation_dir: Path, *, target: str, run_dir: Path
) -> dict[str, float]:
    """The same work as the simulated run's phases, as direct calls; seconds each."""
    sites = {path.name: path for path in list_site_dirs(federation_dir)}
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    indexes = {name: index_site(path) for name, path in sites.items()}
    seconds["discover"] = time.perf_counter() - started

    started = time.perf_counter()
    fingerprints = {
        name: compute_fingerprint(index, num_classes=config.data.num_classes)
        for name, index in indexes.items()
    }
    derive_plan(fingerprints, plan=config.plan, strides=config.model.strides)
    seconds["plan"] = time.perf_counter() - started

    started = time.perf_counter()
    initial = build_initial_weights(config)
    sources = {
        name: train_source_model(sites[name], config, initial_weights=initial).weights
        for name, index in indexes.items()
        if name != target and index.labelled
    }
    seconds["source-training"] = time.perf_counter() - started

    started = time.perf_counter()
    score_candidates(sites[target], sources, config)
    seconds["transferability"] = time.perf_counter() - started

    # The pair the simulated run chose, adapted again here.
    chosen = TransferabilityResult.from_document(
        json.loads((run_dir / "phases" / "transferability.json").read_text())
    )
    pair = chosen.label_free
    started = time.perf_counter()
    adapted = adapt_target(
        sites[target],
        {name: sources[name] for name in pair.voting},
        config,
        main=pair.main,
        aux=pair.aux,
        weight_main=pair.weights.main,
        weight_aux=pair.weights.aux,
    )
    seconds["adaptation"] = time.perf_counter() - started

    models: dict[str, Arrays] = {
        f"source:{name}": weights for name, weights in sources.items()
    }
    models["adapted:main"] = adapted.main_weights
    if adapted.aux_weights is not None:
        models["adapted:aux"] = adapted.aux_weights
    predictors = build_predictors(
        chosen,
        adapted=[name for name in models if name.startswith("adapted:")],
        ensemble_min_voters=config.transfer.ensemble_min_voters,
    )
    started = time.perf_counter()
    evaluate_predictors(sites[target], models, predictors, config)
    seconds["evaluation"] = time.perf_counter() - started
    return seconds


def measure_overhead(
    overrides: Mapping[str, ConfigValue], federation_dir: Path
) -> dict[str, object]:
    """Simulated phases against direct calls on ``federation_dir``: its figures."""
    run = {**OVERHEAD_RUN, **overrides, "federation.dir": str(federation_dir)}
    config = load_default_config(**run)
    site_dirs = list_site_dirs(federation_dir)
    with tempfile.TemporaryDirectory(prefix="sitebridge-overhead-") as scratch:
        wall, simulated, run_dir = run_simulated(
            run, num_sites=len(site_dirs), runs_dir=Path(scratch)
        )
        report = json.loads((run_dir / "report.json").read_text())
        target = str(report["target"])
        log_progress(f"simulated run: {wall:.1f} s wall, phases {simulated}")
        direct = run_direct(config, federation_dir, target=target, run_dir=run_dir)
    log_progress(f"direct calls: {direct}")
    phases = {
        phase: {
            "simulated_seconds": simulated.get(phase, 0.0),
            "direct_seconds": direct[phase],
            "ratio": simulated.get(phase, 0.0) / direct[phase]
            if direct[phase] > 0
            else float("nan"),
        }
        for phase in MEASURED_PHASES
    }
    in_phases = sum(simulated.get(phase, 0.0) for phase in MEASURED_PHASES)
    total_direct = sum(direct[phase] for phase in MEASURED_PHASES)
    all_phases = sum(simulated.values())
    return {
        "sites": len(site_dirs),
        "target": target,
        "run_config": {key: run[key] for key in sorted(run) if key != "federation.dir"},
        "phases": phases,
        "simulated_phases_seconds": in_phases,
        "direct_seconds": total_direct,
        "ratio": in_phases / total_direct,
        "simulation_wall_seconds": wall,
        "discover_seconds": simulated.get(START_UP_PHASE, 0.0),
        "direct_discover_seconds": direct[START_UP_PHASE],
        "outside_phases_seconds": wall - all_phases,
        "start_up_seconds": wall - all_phases + simulated.get(START_UP_PHASE, 0.0),
        "target_ratio": OVERHEAD_TARGET_RATIO,
    }


def format_overhead_table(overhead: Mapping[str, object]) -> list[str]:
    """Markdown lines of the overhead part of a perf document."""
    phases = overhead["phases"]
    assert isinstance(phases, Mapping)
    figure = {
        key: float(value)
        for key, value in overhead.items()
        if isinstance(value, int | float)
    }
    lines = [
        "| phase | simulated (s) | direct calls (s) | ratio |",
        "|---|---|---|---|",
    ]
    for phase, row in phases.items():
        lines.append(
            f"| {phase} | {row['simulated_seconds']:.2f} | "
            f"{row['direct_seconds']:.2f} | {row['ratio']:.2f} |"
        )
    met = "met" if figure["ratio"] <= OVERHEAD_TARGET_RATIO else "not met"
    lines += [
        f"| all these phases | {figure['simulated_phases_seconds']:.2f} | "
        f"{figure['direct_seconds']:.2f} | {figure['ratio']:.2f} (target at most "
        f"{OVERHEAD_TARGET_RATIO}, {met}) |",
        "",
        f"The simulation ({overhead['sites']} sites, target {overhead['target']}) "
        f"took {figure['simulation_wall_seconds']:.1f} s from the command to its end. "
        f"Start-up, apart: {figure['start_up_seconds']:.1f} s, of which "
        f"{figure['outside_phases_seconds']:.1f} s outside the phases (the SuperLink "
        "and Ray starting, the report, stopping) and "
        f"{figure['discover_seconds']:.1f} s in discover, the first message (each "
        "site's ClientApp actor starting and importing the app; its direct "
        f"counterpart took {figure['direct_discover_seconds']:.2f} s).",
    ]
    return lines
