"""The report's semi-supervised section: its markdown and the Dice-per-round plot.

Reads the ``semisup`` phase result (``server/phases/semisup.py``) and the evaluation
phase's Dice; :mod:`server.report` calls these two functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from core import protocol
from server.report.groups import describe_use
from server.report.text import number

PLOT_FILE: Final = "semisup_dice.png"
# Wire keys of the target's semisup reply.
_REPLY_KEY: Final = {
    name: protocol.field_key(protocol.SemisupReply, name)
    for name in (
        "num_labelled",
        "num_unlabelled",
        "num_examples",
        "seconds",
        "certain_fraction",
    )
}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def round_means(semisup: Mapping[str, Any]) -> list[float | None]:
    """Mean Dice over the sites that scored each federated round (round 0 first).

    Example:
        >>> round_means({"federated": {"rounds": [
        ...     {"round": 0, "dice": {"A": 0.5, "B": 0.7}},
        ...     {"round": 1, "dice": {}}]}})
        [0.6, None]
    """
    federated = semisup.get("federated") or {"rounds": []}
    return [_mean(list(entry["dice"].values())) for entry in federated["rounds"]]


def semisup_lines(
    semisup: Mapping[str, Any], evaluation: Mapping[str, Any] | None
) -> list[str]:
    """Markdown: the target refinement and the federated rounds' Dice per site."""
    model_dice = {} if evaluation is None else evaluation["dice"]
    uses = semisup.get("label_use") or {}
    lines = [
        "",
        "## Semi-supervised rounds (UG-MCL)",
        "",
        f"Variant `{semisup['variant']}`, starting from `{semisup['start']}`; each "
        f"site kept {semisup['labelled_fraction']:.0%} of its labelled cases "
        "labelled and used its other training images as unlabelled.",
    ]
    target = semisup.get("target")
    if target is not None and "missing" in target:
        lines += ["", f"At the target {target['site']}: failed: {target['missing']}"]
    elif target is not None:
        key = _REPLY_KEY
        lines += [
            "",
            f"At the target {target['site']}: {target[key['num_labelled']]} labelled "
            f"and {target[key['num_unlabelled']]} unlabelled cases, "
            f"{target[key['num_examples']]} samples in "
            f"{target[key['seconds']]:.1f} s; {target[key['certain_fraction']]:.2f} "
            "of the pixels were under the uncertainty threshold. Dice on its "
            f"evaluation labels: {number(model_dice.get('semisup:target'))} "
            f"({describe_use(uses.get('target'))}).",
        ]
    federated = semisup.get("federated")
    if federated is not None:
        sites = federated["sites"]
        lines += [
            "",
            f"Federated rounds (FedAvg of the student, weighted by samples) at "
            f"{', '.join(sites)}; Dice of the averaged student on each site's "
            "evaluation labels after each round (round 0: the start model).",
            "",
            "| round | " + " | ".join(sites) + " | mean |",
            "|---|" + "---|" * (len(sites) + 1),
        ]
        for entry, mean in zip(federated["rounds"], round_means(semisup), strict=True):
            cells = [number(entry["dice"].get(site)) for site in sites]
            lines.append(
                f"| {entry['round']} | " + " | ".join(cells) + f" | {number(mean)} |"
            )
        if federated.get("stopped"):
            lines += ["", f"The rounds stopped at {federated['stopped']}"]
        lines += [
            "",
            "Final federated student on the target: "
            f"{number(model_dice.get('semisup:federated'))} "
            f"({describe_use(uses.get('federated'))}).",
        ]
    return lines


def plot_semisup(semisup: Mapping[str, Any], out_dir: Path) -> Path | None:
    """Write the Dice-per-round plot of the federated rounds; None without rounds."""
    federated = semisup.get("federated")
    if not federated or not federated["rounds"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [entry["round"] for entry in federated["rounds"]]
    figure, axis = plt.subplots(figsize=(5, 3))
    for site in federated["sites"]:
        values = [
            entry["dice"].get(site, float("nan")) for entry in federated["rounds"]
        ]
        axis.plot(rounds, values, marker="o", alpha=0.6, label=site)
    means = [math.nan if m is None else m for m in round_means(semisup)]
    axis.plot(rounds, means, color="black", linewidth=2, label="mean")
    axis.set_xlabel("federated round")
    axis.set_ylabel("Dice (evaluation labels)")
    axis.set_ylim(0, 1)
    axis.set_xticks(rounds)
    axis.set_title(f"UG-MCL federated rounds ({semisup['variant']})")
    axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    path = out_dir / PLOT_FILE
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
