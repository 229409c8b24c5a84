"""The report's resolution-plan section: the sites' fingerprints, the plan's rules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _numbers(values: Any, digits: int = 3) -> str:
    return " x ".join(f"{float(value):.{digits}g}" for value in values)


def plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """Markdown lines of a plan result's document (``report.json["plan"]``).

    Example:
        >>> lines = plan_lines({"fingerprints": {}, "plan": {}, "applied": {},
        ...                     "missing": {"B": "refused"}})
        >>> lines[3]
        'No site released a fingerprint: the run used its own settings.'
    """
    lines = ["", "## Resolution plan", ""]
    document, applied = plan.get("plan") or {}, plan.get("applied") or {}
    if not document:
        lines.append("No site released a fingerprint: the run used its own settings.")
    else:
        lines += [f"- {rule}" for rule in document["rules"]]
        lines += [
            "",
            f"The run used image size {applied.get('image-size')} px, batch size "
            f"{applied.get('batch-size')}, slice axis {applied.get('slice-axis')}"
            + (
                f" and CT window {_numbers(applied['ct-window'], 4)}"
                if applied.get("ct-window")
                else ""
            )
            + " (run-config values override the plan's; docs/planning.md).",
        ]
    if plan.get("fingerprints"):
        lines += [
            "",
            "| site | images | median spacing (x, y, z) mm | median size (z, y, x) "
            "| CT foreground (p0.5, p50, p99.5, mean, sd) HU | DP epsilon |",
            "|---|---|---|---|---|---|",
        ]
        for name, fields in sorted(plan["fingerprints"].items()):
            ct = fields.get("ct-intensities")
            lines.append(
                f"| {name} | {fields['num-images']} | "
                f"{_numbers(fields['spacing-mm'])} | {_numbers(fields['shape'])} | "
                + (
                    _numbers(ct, 4) + f" ({fields['num-labelled']} cases)"
                    if ct
                    else "-"
                )
                + f" | {float(fields.get('dp.epsilon-spent', 0.0)):.3g} |"
            )
    for name, reason in sorted((plan.get("missing") or {}).items()):
        lines.append(f"\nNo fingerprint from {name}: {reason}")
    return lines
