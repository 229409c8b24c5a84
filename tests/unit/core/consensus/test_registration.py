from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk  # noqa: N813 - the library's own spelling

from core.consensus.registration import (
    Atlas,
    RegistrationError,
    RegistrationSettings,
    index_atlases,
    read_atlas,
    register_atlas,
    transfer_atlas_labels,
    transfer_label,
)
from core.data.dataset import SiteDataError
from core.data.io import Volume, write_volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SPACING_MM = (1.0, 1.0, 2.0)
ORIGIN_MM = (-30.0, 12.0, 5.0)
SHAPE = (8, 64, 64)  # (Z, Y, X)
SETTINGS = RegistrationSettings()


def make_blob(
    center: tuple[float, float, float],
    radii: tuple[float, float, float],
    *,
    angle: float = 0.0,
    invert: bool = False,
) -> tuple[Volume, Volume]:
    """An ellipsoid (label 1) with a bright core and a faint ring, on a SHAPE grid."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in SHAPE), indexing="ij")
    dy, dx = y - center[1], x - center[2]
    along = math.cos(angle) * dx + math.sin(angle) * dy
    across = -math.sin(angle) * dx + math.cos(angle) * dy
    radius = (
        ((z - center[0]) / radii[0]) ** 2
        + (across / radii[1]) ** 2
        + (along / radii[2]) ** 2
    )
    image = np.exp(-0.7 * radius) + 0.3 * np.exp(-((radius - 2.5) ** 2))
    if invert:
        image = 1.0 - image
    label = (radius <= 1.0).astype(np.uint8)
    return (
        Volume(image.astype(np.float32), SPACING_MM, ORIGIN_MM, IDENTITY),
        Volume(label, SPACING_MM, ORIGIN_MM, IDENTITY),
    )


def dice(first: npt.NDArray[np.generic], second: npt.NDArray[np.generic]) -> float:
    inside, other = np.asarray(first) > 0, np.asarray(second) > 0
    return float(2 * (inside & other).sum() / (inside.sum() + other.sum()))


def one_slice(volume: Volume, index: int = 3) -> Volume:
    return dataclasses.replace(volume, array=volume.array[index : index + 1])


@pytest.fixture(scope="module")
def fixed() -> tuple[Volume, Volume]:
    return make_blob((3.5, 32.0, 32.0), (3.0, 14.0, 10.0))


@pytest.fixture(scope="module")
def moving() -> tuple[Volume, Volume]:
    # Shifted, scaled and rotated a little, and in the opposite contrast.
    return make_blob((4.0, 29.0, 36.0), (3.2, 15.5, 11.0), angle=0.2, invert=True)


def test_registration_across_contrasts_beats_identity(
    fixed: tuple[Volume, Volume], moving: tuple[Volume, Volume]
) -> None:
    # Arrange
    fixed_image, fixed_label = fixed
    moving_image, moving_label = moving
    unregistered = dice(fixed_label.array, moving_label.array)

    # Act
    labels = transfer_atlas_labels(
        fixed_image,
        [Atlas(case_id="atlas1", image=moving_image, label=moving_label)],
        settings=SETTINGS,
    )

    # Assert
    assert len(labels) == 1
    result = labels[0]
    assert result.atlas_id == "atlas1"
    assert result.label.shape == SHAPE
    assert result.label.dtype == np.int64
    assert math.isfinite(result.metric)
    assert result.seconds > 0
    registered = dice(fixed_label.array, result.label)
    assert registered > 0.8
    assert registered > unregistered + 0.1


def test_registration_in_2d(
    fixed: tuple[Volume, Volume], moving: tuple[Volume, Volume]
) -> None:
    # Arrange
    fixed_image, fixed_label = map(one_slice, fixed)
    moving_image, moving_label = map(one_slice, moving)
    unregistered = dice(fixed_label.array, moving_label.array)

    # Act
    transform = register_atlas(fixed_image, moving_image, settings=SETTINGS)
    result = transfer_label(moving_label, transform, fixed_image)

    # Assert
    assert transform.GetDimension() == 2
    assert result.array.shape == (1, 64, 64)
    registered = dice(fixed_label.array, result.array)
    assert registered > 0.8
    assert registered > unregistered + 0.1


def test_transfer_atlas_labels_reports_progress_per_atlas(
    fixed: tuple[Volume, Volume], moving: tuple[Volume, Volume]
) -> None:
    # Arrange
    fixed_image = one_slice(fixed[0])
    atlases = [
        Atlas(case_id=name, image=one_slice(moving[0]), label=one_slice(moving[1]))
        for name in ("a", "b")
    ]
    calls: list[tuple[int, int, str]] = []

    # Act
    labels = transfer_atlas_labels(
        fixed_image,
        atlases,
        settings=SETTINGS,
        progress=lambda done, total, name: calls.append((done, total, name)),
    )

    # Assert
    assert [label.atlas_id for label in labels] == ["a", "b"]
    assert calls == [(1, 2, "a"), (2, 2, "b")]


def test_transfer_label_keeps_target_grid_and_integer_labels() -> None:
    # Arrange: the atlas label lies on another grid (spacing, origin, 3 classes).
    label_array = np.zeros((6, 20, 30), dtype=np.uint8)
    label_array[1:5, 4:16, 5:15] = 1
    label_array[1:5, 4:16, 15:25] = 2
    atlas_label = Volume(label_array, (2.0, 2.0, 4.0), (-5.0, -5.0, -2.0), IDENTITY)
    reference = Volume(
        np.zeros((10, 40, 50), dtype=np.float32),
        (1.5, 1.0, 2.5),
        (-10.0, -8.0, -4.0),
        IDENTITY,
    )
    transform = sitk.Transform(3, sitk.sitkIdentity)

    # Act
    result = transfer_label(atlas_label, transform, reference)

    # Assert
    assert result.array.shape == reference.array.shape
    assert result.spacing_mm == reference.spacing_mm
    assert result.origin_mm == reference.origin_mm
    assert result.direction == reference.direction
    assert result.array.dtype == np.int64
    assert set(np.unique(result.array).tolist()) == {0, 1, 2}


def test_constant_image_is_a_registration_error(
    fixed: tuple[Volume, Volume],
) -> None:
    # Arrange
    constant = dataclasses.replace(fixed[0], array=np.ones(SHAPE, np.float32))

    # Act / Assert
    with pytest.raises(RegistrationError, match=r"atlas A: constant intensity"):
        register_atlas(fixed[0], constant, settings=SETTINGS, moving_name="atlas A")


def test_degenerate_overlap_is_a_registration_error_naming_both_images(
    fixed: tuple[Volume, Volume],
) -> None:
    # Arrange: a 3 x 3 x 2 voxel image cannot cover the target at any resolution.
    tiny = np.zeros((2, 3, 3), dtype=np.float32)
    tiny[0, 0, 0] = 1.0
    moving_image = Volume(tiny, (0.1, 0.1, 0.1), (0.0, 0.0, 0.0), IDENTITY)

    # Act / Assert
    with pytest.raises(
        RegistrationError,
        match=r"affine registration of atlas A onto target T failed: \S",
    ):
        register_atlas(
            fixed[0],
            moving_image,
            settings=SETTINGS,
            fixed_name="target T",
            moving_name="atlas A",
        )


def test_2d_against_3d_is_a_registration_error(
    fixed: tuple[Volume, Volume],
) -> None:
    # Act / Assert
    with pytest.raises(RegistrationError, match=r"one is 2-D and the other 3-D"):
        register_atlas(fixed[0], one_slice(fixed[0]), settings=SETTINGS)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("histogram_bins", 1, "histogram_bins must be >= 2"),
        ("sampling_percentage", 0.0, r"sampling_percentage must be in \(0, 1\]"),
        ("bspline_mesh_size", 0, "bspline_mesh_size must be >= 1"),
        ("smoothing_sigmas_voxels", (1.0,), "one per shrink factor"),
    ],
)
def test_settings_reject_bad_values(field: str, value: object, message: str) -> None:
    # Act / Assert
    with pytest.raises(ValueError, match=message):
        RegistrationSettings(**{field: value})  # type: ignore[arg-type]


def write_atlas(site: Path, case_id: str, *, with_label: bool = True) -> None:
    image, label = make_blob((3.5, 32.0, 32.0), (3.0, 14.0, 10.0))
    write_volume(image, site / "atlases" / "imagesTr" / f"{case_id}_0000.nii.gz")
    if with_label:
        write_volume(label, site / "atlases" / "labelsTr" / f"{case_id}.nii.gz")


def test_index_atlases_finds_cases_and_reads_them(tmp_path: Path) -> None:
    # Arrange
    for case_id in ("atlas_002", "atlas_001"):
        write_atlas(tmp_path, case_id)

    # Act
    cases = index_atlases(tmp_path)
    atlas = read_atlas(cases[0], num_classes=2)

    # Assert
    assert [case.case_id for case in cases] == ["atlas_001", "atlas_002"]
    assert cases[0].label_path == tmp_path / "atlases/labelsTr/atlas_001.nii.gz"
    assert atlas.case_id == "atlas_001"
    assert atlas.image.origin_mm == pytest.approx(ORIGIN_MM)
    assert atlas.label.array.dtype == np.int64
    assert int(atlas.label.array.max()) == 1


def test_index_atlases_without_folder_is_empty(tmp_path: Path) -> None:
    # Act / Assert
    assert index_atlases(tmp_path) == ()


def test_index_atlases_names_the_image_without_label(tmp_path: Path) -> None:
    # Arrange
    write_atlas(tmp_path, "atlas_001")
    write_atlas(tmp_path, "atlas_002", with_label=False)

    # Act / Assert
    with pytest.raises(SiteDataError, match=r"atlas_002_0000\.nii\.gz: atlas image"):
        index_atlases(tmp_path)
