"""A site's fingerprint (core.planning.fingerprint, core.planning.job) on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.config import load_default_config
from core.planning.fingerprint import compute_fingerprint, foreground_statistics
from core.planning.job import ct_sensitivity, release_fingerprint
from core.privacy.dp import DpSettings
from tests.conftest import copy_as_ct_site


@pytest.fixture
def ct_site(federation: Path, tmp_path: Path) -> Path:
    """Site A again, its dataset.json saying CT (its intensities are not HU)."""
    return copy_as_ct_site(federation / "A", tmp_path / "A-ct")


def test_an_mr_site_releases_its_geometry_only(federation: Path) -> None:
    found = compute_fingerprint(federation / "A", num_classes=2)

    assert found.num_images == 2
    assert found.shape == (10.0, 64.0, 64.0)
    assert found.spacing_mm[2] == pytest.approx(3.0)
    assert found.ct_intensities is None
    assert found.num_labelled == 0


def test_a_ct_site_adds_its_foreground_intensities(ct_site: Path) -> None:
    found = compute_fingerprint(ct_site, num_classes=2)

    assert found.num_labelled == 2
    assert found.ct_intensities is not None
    low, median, high, mean, sd = found.ct_intensities
    assert low <= median <= high
    assert low <= mean <= high
    assert sd > 0


def test_a_labelled_case_without_foreground_adds_nothing() -> None:
    image = np.full((2, 4, 4), 50.0, dtype=np.float32)
    assert foreground_statistics(image, np.zeros((2, 4, 4), dtype=np.int64)) is None


def test_intensities_are_clipped_to_the_stored_hu_range() -> None:
    image = np.array([[[-5000.0, 9000.0]]], dtype=np.float32)
    label = np.ones_like(image, dtype=np.int64)

    statistics = foreground_statistics(image, label)

    assert statistics is not None
    assert min(statistics[:4]) >= -1024.0
    assert max(statistics[:4]) <= 3071.0


def test_the_release_under_dp_is_noised_at_its_sensitivity(ct_site: Path) -> None:
    # Prepare
    config = load_default_config()
    dp = DpSettings(
        noise_multiplier=2.0,
        target_epsilon=None,
        delta=1e-5,
        max_grad_norm=1.0,
        budget_epsilon=10.0,
    )

    # Execute
    exact = release_fingerprint(ct_site, config, min_cases=2)
    private = release_fingerprint(
        ct_site, config, min_cases=2, dp=dp, rng=np.random.default_rng(0)
    )

    # Assert
    assert exact.privacy is None
    assert private.privacy is not None
    assert private.privacy.epsilon_spent > 0
    assert private.fingerprint.spacing_mm == exact.fingerprint.spacing_mm
    assert private.fingerprint.ct_intensities != exact.fingerprint.ct_intensities
    assert ct_sensitivity(2) == pytest.approx(ct_sensitivity(12) * 6)


def test_the_ct_term_stays_home_below_min_cases(ct_site: Path) -> None:
    released = release_fingerprint(ct_site, load_default_config(), min_cases=3)

    assert released.fingerprint.ct_intensities is None
    assert "limits.min-cases is 3" in released.withheld
