"""The ``train.semisup`` job's labelled fraction and its DP round (core side)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigValue, RunConfig, load_run_config
from core.privacy.dp import DpSettings, read_accountant_state
from core.semisup.job import (
    initial_student_weights,
    load_semisup_data,
    run_semisup_round,
)
from core.training.networks import Arrays

DP = DpSettings(
    noise_multiplier=2.0,
    target_epsilon=None,
    delta=1e-5,
    max_grad_norm=1.0,
    budget_epsilon=1000.0,
)
SLICES = 3  # TINY_RUN_CONFIG's data.max-slices-per-case


@pytest.fixture(scope="module")
def config(run_config: dict[str, ConfigValue]) -> RunConfig:
    return load_run_config({**run_config, "train.device": "cpu"})


@pytest.fixture(scope="module")
def student(config: RunConfig) -> Arrays:
    return initial_student_weights(config)


def test_the_sites_labelled_fraction_overrides_the_run_config(
    federation: Path, config: RunConfig
) -> None:
    # Execute: the run config keeps every labelled case; the site keeps half
    default = load_semisup_data(federation / "A", config)
    site = load_semisup_data(federation / "A", config, labelled_fraction=0.5)

    # Assert
    assert config.semisup.labelled_fraction == 1.0
    assert (default.num_labelled, default.num_unlabelled) == (2, 0)
    assert (site.num_labelled, site.num_unlabelled, site.num_left_out) == (1, 1, 0)
    assert site.unlabelled_images.shape[0] == SLICES


def test_under_dp_the_labelled_cases_set_aside_are_left_out(
    federation: Path, config: RunConfig
) -> None:
    # Execute
    data = load_semisup_data(
        federation / "A", config, labelled_fraction=0.5, private=True
    )

    # Assert: the set-aside case is in neither part
    assert (data.num_labelled, data.num_unlabelled, data.num_left_out) == (1, 0, 1)
    assert data.unlabelled_images.shape[0] == 0
    assert len(data.labelled) == SLICES
    assert data.private


def test_a_dp_round_records_its_plan_and_leaves_the_set_aside_cases_out(
    federation: Path, config: RunConfig, student: Arrays, tmp_path: Path
) -> None:
    # Prepare
    accountant = tmp_path / "accountant.json"
    lines: list[str] = []

    # Execute
    outcome = run_semisup_round(
        federation / "A",
        student,
        config,
        teacher_weights=None,
        start_step=0,
        total_steps=2,
        iterations=2,
        dp=DP,
        accountant_path=accountant,
        labelled_fraction=0.5,
        progress=lines.append,
    )

    # Assert
    rate = min(1.0, config.semisup.labelled_batch / SLICES)
    saved = read_accountant_state(accountant)
    assert saved.history == ((2.0, rate, 2),)
    assert saved.units_per_case == (SLICES,)
    assert outcome.privacy is not None
    assert outcome.privacy.accountant == saved
    assert (outcome.num_labelled, outcome.num_unlabelled) == (1, 0)
    assert outcome.num_left_out == 1
    assert any("1 labelled case(s) left out under DP" in line for line in lines)


def test_a_dp_round_refuses_data_loaded_for_a_non_private_round(
    federation: Path, config: RunConfig, student: Arrays, tmp_path: Path
) -> None:
    # Prepare: the set-aside case sits among the unlabelled images
    data = load_semisup_data(federation / "A", config, labelled_fraction=0.5)
    accountant = tmp_path / "accountant.json"

    # Execute / Assert
    with pytest.raises(ValueError, match="a DP round needs its data loaded with"):
        run_semisup_round(
            federation / "A",
            student,
            config,
            teacher_weights=None,
            start_step=0,
            total_steps=2,
            iterations=2,
            data=data,
            dp=DP,
            accountant_path=accountant,
        )
    assert not accountant.exists()


def test_a_labelled_fraction_out_of_range_is_refused(
    federation: Path, config: RunConfig
) -> None:
    with pytest.raises(ValueError, match=r"labelled fraction must be in \(0, 1\]"):
        load_semisup_data(federation / "A", config, labelled_fraction=1.5)
