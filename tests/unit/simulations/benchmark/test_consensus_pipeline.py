"""The pipeline part of the consensus benchmark on the tiny federation."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigValue, load_run_config
from core.protocol import CONSENSUS_METHODS
from simulations.benchmark.consensus_pipeline import run_consensus_pipeline


def test_pipeline_part_scores_every_method_on_the_target(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Prepare
    config = load_run_config({**run_config, "consensus.baselines": False})

    # Execute
    document = run_consensus_pipeline(config, federation_dir=federation, targets=["A"])

    # Assert: baselines are always trained here, whatever the run config says
    row = document["targets"]["A"]  # type: ignore[index]
    assert set(row["source_only"]) == {"B", "C"}
    assert set(row["trained"]) == set(CONSENSUS_METHODS)
    for method in CONSENSUS_METHODS:
        assert 0.0 <= document[method] <= 1.0  # type: ignore[operator]
        assert document[method] == row[method]
    assert set(document["trained"]) == set(CONSENSUS_METHODS)  # type: ignore[arg-type]
    assert document["epochs"]["deepstaple"] == 1  # type: ignore[index]


def test_pipeline_part_names_an_unknown_target(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"targets \['Z'\] are not sites of .*"):
        run_consensus_pipeline(
            load_run_config(run_config), federation_dir=federation, targets=["Z"]
        )
