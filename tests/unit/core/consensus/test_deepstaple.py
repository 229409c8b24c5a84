"""Tests of DeepSTAPLE: data-parameter terms, weighted voting and training."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from core.config import ConsensusGranularity, load_default_config
from core.consensus.deepstaple import (
    DataParameters,
    batch_weights,
    class_weights,
    compensation_weights,
    data_parameter_loss,
    prior_data_parameters,
    step_data_parameters,
    step_network,
    train_deepstaple,
    weighted_vote,
)
from core.consensus.job import parameter_index
from core.consensus.staple import majority_vote
from core.training.loop import MixedPrecision
from core.training.networks import build_model

CPU = torch.device("cpu")
TINY_OVERRIDES: dict[str, bool | int | float | str] = {
    "model.channels": "4,8",
    "model.strides": "2",
    "data.image-size": 16,
}
TINY = load_default_config(**TINY_OVERRIDES)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(TINY.model, data=TINY.data)


def good_and_empty_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """Four 16x16 images with a bright 5x5 square; labels per image: the square,
    the square shifted by one column, and an empty label (rows 3n, 3n+1, 3n+2)."""
    images, labels = [], []
    for case in range(4):
        image = torch.zeros(1, 16, 16)
        truth = torch.zeros(16, 16, dtype=torch.long)
        top, left = 2 + 2 * case, 9 - 2 * case
        image[0, top : top + 5, left : left + 5] = 1.0
        truth[top : top + 5, left : left + 5] = 1
        shifted = torch.zeros_like(truth)
        shifted[top : top + 5, left + 1 : left + 6] = 1
        for label in (truth, shifted, torch.zeros_like(truth)):
            images.append(image)
            labels.append(label)
    return torch.stack(images), torch.stack(labels)


# ------------------------------------------------------------ DeepSTAPLE terms


def test_batch_weights_normalise_sigmoid_by_the_batch_mean() -> None:
    # Prepare: sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, mean 5/8.
    raw = torch.tensor([0.0, math.log(3.0)])

    # Execute
    result = batch_weights(raw)

    # Assert
    torch.testing.assert_close(result, torch.tensor([0.8, 1.2]))


def test_compensation_weights_divide_by_log_foreground() -> None:
    # Prepare: G = 0 gives log(e) + e = 1 + e; G = e^2 - e gives 2 + e.
    normalised = torch.tensor([1.0, 2.0])
    counts = torch.tensor([0.0, math.e**2 - math.e])

    # Execute
    result = compensation_weights(normalised, counts)

    # Assert
    expected = torch.tensor([1.0 / (1.0 + math.e), 2.0 / (2.0 + math.e)])
    torch.testing.assert_close(result, expected)


def two_sample_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (2, 2 classes, 1x2 voxels), labels and raw DPs with hand-known losses.

    Sample 0: logits (0, 0) everywhere, labels 0 -> CE ln 2 per voxel, predicts no
    foreground (argmax takes the first class on ties). Sample 1: voxel 0 has logits
    (0, ln 3) and label 1 -> CE ln(4/3); voxel 1 logits (0, 0), label 0 -> CE ln 2;
    predicted foreground fraction 1/2. Raw DPs (0, ln 3) -> weights (0.8, 1.2).
    """
    logits = torch.zeros(2, 2, 1, 2)
    logits[1, 1, 0, 0] = math.log(3.0)
    labels = torch.tensor([[[0, 0]], [[1, 0]]])
    raw = torch.tensor([0.0, math.log(3.0)])
    return logits, labels, raw


def test_data_parameter_loss_ce_term_by_hand() -> None:
    # Prepare
    logits, labels, raw = two_sample_batch()
    counts = torch.tensor([0, 1])

    # Execute
    result = data_parameter_loss(
        logits, labels, raw, counts, fixed_weighting=False, risk_regularisation=False
    )

    # Assert
    sample_1 = (math.log(4.0 / 3.0) + math.log(2.0)) / 2
    expected = 0.8 * math.log(2.0) + 1.2 * sample_1
    assert float(result) == pytest.approx(expected, rel=1e-6)


def test_data_parameter_loss_subtracts_the_risk_term() -> None:
    # Prepare
    logits, labels, raw = two_sample_batch()
    counts = torch.tensor([0, 1])

    # Execute
    without = data_parameter_loss(logits, labels, raw, counts, fixed_weighting=False)
    with_fixed = data_parameter_loss(logits, labels, raw, counts)

    # Assert: minus w_1 * 1/2 (sample 0 predicts no foreground).
    sample_1 = (math.log(4.0 / 3.0) + math.log(2.0)) / 2
    expected = 0.8 * math.log(2.0) + 1.2 * sample_1 - 1.2 * 0.5
    assert float(without) == pytest.approx(expected, rel=1e-6)
    weights = [0.8 / (1.0 + math.e), 1.2 / (math.log(1.0 + math.e) + math.e)]
    expected_fixed = (
        weights[0] * math.log(2.0) + weights[1] * sample_1 - weights[1] * 0.5
    )
    assert float(with_fixed) == pytest.approx(expected_fixed, rel=1e-6)


@pytest.mark.parametrize("risk_regularisation", [True, False])
def test_risk_term_rewards_predicted_foreground(risk_regularisation: bool) -> None:
    # Prepare: equal CE (log(1 + e^-1)) for both; sample 0 predicts foreground,
    # sample 1 background.
    logits = torch.tensor([[[[0.0]], [[1.0]]], [[[1.0]], [[0.0]]]])
    labels = torch.tensor([[[1]], [[0]]])
    raw = torch.zeros(2, requires_grad=True)

    # Execute
    loss = data_parameter_loss(
        logits,
        labels,
        raw,
        torch.tensor([1, 0]),
        fixed_weighting=False,
        risk_regularisation=risk_regularisation,
    )
    loss.backward()  # type: ignore[no-untyped-call]
    assert raw.grad is not None
    gradient = raw.grad.tolist()

    # Assert
    if risk_regularisation:
        assert gradient[0] < 0.0 < gradient[1]
    else:
        assert gradient == pytest.approx([0.0, 0.0], abs=1e-7)


def test_risk_term_foreground_fraction_is_detached() -> None:
    # Prepare
    logits, labels, raw = two_sample_batch()
    logits.requires_grad_(True)

    # Execute
    for risk in (True, False):
        loss = data_parameter_loss(
            logits, labels, raw, torch.tensor([0, 1]), risk_regularisation=risk
        )
        loss.backward()  # type: ignore[no-untyped-call]
    assert logits.grad is not None

    # Assert: both losses gave the logits the same gradient (accumulated twice).
    clean = logits.detach().clone().requires_grad_(True)
    data_parameter_loss(
        clean, labels, raw, torch.tensor([0, 1]), risk_regularisation=False
    ).backward()  # type: ignore[no-untyped-call]
    assert clean.grad is not None
    torch.testing.assert_close(logits.grad, 2 * clean.grad)


def test_class_weights_by_hand_and_absent_class() -> None:
    # Prepare: three background voxels and one foreground voxel; class 2 absent.
    labels = torch.tensor([[[0, 0], [0, 1]]])

    # Execute
    two = class_weights(labels, 2)
    three = class_weights(labels, 3)

    # Assert
    background = 3.0**-0.35
    expected = torch.tensor([background, 1.0]) * 2 / (background + 1.0)
    torch.testing.assert_close(two, expected)
    torch.testing.assert_close(three, torch.cat([expected, torch.zeros(1)]))
    assert two.mean().item() == pytest.approx(1.0)


def test_data_parameters_start_at_zero_and_are_sparse() -> None:
    # Prepare
    table = DataParameters(5)

    # Execute
    raw = table(torch.tensor([4, 0]))
    raw.sum().backward()

    # Assert
    assert raw.tolist() == [0.0, 0.0]
    assert table.embedding.weight.grad is not None
    assert table.embedding.weight.grad.is_sparse


@pytest.mark.parametrize(
    ("raw", "stack", "expected"),
    [
        # softmax (1/2, 1/4, 1/4)
        ([math.log(2.0), 0.0, 0.0], [[[1, 1, 0]], [[1, 0, 0]], [[0, 1, 1]]], [1, 1, 0]),
        # one trusted label beats two others: weight e^3 / (e^3 + 2) > 1/2
        ([3.0, 0.0, 0.0], [[[1, 0]], [[0, 1]], [[0, 1]]], [1, 0]),
        # exactly one half is not a majority
        ([0.0, 0.0], [[[1, 0]], [[0, 1]]], [0, 0]),
    ],
)
def test_weighted_vote_uses_softmax_of_raw_data_parameters(
    raw: list[float], stack: list[object], expected: list[int]
) -> None:
    # Prepare
    labels = np.array(stack)

    # Execute
    result = weighted_vote(labels, raw)

    # Assert
    assert result.tolist() == [[bool(value) for value in expected]]


def test_weighted_vote_with_equal_parameters_is_majority_vote() -> None:
    # Prepare
    labels = np.array([[[[1, 0, 1]]], [[[1, 1, 0]]], [[[0, 0, 1]]]])

    # Execute
    result = weighted_vote(labels, np.full(3, 0.7))

    # Assert
    np.testing.assert_array_equal(result, majority_vote(labels))


# ------------------------------------------------------------ DeepSTAPLE training


def test_out_of_line_steps_touch_only_their_own_parameters() -> None:
    # Prepare
    images, labels = good_and_empty_labels()
    model = tiny_model().train()
    table = DataParameters(images.shape[0])
    precision = MixedPrecision(torch.device("cpu"), amp=False)
    network_optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    dp_optimizer = torch.optim.SparseAdam(list(table.parameters()), lr=0.1)
    index = torch.tensor([0, 2, 5])
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    dp_before = table.embedding.weight.detach().clone()

    # Execute step 1
    step_network(
        model,
        images[index],
        labels[index],
        optimizer=network_optimizer,
        class_weight=class_weights(labels, 2),
        precision=precision,
    )
    weights_after_1 = {k: v.clone() for k, v in model.state_dict().items()}
    dp_after_1 = table.embedding.weight.detach().clone()

    # Execute step 2
    step_data_parameters(
        model,
        table,
        images[index],
        labels[index],
        index,
        (labels[index] != 0).flatten(1).sum(dim=1),
        optimizer=dp_optimizer,
        precision=precision,
    )
    dp_after_2 = table.embedding.weight.detach().clone()

    # Assert: step 1 moved the network, not the DPs.
    assert any(
        not torch.equal(weights_before[k], weights_after_1[k]) for k in weights_before
    )
    torch.testing.assert_close(dp_after_1, dp_before, rtol=0, atol=0)
    # Step 2 moved only the batch's DPs and left every network weight as it was.
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights_after_1[key], rtol=0, atol=0)
    changed = (dp_after_2 != dp_after_1).squeeze(-1)
    assert changed.nonzero().flatten().tolist() == index.tolist()
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_empty_labels_cannot_win_and_training_is_deterministic() -> None:
    # Prepare
    images, labels = good_and_empty_labels()
    lines: list[str] = []

    def run(progress: Callable[[str], None] | None) -> np.ndarray:
        result = train_deepstaple(
            images,
            labels,
            model=tiny_model(),
            num_classes=2,
            epochs=4,
            batch_size=6,
            device=CPU,
            seed=3,
            progress=progress,
        )
        assert not result.model.training
        assert len(result.epoch_losses) == 4
        return result.data_parameters

    # Execute
    first = run(lines.append)
    second = run(None)

    # Assert
    per_image = first.reshape(4, 3)  # columns: truth, shifted, empty
    assert first.shape == (12,)
    assert per_image[:, 2].max() < per_image[:, :2].min()
    np.testing.assert_array_equal(first, second)
    assert len(lines) == 4
    assert lines[-1].startswith("[deepstaple] epoch 4/4")
    # The learned parameters' consensus drops the empty label on every image.
    stack = labels.reshape(4, 3, 16, 16).numpy()
    for case in range(4):
        fused = weighted_vote(stack[case], per_image[case])
        assert fused.sum() >= 20


def test_in_line_mode_trains_network_and_parameters_together() -> None:
    # Prepare
    images, labels = good_and_empty_labels()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # Execute
    result = train_deepstaple(
        images[:6],
        labels[:6],
        model=model,
        num_classes=2,
        epochs=1,
        batch_size=3,
        out_of_line=False,
        device=CPU,
        seed=0,
    )

    # Assert
    assert np.isfinite(result.epoch_losses).all()
    assert np.abs(result.data_parameters).min() > 0.0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_deepstaple_accepts_3d_volumes() -> None:
    # Prepare
    images = torch.zeros(2, 1, 4, 6, 6)
    images[:, :, 1:3, 2:4, 2:4] = 1.0
    labels = (images[:, 0] > 0).long()
    model = nn.Conv3d(1, 2, kernel_size=3, padding=1)

    # Execute
    result = train_deepstaple(
        images,
        labels,
        model=model,
        num_classes=2,
        epochs=1,
        batch_size=2,
        device=CPU,
        seed=0,
    )

    # Assert
    assert result.data_parameters.shape == (2,)


def test_case_granularity_shares_one_parameter_per_case_and_source() -> None:
    # Prepare: source-major instances (truth, shifted, empty labels of the four
    # images), the images being two slices each of cases 0 and 1.
    images, labels = good_and_empty_labels()
    order = [3 * image + source for source in range(3) for image in range(4)]
    case_of_slice = torch.tensor([0, 0, 1, 1])
    index = parameter_index(case_of_slice, 3, ConsensusGranularity.CASE)
    assert index is not None
    assert index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert parameter_index(case_of_slice, 3, ConsensusGranularity.SLICE) is None

    # Execute
    result = train_deepstaple(
        images[order],
        labels[order],
        model=tiny_model(),
        num_classes=2,
        epochs=4,
        batch_size=6,
        device=CPU,
        seed=3,
        parameter_index=index,
    )

    # Assert: one value per (case, source), the empty source's lowest on both cases.
    per_source = result.data_parameters.reshape(3, 4)
    np.testing.assert_array_equal(per_source[:, 0], per_source[:, 1])
    np.testing.assert_array_equal(per_source[:, 2], per_source[:, 3])
    assert len(np.unique(result.data_parameters)) == 6
    assert per_source[2].max() < per_source[:2].min()


# ------------------------------------------------------------------------ priors


def test_prior_is_the_centred_clipped_log_odds_of_the_scores() -> None:
    # Prepare: logit(0.9) = ln 9; 0.999 and 0.0 are clipped to 0.95 and 0.05.
    scores = [0.9, 0.5, 0.999, 0.0, math.nan]
    log_odds = np.array([math.log(9.0), 0.0, math.log(19.0), -math.log(19.0)])

    # Execute
    start = prior_data_parameters(scores)

    # Assert: centred over the scored sources; the unscored one (an atlas) at 0.0.
    np.testing.assert_allclose(start[:4], log_odds - log_odds.mean(), rtol=1e-6)
    assert start[4] == 0.0
    assert abs(float(start[:4].mean())) < 1e-6


@pytest.mark.parametrize("granularity", list(ConsensusGranularity))
def test_training_starts_from_the_given_data_parameters(
    granularity: ConsensusGranularity,
) -> None:
    # Prepare: source-major instances of three sources, a prior per source.
    images, labels = good_and_empty_labels()
    order = [3 * image + source for source in range(3) for image in range(4)]
    index = parameter_index(torch.tensor([0, 0, 1, 1]), 3, granularity)
    count = 12 if index is None else int(index.max()) + 1
    start = torch.linspace(-1.0, 1.0, count)

    def run(epochs: int, initial: torch.Tensor | None) -> np.ndarray:
        return train_deepstaple(
            images[order],
            labels[order],
            model=tiny_model(),
            num_classes=2,
            epochs=epochs,
            batch_size=6,
            device=CPU,
            seed=3,
            parameter_index=index,
            initial_data_parameters=initial,
        ).data_parameters

    # Execute
    untrained = run(0, start)
    flat = run(0, None)
    trained = run(2, start)

    # Assert: before any step the table is the given start (the paper's 0.0
    # without one), mapped onto the instances; training moves it from there.
    expected = start if index is None else start[index]
    np.testing.assert_array_equal(untrained, expected.numpy())
    np.testing.assert_array_equal(flat, np.zeros(12, dtype=np.float32))
    moved = trained - untrained
    assert np.all(np.abs(moved) > 0)
    assert np.all(np.abs(moved) < 1.0)  # two SparseAdam steps at lr 0.1


# ------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: weighted_vote(np.zeros((3, 2, 2)), [0.0, 1.0]),
            r"raw_data_parameters must have shape \(3,\).*\(3, 2, 2\).*\(2,\)",
        ),
        (
            lambda: class_weights(torch.tensor([[0, 2]]), 2),
            r"noisy_labels must lie in \[0, 2\), got \[0, 2\]",
        ),
        (lambda: DataParameters(0), r"count must be at least 1"),
        (
            lambda: DataParameters(2, torch.zeros(3)),
            r"initial data parameters must be \(2,\) finite values, got \(3,\)",
        ),
        (
            lambda: DataParameters(1, torch.tensor([math.nan])),
            r"initial data parameters must be \(1,\) finite",
        ),
        (
            lambda: prior_data_parameters([[0.5]]),
            r"scores must be one per source \(A,\), got \(1, 1\)",
        ),
        (
            lambda: data_parameter_loss(
                torch.zeros(2, 2, 3, 3),
                torch.zeros(2, 3, 3, dtype=torch.long),
                torch.zeros(3),
                torch.zeros(2),
            ),
            r"raw \(B,\).*logits \(2, 2, 3, 3\).*raw \(3,\)",
        ),
        (
            lambda: data_parameter_loss(
                torch.zeros(2, 2, 3, 3),
                torch.zeros(2, 3, 4, dtype=torch.long),
                torch.zeros(2),
                torch.zeros(2),
            ),
            r"noisy_labels \(2, 3, 4\)",
        ),
    ],
)
def test_bad_inputs_raise_value_error(call: Callable[[], object], message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (torch.tensor([0.0, 1.0]), r"parameter_index must be \(2,\) integers"),
        (torch.tensor([0, 1, 1]), r"parameter_index must be \(2,\) integers"),
        (
            torch.tensor([0, 2]),
            r"every index 0\.\.P-1, got 2 distinct values in \[0, 2\]",
        ),
        (torch.tensor([1, 1]), r"every index 0\.\.P-1"),
    ],
)
def test_train_deepstaple_rejects_a_bad_parameter_index(
    index: torch.Tensor, message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        train_deepstaple(
            torch.zeros(2, 1, 4, 4),
            torch.zeros(2, 4, 4, dtype=torch.long),
            model=nn.Conv2d(1, 2, 1),
            num_classes=2,
            epochs=1,
            batch_size=1,
            device=CPU,
            seed=0,
            parameter_index=index,
        )


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (torch.zeros(2, 1, 4), torch.zeros(2, 4, dtype=torch.long), r"images must"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), r"\(N, 1,"),
        (torch.zeros(0, 1, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long), "empty"),
        (
            torch.zeros(2, 1, 4, 4),
            torch.zeros(3, 4, 4, dtype=torch.long),
            r"noisy_labels must have shape \(2, 4, 4\).*got \(3, 4, 4\)",
        ),
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4), r"must be integers"),
    ],
)
def test_train_deepstaple_rejects_bad_shapes(
    images: torch.Tensor, labels: torch.Tensor, message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        train_deepstaple(
            images,
            labels,
            model=nn.Conv2d(1, 2, 1),
            num_classes=2,
            epochs=1,
            batch_size=1,
            device=CPU,
            seed=0,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("out_of_line", [True, False])
def test_train_deepstaple_on_cuda_with_amp(out_of_line: bool) -> None:
    # Prepare
    images, labels = good_and_empty_labels()

    # Execute
    result = train_deepstaple(
        images,
        labels,
        model=tiny_model(),
        num_classes=2,
        epochs=2,
        batch_size=6,
        out_of_line=out_of_line,
        device=torch.device("cuda"),
        seed=0,
        amp=True,
    )

    # Assert
    assert np.isfinite(result.data_parameters).all()
    assert np.abs(result.data_parameters).max() > 0.0
