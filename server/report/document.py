"""The run report as a whole: ``report.json``, ``report.md`` and the plots.

``build_report`` gathers the phases' saved results into one document,
``format_markdown`` writes it as ``report.md`` (each method's section comes from
its own module in this package), ``plot_report`` draws the PNGs and
``write_report`` saves all of them in the run folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.report.affinity import PLOT_FILE as AFFINITY_PLOT
from server.report.affinity import affinity_lines, plot_affinity
from server.report.consensus import consensus_lines
from server.report.groups import group_heading, group_of, predictor_groups
from server.report.plan import plan_lines
from server.report.postprocess import postprocess_lines
from server.report.privacy import privacy_lines
from server.report.semisup import PLOT_FILE as SEMISUP_PLOT
from server.report.semisup import plot_semisup, semisup_lines
from server.report.text import number
from server.results import FEW_LABEL, PhaseResult, RunResults
from server.store import RunStore


def build_report(
    *,
    run_id: int,
    config: Mapping[str, Any],
    results: RunResults,
    phase_seconds: Mapping[str, float],
    privacy: Mapping[str, Any] | None = None,
    attempts: Sequence[Mapping[str, Any]] = (),
    coordinator: Mapping[str, Any] | None = None,
    error: str | None = None,
    failure: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report document from the phases' persisted results.

    A phase that has not finished (the run stopped at ``last-phase``, or failed) is
    None in ``results`` and appears as null; ``error`` says why a run stopped, and
    ``failure`` (``phase``, ``missing``: site -> reason, ``resume``: the command that
    finishes the run) what the failed phase knew of the sites it missed, so a run that
    stopped still names its failed sites.
    """
    discover, training = results.discover, results.source_training
    target = None if discover is None else discover.target
    trained = set() if training is None else set(training.training)
    failure = dict(failure or {})
    failed = (set() if training is None else set(training.missing)) | set(
        failure.get("missing", {})
    )
    sites = []
    for site in () if discover is None else discover.sites:
        hello = site.reply
        role = (
            "target"
            if site.name == target
            else "source"
            if site.name in trained
            else "failed"
            if site.name in failed
            else "idle"
        )
        sites.append(
            {
                "name": site.name,
                "role": role,
                "modality": hello.modality,
                "cases": {
                    "labelled": hello.labelled,
                    "unlabelled": hello.unlabelled,
                    "evaluation": hello.evaluation,
                },
            }
        )
    missing = {
        "discover": {} if discover is None else dict(discover.missing),
        "source-training": {} if training is None else dict(training.missing),
    }
    if failure.get("missing"):
        phase = str(failure.get("phase") or "the failed phase")
        missing[phase] = {**missing.get(phase, {}), **failure["missing"]}
    transferability = results.transferability
    return {
        "run_id": run_id,
        "target": target,
        "error": error,
        "resume": failure.get("resume"),
        "sites": sites,
        "source_training": {}
        if training is None
        else training.to_document()["training"],
        "transferability": None
        if transferability is None
        else {
            key: value
            for key, value in transferability.to_document().items()
            if key
            in (
                "metric",
                "release",
                "dtm",
                "candidates",
                "label_free",
                "few_label",
                "itm",
                "selection",
            )
        },
        "plan": _document(results.plan),
        "affinity": _document(results.affinity),
        "adaptation": _document(results.adaptation),
        "consensus": _document(results.consensus),
        "semisup": _document(results.semisup),
        "evaluation": _evaluation_document(results),
        "phase_seconds": dict(phase_seconds),
        "missing": missing,
        "privacy": dict(privacy or {}),
        "attempts": [dict(attempt) for attempt in attempts],
        "coordinator": dict(coordinator or {}),
        "config": dict(config),
    }


def _document(result: PhaseResult | None) -> dict[str, Any] | None:
    """A phase's result in the report: its persisted form, or None."""
    return None if result is None else result.to_document()


def _evaluation_document(results: RunResults) -> dict[str, Any] | None:
    """The evaluation's persisted form, plus ``groups``: each predictor's group.

    ``groups[predictor]`` is ``label-free`` or ``few-label``
    (docs/methods.md#label-free-and-few-label); ``label_use[predictor]`` says what
    a few-label one used.
    """
    evaluation = results.evaluation
    if evaluation is None:
        return None
    return {
        **evaluation.to_document(),
        "groups": {name: use.group for name, use in evaluation.label_use.items()},
    }


def format_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable summary of a report document (complete or not)."""
    transfer = report["transferability"]
    evaluation = report["evaluation"]
    lines = [f"# SiteBridge run {report['run_id']}", ""]
    if report.get("error"):
        lines += [f"**The run stopped:** {report['error']}", ""]
    if transfer is not None:
        lines += [
            f"Target site **{report['target']}**; "
            + _choice_text(transfer["label_free"], transfer["metric"])
            + f" ({transfer.get('selection', 'dtm')} selection) among the label-free "
            f"candidates ({', '.join(transfer['label_free']['candidates'])}).",
            "",
        ]
        few = transfer.get("few_label")
        if few is not None:
            added = [
                name
                for name in few["candidates"]
                if name not in transfer["label_free"]["candidates"]
            ]
            lines += [
                f"Few-label TGMA, with {', '.join(added)} (which used the target's "
                f"labels) among the candidates: "
                + _choice_text(few, transfer["metric"]).removeprefix("TGMA ")
                + ".",
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
    if report.get("plan") is not None:
        lines += plan_lines(report["plan"])
    if report.get("affinity") is not None:
        lines += affinity_lines(report["affinity"], evaluation)
    if transfer is not None:
        lines += [
            "",
            f"## Transferability ({transfer['metric'].upper()} DTM on the target)",
            "",
            "| source | DTM | group | chosen |",
            "|---|---|---|---|",
        ]
        for name, value in sorted(transfer["dtm"].items(), key=lambda item: -item[1]):
            group = group_of(transfer["candidates"][name])
            lines.append(
                f"| {name} | {value:.3f} | {group} | {_chosen(transfer, name)} |"
            )
    if report.get("consensus") is not None:
        lines += consensus_lines(report["consensus"], evaluation)
    if report.get("semisup") is not None:
        lines += semisup_lines(report["semisup"], evaluation)
    if evaluation is not None:
        lines += _evaluation_lines(evaluation, report["target"])
    lines += postprocess_lines(report.get("source_training") or {}, evaluation)
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
    lines += privacy_lines(report.get("privacy", {}))
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


def _choice_text(choice: Mapping[str, Any], metric: str) -> str:
    """``TGMA chose main **C** (W 0.52) and aux **B** (W 0.48) by LFTM``."""
    aux = (
        f" and aux **{choice['aux']}** (W {choice['weights']['aux']:.3f})"
        if choice["aux"]
        else " (no aux)"
    )
    return (
        f"TGMA chose main **{choice['main']}** (W {choice['weights']['main']:.3f})"
        f"{aux} by {metric.upper()}"
    )


def _chosen(transfer: Mapping[str, Any], name: str) -> str:
    """What each TGMA choice made of candidate ``name`` (main, aux, or nothing)."""
    roles = []
    for key, suffix in (("label_free", ""), ("few_label", " (few-label TGMA)")):
        choice = transfer.get(key)
        if choice is None:
            continue
        if name == choice["main"]:
            roles.append(f"main{suffix}")
        elif name == choice["aux"]:
            roles.append(f"aux{suffix}")
        elif name in (choice.get("voters") or ()):
            roles.append(f"votes{suffix}")
    return "; ".join(roles)


def _evaluation_lines(evaluation: Mapping[str, Any], target: str) -> list[str]:
    """The evaluation table, one table per label group, never mixed."""
    lines = [
        "",
        f"## Evaluation on {target}'s labelsTs ({evaluation['num_cases']} cases)",
        "",
        f"Grouped by what each predictor used of {target}'s labels; label-free and "
        "few-label results are never mixed (docs/methods.md#label-free-and-few-label).",
    ]
    uses = evaluation["label_use"]
    for group, names in predictor_groups(evaluation).items():
        if not names:
            continue
        few = group == FEW_LABEL
        lines += [
            "",
            f"### {group_heading(group, [uses[name] for name in names])}",
            "",
            "| predictor | Dice | HD95 (mm) |"
            + (" target labels used by |" if few else ""),
            "|---|---|---|" + ("---|" if few else ""),
        ]
        for name in names:
            row = (
                f"| {name} | {evaluation['dice'][name]:.3f} | "
                f"{number(evaluation['hd95_mm'].get(name, float('nan')), 2)} |"
            )
            if few:
                row += f" {'; '.join(uses[name]['via'])} |"
            lines.append(row)
    if evaluation.get("segmentations"):
        lines += [
            "",
            f"{target} wrote `{evaluation['segmented']}`'s segmentation of each of its "
            f"{evaluation['segmentations']} images as NIfTI on the image's own grid, "
            f"at the site, under its state folder: `segmentations/"
            f"run-{evaluation['segmentations_run']}/` (they never left {target}).",
        ]
    return lines


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
    chosen = transfer["label_free"]
    colours = [
        "tab:red"
        if n == chosen["main"]
        else "tab:orange"
        if n == chosen["aux"]
        else "tab:gray"
        for n in names
    ]
    axis.bar(names, [transfer["dtm"][n] for n in names], color=colours)
    axis.set_ylabel(f"DTM ({transfer['metric'].upper()})")
    axis.set_ylim(0, 1)
    for bar, name in zip(axis.patches, names, strict=True):
        if group_of(transfer["candidates"][name]) == FEW_LABEL:
            bar.set_hatch("//")  # few-label: never TGMA's label-free choice
    axis.set_title(f"Transferability of each source on target {report['target']}")
    figure.tight_layout()
    paths.append(out_dir / "dtm.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    if report["evaluation"] is None:
        return paths
    evaluation = report["evaluation"]
    groups = predictor_groups(evaluation)
    ordered = [name for names in groups.values() for name in names]
    dice = {name: evaluation["dice"][name] for name in ordered}
    figure, axis = plt.subplots(figsize=(max(5, 0.8 * len(dice) + 2), 3.4))
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
    # The two groups side by side, split by a line, never interleaved.
    start = 0
    for group, names in groups.items():
        if not names:
            continue
        if start:
            axis.axvline(start - 0.5, color="black", linestyle="--", linewidth=1)
        axis.text(
            start - 0.4,
            1.02,
            group_heading(group, [evaluation["label_use"][n] for n in names]),
            fontsize="small",
            transform=axis.get_xaxis_transform(),
        )
        start += len(names)
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
