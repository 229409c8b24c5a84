from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss
from torch import nn

from core.config import RunConfig, load_default_config
from core.privacy.dp import (
    AccountantState,
    DpSettings,
    PrivacyBudgetError,
    read_accountant_state,
    write_accountant_state,
)
from core.training.networks import build_model, get_weights
from core.transfer.adaptation import (
    adapt_pair,
    adapt_pair_private,
    per_sample_pair_loss,
    weighted_pair_loss,
)

CPU = torch.device("cpu")
SIZE = 16


class FixedModel(nn.Module):
    """Foreground where the pixel is positive (``sign`` = 1) or negative (-1)."""

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x[:, 0]
        return torch.stack([torch.zeros_like(pixels), 20 * self.sign * pixels], 1)


def square_data(num_images: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with a bright square, and the square as hard pseudo-label."""
    generator = torch.Generator().manual_seed(0)
    images = -1.0 + 0.2 * torch.randn(num_images, 1, SIZE, SIZE, generator=generator)
    images[:, :, 4:12, 4:12] += 2.0
    labels = torch.zeros(num_images, SIZE, SIZE, dtype=torch.long)
    labels[:, 4:12, 4:12] = 1
    return images, labels


def tiny_config(**overrides: int | float | str | bool) -> RunConfig:
    return load_default_config(
        **{
            "data.image-size": SIZE,
            "model.channels": "4,8",
            "model.strides": "2",
            "adapt.epochs": 3,
            "adapt.batch-size": 4,
            "adapt.learning-rate": 1e-2,
            "train.device": "cpu",
            **overrides,
        }
    )


def tiny_unet(config: RunConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config.model, data=config.data)


# --- weighted_pair_loss --------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "weights", "low", "high"),
    [
        ([FixedModel(1.0)], [1.0], 0.0, 1e-3),  # perfect
        ([FixedModel(-1.0)], [1.0], 0.95, 1.0),  # exactly wrong
        ([FixedModel(1.0), FixedModel(1.0)], [0.5, 0.5], 0.0, 1e-3),
        ([FixedModel(1.0), FixedModel(-1.0)], [0.5, 0.5], 0.4, 0.6),  # 50/50 mix
    ],
)
def test_weighted_pair_loss_is_low_for_right_and_high_for_wrong_predictions(
    models: list[nn.Module], weights: list[float], low: float, high: float
) -> None:
    # Prepare
    images, labels = square_data(2)

    # Execute
    loss = weighted_pair_loss(models, weights, images, labels)

    # Assert
    assert loss.shape == ()
    assert low <= float(loss) <= high


@pytest.mark.parametrize(
    ("models", "weights"),
    [
        ([FixedModel(1.0), FixedModel(-1.0)], [1.0, 0.0]),
        ([FixedModel(-1.0), FixedModel(1.0)], [0.0, 1.0]),
    ],
)
def test_weighted_pair_loss_ignores_a_model_with_weight_zero(
    models: list[nn.Module], weights: list[float]
) -> None:
    # Prepare
    images, labels = square_data(2)
    alone = weighted_pair_loss([FixedModel(1.0)], [1.0], images, labels)

    # Execute
    mixed = weighted_pair_loss(models, weights, images, labels)

    # Assert
    torch.testing.assert_close(mixed, alone)


def test_weighted_pair_loss_grows_with_the_wrong_model_weight() -> None:
    # Prepare
    images, labels = square_data(2)
    pair = [FixedModel(1.0), FixedModel(-1.0)]

    # Execute
    losses = [
        float(weighted_pair_loss(pair, [1.0 - w, w], images, labels))
        for w in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]

    # Assert
    assert losses == sorted(losses)
    assert losses[0] < 1e-3 < 0.95 < losses[-1]


def test_weighted_pair_loss_rejects_weight_count_mismatch() -> None:
    # Prepare
    images, labels = square_data(1)

    # Execute / Assert
    with pytest.raises(ValueError, match="zip"):
        weighted_pair_loss([FixedModel()], [0.5, 0.5], images, labels)


# --- adapt_pair ----------------------------------------------------------------------


def test_adapt_pair_lowers_the_loss_and_updates_both_models() -> None:
    # Prepare
    config = tiny_config()
    models = [tiny_unet(config, seed=1), tiny_unet(config, seed=2)]
    before = [get_weights(model) for model in models]
    images, labels = square_data(8)
    lines: list[str] = []

    # Execute
    result = adapt_pair(
        models,
        [0.6, 0.4],
        images,
        labels,
        adapt=config.adapt,
        train=config.train,
        device=CPU,
        progress=lines.append,
    )

    # Assert
    assert len(result.epoch_losses) == 3
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert result.num_examples == 3 * 8
    assert result.device == "cpu"
    epoch_lines = [line for line in lines if " epoch " in line]
    assert [line.split(" loss ")[0] for line in epoch_lines] == [
        f"[adapt] epoch {epoch}/3" for epoch in (1, 2, 3)
    ]
    for model, initial in zip(models, before, strict=True):
        after = get_weights(model)
        assert after.keys() == initial.keys()
        changed = [
            name for name in after if not np.array_equal(after[name], initial[name])
        ]
        assert changed, "adaptation left a model's weights untouched"
        assert not model.training  # back in eval mode


def test_adapt_pair_with_one_model_trains_it_alone() -> None:
    # Prepare
    config = tiny_config(**{"adapt.epochs": 1})
    model = tiny_unet(config, seed=1)
    before = get_weights(model)
    images, labels = square_data(4)

    # Execute
    result = adapt_pair(
        [model],
        [1.0],
        images,
        labels,
        adapt=config.adapt,
        train=config.train,
        device=CPU,
    )

    # Assert
    assert result.num_examples == 4
    after = get_weights(model)
    assert any(not np.array_equal(after[name], before[name]) for name in after)


def test_adapt_pair_with_zero_epochs_changes_nothing() -> None:
    # Prepare
    config = tiny_config(**{"adapt.epochs": 0})
    model = tiny_unet(config, seed=1)
    before = get_weights(model)
    images, labels = square_data(4)

    # Execute
    result = adapt_pair(
        [model],
        [1.0],
        images,
        labels,
        adapt=config.adapt,
        train=config.train,
        device=CPU,
    )

    # Assert
    assert result.epoch_losses == ()
    assert result.num_examples == 0
    after = get_weights(model)
    assert all(np.array_equal(after[name], before[name]) for name in after)


@pytest.mark.parametrize(
    ("num_models", "num_weights"), [(0, 0), (3, 3), (2, 1), (1, 2)]
)
def test_adapt_pair_rejects_wrong_model_or_weight_count(
    num_models: int, num_weights: int
) -> None:
    # Prepare
    config = tiny_config()
    models = [FixedModel() for _ in range(num_models)]
    weights = [1.0 / max(num_weights, 1)] * num_weights
    images, labels = square_data(2)

    # Execute / Assert
    with pytest.raises(ValueError, match="one or two models with one weight each"):
        adapt_pair(
            models,
            weights,
            images,
            labels,
            adapt=config.adapt,
            train=config.train,
            device=CPU,
        )


# --- adapt_pair_private (DP-SGD) ----------------------------------------------------

DP = DpSettings(
    noise_multiplier=1.0,
    target_epsilon=None,
    delta=1e-5,
    max_grad_norm=1.0,
    budget_epsilon=1000.0,
)
# Eight slices from three cases (3, 3, 2): k = 3.
CASE_OF_SLICE = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])


def test_per_sample_pair_loss_is_each_samples_own_dice() -> None:
    # Prepare
    images, labels = square_data(3)
    labels[1] = 0  # a sample whose pseudo-label differs
    models = [FixedModel(1.0), FixedModel(-1.0)]

    # Execute
    per_sample = per_sample_pair_loss(models, [0.7, 0.3], images, labels)
    alone = per_sample_pair_loss(models, [0.7, 0.3], images[1:2], labels[1:2])

    # Assert: the mean is DiceLoss(batch=False) of the batch; entry 1 its own
    mixture = 0.7 * torch.softmax(models[0](images), 1) + 0.3 * torch.softmax(
        models[1](images), 1
    )
    reference = DiceLoss(to_onehot_y=True, softmax=False, batch=False)(
        mixture, labels.unsqueeze(1)
    )
    assert per_sample.shape == (3,)
    assert float(per_sample.mean()) == pytest.approx(float(reference), rel=1e-6)
    assert float(alone[0]) == pytest.approx(float(per_sample[1]), rel=1e-6)


def test_adapt_pair_private_trains_both_models_and_records_its_plan(
    tmp_path: Path,
) -> None:
    # Prepare: 8 slices at batch 4: q = 1/2, ceil(8/4) = 2 steps per epoch
    config = tiny_config(**{"adapt.epochs": 2, "train.augment": True})
    models = [tiny_unet(config, seed=1), tiny_unet(config, seed=2)]
    before = [get_weights(model) for model in models]
    images, labels = square_data(8)
    accountant = tmp_path / "accountant.json"

    # Execute
    result, spend = adapt_pair_private(
        models,
        [0.6, 0.4],
        images,
        labels,
        case_of_slice=CASE_OF_SLICE,
        adapt=config.adapt,
        train=config.train,
        dp=DP,
        accountant_path=accountant,
        device=CPU,
        progress=lambda _line: None,
        seed=0,
    )

    # Assert
    assert spend is not None
    saved = read_accountant_state(accountant)
    assert saved.history == ((1.0, 0.5, 4),)
    assert saved.units_per_case == (3,)
    assert spend.accountant == saved
    assert spend.epsilon_spent == saved.epsilon(1e-5)
    assert spend.patient_epsilon_spent > spend.epsilon_spent
    assert len(result.epoch_losses) == 2
    for model, initial in zip(models, before, strict=True):
        after = get_weights(model)
        assert any(not np.array_equal(after[name], initial[name]) for name in after)
        assert not model.training


def test_adapt_pair_private_over_budget_trains_and_records_nothing(
    tmp_path: Path,
) -> None:
    # Prepare
    config = tiny_config()
    model = tiny_unet(config, seed=1)
    before = get_weights(model)
    images, labels = square_data(8)
    accountant = tmp_path / "accountant.json"
    write_accountant_state(AccountantState(((1.0, 0.5, 40),), (1,)), accountant)
    written = accountant.read_bytes()
    tight = DpSettings(
        noise_multiplier=1.0,
        target_epsilon=None,
        delta=1e-5,
        max_grad_norm=1.0,
        budget_epsilon=read_accountant_state(accountant).epsilon(1e-5) + 1e-3,
    )

    # Execute / Assert
    with pytest.raises(PrivacyBudgetError, match="refused before training"):
        adapt_pair_private(
            [model],
            [1.0],
            images,
            labels,
            case_of_slice=CASE_OF_SLICE,
            adapt=config.adapt,
            train=config.train,
            dp=tight,
            accountant_path=accountant,
            device=CPU,
        )
    after = get_weights(model)
    assert all(np.array_equal(after[name], before[name]) for name in after)
    assert accountant.read_bytes() == written


def test_adapt_pair_private_refuses_batch_norm_before_recording(
    tmp_path: Path,
) -> None:
    # Prepare
    config = tiny_config(**{"model.norm": "batch"})
    images, labels = square_data(8)
    accountant = tmp_path / "accountant.json"

    # Execute / Assert
    with pytest.raises(ValueError, match="model is not DP-compatible"):
        adapt_pair_private(
            [tiny_unet(config, seed=1)],
            [1.0],
            images,
            labels,
            case_of_slice=CASE_OF_SLICE,
            adapt=config.adapt,
            train=config.train,
            dp=DP,
            accountant_path=accountant,
            device=CPU,
        )
    assert not accountant.exists()


def test_adapt_pair_private_with_zero_epochs_charges_nothing(tmp_path: Path) -> None:
    # Prepare
    config = tiny_config(**{"adapt.epochs": 0})
    images, labels = square_data(4)
    accountant = tmp_path / "accountant.json"

    # Execute
    result, spend = adapt_pair_private(
        [tiny_unet(config, seed=1)],
        [1.0],
        images,
        labels,
        case_of_slice=torch.arange(4),
        adapt=config.adapt,
        train=config.train,
        dp=DP,
        accountant_path=accountant,
        device=CPU,
    )

    # Assert
    assert spend is None
    assert result.num_examples == 0
    assert not accountant.exists()
