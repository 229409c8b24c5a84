from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn

from core.config import TrainConfig, load_default_config
from core.privacy.dp import (
    RDP_ORDERS,
    AccountantState,
    DpSettings,
    DpSgdPlan,
    PrivacyBudgetError,
    PrivateGradient,
    PrivateTrainResult,
    account_steps,
    accountant_lock_path,
    dp_settings_for,
    dp_sgd_schedule,
    largest_case,
    locked_accountant,
    make_dp_compatible,
    per_sample_dice_ce,
    plan_dp_sgd,
    read_accountant_state,
    reserve_privacy,
    train_private,
    write_accountant_state,
)
from core.privacy.policy import default_policy, resolve_policy
from core.training.networks import build_model, get_weights

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


# Four cases of four slices each: a DP-SGD entry of this data has k = 4.
CASES = torch.arange(4).repeat_interleave(4)


def train_tiny(
    accountant_path: Path | None,
    dp: DpSettings,
    *,
    train: TrainConfig = TRAIN,
    seed: int | None = 0,
) -> tuple[nn.Module, PrivateTrainResult]:
    images, labels = tiny_data()
    return train_private(
        build_model(CONFIG.model, data=CONFIG.data),
        images,
        labels,
        case_of_slice=CASES,
        train=train,
        dp=dp,
        accountant_path=accountant_path,
        device=torch.device("cpu"),
        label="t",
        progress=lambda _: None,
        seed=seed,
    )


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


def test_training_over_budget_is_refused_before_any_step(tmp_path: Path) -> None:
    # Prepare
    images, labels = tiny_data()
    model = build_model(CONFIG.model, data=CONFIG.data)
    before = get_weights(model)
    spent = AccountantState(((1.0, 0.25, 400),), (1,))
    path = tmp_path / "accountant.json"
    write_accountant_state(spent, path)
    written = path.read_bytes()
    dp = dp_settings(budget_epsilon=spent.epsilon(1e-5) + 0.01)

    # Execute / Assert
    with pytest.raises(PrivacyBudgetError, match="refused before training: the site's"):
        train_private(
            model,
            images,
            labels,
            case_of_slice=CASES,
            train=TRAIN,
            dp=dp,
            accountant_path=path,
            device=torch.device("cpu"),
            label="t",
            progress=lambda _: None,
        )
    after = get_weights(model)
    assert all((before[name] == after[name]).all() for name in before)
    assert path.read_bytes() == written


def test_epsilon_grows_across_two_trainings_and_matches_the_accountant(
    tmp_path: Path,
) -> None:
    # Prepare
    path = tmp_path / "accountant.json"

    # Execute: two trainings on the same accountant file
    results = [train_tiny(path, dp_settings())[1] for _ in range(2)]

    # Assert
    first, second = results
    assert isinstance(first, PrivateTrainResult)
    assert isinstance(second, PrivateTrainResult)
    assert 0 < first.epsilon_total < second.epsilon_total
    assert first.epsilon_spent == pytest.approx(first.epsilon_total)
    assert second.epsilon_total == pytest.approx(
        read_accountant_state(path).epsilon(1e-5)
    )
    assert len(read_accountant_state(path).history) == 2
    assert first.sample_rate == pytest.approx(4 / 16)
    assert second.accountant == read_accountant_state(path)


def test_target_epsilon_derives_the_noise() -> None:
    # Prepare
    rate, steps = dp_sgd_schedule(120, batch_size=16, epochs=30)

    # Execute
    plan = plan_dp_sgd(
        rate,
        steps,
        dp=dp_settings(noise_multiplier=None, target_epsilon=3.0),
        accountant=AccountantState(()),
    )

    # Assert
    epsilon = AccountantState(((plan.noise_multiplier, rate, steps),)).epsilon(1e-5)
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
    noise_for_target = plan_dp_sgd(
        4 / 64, 32, dp=target_only, accountant=accountant
    ).noise_multiplier

    # Execute
    low = plan_dp_sgd(
        4 / 64,
        32,
        dp=dp_settings(noise_multiplier=noise_for_target / 2, target_epsilon=3.0),
        accountant=accountant,
    ).noise_multiplier
    high = plan_dp_sgd(
        4 / 64,
        32,
        dp=dp_settings(noise_multiplier=noise_for_target * 2, target_epsilon=3.0),
        accountant=accountant,
    ).noise_multiplier

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


# ------------------------------------------- the mechanism alone (PrivateGradient)

CPU = torch.device("cpu")


def mechanism_plan(**overrides: float | int | None) -> DpSgdPlan:
    values: dict[str, float | int | None] = {
        "noise_multiplier": 1.0,
        "sample_rate": 1.0,
        "steps": 1,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "seed": 0,
    }
    values.update(overrides)
    return DpSgdPlan(**values)  # type: ignore[arg-type]


def two_scalars() -> nn.ModuleDict:
    """Two 1x1 linear maps, weights 1: sample (u, v) has loss a*u + b*v."""
    model = nn.ModuleDict(
        {"a": nn.Linear(1, 1, bias=False), "b": nn.Linear(1, 1, bias=False)}
    )
    with torch.no_grad():
        for layer in model.values():
            layer.weight.fill_(1.0)
    return model


@pytest.mark.parametrize(
    ("samples", "batch", "epochs", "expected"),
    [
        (64, 4, 2, (4 / 64, 32)),
        # 320 slices at 16: 20 steps per epoch either way.
        (320, 16, 30, (16 / 320, 600)),
        # 120 at 16: ceil gives 8 steps per epoch where round(1 / q) gave 7.
        (120, 16, 30, (16 / 120, 240)),
        # fewer samples than a batch: every step sees every sample.
        (10, 16, 3, (1.0, 3)),
    ],
)
def test_dp_sgd_schedule_is_rate_b_over_n_and_ceil_steps_per_epoch(
    samples: int, batch: int, epochs: int, expected: tuple[float, int]
) -> None:
    assert dp_sgd_schedule(samples, batch_size=batch, epochs=epochs) == expected


@pytest.mark.parametrize(
    ("samples", "batch", "epochs", "message"),
    [
        (0, 4, 1, "DP training needs at least one sample"),
        (8, 0, 1, "batch size and epochs >= 1, got 0 and 1"),
        (8, 4, 0, "batch size and epochs >= 1, got 4 and 0"),
    ],
)
def test_dp_sgd_schedule_refuses_empty_schedules(
    samples: int, batch: int, epochs: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        dp_sgd_schedule(samples, batch_size=batch, epochs=epochs)


def test_plan_dp_sgd_refuses_a_training_over_budget() -> None:
    # Prepare
    spent = AccountantState(((1.0, 0.25, 400),))
    budget = spent.epsilon(1e-5) + 0.01

    # Execute / Assert
    with pytest.raises(
        PrivacyBudgetError,
        match=(
            rf"refused before training: the site's budget is epsilon {budget:g} at "
            rf"delta 1e-05; {spent.epsilon(1e-5):.3f} is spent and this training "
            r"\(10 steps, noise 1.000, sample rate 0.500\) would bring it to"
        ),
    ):
        plan_dp_sgd(0.5, 10, dp=dp_settings(budget_epsilon=budget), accountant=spent)


@pytest.mark.parametrize(
    ("rate", "steps", "message"),
    [
        (0.0, 10, r"DP-SGD sample rate must be in \(0, 1\], got 0.0"),
        (1.5, 10, r"DP-SGD sample rate must be in \(0, 1\], got 1.5"),
        (0.5, 0, "DP-SGD needs at least one step, got 0"),
    ],
)
def test_plan_dp_sgd_rejects_a_bad_rate_or_step_count(
    rate: float, steps: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_dp_sgd(rate, steps, dp=dp_settings(), accountant=AccountantState(()))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"noise_multiplier": 0.0}, "DP-SGD noise multiplier must be > 0, got 0.0"),
        ({"sample_rate": 0.0}, r"DP-SGD sample rate must be in \(0, 1\]"),
        ({"steps": 0}, "DP-SGD needs at least one step, got 0"),
        ({"max_grad_norm": -1.0}, "max-grad-norm must be > 0, got -1.0"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\), got 0.0"),
    ],
)
def test_dp_sgd_plan_validation_names_the_value(
    overrides: dict[str, float | int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mechanism_plan(**overrides)


def test_account_steps_extends_the_history_and_totals_it() -> None:
    # Prepare
    before = AccountantState(((1.0, 0.25, 40),))

    # Execute
    spend = account_steps(
        before,
        noise_multiplier=2.0,
        sample_rate=0.5,
        steps=10,
        units_per_case=3,
        delta=1e-5,
    )

    # Assert
    assert spend.accountant.history == ((1.0, 0.25, 40), (2.0, 0.5, 10))
    assert spend.accountant.units_per_case == (None, 3)
    assert spend.patient_epsilon_total is None  # the first entry's k is unknown
    assert spend.patient_epsilon_spent == pytest.approx(
        AccountantState(((2.0, 0.5, 10),), (3,)).patient_epsilon(1e-5)
    )
    assert spend.epsilon_spent == pytest.approx(
        AccountantState(((2.0, 0.5, 10),)).epsilon(1e-5)
    )
    assert spend.epsilon_total == pytest.approx(spend.accountant.epsilon(1e-5))
    assert spend.epsilon_spent < spend.epsilon_total
    assert (spend.noise_multiplier, spend.sample_rate, spend.steps) == (2.0, 0.5, 10)


def test_private_gradient_clips_each_sample_jointly_and_divides_by_q_n() -> None:
    # Prepare: samples (3, 4) (norm 5, clipped to (0.6, 0.8)) and (0.3, 0.4) (norm
    # 0.5, kept); clipping each parameter on its own would give (1.3, 1.4) instead.
    model = two_scalars()
    samples = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    mechanism = PrivateGradient(
        model, mechanism_plan(noise_multiplier=1e-9), num_samples=2, device=CPU
    )

    def loss(indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        chosen = samples[indices]
        return (model["a"](chosen[:, :1]) + model["b"](chosen[:, 1:])).flatten()

    # Execute
    losses = mechanism.step(loss)

    # Assert: (0.6 + 0.3, 0.8 + 0.4) / (q N = 2)
    gradients = [float(model[name].weight.grad) for name in ("a", "b")]
    assert gradients == pytest.approx([0.45, 0.6], abs=1e-6)
    assert losses.tolist() == pytest.approx([7.0, 0.7])
    assert mechanism.steps_taken == 1


def test_private_gradient_noise_has_the_planned_scale() -> None:
    # Prepare: zero per-sample gradients, so the gradient is the noise alone:
    # standard deviation sigma C / (q N) = 2 * 0.5 / (0.5 * 4) = 0.5.
    model = nn.Linear(1, 20_000, bias=False)
    plan = mechanism_plan(noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=0.5)
    mechanism = PrivateGradient(model, plan, num_samples=4, device=CPU)

    def loss(indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        return 0.0 * model(torch.ones(len(indices), 1)).sum(dim=1)

    # Execute
    mechanism.step(loss)

    # Assert
    gradient = model.weight.grad
    assert gradient is not None
    assert float(gradient.std()) == pytest.approx(0.5, rel=0.03)
    assert abs(float(gradient.mean())) < 0.02
    assert mechanism.expected_batch_size == 2.0


def test_an_empty_draw_releases_the_noise_and_counts_as_a_step() -> None:
    # Prepare: q = 1e-6 of 3 samples: nothing is drawn
    model = nn.Linear(1, 20_000, bias=False)
    plan = mechanism_plan(sample_rate=1e-6, steps=2)
    mechanism = PrivateGradient(model, plan, num_samples=3, device=CPU)

    def loss(_indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        raise AssertionError("an empty draw runs no forward")

    # Execute
    losses = mechanism.step(loss)

    # Assert: noise sigma C / (q N) alone
    gradient = model.weight.grad
    assert gradient is not None
    assert losses.numel() == 0
    assert mechanism.steps_taken == 1
    assert float(gradient.std()) == pytest.approx(1.0 / (1e-6 * 3), rel=0.03)


def test_private_gradient_refuses_more_steps_than_planned() -> None:
    # Prepare
    model = two_scalars()
    mechanism = PrivateGradient(model, mechanism_plan(), num_samples=1, device=CPU)

    def loss(indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        return model["a"](torch.ones(len(indices), 1)).flatten()

    mechanism.step(loss)

    # Execute / Assert
    with pytest.raises(
        RuntimeError, match="DP-SGD was planned and is accounted for 1 steps"
    ):
        mechanism.step(loss)


def test_private_gradient_rejects_a_loss_that_is_not_per_sample() -> None:
    # Prepare
    model = two_scalars()
    mechanism = PrivateGradient(model, mechanism_plan(), num_samples=2, device=CPU)

    def pooled(indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        return model["a"](torch.ones(len(indices), 1)).mean()

    # Execute / Assert
    with pytest.raises(
        ValueError,
        match=r"a per-sample loss must have shape \(2,\) for 2 drawn samples, got \(\)",
    ):
        mechanism.step(pooled)


def test_private_gradient_needs_samples_and_a_compatible_model() -> None:
    # Prepare
    batch_norm = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))

    # Execute / Assert
    with pytest.raises(ValueError, match="model is not DP-compatible"):
        PrivateGradient(batch_norm, mechanism_plan(), num_samples=4, device=CPU)
    with pytest.raises(ValueError, match="needs at least one protected sample"):
        PrivateGradient(two_scalars(), mechanism_plan(), num_samples=0, device=CPU)


def test_private_gradient_needs_a_model_in_train_mode() -> None:
    # Prepare: Opacus' validator refuses an eval-mode model; one switched later
    # captures no per-sample gradient
    with pytest.raises(ValueError, match="Model needs to be in training mode"):
        PrivateGradient(
            two_scalars().eval(), mechanism_plan(), num_samples=1, device=CPU
        )
    model = two_scalars()
    mechanism = PrivateGradient(model, mechanism_plan(), num_samples=1, device=CPU)
    model.eval()

    def loss(indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        return model["a"](torch.ones(len(indices), 1)).flatten()

    # Execute / Assert
    with pytest.raises(RuntimeError, match="DP-SGD needs the model in train mode"):
        mechanism.step(loss)


def test_the_private_pass_leaves_the_global_rng_as_it_found_it() -> None:
    # Prepare: a loss that consumes the global RNG (as dropout does)
    model = two_scalars()
    mechanism = PrivateGradient(
        model, mechanism_plan(sample_rate=0.5), num_samples=50, device=CPU
    )

    def loss(indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        noise = torch.rand(len(indices), 1)
        return model["a"](noise).flatten()

    torch.manual_seed(0)
    expected = torch.rand(4)

    # Execute
    torch.manual_seed(0)
    mechanism.step(loss)

    # Assert: what the caller draws next does not depend on the secret draw
    assert torch.equal(torch.rand(4), expected)


def test_closing_the_mechanism_leaves_a_plain_module() -> None:
    # Prepare
    model = two_scalars()
    mechanism = PrivateGradient(model, mechanism_plan(), num_samples=1, device=CPU)
    mechanism.step(lambda i, _: model["a"](torch.ones(len(i), 1)).flatten())

    # Execute
    mechanism.close()

    # Assert
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert all(not layer._forward_hooks for layer in model.values())


def test_dp_noise_does_not_follow_the_run_seed() -> None:
    # Prepare: the coordinator knows train.seed; it must not be able to replay the
    # noise, so two trainings with the same seed and data end apart.
    torch.manual_seed(0)
    images = torch.randn(8, 1, 16, 16)
    labels = (images[:, 0] > 0).long()
    train = load_default_config(
        **{"train.epochs": 1, "train.batch-size": 4, "train.augment": False}
    ).train
    dp = DpSettings(
        noise_multiplier=1.0,
        target_epsilon=None,
        delta=1e-5,
        max_grad_norm=1.0,
        budget_epsilon=1000.0,
    )

    # Execute
    trained = []
    for _ in range(2):
        torch.manual_seed(1)  # the same initial weights both times
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
        model, _result = train_private(
            model,
            images,
            labels,
            case_of_slice=torch.arange(8),
            train=train,
            dp=dp,
            accountant_path=None,
            device=torch.device("cpu"),
            label="test",
            progress=lambda _line: None,
        )
        trained.append(model.state_dict())

    # Assert: the same initial weights (seeded), different noisy updates
    assert any(
        not torch.equal(trained[0][name], trained[1][name]) for name in trained[0]
    )


# ------------------------------------------------ the plan is exactly what runs


def test_the_recorded_entry_is_the_approved_plan_and_every_step_ran(
    tmp_path: Path,
) -> None:
    # Prepare: 16 slices at batch 3: q = 3/16 and ceil(16/3) = 6 steps per epoch
    path = tmp_path / "accountant.json"
    train = dataclasses.replace(TRAIN, batch_size=3, epochs=2, augment=True)
    dp = dp_settings(noise_multiplier=None, target_epsilon=2.0, budget_epsilon=2.0)
    approved = plan_dp_sgd(3 / 16, 12, dp=dp, accountant=AccountantState(()))

    # Execute
    _model, result = train_tiny(path, dp, train=train)

    # Assert
    assert isinstance(result, PrivateTrainResult)
    saved = read_accountant_state(path)
    assert saved.history == ((approved.noise_multiplier, 3 / 16, 12),)
    assert saved.units_per_case == (4,)
    assert (result.sample_rate, result.steps) == (3 / 16, 12)
    assert result.epsilon_spent == saved.epsilon(1e-5)
    assert result.epsilon_spent == pytest.approx(
        AccountantState(
            ((approved.noise_multiplier, approved.sample_rate, approved.steps),)
        ).epsilon(1e-5)
    )
    assert result.epsilon_total <= 2.0
    assert len(result.train.epoch_losses) == 2


def test_a_training_cannot_take_more_steps_than_its_plan_records() -> None:
    # Prepare: the mechanism of a recorded one-step plan
    model = two_scalars()
    reservation = reserve_privacy(
        None, sample_rate=1.0, steps=1, units_per_case=1, dp=dp_settings(), seed=0
    )
    mechanism = PrivateGradient(model, reservation.plan, num_samples=1, device=CPU)

    def loss(indices: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        return model["a"](torch.ones(len(indices), 1)).flatten()

    mechanism.step(loss)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="accounted for 1 steps; a further step"):
        mechanism.step(loss)
    assert reservation.spend.accountant.history == ((1.0, 1.0, 1),)


def test_per_sample_dice_ce_averages_to_monai_dice_ce() -> None:
    # Prepare
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8)
    labels = torch.randint(0, 2, (3, 8, 8))

    # Execute
    per_sample = per_sample_dice_ce(logits, labels)
    alone = per_sample_dice_ce(logits[1:2], labels[1:2])

    # Assert: the batch mean is MONAI's value, and each entry is its sample's own
    reference = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
    assert per_sample.shape == (3,)
    assert float(per_sample.mean()) == pytest.approx(
        float(reference(logits, labels.unsqueeze(1))), rel=1e-6
    )
    assert float(alone[0]) == pytest.approx(float(per_sample[1]), rel=1e-6)


def test_largest_case_counts_the_slices_of_the_biggest_case() -> None:
    assert largest_case(CASES) == 4
    assert largest_case(torch.tensor([2, 0, 2, 1, 2])) == 3
    with pytest.raises(ValueError, match="no slices"):
        largest_case(torch.zeros(0, dtype=torch.int64))


# ---------------------------------------------------------- patient-level epsilon


def test_rdp_orders_are_opacus_default_orders() -> None:
    assert list(RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize(
    "history",
    [
        ((1.0, 0.25, 100),),
        ((1.07, 0.05, 600), (2.0, 1.0, 3), (0.8, 0.1, 50)),
    ],
)
def test_patient_epsilon_with_one_slice_per_case_is_exactly_slice_level(
    history: tuple[tuple[float, float, int], ...],
) -> None:
    # Prepare
    state = AccountantState(history, (1,) * len(history))

    # Execute / Assert: the same float, not merely close
    assert state.patient_epsilon(1e-5) == state.epsilon(1e-5)


def test_patient_epsilon_grows_with_the_slices_a_case_contributes() -> None:
    # Execute
    values = [
        AccountantState(((1.0, 0.1, 100),), (k,)).patient_epsilon(1e-5)
        for k in (1, 2, 3, 5)
    ]

    # Assert
    assert all(value is not None for value in values)
    assert values == sorted(values)
    assert len(set(values)) == len(values)


def test_patient_epsilon_of_a_gaussian_release_matches_a_hand_computation() -> None:
    # Prepare: sigma 2, two full-data releases, a case touches 3 records: the
    # summed query moves by at most 3 sensitivities, so RDP(a) = 2 * 9 a / (2 * 4)
    orders = np.array(RDP_ORDERS)
    rdp = 2 * 9 * orders / (2 * 2.0**2)
    by_hand = np.min(
        rdp
        - (math.log(1e-5) + np.log(orders)) / (orders - 1)
        + np.log((orders - 1) / orders)
    )

    # Execute
    patient = AccountantState(((2.0, 1.0, 2),), (3,)).patient_epsilon(1e-5)

    # Assert
    assert patient == pytest.approx(float(by_hand), rel=1e-12)


def test_patient_epsilon_of_a_subsampled_step_uses_mironov_group_privacy() -> None:
    # Prepare: k = 2 (c = 1): RDP at order b is 3 * RDP_single(2 b), for b >= 2 only;
    # k = 3 and k = 4 share c = 2: 9 * RDP_single(4 b)
    orders = [order for order in RDP_ORDERS if order >= 2]
    expected = {}
    for k, c in ((2, 1), (3, 2), (4, 2)):
        single = compute_rdp(
            q=0.1, noise_multiplier=1.5, steps=40, orders=[2**c * b for b in orders]
        )
        expected[k], _ = get_privacy_spent(
            orders=orders, rdp=3**c * np.asarray(single), delta=1e-5
        )

    # Execute
    patient = {
        k: AccountantState(((1.5, 0.1, 40),), (k,)).patient_epsilon(1e-5)
        for k in expected
    }

    # Assert
    assert patient == pytest.approx(expected, rel=1e-9)
    assert patient[3] == patient[4]


def test_patient_epsilon_is_not_stated_for_entries_without_units() -> None:
    # Prepare: an accountant file written before units per case were kept
    state = AccountantState(((1.0, 0.25, 40),)).extended(1.0, 1.0, 3, 1)

    # Execute / Assert
    assert state.units_per_case == (None, 1)
    assert state.patient_epsilon(1e-5) is None
    assert state.epsilon(1e-5) > 0


# ------------------------------------------------------------ the accountant file


def test_accountant_file_keeps_units_per_case_and_reads_old_entries(
    tmp_path: Path,
) -> None:
    # Prepare
    state = AccountantState(((1.0, 0.25, 40), (2.0, 1.0, 3)), (10, 1))
    path = tmp_path / "accountant.json"
    old = tmp_path / "old.json"
    old.write_text('{"mechanism": "rdp", "history": [[1.0, 0.25, 40]]}')

    # Execute
    write_accountant_state(state, path)

    # Assert
    assert json.loads(path.read_text())["history"] == [
        [1.0, 0.25, 40, 10],
        [2.0, 1.0, 3, 1],
    ]
    assert read_accountant_state(path) == state
    assert read_accountant_state(old) == AccountantState(((1.0, 0.25, 40),), (None,))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"mechanism": "rdp", "history": [[1.0, 0.25, 4', "Expecting"),
        ("", "Expecting value"),
        ('{"mechanism": "rdp"}', "no history list"),
        ('{"history": [[1.0, 0.25, 40, 0]]}', "units per case must be"),
        ('{"history": [[1.0, 1.5, 40]]}', r"rate in \(0, 1\]"),
        ('{"history": [[1.0, 0.5, 2.5]]}', "steps must be an integer"),
        ('{"history": [[NaN, 0.5, 2]]}', "noise must be > 0"),
    ],
    ids=["torn", "empty", "no-history", "zero-units", "rate", "steps", "nan"],
)
def test_an_invalid_accountant_file_is_refused_naming_it(
    tmp_path: Path, text: str, problem: str
) -> None:
    # Prepare
    path = tmp_path / "accountant.json"
    path.write_text(text)

    # Execute / Assert: neither read nor spent on top of
    with pytest.raises(
        ValueError, match=rf"accountant\.json: not a valid accountant file.*{problem}"
    ):
        read_accountant_state(path)
    with pytest.raises(ValueError, match=r"accountant\.json: not a valid accountant"):
        reserve_privacy(
            path, sample_rate=1.0, steps=1, units_per_case=1, dp=dp_settings()
        )
    assert path.read_text() == text


def test_a_reservation_is_recorded_before_it_returns(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "state" / "accountant.json"

    # Execute
    reservation = reserve_privacy(
        path, sample_rate=0.5, steps=7, units_per_case=2, dp=dp_settings()
    )

    # Assert
    assert read_accountant_state(path) == reservation.spend.accountant
    assert read_accountant_state(path).history == ((1.0, 0.5, 7),)
    assert reservation.plan.steps == 7
    assert reservation.spend.units_per_case == 2
    assert accountant_lock_path(path).exists()


# ------------------------------------------------ the accountant cannot be raced

# One Gaussian release at sigma 1 each; the budget fits exactly two of them.
RELEASE = {"sample_rate": 1.0, "steps": 1, "units_per_case": 1}
TWO_RELEASES = AccountantState(((1.0, 1.0, 2),)).epsilon(1e-5)
THREE_RELEASES = AccountantState(((1.0, 1.0, 3),)).epsilon(1e-5)
BUDGET_FOR_TWO = (TWO_RELEASES + THREE_RELEASES) / 2


def test_concurrent_reservations_in_threads_never_exceed_the_budget(
    tmp_path: Path,
) -> None:
    # Prepare: four threads released at once
    path = tmp_path / "accountant.json"
    dp = dp_settings(budget_epsilon=BUDGET_FOR_TWO)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def contend() -> None:
        barrier.wait()
        try:
            reserve_privacy(path, dp=dp, **RELEASE)  # type: ignore[arg-type]
            outcomes.append("approved")
        except PrivacyBudgetError as error:
            outcomes.append(str(error))

    # Execute
    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    saved = read_accountant_state(path)
    assert outcomes.count("approved") == 2
    refused = [outcome for outcome in outcomes if outcome != "approved"]
    assert len(refused) == 2
    assert all("refused before training" in outcome for outcome in refused)
    assert all(f"{TWO_RELEASES:.3f} is spent" in outcome for outcome in refused)
    assert len(saved.history) == 2
    assert saved.epsilon(1e-5) <= BUDGET_FOR_TWO


CONTENDER = """
import sys
from pathlib import Path
from core.privacy.dp import DpSettings, PrivacyBudgetError, reserve_privacy
dp = DpSettings(noise_multiplier=1.0, target_epsilon=None, delta=1e-5,
                max_grad_norm=1.0, budget_epsilon=float(sys.argv[2]))
print("ready", flush=True)
try:
    reserve_privacy(Path(sys.argv[1]), sample_rate=1.0, steps=1, units_per_case=1,
                    dp=dp)
    print("approved", flush=True)
except PrivacyBudgetError as error:
    print(error, flush=True)
"""


def test_concurrent_reservations_in_processes_never_exceed_the_budget(
    tmp_path: Path,
) -> None:
    # Prepare: one release is spent; the budget fits one more. The test holds the
    # accountant's lock while two processes start and reach it, then lets both
    # contend at once.
    path = tmp_path / "accountant.json"
    write_accountant_state(AccountantState(((1.0, 1.0, 1),), (1,)), path)
    root = Path(__file__).resolve().parents[4]
    with locked_accountant(path):
        contenders = [
            subprocess.Popen(
                [sys.executable, "-c", CONTENDER, str(path), repr(BUDGET_FOR_TWO)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=root,
            )
            for _ in range(2)
        ]
        for process in contenders:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        # nobody got past the lock
        assert len(read_accountant_state(path).history) == 1

    # Execute
    outputs = [process.communicate()[0].strip() for process in contenders]

    # Assert
    assert all(process.returncode == 0 for process in contenders)
    assert sorted(outputs)[0] == "approved"
    assert "refused before training" in sorted(outputs)[1]
    assert f"{TWO_RELEASES:.3f} is spent" in sorted(outputs)[1]
    saved = read_accountant_state(path)
    assert len(saved.history) == 2
    assert saved.epsilon(1e-5) <= BUDGET_FOR_TWO


def test_two_concurrent_trainings_never_exceed_the_budget(tmp_path: Path) -> None:
    # Prepare: a budget that fits one tiny training but not two
    path = tmp_path / "accountant.json"
    one = AccountantState(((1.0, 4 / 16, 8),)).epsilon(1e-5)
    two = AccountantState(((1.0, 4 / 16, 16),)).epsilon(1e-5)
    dp = dp_settings(budget_epsilon=(one + two) / 2)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def train() -> None:
        barrier.wait()
        try:
            train_tiny(path, dp)
            outcomes.append("trained")
        except PrivacyBudgetError as error:
            outcomes.append(str(error))

    # Execute
    threads = [threading.Thread(target=train) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    assert sorted(outcomes)[-1] == "trained"
    assert "refused before training" in sorted(outcomes)[0]
    saved = read_accountant_state(path)
    assert saved.history == ((1.0, 4 / 16, 8),)
    assert saved.epsilon(1e-5) <= dp.budget_epsilon
