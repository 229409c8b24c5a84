"""The report's privacy section: what each site released, its policy and its ε.

Built from the coordinator's ledger and the sites' replies; ``report.md`` shows the
applied policy's main fields and the ε spent per slice and per patient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from core import protocol
from core.privacy.egress import ERROR_FIELD
from core.privacy.ledger import INGRESS, LedgerEntry
from server.results import RunResults

# The applied-policy fields the report shows (the rest stay in report.json).
POLICY_COLUMNS = tuple(
    protocol.applied_policy_key(key)
    for key in (
        "release.lftm",
        "release.weights-may-leave",
        "dp.required",
        "dp.budget-epsilon",
    )
)


def _dp_replies(results: RunResults) -> list[tuple[str, Mapping[str, Any]]]:
    """``(site, reply figures)`` of every DP reply of the run, in order."""
    replies: list[tuple[str, Mapping[str, Any]]] = []
    if results.source_training is not None:
        replies.extend(results.source_training.training.items())
    if results.affinity is not None:
        replies.extend(results.affinity.profiles.items())
        replies.extend((step["site"], step) for step in results.affinity.steps)
    if results.adaptation is not None:
        replies.extend(
            (results.adaptation.site, pair.reply) for pair in results.adaptation.pairs
        )
    if results.evaluation is not None:
        replies.append((results.evaluation.site, results.evaluation.privacy))
    semisup = results.semisup
    if semisup is not None:
        if semisup.target is not None and semisup.target.missing is None:
            replies.append((semisup.target.site, semisup.target.reply))
        if semisup.federated is not None:
            for entry in semisup.federated.rounds:
                replies.extend(entry.train.items())
    return replies


def build_privacy_section(
    entries: Sequence[LedgerEntry],
    applied_policies: Mapping[str, Mapping[str, Any]],
    results: RunResults,
) -> dict[str, Any]:
    """Per site: what reached the coordinator per action, the policy, epsilon spent.

    Epsilon sums what every DP release of the run spent at the site (source
    training, the task profile and fine-tuning steps, adaptation, semi-supervised
    rounds, the evaluation's Dice); ``total`` is the site's cumulative epsilon after
    its last reply. Both per slice (the unit DP-SGD protects, what the site's budget
    caps) and per patient (group privacy over the slices one case contributes:
    ``patient_total`` is nan when the site could not state it).

    Args:
        entries: the coordinator's ledger entries.
        applied_policies: each site's applied policy, from its hello reply.
        results: the run's phase results (their DP reply figures).

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
        action["errors"] += int(ERROR_FIELD in entry.egress.configs)
        action["bytes"] += entry.egress.total_bytes
        action["arrays"] += len(entry.egress.arrays)
        action["metric_values"] += sum(entry.egress.metrics.values())
    for name, policy in applied_policies.items():
        sites.setdefault(name, {"released": {}})["policy"] = dict(policy)
    for name, reply in _dp_replies(results):
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


def privacy_lines(privacy: Mapping[str, Any]) -> list[str]:
    """The privacy section of ``report.md`` (empty when the report has none)."""
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
        cells = [str(policy.get(column, "n/a")) for column in POLICY_COLUMNS]
        spent = (
            f"{epsilon['spent']:.3f} (δ {epsilon['delta']:g})"
            if epsilon.get("noise_multiplier")
            else "no DP"
            if epsilon
            else "-"
        )
        total = f"{epsilon['total']:.3f}" if epsilon.get("noise_multiplier") else "-"
        patient = (
            f"{epsilon_text(epsilon.get('patient_spent'))}, "
            f"{epsilon_text(epsilon.get('patient_total'))} "
            f"({epsilon.get('slices_per_case', 0)} slices per case)"
            if epsilon.get("noise_multiplier")
            else "-"
        )
        lines.append(
            f"| {site} | {' | '.join(cells)} | {spent} | {total} | {patient} |"
        )
    return lines


def epsilon_text(value: float | None) -> str:
    """An epsilon for the report: 3 decimals, or n/a when not stated or infinite."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if value >= 1000 else f"{value:.3f}"
