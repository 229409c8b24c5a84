from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from core.config import TrainConfig, load_default_config
from core.models import build_model, get_weights
from core.policy import default_policy, resolve_policy
from core.privacy import (
    AccountantState,
    DpSettings,
    PrivacyBudgetError,
    dp_settings_for,
    make_dp_compatible,
    plan_private_training,
    read_accountant_state,
    train_private,
    write_accountant_state,
)

CONFIG = load_default_config(
    **{"data.image-size": 16, "model.channels": "4,8", "model.strides": "2"}
)
TRAIN: TrainConfig = dataclasses.replace(
    CONFIG.train, epochs=2, batch_size=4, learning_rate=1e-2, device="cpu"
)


def dp_settings(**overrides: float | None) -> DpSettings:
    values: dict[str, float | None] = {
        "noise_multiplier": 1.0,
        "target_epsilon": None,
        "delta": 1e-5,
        "max_grad_norm": 1.0,
        "budget_epsilon": 100.0,
    }
    values.update(overrides)
    return DpSettings(**values)  # type: ignore[arg-type]


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(16, 1, 16, 16)
    labels = torch.zeros(16, 16, 16, dtype=torch.int64)
    images[:, :, 4:12, 4:12] = 2.0
    labels[:, 4:12, 4:12] = 1
    return images, labels


@pytest.mark.parametrize(
    ("noise", "rate", "steps"), [(1.0, 0.25, 100), (0.8, 0.1, 500), (2.0, 0.02, 50)]
)
def test_epsilon_matches_opacus_accountant_stepped(
    noise: float, rate: float, steps: int
) -> None:
    # Prepare
    reference = RDPAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=noise, sample_rate=rate)

    # Execute
    actual = AccountantState(((noise, rate, steps),)).epsilon(1e-5)

    # Assert
    assert actual == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_is_cumulative_over_history() -> None:
    # Prepare
    one = AccountantState(((1.0, 0.25, 40),))

    # Execute
    two = one.extended(1.0, 0.25, 40)

    # Assert
    assert two.epsilon(1e-5) > one.epsilon(1e-5)
    assert two.epsilon(1e-5) == pytest.approx(
        AccountantState(((1.0, 0.25, 80),)).epsilon(1e-5), rel=1e-9
    )


def test_accountant_state_round_trips_through_its_file(tmp_path: Path) -> None:
    # Prepare
    state = AccountantState(((1.0, 0.25, 40), (1.5, 0.1, 7)))
    path = tmp_path / "state" / "accountant.json"

    # Execute
    write_accountant_state(state, path)

    # Assert
    assert read_accountant_state(path) == state
    assert read_accountant_state(tmp_path / "missing.json") == AccountantState(())


def test_a_corrupt_accountant_file_is_named(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "accountant.json"
    path.write_text('{"history": [[1.0]]}')

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"accountant\.json: not a valid accountant file"
    ):
        read_accountant_state(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"noise_multiplier": None},
            "DP needs noise-multiplier or target-epsilon",
        ),
        ({"noise_multiplier": 0.0}, "noise-multiplier must be > 0"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"max_grad_norm": 0.0}, "max-grad-norm must be > 0"),
        ({"budget_epsilon": 0.0}, "budget-epsilon must be > 0"),
    ],
)
def test_dp_settings_validation_names_the_value(
    overrides: dict[str, float | None], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        dp_settings(**overrides)


def test_training_over_budget_is_refused_before_any_step() -> None:
    # Prepare
    images, labels = tiny_data()
    model = build_model(CONFIG.model, data=CONFIG.data)
    before = get_weights(model)
    spent = AccountantState(((1.0, 0.25, 400),))
    dp = dp_settings(budget_epsilon=spent.epsilon(1e-5) + 0.01)

    # Execute / Assert
    with pytest.raises(PrivacyBudgetError, match="refused before training: the site's"):
        train_private(
            model,
            images,
            labels,
            train=TRAIN,
            dp=dp,
            accountant=spent,
            device=torch.device("cpu"),
            label="t",
            progress=lambda _: None,
        )
    after = get_weights(model)
    assert all((before[name] == after[name]).all() for name in before)


def test_epsilon_grows_across_two_trainings_and_matches_the_accountant(
    tmp_path: Path,
) -> None:
    # Prepare
    images, labels = tiny_data()
    path = tmp_path / "accountant.json"
    results = []

    # Execute: two runs, the accountant persisted in between
    for _ in range(2):
        model = build_model(CONFIG.model, data=CONFIG.data)
        _, result = train_private(
            model,
            images,
            labels,
            train=TRAIN,
            dp=dp_settings(),
            accountant=read_accountant_state(path),
            device=torch.device("cpu"),
            label="t",
            progress=lambda _: None,
        )
        write_accountant_state(result.accountant, path)
        results.append(result)

    # Assert
    first, second = results
    assert 0 < first.epsilon_total < second.epsilon_total
    assert first.epsilon_spent == pytest.approx(first.epsilon_total)
    assert second.epsilon_total == pytest.approx(
        read_accountant_state(path).epsilon(1e-5)
    )
    assert len(read_accountant_state(path).history) == 2
    assert first.sample_rate == pytest.approx(4 / 16)


def test_target_epsilon_derives_the_noise() -> None:
    # Execute
    noise, rate, steps = plan_private_training(
        120,
        train=dataclasses.replace(TRAIN, batch_size=16, epochs=30),
        dp=dp_settings(noise_multiplier=None, target_epsilon=3.0),
        accountant=AccountantState(()),
    )

    # Assert
    epsilon = AccountantState(((noise, rate, steps),)).epsilon(1e-5)
    assert epsilon <= 3.0
    assert epsilon == pytest.approx(3.0, rel=0.05)


def test_batch_norm_is_replaced_and_instance_norm_is_kept() -> None:
    # Prepare
    batch = load_default_config(**{"model.norm": "batch"})
    model = build_model(batch.model, data=batch.data)

    # Execute
    fixed = make_dp_compatible(model)
    instance = build_model(CONFIG.model, data=CONFIG.data)

    # Assert
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fixed.modules())
    assert make_dp_compatible(instance) is instance


def test_noise_and_target_epsilon_both_bind() -> None:
    # Prepare: a site's fixed noise and a run's target epsilon, both in force
    accountant = AccountantState(())
    target_only = dp_settings(noise_multiplier=None, target_epsilon=3.0)
    noise_for_target, _, _ = plan_private_training(
        64, train=TRAIN, dp=target_only, accountant=accountant
    )

    # Execute
    low, _, _ = plan_private_training(
        64,
        train=TRAIN,
        dp=dp_settings(noise_multiplier=noise_for_target / 2, target_epsilon=3.0),
        accountant=accountant,
    )
    high, _, _ = plan_private_training(
        64,
        train=TRAIN,
        dp=dp_settings(noise_multiplier=noise_for_target * 2, target_epsilon=3.0),
        accountant=accountant,
    )

    # Assert: the larger noise of the two applies
    assert low == pytest.approx(noise_for_target)
    assert high == pytest.approx(noise_for_target * 2)


def test_dp_settings_follow_the_applied_policy() -> None:
    # Prepare
    site = dataclasses.replace(default_policy(), epsilon_budget=6.0)
    not_required = resolve_policy(
        site,
        run_dp_required=False,
        run_noise_multiplier=None,
        run_target_epsilon=None,
        run_max_reply_mb=None,
    )
    required = resolve_policy(
        site,
        run_dp_required=True,
        run_noise_multiplier=2.0,
        run_target_epsilon=None,
        run_max_reply_mb=None,
        run_delta=1e-6,
    )

    # Execute
    none = dp_settings_for(not_required, max_grad_norm=1.0)
    settings = dp_settings_for(required, max_grad_norm=0.5)

    # Assert
    assert none is None
    assert settings == DpSettings(
        noise_multiplier=2.0,
        target_epsilon=None,
        delta=1e-6,
        max_grad_norm=0.5,
        budget_epsilon=6.0,
    )
