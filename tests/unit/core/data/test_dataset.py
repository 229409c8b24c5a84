from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

import core.data.dataset
from core.config import DataConfig, SliceAxis, load_default_config
from core.data.dataset import (
    CaseRecord,
    CaseSplit,
    SiteDataError,
    SiteIndex,
    build_slice_set,
    cut_slices,
    index_site,
    list_site_dirs,
    normalise_intensity,
    read_case,
    read_federation_target,
    validate_site,
)
from core.data.io import Volume, write_dicom_series, write_volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SHAPE = (6, 12, 10)  # (z, y, x)
SPACING = (0.5, 0.75, 2.0)  # (x, y, z) mm


def make_image(shape: tuple[int, int, int] = SHAPE) -> npt.NDArray[np.float32]:
    depth, height, width = shape
    grid = np.mgrid[0:depth, 0:height, 0:width].astype(np.float32)
    return 100.0 + 10.0 * grid[0] + grid[1] - 0.5 * grid[2]


def make_label(shape: tuple[int, int, int] = SHAPE) -> npt.NDArray[np.uint8]:
    label = np.zeros(shape, dtype=np.uint8)
    label[1:3, 2:6, 3:8] = 1  # 2 * 4 * 5 = 40 foreground voxels
    return label


def write(
    path: Path,
    array: npt.NDArray[np.generic],
    spacing: tuple[float, float, float] = SPACING,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Path:
    volume = Volume(
        array=array, spacing_mm=spacing, origin_mm=origin, direction=IDENTITY
    )
    write_volume(volume, path)
    return path


def make_site(root: Path, name: str = "site_a") -> Path:
    """Write a small site: 3 labelled (one DICOM), 1 unlabelled, 1 evaluation case."""
    site = root / name
    for case_id in ("case_001", "case_002"):
        write(site / "imagesTr" / f"{case_id}_0000.nii.gz", make_image())
        write(site / "labelsTr" / f"{case_id}.nii.gz", make_label())
    # A second channel is ignored: only _0000 is used.
    write(site / "imagesTr" / "case_001_0001.nii.gz", make_image())
    write(
        site / "imagesTr" / "case_003_0000.nrrd",
        make_image((4, 12, 10)),
        (1.0, 1.0, 3.0),
    )
    dicom = Volume(
        array=make_image().astype(np.int16),
        spacing_mm=SPACING,
        origin_mm=(0.0, 0.0, 0.0),
        direction=IDENTITY,
    )
    write_dicom_series(dicom, site / "imagesTr" / "case_004_0000")
    write(site / "labelsTr" / "case_004.nii.gz", make_label())
    write(site / "imagesTs" / "case_101_0000.nii.gz", make_image())
    write(site / "labelsTs" / "case_101.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    write(site / "imagesTs" / "case_102_0000.nii.gz", make_image())  # no label
    document = {
        "name": "A",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "prostate"},
    }
    (site / "dataset.json").write_text(json.dumps(document))
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good site, shared read-only by the tests that do not break it."""
    return make_site(tmp_path_factory.mktemp("federation"))


def data_config(**overrides: int | str) -> DataConfig:
    flat = {
        "data.image-size": 16,
        "data.slice-axis": "z",
        "data.num-classes": 2,
        "data.max-slices-per-case": 0,
        **overrides,
    }
    return load_default_config(**flat).data


def error_at(path: Path, problem: str) -> str:
    """A regex requiring the message to name ``path`` and then ``problem``."""
    return f"{re.escape(str(path))}.*{problem}"


# --- index_site -----------------------------------------------------------------------


def test_index_site_finds_cases_by_split(site: Path) -> None:
    # Execute
    index = index_site(site)

    # Assert
    assert index.name == "site_a"
    assert index.root == site
    assert index.modality == "MRI"
    assert index.class_names == ("background", "prostate")
    assert [case.case_id for case in index.labelled] == [
        "case_001",
        "case_002",
        "case_004",
    ]
    assert [case.case_id for case in index.unlabelled] == ["case_003"]
    assert [case.case_id for case in index.evaluation] == ["case_101"]
    assert index.num_cases == 5
    assert {case.split for case in index.labelled + index.unlabelled} == {
        CaseSplit.TRAIN
    }
    assert index.evaluation[0].split is CaseSplit.EVALUATION
    assert index.labelled[0].image_path == site / "imagesTr" / "case_001_0000.nii.gz"
    assert index.labelled[0].label_path == site / "labelsTr" / "case_001.nii.gz"
    assert index.unlabelled[0].label_path is None


def test_label_free_views_hold_every_image_in_case_id_order(site: Path) -> None:
    # Execute
    index = index_site(site)

    # Assert: labels decide neither which images nor their order
    assert [case.case_id for case in index.training_images] == [
        "case_001",
        "case_002",
        "case_003",
        "case_004",
    ]
    assert [case.case_id for case in index.evaluation_images] == [
        "case_101",
        "case_102",
    ]
    assert index.evaluation_images[1].label_path is None
    assert index.evaluation_images[0] == index.evaluation[0]


def test_index_site_finds_dicom_folder_case(site: Path) -> None:
    # Execute
    index = index_site(site)

    # Assert
    dicom_case = index.labelled[2]
    assert dicom_case.image_path == site / "imagesTr" / "case_004_0000"
    assert dicom_case.image_path.is_dir()


@pytest.mark.parametrize(
    ("document", "modality", "class_names"),
    [
        (None, "unknown", ("background", "foreground")),
        ({"name": "B"}, "unknown", ("background", "foreground")),
        (
            {"modality": "CT", "labels": {"1": "liver", "0": "bg"}},
            "CT",
            ("bg", "liver"),
        ),
        ({"modality": {"0": "T2"}}, "T2", ("background", "foreground")),
        (  # nnU-Net v2 spelling
            {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1}},
            "MRI",
            ("background", "organ"),
        ),
    ],
)
def test_index_site_reads_dataset_json(
    tmp_path: Path,
    document: dict[str, object] | None,
    modality: str,
    class_names: tuple[str, ...],
) -> None:
    # Prepare
    write(tmp_path / "site" / "imagesTr" / "a_0000.nii.gz", make_image())
    if document is not None:
        (tmp_path / "site" / "dataset.json").write_text(json.dumps(document))

    # Execute
    index = index_site(tmp_path / "site")

    # Assert
    assert index.modality == modality
    assert index.class_names == class_names
    assert [case.case_id for case in index.unlabelled] == ["a"]


def _write_text(relative: str, text: str) -> Callable[[Path], Path]:
    def breaker(site: Path) -> Path:
        path = site / relative
        path.write_text(text)
        return path

    return breaker


def _write_image(relative: str) -> Callable[[Path], Path]:
    def breaker(site: Path) -> Path:
        return write(site / relative, make_label())

    return breaker


def _remove_folder(relative: str) -> Callable[[Path], Path]:
    def breaker(site: Path) -> Path:
        shutil.rmtree(site / relative)
        return site / relative

    return breaker


def _empty_site(site: Path) -> Path:
    for relative in ("imagesTs", "labelsTs", "labelsTr", "imagesTr"):
        _remove_folder(relative)(site)
    (site / "imagesTr").mkdir()
    return site


def _empty_site_folder(site: Path) -> Path:
    shutil.rmtree(site)
    (site / ".sitebridge").mkdir(parents=True)  # the default state folder is not data
    return site


def _site_is_a_file(site: Path) -> Path:
    shutil.rmtree(site)
    site.write_text("not a folder")
    return site


@pytest.mark.parametrize(
    ("breaker", "problem"),
    [
        (lambda site: site.parent / "absent", "site folder not found"),
        (_site_is_a_file, "is not a folder"),
        (_remove_folder("imagesTr"), "missing; a site needs imagesTr"),
        (_empty_site, "empty site, no cases in imagesTr"),
        (_empty_site_folder, "empty site folder; a site needs imagesTr"),
        (
            _write_image("labelsTr/case_999.nii.gz"),
            "label has no matching image case_999",
        ),
        (_write_image("labelsTs/case_102_0000.nii.gz"), "label has no matching image"),
        (_write_image("imagesTr/case_005.nii.gz"), "lacks a channel suffix"),
        (
            _write_image("imagesTr/case_001_0000.nrrd"),
            "second image for case 'case_001'",
        ),
        (_write_text("dataset.json", "{not json"), "malformed dataset.json"),
        (_write_text("dataset.json", "[1, 2]"), "malformed dataset.json"),
        (
            _write_text("dataset.json", '{"labels": ["background", "organ"]}'),
            "malformed dataset.json \\(labels must be a non-empty mapping",
        ),
        (
            _write_text("dataset.json", '{"labels": {"0": "bg", "2": "organ"}}'),
            "malformed dataset.json \\(label classes must be 0..N-1",
        ),
    ],
    ids=[
        "missing",
        "not-a-folder",
        "no-imagesTr",
        "empty",
        "empty-folder",
        "orphan-labelsTr",
        "orphan-labelsTs",
        "no-channel-suffix",
        "duplicate-image",
        "invalid-json",
        "json-not-object",
        "labels-not-mapping",
        "labels-gap",
    ],
)
def test_index_site_rejects_bad_site(
    tmp_path: Path, breaker: Callable[[Path], Path], problem: str
) -> None:
    # Prepare
    site = make_site(tmp_path)
    offending = breaker(site)

    # Execute / Assert
    with pytest.raises(SiteDataError, match=error_at(offending, problem)):
        index_site(offending if offending.parent == tmp_path else site)


# --- read_case ------------------------------------------------------------------------


def test_read_case_returns_float_image_and_int_label(site: Path) -> None:
    # Prepare
    case = index_site(site).labelled[0]

    # Execute
    loaded = read_case(case, num_classes=2)

    # Assert
    assert loaded.case_id == "case_001"
    assert loaded.image.dtype == np.float32
    assert loaded.image.shape == SHAPE
    np.testing.assert_allclose(loaded.image, make_image())
    assert loaded.label is not None
    assert loaded.label.dtype == np.int64
    np.testing.assert_array_equal(loaded.label, make_label())
    np.testing.assert_allclose(loaded.spacing_mm, SPACING)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _with_nan(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    image[0, 0, 0] = np.nan
    return image


def _with_infs(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    image[1, 2, 3] = np.inf
    image[2, 2, 3] = -np.inf
    return image


def _label_with(value: float, dtype: type[np.generic]) -> npt.NDArray[np.generic]:
    label = make_label().astype(dtype)
    label[0, 0, 0] = value
    return label


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        pytest.param(_truncate, "unreadable image", id="truncated"),
        pytest.param(lambda path: path.unlink(), "file not found", id="missing"),
        pytest.param(
            lambda path: write(path, _with_nan(make_image())),
            "contains 1 NaN/inf voxels",
            id="nan",
        ),
        pytest.param(
            lambda path: write(path, _with_infs(make_image())),
            "contains 2 NaN/inf voxels",
            id="inf",
        ),
    ],
)
def test_read_case_rejects_bad_image(
    tmp_path: Path, damage: Callable[[Path], object], problem: str
) -> None:
    # Prepare
    image_path = write(tmp_path / "imagesTr" / "a_0000.nii.gz", make_image())
    damage(image_path)
    case = CaseRecord(
        case_id="a", image_path=image_path, label_path=None, split=CaseSplit.TRAIN
    )

    # Execute / Assert
    with pytest.raises(SiteDataError, match=error_at(image_path, problem)):
        read_case(case, num_classes=2)


def _labelled_case(
    folder: Path,
    label: npt.NDArray[np.generic],
    spacing: tuple[float, float, float] = SPACING,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> CaseRecord:
    return CaseRecord(
        case_id="a",
        image_path=write(folder / "imagesTr" / "a_0000.nii.gz", make_image()),
        label_path=write(folder / "labelsTr" / "a.nii.gz", label, spacing, origin),
        split=CaseSplit.TRAIN,
    )


@pytest.mark.parametrize(
    ("label", "spacing", "origin", "described"),
    [
        pytest.param(
            make_label(),
            (0.5, 0.75, 3.0),
            (0.0, 0.0, 0.0),
            "image spacing (0.5, 0.75, 2) mm != label spacing (0.5, 0.75, 3) mm",
            id="spacing",
        ),
        pytest.param(
            make_label(),
            SPACING,
            (0.0, 5.0, 0.0),
            "image origin (0, 0, 0) mm != label origin (0, 5, 0) mm",
            id="origin",
        ),
        pytest.param(
            make_label((6, 12, 11)),
            SPACING,
            (0.0, 0.0, 0.0),
            "image size (10, 12, 6) != label size (11, 12, 6)",
            id="size",
        ),
        pytest.param(
            make_label((5, 12, 10)),
            (1.0, 0.75, 2.0),
            (0.0, 0.0, 0.0),
            "image size (10, 12, 6) != label size (10, 12, 5); "
            "image spacing (0.5, 0.75, 2) mm != label spacing (1, 0.75, 2) mm",
            id="size-and-spacing",
        ),
    ],
)
def test_read_case_rejects_label_geometry_mismatch(
    tmp_path: Path,
    label: npt.NDArray[np.generic],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    described: str,
) -> None:
    # Prepare
    case = _labelled_case(tmp_path, label, spacing, origin)
    assert case.label_path is not None
    expected = (
        f"geometry mismatch between image {case.image_path} and label "
        f"{case.label_path}: {described}"
    )

    # Execute / Assert
    with pytest.raises(SiteDataError, match=f"^{re.escape(expected)}$"):
        read_case(case, num_classes=2)


@pytest.mark.parametrize(
    ("label", "problem"),
    [
        pytest.param(
            _label_with(3, np.uint8),
            "labels outside the declared classes 0..1: found \\[3\\]",
            id="class-3",
        ),
        pytest.param(
            _label_with(-1, np.int16),
            "labels outside the declared classes 0..1: found \\[-1\\]",
            id="negative",
        ),
        pytest.param(
            _label_with(0.5, np.float32),
            "non-integer label values \\(found \\[0.5\\]\\)",
            id="fraction",
        ),
        pytest.param(
            _label_with(np.nan, np.float32), "non-integer label values", id="nan"
        ),
    ],
)
def test_read_case_rejects_bad_label_values(
    tmp_path: Path, label: npt.NDArray[np.generic], problem: str
) -> None:
    # Prepare
    case = _labelled_case(tmp_path, label)
    assert case.label_path is not None

    # Execute / Assert
    with pytest.raises(SiteDataError, match=error_at(case.label_path, problem)):
        read_case(case, num_classes=2)


def test_read_case_accepts_float_label_with_integer_values(tmp_path: Path) -> None:
    # Prepare
    image_path = write(tmp_path / "a_0000.nii.gz", make_image())
    label_path = write(tmp_path / "a.nii.gz", make_label().astype(np.float32))
    case = CaseRecord(
        case_id="a", image_path=image_path, label_path=label_path, split=CaseSplit.TRAIN
    )

    # Execute
    loaded = read_case(case, num_classes=2)

    # Assert
    assert loaded.label is not None
    np.testing.assert_array_equal(loaded.label, make_label())


def test_read_case_rejects_zero_voxel_volume(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: SimpleITK refuses to write an empty image, so the reader is faked.
    empty = Volume(
        array=np.zeros((0, 4, 4), dtype=np.float32),
        spacing_mm=SPACING,
        origin_mm=(0.0, 0.0, 0.0),
        direction=IDENTITY,
    )
    monkeypatch.setattr(core.data.dataset, "read_volume", lambda path: empty)
    image_path = tmp_path / "a_0000.nii.gz"
    case = CaseRecord(
        case_id="a", image_path=image_path, label_path=None, split=CaseSplit.TRAIN
    )

    # Execute / Assert
    with pytest.raises(
        SiteDataError, match=error_at(image_path, "image has zero voxels")
    ):
        read_case(case, num_classes=2)


# --- validate_site --------------------------------------------------------------------


def test_validate_site_summarises_every_case(site: Path) -> None:
    # Prepare
    index = index_site(site)

    # Execute
    summary = validate_site(index, num_classes=2)

    # Assert
    assert (summary.name, summary.modality) == ("site_a", "MRI")
    assert summary.class_names == ("background", "prostate")
    assert summary.num_classes == 2
    assert (summary.labelled, summary.unlabelled, summary.evaluation) == (3, 1, 1)
    assert summary.shapes == ((4, 12, 10), (6, 12, 10))
    np.testing.assert_allclose(summary.spacing_min_mm, (0.5, 0.75, 2.0))
    np.testing.assert_allclose(summary.spacing_max_mm, (1.0, 1.0, 3.0))
    # make_image spans 100 - 0.5 * 9 = 95.5 (x = 9) to 100 + 10 * 5 + 11 = 161; the
    # DICOM case stores int16, so its 95.5 is 95.
    assert (summary.intensity_min, summary.intensity_max) == (95.0, 161.0)
    # Three labels with 40 of 720 voxels set, one empty evaluation label.
    assert summary.label_voxels == (4 * 720 - 3 * 40, 3 * 40)
    assert summary.foreground_fraction == pytest.approx(3 * 40 / 720 / 4)
    assert summary.to_lines() == [
        "site site_a (MRI)",
        "  cases: 3 labelled, 1 unlabelled, 1 evaluation",
        "  classes (dataset.json): 0 background, 1 prostate; labels checked against "
        "0..1",
        "  image shapes (z, y, x): 4x12x10, 6x12x10",
        "  spacing (x, y, z) mm: 0.5-1, 0.75-1, 2-3",
        "  intensity range: 95 to 161",
        "  label voxels per class: 0: 2760 (95.83%), 1: 120 (4.17%)",
        "  foreground fraction: 4.17%",
    ]


def test_validate_site_checks_evaluation_cases(tmp_path: Path) -> None:
    # Prepare
    site = make_site(tmp_path)
    bad_label = write(site / "labelsTs" / "case_101.nii.gz", _label_with(3, np.uint8))
    index = index_site(site)

    # Execute / Assert
    with pytest.raises(
        SiteDataError, match=error_at(bad_label, "outside the declared classes")
    ):
        validate_site(index, num_classes=2)


def test_validate_site_rejects_site_without_cases(tmp_path: Path) -> None:
    # Prepare
    index = SiteIndex(
        name="empty",
        root=tmp_path,
        modality="CT",
        class_names=("background", "foreground"),
        labelled=(),
        unlabelled=(),
        evaluation=(),
    )

    # Execute / Assert
    with pytest.raises(SiteDataError, match=error_at(tmp_path, "empty site")):
        validate_site(index, num_classes=2)


# --- slices ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        np.arange(60, dtype=np.float32).reshape(3, 4, 5) * 7.0 + 300.0,
        make_image(),
    ],
)
def test_normalise_intensity_gives_zero_mean_unit_std(
    image: npt.NDArray[np.float32],
) -> None:
    # Execute
    result = normalise_intensity(image)

    # Assert
    assert result.dtype == np.float32
    assert result.shape == image.shape
    assert float(result.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(result.std()) == pytest.approx(1.0, abs=1e-5)


def test_normalise_intensity_of_constant_volume_only_subtracts_mean() -> None:
    # Execute
    result = normalise_intensity(np.full((2, 3, 4), 5.0, dtype=np.float32))

    # Assert
    np.testing.assert_array_equal(result, np.zeros((2, 3, 4), dtype=np.float32))


@pytest.mark.parametrize(
    ("axis", "expected_shape", "slice_of"),
    [
        (SliceAxis.Z, (2, 3, 4), lambda volume, index: volume[index, :, :]),
        (SliceAxis.Y, (3, 2, 4), lambda volume, index: volume[:, index, :]),
        (SliceAxis.X, (4, 2, 3), lambda volume, index: volume[:, :, index]),
    ],
)
def test_cut_slices(
    axis: SliceAxis,
    expected_shape: tuple[int, int, int],
    slice_of: Callable[[npt.NDArray[np.int64], int], npt.NDArray[np.int64]],
) -> None:
    # Prepare
    volume = np.arange(24).reshape(2, 3, 4)

    # Execute
    result = cut_slices(volume, axis=axis)

    # Assert
    assert result.shape == expected_shape
    for index in range(expected_shape[0]):
        np.testing.assert_array_equal(result[index], slice_of(volume, index))


def test_cut_slices_rejects_non_3d_array() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="expected a \\(Z, Y, X\\) volume"):
        cut_slices(np.zeros((3, 4)), axis=SliceAxis.Z)


def _cases(folder: Path, count: int = 2, *, num_classes: int = 2) -> list[CaseRecord]:
    """Cases whose label encodes the slice index (mod num_classes) along z."""
    cases = []
    for number in range(count):
        image = make_image() + 1000.0 * number
        label = (np.arange(SHAPE[0]) % num_classes)[:, None, None] * np.ones(
            SHAPE, np.uint8
        )
        image_path = write(folder / f"c{number}_0000.nii.gz", image)
        label_path = write(folder / f"c{number}.nii.gz", label.astype(np.uint8))
        cases.append(
            CaseRecord(
                case_id=f"c{number}",
                image_path=image_path,
                label_path=label_path,
                split=CaseSplit.TRAIN,
            )
        )
    return cases


@pytest.mark.parametrize(
    ("axis", "slices_per_case", "spacing"),
    [
        (SliceAxis.Z, 6, (2.0, 0.75 * 12 / 16, 0.5 * 10 / 16)),
        (SliceAxis.Y, 12, (0.75, 2.0 * 6 / 16, 0.5 * 10 / 16)),
        (SliceAxis.X, 10, (0.5, 2.0 * 6 / 16, 0.75 * 12 / 16)),
    ],
)
def test_build_slice_set_shapes_and_spacing(
    tmp_path: Path, axis: SliceAxis, slices_per_case: int, spacing: tuple[float, float]
) -> None:
    # Prepare
    cases = _cases(tmp_path)

    # Execute
    result = build_slice_set(
        cases, data=data_config(**{"data.slice-axis": axis.value}), with_labels=True
    )

    # Assert
    count = 2 * slices_per_case
    assert len(result) == count
    assert result.images.shape == (count, 1, 16, 16)
    assert result.images.dtype == torch.float32
    assert result.labels is not None
    assert result.labels.shape == (count, 16, 16)
    assert result.labels.dtype == torch.int64
    assert set(result.labels.unique().tolist()) <= {0, 1}
    assert result.case_ids == ("c0", "c1")
    assert result.case_of_slice.dtype == torch.int64
    assert (
        result.case_of_slice.tolist() == [0] * slices_per_case + [1] * slices_per_case
    )
    assert result.spacing_mm == (pytest.approx(spacing), pytest.approx(spacing))


def test_build_slice_set_normalises_each_volume(tmp_path: Path) -> None:
    # Prepare: slices already 16 x 16, so the bilinear resize is the identity.
    images = [make_image((3, 16, 16)), 5.0 * make_image((3, 16, 16)) + 1000.0]
    cases = [
        CaseRecord(
            case_id=f"c{number}",
            image_path=write(tmp_path / f"c{number}_0000.nii.gz", image),
            label_path=None,
            split=CaseSplit.TRAIN,
        )
        for number, image in enumerate(images)
    ]

    # Execute
    result = build_slice_set(cases, data=data_config(), with_labels=False)

    # Assert
    assert result.images.shape == (6, 1, 16, 16)
    expected = normalise_intensity(make_image((3, 16, 16)))
    for case in range(2):
        actual = result.images[result.case_of_slice == case, 0].numpy()
        np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("max_slices", "expected_slices"),
    [
        (0, [0, 1, 2, 3, 4, 5]),
        (1, [2]),
        (2, [2, 3]),
        (3, [1, 2, 3]),
        (4, [1, 2, 3, 4]),
        (9, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_build_slice_set_keeps_middle_slices(
    tmp_path: Path, max_slices: int, expected_slices: list[int]
) -> None:
    # Prepare: labels hold their own z index, so the kept slices can be read back.
    cases = _cases(tmp_path, num_classes=8)
    data = data_config(
        **{"data.num-classes": 8, "data.max-slices-per-case": max_slices}
    )

    # Execute
    result = build_slice_set(cases, data=data, with_labels=True)

    # Assert
    assert result.labels is not None
    kept = result.labels[:, 0, 0].tolist()
    assert kept == expected_slices * 2
    assert result.case_of_slice.tolist() == [0] * len(expected_slices) + [1] * len(
        expected_slices
    )


def test_build_slice_set_without_labels_never_reads_them(tmp_path: Path) -> None:
    # Prepare: the label path does not exist; it must not be touched.
    image_path = write(tmp_path / "a_0000.nii.gz", make_image())
    cases = [
        CaseRecord(
            case_id="a",
            image_path=image_path,
            label_path=tmp_path / "gone.nii.gz",
            split=CaseSplit.TRAIN,
        ),
        CaseRecord(
            case_id="b", image_path=image_path, label_path=None, split=CaseSplit.TRAIN
        ),
    ]

    # Execute
    result = build_slice_set(cases, data=data_config(), with_labels=False)

    # Assert
    assert result.labels is None
    assert len(result) == 12
    assert result.case_ids == ("a", "b")


def test_build_slice_set_requires_labels_when_asked(tmp_path: Path) -> None:
    # Prepare
    cases = _cases(tmp_path)
    unlabelled = CaseRecord(
        case_id="u",
        image_path=cases[0].image_path,
        label_path=None,
        split=CaseSplit.TRAIN,
    )

    # Execute / Assert
    with pytest.raises(
        SiteDataError, match=error_at(cases[0].image_path, "case 'u' has no label")
    ):
        build_slice_set([cases[1], unlabelled], data=data_config(), with_labels=True)


def test_build_slice_set_rejects_no_cases() -> None:
    # Execute / Assert
    with pytest.raises(SiteDataError, match="no cases to load"):
        build_slice_set([], data=data_config(), with_labels=False)


def test_subset_cases_keeps_and_reindexes_cases(tmp_path: Path) -> None:
    # Prepare
    cases = _cases(tmp_path, count=3)
    data = data_config(**{"data.max-slices-per-case": 2})
    full = build_slice_set(cases, data=data, with_labels=True)

    # Execute
    result = full.subset_cases([2, 0])

    # Assert
    assert result.case_ids == ("c2", "c0")
    assert result.case_of_slice.tolist() == [0, 0, 1, 1]
    assert result.spacing_mm == (full.spacing_mm[2], full.spacing_mm[0])
    torch.testing.assert_close(
        result.images, torch.cat([full.images[4:6], full.images[0:2]])
    )
    assert result.labels is not None
    assert full.labels is not None
    torch.testing.assert_close(
        result.labels, torch.cat([full.labels[4:6], full.labels[0:2]])
    )
    assert len(full.subset_cases([])) == 0
    with pytest.raises(IndexError, match="case index 3"):
        full.subset_cases([3])


# --- federation folder ----------------------------------------------------------------


def test_list_site_dirs_returns_sorted_site_folders(tmp_path: Path) -> None:
    # Prepare
    for name in ("site_b", "site_a"):
        (tmp_path / name / "imagesTr").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "federation.toml").write_text('target = "site_b"\n')

    # Execute
    result = list_site_dirs(tmp_path)

    # Assert
    assert result == (tmp_path / "site_a", tmp_path / "site_b")


@pytest.mark.parametrize(
    ("relative", "problem"),
    [("absent", "federation folder not found"), ("empty", "no site folders")],
)
def test_list_site_dirs_rejects_bad_folder(
    tmp_path: Path, relative: str, problem: str
) -> None:
    # Prepare
    (tmp_path / "empty" / "notes").mkdir(parents=True)

    # Execute / Assert
    with pytest.raises(SiteDataError, match=error_at(tmp_path / relative, problem)):
        list_site_dirs(tmp_path / relative)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ('target = "site_b"\n', "site_b"),
        ('target = ""\n', None),
        ("[roles]\nsite_a = 'source'\n", None),
    ],
)
def test_read_federation_target(
    tmp_path: Path, text: str | None, expected: str | None
) -> None:
    # Prepare
    if text is not None:
        (tmp_path / "federation.toml").write_text(text)

    # Execute
    result = read_federation_target(tmp_path)

    # Assert
    assert result == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("target = site_b\n", "malformed TOML"),
        ("target = 3\n", "target must be a site folder name"),
    ],
)
def test_read_federation_target_rejects_bad_file(
    tmp_path: Path, text: str, problem: str
) -> None:
    # Prepare
    path = tmp_path / "federation.toml"
    path.write_text(text)

    # Execute / Assert
    with pytest.raises(SiteDataError, match=error_at(path, problem)):
        read_federation_target(tmp_path)
