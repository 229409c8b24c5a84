"""A site's task profile: settings, resizing, image quantiles, the wire form."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from core.affinity.profile import (
    SiteProfile,
    build_image_quantiles,
    build_site_profile,
    profile_settings,
    resize_volume,
)
from core.config import load_default_config

# The paper's profile, as conftest.py's fixtures build it (the polarity term's own
# tests are test_polarity.py).
SETTINGS = profile_settings(load_default_config().affinity, polarity=False)


def test_settings_reject_bad_values():
    for changes, message in [
        ({"image_size": 1}, "image_size must be >= 2"),
        ({"pca_variance": 0.0}, "pca_variance must be in"),
        ({"quantile_clip": -1.0}, "quantile_clip must be > 0"),
        ({"num_foreground_quantiles": 0}, "num_foreground_quantiles must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(SETTINGS, **changes)  # type: ignore[arg-type]


def test_resize_volume_keeps_range_and_constants():
    ramp = np.linspace(0, 1, 10 * 64 * 64).reshape(10, 64, 64)
    resized = resize_volume(ramp, 32)
    assert resized.shape == (32, 32, 32)
    assert resized.min() >= 0.0
    assert resized.max() <= 1.0
    np.testing.assert_allclose(resize_volume(np.full((7, 9, 11), 2.5), 4), 2.5)


def test_image_quantiles_ignore_affine_intensity_changes():
    image = np.random.default_rng(5).normal(size=(10, 40, 40)).astype(np.float32)
    image[:, 10:20, 10:20] += 3.0
    expected = build_image_quantiles(image, settings=SETTINGS)
    actual = build_image_quantiles(image * 40.0 + 300.0, settings=SETTINGS)
    assert expected.shape == (SETTINGS.num_quantiles,)
    np.testing.assert_allclose(actual, expected, atol=1e-4)
    assert np.all(np.diff(expected) >= 0)
    constant = build_image_quantiles(np.ones((4, 8, 8)), settings=SETTINGS)
    np.testing.assert_array_equal(constant, 0.0)


def test_site_profile_shapes_and_counts(profiles):
    profile = profiles["A"]
    grid = SETTINGS.label_grid
    assert profile.image_quantiles.shape == (SETTINGS.num_quantiles,)
    assert profile.mean_label_map is not None
    assert profile.mean_label_map.shape == (grid, grid, grid)
    assert profile.foreground_quantiles is not None
    assert profile.foreground_quantiles.shape == (SETTINGS.num_foreground_quantiles,)
    # Two training cases; the six evaluation cases are never read.
    assert (profile.num_images, profile.num_labelled) == (2, 2)
    assert profile.noise is None
    assert 0 < profile.mean_label_map.max() <= 1
    assert np.all(np.abs(profile.image_quantiles) <= SETTINGS.quantile_clip)


def test_site_profile_is_deterministic(federation, profiles):
    again = build_site_profile(federation / "B", SETTINGS)
    assert again.to_dict() == profiles["B"].to_dict()


def test_profile_round_trips_through_a_plain_dict(profiles, unlabelled_profile):
    for profile in (profiles["A"], unlabelled_profile):
        wire = json.loads(json.dumps(profile.to_dict()))
        restored = SiteProfile.from_dict(wire)
        assert restored.to_dict() == profile.to_dict()
        np.testing.assert_array_equal(restored.image_quantiles, profile.image_quantiles)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda wire: wire.pop("epsilon"), r"missing \['epsilon'\]"),
        (lambda wire: wire.update(extra=1), r"unknown \['extra'\]"),
        (lambda wire: wire.update(label_grid=4), "not label_grid"),
        (lambda wire: wire.update(num_images="2"), "must be integers"),
        (lambda wire: wire.update(image_quantiles=[9.0, 9.0]), r"must lie in \[-4"),
        (lambda wire: wire.update(mean_label_map=None), "must be given together"),
        (lambda wire: wire.update(num_labelled=0), "only with num_labelled > 0"),
    ],
)
def test_profile_from_dict_rejects_bad_input(profiles, change, message):
    wire = profiles["A"].to_dict()
    change(wire)
    with pytest.raises(ValueError, match=message):
        SiteProfile.from_dict(wire)


def test_a_profile_may_have_labelled_cases_without_its_label_term(profiles):
    # A site with fewer labelled cases than its limits.min-cases withholds the term
    # (the reply still says how many it has): the coordinator must accept it.
    wire = profiles["A"].to_dict()
    wire.update(
        num_labelled=1,
        label_grid=None,
        mean_label_map=None,
        foreground_quantiles=None,
        foreground_intensities=None,
        shell_intensities=None,
    )

    restored = SiteProfile.from_dict(wire)

    assert restored.num_labelled == 1
    assert restored.mean_label_map is None
