"""The hospital-scale synthetic federation (``federation.synthetic-scale``)."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from core.config import SyntheticScale, SyntheticShift, load_default_config
from core.data.dataset import LoadedCase, index_site, read_case, validate_site
from core.data.io import read_volume
from core.data.synthetic import (
    GENERATOR_VERSION,
    build_site_styles,
    generate_case,
    get_builtin_federation_dir,
    resolve_federation_dir,
)
from core.data.synthetic_hospital import (
    AIR_HU,
    CASE_SIZE_STEP,
    CASE_SLICE_JITTER,
    CT_MATRIX,
    Modality,
    build_hospital_sites,
    ct_site_index,
    draw_patient,
    generate_hospital_case,
    rasterise,
    write_hospital_site,
)
from tests.conftest import (
    HOSPITAL_EVALUATION_CASES,
    HOSPITAL_SEED,
    HOSPITAL_TARGET_LABELLED,
    HOSPITAL_TRAIN_CASES,
)

NUM_SITES = 3


@pytest.fixture(scope="module")
def hospital(pristine_hospital_federation: Path) -> Path:
    """The session's hospital-scale federation (tests/conftest.py), read only."""
    return pristine_hospital_federation


def organ_width_mm(label: np.ndarray, spacing_mm: tuple[float, ...]) -> float:
    """The organ's widest left-right extent over its slices, in mm."""
    columns = np.flatnonzero(label.any(axis=(0, 1)))
    return float(columns[-1] - columns[0] + 1) * spacing_mm[0]


def organ_volume_ml(label: np.ndarray, spacing_mm: tuple[float, ...]) -> float:
    return float(label.sum()) * float(np.prod(spacing_mm)) / 1000.0


# --- sites ---------------------------------------------------------------------------


def test_every_site_has_its_own_anisotropic_geometry_and_the_last_is_ct() -> None:
    # Execute
    sites = build_hospital_sites(6, seed=0)

    # Assert
    assert [site.name for site in sites] == list("ABCDEF")
    assert [site.modality for site in sites] == [Modality.MR] * 5 + [Modality.CT]
    assert ct_site_index(6) == 5
    for site in sites[:5]:
        x, y, z = site.spacing_mm
        assert x == y
        assert 0.5 <= x <= 0.8
        assert 3.0 <= z <= 3.6
        assert 224 <= site.in_plane_size <= 288
        assert site.in_plane_size % 8 == 0
        assert 16 <= site.slices <= 24
    ct = sites[5]
    assert ct.in_plane_size == CT_MATRIX
    assert 0.74 <= ct.spacing_mm[0] <= 0.9
    assert 2.5 <= ct.spacing_mm[2] <= 5.0
    assert ct.intensity_scale == 1.0
    assert all(site.spacing_mm[2] > 3 * site.spacing_mm[0] for site in sites)
    assert len({site.spacing_mm for site in sites}) == 6
    assert len({round(site.intensity_scale) for site in sites[:5]}) == 5


def test_site_geometry_follows_the_federation_seed() -> None:
    # Execute
    first, again = build_hospital_sites(4, seed=0), build_hospital_sites(4, seed=0)
    other = build_hospital_sites(4, seed=1)

    # Assert
    assert first == again
    assert [s.spacing_mm for s in first] != [s.spacing_mm for s in other]
    assert [s.style.shift for s in first] == [s.style.shift for s in other]


def test_hospital_sites_keep_the_continuum_and_the_mild_scanners() -> None:
    # Execute
    wide = build_hospital_sites(6, seed=0)
    mild = build_hospital_sites(6, shift=SyntheticShift.MILD, seed=0)

    # Assert: the small federation's places and (mild) scanners
    assert [site.style for site in wide] == list(build_site_styles(6))
    assert [site.style for site in mild] == list(
        build_site_styles(6, shift=SyntheticShift.MILD, seed=0)
    )
    assert [site.style.inverted for site in wide[:5]] == [False] * 3 + [True] * 2


# --- cases ---------------------------------------------------------------------------


def test_a_case_is_deterministic_for_the_same_rng_seed() -> None:
    # Prepare
    site = build_hospital_sites(3, seed=0)[0]

    def generate(seed: int) -> tuple[np.ndarray, np.ndarray]:
        case = generate_hospital_case(site, np.random.default_rng([seed, 0, 0]))
        return case.image, case.label

    # Execute
    first, again, other = generate(1), generate(1), generate(2)

    # Assert
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


def first_evaluation_case(hospital: Path, site: str) -> LoadedCase:
    return read_case(index_site(hospital / site).evaluation[0], num_classes=2)


def test_an_mr_case_is_positive_arbitrary_units_with_the_organ_brighter(
    hospital: Path,
) -> None:
    # Execute: A, at the continuum's start (the organ brighter than its tissue)
    case = first_evaluation_case(hospital, "A")

    # Assert
    assert case.label is not None
    assert case.image.min() >= 0
    organ = case.label.astype(bool)
    assert np.median(case.image[organ]) > 1.2 * np.median(case.image[~organ])


def test_a_ct_case_is_in_hounsfield_units(hospital: Path) -> None:
    # Execute
    case = first_evaluation_case(hospital, "C")

    # Assert: air outside the body, soft tissue in the organ, a dense bone
    assert case.label is not None
    image = case.image
    corners = image[:, :20, :20]
    assert float(corners.max()) < -900
    assert float(np.median(corners)) == pytest.approx(AIR_HU, abs=20)
    organ = image[case.label.astype(bool)]
    assert 40 < float(np.median(organ)) < 110
    assert float(np.percentile(image, 99.9)) > 500  # bone
    assert image.min() >= -1024
    body = image > -500
    assert 0.15 < float(body.mean()) < 0.6


def test_the_organ_has_the_same_size_in_mm_whatever_the_spacing() -> None:
    # Prepare: one patient, scanned by three sites of different spacing
    sites = build_hospital_sites(3, seed=0)
    patient = draw_patient(np.random.default_rng(7))

    # Execute
    sizes = []
    for site in sites:
        x, y, z = site.spacing_mm
        fov = (96.0, 96.0, 72.0)  # mm around the patient, enough for the organ
        shape = (round(fov[2] / z), round(fov[1] / y), round(fov[0] / x))
        _, organ = rasterise(patient, shape, site.spacing_mm)
        sizes.append(
            (organ_width_mm(organ, site.spacing_mm), organ_volume_ml(organ, (x, y, z)))
        )

    # Assert: within a voxel of width and a few percent of volume
    widths, volumes = zip(*sizes, strict=True)
    assert max(widths) - min(widths) <= 2 * max(s.spacing_mm[0] for s in sites)
    assert max(volumes) / min(volumes) < 1.12
    assert min(widths) >= 35
    assert max(widths) <= 60
    assert min(volumes) >= 12
    assert max(volumes) <= 60


def test_every_sites_organ_is_prostate_sized_in_mm(hospital: Path) -> None:
    # Execute / Assert: 35-60 mm wide and 12-60 ml at every site, MR and CT alike
    for site in ("A", "B", "C"):
        for case in index_site(hospital / site).evaluation:
            loaded = read_case(case, num_classes=2)
            assert loaded.label is not None
            width = organ_width_mm(loaded.label, loaded.spacing_mm)
            assert 35 <= width <= 60, (site, width)
            assert 12 <= organ_volume_ml(loaded.label, loaded.spacing_mm) <= 60


# --- the federation ------------------------------------------------------------------


def test_a_hospital_federation_declares_each_sites_scanner(hospital: Path) -> None:
    # Prepare
    sites = build_hospital_sites(NUM_SITES, seed=HOSPITAL_SEED)

    # Execute / Assert
    manifest = tomllib.loads((hospital / "federation.toml").read_text())
    assert manifest == {
        "target": "A",
        "seed": HOSPITAL_SEED,
        "scale": "hospital",
        "target-labelled": HOSPITAL_TARGET_LABELLED,
    }
    for site in sites:
        folder = hospital / site.name
        dataset = json.loads((folder / "dataset.json").read_text())
        assert dataset["modality"] == str(site.modality)
        assert dataset["labels"] == {"0": "background", "1": "organ"}
        assert dataset["scanner"]["spacing_mm"] == pytest.approx(
            site.spacing_mm, abs=1e-4
        )
        index = index_site(folder)
        assert index.modality == ("CT" if site.name == "C" else "MR")
        assert len(index.training_images) == HOSPITAL_TRAIN_CASES
        assert len(index.evaluation) == HOSPITAL_EVALUATION_CASES
        for case in (*index.labelled, *index.unlabelled, *index.evaluation):
            image = read_volume(case.image_path)
            assert image.spacing_mm == pytest.approx(site.spacing_mm, abs=1e-4)
            assert image.array.dtype == np.int16
            width, height, depth = image.size
            assert width == height
            assert abs(width - site.in_plane_size) <= CASE_SIZE_STEP
            assert abs(depth - site.slices) <= CASE_SLICE_JITTER
            if case.label_path is not None:
                label = read_volume(case.label_path)
                assert label.same_geometry(image)
                assert label.array.dtype == np.uint8
                assert set(np.unique(label.array).tolist()) == {0, 1}
    assert len(index_site(hospital / "A").unlabelled) == 1


def test_a_hospital_site_is_reproducible(hospital: Path, tmp_path: Path) -> None:
    # Execute: site A's first case again, from the same seed
    site = build_hospital_sites(NUM_SITES, seed=HOSPITAL_SEED)[0]
    write_hospital_site(
        site,
        tmp_path / "A",
        site_index=0,
        seed=HOSPITAL_SEED,
        num_train_cases=1,
        num_labelled=1,
        num_evaluation=0,
    )

    # Assert: the same files, byte for byte
    again = tmp_path / "A"
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert [str(path) for path in files] == [
        "dataset.json",
        "imagesTr/a_000_0000.nii.gz",
        "labelsTr/a_000.nii.gz",
    ]
    for relative in files:
        assert (hospital / "A" / relative).read_bytes() == (
            again / relative
        ).read_bytes()


def test_the_ct_site_passes_the_site_checks(hospital: Path) -> None:
    # Execute
    summary = validate_site(index_site(hospital / "C"), num_classes=2)

    # Assert
    assert summary.modality == "CT"
    assert summary.intensity_min == -1024
    assert summary.intensity_max > 500
    assert summary.foreground_fraction > 0


def test_the_hospital_federation_has_its_own_cache_folder(tmp_path: Path) -> None:
    # Execute
    federation = load_default_config(
        **{
            "federation.cache-dir": str(tmp_path),
            "federation.synthetic-scale": "hospital",
            "federation.synthetic-shift": "mild",
        }
    ).federation

    # Assert
    assert resolve_federation_dir(federation).name == (
        f"synthetic-v{GENERATOR_VERSION}-mild-hospital-seed0-sites6-cases12-target2"
    )
    small = get_builtin_federation_dir(
        tmp_path, seed=0, num_sites=6, num_train_cases=12, target_labelled=2
    )
    assert small.name == f"synthetic-v{GENERATOR_VERSION}-seed0-sites6-cases12-target2"


def test_the_default_scale_is_small() -> None:
    # Execute / Assert
    assert load_default_config().federation.synthetic_scale is SyntheticScale.SMALL


def test_an_unknown_synthetic_scale_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"federation\.synthetic-scale"):
        load_default_config(**{"federation.synthetic-scale": "huge"})


# The small generator's voxels for (seed 0, sites A and F, case 0), as GENERATOR_VERSION
# 4 has always written them (the benchmarks' cached federations rely on them).
SMALL_CASE_DIGEST = "1d18f30e796c01d2"


def test_the_small_generator_is_unchanged() -> None:
    # Prepare
    styles = build_site_styles(6)
    digest = hashlib.sha256()

    # Execute
    for index in (0, 5):
        case = generate_case(styles[index], np.random.default_rng([0, index, 0]))
        digest.update(case.image.tobytes())
        digest.update(case.label.tobytes())

    # Assert
    assert digest.hexdigest()[:16] == SMALL_CASE_DIGEST, (
        "the small federation's voxels changed: bump GENERATOR_VERSION (cached "
        "federations and benchmark figures rely on them), then update this digest"
    )
