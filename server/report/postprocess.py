"""The report's post-processing section: each source's decision, and its effect.

Keeping the largest connected component per class (docs/methods.md#post-processing)
is decided at each source on its own labelled evaluation cases; the section lists
each source's decision with the two mean Dice figures it sent, and for every
predictor the target post-processed, its Dice and HD95 before and after, from the
evaluation's ``dice_raw``/``hd95_raw_mm`` beside ``dice``/``hd95_mm``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from core import protocol
from server.report.groups import group_of
from server.report.text import number


def _signed(value: float, digits: int) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.{digits}f}"


def postprocess_lines(
    training: Mapping[str, Mapping[str, Any]],
    evaluation: Mapping[str, Any] | None,
) -> list[str]:
    """The section's markdown lines; empty when no source decided anything.

    Args:
        training: per source, its training reply's wire fields (the report's
            ``source_training``).
        evaluation: the report's evaluation (None: not run).
    """
    decision, before, after = (
        protocol.field_key(protocol.TrainReply, name)
        for name in ("largest_component", "dice_raw", "dice_postprocessed")
    )
    decided = {
        name: fields
        for name, fields in sorted(training.items())
        if fields.get(decision) is not None
    }
    if not decided:
        return []
    lines = [
        "",
        "## Post-processing: largest connected component",
        "",
        "Each source kept the largest 3-D connected component per class of its "
        "model's predictions only where that strictly raised the mean Dice of its "
        "own labelled evaluation cases (docs/methods.md#post-processing).",
        "",
        "| source | decision | its Dice raw | its Dice post-processed |",
        "|---|---|---|---|",
    ]
    for name, fields in decided.items():
        lines.append(
            f"| {name} | {'on' if fields[decision] == 1 else 'off'} | "
            f"{number(fields.get(before), 3)} | {number(fields.get(after), 3)} |"
        )
    raw = {} if evaluation is None else dict(evaluation.get("dice_raw") or {})
    if evaluation is None:
        return lines
    if not raw:
        lines += ["", "The target post-processed no predictor."]
        return lines
    hd95_raw = evaluation.get("hd95_raw_mm") or {}
    lines += [
        "",
        "The target post-processed these predictors before scoring them (a "
        "predictor follows the sources whose models carry most of its weight):",
        "",
        "| predictor | group | Dice raw | Dice post-processed | change | "
        "HD95 raw (mm) | HD95 post-processed (mm) | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(raw):
        dice, dice_raw = evaluation["dice"][name], raw[name]
        hd95 = _or_nan(evaluation["hd95_mm"].get(name))
        hd95_before = _or_nan(hd95_raw.get(name))
        lines.append(
            f"| {name} | {group_of(evaluation['label_use'][name])} | "
            f"{dice_raw:.3f} | {dice:.3f} | {_signed(dice - dice_raw, 3)} | "
            f"{number(hd95_before, 2)} | {number(hd95, 2)} | "
            f"{_signed(hd95 - hd95_before, 2)} |"
        )
    return lines


def _or_nan(value: float | None) -> float:
    """A figure, nan where none was sent (or it was written as null)."""
    return math.nan if value is None else float(value)
