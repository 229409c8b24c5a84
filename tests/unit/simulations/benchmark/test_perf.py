"""The perf benchmark on a tiny federation: LFTM against its plain pass, training."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_default_config
from simulations.benchmark.perf import format_perf_table, median_seconds, run_perf

TINY = {
    "data.image-size": 16,
    "data.max-slices-per-case": 2,
    "train.epochs": 1,
    "train.device": "cpu",
    "model.channels": "4,8",
    "model.strides": "2",
}


def test_perf_times_lftm_against_the_plain_pass_and_training_by_size(
    federation: Path,
) -> None:
    # Execute
    document = run_perf(
        load_default_config(**TINY),
        federation_dir=federation,
        repeats=1,
        sizes=(32, 16),
        samples=4,
        epochs=1,
        patches_3d=((4, 16),),
        patch_samples=2,
    )
    table = format_perf_table(document)

    # Assert: target A, the other sites its candidates, sizes in increasing order
    lftm = document["lftm"]
    assert document["target"] == "A"
    assert lftm["candidates"] == 2  # type: ignore[index]
    assert lftm["ratio"] == pytest.approx(  # type: ignore[index]
        lftm["lftm_seconds"] / lftm["plain_pass_seconds"]  # type: ignore[index]
    )
    sizes = document["training"]["sizes"]  # type: ignore[index]
    assert [row["size"] for row in sizes] == [16, 32]
    assert all(row["slices_per_second"] > 0 for row in sizes)
    assert "| LFTM scoring | plain inference pass | ratio | target |" in table
    assert "| 16 | " in table
    (patch,) = document["training_3d"]["patches"]  # type: ignore[index]
    assert (patch["depth"], patch["size"]) == (4, 16)
    assert patch["patches_per_second"] > 0
    assert "| 4 x 16 x 16 | " in table


def test_median_seconds_takes_the_middle_run() -> None:
    # Prepare
    calls: list[int] = []

    # Execute
    seconds = median_seconds(lambda: calls.append(1), repeats=3)

    # Assert
    assert len(calls) == 3
    assert seconds >= 0.0
