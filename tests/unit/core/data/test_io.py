from __future__ import annotations

import dataclasses
import locale
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from core.data.io import (
    Volume,
    VolumeReadError,
    is_volume_path,
    read_volume,
    write_dicom_series,
    write_volume,
)
from core.storage import write_atomically

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_COS, _SIN = math.cos(math.pi / 6), math.sin(math.pi / 6)
# A 30 degree rotation about z: catches readers that drop or transpose the direction.
ROTATED = (_COS, -_SIN, 0.0, _SIN, _COS, 0.0, 0.0, 0.0, 1.0)


def make_volume(
    dtype: type[np.generic] = np.float32, direction: tuple[float, ...] = IDENTITY
) -> Volume:
    array = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 97).astype(dtype)
    return Volume(
        array=array,
        spacing_mm=(0.5, 0.75, 2.5),
        origin_mm=(-10.0, 20.5, 3.25),
        direction=direction,
    )


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize(
    ("dtype", "direction"),
    [(np.float32, IDENTITY), (np.int16, ROTATED), (np.uint8, IDENTITY)],
)
def test_round_trip_keeps_array_and_geometry(
    tmp_path: Path, suffix: str, dtype: type[np.generic], direction: tuple[float, ...]
) -> None:
    # Prepare
    expected = make_volume(dtype, direction)
    path = tmp_path / f"case_0000{suffix}"

    # Execute
    write_volume(expected, path)
    actual = read_volume(path)

    # Assert
    assert actual.array.dtype == expected.array.dtype
    np.testing.assert_array_equal(actual.array, expected.array)
    np.testing.assert_allclose(actual.spacing_mm, expected.spacing_mm, rtol=1e-6)
    np.testing.assert_allclose(actual.origin_mm, expected.origin_mm, atol=1e-5)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=1e-6)
    assert actual.same_geometry(expected)
    assert is_volume_path(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_promotes_2d_image_to_one_slice(tmp_path: Path, suffix: str) -> None:
    # Prepare
    array = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    image = Volume(
        array=array,
        spacing_mm=(0.5, 0.75),  # type: ignore[arg-type]
        origin_mm=(1.0, 2.0),  # type: ignore[arg-type]
        direction=(1.0, 0.0, 0.0, 1.0),
    )
    path = tmp_path / f"slice{suffix}"

    # Execute
    write_volume(image, path)
    actual = read_volume(path)

    # Assert
    assert actual.array.shape == (1, 5, 6)
    np.testing.assert_array_equal(actual.array[0], array)
    np.testing.assert_allclose(actual.spacing_mm, (0.5, 0.75, 1.0), rtol=1e-6)
    np.testing.assert_allclose(actual.origin_mm, (1.0, 2.0, 0.0), atol=1e-6)
    np.testing.assert_allclose(actual.direction, IDENTITY, atol=1e-6)


def test_dicom_series_folder_round_trip(tmp_path: Path) -> None:
    # Prepare
    expected = make_volume(np.int16)
    folder = tmp_path / "case_0000"

    # Execute
    write_dicom_series(expected, folder)
    actual = read_volume(folder)

    # Assert
    assert len(list(folder.glob("*.dcm"))) == 4
    assert is_volume_path(folder)
    assert actual.array.shape == (4, 5, 6)
    np.testing.assert_array_equal(actual.array, expected.array)
    np.testing.assert_allclose(actual.spacing_mm, expected.spacing_mm, rtol=1e-6)
    np.testing.assert_allclose(actual.origin_mm, expected.origin_mm, atol=1e-4)


def test_dicom_series_writing_keeps_the_process_locale(tmp_path: Path) -> None:
    # Prepare: GDCM's writer switches the process to the "C" locale
    before = locale.setlocale(locale.LC_ALL)

    # Execute
    write_dicom_series(make_volume(np.int16), tmp_path / "case_0000")

    # Assert: text files still open in the locale's encoding (UTF-8 here)
    assert locale.setlocale(locale.LC_ALL) == before


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.nii.gz", True),
        ("a.NII", True),
        ("a.nrrd", True),
        ("a.mha", True),
        ("a.mhd", True),
        ("a.zraw", False),
        ("dataset.json", False),
    ],
)
def test_is_volume_path_by_suffix(tmp_path: Path, name: str, expected: bool) -> None:
    # Prepare
    path = tmp_path / name
    path.write_bytes(b"")

    # Execute
    result = is_volume_path(path)

    # Assert
    assert result is expected


def test_is_volume_path_needs_dicom_files_in_a_folder(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")

    # Execute
    result = [is_volume_path(tmp_path / name) for name in ("empty", "notes")]

    # Assert
    assert result == [False, False]


def _truncate(path: Path) -> None:
    write_volume(make_volume(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate_uncompressed(path: Path) -> None:
    """Write ``path`` without compression (a header, then raw voxels); cut it short."""
    volume = dataclasses.replace(make_volume(), array=np.zeros((8, 32, 32), np.float32))
    write_volume(volume, path, compress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _truncate_mhd_data(path: Path) -> None:
    """Write a ``.mhd`` header and its data file; cut the data file short."""
    write_volume(make_volume(), path)
    (data_file,) = (child for child in path.parent.iterdir() if child != path)
    data_file.write_bytes(data_file.read_bytes()[:10])


def _truncate_dicom_slice(folder: Path) -> None:
    write_dicom_series(make_volume(np.int16), folder)
    second = sorted(folder.iterdir())[1]
    second.write_bytes(second.read_bytes()[:-20])


SHORT = "truncated or unreadable image \\(holds \\d+ of the \\d+ data bytes"


@pytest.mark.parametrize(
    ("name", "corrupt", "problem"),
    [
        ("missing.nii.gz", lambda path: None, "file not found"),
        (
            "garbage.nii.gz",
            lambda path: path.write_bytes(b"not an image" * 9),
            "truncated or unreadable image \\(no image reader recognises the file",
        ),
        (
            "garbage.mha",
            lambda path: path.write_bytes(b"\x00\x01" * 50),
            "truncated or unreadable image \\(no image reader recognises the file",
        ),
        (
            "empty.nii",
            lambda path: path.write_bytes(b""),
            "truncated or unreadable image \\(the file is empty\\)",
        ),
        (
            "half.nii.gz",
            _truncate,
            "truncated or unreadable image \\(gzip stream ends early",
        ),
        ("half.nii", _truncate, SHORT),
        ("short.nii", _truncate_uncompressed, SHORT),
        ("half.nrrd", _truncate, "truncated or unreadable image \\(.+\\)"),
        (
            "short.nrrd",
            _truncate_uncompressed,
            "truncated or unreadable image \\(fread",
        ),
        ("half.mha", _truncate, "truncated or unreadable image \\(the header ends"),
        ("short.mha", _truncate_uncompressed, SHORT),
        ("short.mhd", _truncate_mhd_data, SHORT),
        ("no_dicom", lambda path: path.mkdir(), "folder holds no DICOM series"),
        (
            "short_dicom",
            _truncate_dicom_slice,
            "truncated or unreadable image \\(1 of 4 DICOM files could not be read as "
            "slices of the series: slice_0001.dcm\\)",
        ),
    ],
)
def test_bad_file_raises_error_naming_path(
    tmp_path: Path, name: str, corrupt: Callable[[Path], object], problem: str
) -> None:
    # Prepare
    path = tmp_path / name
    corrupt(path)

    # Execute / Assert
    with pytest.raises(VolumeReadError, match=f"^{re.escape(str(path))}: {problem}"):
        read_volume(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, []),
        ({"spacing_mm": (0.5, 0.75, 2.5005)}, []),
        (
            {"spacing_mm": (0.5, 0.75, 3.0)},
            [("spacing", "(0.5, 0.75, 2.5) mm", "(0.5, 0.75, 3) mm")],
        ),
        (
            {"origin_mm": (0.0, 0.0, 0.0)},
            [("origin", "(-10, 20.5, 3.25) mm", "(0, 0, 0) mm")],
        ),
        (
            {"direction": ROTATED},
            [
                (
                    "direction",
                    "(1, 0, 0, 0, 1, 0, 0, 0, 1)",
                    f"({_COS:g}, {-_SIN:g}, 0, {_SIN:g}, {_COS:g}, 0, 0, 0, 1)",
                )
            ],
        ),
        (
            {"array": np.zeros((4, 5, 7), dtype=np.float32)},
            [("size", "(6, 5, 4)", "(7, 5, 4)")],
        ),
    ],
    ids=["same", "within-tolerance", "spacing", "origin", "direction", "size"],
)
def test_geometry_differences_name_each_mismatch(
    change: dict[str, object], expected: list[tuple[str, str, str]]
) -> None:
    # Prepare
    image = make_volume()
    other = dataclasses.replace(image, **change)  # type: ignore[arg-type]

    # Execute
    differences = image.geometry_differences(other)

    # Assert
    assert differences == expected
    assert image.same_geometry(other) is (not expected)
    assert "shape (4, 5, 6) (z, y, x), spacing (0.5, 0.75, 2.5) mm" in (
        image.describe_geometry()
    )


@pytest.mark.parametrize("name", ["case_0000.nii.gz", "case_0000.mhd", "state.json"])
def test_write_atomically_leaves_only_the_finished_file(
    tmp_path: Path, name: str
) -> None:
    # Prepare
    path = tmp_path / "site" / name

    # Execute
    if name.endswith(".json"):
        with write_atomically(path) as temporary:
            temporary.write_text("{}")
    else:
        write_volume(make_volume(), path)

    # Assert
    files = sorted(child.name for child in path.parent.iterdir())
    assert files == ([name, "case_0000.zraw"] if name.endswith(".mhd") else [name])
    assert not [file for file in files if file.startswith(".")]


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "state.json"
    path.write_text("old")

    def write_half() -> None:
        with write_atomically(path) as temporary:
            temporary.write_text("half of the new")
            raise OSError("disk full")

    # Execute
    with pytest.raises(OSError, match="disk full"):
        write_half()

    # Assert
    assert path.read_text() == "old"
    assert [child.name for child in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_keeps_nan_and_inf(
    tmp_path: Path, suffix: str, dtype: type[np.generic]
) -> None:
    # Prepare: ITK's NIfTI reader turns NaN/inf into 0; read_volume must not.
    expected = make_volume(dtype)
    expected.array[0, 0, 0] = np.nan
    expected.array[1, 2, 3] = np.inf
    expected.array[3, 4, 5] = -np.inf
    path = tmp_path / f"case_0000{suffix}"

    # Execute
    write_volume(expected, path)
    actual = read_volume(path)

    # Assert
    assert actual.array.dtype == expected.array.dtype
    np.testing.assert_array_equal(actual.array, expected.array)
