"""Run report: ``report.json``, ``report.md`` and PNG plots in the run folder.

``report.json`` holds ``sites`` (name, role — target, source, failed (a source that
did not deliver a model) or idle — and cases), ``affinity`` (SeqTran: the profiles'
figures, the distance matrix, the chosen transfer path and its fine-tuning steps,
pictured in ``affinity_path.png``), ``transferability`` (``dtm`` per
source, ``main``, ``aux``, ``weights``), ``evaluation.dice`` with one entry per source
model alone (``source:<name>``), ``uniform`` and ``tgma`` (plus ``tgma-main`` and HD95),
``consensus`` (per label source: mean data parameter, STAPLE sensitivity, agreement
with the DeepSTAPLE consensus; per method: consensus Dice on the target's evaluation
labels; Spearman correlations of label quality), ``semisup`` (the target's UG-MCL
refinement and the federated rounds: Dice per site after each round, plotted in
``semisup_dice.png``), the per-phase timings, who was
missing, ``privacy`` (per site: what it released per
action, the policy it applied and the epsilon it spent, from the coordinator's ledger
and the sites' replies) and the resolved config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core import protocol
from core.ledger import INGRESS, LedgerEntry
from server.report_affinity import PLOT_FILE as AFFINITY_PLOT
from server.report_affinity import affinity_lines, plot_affinity
from server.report_semisup import PLOT_FILE as SEMISUP_PLOT
from server.report_semisup import plot_semisup, semisup_lines
from server.store import RunStore

# The applied-policy fields the report shows (the rest stay in report.json).
_POLICY_COLUMNS = tuple(
    protocol.applied_policy_key(key)
    for key in (
        "release.lftm",
        "release.weights-may-leave",
        "dp.required",
        "dp.budget-epsilon",
    )
)


def _dp_replies(
    source_training: Mapping[str, Any],
    semisup: Mapping[str, Any] | None,
    affinity: Mapping[str, Any] | None = None,
    adaptation: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> list[tuple[str, Mapping[str, Any]]]:
    """``(site, reply figures)`` of every DP reply of the run, in order."""
    replies = list(source_training.get("training", {}).items())
    if affinity is not None:
        replies.extend(affinity.get("profiles", {}).items())
        replies.extend((step["site"], step) for step in affinity.get("steps", []))
    for result in (adaptation, evaluation):
        if result is not None and "site" in result:
            replies.append((result["site"], result))
    if semisup is not None:
        target = semisup.get("target")
        if target is not None and "missing" not in target:
            replies.append((target["site"], target))
        for entry in (semisup.get("federated") or {}).get("rounds", []):
            replies.extend(entry["train"].items())
    return replies


def build_privacy_section(
    entries: Sequence[LedgerEntry],
    applied_policies: Mapping[str, Mapping[str, Any]],
    source_training: Mapping[str, Any],
    semisup: Mapping[str, Any] | None = None,
    affinity: Mapping[str, Any] | None = None,
    adaptation: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per site: what reached the coordinator per action, the policy, epsilon spent.

    Epsilon sums what every DP release of the run spent at the site (source
    training, the task profile and fine-tuning steps, adaptation, semi-supervised
    rounds, the evaluation's Dice); ``total`` is the site's cumulative epsilon after
    its last reply. Both per slice (the unit DP-SGD protects, what the site's budget
    caps) and per patient (group privacy over the slices one case contributes:
    ``patient_total`` is nan when the site could not state it).

    Args:
        entries: the coordinator's ledger of this run.
        applied_policies: site -> the ``policy.*`` fields its replies carried.
        source_training: the source-training phase result (its ``dp.*`` figures).
        semisup: the semisup phase result (its replies' ``dp.*`` figures), if any.
        affinity: the affinity phase result (profile and fine-tuning figures).
        adaptation: the adaptation phase result (its ``dp.*`` figures), if any.
        evaluation: the evaluation phase result (its ``dp.*`` figures), if any.

    Returns:
        ``{site: {"released": {action: {...}}, "policy": {...}, "epsilon": {...}}}``.
    """
    sites: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.direction != INGRESS:
            continue
        site = sites.setdefault(entry.sender, {"released": {}})
        action = site["released"].setdefault(
            entry.message_type,
            {
                "replies": 0,
                "errors": 0,
                "undelivered": 0,
                "bytes": 0,
                "arrays": 0,
                "metric_values": 0,
            },
        )
        if entry.egress is None:  # no reply reached the coordinator
            action["undelivered"] += 1
            continue
        action["replies"] += 1
        action["errors"] += int("error.reason" in entry.egress.configs)
        action["bytes"] += entry.egress.total_bytes
        action["arrays"] += len(entry.egress.arrays)
        action["metric_values"] += sum(entry.egress.metrics.values())
    for name, policy in applied_policies.items():
        sites.setdefault(name, {"released": {}})["policy"] = dict(policy)
    for name, reply in _dp_replies(
        source_training, semisup, affinity, adaptation, evaluation
    ):
        site = sites.setdefault(name, {"released": {}})
        epsilon = site.setdefault(
            "epsilon",
            {
                "spent": 0.0,
                "total": 0.0,
                "delta": 0.0,
                "noise_multiplier": 0.0,
                "patient_spent": 0.0,
                "patient_total": 0.0,
                "slices_per_case": 0,
            },
        )
        epsilon["spent"] += reply.get(protocol.DP_EPSILON_SPENT, 0.0)
        epsilon["patient_spent"] += reply.get(protocol.DP_PATIENT_EPSILON_SPENT, 0.0)
        if reply.get(protocol.DP_NOISE_MULTIPLIER, 0.0):
            epsilon["total"] = reply.get(protocol.DP_EPSILON_TOTAL, 0.0)
            epsilon["delta"] = reply.get(protocol.DP_DELTA, 0.0)
            epsilon["noise_multiplier"] = reply.get(protocol.DP_NOISE_MULTIPLIER, 0.0)
            patient_total = reply.get(protocol.DP_PATIENT_EPSILON_TOTAL)
            epsilon["patient_total"] = (
                math.nan if patient_total is None else patient_total
            )
            epsilon["slices_per_case"] = max(
                epsilon["slices_per_case"],
                int(reply.get(protocol.DP_SLICES_PER_CASE, 0)),
            )
    return dict(sorted(sites.items()))


def build_report(
    *,
    run_id: int,
    config: Mapping[str, Any],
    discover: Mapping[str, Any] | None,
    source_training: Mapping[str, Any] | None,
    transferability: Mapping[str, Any] | None,
    adaptation: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    phase_seconds: Mapping[str, float],
    consensus: Mapping[str, Any] | None = None,
    semisup: Mapping[str, Any] | None = None,
    affinity: Mapping[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
    attempts: Sequence[Mapping[str, Any]] = (),
    coordinator: Mapping[str, Any] | None = None,
    error: str | None = None,
    failure: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report document from the phases' persisted results.

    A phase that has not finished (the run stopped at ``last-phase``, or failed) is
    passed as None and appears as null; ``error`` says why a run stopped, and
    ``failure`` (``phase``, ``missing``: site -> reason, ``resume``: the command that
    finishes the run) what the failed phase knew of the sites it missed, so a run that
    stopped still names its failed sites.
    """
    discover = discover or {"target": None, "sites": [], "missing": {}}
    source_training = source_training or {}
    target = discover["target"]
    trained = set(source_training.get("training", {}))
    failure = dict(failure or {})
    failed = set(source_training.get("missing", {})) | set(failure.get("missing", {}))
    sites = []
    for site in discover["sites"]:
        role = (
            "target"
            if site["name"] == target
            else "source"
            if site["name"] in trained
            else "failed"
            if site["name"] in failed
            else "idle"
        )
        sites.append(
            {
                "name": site["name"],
                "role": role,
                "modality": site["modality"],
                "cases": {
                    "labelled": site["labelled"],
                    "unlabelled": site["unlabelled"],
                    "evaluation": site["evaluation"],
                },
            }
        )
    missing = {
        phase: result.get("missing", {})
        for phase, result in (
            ("discover", discover),
            ("source-training", source_training),
        )
    }
    if failure.get("missing"):
        phase = str(failure.get("phase") or "the failed phase")
        missing[phase] = {**missing.get(phase, {}), **failure["missing"]}
    return {
        "run_id": run_id,
        "target": target,
        "error": error,
        "resume": failure.get("resume"),
        "sites": sites,
        "source_training": source_training.get("training", {}),
        "transferability": None
        if transferability is None
        else {
            key: transferability.get(key)
            for key in ("metric", "release", "dtm", "main", "aux", "weights", "itm")
        },
        "affinity": None if affinity is None else dict(affinity),
        "adaptation": None if adaptation is None else dict(adaptation),
        "consensus": None if consensus is None else dict(consensus),
        "semisup": None if semisup is None else dict(semisup),
        "evaluation": None if evaluation is None else dict(evaluation),
        "phase_seconds": dict(phase_seconds),
        "missing": missing,
        "privacy": dict(privacy or {}),
        "attempts": [dict(attempt) for attempt in attempts],
        "coordinator": dict(coordinator or {}),
        "config": dict(config),
    }


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


# How the consensus section names each method (core.protocol.CONSENSUS_METHODS).
_CONSENSUS_NAMES = {
    "itm": "TGMA pseudo-labels (ITM-weighted)",
    "majority": "majority vote",
    "staple": "STAPLE",
    "deepstaple": "DeepSTAPLE",
}


def _consensus_lines(
    consensus: Mapping[str, Any], evaluation: Mapping[str, Any] | None
) -> list[str]:
    """The consensus section: methods compared, then each label source's quality."""
    if consensus.get("skipped"):
        return [
            "",
            "## Label consensus at the target",
            "",
            f"Skipped: the target refused it ({consensus['skipped']}).",
        ]
    model_dice = {} if evaluation is None else evaluation["dice"]
    atlases = consensus.get("num_atlases", 0)
    lines = [
        "",
        "## Label consensus at the target",
        "",
        f"{consensus['num_labels']} noisy labels (2-D slices x label sources: "
        f"{len(consensus['sources'])} sources, {atlases} of them atlases) on "
        f"{consensus['num_images']} images; the consensus labels stay at the target. "
        "Consensus Dice is measured on the target's evaluation images against their "
        "labels; the model column is the adapted main model trained on each "
        "consensus, scored by the evaluation phase.",
        "",
        "| labels | consensus Dice | model Dice |",
        "|---|---|---|",
    ]
    for method, name in _CONSENSUS_NAMES.items():
        lines.append(
            f"| {name} | {_number(consensus['label_dice'].get(method))} | "
            f"{_number(model_dice.get(f'consensus:{method}'))} |"
        )
    lines += [
        "",
        f"Spearman with the labels' true Dice: data parameters "
        f"{_number(consensus['spearman_dp'], 2)}, STAPLE sensitivities "
        f"{_number(consensus['spearman_staple'], 2)}.",
        "",
        "| label source | mean data parameter | STAPLE sensitivity | "
        "agreement with DeepSTAPLE |",
        "|---|---|---|---|",
    ]
    for source in sorted(
        consensus["data_parameter"],
        key=lambda name: -(consensus["data_parameter"][name] or -math.inf),
    ):
        lines.append(
            f"| {source} | {_number(consensus['data_parameter'][source])} | "
            f"{_number(consensus['staple_sensitivity'].get(source))} | "
            f"{_number(consensus['agreement'].get(source))} |"
        )
    return lines


def format_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable summary of a report document (complete or not)."""
    transfer = report["transferability"]
    evaluation = report["evaluation"]
    lines = [f"# SiteBridge run {report['run_id']}", ""]
    if report.get("error"):
        lines += [f"**The run stopped:** {report['error']}", ""]
    if transfer is not None:
        aux = (
            f" and aux **{transfer['aux']}** (W {transfer['weights']['aux']:.3f})"
            if transfer["aux"]
            else " (no aux)"
        )
        lines += [
            f"Target site **{report['target']}**; TGMA chose main "
            f"**{transfer['main']}** (W {transfer['weights']['main']:.3f}){aux} by "
            f"{transfer['metric'].upper()}.",
            "",
        ]
    elif report["target"]:
        lines += [f"Target site **{report['target']}**.", ""]
    lines += [
        "## Sites",
        "",
        "| site | role | labelled | unlabelled | evaluation |",
        "|---|---|---|---|---|",
    ]
    for site in report["sites"]:
        cases = site["cases"]
        lines.append(
            f"| {site['name']} | {site['role']} | {cases['labelled']} | "
            f"{cases['unlabelled']} | {cases['evaluation']} |"
        )
    if report.get("affinity") is not None:
        lines += affinity_lines(report["affinity"], evaluation)
    if transfer is not None:
        lines += [
            "",
            f"## Transferability ({transfer['metric'].upper()} DTM on the target)",
            "",
            "| source | DTM | chosen |",
            "|---|---|---|",
        ]
        for name, value in sorted(transfer["dtm"].items(), key=lambda item: -item[1]):
            chosen = (
                "main"
                if name == transfer["main"]
                else "aux"
                if name == transfer["aux"]
                else ""
            )
            lines.append(f"| {name} | {value:.3f} | {chosen} |")
    if report.get("consensus") is not None:
        lines += _consensus_lines(report["consensus"], evaluation)
    if report.get("semisup") is not None:
        lines += semisup_lines(report["semisup"], evaluation)
    if evaluation is not None:
        lines += [
            "",
            f"## Evaluation on {report['target']}'s labelsTs "
            f"({evaluation['num_cases']} cases)",
            "",
            "| predictor | Dice | HD95 (mm) |",
            "|---|---|---|",
        ]
        for name, value in evaluation["dice"].items():
            lines.append(
                f"| {name} | {value:.3f} | "
                f"{_number(evaluation['hd95_mm'].get(name, float('nan')), 2)} |"
            )
    lines += ["", "## Phases", "", "| phase | seconds |", "|---|---|"]
    lines += [
        f"| {name} | {seconds:.1f} |"
        for name, seconds in report["phase_seconds"].items()
    ]
    peak = report.get("coordinator", {}).get("peak_rss_mb")
    if peak is not None:
        lines += ["", f"Coordinator peak memory (RSS): {peak:.0f} MiB."]
    attempts = report.get("attempts", [])
    if len(attempts) > 1:
        lines += ["", "## Attempts", ""]
        lines += [
            f"- Flower run {attempt['flower_run_id']}: ran "
            f"{', '.join(attempt['ran']) or 'nothing'}; reloaded "
            f"{', '.join(attempt['reloaded']) or 'nothing'}; {attempt['outcome']}"
            for attempt in attempts
        ]
    lines += _privacy_lines(report.get("privacy", {}))
    missing = {phase: who for phase, who in report["missing"].items() if who}
    if missing:
        lines += ["", "## Missing sites", ""]
        lines += [
            f"- {phase}: {site}: {reason}"
            for phase, who in missing.items()
            for site, reason in who.items()
        ]
    if report.get("resume"):
        lines += [
            "",
            "## Resume",
            "",
            "The run stopped before its last phase. Restart the missing site(s), then "
            "finish the run in this folder (finished phases are reloaded):",
            "",
            f"    {report['resume']}",
        ]
    plots = [
        text
        for text, present in (
            ("`dtm.png` (transferability)", transfer is not None),
            ("`dice.png` (evaluation)", evaluation is not None),
            (
                f"`{AFFINITY_PLOT}` (affinity matrix and transfer path)",
                (report.get("affinity") or {}).get("distance") is not None,
            ),
            (
                f"`{SEMISUP_PLOT}` (semi-supervised rounds)",
                bool((report.get("semisup") or {}).get("federated")),
            ),
        )
        if present
    ]
    if plots:
        lines += ["", f"Plots: {', '.join(plots)}."]
    lines.append("")
    return "\n".join(lines)


def _privacy_lines(privacy: Mapping[str, Any]) -> list[str]:
    if not privacy:
        return []
    lines = [
        "",
        "## Privacy",
        "",
        "What reached the coordinator from each site (its ledger: "
        "`ledger.jsonl` in this folder; each site keeps its own), the policy the "
        "site applied and the DP epsilon it spent in this run. Epsilon is per "
        "slice, the unit DP-SGD protects and the site's budget caps; per patient "
        "(a case contributes many slices) it follows by group privacy and is "
        "much larger unless the site caps slices per case "
        "(`limits.max-slices-per-case = 1` makes the two equal).",
        "",
        "| site | action | replies | errors | undelivered | bytes | arrays | "
        "metric values |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for site, section in privacy.items():
        for action, counts in section.get("released", {}).items():
            lines.append(
                f"| {site} | {action} | {counts['replies']} | {counts['errors']} | "
                f"{counts.get('undelivered', 0)} | {counts['bytes']} | "
                f"{counts['arrays']} | {counts['metric_values']} |"
            )
    lines += [
        "",
        "| site | LFTM release | weights may leave | DP required | ε budget | "
        "ε spent (run) | ε total (site) | per patient: spent (run), total (site) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for site, section in privacy.items():
        policy = section.get("policy", {})
        epsilon = section.get("epsilon", {})
        cells = [str(policy.get(column, "n/a")) for column in _POLICY_COLUMNS]
        spent = (
            f"{epsilon['spent']:.3f} (δ {epsilon['delta']:g})"
            if epsilon.get("noise_multiplier")
            else "no DP"
            if epsilon
            else "-"
        )
        total = f"{epsilon['total']:.3f}" if epsilon.get("noise_multiplier") else "-"
        patient = (
            f"{_epsilon_text(epsilon.get('patient_spent'))}, "
            f"{_epsilon_text(epsilon.get('patient_total'))} "
            f"({epsilon.get('slices_per_case', 0)} slices per case)"
            if epsilon.get("noise_multiplier")
            else "-"
        )
        lines.append(
            f"| {site} | {' | '.join(cells)} | {spent} | {total} | {patient} |"
        )
    return lines


def _epsilon_text(value: float | None) -> str:
    """An epsilon for the report: 3 decimals, or n/a when not stated or infinite."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if value >= 1000 else f"{value:.3f}"


def plot_report(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``dtm.png``, ``dice.png``, the affinity and semisup plots (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    if report.get("affinity") is not None:
        affinity_plot = plot_affinity(report["affinity"], out_dir)
        if affinity_plot is not None:
            paths.append(affinity_plot)
    if report.get("semisup") is not None:
        semisup_plot = plot_semisup(report["semisup"], out_dir)
        if semisup_plot is not None:
            paths.append(semisup_plot)
    transfer = report["transferability"]
    if transfer is None:
        return paths
    names = sorted(transfer["dtm"])
    figure, axis = plt.subplots(figsize=(max(4, 0.8 * len(names) + 2), 3))
    colours = [
        "tab:red"
        if n == transfer["main"]
        else "tab:orange"
        if n == transfer["aux"]
        else "tab:gray"
        for n in names
    ]
    axis.bar(names, [transfer["dtm"][n] for n in names], color=colours)
    axis.set_ylabel(f"DTM ({transfer['metric'].upper()})")
    axis.set_ylim(0, 1)
    axis.set_title(f"Transferability of each source on target {report['target']}")
    figure.tight_layout()
    paths.append(out_dir / "dtm.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    if report["evaluation"] is None:
        return paths
    dice = report["evaluation"]["dice"]
    figure, axis = plt.subplots(figsize=(max(5, 0.8 * len(dice) + 2), 3))
    axis.bar(
        list(dice),
        list(dice.values()),
        color=[
            "tab:blue"
            if n.startswith("tgma")
            else "tab:green"
            if n.startswith("consensus")
            else "tab:purple"
            if n.startswith("semisup")
            else "tab:gray"
            for n in dice
        ],
    )
    axis.set_ylabel("Dice on target")
    axis.set_ylim(0, 1)
    axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    paths.append(out_dir / "dice.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    return paths


def write_report(store: RunStore, report: Mapping[str, Any]) -> str:
    """Write report.json, report.md and the plots; return the markdown."""
    store.write_json("report.json", report)
    markdown = format_markdown(report)
    store.write_text("report.md", markdown)
    plot_report(report, store.run_dir)
    return markdown
