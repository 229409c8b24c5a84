"""The report's SeqTran section: the affinity matrix, the chosen path and its picture.

Reads the ``affinity`` phase result (``server/phases/affinity.py``) and the evaluation
phase's Dice; :mod:`server.report` calls these two functions. The picture
(``affinity_path.png``) shows the distance matrix as a heat map beside the sites as a
graph, with the chosen path drawn as arrows labelled by their distance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from core import protocol
from server.report.groups import describe_use
from server.report.text import number
from server.results import PROFILE_LABEL_TERM

PLOT_FILE: Final = "affinity_path.png"
# Wire keys of the published profiles' figures and the fine-tuning steps' replies.
_NUM_IMAGES: Final = protocol.field_key(protocol.ProfileReply, "num_images")
_NUM_LABELLED: Final = protocol.field_key(protocol.ProfileReply, "num_labelled")
_NUM_EXAMPLES: Final = protocol.field_key(protocol.TrainReply, "num_examples")
_LOSS: Final = protocol.field_key(protocol.TrainReply, "loss")
_SECONDS: Final = protocol.field_key(protocol.TrainReply, "seconds")


def affinity_lines(
    affinity: Mapping[str, Any], evaluation: Mapping[str, Any] | None
) -> list[str]:
    """Markdown: the profiles, the distance matrix, the path and its model's Dice."""
    lines = ["", "## Task affinity and transfer path (SeqTran)", ""]
    profiles = affinity.get("profiles", {})
    if profiles:
        lines += [
            "Profiles the sites published (aggregates of their training cases):",
            "",
            "| site | training images | labelled | label term | DP ε of the release |",
            "|---|---|---|---|---|",
        ]
        for site, release in profiles.items():
            epsilon = (
                f"{release[protocol.DP_EPSILON_SPENT]:.3f} "
                f"(δ {release[protocol.DP_DELTA]:g})"
                if release.get(protocol.DP_NOISE_MULTIPLIER)
                else "exact"
            )
            lines.append(
                f"| {site} | {release[_NUM_IMAGES]} | {release[_NUM_LABELLED]} | "
                f"{'yes' if release[PROFILE_LABEL_TERM] else 'no'} | {epsilon} |"
            )
    if affinity.get("distance") is not None:
        sites = affinity["sites"]
        weights = affinity["weights"]
        term = (
            f"d = {weights['image']:g} * H + {weights['label']:g} * (1 - R)"
            if affinity["label_term"]
            else f"d = {weights['image']:g} * H (image term only: a site has no "
            "labelled case, so there is no label term)"
        )
        if weights.get("polarity"):
            term += f" + {weights['polarity']:g} * P (the polarity term)"
        lines += [
            "",
            f"Distance between sites ({term}, on min-max-normalised terms; lower "
            "is closer):",
            "",
            "| from \\ to | " + " | ".join(sites) + " |",
            "|---|" + "---|" * len(sites),
        ]
        for site, row in zip(sites, affinity["distance"], strict=True):
            lines.append(f"| {site} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    path = affinity.get("path")
    if path is not None:
        lines += [
            "",
            f"Chosen path: **{' -> '.join(path['nodes'])}** (search cost "
            f"{path['cost']:.3f}, path length {path['path_length']:.3f}).",
        ]
    lines += _graph_lines(affinity.get("graph") or {})
    for step in affinity.get("steps", []):
        lines.append(
            f"- fine-tuned at {step['site']}: {step[_NUM_EXAMPLES]} examples, "
            f"loss {step[_LOSS]:.4f}, {step[_SECONDS]:.1f} s"
        )
    if affinity.get("stopped"):
        lines += ["", f"No transferred model: {affinity['stopped']}."]
    if affinity.get("model"):
        dice = (evaluation or {}).get("dice", {})
        name = f"source:{affinity['model']}"
        lines += [
            "",
            f"The transferred model joined the TGMA candidates as "
            f"`{affinity['model']}`; Dice on the target: {number(dice.get(name))} "
            f"({describe_use(affinity.get('label_use'))}).",
        ]
    return lines


def _graph_lines(graph: Mapping[str, Any]) -> list[str]:
    """The communities and landmarks searched, and the steps the one-factor rule cut."""
    lines = []
    communities = graph.get("communities") or []
    if communities:
        listed = "; ".join(
            f"{{{', '.join(c['members'])}}} (landmark {c['landmark']})"
            for c in communities
        )
        lines += [
            "",
            f"Communities (Girvan-Newman over the sources, `affinity.landmarks` = "
            f"communities): {listed}. A path runs from a landmark through a site of "
            "its community to the target.",
        ]
    removed = graph.get("one_factor_removed") or []
    if removed:
        pairs = ", ".join(f"{first} - {second}" for first, second in removed)
        lines += [
            "",
            f"One-factor rule (`affinity.one-factor-edges`): no transfer step between "
            f"{pairs} (modality and labels both differ).",
        ]
    return lines


def plot_affinity(affinity: Mapping[str, Any], out_dir: Path) -> Path | None:
    """Write the matrix-and-path picture; None when no matrix was computed."""
    if affinity.get("distance") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(affinity["sites"])
    distance = affinity["distance"]
    count = len(sites)
    figure, (heat, graph) = plt.subplots(1, 2, figsize=(9, 4))
    image = heat.imshow(distance, cmap="viridis_r")
    middle = (min(map(min, distance)) + max(map(max, distance))) / 2
    heat.set_xticks(range(count), sites, rotation=45)
    heat.set_yticks(range(count), sites)
    heat.set_title("distance d (lower = closer)")
    for row in range(count):
        for col in range(count):
            heat.text(
                col,
                row,
                f"{distance[row][col]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                # viridis_r is light at low values: dark text there, light text above
                color="black" if distance[row][col] < middle else "white",
            )
    figure.colorbar(image, ax=heat, fraction=0.046)
    # Sites on a circle, the target on top; grey lines for every pair.
    angles = [math.pi / 2 + 2 * math.pi * k / count for k in range(count)]
    target_at = sites.index(affinity["target"])
    position = {
        site: (
            math.cos(angles[(k - target_at) % count]),
            math.sin(angles[(k - target_at) % count]),
        )
        for k, site in enumerate(sites)
    }
    for first in range(count):
        for second in range(first + 1, count):
            (x0, y0), (x1, y1) = position[sites[first]], position[sites[second]]
            graph.plot([x0, x1], [y0, y1], color="lightgray", linewidth=0.8, zorder=1)
    nodes = (affinity.get("path") or {}).get("nodes", [])
    for start, end in itertools.pairwise(nodes):
        (x0, y0), (x1, y1) = position[start], position[end]
        graph.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            # stop short of the node markers so the arrow heads stay visible
            arrowprops={
                "arrowstyle": "-|>",
                "color": "tab:red",
                "linewidth": 2,
                "mutation_scale": 18,
                "shrinkA": 14,
                "shrinkB": 14,
            },
            zorder=2,
        )
        value = distance[sites.index(start)][sites.index(end)]
        graph.text((x0 + x1) / 2, (y0 + y1) / 2, f"{value:.2f}", color="tab:red")
    for site, (x, y) in position.items():
        colour = (
            "tab:red"
            if site == affinity["target"]
            else "tab:orange"
            if site in nodes
            else "tab:gray"
        )
        graph.scatter([x], [y], s=500, color=colour, zorder=3)
        graph.text(x, y, site, ha="center", va="center", color="white", zorder=4)
    graph.set_title(
        "transfer path: " + (" -> ".join(nodes) if nodes else "none"), fontsize=9
    )
    graph.set_xlim(-1.4, 1.4)
    graph.set_ylim(-1.4, 1.4)
    graph.set_aspect("equal")
    graph.axis("off")
    figure.tight_layout()
    path = out_dir / PLOT_FILE
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
