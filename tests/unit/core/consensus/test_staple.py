"""Tests of the label-consensus baselines: majority vote, STAPLE, multi-label STAPLE."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from core.consensus.staple import majority_vote, multi_label_staple, staple


def square(size: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


# ------------------------------------------------------------------ majority vote


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        # 3 raters: 2 of 3 is a majority, 1 of 3 is not.
        ([[[1, 1, 0]], [[1, 0, 0]], [[0, 1, 1]]], [[True, True, False]]),
        # 2 raters, 1 vote each: a tie is background.
        ([[[1, 0]], [[0, 1]]], [[False, False]]),
        # 4 raters: 2 is a tie (background), 3 is a majority.
        ([[[1, 1]], [[1, 1]], [[0, 1]], [[0, 0]]], [[False, True]]),
        # bool input, 3-D spatial.
        ([[[[True]], [[False]]], [[[True]], [[True]]]], [[[True]], [[False]]]),
    ],
)
def test_majority_vote_is_strict_and_ties_are_background(
    stack: list[object], expected: list[object]
) -> None:
    # Prepare
    labels = np.array(stack)

    # Execute
    result = majority_vote(labels)

    # Assert
    assert result.dtype == np.bool_
    assert result.tolist() == expected


# ----------------------------------------------------------------------- STAPLE


def test_staple_recovers_the_truth_and_flags_the_bad_rater() -> None:
    # Prepare: two good raters each miss one voxel, the third misses half the square
    # and marks a false blob.
    truth = square(12, slice(3, 9), slice(3, 9))
    first, second = truth.copy(), truth.copy()
    first[3, 3] = 0
    second[8, 4] = 0
    bad = square(12, slice(3, 9), slice(3, 6))
    bad[0:2, 0:2] = 1
    labels = np.stack([first, second, bad])

    # Execute
    result = staple(labels)

    # Assert
    np.testing.assert_array_equal(result.consensus, truth.astype(bool))
    assert result.probability.shape == truth.shape
    assert result.probability.min() >= 0.0
    assert result.probability.max() <= 1.0
    assert len(result.sensitivity) == len(result.specificity) == 3
    assert result.sensitivity[2] < min(result.sensitivity[:2]) - 0.3


def test_staple_threshold_applies_to_the_probability() -> None:
    # Prepare
    truth = square(8, slice(2, 6), slice(2, 6))
    labels = np.stack([truth, truth, square(8, slice(2, 6), slice(2, 4))])

    # Execute
    strict = staple(labels, threshold=1.0)
    default = staple(labels)

    # Assert
    assert not strict.consensus.any()
    assert default.consensus.sum() == truth.sum()


@pytest.mark.parametrize(
    ("stack", "probability", "sensitivity", "specificity"),
    [
        (np.zeros((3, 4, 4), dtype=np.uint8), 0.0, math.nan, 1.0),
        (np.ones((2, 2, 3, 3), dtype=bool), 1.0, 1.0, math.nan),
        (np.zeros((1, 4, 4), dtype=np.uint8), 0.0, math.nan, 1.0),
    ],
    ids=["all-empty", "all-full-3d", "single-empty"],
)
def test_staple_constant_stacks_give_their_constant(
    stack: np.ndarray, probability: float, sensitivity: float, specificity: float
) -> None:
    # Prepare
    raters = stack.shape[0]

    # Execute
    result = staple(stack)

    # Assert
    np.testing.assert_array_equal(result.probability, probability)
    assert result.consensus.shape == stack.shape[1:]
    assert result.consensus.all() == bool(probability)
    np.testing.assert_array_equal(result.sensitivity, [sensitivity] * raters)
    np.testing.assert_array_equal(result.specificity, [specificity] * raters)


def test_staple_single_label_is_its_own_consensus() -> None:
    # Prepare
    label = square(6, slice(1, 4), slice(2, 5))

    # Execute
    result = staple(label[None])

    # Assert
    np.testing.assert_array_equal(result.consensus, label.astype(bool))
    assert result.sensitivity == (1.0,)
    assert result.specificity == (1.0,)


def test_multi_label_staple_follows_agreement_and_undecided_is_background() -> None:
    # Prepare: three classes, a clear majority everywhere.
    agreed = np.array(
        [
            [[0, 1, 2, 2], [0, 1, 1, 2]],
            [[0, 1, 2, 2], [0, 1, 2, 2]],
            [[0, 2, 2, 1], [0, 1, 1, 2]],
        ]
    )
    # Two raters contradicting each other: every foreground voxel is a tie.
    tied = np.array([[[1, 2]], [[2, 1]]])

    # Execute
    fused = multi_label_staple(agreed)
    undecided = multi_label_staple(tied)

    # Assert
    assert fused.dtype == np.int64
    assert fused.tolist() == [[0, 1, 2, 2], [0, 1, 1, 2]]
    assert undecided.tolist() == [[0, 0]]


def test_multi_label_staple_keeps_3d_shape() -> None:
    # Prepare
    stack = np.zeros((3, 2, 3, 4), dtype=np.int64)
    stack[:, 1, 1:, 2:] = 3

    # Execute
    result = multi_label_staple(stack)

    # Assert
    np.testing.assert_array_equal(result, stack[0])


# ------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: majority_vote(np.zeros((2, 3))), r"labels must have shape .*\(2, 3\)"),
        (lambda: majority_vote(np.zeros((0, 3, 3))), r"labels must not be empty"),
        (lambda: majority_vote(np.full((2, 3, 3), 2)), r"labels must be binary"),
        (lambda: staple(np.full((2, 3, 3), 0.5)), r"labels must be binary"),
        (lambda: multi_label_staple(np.full((2, 3, 3), 300)), r"\[0, 255\]"),
        (lambda: multi_label_staple(np.full((2, 3, 3), 1.5)), r"must be integers"),
    ],
)
def test_bad_inputs_raise_value_error(call: Callable[[], object], message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        call()
