"""The SiteBridge ServerApp: run config -> phase pipeline -> report.

Phases run in order (``server/runner.py``), each persisted under
``runs/<run-id>/phases/`` before the next starts: discover -> source training ->
transferability -> adaptation -> evaluation. ``last-phase`` stops early;
``resume-run=<run-id>`` finishes an interrupted run in its own folder, reloading the
phases it had finished. With ``federation.dir`` empty the built-in synthetic
federation is generated (cached) first, which is what a local simulation runs on.
The coordinator's progress (``Coordinator.log``) goes to the ``sitebridge.coordinator``
logger at INFO, shown at the run config's ``output.log-level`` (``core/logs.py``).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from core.config import RunConfig, load_run_config
from core.data.dataset import list_site_dirs, read_federation_target
from core.data.synthetic import ensure_builtin_federation, resolve_federation_dir
from core.logs import configure_logging, get_logger
from server.coordinator import Coordinator
from server.runner import PipelineRunner, open_run_store

app = ServerApp()
LOGGER = get_logger("coordinator")


def _log(line: str) -> None:
    """The coordinator's progress line (its ``log``): INFO, one head per line."""
    LOGGER.info("%s", line)


def _warn(line: str) -> None:
    """A failure the run records (``Coordinator.warn``): WARNING."""
    LOGGER.warning("%s", line)


def resolve_runs_dir(config: RunConfig) -> Path:
    """``output.runs-dir``, or ``./runs`` of the working directory when empty."""
    return (
        Path(config.output.runs_dir).expanduser()
        if config.output.runs_dir
        else Path.cwd() / "runs"
    )


def prepare_federation(config: RunConfig) -> tuple[int, str | None]:
    """Return (nodes to wait for, default target); generate the built-in federation.

    In a deployment the coordinator cannot see the sites' folders: the run sets
    ``federation.expected-sites`` (how many SuperNodes to wait for) and
    ``federation.target-site``, and no federation folder is read or generated here.
    Otherwise (simulation) the site folders under ``federation.dir`` (or the built-in
    synthetic federation) say how many nodes to expect and which site is the target.

    Raises:
        ValueError: ``federation.expected-sites`` is set without a target site.
    """
    federation = config.federation
    if federation.expected_sites:
        if not federation.target_site:
            raise ValueError(
                "federation.target-site must name the target site when "
                "federation.expected-sites is set (the coordinator does not see "
                "the sites' folders)"
            )
        return federation.expected_sites, None
    if not federation.dir:
        folder = resolve_federation_dir(federation)
        ensure_builtin_federation(
            folder.parent,
            seed=federation.synthetic_seed,
            num_sites=federation.synthetic_sites,
            num_train_cases=federation.synthetic_cases,
            target_labelled=federation.synthetic_target_labelled,
            shift=federation.synthetic_shift,
            scale=federation.synthetic_scale,
            progress=_log,
        )
    folder = resolve_federation_dir(federation)
    return len(list_site_dirs(folder)), read_federation_target(folder)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the pipeline over the connected sites and write the report."""
    config = load_run_config(context.run_config)
    configure_logging(config.output.log_level)
    store = open_run_store(
        config, run_id=context.run_id, runs_dir=resolve_runs_dir(config)
    )
    resumed = f" (resuming run {config.pipeline.resume_run})" * bool(
        config.pipeline.resume_run
    )
    _log(f"run {context.run_id}{resumed}: results in {store.run_dir}")
    expected, default_target = prepare_federation(config)
    coordinator = Coordinator(
        grid=grid, config=config, store=store, log=_log, warn_log=_warn
    )
    PipelineRunner(
        coordinator,
        flower_run_id=context.run_id,
        expected_nodes=expected,
        default_target=default_target,
    ).run()
