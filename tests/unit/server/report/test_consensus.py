"""The report's label-consensus section, from a persisted consensus phase result."""

from __future__ import annotations

from typing import Any

from server.report import build_report, format_markdown
from server.results import (
    ConsensusResult,
    DiscoverResult,
    EvaluationResult,
    RunResults,
)

CONSENSUS: dict[str, Any] = {
    "num_images": 18,
    "num_labels": 900,
    "num_atlases": 1,
    "seconds": 60.0,
    "data_parameter": {"B": 0.4, "C": -0.3, "atlas-1": None},
    "staple_sensitivity": {"B": 0.9, "C": 0.2, "atlas-1": 0.5},
    "agreement": {"B": 0.95, "C": 0.1, "atlas-1": 0.6},
    "label_dice": {"itm": 0.8, "majority": 0.5, "staple": 0.7, "deepstaple": 0.85},
    "spearman_dp": 0.81,
    "spearman_staple": None,  # nan is stored as null
    "sources": ["B", "C", "atlas-1"],
    "models": ["deepstaple", "itm", "majority", "staple"],
    # An atlas's registered labels are target labels.
    "label_use": {
        "via": ["consensus with labels registered from 1 of A's atlases"],
        "cases": 0,
        "atlases": 1,
    },
}
LABEL_FREE: dict[str, Any] = {"via": [], "cases": 0, "atlases": 0}
EVALUATION: dict[str, Any] = {
    "site": "A",
    "num_cases": 6,
    "dice": {"tgma": 0.9, "consensus:deepstaple": 0.88, "consensus:staple": 0.86},
    "hd95_mm": {},
    "label_use": {
        "tgma": LABEL_FREE,
        "consensus:deepstaple": CONSENSUS["label_use"],
        "consensus:staple": CONSENSUS["label_use"],
    },
}


def report_with(consensus: dict[str, Any] | None) -> dict[str, Any]:
    return build_report(
        run_id=1,
        config={},
        results=RunResults(
            discover=DiscoverResult(target="A", sites=(), missing={}),
            consensus=None
            if consensus is None
            else ConsensusResult.from_document(consensus),
            evaluation=EvaluationResult.from_document(EVALUATION),
        ),
        phase_seconds={},
    )


def test_consensus_section_compares_methods_and_sources() -> None:
    # Execute
    markdown = format_markdown(report_with(CONSENSUS))

    # Assert
    assert "## Label consensus at the target" in markdown
    assert "| DeepSTAPLE | 0.850 | 0.880 |" in markdown
    assert "| STAPLE | 0.700 | 0.860 |" in markdown
    assert "| majority vote | 0.500 | n/a |" in markdown  # its model was not scored
    assert "data parameters 0.81, STAPLE sensitivities n/a" in markdown
    # Sources sorted by data parameter, best first; a null one is shown as n/a last.
    rows = [line for line in markdown.splitlines() if line.startswith("| B |")]
    assert rows == ["| B | 0.400 | 0.900 | 0.950 |"]
    assert markdown.index("| B |") < markdown.index("| C |")
    assert markdown.index("| C |") < markdown.index("| atlas-1 | n/a |")
    assert "3 sources, 1 of them atlases" in markdown
    # The atlases make the consensus few-label, and the report says so
    assert (
        "the consensus models are few-label: consensus with labels registered from "
        "1 of A's atlases." in markdown
    )
    evaluation = markdown.split("## Evaluation", 1)[1]
    label_free, few_label = evaluation.split("### few-label (used 1 target atlas)")
    assert "| tgma |" in label_free
    assert "consensus:" not in label_free
    assert "| consensus:deepstaple | 0.880 | n/a | consensus with labels" in few_label


def test_report_without_consensus_has_no_section() -> None:
    # Execute
    report = report_with(None)

    # Assert
    assert report["consensus"] is None
    assert "Label consensus" not in format_markdown(report)
