"""The ``scale`` benchmark: real Flower simulations at 4, 8, 16 and 32 sites.

It runs the coordinator's discover, source-training and transferability phases in a
real Flower simulation (``flwr run .``, ``last-phase=transferability``) on tiny
synthetic federations of 4, 8, 16 and 32 sites, and reports each phase's wall time,
the messages it exchanged and the coordinator's peak memory, as recorded in each run's
``report.json`` and ledger. This module owns running those simulations and the
subcommand's options; the document and its table (``docs/scale-benchmark.md``) are
``simulations.benchmark.scale_summary``, the command line ``simulations.benchmark``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from core.config import ConfigValue, load_default_config
from core.data.synthetic import EVALUATION_CASES_PER_SITE, write_federation
from core.logs import Countdown
from core.privacy.ledger import Ledger
from simulations.benchmark.output import (
    add_output_options,
    benchmark_page,
    describe_machine,
    log_progress,
)
from simulations.benchmark.scale_summary import (
    build_scale_entry,
    count_phase_messages,
    fit_scale_growth,
    summarise_repeats,
)
from simulations.simulate import format_run_config, run_simulation

# Tiny on purpose: the scale benchmark measures how the coordinator's cost grows with
# the number of sites, not accuracy.
SCALE_RUN_CONFIG: Final[dict[str, ConfigValue]] = {
    "last-phase": "transferability",
    # The measured phases are discover, source training and transferability, as the
    # committed figures were taken; the SeqTran phase between them is left out.
    "affinity.enabled": False,
    "data.image-size": 32,
    "data.max-slices-per-case": 4,
    "train.epochs": 1,
    "model.channels": "8,16,32",
    "model.strides": "2,2",
}


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
    log_progress(f"[scale] {count} sites: flwr run ({format_run_config(overrides)})")
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
        log_progress(f"[scale] {count} sites: FAILED ({error})")
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
    log_progress(
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
        log_progress(
            f"[scale] {count} sites: writing the federation {federations[count]}"
        )
        write_federation(
            federations[count],
            seed=seed,
            num_sites=count,
            num_train_cases=cases_per_site,
        )
    runs: dict[int, list[dict[str, object]]] = {count: [] for count in site_counts}
    finished = Countdown(repeats * len(site_counts))
    for repeat in range(1, repeats + 1):
        for count in site_counts:
            log_progress(f"[scale] repeat {repeat} of {repeats}")
            runs[count].append(
                _run_scale_once(
                    count,
                    federation=federations[count],
                    folder=work_dir / f"sites-{count}" / f"repeat-{repeat}",
                    run_config=run_config,
                    timeout_s=timeout_s,
                )
            )
            log_progress(f"[scale] run {finished.tick()}")
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


def add_scale_options(command: argparse.ArgumentParser) -> None:
    """Add every option of the ``scale`` subcommand."""
    add_output_options(command, "benchmarks/scale.json", benchmark_page("scale"))
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


def run_scale_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``scale`` subcommand from its parsed arguments; return the document."""
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
