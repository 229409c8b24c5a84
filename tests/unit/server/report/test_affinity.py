"""The report's SeqTran section, from hand-made affinity phase results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.report.affinity import PLOT_FILE, affinity_lines, plot_affinity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def affinity_result(**changes: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "target": "A",
        "profiles": {
            "A": {
                "num-images": 4,
                "num-labelled": 2,
                "label-term": True,
                "dp.epsilon-spent": 0.0,
                "dp.epsilon-total": 0.0,
                "dp.delta": 0.0,
                "dp.noise-multiplier": 0.0,
            },
            "B": {
                "num-images": 6,
                "num-labelled": 6,
                "label-term": True,
                "dp.epsilon-spent": 4.011,
                "dp.epsilon-total": 7.5,
                "dp.delta": 1e-5,
                "dp.noise-multiplier": 2.0,
            },
        },
        "missing": {},
        "sites": ["B", "C", "A"],
        "label_term": True,
        "weights": {"image": 1.0, "label": 0.0875},
        "image_distance": [[0.0, 1.0, 2.0], [1.0, 0.0, 1.5], [2.0, 1.5, 0.0]],
        "label_similarity": [[1.0, 0.9, 0.8], [0.9, 1.0, 0.7], [0.8, 0.7, 1.0]],
        "distance": [[0.0, 0.5, 1.0], [0.5, 0.0, 0.25], [1.0, 0.25, 0.0]],
        "path": {"nodes": ["B", "C", "A"], "cost": 1.75, "path_length": 0.75},
        "steps": [
            {"site": "C", "num-examples": 36, "loss": 0.41, "seconds": 3.2},
            {"site": "A", "num-examples": 12, "loss": 0.38, "seconds": 1.1},
        ],
        "model": "seqtran",
        "label_use": {
            "via": ["SeqTran candidate fine-tuned at A on 2 labelled cases"],
            "cases": 2,
            "atlases": 0,
        },
        "stopped": None,
    }
    result.update(changes)
    return result


def test_section_lists_profiles_matrix_path_and_dice() -> None:
    # Execute
    text = "\n".join(
        affinity_lines(affinity_result(), {"dice": {"source:seqtran": 0.875}})
    )

    # Assert
    assert "## Task affinity and transfer path (SeqTran)" in text
    assert "| A | 4 | 2 | yes | exact |" in text
    assert "| B | 6 | 6 | yes | 4.011 (δ 1e-05) |" in text
    assert "d = 1 * H + 0.0875 * (1 - R)" in text
    assert "| from \\ to | B | C | A |" in text
    assert "| C | 0.500 | 0.000 | 0.250 |" in text
    assert "Chosen path: **B -> C -> A** (search cost 1.750, path length 0.750)" in text
    assert "- fine-tuned at C: 36 examples, loss 0.4100, 3.2 s" in text
    assert (
        "as `seqtran`; Dice on the target: 0.875 (few-label: SeqTran candidate "
        "fine-tuned at A on 2 labelled cases)." in text
    )


def test_section_says_why_there_is_no_model_and_when_only_images_count() -> None:
    # Prepare
    result = affinity_result(
        label_term=False,
        label_similarity=None,
        weights={"image": 1.0, "label": 0.0},
        steps=[],
        model=None,
        stopped="step 1 at C failed: refused",
    )

    # Execute
    text = "\n".join(affinity_lines(result, None))

    # Assert
    assert "image term only: a site has no labelled case" in text
    assert "No transferred model: step 1 at C failed: refused." in text
    assert "Dice on the target" not in text


@pytest.mark.parametrize(
    ("graph", "expected", "absent"),
    [
        (
            {
                "landmarks": "communities",
                "starts": ["B"],
                "communities": [
                    {"members": ["B", "C"], "landmark": "B"},
                    {"members": ["D"], "landmark": "D"},
                ],
                "one_factor_removed": [["C", "D"]],
            },
            [
                "Communities (Girvan-Newman over the sources, `affinity.landmarks` = "
                "communities): {B, C} (landmark B); {D} (landmark D).",
                "One-factor rule (`affinity.one-factor-edges`): no transfer step "
                "between C - D (modality and labels both differ).",
            ],
            [],
        ),
        (
            {
                "landmarks": "case-fraction",
                "starts": ["B", "C"],
                "communities": [],
                "one_factor_removed": [],
            },
            [],
            ["Communities", "One-factor rule"],
        ),
        (None, [], ["Communities", "One-factor rule"]),  # a result from before them
    ],
)
def test_section_names_communities_landmarks_and_removed_steps(
    graph: dict[str, Any] | None, expected: list[str], absent: list[str]
) -> None:
    # Prepare
    result = affinity_result() if graph is None else affinity_result(graph=graph)

    # Execute
    text = "\n".join(affinity_lines(result, None))

    # Assert
    assert all(line in text for line in expected)
    assert not any(word in text for word in absent)


def test_plot_draws_the_matrix_and_the_path(tmp_path: Path) -> None:
    # Execute
    path = plot_affinity(affinity_result(), tmp_path)
    nothing = plot_affinity(affinity_result(distance=None), tmp_path / "none")

    # Assert
    assert path == tmp_path / PLOT_FILE
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert nothing is None
