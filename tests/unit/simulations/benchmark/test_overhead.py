"""The federation's overhead against direct calls (simulations.benchmark.overhead)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.benchmark.overhead import (
    MEASURED_PHASES,
    format_overhead_table,
    measure_overhead,
)

TINY = {
    "data.image-size": 32,
    "data.max-slices-per-case": 3,
    "model.channels": "4,8",
    "model.strides": "2",
    "train.epochs": 1,
    "adapt.epochs": 1,
}


def test_the_table_states_each_phase_the_total_and_the_start_up_apart() -> None:
    # Prepare
    phases = {
        phase: {"simulated_seconds": 2.2, "direct_seconds": 2.0, "ratio": 1.1}
        for phase in MEASURED_PHASES
    }
    overhead = {
        "sites": 3,
        "target": "A",
        "phases": phases,
        "simulated_phases_seconds": 11.0,
        "direct_seconds": 10.0,
        "ratio": 1.1,
        "simulation_wall_seconds": 60.0,
        "discover_seconds": 20.0,
        "direct_discover_seconds": 0.01,
        "outside_phases_seconds": 27.0,
        "start_up_seconds": 47.0,
    }

    # Execute
    lines = format_overhead_table(overhead)

    # Assert
    assert "| source-training | 2.20 | 2.00 | 1.10 |" in lines
    assert (
        "| all these phases | 11.00 | 10.00 | 1.10 (target at most 1.1, met) |" in lines
    )
    assert "Start-up, apart: 47.0 s" in lines[-1]


@pytest.mark.slow
@pytest.mark.integration
def test_a_simulated_run_is_measured_against_the_same_direct_calls(
    federation: Path,
) -> None:
    overhead = measure_overhead(TINY, federation)

    assert set(overhead["phases"]) == set(MEASURED_PHASES)  # type: ignore[call-overload]
    assert overhead["start_up_seconds"] > 0  # type: ignore[operator]
    assert overhead["target"] == "A"
