"""The report's semisup section and Dice-per-round plot, on hand-made results."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from server.report import build_report, format_markdown, plot_report
from server.report.semisup import PLOT_FILE, round_means, semisup_lines
from server.results import EvaluationResult, RunResults, SemisupResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SEMISUP: dict[str, Any] = {
    "variant": "ugmcl",
    "labelled_fraction": 0.2,
    "start": "adapted:main",
    "target": {
        "site": "A",
        "num-examples": 1200,
        "num-labelled": 2,
        "num-unlabelled": 10,
        "supervised-loss": 0.3,
        "consistency-loss": 0.01,
        "cross-task-loss": 0.02,
        "certain-fraction": 0.91,
        "seconds": 12.5,
    },
    "federated": {
        "sites": ["A", "B"],
        "stopped": None,
        "rounds": [
            {"round": 0, "dice": {"A": 0.5, "B": 0.6}, "missing": {}, "train": {}},
            {"round": 1, "dice": {"A": 0.7, "B": 0.8}, "missing": {}, "train": {}},
        ],
    },
    "models": ["federated", "target"],
    "label_use": {
        "federated": {"via": [], "cases": 0, "atlases": 0},
        "target": {
            "via": ["UG-MCL refined at A on 2 labelled cases"],
            "cases": 2,
            "atlases": 0,
        },
    },
}
EVALUATION = {
    "site": "A",
    "num_cases": 6,
    "dice": {"semisup:target": 0.81, "semisup:federated": 0.77},
    "hd95_mm": {},
    "label_use": {
        f"semisup:{scope}": use for scope, use in SEMISUP["label_use"].items()
    },
}


def test_semisup_section_shows_target_and_rounds() -> None:
    # Execute
    text = "\n".join(semisup_lines(SEMISUP, EVALUATION))

    # Assert
    assert "## Semi-supervised rounds (UG-MCL)" in text
    assert "kept 20% of its labelled cases labelled" in text
    assert "At the target A: 2 labelled and 10 unlabelled cases" in text
    assert (
        "Dice on its evaluation labels: 0.810 (few-label: UG-MCL refined at A on 2 "
        "labelled cases)" in text
    )
    assert "| round | A | B | mean |" in text
    assert "| 0 | 0.500 | 0.600 | 0.550 |" in text
    assert "| 1 | 0.700 | 0.800 | 0.750 |" in text
    assert "Final federated student on the target: 0.770 (label-free)" in text


def test_semisup_section_says_what_failed() -> None:
    # Prepare
    semisup = copy.deepcopy(SEMISUP)
    semisup["target"] = {"site": "A", "missing": "error 100: requires DP-SGD"}
    semisup["federated"]["stopped"] = "round 2: 0 site(s) replied, 1 needed"
    semisup["models"], semisup["label_use"] = [], {}

    # Execute
    text = "\n".join(semisup_lines(semisup, None))

    # Assert
    assert "At the target A: failed: error 100: requires DP-SGD" in text
    assert "The rounds stopped at round 2: 0 site(s) replied" in text
    assert "Final federated student on the target: n/a (no model)" in text


@pytest.mark.parametrize(
    ("rounds", "expected"),
    [
        ([{"round": 0, "dice": {"A": 0.2, "B": 0.4}}], [pytest.approx(0.3)]),
        ([{"round": 0, "dice": {}}], [None]),
        ([], []),
    ],
)
def test_round_means(rounds: list[dict[str, Any]], expected: list[Any]) -> None:
    # Execute / Assert
    assert round_means({"federated": {"rounds": rounds}}) == expected


def test_report_carries_semisup_and_plots_dice_per_round(tmp_path: Path) -> None:
    # Prepare
    report = build_report(
        run_id=1,
        config={},
        results=RunResults(
            evaluation=EvaluationResult.from_document(EVALUATION),
            semisup=SemisupResult.from_document(SEMISUP),
        ),
        phase_seconds={},
    )

    # Execute
    paths = plot_report(report, tmp_path)
    markdown = format_markdown(report)

    # Assert
    assert report["semisup"] == SEMISUP
    assert tmp_path / PLOT_FILE in paths
    assert (tmp_path / PLOT_FILE).read_bytes().startswith(PNG_MAGIC)
    assert f"`{PLOT_FILE}` (semi-supervised rounds)" in markdown
    assert "## Semi-supervised rounds (UG-MCL)" in markdown


def test_no_plot_without_federated_rounds(tmp_path: Path) -> None:
    # Prepare
    semisup = {**SEMISUP, "federated": None}

    # Execute
    report = build_report(
        run_id=1,
        config={},
        results=RunResults(semisup=SemisupResult.from_document(semisup)),
        phase_seconds={},
    )
    plot_report(report, tmp_path)

    # Assert
    assert not (tmp_path / PLOT_FILE).exists()
    assert "semi-supervised rounds)" not in format_markdown(report)
