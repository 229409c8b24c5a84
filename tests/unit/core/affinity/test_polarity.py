"""The polarity term: built from real chain sites, its wire contract, P, its DP release.

Three sites of the chain federation (core/data/synthetic_chain.py), written with 2
labelled cases each: the target's ``bright`` appearance at two anatomies and the
inverted ``dark`` appearance. Their polarity terms must put the inverted site far from
the bright ones and the two bright ones close, whatever the anatomy.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from core import protocol
from core.affinity.matrix import (
    affinity_matrices,
    contrast_function,
    distance_matrix,
    has_polarity,
    normalise,
    normalise_polarity,
    polarity_distance,
    polarity_matrix,
)
from core.affinity.profile import (
    SiteProfile,
    build_polarity_quantiles,
    build_site_profile,
    profile_settings,
)
from core.affinity.profile_noise import (
    compute_gaussian_epsilon,
    get_profile_sensitivity,
    noise_profile,
)
from core.config import load_default_config
from core.data.synthetic_chain import build_chain_sites, write_chain_site

AFFINITY = load_default_config().affinity
POLARITY = profile_settings(AFFINITY, polarity=True)
CHAIN_SITES = ("T-bright-large", "I-bright-small", "I-dark-large")


@pytest.fixture(scope="module")
def chain_profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteProfile]:
    folder = tmp_path_factory.mktemp("chain")
    sites = build_chain_sites(
        num_train_cases=2, num_intermediate_cases=2, num_target_cases=2
    )
    profiles = {}
    for site in sites:
        if site.name in CHAIN_SITES:
            write_chain_site(site, folder / site.name, seed=0)
            profiles[site.name] = build_site_profile(folder / site.name, POLARITY)
    return profiles


def test_polarity_is_computed_only_when_weighed_or_forced():
    paper = dataclasses.replace(AFFINITY, polarity_weight=0.0)
    assert profile_settings(paper).polarity_quantiles == 0
    weighed = dataclasses.replace(AFFINITY, polarity_weight=0.5)
    assert profile_settings(weighed).polarity_quantiles == AFFINITY.polarity_quantiles
    assert profile_settings(weighed, polarity=False).polarity_quantiles == 0
    assert POLARITY.polarity_quantiles == AFFINITY.polarity_quantiles


def test_settings_and_config_refuse_bad_polarity_values():
    with pytest.raises(ValueError, match="polarity_quantiles must be >= 0"):
        dataclasses.replace(POLARITY, polarity_quantiles=-1)
    with pytest.raises(ValueError, match="polarity_shell >= 1"):
        dataclasses.replace(POLARITY, polarity_shell=0)
    for key, value, message in [
        ("affinity.polarity-weight", -0.1, "affinity.polarity-weight must be >= 0"),
        ("affinity.polarity-weight", math.inf, "affinity.polarity-weight must be"),
        ("affinity.polarity-quantiles", 0, "affinity.polarity-quantiles must be >= 1"),
        ("affinity.polarity-shell", 0, "affinity.polarity-shell must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_default_config(**{key: value})


def test_case_quantiles_see_the_sign_of_the_contrast():
    image = np.zeros((2, 20, 20), dtype=np.float32)
    image[:, 8:12, 8:12] = 1.0
    label = (image > 0).astype(np.int64)
    inside, shell = build_polarity_quantiles(image, label, settings=POLARITY)
    inverted_inside, inverted_shell = build_polarity_quantiles(
        -image, label, settings=POLARITY
    )
    assert inside.shape == shell.shape == (POLARITY.polarity_quantiles,)
    assert np.all(inside > shell)
    assert np.all(inverted_inside < inverted_shell)
    np.testing.assert_allclose(inverted_inside, -inside, atol=1e-6)
    # an empty foreground gives zeros, so the case still weighs as one case
    empty = build_polarity_quantiles(image, np.zeros_like(label), settings=POLARITY)
    np.testing.assert_array_equal(empty[0], 0.0)
    np.testing.assert_array_equal(empty[1], 0.0)
    with pytest.raises(ValueError, match="polarity_quantiles = 0"):
        build_polarity_quantiles(
            image, label, settings=dataclasses.replace(POLARITY, polarity_quantiles=0)
        )
    with pytest.raises(ValueError, match="label shape"):
        build_polarity_quantiles(image, label[:1], settings=POLARITY)


def test_inverted_contrast_site_is_far_and_same_polarity_site_is_near(
    chain_profiles,
):
    bright, bright_small, dark = (chain_profiles[name] for name in CHAIN_SITES)
    for profile in (bright, bright_small, dark):
        assert profile.foreground_intensities is not None
        assert profile.foreground_intensities.shape == (POLARITY.polarity_quantiles,)
    assert np.all(contrast_function(bright) > 0)
    assert np.all(contrast_function(dark) < 0)
    near = polarity_distance(bright, bright_small)
    far = polarity_distance(bright, dark)
    assert far > 5 * near
    assert polarity_distance(dark, bright) == far
    matrix = polarity_matrix(chain_profiles)
    assert matrix.get("T-bright-large", "I-dark-large") == pytest.approx(far)
    normalised = normalise_polarity(matrix)
    assert normalised.get("T-bright-large", "I-bright-small") == 0.0
    assert normalised.get("T-bright-large", "I-dark-large") > 0.9
    assert normalised.values.max() == 1.0
    np.testing.assert_array_equal(np.diag(normalised.values), 0.0)


def test_polarity_weight_zero_is_exactly_the_two_term_distance(chain_profiles):
    image_norm, label_norm = normalise(*affinity_matrices(chain_profiles))
    polarity_norm = normalise_polarity(polarity_matrix(chain_profiles))
    paper = distance_matrix(image_norm, label_norm, image_weight=1.0, label_weight=0.5)
    same = distance_matrix(
        image_norm,
        label_norm,
        image_weight=1.0,
        label_weight=0.5,
        polarity_norm=polarity_norm,
        polarity_weight=0.0,
    )
    np.testing.assert_array_equal(same.values, paper.values)
    weighed = distance_matrix(
        image_norm,
        label_norm,
        image_weight=1.0,
        label_weight=0.5,
        polarity_norm=polarity_norm,
        polarity_weight=2.0,
    )
    np.testing.assert_allclose(
        weighed.values, paper.values + 2.0 * polarity_norm.values
    )
    # the weighed term moves the inverted site away from the target
    assert weighed.get("I-dark-large", "T-bright-large") > weighed.get(
        "I-bright-small", "T-bright-large"
    )


def test_distance_refuses_a_bad_polarity_term(chain_profiles):
    image_norm, label_norm = normalise(*affinity_matrices(chain_profiles))
    polarity_norm = normalise_polarity(polarity_matrix(chain_profiles))
    with pytest.raises(ValueError, match=r"polarity_weight is 1\.0 but no P_norm"):
        distance_matrix(image_norm, label_norm, polarity_weight=1.0)
    with pytest.raises(ValueError, match="polarity_weight must be finite and >= 0"):
        distance_matrix(
            image_norm, label_norm, polarity_norm=polarity_norm, polarity_weight=-1.0
        )
    two = {name: chain_profiles[name] for name in CHAIN_SITES[:2]}
    with pytest.raises(ValueError, match="P_norm and H_norm cover different sites"):
        distance_matrix(
            image_norm,
            label_norm,
            polarity_norm=normalise_polarity(polarity_matrix(two)),
            polarity_weight=1.0,
        )


def test_polarity_distance_refuses_a_profile_without_the_term(chain_profiles):
    bright = chain_profiles["T-bright-large"]
    plain = dataclasses.replace(
        bright, foreground_intensities=None, shell_intensities=None
    )
    assert not has_polarity({"a": plain, "b": bright})
    assert has_polarity(chain_profiles)
    with pytest.raises(ValueError, match="has no polarity term"):
        polarity_distance(plain, bright)
    shorter = dataclasses.replace(
        bright,
        site="S",
        foreground_intensities=bright.foreground_intensities[:3],
        shell_intensities=bright.shell_intensities[:3],
    )
    with pytest.raises(ValueError, match="polarity terms of different lengths"):
        polarity_distance(bright, shorter)
    with pytest.raises(ValueError, match="is filed under"):
        polarity_matrix({"X": bright})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shell_intensities": None}, "must come together"),
        ({"foreground_intensities": None}, "must come together"),
        (
            {"foreground_intensities": [0.0, 5.0]},
            "must be vectors of the same length",
        ),
        (
            {"shell_intensities": [9.0] * 9},
            r"shell_intensities must lie in \[-4.0, 4.0\]",
        ),
        (
            {"foreground_intensities": [math.nan] * 9},
            "foreground_intensities holds NaN or inf",
        ),
        (
            {"foreground_intensities": [], "shell_intensities": []},
            "same length >= 1",
        ),
    ],
)
def test_profile_refuses_a_bad_polarity_term(chain_profiles, change, message):
    values = chain_profiles["T-bright-large"].to_dict()
    with pytest.raises(ValueError, match=message):
        SiteProfile.from_dict({**values, **change})


def test_profile_refuses_a_polarity_term_without_labelled_cases(chain_profiles):
    bright = chain_profiles["T-bright-large"]
    with pytest.raises(ValueError, match="a polarity term needs labelled cases"):
        dataclasses.replace(
            bright, num_labelled=0, mean_label_map=None, foreground_quantiles=None
        )


def test_polarity_term_round_trips_through_dict_and_wire(chain_profiles):
    profile = chain_profiles["I-dark-large"]
    values = profile.to_dict()
    assert isinstance(values["foreground_intensities"], list)
    rebuilt = SiteProfile.from_dict(values)
    np.testing.assert_array_equal(rebuilt.shell_intensities, profile.shell_intensities)
    reply = protocol.ProfileReply.from_profile_values(values)
    fields = reply.to_fields()
    assert len(fields["foreground-intensities"]) == POLARITY.polarity_quantiles
    parsed = protocol.ProfileReply.from_fields(fields)
    again = SiteProfile.from_dict(parsed.profile_values(profile.site))
    np.testing.assert_array_equal(
        again.foreground_intensities, profile.foreground_intensities
    )
    # a profile without the term sends no polarity fields at all
    plain = dataclasses.replace(
        profile, foreground_intensities=None, shell_intensities=None
    )
    plain_fields = protocol.ProfileReply.from_profile_values(
        plain.to_dict()
    ).to_fields()
    assert "foreground-intensities" not in plain_fields
    assert "shell-intensities" not in plain_fields


def test_wire_refuses_half_a_polarity_term_or_one_without_labels(chain_profiles):
    fields = protocol.ProfileReply.from_profile_values(
        chain_profiles["I-dark-large"].to_dict()
    ).to_fields()
    half = {key: value for key, value in fields.items() if key != "shell-intensities"}
    with pytest.raises(ValueError, match="shell-intensities"):
        protocol.ProfileReply.from_fields(half)
    reply = protocol.ProfileReply.from_fields(fields)
    with pytest.raises(ValueError, match="come only with a label term"):
        dataclasses.replace(
            reply, label_grid=0, mean_label_map=None, foreground_quantiles=None
        )
    with pytest.raises(ValueError, match="must come together"):
        dataclasses.replace(reply, shell_intensities=None)


def test_dp_release_noises_the_polarity_term_and_accounts_for_it(chain_profiles):
    profile = chain_profiles["T-bright-large"]
    sensitivity = get_profile_sensitivity(profile)
    count = POLARITY.polarity_quantiles
    assert sensitivity.num_parts == 4
    assert sensitivity.polarity == pytest.approx(
        2.0 * profile.quantile_clip * math.sqrt(2 * count) / profile.num_labelled
    )
    plain = dataclasses.replace(
        profile, foreground_intensities=None, shell_intensities=None
    )
    assert get_profile_sensitivity(plain).num_parts == 3
    assert get_profile_sensitivity(plain).polarity == 0.0
    released, epsilon = noise_profile(
        profile, noise_multiplier=1.0, delta=1e-5, rng=np.random.default_rng(0)
    )
    assert epsilon == pytest.approx(
        compute_gaussian_epsilon(1.0, delta=1e-5, num_mechanisms=4)
    )
    assert epsilon > compute_gaussian_epsilon(1.0, delta=1e-5, num_mechanisms=3)
    inside, shell = released.foreground_intensities, released.shell_intensities
    assert inside is not None
    assert shell is not None
    assert not np.array_equal(inside, profile.foreground_intensities)
    for values in (inside, shell):
        assert values.shape == (count,)
        assert np.all(np.diff(values) >= 0)
        assert np.all(np.abs(values) <= profile.quantile_clip)


def test_site_profile_without_labels_has_no_polarity_term(
    federation: Path, tmp_path: Path
):
    site = tmp_path / "U"
    shutil.copytree(federation / "A", site)
    shutil.rmtree(site / "labelsTr")
    profile = build_site_profile(site, POLARITY)
    assert profile.num_labelled == 0
    assert profile.foreground_intensities is None
    assert profile.shell_intensities is None
