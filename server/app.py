"""The SiteBridge ServerApp: run config -> phase pipeline -> report.

Phases run in order, each persisted under ``runs/<run-id>/phases/`` before the next
starts: discover -> source training -> transferability -> adaptation -> evaluation.
With ``federation.dir`` empty the built-in synthetic federation is generated (cached)
first, which is what a local simulation runs on.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from core.config import RunConfig, load_run_config, to_flat
from core.data import list_site_dirs, read_federation_target
from core.synthetic import ensure_builtin_federation, resolve_federation_dir
from server import pipeline
from server.report import build_privacy_section, build_report, write_report
from server.store import RunStore

app = ServerApp()


def _log(line: str) -> None:
    print(f"[coordinator] {line}", flush=True)


def resolve_runs_dir(config: RunConfig) -> Path:
    """``output.runs-dir``, or ``./runs`` of the working directory when empty."""
    return (
        Path(config.output.runs_dir).expanduser()
        if config.output.runs_dir
        else Path.cwd() / "runs"
    )


def prepare_federation(config: RunConfig) -> tuple[int, str | None]:
    """Generate the built-in federation if asked; return (site count, target)."""
    federation = config.federation
    if not federation.dir:
        folder = resolve_federation_dir(federation)
        ensure_builtin_federation(
            folder.parent,
            seed=federation.synthetic_seed,
            num_sites=federation.synthetic_sites,
            num_train_cases=federation.synthetic_cases,
            progress=_log,
        )
    folder = resolve_federation_dir(federation)
    return len(list_site_dirs(folder)), read_federation_target(folder)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the TGMA pipeline over the connected sites and write the report."""
    config = load_run_config(context.run_config)
    store = RunStore(resolve_runs_dir(config) / str(context.run_id))
    store.write_json("config.json", to_flat(config))
    _log(f"run {context.run_id}: results in {store.run_dir}")
    expected, default_target = prepare_federation(config)
    coordinator = pipeline.Coordinator(grid=grid, config=config, store=store, log=_log)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    nodes = pipeline.wait_for_nodes(
        grid, expected=expected, wait_s=config.federation.wait_nodes_s, log=_log
    )
    sites, target = pipeline.discover(
        coordinator, nodes=nodes, default_target=default_target
    )
    seconds["discover"] = time.perf_counter() - started

    started = time.perf_counter()
    target_site = next(site for site in sites.values() if site.name == target)
    sources = {
        node: site
        for node, site in sites.items()
        if site.name != target and site.hello.labelled > 0
    }
    models = pipeline.train_sources(coordinator, sources)
    seconds["source-training"] = time.perf_counter() - started

    started = time.perf_counter()
    selection = pipeline.transferability(coordinator, target_site, models)
    seconds["transferability"] = time.perf_counter() - started

    started = time.perf_counter()
    adapted = pipeline.adaptation(coordinator, target_site, models, selection)
    seconds["adaptation"] = time.perf_counter() - started

    started = time.perf_counter()
    evaluation = pipeline.evaluation(
        coordinator, target_site, models, adapted, selection
    )
    seconds["evaluation"] = time.perf_counter() - started

    source_training = store.load_phase("source-training") or {}
    privacy = build_privacy_section(
        coordinator.ledger.entries(), coordinator.applied_policies, source_training
    )
    report = build_report(
        run_id=context.run_id,
        config=to_flat(config),
        discover=store.load_phase("discover") or {},
        source_training=source_training,
        transferability=selection,
        adaptation=store.load_phase("adaptation") or {},
        evaluation=evaluation,
        phase_seconds=seconds,
        privacy=privacy,
    )
    markdown = write_report(store, report)
    _log(f"report written to {store.run_dir / 'report.md'}\n\n{markdown}")
