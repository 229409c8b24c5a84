from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.metrics import (
    CaseScores,
    SegmentationScores,
    auroc,
    dice_coefficient,
    dice_score,
    hd95_mm,
    mask_dice,
    score_cases,
    spearman,
)


def square(
    size: int = 40, top: int = 10, left: int = 10, side: int = 20, value: int = 1
) -> torch.Tensor:
    labels = torch.zeros(size, size, dtype=torch.long)
    labels[top : top + side, left : left + side] = value
    return labels


# --- dice_score ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        (square(), square(), 1.0),
        (square(side=10), square(top=25, left=25, side=10), 0.0),  # disjoint
        (square(side=20), square(side=10), 2 * 100 / (400 + 100)),  # nested
        (square(side=10), square(left=15, side=10), 2 * 50 / 200),  # half overlap
        (torch.zeros(8, 8, dtype=torch.long), torch.zeros(8, 8, dtype=torch.long), 1.0),
        (torch.zeros(40, 40, dtype=torch.long), square(), 0.0),  # empty prediction
        (square(), torch.zeros(40, 40, dtype=torch.long), 0.0),  # empty reference
        (
            torch.tensor([[0, 1], [1, 1]]),
            torch.tensor([[0, 1], [0, 1]]),
            0.8,
        ),
    ],
)
def test_dice_score_known_values(
    prediction: torch.Tensor, reference: torch.Tensor, expected: float
) -> None:
    # Execute
    dice = dice_score(prediction, reference, num_classes=2)

    # Assert
    assert dice == pytest.approx(expected)


def test_dice_score_averages_foreground_classes() -> None:
    # Prepare: class 1 matches exactly, class 2 is missed entirely.
    reference = square(side=10) + square(top=25, left=25, side=10, value=2)
    prediction = square(side=10)

    # Execute
    dice = dice_score(prediction, reference, num_classes=3)

    # Assert
    assert dice == pytest.approx(0.5)


def test_dice_score_on_a_volume() -> None:
    # Prepare
    reference = torch.stack([square(side=10), square(side=10)])
    prediction = torch.stack([square(side=10), torch.zeros(40, 40, dtype=torch.long)])

    # Execute
    dice = dice_score(prediction, reference, num_classes=2)

    # Assert: 2 * 100 / (100 + 200)
    assert dice == pytest.approx(2 / 3)


# --- hd95_mm -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "spacing", "expected"),
    [
        (0, (1.0, 1.0), 0.0),
        (1, (1.0, 1.0), 1.0),
        (2, (1.0, 1.0), 2.0),
        (3, (1.0, 1.0), 3.0),
        (2, (2.0, 2.0), 4.0),  # 2 mm spacing doubles the distance
        (3, (2.0, 2.0), 6.0),
        (2, (5.0, 1.5), 3.0),  # only the column spacing matters for a column shift
    ],
)
def test_hd95_of_squares_offset_along_columns(
    offset: int, spacing: tuple[float, float], expected: float
) -> None:
    # Prepare
    reference = square()
    prediction = square(left=10 + offset)

    # Execute
    distance = hd95_mm(prediction, reference, num_classes=2, spacing_mm=spacing)

    # Assert
    assert distance == pytest.approx(expected)


def test_hd95_of_squares_offset_along_rows_uses_row_spacing() -> None:
    # Prepare
    reference = square()
    prediction = square(top=13)

    # Execute
    distance = hd95_mm(prediction, reference, num_classes=2, spacing_mm=(0.5, 4.0))

    # Assert
    assert distance == pytest.approx(1.5)


def test_hd95_on_a_volume_uses_slice_spacing() -> None:
    # Prepare: the same square, one slice further along z.
    empty = torch.zeros(40, 40, dtype=torch.long)
    reference = torch.stack([square(), square(), empty, empty])
    prediction = torch.stack([empty, square(), square(), empty])

    # Execute
    distance = hd95_mm(prediction, reference, num_classes=2, spacing_mm=(3.0, 1.0, 1.0))

    # Assert
    assert distance == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        (torch.zeros(40, 40, dtype=torch.long), square()),
        (square(), torch.zeros(40, 40, dtype=torch.long)),
        (torch.zeros(40, 40, dtype=torch.long), torch.zeros(40, 40, dtype=torch.long)),
    ],
)
def test_hd95_is_nan_when_a_mask_is_empty(
    prediction: torch.Tensor, reference: torch.Tensor
) -> None:
    # Execute
    distance = hd95_mm(prediction, reference, num_classes=2, spacing_mm=(1.0, 1.0))

    # Assert
    assert math.isnan(distance)


# --- score_cases / SegmentationScores ------------------------------------------------


def test_score_cases_groups_slices_per_case() -> None:
    # Prepare: case "a" = slices 0 and 2, case "b" = slice 1, case "c" = slice 3.
    empty = torch.zeros(40, 40, dtype=torch.long)
    labels = torch.stack([square(side=10), square(), square(side=10), square()])
    predictions = torch.stack([square(side=10), square(left=12), empty, empty])
    case_of_slice = torch.tensor([0, 1, 0, 2])

    # Execute
    scores = score_cases(
        predictions,
        labels,
        case_of_slice=case_of_slice,
        case_ids=("a", "b", "c"),
        spacing_mm=((1.0, 1.0, 1.0), (1.0, 2.0, 2.0), (1.0, 1.0, 1.0)),
        num_classes=2,
    )

    # Assert
    assert [case.case_id for case in scores.cases] == ["a", "b", "c"]
    a, b, c = scores.cases
    assert a.dice == pytest.approx(2 * 100 / (100 + 200))  # pooled over 2 slices
    assert b.dice == pytest.approx(2 * 360 / 800)
    # b is scored as a one-slice volume with its own spacing (in-plane 2 mm).
    unit = hd95_mm(predictions[1:2], labels[1:2], num_classes=2, spacing_mm=(1, 1, 1))
    assert 0.0 < unit <= 2.0
    assert b.hd95_mm == pytest.approx(2 * unit)
    assert c.dice == 0.0
    assert math.isnan(c.hd95_mm)
    assert scores.dice == pytest.approx((a.dice + b.dice + c.dice) / 3)
    assert scores.hd95_mm == pytest.approx((a.hd95_mm + b.hd95_mm) / 2)  # nan skipped


def test_score_cases_without_hd95_and_skipping_cases_with_no_slices() -> None:
    # Prepare
    labels = torch.stack([square(), square()])
    case_of_slice = torch.tensor([1, 1])

    # Execute
    scores = score_cases(
        labels,
        labels,
        case_of_slice=case_of_slice,
        case_ids=("absent", "present"),
        spacing_mm=((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
        num_classes=2,
        with_hd95=False,
    )

    # Assert
    assert [case.case_id for case in scores.cases] == ["present"]
    assert scores.cases[0].dice == pytest.approx(1.0)
    assert math.isnan(scores.cases[0].hd95_mm)
    assert math.isnan(scores.hd95_mm)


@pytest.mark.parametrize(
    ("cases", "dice", "hd95"),
    [
        ((), 0.0, math.nan),
        (
            (
                CaseScores(case_id="a", dice=0.5, hd95_mm=2.0),
                CaseScores(case_id="b", dice=1.0, hd95_mm=math.nan),
                CaseScores(case_id="c", dice=0.0, hd95_mm=6.0),
            ),
            0.5,
            4.0,
        ),
        ((CaseScores(case_id="a", dice=0.25, hd95_mm=math.nan),), 0.25, math.nan),
    ],
)
def test_segmentation_scores_means(
    cases: tuple[CaseScores, ...], dice: float, hd95: float
) -> None:
    # Execute
    scores = SegmentationScores(cases=cases)

    # Assert
    assert scores.dice == pytest.approx(dice)
    assert scores.hd95_mm == pytest.approx(hd95, nan_ok=True)


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("scores", "truth", "expected"),
    [
        ([1, 2, NAN, 3, 4], [1, 2, 100, 3, 4], 1.0),
        ([1, 2, 3, 4], [4, 3, NAN, 1], -1.0),
        ([1, 2, 3, INF], [1, 2, 3, 0], 1.0),
        ([1, 3, 2], [1, 2, 3], 0.5),
        ([1, 2], [1, 2], NAN),
        ([1, 2, NAN], [1, 2, 3], NAN),
        ([1, 1, 1, 1], [1, 2, 3, 4], NAN),
        ([1, 2, 3], [5, 5, 5], NAN),
        ([1, 2, 3, 4], [NAN, NAN, NAN, NAN], NAN),
    ],
    ids=[
        "nan-score-ignored",
        "nan-truth-ignored",
        "inf-ignored",
        "partial-order",
        "two-pairs",
        "two-defined-pairs",
        "constant-scores",
        "constant-truth",
        "nothing-defined",
    ],
)
def test_spearman_over_finite_pairs_with_three_at_least(
    scores: list[float], truth: list[float], expected: float
) -> None:
    # Prepare
    pairs = (list(map(float, scores)), list(map(float, truth)))

    # Execute
    result = spearman(*pairs, min_pairs=3)  # as the consensus reply's figures

    # Assert
    if math.isnan(expected):
        assert math.isnan(result)
    else:
        assert result == pytest.approx(expected)


def test_spearman_ranks_ties_by_their_average_and_two_pairs_suffice_by_default() -> (
    None
):
    # Average ranks: [1, 2.5, 2.5] against [1, 2, 3] -> rho = 0.866...
    assert spearman([1.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == pytest.approx(0.8660254)
    assert spearman([1.0, 2.0], [2.0, 1.0]) == pytest.approx(-1.0)


def test_spearman_undefined_value_is_the_callers() -> None:
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], undefined=0.0) == 0.0
    assert math.isnan(spearman([1.0], [1.0]))


# --- auroc ---------------------------------------------------------------------------


def test_auroc_counts_ties_half_against_a_pairwise_count() -> None:
    # Positives 0.8 and 0.4; negatives 0.4, 0.1, 0.9. Pairs won: 0.8 beats 0.4 and
    # 0.1 (2), 0.4 ties 0.4 (0.5) and beats 0.1 (1): 3.5 of 6.
    scores = [0.8, 0.4, 0.4, 0.1, 0.9]
    positive = [True, True, False, False, False]
    assert auroc(scores, positive) == pytest.approx(3.5 / 6)
    assert auroc([-s for s in scores], positive) == pytest.approx(1 - 3.5 / 6)


def test_auroc_is_undefined_with_one_class_and_skips_non_finite_scores() -> None:
    assert math.isnan(auroc([0.1, 0.2], [False, False]))
    assert auroc([0.1, 0.2], [True, True], undefined=0.0) == 0.0
    # The only negative has a nan score: one class is left.
    assert math.isnan(auroc([0.3, math.nan], [True, False]))
    assert auroc([0.3, math.nan, 0.1], [True, False, False]) == 1.0


def test_dice_coefficient_empty_convention_and_smoothing() -> None:
    # Prepare
    empty = torch.zeros(1, 4)
    half = torch.tensor([[1.0, 1.0, 0.0, 0.0]])

    # Execute / Assert: both empty agree (1.0 by default, or the caller's value)
    assert dice_coefficient(empty, empty).tolist() == [1.0]
    assert dice_coefficient(empty, empty, empty=0.0).tolist() == [0.0]
    assert dice_coefficient(half, empty).tolist() == [0.0]
    # smoothing keeps 0/0 defined: (0 + s) / (0 + s) = 1
    assert dice_coefficient(empty, empty, smooth=1e-5).tolist() == [1.0]


def test_mask_dice_equals_dice_score_on_binary_maps() -> None:
    # Prepare
    rng = torch.Generator().manual_seed(0)
    first = torch.rand(3, 8, 8, generator=rng) < 0.4
    second = torch.rand(3, 8, 8, generator=rng) < 0.4

    # Execute
    masks = mask_dice(first.numpy(), second.numpy())
    labels = dice_score(first.long(), second.long(), num_classes=2)

    # Assert
    assert masks == pytest.approx(labels, abs=1e-7)
    assert mask_dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
