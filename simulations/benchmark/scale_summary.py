"""The ``scale`` benchmark's document: per-run entries, repeats, growth and table.

Pure functions over what a ``flwr run`` of the scale benchmark leaves behind (its
``report.json`` and the coordinator's ledger): one entry per run, the medians over a
site count's repeats, the least-squares cost per added site, and the table between
the ``<!-- benchmark:scale -->`` markers of ``docs/scale-benchmark.md``. Running the
simulations is ``simulations.benchmark.scale``; nothing here starts Flower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import numpy as np

from core import protocol
from core.privacy.ledger import EGRESS, INGRESS, LedgerEntry

SCALE_MARKER: Final = "benchmark:scale"
# The phases the scale benchmark runs (transferability needs the source models), and
# the action each phase sends.
SCALE_PHASES: Final = ("discover", "source-training", "transferability")
PHASE_OF_ACTION: Final = {
    protocol.HELLO: "discover",
    protocol.TRAIN_SOURCE: "source-training",
    protocol.LFTM: "transferability",
}


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
