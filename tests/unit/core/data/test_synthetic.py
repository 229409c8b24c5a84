from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from core.config import SyntheticShift, load_default_config
from core.data.dataset import index_site, list_site_dirs, read_federation_target
from core.data.io import read_volume
from core.data.synthetic import (
    ALL_LABELLED,
    EVALUATION_CASES_PER_SITE,
    GENERATOR_VERSION,
    MILD_MAX_SHIFT,
    SCANNER_NOISE_SD,
    SHAPE_ZYX,
    SyntheticCase,
    build_site_styles,
    default_site_names,
    ensure_builtin_federation,
    generate_case,
    get_builtin_federation_dir,
    resolve_federation_dir,
    write_federation,
)

SEED = 5
NUM_SITES = 3
NUM_TRAIN = 2


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny federation, shared read-only."""
    folder = tmp_path_factory.mktemp("synthetic") / "federation"
    write_federation(folder, seed=SEED, num_sites=NUM_SITES, num_train_cases=NUM_TRAIN)
    return folder


def case_for(site: int, seed: int) -> SyntheticCase:
    style = build_site_styles(6)[site]
    return generate_case(style, np.random.default_rng([seed, site, 0]))


# --- generate_case -------------------------------------------------------------------


def test_generate_case_is_deterministic_for_the_same_rng_seed() -> None:
    # Execute
    first, second = case_for(0, seed=1), case_for(0, seed=1)

    # Assert
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)


def test_generate_case_differs_for_another_rng_seed() -> None:
    # Execute
    first, other = case_for(0, seed=1), case_for(0, seed=2)

    # Assert
    assert not np.array_equal(first.image, other.image)
    assert not np.array_equal(first.label, other.label)


@pytest.mark.parametrize("site", [0, 2, 5])
def test_generate_case_gives_binary_label_with_an_organ(site: int) -> None:
    # Execute
    case = case_for(site, seed=0)

    # Assert
    assert case.image.shape == SHAPE_ZYX
    assert case.label.shape == SHAPE_ZYX
    assert case.image.dtype == np.float32
    assert case.label.dtype == np.uint8
    assert set(np.unique(case.label).tolist()) == {0, 1}
    assert 0.005 < float(case.label.mean()) < 0.5
    assert bool(np.isfinite(case.image).all())


# --- the site continuum --------------------------------------------------------------


def test_build_site_styles_spreads_sites_over_the_continuum() -> None:
    # Execute
    styles = build_site_styles(6)

    # Assert
    assert [style.name for style in styles] == list("ABCDEF")
    np.testing.assert_allclose([s.shift for s in styles], [0, 0.2, 0.4, 0.6, 0.8, 1])
    for field in ("noise_sd", "blur_sigma_px", "bias_amplitude", "resolution_factor"):
        values = [getattr(style, field) for style in styles]
        assert values == sorted(values), field
        assert values[0] < values[-1], field
    assert [style.inverted for style in styles] == [False] * 3 + [True] * 3
    assert [style.contrast_sign() for style in styles] == [1.0] * 3 + [-1.0] * 3
    assert all((style.organ_contrast < 0) == style.inverted for style in styles)


def test_mild_sites_lie_before_the_inversion_with_their_own_scanners() -> None:
    # Execute
    styles = build_site_styles(6, shift=SyntheticShift.MILD, seed=0)

    # Assert: the near half of the continuum, no site inverted.
    np.testing.assert_allclose(
        [s.shift for s in styles], np.linspace(0, MILD_MAX_SHIFT, 6)
    )
    assert not any(style.inverted for style in styles)
    assert all(style.organ_contrast > 0 for style in styles)
    # Scanners are drawn, not ordered along the continuum.
    noise = [style.noise_sd for style in styles]
    assert noise != sorted(noise)
    assert all(SCANNER_NOISE_SD[0] <= value <= SCANNER_NOISE_SD[1] for value in noise)
    assert len(set(noise)) == 6


def test_mild_scanners_follow_the_federation_seed() -> None:
    # Execute
    first = build_site_styles(6, shift=SyntheticShift.MILD, seed=0)
    again = build_site_styles(6, shift=SyntheticShift.MILD, seed=0)
    other = build_site_styles(6, shift=SyntheticShift.MILD, seed=1)

    # Assert
    assert first == again
    assert [s.noise_sd for s in first] != [s.noise_sd for s in other]
    assert [s.shift for s in first] == [s.shift for s in other]


@pytest.mark.parametrize("seed", [0, 1])
def test_every_mild_site_shows_the_organ_brighter(seed: int) -> None:
    # Prepare
    styles = build_site_styles(6, shift=SyntheticShift.MILD, seed=seed)

    # Execute
    contrasts = [
        organ_minus_ring(
            generate_case(style, np.random.default_rng([seed, index, 0]))
        )
        for index, style in enumerate(styles)
    ]

    # Assert
    assert all(contrast > 0 for contrast in contrasts), contrasts


def test_a_mild_federation_records_its_shift_and_scanners(tmp_path: Path) -> None:
    # Execute
    folder = ensure_builtin_federation(
        tmp_path,
        seed=SEED,
        num_sites=NUM_SITES,
        num_train_cases=NUM_TRAIN,
        target_labelled=ALL_LABELLED,
        shift=SyntheticShift.MILD,
    )

    # Assert
    assert folder.name == (
        f"synthetic-v{GENERATOR_VERSION}-mild-seed{SEED}-"
        f"sites{NUM_SITES}-cases{NUM_TRAIN}"
    )
    manifest = tomllib.loads((folder / "federation.toml").read_text())
    assert manifest["shift"] == "mild"
    styles = build_site_styles(NUM_SITES, shift=SyntheticShift.MILD, seed=SEED)
    for style in styles:
        dataset = json.loads((folder / style.name / "dataset.json").read_text())
        assert dataset["shift"] == pytest.approx(style.shift)
        assert dataset["scanner"]["noise_sd"] == pytest.approx(style.noise_sd, abs=1e-4)


def test_the_wide_federation_records_no_scanner(federation: Path) -> None:
    # Assert: its files are what they were before mild federations existed.
    assert "shift" not in tomllib.loads((federation / "federation.toml").read_text())
    assert "scanner" not in json.loads((federation / "A" / "dataset.json").read_text())


def test_resolve_federation_dir_names_a_mild_federation(tmp_path: Path) -> None:
    # Prepare
    federation = load_default_config(
        **{
            "federation.cache-dir": str(tmp_path),
            "federation.synthetic-shift": "mild",
        }
    ).federation

    # Execute
    folder = resolve_federation_dir(federation)

    # Assert
    assert folder.name.startswith(f"synthetic-v{GENERATOR_VERSION}-mild-seed0-")


def test_an_unknown_synthetic_shift_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="federation.synthetic-shift"):
        load_default_config(**{"federation.synthetic-shift": "extreme"})


def organ_minus_ring(case: SyntheticCase) -> float:
    """Mean intensity inside the label minus a 2-pixel in-plane ring just outside."""
    organ = case.label.astype(bool)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    ring = ndimage.binary_dilation(organ, structure=in_plane, iterations=2) & ~organ
    return float(case.image[organ].mean() - case.image[ring].mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sites_past_the_middle_show_the_organ_inverted(seed: int) -> None:
    # Prepare
    styles = build_site_styles(6)

    # Execute
    contrast_a = organ_minus_ring(
        generate_case(styles[0], np.random.default_rng([seed, 0, 0]))
    )
    contrast_f = organ_minus_ring(
        generate_case(styles[5], np.random.default_rng([seed, 5, 0]))
    )

    # Assert: A's organ is brighter than its surroundings, F's darker.
    assert contrast_a > 0
    assert contrast_f < 0


@pytest.mark.parametrize(("count", "names"), [(3, ("A", "B", "C")), (1, ("A",))])
def test_default_site_names(count: int, names: tuple[str, ...]) -> None:
    # Execute / Assert
    assert default_site_names(count) == names


def test_default_site_names_go_on_as_columns_past_z() -> None:
    # Execute
    names = default_site_names(54)

    # Assert: plain, unique folder names in the scale benchmark's range and beyond.
    assert names[24:29] == ("Y", "Z", "AA", "AB", "AC")
    assert names[-2:] == ("BA", "BB")
    assert len(set(names)) == 54
    assert all(name.isalpha() and name.isupper() for name in names)


# --- write_federation ----------------------------------------------------------------


def test_write_federation_writes_the_site_layout(federation: Path) -> None:
    # Execute
    sites = list_site_dirs(federation)

    # Assert
    assert [site.name for site in sites] == ["A", "B", "C"]
    assert read_federation_target(federation) == "A"
    document = tomllib.loads((federation / "federation.toml").read_text())
    assert document == {"target": "A", "seed": SEED}
    assert not [p.name for p in federation.parent.iterdir() if "partial" in p.name]
    for site in sites:
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            assert (site / folder).is_dir(), site / folder
        index = index_site(site)
        assert len(index.labelled) == NUM_TRAIN
        assert index.unlabelled == ()
        assert len(index.evaluation) == EVALUATION_CASES_PER_SITE
        assert index.modality == "synthetic-MR"
        assert index.class_names == ("background", "organ")
        first = index.labelled[0]
        assert first.case_id == f"{site.name.lower()}_000"
        assert first.image_path.name == f"{site.name.lower()}_000_0000.nii.gz"
        metadata = json.loads((site / "dataset.json").read_text())
        assert metadata["labels"] == {"0": "background", "1": "organ"}


def test_written_volumes_have_the_synthetic_geometry(federation: Path) -> None:
    # Prepare
    case = index_site(federation / "B").labelled[0]

    # Execute
    image, label = read_volume(case.image_path), read_volume(case.label_path)  # type: ignore[arg-type]

    # Assert
    assert image.array.shape == SHAPE_ZYX
    assert image.same_geometry(label)
    assert label.array.dtype == np.uint8
    assert image.spacing_mm == pytest.approx((1.5, 1.5, 3.0))


def test_write_federation_is_reproducible_for_the_same_seed(
    federation: Path, tmp_path: Path
) -> None:
    # Execute
    again = tmp_path / "again"
    names = write_federation(
        again, seed=SEED, num_sites=NUM_SITES, num_train_cases=NUM_TRAIN
    )

    # Assert
    assert names == ("A", "B", "C")  # the default target first
    files = sorted(
        p.relative_to(federation) for p in federation.rglob("*") if p.is_file()
    )
    assert files == sorted(
        p.relative_to(again) for p in again.rglob("*") if p.is_file()
    )
    for relative in files:
        if relative.suffixes[-2:] == [".nii", ".gz"]:
            np.testing.assert_array_equal(
                read_volume(federation / relative).array,
                read_volume(again / relative).array,
                err_msg=str(relative),
            )
        else:
            assert (federation / relative).read_bytes() == (
                again / relative
            ).read_bytes()


def test_write_federation_refuses_an_existing_folder(federation: Path) -> None:
    # Execute / Assert
    with pytest.raises(FileExistsError, match="already exists; choose a new folder"):
        write_federation(federation, seed=SEED, num_sites=3, num_train_cases=2)


@pytest.mark.parametrize("num_sites", [0, 2])
def test_write_federation_needs_three_sites(tmp_path: Path, num_sites: int) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=f"num_sites must be >= 3, got {num_sites}"):
        write_federation(
            tmp_path / "fed", seed=0, num_sites=num_sites, num_train_cases=2
        )
    assert not (tmp_path / "fed").exists()


@pytest.mark.parametrize(
    ("target_labelled", "expected"),
    [(0, 0), (2, 2), (3, 3), (4, 4), (9, 4), (ALL_LABELLED, 4)],
    ids=["none", "two", "three", "all-exactly", "more-than-all", "all"],
)
def test_write_federation_keeps_exactly_n_labelled_target_cases(
    tmp_path: Path, target_labelled: int | None, expected: int
) -> None:
    # Execute
    write_federation(
        tmp_path / "fed",
        seed=SEED,
        num_sites=3,
        num_train_cases=4,
        target_labelled=target_labelled,
    )

    # Assert: the target keeps its first `expected` cases labelled, the rest are
    # images alone; its evaluation labels and every source's labels stay
    target = index_site(tmp_path / "fed" / "A")
    assert [case.case_id for case in target.labelled] == [
        f"a_{index:03d}" for index in range(expected)
    ]
    assert [case.case_id for case in target.unlabelled] == [
        f"a_{index:03d}" for index in range(expected, 4)
    ]
    assert len(list((tmp_path / "fed" / "A" / "labelsTr").glob("*.nii.gz"))) == (
        expected
    )
    assert len(target.training_images) == 4
    assert len(target.evaluation) == EVALUATION_CASES_PER_SITE
    assert all(case.label_path is not None for case in target.evaluation)
    for source in ("B", "C"):
        index = index_site(tmp_path / "fed" / source)
        assert len(index.labelled) == 4
        assert index.unlabelled == ()
    document = tomllib.loads((tmp_path / "fed" / "federation.toml").read_text())
    assert document.get("target-labelled", 4) == expected


def test_a_few_label_target_has_the_images_of_the_fully_labelled_one(
    federation: Path, tmp_path: Path
) -> None:
    # Execute
    write_federation(
        tmp_path / "few",
        seed=SEED,
        num_sites=NUM_SITES,
        num_train_cases=NUM_TRAIN,
        target_labelled=1,
    )

    # Assert: only labelsTr/a_001 is gone; every other file holds the same voxels
    full = {p.relative_to(federation) for p in federation.rglob("*.nii.gz")}
    few = {p.relative_to(tmp_path / "few") for p in (tmp_path / "few").rglob("*.gz")}
    assert full - few == {Path("A/labelsTr/a_001.nii.gz")}
    assert few < full
    for relative in few:
        np.testing.assert_array_equal(
            read_volume(federation / relative).array,
            read_volume(tmp_path / "few" / relative).array,
            err_msg=str(relative),
        )


def test_write_federation_refuses_a_negative_target_labelled(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"^target_labelled must be >= 0 or None, got -1"
    ):
        write_federation(
            tmp_path / "fed",
            seed=0,
            num_sites=3,
            num_train_cases=2,
            target_labelled=-1,
        )
    assert not (tmp_path / "fed").exists()


# --- the built-in federation ---------------------------------------------------------


def test_ensure_builtin_federation_generates_once_and_reuses(tmp_path: Path) -> None:
    # Prepare
    first_lines: list[str] = []
    second_lines: list[str] = []

    # Execute
    first = ensure_builtin_federation(
        tmp_path,
        seed=1,
        num_sites=3,
        num_train_cases=2,
        target_labelled=ALL_LABELLED,
        progress=first_lines.append,
    )
    stamp = (first / "federation.toml").stat().st_mtime_ns
    second = ensure_builtin_federation(
        tmp_path,
        seed=1,
        num_sites=3,
        num_train_cases=2,
        target_labelled=ALL_LABELLED,
        progress=second_lines.append,
    )

    # Assert
    expected = tmp_path / f"synthetic-v{GENERATOR_VERSION}-seed1-sites3-cases2"
    assert first == second == expected
    assert first_lines[0].startswith("generating the built-in synthetic federation")
    assert len(first_lines) == 1 + 3  # one line per site
    assert second_lines == []
    assert (second / "federation.toml").stat().st_mtime_ns == stamp
    assert [site.name for site in list_site_dirs(second)] == ["A", "B", "C"]


def test_the_cache_folder_differs_for_each_count_of_labelled_target_cases(
    tmp_path: Path,
) -> None:
    # Execute
    def folder(target_labelled: int | None) -> Path:
        return get_builtin_federation_dir(
            tmp_path,
            seed=0,
            num_sites=6,
            num_train_cases=12,
            target_labelled=target_labelled,
        )

    # Assert: every different federation has its own folder; a fully labelled one
    # keeps the name it had before few-label targets (the benchmarks' cache)
    few = [folder(count) for count in range(12)]
    assert len(set(few)) == 12
    assert folder(ALL_LABELLED) not in few
    assert folder(ALL_LABELLED) == folder(12) == folder(40)
    assert (
        folder(ALL_LABELLED).name
        == f"synthetic-v{GENERATOR_VERSION}-seed0-sites6-cases12"
    )
    assert (
        folder(2).name == f"synthetic-v{GENERATOR_VERSION}-seed0-sites6-cases12-target2"
    )


def test_the_builtin_federation_keeps_few_and_all_labels_apart(tmp_path: Path) -> None:
    # Execute
    def ensure(target_labelled: int | None) -> Path:
        return ensure_builtin_federation(
            tmp_path,
            seed=1,
            num_sites=3,
            num_train_cases=3,
            target_labelled=target_labelled,
        )

    few, full = ensure(1), ensure(ALL_LABELLED)

    # Assert: two folders, each with its own target
    assert few != full
    assert len(index_site(few / "A").labelled) == 1
    assert len(index_site(full / "A").labelled) == 3
    assert ensure(1) == few  # cached
    assert len(index_site(few / "A").labelled) == 1


def test_resolve_federation_dir_prefers_federation_dir(tmp_path: Path) -> None:
    # Prepare
    federation = load_default_config(
        **{"federation.dir": str(tmp_path / "mine"), "federation.cache-dir": "/x"}
    ).federation

    # Execute / Assert
    assert resolve_federation_dir(federation) == tmp_path / "mine"


def test_resolve_federation_dir_uses_the_cache_path(tmp_path: Path) -> None:
    # Prepare
    federation = load_default_config(
        **{
            "federation.cache-dir": str(tmp_path),
            "federation.synthetic-seed": 3,
            "federation.synthetic-sites": 4,
            "federation.synthetic-cases": 5,
            "federation.synthetic-target-labelled": 2,
        }
    ).federation

    # Execute
    folder = resolve_federation_dir(federation)

    # Assert
    assert folder == get_builtin_federation_dir(
        tmp_path, seed=3, num_sites=4, num_train_cases=5, target_labelled=2
    )
    assert folder == (
        tmp_path / f"synthetic-v{GENERATOR_VERSION}-seed3-sites4-cases5-target2"
    )
    assert not folder.exists()  # resolving never generates


def test_resolve_federation_dir_defaults_to_the_home_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("HOME", str(tmp_path))
    federation = dataclasses.replace(
        load_default_config().federation, dir="", cache_dir=""
    )

    # Execute
    folder = resolve_federation_dir(federation)

    # Assert
    assert folder.parent == tmp_path / ".cache" / "sitebridge"
    assert folder.name == (
        f"synthetic-v{GENERATOR_VERSION}-seed{federation.synthetic_seed}-"
        f"sites{federation.synthetic_sites}-cases{federation.synthetic_cases}-"
        f"target{federation.synthetic_target_labelled}"
    )
    assert not folder.exists()


def test_resolve_federation_dir_expands_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("HOME", str(tmp_path))
    federation = dataclasses.replace(
        load_default_config().federation, dir="~/sites", cache_dir=""
    )

    # Execute / Assert
    assert resolve_federation_dir(federation) == tmp_path / "sites"
