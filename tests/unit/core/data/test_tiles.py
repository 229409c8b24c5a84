"""Slices at the target spacing, tiled and stitched back (core.data.tiles)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import load_default_config
from core.data.dataset import (
    build_slice_set,
    index_site,
    label_slices,
    label_volume_from_slices,
    read_case,
)
from core.data.tiles import (
    classes_on_native_grid,
    cut_tiles,
    gaussian_importance,
    plan_tiling,
    stitch_tiles,
    tile_starts,
)
from core.training.scoring import score_on_native_grid

SPACING = {"data.resample": "spacing", "data.image-size": 32}


def test_tiles_cover_every_pixel_with_half_a_tile_of_overlap() -> None:
    starts = tile_starts(100, 32)

    covered = np.zeros(100, dtype=int)
    for start in starts:
        covered[start : start + 32] += 1

    assert starts[0] == 0
    assert starts[-1] == 100 - 32
    assert covered.min() >= 1
    assert max(b - a for a, b in itertools.pairwise(starts)) == 16


def test_stitching_tiles_of_a_constant_map_gives_it_back() -> None:
    tiling = plan_tiling(2, (50, 70), (1.0, 1.0), target_mm=1.0, size=32)
    values = torch.arange(2 * 50 * 70, dtype=torch.float32).reshape(2, 1, 50, 70)

    stitched = stitch_tiles(cut_tiles(values, tiling), tiling)

    assert stitched.shape == (2, 1, 50, 70)
    assert torch.allclose(stitched, values, atol=1e-3)


def test_the_importance_map_weighs_the_centre_most() -> None:
    weights = gaussian_importance(32)

    assert float(weights[15, 15]) > float(weights[0, 0])
    assert float(weights[0, 0]) > 0


def test_a_label_survives_tiling_and_coming_back_to_its_grid() -> None:
    # Prepare: 1.5 mm slices at a 0.75 mm target (twice the pixels), 32 px tiles
    data = load_default_config(**{**SPACING, "data.spacing-mm": 0.75}).data
    label = np.zeros((4, 64, 48), dtype=np.int64)
    label[1:3, 10:40, 5:30] = 1

    # Execute
    rows = label_slices(label, data=data, spacing_mm=(1.5, 1.5, 3.0))
    tiling = plan_tiling(4, (64, 48), (1.5, 1.5), target_mm=0.75, size=32)
    back = label_volume_from_slices(rows, label.shape, data=data, tiling=tiling)

    # Assert: 128 x 96 at 0.75 mm gives 7 x 5 tiles per slice
    assert rows.shape == (4 * 35, 32, 32)
    assert (back == label).all()


def test_a_spacing_far_finer_than_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match=r"data.spacing-mm 0.1 would resample"):
        plan_tiling(1, (64, 64), (1.5, 1.5), target_mm=0.1, size=32)


def test_no_target_spacing_is_refused_naming_the_key(federation: Path) -> None:
    data = load_default_config(**SPACING).data
    with pytest.raises(ValueError, match=r"data.spacing-mm is 0 and no plan"):
        build_slice_set(
            index_site(federation / "A").evaluation, data=data, with_labels=True
        )


def test_tiled_evaluation_scores_the_reference_perfectly_on_the_native_grid(
    federation: Path,
) -> None:
    # Prepare: the evaluation labels as the "prediction", tiled at 1.0 mm
    config = load_default_config(**{**SPACING, "data.spacing-mm": 1.0})
    cases = index_site(federation / "A").evaluation
    slices = build_slice_set(cases, data=config.data, with_labels=True)
    assert slices.labels is not None
    assert slices.tilings is not None

    # Execute
    references = [read_case(case, num_classes=2) for case in cases]
    scores = score_on_native_grid(slices.labels, slices, references, config)

    # Assert: 64 px at 1.5 mm -> 96 px at 1.0 mm, 5 x 5 tiles of 32 per slice
    assert slices.images.shape[1:] == (1, 32, 32)
    assert slices.tilings[0].num_rows == 10 * 25
    assert slices.spacing_mm[0] == (3.0, 1.0, 1.0)
    assert scores.dice == pytest.approx(1.0, abs=0.01)
    assert scores.hd95_mm < 1.6


def test_blended_classes_take_the_centre_tiles_vote() -> None:
    tiling = plan_tiling(1, (48, 48), (1.0, 1.0), target_mm=1.0, size=32)
    rows = torch.zeros((tiling.num_rows, 32, 32), dtype=torch.int64)
    rows[0] = 1  # only the first tile says foreground, over its whole area

    classes = classes_on_native_grid(rows, tiling, num_classes=2)

    assert classes.shape == (1, 48, 48)
    assert int(classes[0, 5, 5]) == 1  # only the first tile covers this corner
    assert int(classes[0, 40, 40]) == 0
