"""Controlled noisy labels: each corruption does what it says, with its true Dice."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from core.consensus.noisy_labels import (
    DEFAULT_RECIPE,
    Corruption,
    build_noisy_label_set,
    corrupt_label,
)
from core.metrics import mask_dice


def disc(
    size: int = 32, radius: int = 8, centre: tuple[int, int] = (16, 16)
) -> npt.NDArray[np.bool_]:
    rows, cols = np.ogrid[:size, :size]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_erosion_and_dilation_shrink_and_grow_the_label(
    rng: np.random.Generator,
) -> None:
    # Prepare
    clean = disc()

    # Execute
    eroded = corrupt_label(clean, Corruption.ERODE, 0.5, rng)
    dilated = corrupt_label(clean, Corruption.DILATE, 0.5, rng)

    # Assert: radius 2 each way, nested around the clean disc
    assert eroded.sum() < clean.sum() < dilated.sum()
    assert not (eroded & ~clean).any()
    assert not (clean & ~dilated).any()


def test_stronger_levels_lower_the_dice(rng: np.random.Generator) -> None:
    # Prepare
    clean = disc()

    # Execute / Assert
    for corruption in (Corruption.ERODE, Corruption.SHIFT, Corruption.ELASTIC):
        mild = mask_dice(corrupt_label(clean, corruption, 0.2, rng), clean)
        severe = mask_dice(corrupt_label(clean, corruption, 1.0, rng), clean)
        assert severe < mild < 1.0, corruption


def test_shift_moves_the_label_without_changing_its_size(
    rng: np.random.Generator,
) -> None:
    # Prepare
    clean = disc()

    # Execute
    shifted = corrupt_label(clean, Corruption.SHIFT, 0.5, rng)

    # Assert: 4 px at level 0.5 on a 32-px image; the disc stays inside
    assert shifted.sum() == pytest.approx(clean.sum(), rel=0.1)
    assert mask_dice(shifted, clean) < 0.9


def test_empty_and_swap(rng: np.random.Generator) -> None:
    # Prepare
    clean, other = disc(), disc(centre=(8, 8), radius=4)

    # Execute
    empty = corrupt_label(clean, Corruption.EMPTY, 1.0, rng)
    swapped = corrupt_label(clean, Corruption.SWAP, 1.0, rng, swap_with=other)

    # Assert
    assert not empty.any()
    np.testing.assert_array_equal(swapped, other)


def test_elastic_works_in_3d(rng: np.random.Generator) -> None:
    # Prepare
    clean = np.stack([disc()] * 6)

    # Execute
    warped = corrupt_label(clean, Corruption.ELASTIC, 1.0, rng)

    # Assert
    assert warped.shape == clean.shape
    assert 0.3 < mask_dice(warped, clean) < 1.0


def test_noisy_label_set_records_true_dice_and_shuffles(
    rng: np.random.Generator,
) -> None:
    # Prepare
    clean = [disc(), disc(centre=(12, 18)), disc(radius=6)]

    # Execute
    noisy = build_noisy_label_set(clean, seed=1)

    # Assert
    assert [len(labels) for labels in noisy] == [len(DEFAULT_RECIPE) + 1] * 3
    for index, labels in enumerate(noisy):
        for label in labels:
            assert label.image == index
            assert label.true_dice == pytest.approx(mask_dice(label.mask, clean[index]))
    kinds = {label.corruption for labels in noisy for label in labels}
    assert {Corruption.EMPTY, Corruption.SWAP} <= kinds
    positions = [
        [label.corruption for label in labels].index(Corruption.ERODE)
        for labels in noisy
    ]
    assert len(set(positions)) > 1  # shuffled per image
    again = build_noisy_label_set(clean, seed=1)
    assert [[n.true_dice for n in labels] for labels in again] == [
        [n.true_dice for n in labels] for labels in noisy
    ]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: corrupt_label(
                disc(), Corruption.ERODE, 0.0, np.random.default_rng()
            ),
            r"level must be in \(0, 1\], got 0.0",
        ),
        (
            lambda: corrupt_label(
                disc().astype(int) * 2, Corruption.ERODE, 0.5, np.random.default_rng()
            ),
            "label must be binary",
        ),
        (
            lambda: corrupt_label(
                disc(), Corruption.SWAP, 1.0, np.random.default_rng()
            ),
            r"SWAP needs swap_with of shape \(32, 32\), got None",
        ),
        (
            lambda: build_noisy_label_set([disc()], seed=0),
            "need at least 2 clean labels, got 1",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
