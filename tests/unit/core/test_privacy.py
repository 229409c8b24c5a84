from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from core.config import TrainConfig, load_default_config
from core.models import build_model, get_weights
from core.policy import default_policy, resolve_policy
from core.privacy import (
    AccountantState,
    DpSettings,
    DpSgdPlan,
    PrivacyBudgetError,
    PrivateGradient,
    account_steps,
    dp_settings_for,
    make_dp_compatible,
    plan_dp_sgd,
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


def test_plan_private_training_is_plan_dp_sgd_at_the_batch_rate() -> None:
    # Prepare
    dp = dp_settings(noise_multiplier=None, target_epsilon=3.0)
    accountant = AccountantState(())

    # Execute
    noise, rate, steps = plan_private_training(
        64, train=TRAIN, dp=dp, accountant=accountant
    )
    plan = plan_dp_sgd(4 / 64, 2 * 16, dp=dp, accountant=accountant)

    # Assert
    assert (rate, steps) == (4 / 64, 2 * 16)
    assert plan == DpSgdPlan(
        noise_multiplier=noise,
        sample_rate=rate,
        steps=steps,
        max_grad_norm=1.0,
        delta=1e-5,
    )


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
        before, noise_multiplier=2.0, sample_rate=0.5, steps=10, delta=1e-5
    )

    # Assert
    assert spend.accountant.history == ((1.0, 0.25, 40), (2.0, 0.5, 10))
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
            train=train,
            dp=dp,
            accountant=AccountantState(()),
            device=torch.device("cpu"),
            label="test",
            progress=lambda _line: None,
        )
        trained.append(model.state_dict())

    # Assert: the same initial weights (seeded), different noisy updates
    assert any(
        not torch.equal(trained[0][name], trained[1][name]) for name in trained[0]
    )
