"""Runs the coordinator's phases in order, one persisted result at a time; resumes.

Owns the run's life cycle around the phases of ``server/phases/``:

- the run folder: a new run gets ``runs/<run-id>/`` with its resolved config; a run
  started with ``resume-run=<run-id>`` continues in that run's folder after checking
  that its config matches (only the keys in :data:`RESUME_MAY_CHANGE` may differ);
- the phase order and ``last-phase`` (stop early, e.g. for the scale benchmark);
- resume: a phase whose result is already persisted is not run again; its result and
  the models it received are reloaded from the run store. Discover's hello is always
  sent (node ids belong to a Flower run), but its saved result stays the record;
- each phase's wall time and the coordinator's peak memory, persisted with the run;
- the report, written at the end of every attempt, also when a phase fails, so the
  operator sees what finished, who was missing and why the run stopped.

Phase results are written by the phases themselves (models first, then the phase's
JSON), so a phase counts as finished exactly when its JSON exists.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from core.config import PIPELINE_PHASES, ConfigValue, RunConfig, to_flat
from core.training.networks import Arrays
from server import phases
from server.coordinator import ADAPTED_START, Coordinator, PhaseError, SiteInfo
from server.report import build_privacy_section, build_report, write_report
from server.results import (
    AdaptationResult,
    AffinityResult,
    ConsensusResult,
    DiscoverResult,
    EvaluationResult,
    LabelUse,
    PlanResult,
    SemisupResult,
    SourceTrainingResult,
    TransferabilityResult,
)
from server.store import ResultT, RunStore

CONFIG_FILE: Final = "config.json"
TIMINGS_FILE: Final = "timings.json"
ATTEMPTS_FILE: Final = "attempts.json"

# Keys a resumed run may change: they steer the run, not what a phase computes.
RESUME_MAY_CHANGE: Final = frozenset(
    {
        "resume-run",
        "last-phase",
        "output.runs-dir",
        "output.log-level",
        "federation.min-sites",
        "federation.expected-sites",
        "federation.wait-nodes-s",
        "federation.reply-timeout-s",
    }
)


def resume_command(run_folder: str) -> str:
    """The run-config override that finishes the run in ``run_folder``.

    Example:
        >>> print(resume_command("17"))
        flwr run . <connection> --run-config 'resume-run="17"'
    """
    return f"flwr run . <connection> --run-config 'resume-run=\"{run_folder}\"'"


class ResumeError(ValueError):
    """``resume-run`` names no resumable run, or one run with a different config."""


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def config_differences(
    saved: Mapping[str, ConfigValue], current: Mapping[str, ConfigValue]
) -> list[str]:
    """The keys, other than :data:`RESUME_MAY_CHANGE`, whose values differ.

    Example:
        >>> config_differences({"train.epochs": 3, "last-phase": ""},
        ...                    {"train.epochs": 5, "last-phase": "discover"})
        ['train.epochs: 3 -> 5']
    """
    keys = (set(saved) | set(current)) - RESUME_MAY_CHANGE
    absent = "<absent>"
    return [
        f"{key}: {saved.get(key, absent)} -> {current.get(key, absent)}"
        for key in sorted(keys)
        if saved.get(key) != current.get(key)
    ]


def open_run_store(config: RunConfig, *, run_id: int, runs_dir: Path) -> RunStore:
    """The store of a new run, or of the run ``resume-run`` names.

    Raises:
        ResumeError: the named run has no folder or config, or its config differs in
            a key that changes what a phase computes (every such key is named).
    """
    resume = config.pipeline.resume_run
    current = to_flat(config)
    if not resume:
        store = RunStore(runs_dir / str(run_id))
        store.write_json(CONFIG_FILE, current)
        return store
    run_dir = runs_dir / resume
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ResumeError(
            f"resume-run {resume}: {config_path} not found; resume-run names a "
            f"run folder under output.runs-dir ({runs_dir})"
        )
    try:
        saved = json.loads(config_path.read_text())
    except ValueError as error:
        raise ResumeError(f"resume-run {resume}: {config_path}: {error}") from error
    differences = config_differences(saved, current)
    if differences:
        raise ResumeError(
            f"resume-run {resume}: the run config differs from the interrupted "
            f"run's, so its finished phases would not match: " + "; ".join(differences)
        )
    return RunStore(run_dir)


@dataclasses.dataclass
class _Attempt:
    """What this Flower run did to the run folder."""

    flower_run_id: int
    ran: list[str] = dataclasses.field(default_factory=list)
    reloaded: list[str] = dataclasses.field(default_factory=list)
    outcome: str = "running"


class PipelineRunner:
    """Runs (or reloads) each phase up to ``last-phase`` and writes the report.

    Args:
        coordinator: sends the messages; its store is the run folder.
        flower_run_id: this Flower run's id (differs from the folder when resuming).
        expected_nodes: nodes to wait for before discover.
        default_target: the federation's target when the config names none.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        flower_run_id: int,
        expected_nodes: int,
        default_target: str | None,
    ) -> None:
        self.coordinator = coordinator
        self.store = coordinator.store
        self.config = coordinator.config
        self.expected_nodes = expected_nodes
        self.default_target = default_target
        self.attempt = _Attempt(flower_run_id)
        saved = self.store.run_dir / TIMINGS_FILE
        timings = json.loads(saved.read_text()) if saved.is_file() else {}
        self.seconds: dict[str, float] = dict(timings.get("seconds", {}))
        self.memory_mb: dict[str, float] = {}

    @property
    def log(self) -> Callable[[str], None]:
        """The coordinator's progress output."""
        return self.coordinator.log

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[phase] = time.perf_counter() - started
        self.memory_mb[phase] = peak_rss_mb()
        self.attempt.ran.append(phase)
        self.store.write_json(TIMINGS_FILE, {"seconds": self.seconds})

    def _reloaded(self, kind: type[ResultT]) -> ResultT | None:
        result = self.store.load_result(kind)
        if result is not None:
            self.attempt.reloaded.append(kind.PHASE)
            self.log(f"{kind.PHASE}: finished in an earlier attempt, reloaded")
        return result

    def run(self) -> dict[str, Any]:
        """Run the phases; write and return the report.

        Raises:
            PhaseError: a phase could not proceed (the report is written first).
        """
        last = self.config.pipeline.last_phase or PIPELINE_PHASES[-1]
        error: PhaseError | None = None
        try:
            self._run_phases(PIPELINE_PHASES[: PIPELINE_PHASES.index(last) + 1])
            self.attempt.outcome = "completed"
        except PhaseError as failure:
            error = failure
            self.attempt.outcome = f"failed: {failure}"
        report = self._write_report(error)
        if error is not None:
            self.coordinator.warn(
                f"the run stopped: {error}\nrestart the missing site(s), then resume "
                f"it: {resume_command(self.store.run_dir.name)}"
            )
            raise PhaseError(str(error), phase=error.phase, missing=error.missing)
        return report

    def _run_phases(self, wanted: tuple[str, ...]) -> None:
        coordinator, store = self.coordinator, self.store
        nodes = phases.discovery.wait_for_nodes(
            coordinator.grid,
            expected=self.expected_nodes,
            wait_s=self.config.federation.wait_nodes_s,
            log=self.log,
        )
        saved_discover = self._reloaded(DiscoverResult)
        if saved_discover is None:
            with self._timed("discover"):
                discovered, sites = phases.discovery.discover(
                    coordinator, nodes=nodes, default_target=self.default_target
                )
            target = discovered.target
        else:
            with self._timed("rediscover"):
                sites = phases.discovery.rediscover(
                    coordinator, nodes=nodes, saved=saved_discover
                )
            target = saved_discover.target
        target_site = next(site for site in sites.values() if site.name == target)
        self._plan(sites, wanted)
        if "source-training" not in wanted:
            return

        models = self._source_models(sites, target)
        if "affinity" not in wanted:
            return

        # Source models are trained at the sources on their own labels (the target
        # is never asked for one): label-free.
        candidate_use = {name: LabelUse() for name in models}
        affinity_models, affinity_use = self._affinity_model(sites, target_site, models)
        models = {**models, **affinity_models}
        candidate_use.update(affinity_use)
        if "transferability" not in wanted:
            return

        selection = self._reloaded(TransferabilityResult)
        if selection is None:
            with self._timed("transferability"):
                selection = phases.transferability.run(
                    coordinator, target_site, models, candidate_use
                )
        if "adaptation" not in wanted:
            return

        adaptation = self._reloaded(AdaptationResult)
        if adaptation is None:
            with self._timed("adaptation"):
                adaptation, adapted = phases.adaptation.run(
                    coordinator, target_site, models, selection
                )
        else:
            adapted = phases.adaptation.reload(store, adaptation)
        if "consensus" not in wanted:
            return

        start_use = adaptation.label_free.label_use
        consensus, consensus_models = self._consensus_models(
            target_site, models, adapted, selection.candidates, start_use
        )
        if "semisup" not in wanted:
            return

        semisup, semisup_models = self._semisup_models(
            sites, target_site, adapted, start_use
        )
        if "evaluation" not in wanted:
            return

        if self._reloaded(EvaluationResult) is None:
            later = {
                **{f"consensus:{m}": w for m, w in consensus_models.items()},
                **{f"semisup:{s}": w for s, w in semisup_models.items()},
            }
            with self._timed("evaluation"):
                phases.evaluation.run(
                    coordinator,
                    target_site,
                    models,
                    adapted,
                    selection,
                    later,
                    label_use=phases.evaluation.model_label_use(
                        selection, adaptation, consensus, semisup
                    ),
                    postprocess=self._postprocess(
                        selection, [*adapted, *later], semisup
                    ),
                )

    def _plan(self, sites: Mapping[int, SiteInfo], wanted: tuple[str, ...]) -> None:
        """Derive (or reload) the resolution plan and make it the run's."""
        if "plan" not in wanted:
            return
        if not self.config.plan.enabled:
            left = phases.plan.unplanned_values(self.config)
            if left:
                raise PhaseError(
                    f"plan: the run config leaves {', '.join(left)} to the resolution "
                    "plan, but plan.enabled is false; set the value or enable the plan",
                    phase="plan",
                )
            return
        result = self._reloaded(PlanResult)
        if result is None:
            with self._timed("plan"):
                result = phases.plan.run(self.coordinator, sites)
        self.config = phases.plan.apply(self.coordinator, result)
    def _postprocess(
        self,
        selection: TransferabilityResult,
        later: Sequence[str],
        semisup: SemisupResult | None,
    ) -> dict[str, bool]:
        """Each evaluated model's post-processing, from its source's decision."""
        training = self.store.load_result(SourceTrainingResult)
        affinity = self.store.load_result(AffinityResult)
        path = None if affinity is None or not affinity.model else affinity.path
        return phases.evaluation.model_postprocess(
            {} if training is None else training.postprocess(),
            selection,
            models=[f"source:{name}" for name in selection.sources] + list(later),
            seqtran_from=None if path is None else path.nodes[0],
            semisup_start=ADAPTED_START if semisup is None else semisup.start,
        )

    def _affinity_model(
        self,
        sites: Mapping[int, SiteInfo],
        target_site: SiteInfo,
        models: Mapping[str, Arrays],
    ) -> tuple[dict[str, Arrays], dict[str, LabelUse]]:
        """The SeqTran candidate and its label use by name (empty: off or none)."""
        if not self.config.affinity.enabled:
            return {}, {}
        saved = self._reloaded(AffinityResult)
        if saved is None:
            with self._timed("affinity"):
                saved, _ = phases.affinity.run(
                    self.coordinator, sites, target_site, models
                )
        model = saved.model
        if not model:
            return {}, {}
        return (
            {model: self.store.load_model(f"affinity-{model}")},
            {model: saved.label_use},
        )

    def _consensus_models(
        self,
        target_site: SiteInfo,
        models: Mapping[str, Arrays],
        adapted: Mapping[str, Arrays],
        candidates: Mapping[str, LabelUse],
        start_use: LabelUse,
    ) -> tuple[ConsensusResult | None, dict[str, Arrays]]:
        if not self.config.consensus.enabled:
            return None, {}
        saved = self._reloaded(ConsensusResult)
        if saved is not None:
            return saved, {
                method: self.store.load_model(f"consensus-{method}")
                for method in saved.models
            }
        with self._timed("consensus"):
            return phases.consensus.run(
                self.coordinator,
                target_site,
                models,
                adapted,
                candidates=candidates,
                start=start_use,
            )

    def _semisup_models(
        self,
        sites: Mapping[int, SiteInfo],
        target_site: SiteInfo,
        adapted: Mapping[str, Arrays],
        start_use: LabelUse,
    ) -> tuple[SemisupResult | None, dict[str, Arrays]]:
        if not self.config.semisup.enabled:
            return None, {}
        saved = self._reloaded(SemisupResult)
        if saved is not None:
            return saved, {
                scope: self.store.load_model(f"semisup-{scope}")
                for scope in saved.models
            }
        with self._timed("semisup"):
            return phases.semisup.run(
                self.coordinator, sites, target_site, adapted, start_use=start_use
            )

    def _source_models(
        self, sites: Mapping[int, SiteInfo], target: str
    ) -> dict[str, Arrays]:
        saved = self._reloaded(SourceTrainingResult)
        if saved is not None:
            return {
                name: self.store.load_model(f"source-{name}") for name in saved.training
            }
        sources = {
            node: site
            for node, site in sites.items()
            if site.name != target and site.hello.labelled > 0
        }
        with self._timed("source-training"):
            _, trained = phases.source_training.run(self.coordinator, sources)
        return trained

    def _write_report(self, error: PhaseError | None) -> dict[str, Any]:
        store = self.store
        attempts_path = store.run_dir / ATTEMPTS_FILE
        attempts = (
            json.loads(attempts_path.read_text())["attempts"]
            if attempts_path.is_file()
            else []
        )
        attempts.append(dataclasses.asdict(self.attempt))
        store.write_json(ATTEMPTS_FILE, {"attempts": attempts})
        results = store.load_results()
        report = build_report(
            run_id=int(store.run_dir.name)
            if store.run_dir.name.isdigit()
            else self.attempt.flower_run_id,
            config=to_flat(self.config),
            results=results,
            phase_seconds=self.seconds,
            privacy=build_privacy_section(
                self.coordinator.ledger.entries(),
                self.coordinator.applied_policies,
                results,
            ),
            attempts=attempts,
            coordinator={
                "peak_rss_mb": peak_rss_mb(),
                "peak_rss_mb_after_phase": self.memory_mb,
            },
            error=None if error is None else str(error),
            failure=None
            if error is None
            else {
                "phase": error.phase,
                "missing": error.missing,
                "resume": resume_command(store.run_dir.name),
            },
        )
        markdown = write_report(store, report)
        self.log(f"report written to {store.run_dir / 'report.md'}\n\n{markdown}")
        return report
