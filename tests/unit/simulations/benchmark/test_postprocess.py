"""The postprocess benchmark's table: each decision, and the effect per predictor."""

from __future__ import annotations

import math
from typing import Any

from simulations.benchmark.postprocess import _means, format_postprocess_table


def figures(raw: float, post: float, *, decided: bool, hd95: float) -> dict[str, Any]:
    return {
        "postprocessed": decided,
        "dice": {"raw": raw, "always": post, "decided": post if decided else raw},
        "hd95_mm": {
            "raw": hd95,
            "always": hd95 / 2,
            "decided": hd95 / 2 if decided else hd95,
        },
    }


def document() -> dict[str, object]:
    targets = {
        "A": {
            "sources": {
                "B": figures(0.8, 0.9, decided=True, hd95=10.0),
                "C": figures(0.6, 0.5, decided=False, hd95=math.nan),
            },
            "uniform": figures(0.7, 0.75, decided=False, hd95=8.0),
            "tgma": figures(0.85, 0.9, decided=True, hd95=4.0),
        }
    }
    return {
        "machine": "CPU",
        "seconds": 12.0,
        "decisions": {
            "B": {"postprocess": True, "dice_raw": 0.81, "dice_postprocessed": 0.82},
            "C": {"postprocess": False, "dice_raw": None, "dice_postprocessed": None},
        },
        "targets": targets,
        "mean": _means(targets),
    }


def test_the_table_shows_each_decision_and_the_three_variants() -> None:
    # Execute
    table = format_postprocess_table(document())

    # Assert
    assert "| B | 0.8100 | 0.8200 | on |" in table
    assert "| C | n/a | n/a | off |" in table
    # single sources: the mean over B and C; HD95 where defined (B only)
    assert (
        "| A | single sources (mean) | 1 of 2 | 0.700 | 0.750 | 0.700 | 10.00 | "
        "5.00 | 5.00 |" in table
    )
    assert "| A | uniform | no | 0.700 | 0.700 | 0.750 | 8.00 | 8.00 | 4.00 |" in table
    assert "| A | tgma | yes | 0.850 | 0.900 | 0.900 | 4.00 | 2.00 | 2.00 |" in table
    assert (
        "| **mean** | tgma |  | 0.850 | 0.900 | 0.900 | 4.00 | 2.00 | 2.00 |" in table
    )
    assert table.endswith("measured on CPU in 12 s.")
