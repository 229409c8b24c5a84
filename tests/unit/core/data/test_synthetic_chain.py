from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from core.data.dataset import index_site, list_site_dirs, read_federation_target
from core.data.io import read_volume
from core.data.synthetic import (
    ALL_LABELLED,
    EVALUATION_CASES_PER_SITE,
    GENERATOR_VERSION,
    INTENSITY_SCALE,
    SHAPE_ZYX,
    build_site_styles,
    generate_case,
    get_builtin_federation_dir,
    write_federation,
)
from core.data.synthetic_chain import (
    ANATOMIES,
    APPEARANCES,
    ChainRole,
    ChainSite,
    build_chain_sites,
    ensure_chain_federation,
    get_chain_federation_dir,
    get_chain_role,
    read_chain_levels,
    write_chain_federation,
    write_chain_site,
)

SEED = 3
COUNTS = {"num_train_cases": 3, "num_intermediate_cases": 2, "num_target_cases": 1}
EXPECTED_SITES = (
    "T-bright-large",
    "I-bright-medium",
    "I-bright-small",
    "I-faint-large",
    "I-dark-large",
    "L-faint-medium",
    "L-faint-small",
    "L-dark-medium",
    "L-dark-small",
)


@dataclasses.dataclass(frozen=True)
class Generated:
    folder: Path
    sites: tuple[ChainSite, ...]
    progress: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SiteStatistics:
    """Per-site means over all written cases (training and evaluation)."""

    foreground_fraction: float
    organ_centre_px: tuple[float, float]  # (row, col)
    contrast: float  # organ core minus a ring around it, in generate_case's units


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    """The chain federation, generated through the cache path; shared read-only."""
    lines: list[str] = []
    folder = ensure_chain_federation(
        tmp_path_factory.mktemp("chain"), seed=SEED, progress=lines.append, **COUNTS
    )
    sites = build_chain_sites(**COUNTS)
    return Generated(folder=folder, sites=sites, progress=tuple(lines))


def measure_case(image: np.ndarray, label: np.ndarray) -> tuple[float, ...]:
    organ = label.astype(bool)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_erosion(organ, structure=in_plane)
    near = ndimage.binary_dilation(organ, structure=in_plane)
    ring = ndimage.binary_dilation(organ, structure=in_plane, iterations=3) & ~near
    rows, cols = np.nonzero(organ)[1:]
    contrast = float(np.median(image[core]) - np.median(image[ring]))
    contrast /= INTENSITY_SCALE
    return float(organ.mean()), float(rows.mean()), float(cols.mean()), contrast


@pytest.fixture(scope="module")
def statistics(generated: Generated) -> dict[str, SiteStatistics]:
    result = {}
    for site in generated.sites:
        index = index_site(generated.folder / site.name)
        measured = np.array(
            [
                measure_case(
                    read_volume(case.image_path).array,
                    read_volume(case.label_path).array,  # type: ignore[arg-type]
                )
                for case in index.labelled + index.evaluation
            ]
        ).mean(axis=0)
        result[site.name] = SiteStatistics(
            foreground_fraction=float(measured[0]),
            organ_centre_px=(float(measured[1]), float(measured[2])),
            contrast=float(measured[3]),
        )
    return result


def pooled(
    sites: tuple[ChainSite, ...],
    values: dict[str, float],
    level_of: Callable[[ChainSite], int],
) -> list[float]:
    """Mean of the site means at each level of one factor (balanced over the other)."""
    return [
        float(np.mean([values[site.name] for site in sites if level_of(site) == level]))
        for level in range(3)
    ]


def by_appearance(site: ChainSite) -> int:
    return site.appearance_level


def by_anatomy(site: ChainSite) -> int:
    return site.anatomy_level


# --- the grid of sites ---------------------------------------------------------------


def test_build_chain_sites_fills_the_grid_with_named_roles() -> None:
    # Execute
    sites = build_chain_sites(
        num_train_cases=12, num_intermediate_cases=6, num_target_cases=2
    )

    # Assert
    assert tuple(site.name for site in sites) == EXPECTED_SITES
    cells = {(site.appearance_level, site.anatomy_level) for site in sites}
    assert cells == {(a, n) for a in range(3) for n in range(3)}
    for site in sites:
        changed = (site.appearance_level > 0) + (site.anatomy_level > 0)
        expected_role = (ChainRole.TARGET, ChainRole.INTERMEDIATE, ChainRole.LANDMARK)
        assert site.role == expected_role[changed], site.name
        assert site.num_train_cases == {"target": 2, "intermediate": 6}.get(
            site.role.value, 12
        )
        _, appearance, anatomy = site.name.split("-")
        assert appearance == APPEARANCES[site.appearance_level].name
        assert anatomy == ANATOMIES[site.anatomy_level].name
        assert site.style.name == site.name


def test_chain_sites_vary_one_factor_each() -> None:
    # Prepare
    sites = {site.name: site for site in build_chain_sites(**COUNTS)}
    appearance_fields = ("organ_contrast", "bias_amplitude", "noise_sd")
    appearance_fields += ("blur_sigma_px", "resolution_factor")
    anatomy_fields = ("organ_scale", "organ_offset_px")

    # Execute / Assert: the other factor's fields stay those of the target.
    target = sites["T-bright-large"].style
    for name in ("I-faint-large", "I-dark-large"):
        style = sites[name].style
        assert all(getattr(style, f) == getattr(target, f) for f in anatomy_fields)
        assert all(getattr(style, f) != getattr(target, f) for f in appearance_fields)
    for name in ("I-bright-medium", "I-bright-small"):
        style = sites[name].style
        assert all(getattr(style, f) == getattr(target, f) for f in appearance_fields)
        assert all(getattr(style, f) != getattr(target, f) for f in anatomy_fields)
    assert [site.style.inverted for site in sites.values()] == [
        site.appearance_level == 2 for site in sites.values()
    ]
    assert sites["L-dark-small"].style.shift == 1.0
    assert target.shift == 0.0


def test_the_target_domain_is_the_builtin_site_a() -> None:
    # Prepare
    target = build_chain_sites(**COUNTS)[0].style
    site_a = build_site_styles(3)[0]

    # Execute / Assert
    assert dataclasses.replace(target, name="A") == site_a


@pytest.mark.parametrize(
    ("cell", "role"),
    [
        ((0, 0), "target"),
        ((0, 2), "intermediate"),
        ((1, 0), "intermediate"),
        ((1, 1), "landmark"),
        ((2, 1), "landmark"),
    ],
)
def test_get_chain_role(cell: tuple[int, int], role: str) -> None:
    # Execute / Assert
    assert get_chain_role(*cell) == role


@pytest.mark.parametrize("field", sorted(COUNTS))
def test_chain_needs_a_training_case_per_site(tmp_path: Path, field: str) -> None:
    # Prepare
    counts = {**COUNTS, field: 0}

    # Execute / Assert
    with pytest.raises(ValueError, match="training cases must be >= 1, got 0"):
        write_chain_federation(tmp_path / "chain", seed=0, **counts)
    assert not list(tmp_path.iterdir())


# --- the written federation ----------------------------------------------------------


def test_write_chain_federation_writes_the_site_layout(generated: Generated) -> None:
    # Execute
    sites = list_site_dirs(generated.folder)

    # Assert
    assert sorted(site.name for site in sites) == sorted(EXPECTED_SITES)
    assert not [p for p in generated.folder.parent.iterdir() if "partial" in p.name]
    for site in generated.sites:
        index = index_site(generated.folder / site.name)
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            assert (generated.folder / site.name / folder).is_dir()
        assert len(index.labelled) == site.num_train_cases
        assert len(index.evaluation) == EVALUATION_CASES_PER_SITE
        assert index.unlabelled == ()
        assert index.class_names == ("background", "organ")
        assert index.labelled[0].case_id == f"{site.name.lower()}_000"
    image = read_volume(index.labelled[0].image_path)
    label = read_volume(index.labelled[0].label_path)  # type: ignore[arg-type]
    assert image.array.shape == SHAPE_ZYX
    assert image.same_geometry(label)
    assert set(np.unique(label.array).tolist()) == {0, 1}


def test_federation_toml_names_the_target_and_the_roles(generated: Generated) -> None:
    # Execute
    document = tomllib.loads((generated.folder / "federation.toml").read_text())

    # Assert
    assert read_federation_target(generated.folder) == "T-bright-large"
    assert document == {
        "target": "T-bright-large",
        "intermediates": list(EXPECTED_SITES[1:5]),
        "landmarks": list(EXPECTED_SITES[5:]),
        "seed": SEED,
    }


def test_dataset_json_records_the_factors_and_style(generated: Generated) -> None:
    for site in generated.sites:
        # Execute
        metadata = json.loads(
            (generated.folder / site.name / "dataset.json").read_text()
        )

        # Assert
        assert metadata["role"] == site.role.value
        assert metadata["appearance_level"] == site.appearance_level
        assert metadata["anatomy_level"] == site.anatomy_level
        assert metadata["appearance"] == APPEARANCES[site.appearance_level].name
        assert metadata["anatomy"] == ANATOMIES[site.anatomy_level].name
        assert metadata["shift"] == site.style.shift
        style = metadata["style"]
        assert style["organ_contrast"] == site.style.organ_contrast
        assert style["noise_sd"] == site.style.noise_sd
        assert style["organ_scale"] == site.style.organ_scale
        assert tuple(style["organ_offset_px"]) == site.style.organ_offset_px
        assert metadata["labels"] == {"0": "background", "1": "organ"}


def test_read_chain_levels_reads_what_the_generator_recorded(
    generated: Generated,
) -> None:
    for site in generated.sites:
        levels = read_chain_levels(generated.folder / site.name)
        assert levels == (site.appearance_level, site.anatomy_level)


def test_read_chain_levels_is_none_for_a_site_without_levels(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "hospital"}))
    assert read_chain_levels(tmp_path) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the site's dataset.json"),
        ("{not json", "cannot read the site's dataset.json"),
        ("[1, 2]", "dataset.json must hold a JSON object"),
        ('{"appearance_level": 1}', "anatomy_level must be an integer level, got None"),
        (
            '{"appearance_level": "1", "anatomy_level": 0}',
            "appearance_level must be an integer level, got '1'",
        ),
        (
            '{"appearance_level": true, "anatomy_level": 0}',
            "appearance_level must be an integer level, got True",
        ),
        (
            '{"appearance_level": 0, "anatomy_level": 3}',
            r"anatomy_level must be in \[0, 2\], got 3",
        ),
    ],
)
def test_read_chain_levels_refuses_bad_metadata(
    tmp_path: Path, content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_chain_levels(tmp_path)


def test_ensure_chain_federation_generates_once_and_reuses(
    generated: Generated,
) -> None:
    # Prepare
    stamp = (generated.folder / "federation.toml").stat().st_mtime_ns
    lines: list[str] = []

    # Execute
    again = ensure_chain_federation(
        generated.folder.parent, seed=SEED, progress=lines.append, **COUNTS
    )

    # Assert
    assert again == generated.folder
    assert generated.folder.name == f"synthetic-chain-v1-seed{SEED}-cases3-2-1"
    assert generated.progress[0].startswith("generating the synthetic chain")
    assert len(generated.progress) == 1 + len(EXPECTED_SITES)
    assert lines == []
    assert (again / "federation.toml").stat().st_mtime_ns == stamp


def test_write_chain_federation_refuses_an_existing_folder(
    generated: Generated,
) -> None:
    # Execute / Assert
    with pytest.raises(FileExistsError, match="already exists; choose a new folder"):
        write_chain_federation(generated.folder, seed=SEED, **COUNTS)


# --- determinism ---------------------------------------------------------------------


def read_site_arrays(site_dir: Path) -> dict[str, np.ndarray]:
    return {
        str(path.relative_to(site_dir)): read_volume(path).array
        for path in sorted(site_dir.rglob("*.nii.gz"))
    }


@pytest.mark.parametrize("name", ["T-bright-large", "L-dark-small"])
def test_a_site_is_the_same_written_alone_for_the_same_seed(
    generated: Generated, tmp_path: Path, name: str
) -> None:
    # Prepare
    site = next(site for site in generated.sites if site.name == name)

    # Execute: the site alone, without the other eight.
    write_chain_site(site, tmp_path / name, seed=SEED)

    # Assert
    expected = read_site_arrays(generated.folder / name)
    actual = read_site_arrays(tmp_path / name)
    assert sorted(actual) == sorted(expected)
    for relative, array in expected.items():
        np.testing.assert_array_equal(actual[relative], array, err_msg=relative)
    assert (tmp_path / name / "dataset.json").read_bytes() == (
        generated.folder / name / "dataset.json"
    ).read_bytes()


def test_another_seed_gives_other_cases(generated: Generated, tmp_path: Path) -> None:
    # Prepare
    target = generated.sites[0]

    # Execute
    write_chain_site(target, tmp_path / "other", seed=SEED + 1)

    # Assert
    expected = read_site_arrays(generated.folder / target.name)
    actual = read_site_arrays(tmp_path / "other")
    assert all(not np.array_equal(actual[key], expected[key]) for key in expected)


def test_more_target_labels_keep_the_evaluation_cases(
    generated: Generated, tmp_path: Path
) -> None:
    # Prepare
    target = generated.sites[0]  # one training case in the fixture
    more = dataclasses.replace(target, num_train_cases=3)

    # Execute
    write_chain_site(more, tmp_path / "more", seed=SEED)

    # Assert: training sets are nested, evaluation cases identical.
    few_index = index_site(generated.folder / target.name)
    more_index = index_site(tmp_path / "more")
    assert len(more_index.labelled) == 3
    np.testing.assert_array_equal(
        read_volume(more_index.labelled[0].image_path).array,
        read_volume(few_index.labelled[0].image_path).array,
    )
    for few_case, more_case in zip(
        few_index.evaluation, more_index.evaluation, strict=True
    ):
        np.testing.assert_array_equal(
            read_volume(more_case.label_path).array,  # type: ignore[arg-type]
            read_volume(few_case.label_path).array,  # type: ignore[arg-type]
        )
        np.testing.assert_array_equal(
            read_volume(more_case.image_path).array,
            read_volume(few_case.image_path).array,
        )


# --- the two factors, measured on the written data -----------------------------------


def test_anatomy_factor_sets_organ_size_and_not_appearance(
    generated: Generated, statistics: dict[str, SiteStatistics]
) -> None:
    # Prepare
    fraction = {name: s.foreground_fraction for name, s in statistics.items()}

    # Execute
    per_anatomy = pooled(generated.sites, fraction, by_anatomy)
    per_appearance = pooled(generated.sites, fraction, by_appearance)

    # Assert: large > medium > small by a wide margin; the appearance levels differ
    # by a small part of that (sampling only: labels never see the acquisition).
    assert per_anatomy[1] < 0.8 * per_anatomy[0]
    assert per_anatomy[2] < 0.8 * per_anatomy[1]
    spread = max(per_appearance) - min(per_appearance)
    assert spread < 0.25 * (per_anatomy[0] - per_anatomy[2])


def test_anatomy_factor_moves_the_organ_and_appearance_does_not(
    generated: Generated, statistics: dict[str, SiteStatistics]
) -> None:
    # Prepare (nominal: 4 px up and 2 px left per anatomy level, 4.5 px in all)
    rows = {name: s.organ_centre_px[0] for name, s in statistics.items()}
    cols = {name: s.organ_centre_px[1] for name, s in statistics.items()}

    # Execute
    per_anatomy = np.stack(
        [
            pooled(generated.sites, rows, by_anatomy),
            pooled(generated.sites, cols, by_anatomy),
        ],
        axis=1,
    )
    per_appearance = np.stack(
        [
            pooled(generated.sites, rows, by_appearance),
            pooled(generated.sites, cols, by_appearance),
        ],
        axis=1,
    )

    # Assert: each anatomy level moves the organ up and left; appearance levels agree.
    steps = per_anatomy[:-1] - per_anatomy[1:]
    assert (steps > 0).all()
    assert (np.linalg.norm(steps, axis=1) > 3.0).all()
    for first in range(3):
        for second in range(first + 1, 3):
            gap = np.linalg.norm(per_appearance[first] - per_appearance[second])
            assert gap < 1.75, (first, second)


def test_appearance_factor_sets_contrast_and_not_anatomy(
    generated: Generated, statistics: dict[str, SiteStatistics]
) -> None:
    # Prepare
    contrast = {name: s.contrast for name, s in statistics.items()}

    # Execute
    per_appearance = pooled(generated.sites, contrast, by_appearance)
    per_anatomy = pooled(generated.sites, contrast, by_anatomy)

    # Assert: bright > faint > 0 > dark (inverted); anatomy levels alike.
    assert per_appearance[0] > per_appearance[1] + 0.1
    assert per_appearance[1] > 0.1
    assert per_appearance[2] < -0.1
    assert max(per_anatomy) - min(per_anatomy) < 0.05


def test_every_site_shows_its_appearance_contrast(
    generated: Generated, statistics: dict[str, SiteStatistics]
) -> None:
    for site in generated.sites:
        # Execute
        measured = statistics[site.name].contrast

        # Assert
        nominal = APPEARANCES[site.appearance_level].organ_contrast
        assert measured == pytest.approx(nominal, abs=0.08), site.name


# --- the built-in federation is untouched --------------------------------------------


def test_builtin_federation_keeps_its_version_and_writes_generate_case(
    tmp_path: Path,
) -> None:
    # Prepare: the contract of core.data.synthetic before the chain generator existed.
    styles = build_site_styles(3)

    # Execute
    folder = tmp_path / "builtin"
    write_federation(folder, seed=SEED, num_sites=3, num_train_cases=1)

    # Assert
    assert GENERATOR_VERSION == 4
    assert get_builtin_federation_dir(
        tmp_path, seed=0, num_sites=6, num_train_cases=12, target_labelled=ALL_LABELLED
    ) == (tmp_path / "synthetic-v4-seed0-sites6-cases12")
    assert get_chain_federation_dir(tmp_path, seed=0, **COUNTS).name.startswith(
        "synthetic-chain-"
    )
    assert (folder / "federation.toml").read_text() == (
        "# Synthetic SiteBridge federation (core/data/synthetic.py).\n"
        f'target = "A"\nseed = {SEED}\n'
    )
    for site_index, style in enumerate(styles):
        site_dir = folder / style.name
        assert json.loads((site_dir / "dataset.json").read_text()) == {
            "name": f"synthetic site {style.name}",
            "modality": "synthetic-MR",
            "labels": {"0": "background", "1": "organ"},
            "shift": style.shift,
        }
        for case_index, split in ((0, "Tr"), (1, "Ts")):
            expected = generate_case(
                style, np.random.default_rng([SEED, site_index, case_index])
            )
            stem = f"{style.name.lower()}_{case_index:03d}"
            image = read_volume(site_dir / f"images{split}" / f"{stem}_0000.nii.gz")
            label = read_volume(site_dir / f"labels{split}" / f"{stem}.nii.gz")
            np.testing.assert_array_equal(image.array, expected.image)
            np.testing.assert_array_equal(label.array, expected.label)
            assert image.spacing_mm == pytest.approx((1.5, 1.5, 3.0))
            assert image.origin_mm == (0.0, 0.0, 0.0)
