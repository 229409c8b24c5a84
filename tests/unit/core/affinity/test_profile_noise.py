"""The DP release of a task profile: sensitivities, epsilon against Opacus."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from core.affinity.job import release_profile
from core.affinity.profile import SiteProfile, midpoint_quantiles, profile_settings
from core.affinity.profile_noise import (
    RDP_ORDERS,
    compute_gaussian_epsilon,
    get_profile_sensitivity,
    noise_profile,
)
from core.config import load_default_config
from core.privacy.dp import (
    AccountantState,
    DpSettings,
    PrivacyBudgetError,
    read_accountant_state,
    write_accountant_state,
)

# The paper's profile (no polarity term, whatever pyproject weighs): the polarity
# term's own tests are test_polarity.py.
SETTINGS = profile_settings(load_default_config().affinity, polarity=False)


@pytest.mark.parametrize("noise_multiplier", [0.7, 1.0, 2.5, 8.0])
@pytest.mark.parametrize("num_mechanisms", [1, 3])
def test_epsilon_equals_opacus_rdp_accountant(noise_multiplier, num_mechanisms):
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, 1.0, num_mechanisms)]
    expected = accountant.get_epsilon(1e-5, alphas=list(RDP_ORDERS))
    actual = compute_gaussian_epsilon(
        noise_multiplier, delta=1e-5, num_mechanisms=num_mechanisms
    )
    assert actual == pytest.approx(expected, rel=1e-12)
    assert actual == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)


def test_rdp_orders_are_opacus_defaults():
    np.testing.assert_array_equal(RDP_ORDERS, RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.parametrize("site", ["A", "U"])
def test_noised_profile_records_opacus_epsilon_and_stays_valid(
    profiles, unlabelled_profile, site
):
    # Prepare
    profile = unlabelled_profile if site == "U" else profiles[site]
    parts = 1 if site == "U" else 3
    accountant = RDPAccountant()
    accountant.history = [(1.5, 1.0, parts)]
    # Execute
    noised, epsilon = noise_profile(
        profile, noise_multiplier=1.5, delta=1e-5, rng=np.random.default_rng(0)
    )
    again, _ = noise_profile(
        profile, noise_multiplier=1.5, delta=1e-5, rng=np.random.default_rng(0)
    )
    # Assert
    assert epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert noised.noise is not None
    assert noised.noise.epsilon == epsilon
    assert again.to_dict() == noised.to_dict()
    assert not np.array_equal(noised.image_quantiles, profile.image_quantiles)
    assert np.all(np.diff(noised.image_quantiles) >= 0)
    assert SiteProfile.from_dict(noised.to_dict()).to_dict() == noised.to_dict()
    if noised.mean_label_map is not None:
        assert 0.0 <= noised.mean_label_map.min() <= noised.mean_label_map.max() <= 1.0


def test_noise_has_the_documented_scale(profiles):
    profile = profiles["A"]
    sensitivity = get_profile_sensitivity(profile)
    grid, count = SETTINGS.label_grid, SETTINGS.num_quantiles
    assert sensitivity.image == pytest.approx(2 * 4.0 * math.sqrt(count) / 2)
    assert sensitivity.label_map == pytest.approx(math.sqrt(grid**3) / 2)
    assert sensitivity.foreground == pytest.approx(math.sqrt(6))  # ceil(11 / 2)
    assert sensitivity.num_parts == 3


@pytest.mark.parametrize("num_cases", [1, 2, 3, 5, 11, 20])
def test_foreground_quantile_sensitivity_bounds_replace_one(num_cases):
    # Prepare: random and extreme fraction sets, each case replaced by 0 or 1.
    rng = np.random.default_rng(num_cases)
    count = SETTINGS.num_foreground_quantiles
    bound = math.sqrt(min(count, math.ceil(count / num_cases)))
    samples = [rng.random(num_cases) for _ in range(50)]
    samples += [
        np.r_[np.zeros(zeros), np.ones(num_cases - zeros)]
        for zeros in range(num_cases + 1)
    ]
    worst = 0.0
    for fractions in samples:
        before = midpoint_quantiles(fractions, count)
        for index, value in itertools.product(range(num_cases), (0.0, 1.0)):
            changed = fractions.copy()
            changed[index] = value
            after = midpoint_quantiles(changed, count)
            worst = max(worst, float(np.linalg.norm(after - before)))
    # Assert: the bound holds and is attained (0/1 fractions, one case flipped).
    assert worst <= bound + 1e-12
    assert worst == pytest.approx(bound)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": 0.0, "delta": 1e-5}, "noise_multiplier must be > 0"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, r"delta must be in \(0, 1\)"),
    ],
)
def test_noise_profile_rejects_bad_parameters(profiles, kwargs, message):
    with pytest.raises(ValueError, match=message):
        noise_profile(profiles["A"], rng=np.random.default_rng(0), **kwargs)


def test_noise_profile_refuses_a_noised_profile(profiles):
    noised, _ = noise_profile(
        profiles["A"], noise_multiplier=1.0, delta=1e-5, rng=np.random.default_rng(0)
    )
    with pytest.raises(ValueError, match="site A: profile is already noised"):
        noise_profile(
            noised, noise_multiplier=1.0, delta=1e-5, rng=np.random.default_rng(0)
        )


DP = DpSettings(
    noise_multiplier=2.0,
    target_epsilon=None,
    delta=1e-5,
    max_grad_norm=1.0,
    budget_epsilon=100.0,
)


def test_a_profile_release_is_reserved_in_the_accountant_as_one_case_units(
    federation: Path, tmp_path: Path
) -> None:
    # Prepare: an earlier entry without units per case (an old accountant file)
    accountant = tmp_path / "accountant.json"
    write_accountant_state(AccountantState(((1.0, 0.5, 10),)), accountant)

    # Execute
    released = release_profile(
        federation / "A",
        load_default_config(**{"affinity.polarity-weight": 0.0}),  # the paper's form
        dp=DP,
        accountant_path=accountant,
        rng=np.random.default_rng(0),
    )

    # Assert: three Gaussian mechanisms at rate 1, each already case-level
    saved = read_accountant_state(accountant)
    assert saved.history == ((1.0, 0.5, 10), (2.0, 1.0, 3))
    assert saved.units_per_case == (None, 1)
    spend = released.privacy
    assert spend is not None
    assert spend.patient_epsilon_spent == spend.epsilon_spent
    assert spend.epsilon_spent == pytest.approx(
        compute_gaussian_epsilon(2.0, delta=1e-5, num_mechanisms=3), rel=1e-12
    )
    assert spend.patient_epsilon_total is None  # the old entry states no units
    assert released.profile.noise is not None


def test_a_profile_release_over_budget_records_nothing(
    federation: Path, tmp_path: Path
) -> None:
    # Prepare
    accountant = tmp_path / "accountant.json"
    write_accountant_state(AccountantState(((2.0, 1.0, 3),), (1,)), accountant)
    written = accountant.read_bytes()
    tight = DpSettings(
        noise_multiplier=2.0,
        target_epsilon=None,
        delta=1e-5,
        max_grad_norm=1.0,
        budget_epsilon=read_accountant_state(accountant).epsilon(1e-5) + 1e-3,
    )

    # Execute / Assert
    with pytest.raises(PrivacyBudgetError, match="budget is epsilon"):
        release_profile(
            federation / "A",
            load_default_config(),
            dp=tight,
            accountant_path=accountant,
        )
    assert accountant.read_bytes() == written
