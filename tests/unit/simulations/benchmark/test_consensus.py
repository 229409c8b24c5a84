"""The controlled consensus benchmark on a tiny federation, and its README table."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.config import ConfigValue
from core.data.io import read_volume, write_volume
from core.metrics import spearman
from simulations.benchmark.consensus import (
    CONTROLLED_RUN_CONFIG,
    TRAINED_KEYS,
    build_controlled_config,
    format_consensus_table,
    run_controlled,
)

# Seconds on 2 CPU cores: 2 cases x 3 slices per site, a 2-level U-Net at 32 px.
TINY_CONTROLLED: dict[str, ConfigValue] = {
    "data.image-size": 32,
    "data.max-slices-per-case": 3,
    "model.channels": "4,8",
    "model.strides": "2",
    "consensus.epochs": 2,
    "consensus.batch-size": 16,
    "train.epochs": 1,
    "train.device": "cpu",
}


@pytest.fixture(scope="module")
def controlled(federation: Path) -> dict[str, object]:
    return run_controlled(
        build_controlled_config(TINY_CONTROLLED),
        federation_dir=federation,
        progress=lambda line: None,
    )


def test_controlled_config_applies_the_scale_then_the_overrides() -> None:
    # Execute
    config = build_controlled_config({"train.epochs": 3})

    # Assert
    assert config.train.epochs == 3
    assert config.consensus.epochs == CONTROLLED_RUN_CONFIG["consensus.epochs"]
    assert config.data.image_size == CONTROLLED_RUN_CONFIG["data.image-size"]


def test_run_controlled_reports_dice_and_correlations_in_range(
    controlled: dict[str, object],
) -> None:
    # Assert: the consensus Dice of each method and the trained models' Dice.
    for key in (
        "majority",
        "staple",
        "deepstaple",
        "noisy_label_dice",
        "random_label_dice",
        "best_label_dice",
        "top_dp_label_dice",
    ):
        value = controlled[key]
        assert isinstance(value, float)
        assert 0.0 <= value <= 1.0, key
    trained = controlled["trained"]
    assert isinstance(trained, dict)
    assert set(trained) == set(TRAINED_KEYS)
    assert all(0.0 <= value <= 1.0 for value in trained.values())
    for key in ("spearman_dp", "spearman_staple"):
        value = controlled[key]
        assert isinstance(value, float)
        assert -1.0 <= value <= 1.0, key


def test_run_controlled_counts_images_labels_and_corruptions(
    controlled: dict[str, object],
) -> None:
    # Assert: the first site only, 2 cases x 3 middle slices, 7 labels per image.
    assert controlled["sites"] == ["A"]
    assert controlled["labels_per_image"] == 7
    images = controlled["images"]
    assert isinstance(images, int)
    assert 1 <= images <= 6
    assert controlled["labels"] == 7 * images
    by_corruption = controlled["by_corruption"]
    assert isinstance(by_corruption, dict)
    assert sum(row["count"] for row in by_corruption.values()) == 7 * images
    assert by_corruption["dilate@0.25"]["count"] == images
    assert by_corruption["empty@1"]["true_dice"] == 0.0
    best, top = controlled["best_label_dice"], controlled["top_dp_label_dice"]
    assert isinstance(best, float)
    assert isinstance(top, float)
    assert top <= best
    assert controlled["deepstaple_epochs"] == 2
    assert controlled["train_epochs"] == 1
    json.dumps(controlled)  # JSON-able as it stands


@pytest.mark.parametrize(
    ("scores", "truth", "expected"),
    [
        ([1.0, 2.0, 3.0], [0.1, 0.5, 0.4], 0.5),
        ([3.0, math.nan, 1.0, 2.0], [0.9, 0.0, 0.1, 0.2], 1.0),  # nan left out
        ([1.0, 1.0, 1.0], [0.1, 0.5, 0.4], math.nan),  # no ranking information
    ],
)
def test_spearman_leaves_out_nan_scores(
    scores: list[float], truth: list[float], expected: float
) -> None:
    # Execute
    result = spearman(scores, truth)

    # Assert
    np.testing.assert_allclose(result, expected)


def test_run_controlled_names_a_site_without_foreground(
    federation: Path, tmp_path: Path
) -> None:
    # Prepare: a copy of site A whose training labels are all background.
    site = tmp_path / "federation" / "A"
    shutil.copytree(federation / "A", site)
    for path in (site / "labelsTr").iterdir():
        volume = read_volume(path)
        write_volume(
            dataclasses.replace(volume, array=np.zeros_like(volume.array)), path
        )

    # Execute / Assert
    with pytest.raises(ValueError, match=r"site A .* none of its \d+ labelled"):
        run_controlled(
            build_controlled_config(TINY_CONTROLLED),
            federation_dir=tmp_path / "federation",
            progress=lambda line: None,
        )


def test_run_controlled_needs_evaluation_cases_before_training(
    federation: Path, tmp_path: Path
) -> None:
    # Prepare: a copy of site A without its evaluation cases.
    site = tmp_path / "federation" / "A"
    shutil.copytree(federation / "A", site)
    for folder in ("imagesTs", "labelsTs"):
        shutil.rmtree(site / folder)
    lines: list[str] = []

    # Execute / Assert
    with pytest.raises(ValueError, match=r"sites \['A'\]: no evaluation cases"):
        run_controlled(
            build_controlled_config(TINY_CONTROLLED),
            federation_dir=tmp_path / "federation",
            progress=lines.append,
        )
    assert lines == []


def test_run_controlled_rejects_an_unknown_site(federation: Path) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"sites \['Z'\] not in .*\['A', 'B', 'C'\]"):
        run_controlled(
            build_controlled_config(TINY_CONTROLLED),
            federation_dir=federation,
            sites=["Z"],
            progress=lambda line: None,
        )


HEADER = (
    "| setting | ITM | majority | STAPLE | DeepSTAPLE | trained on ITM | "
    "trained on majority | trained on STAPLE | trained on DeepSTAPLE | "
    "Spearman DP | Spearman STAPLE | AUROC DP | AUROC STAPLE |"
)
CONTROLLED_ROW = (
    "| controlled | — | 0.668 | 0.772 | 0.778 | — | 0.833 | 0.669 | 0.757 | "
    "0.88 | 0.80 | — | — |"
)
CONTROLLED = {
    "majority": 0.6684,
    "staple": 0.7717,
    "deepstaple": 0.7777,
    "spearman_dp": 0.8844,
    "spearman_staple": 0.8003,
    "trained": {
        "majority": 0.8331,
        "staple": 0.6691,
        "deepstaple": 0.7571,
        "clean": 0.7961,
        "random_label": 0.8201,
    },
}


@pytest.mark.parametrize(
    ("pipeline", "expected_rows"),
    [
        (None, [CONTROLLED_ROW]),
        (
            {
                "itm": 0.71,
                "majority": 0.70,
                "staple": 0.69,
                "deepstaple": 0.74,
                "spearman_dp": 0.5,
                "trained": {"itm": 0.6, "majority": 0.61, "deepstaple": 0.65},
            },
            [
                CONTROLLED_ROW,
                "| pipeline | 0.710 | 0.700 | 0.690 | 0.740 | 0.600 | 0.610 | — | "
                "0.650 | 0.50 | — | — | — |",
            ],
        ),
        (
            {
                "itm": 0.71,
                "majority": 0.70,
                "staple": 0.69,
                "deepstaple": 0.74,
                "spearman_dp": 0.5,
                "spearman_staple": 0.6,
                "auroc_dp": 0.81,
                "auroc_staple": 0.92,
                "trained": {
                    "itm": 0.6,
                    "majority": 0.61,
                    "staple": 0.62,
                    "deepstaple": 0.65,
                },
                "granularity": {
                    "slice": {
                        "deepstaple": 0.74,
                        "trained": 0.65,
                        "spearman_dp": 0.5,
                        "auroc_dp": 0.81,
                    },
                    "case": {"deepstaple": 0.76, "trained": 0.7, "auroc_dp": 0.95},
                },
            },
            [
                CONTROLLED_ROW,
                "| pipeline, slice DPs | 0.710 | 0.700 | 0.690 | 0.740 | 0.600 | "
                "0.610 | 0.620 | 0.650 | 0.50 | 0.60 | 0.81 | 0.92 |",
                "| pipeline, case DPs | 0.710 | 0.700 | 0.690 | 0.760 | 0.600 | "
                "0.610 | 0.620 | 0.700 | — | 0.60 | 0.95 | 0.92 |",
            ],
        ),
        (
            {
                "itm": 0.71,
                "majority": 0.70,
                "staple": 0.69,
                "deepstaple": 0.74,
                "spearman_dp": 0.5,
                "auroc_dp": 0.81,
                "auroc_staple": 0.92,
                "trained": {"itm": 0.6, "staple": 0.62, "deepstaple": 0.65},
                "granularity": {"slice": {"deepstaple": 0.74, "trained": 0.65}},
                "prior": {
                    "none": {"deepstaple": 0.74, "trained": 0.65, "auroc_dp": 0.81},
                    "dtm": {"deepstaple": 0.78, "trained": 0.68, "auroc_dp": 0.9},
                },
            },
            [
                CONTROLLED_ROW,
                "| pipeline, none prior | 0.710 | 0.700 | 0.690 | 0.740 | 0.600 | "
                "— | 0.620 | 0.650 | — | — | 0.81 | 0.92 |",
                "| pipeline, dtm prior | 0.710 | 0.700 | 0.690 | 0.780 | 0.600 | "
                "— | 0.620 | 0.680 | — | — | 0.90 | 0.92 |",
            ],
        ),
        (
            {"deepstaple": math.nan, "trained": "not a table"},
            [
                CONTROLLED_ROW,
                "| pipeline | — | — | — | — | — | — | — | — | — | — | — | — |",
            ],
        ),
    ],
    ids=[
        "no-pipeline",
        "pipeline-without-staple-parts",
        "pipeline-by-granularity",
        "pipeline-by-prior",
        "pipeline-degenerate",
    ],
)
def test_format_consensus_table(
    pipeline: dict[str, object] | None, expected_rows: list[str]
) -> None:
    # Prepare
    document: dict[str, object] = {
        "machine": "CPU (x86_64), 2 torch threads",
        "seconds": 212.4,
        "controlled": CONTROLLED,
    }
    if pipeline is not None:
        document["pipeline"] = pipeline

    # Execute
    table = format_consensus_table(document)

    # Assert
    assert table.splitlines() == [
        HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *expected_rows,
        "",
        "Controlled: models trained on the clean labels reach 0.796, on one random "
        "noisy label per image 0.820.",
        "Measured on CPU (x86_64), 2 torch threads in 212 s.",
    ]


def test_format_consensus_table_without_any_section() -> None:
    # Execute
    table = format_consensus_table({})

    # Assert
    assert table.splitlines()[2:] == ["", "Measured on an unknown machine in — s."]
