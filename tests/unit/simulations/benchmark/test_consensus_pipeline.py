"""The pipeline part of the consensus benchmark on the tiny federation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from core.config import (
    ConfigValue,
    ConsensusGranularity,
    ConsensusPrior,
    load_run_config,
)
from core.protocol import CONSENSUS_METHODS
from simulations.benchmark.consensus_pipeline import (
    parse_granularities,
    parse_priors,
    run_consensus_pipeline,
)


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
    for key in ("auroc_dp", "auroc_staple"):
        value = row[key]
        assert math.isnan(value) or 0.0 <= value <= 1.0
    assert set(row["granularity"]) == {"slice"}
    assert "prior" not in row
    assert "prior" not in document


def test_pipeline_part_runs_granularities_side_by_side(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Execute
    document = run_consensus_pipeline(
        load_run_config(run_config),
        federation_dir=federation,
        targets=["A"],
        granularities=[ConsensusGranularity.SLICE, ConsensusGranularity.CASE],
    )

    # Assert: the first granularity's figures are the document's DeepSTAPLE ones.
    row = document["targets"]["A"]  # type: ignore[index]
    assert list(row["granularity"]) == ["slice", "case"]
    first = row["granularity"]["slice"]
    assert first["deepstaple"] == row["deepstaple"]
    assert first["auroc_dp"] == row["auroc_dp"] or math.isnan(row["auroc_dp"])
    assert first["trained"] == pytest.approx(row["trained"]["deepstaple"])
    assert list(document["granularity"]) == ["slice", "case"]  # type: ignore[arg-type]
    for figures in row["granularity"].values():
        assert 0.0 <= figures["trained"] <= 1.0


def test_pipeline_part_runs_priors_side_by_side(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Execute
    document = run_consensus_pipeline(
        load_run_config(run_config),
        federation_dir=federation,
        targets=["A"],
        priors=[ConsensusPrior.NONE, ConsensusPrior.DTM],
    )

    # Assert: the first prior's figures are the document's DeepSTAPLE ones, at the
    # one granularity.
    row = document["targets"]["A"]  # type: ignore[index]
    assert list(row["prior"]) == ["none", "dtm"]
    assert list(row["granularity"]) == ["slice"]
    first = row["prior"]["none"]
    assert first["deepstaple"] == row["deepstaple"]
    assert first["trained"] == pytest.approx(row["trained"]["deepstaple"])
    assert first == row["granularity"]["slice"]
    assert list(document["prior"]) == ["none", "dtm"]  # type: ignore[arg-type]
    for figures in row["prior"].values():
        assert 0.0 <= figures["trained"] <= 1.0


def test_priors_option_names_itself_and_refuses_repeats(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Execute / Assert
    assert parse_priors("") == []
    with pytest.raises(ValueError, match=r"^--priors: \['itm'\]"):
        parse_priors("dtm,itm")
    with pytest.raises(ValueError, match=r"priors \['dtm', 'dtm'\] name one twice"):
        run_consensus_pipeline(
            load_run_config(run_config),
            federation_dir=federation,
            targets=["A"],
            priors=[ConsensusPrior.DTM, ConsensusPrior.DTM],
        )


def test_granularities_option_names_itself_and_refuses_repeats(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Execute / Assert
    assert parse_granularities("") == []
    with pytest.raises(ValueError, match=r"^--granularities: \['volume'\]"):
        parse_granularities("slice,volume")
    with pytest.raises(ValueError, match=r"name one twice"):
        run_consensus_pipeline(
            load_run_config(run_config),
            federation_dir=federation,
            targets=["A"],
            granularities=[ConsensusGranularity.CASE, ConsensusGranularity.CASE],
        )


def test_pipeline_part_names_an_unknown_target(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"targets \['Z'\] are not sites of .*"):
        run_consensus_pipeline(
            load_run_config(run_config), federation_dir=federation, targets=["Z"]
        )
