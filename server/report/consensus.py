"""The report's consensus section (DeepSTAPLE): label sources and consensus Dice."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from server.report.groups import describe_use
from server.report.text import number

CONSENSUS_NAMES = {
    "itm": "TGMA pseudo-labels (ITM-weighted)",
    "majority": "majority vote",
    "staple": "STAPLE",
    "deepstaple": "DeepSTAPLE",
}


def consensus_lines(
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
        f"Label sources {', '.join(consensus['sources'])}; the consensus models are "
        f"{describe_use(consensus.get('label_use'))}.",
        "",
        "| labels | consensus Dice | model Dice |",
        "|---|---|---|",
    ]
    for method, name in CONSENSUS_NAMES.items():
        lines.append(
            f"| {name} | {number(consensus['label_dice'].get(method))} | "
            f"{number(model_dice.get(f'consensus:{method}'))} |"
        )
    lines += [
        "",
        f"Spearman with the labels' true Dice: data parameters "
        f"{number(consensus['spearman_dp'], 2)}, STAPLE sensitivities "
        f"{number(consensus['spearman_staple'], 2)}.",
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
            f"| {source} | {number(consensus['data_parameter'][source])} | "
            f"{number(consensus['staple_sensitivity'].get(source))} | "
            f"{number(consensus['agreement'].get(source))} |"
        )
    return lines
