from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from core.config import RunConfig, load_default_config
from core.training.networks import build_model, get_weights
from core.training.trainer import (
    TrainResult,
    augment_batch,
    augment_intensity,
    predict_mixture,
    predict_probabilities,
    run_training,
    seed_everything,
    select_device,
    train_supervised,
)

CPU = torch.device("cpu")
SIZE = 16
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def tiny_config(**overrides: int | float | str | bool) -> RunConfig:
    return load_default_config(
        **{
            "data.image-size": SIZE,
            "model.channels": "4,8",
            "model.strides": "2",
            "train.epochs": 2,
            "train.batch-size": 2,
            "train.learning-rate": 1e-2,
            "train.device": "cpu",
            **overrides,
        }
    )


def tiny_unet(config: RunConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config.model, data=config.data)


def square_data(num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose label is a bright square at a per-image position."""
    generator = torch.Generator().manual_seed(0)
    images = -1.0 + 0.2 * torch.randn(num_images, 1, SIZE, SIZE, generator=generator)
    labels = torch.zeros(num_images, SIZE, SIZE, dtype=torch.long)
    for index in range(num_images):
        top = 2 + index % 5
        images[index, 0, top : top + 7, 3:10] += 2.0
        labels[index, top : top + 7, 3:10] = 1
    return images, labels


class LinearLogitModel(nn.Module):
    """Logits (0, x): softmax foreground probability sigmoid(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x[:, 0]
        return torch.stack([torch.zeros_like(pixels), pixels], 1)


# --- train_supervised / run_training -------------------------------------------------


def test_train_supervised_is_deterministic_under_a_seed() -> None:
    # Prepare
    config = tiny_config()
    images, labels = square_data(6)
    models = [tiny_unet(config), tiny_unet(config)]

    # Execute
    results = [
        train_supervised(
            model, images, labels, train=config.train, device=CPU, label="run"
        )
        for model in models
    ]

    # Assert
    assert results[0].epoch_losses == results[1].epoch_losses
    first, second = (get_weights(model) for model in models)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_train_supervised_with_another_seed_gives_other_weights() -> None:
    # Prepare
    images, labels = square_data(6)
    configs = [tiny_config(**{"train.seed": 0}), tiny_config(**{"train.seed": 1})]
    models = [tiny_unet(config) for config in configs]

    # Execute
    for model, config in zip(models, configs, strict=True):
        train_supervised(
            model, images, labels, train=config.train, device=CPU, label="run"
        )

    # Assert
    first, second = (get_weights(model) for model in models)
    assert any(not np.array_equal(first[name], second[name]) for name in first)


def test_train_supervised_lowers_the_loss_on_a_learnable_task() -> None:
    # Prepare
    config = tiny_config(**{"train.epochs": 4, "train.augment": False})
    images, labels = square_data(8)
    model = tiny_unet(config)
    lines: list[str] = []

    # Execute
    result = train_supervised(
        model,
        images,
        labels,
        train=config.train,
        device=CPU,
        label="toy",
        progress=lines.append,
    )

    # Assert
    assert len(result.epoch_losses) == 4
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert result.final_loss == result.epoch_losses[-1]
    epoch_lines = [line for line in lines if " epoch " in line]
    assert [line.split(" loss ")[0] for line in epoch_lines] == [
        f"[toy] epoch {epoch}/4" for epoch in range(1, 5)
    ]
    assert all(line.startswith("[toy] ") for line in lines)
    assert not model.training


@pytest.mark.parametrize(
    ("num_images", "batch_size", "epochs"),
    [(5, 2, 2), (6, 16, 1), (3, 1, 3)],
)
def test_train_result_counts_samples_not_batches(
    num_images: int, batch_size: int, epochs: int
) -> None:
    # Prepare
    config = tiny_config(**{"train.epochs": epochs, "train.batch-size": batch_size})
    images, labels = square_data(num_images)

    # Execute
    result = train_supervised(
        tiny_unet(config), images, labels, train=config.train, device=CPU, label="n"
    )

    # Assert
    assert result.num_examples == epochs * num_images
    assert len(result.epoch_losses) == epochs
    assert result.device == "cpu"
    assert result.seconds >= 0.0


def test_run_training_passes_batches_of_aligned_tensors() -> None:
    # Prepare: a loss that checks the pairing of each sample with its index.
    weight = nn.Parameter(torch.zeros(()))
    values = torch.arange(7.0)[:, None, None].expand(7, 2, 3).clone()
    indices = torch.arange(7)
    seen: list[int] = []

    def step_loss(batch: Sequence[torch.Tensor]) -> torch.Tensor:
        batch_values, batch_indices = batch
        assert torch.equal(batch_values[:, 0, 0], batch_indices.float())
        seen.extend(batch_indices.tolist())
        return (weight - batch_values.mean()) ** 2

    holder = nn.Module()
    holder.weight = weight

    # Execute
    result = run_training(
        [holder],
        [values, indices],
        step_loss,
        epochs=2,
        batch_size=3,
        learning_rate=0.1,
        seed=0,
        device=CPU,
        amp=True,
        augment=False,  # flips need spatial last dims; ``indices`` is 1-D
        label="pairs",
    )

    # Assert: every sample once per epoch
    assert sorted(seen) == sorted(list(range(7)) * 2)
    assert result.num_examples == 14


def test_train_result_final_loss_is_nan_without_epochs() -> None:
    # Prepare
    result = TrainResult(num_examples=0, epoch_losses=(), seconds=0.0, device="cpu")

    # Execute / Assert
    assert math.isnan(result.final_loss)


# --- augment_batch -------------------------------------------------------------------


def flips_of(tensor: torch.Tensor) -> dict[tuple[int, ...], torch.Tensor]:
    return {
        (): tensor,
        (-1,): tensor.flip(-1),
        (-2,): tensor.flip(-2),
        (-1, -2): tensor.flip((-1, -2)),
    }


def test_augment_batch_flips_every_tensor_identically() -> None:
    # Prepare: the label encodes each image pixel, so a mismatch would show.
    images = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    labels = images[:, 0].long() * 3
    observed: set[tuple[int, ...]] = set()

    # Execute
    for seed in range(16):
        out_images, out_labels = augment_batch(
            [images, labels], torch.Generator().manual_seed(seed)
        )

        # Assert
        matches = [
            dims
            for dims, flipped in flips_of(images).items()
            if torch.equal(out_images, flipped)
        ]
        assert len(matches) == 1
        assert torch.equal(out_labels, flips_of(labels)[matches[0]])
        assert torch.equal(out_labels, out_images[:, 0].long() * 3)
        observed.add(matches[0])
    assert observed == {(), (-1,), (-2,), (-1, -2)}


def test_augment_batch_is_reproducible_from_the_generator() -> None:
    # Prepare
    images = torch.arange(36.0).reshape(1, 1, 6, 6)

    # Execute
    first = augment_batch([images], torch.Generator().manual_seed(3))
    second = augment_batch([images], torch.Generator().manual_seed(3))

    # Assert
    assert torch.equal(first[0], second[0])


def test_seed_everything_returns_a_seeded_generator() -> None:
    # Execute
    first = torch.rand(3, generator=seed_everything(7))
    second = torch.rand(3, generator=seed_everything(7))

    # Assert
    assert torch.equal(first, second)


# --- inference -----------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_predict_probabilities_sum_to_one_over_classes(batch_size: int) -> None:
    # Prepare
    config = tiny_config()
    model = tiny_unet(config)
    images, _ = square_data(3)

    # Execute
    probabilities = predict_probabilities(
        model, images, device=CPU, batch_size=batch_size
    )

    # Assert
    assert probabilities.shape == (3, 2, SIZE, SIZE)
    assert probabilities.device.type == "cpu"
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3, SIZE, SIZE))
    assert bool(((probabilities >= 0) & (probabilities <= 1)).all())
    assert not model.training


def test_predict_probabilities_are_the_softmax_of_the_logits() -> None:
    # Prepare
    images = torch.tensor([[[[0.0, 2.0], [-1.0, 30.0]]]])

    # Execute
    probabilities = predict_probabilities(LinearLogitModel(), images, device=CPU)

    # Assert
    torch.testing.assert_close(probabilities[:, 1], torch.sigmoid(images[:, 0]))


def test_predict_mixture_weights_softmax_maps_as_given() -> None:
    # Prepare
    images = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    single = predict_probabilities(LinearLogitModel(), images, device=CPU)

    # Execute
    mixture = predict_mixture(
        [LinearLogitModel(), LinearLogitModel()], [0.25, 0.5], images, device=CPU
    )

    # Assert: the weights are not renormalised
    torch.testing.assert_close(mixture, 0.75 * single)


@pytest.mark.parametrize(
    ("num_models", "weights"),
    [(0, []), (1, []), (1, [0.5, 0.5]), (2, [1.0])],
)
def test_predict_mixture_checks_argument_lengths(
    num_models: int, weights: list[float]
) -> None:
    # Prepare
    models = [LinearLogitModel() for _ in range(num_models)]

    # Execute / Assert
    with pytest.raises(ValueError, match="one weight per model, at least one model"):
        predict_mixture(models, weights, torch.zeros(1, 1, 2, 2), device=CPU)


# --- devices -------------------------------------------------------------------------


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_select_device_cuda_without_cuda_raises(name: str) -> None:
    # Execute / Assert
    with pytest.raises(RuntimeError, match=rf"train.device is '{name}' but CUDA"):
        select_device(name)


@NO_CUDA
def test_select_device_auto_is_cpu_without_cuda() -> None:
    # Execute / Assert
    assert select_device("auto") == CPU


def test_select_device_cpu() -> None:
    # Execute / Assert
    assert select_device("cpu") == CPU


def test_augment_intensity_is_seeded_and_changes_only_intensities() -> None:
    # Prepare
    images = torch.zeros(4, 1, 8, 8)
    images[:, :, 2:6, 2:6] = 1.0

    # Execute
    first = augment_intensity(images, torch.Generator().manual_seed(7))
    second = augment_intensity(images, torch.Generator().manual_seed(7))
    other = augment_intensity(images, torch.Generator().manual_seed(8))

    # Assert
    assert first.shape == images.shape
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, other)
    inside = first[:, 0, 2:6, 2:6].mean(dim=(1, 2))
    outside = first[:, 0, :2, :].mean(dim=(1, 2))
    assert bool((inside > outside + 0.5).all())  # gain >= 0.8 keeps the square bright
