"""The report's post-processing section, from persisted phase results."""

from __future__ import annotations

import json
from typing import Any

from server.report import build_report, format_markdown
from server.results import (
    DiscoverResult,
    EvaluationResult,
    RunResults,
    SourceTrainingResult,
)
from server.store import to_strict_json

LABEL_FREE: dict[str, Any] = {"via": [], "cases": 0, "atlases": 0}
TRAINING: dict[str, Any] = {
    "training": {
        "B": {
            "num-examples": 8,
            "loss": 0.5,
            "postprocess.largest-component": 1,
            "postprocess.dice-raw": 0.81,
            "postprocess.dice": 0.84,
            "dp.patient-epsilon-total": None,  # a nan the store wrote as null
        },
        "C": {
            "num-examples": 8,
            "loss": 0.4,
            "postprocess.largest-component": 0,
        },
        "D": {"num-examples": 8, "loss": 0.6},  # a site of an earlier release
    },
    "missing": {},
}
EVALUATION: dict[str, Any] = {
    "site": "A",
    "num_cases": 6,
    "dice": {"source:B": 0.9, "source:C": 0.7, "tgma": 0.92},
    "hd95_mm": {"source:B": 3.5, "source:C": 9.0, "tgma": None},
    "label_use": {"source:B": LABEL_FREE, "source:C": LABEL_FREE, "tgma": LABEL_FREE},
    "postprocessed": ["source:B", "tgma"],
    "dice_raw": {"source:B": 0.85, "tgma": 0.92},
    "hd95_raw_mm": {"source:B": 12.25, "tgma": 4.0},
}


def report_with(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    return build_report(
        run_id=1,
        config={},
        results=RunResults(
            discover=DiscoverResult(target="A", sites=(), missing={}),
            source_training=SourceTrainingResult.from_document(TRAINING),
            evaluation=None
            if evaluation is None
            else EvaluationResult.from_document(evaluation),
        ),
        phase_seconds={},
    )


def test_the_section_lists_each_decision_and_the_effect_per_predictor() -> None:
    # Execute
    markdown = format_markdown(report_with(EVALUATION))

    # Assert
    section = markdown.split("## Post-processing: largest connected component")[1]
    assert "| B | on | 0.810 | 0.840 |" in section
    assert "| C | off | n/a | n/a |" in section
    assert "| D |" not in section  # it decided nothing
    assert (
        "| source:B | label-free | 0.850 | 0.900 | +0.050 | 12.25 | 3.50 | -8.75 |"
        in section
    )
    assert (
        "| tgma | label-free | 0.920 | 0.920 | +0.000 | 4.00 | n/a | n/a |" in section
    )
    assert "| source:C |" not in section


def test_the_sources_decisions_are_read_back_from_the_saved_result() -> None:
    # Prepare: the result through its JSON form, as a resumed run reads it
    document = json.loads(
        json.dumps(
            to_strict_json(SourceTrainingResult.from_document(TRAINING).to_document())
        )
    )

    # Execute
    decisions = SourceTrainingResult.from_document(document).postprocess()

    # Assert
    assert decisions == {"B": True, "C": False, "D": False}


def test_an_evaluation_without_post_processing_keeps_its_old_form() -> None:
    # Prepare
    plain = {
        key: value
        for key, value in EVALUATION.items()
        if key not in ("postprocessed", "dice_raw", "hd95_raw_mm")
    }

    # Execute
    result = EvaluationResult.from_document(plain)
    markdown = format_markdown(report_with(plain))

    # Assert: nothing new is written, and the report says nothing was post-processed
    assert to_strict_json(result.to_document()) == plain
    assert "The target post-processed no predictor." in markdown
