"""The affinity phase's distance with and without the polarity term (no Flower run).

Five chain sites (core/data/synthetic_chain.py) with 2 labelled cases each; the
target is ``T-bright-large``. :func:`choose_affinity_path` must give the paper's
two-term matrices when ``affinity.polarity-weight`` is 0 and add ``c * P_norm`` when
it is not; a site without the polarity term drops the term, as for the label term.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core.affinity.graph import TaskFactors
from core.affinity.profile import SiteProfile, build_site_profile, profile_settings
from core.config import ConfigValue, RunConfig, load_default_config
from core.data.synthetic_chain import build_chain_sites, write_chain_site
from server.phases.affinity import choose_affinity_path

SITES = (
    "T-bright-large",
    "I-bright-medium",
    "I-dark-large",
    "L-dark-medium",
    "L-faint-medium",
)
TARGET = "T-bright-large"
# Stated here, not taken from pyproject, whose calibrated weights may change.
WEIGHTS: dict[str, ConfigValue] = {
    "affinity.min-hops": 1,
    "affinity.image-weight": 1.0,
    "affinity.label-weight": 0.5,
}


@pytest.fixture(scope="module")
def chain_profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteProfile]:
    folder = tmp_path_factory.mktemp("chain")
    settings = profile_settings(load_default_config().affinity, polarity=True)
    profiles = {}
    for site in build_chain_sites(
        num_train_cases=2, num_intermediate_cases=2, num_target_cases=2
    ):
        if site.name in SITES:
            write_chain_site(site, folder / site.name, seed=0)
            profiles[site.name] = build_site_profile(folder / site.name, settings)
    return profiles


def _choose(config: RunConfig, profiles: dict[str, SiteProfile]) -> dict[str, object]:
    factors = {name: TaskFactors(modality="CT", labels=("organ",)) for name in SITES}
    sources = [name for name in SITES if name != TARGET]
    _choice, matrices = choose_affinity_path(
        config, profiles, sources, TARGET, factors=factors
    )
    return matrices


def test_polarity_weight_adds_its_term_and_zero_keeps_the_paper_form(
    chain_profiles: dict[str, SiteProfile],
) -> None:
    # Prepare
    paper = load_default_config(**{**WEIGHTS, "affinity.polarity-weight": 0.0})
    weighed = load_default_config(**{**WEIGHTS, "affinity.polarity-weight": 1.0})

    # Execute
    two_terms = _choose(paper, chain_profiles)
    three_terms = _choose(weighed, chain_profiles)

    # Assert
    assert two_terms["polarity_term"] is False
    assert two_terms["polarity_distance"] is None
    assert two_terms["weights"] == {"image": 1.0, "label": 0.5, "polarity": 0.0}
    assert three_terms["polarity_term"] is True
    assert three_terms["weights"]["polarity"] == 1.0  # type: ignore[index]
    sites = three_terms["sites"]
    assert isinstance(sites, list)
    polarity = np.array(three_terms["polarity_distance"])
    target = sites.index(TARGET)
    dark = sites.index("I-dark-large")
    bright = sites.index("I-bright-medium")
    assert polarity[dark, target] > 5 * polarity[bright, target]
    added = np.array(three_terms["distance"]) - np.array(two_terms["distance"])
    assert added[dark, target] == pytest.approx(1.0, abs=0.1)
    assert added[bright, target] == pytest.approx(0.0, abs=0.05)


def test_a_site_without_the_polarity_term_drops_it(
    chain_profiles: dict[str, SiteProfile],
) -> None:
    # Prepare: one source released no polarity term
    profiles = dict(chain_profiles)
    profiles["L-faint-medium"] = dataclasses.replace(
        profiles["L-faint-medium"], foreground_intensities=None, shell_intensities=None
    )
    weighed = load_default_config(**{**WEIGHTS, "affinity.polarity-weight": 1.0})

    # Execute
    matrices = _choose(weighed, profiles)

    # Assert
    assert matrices["polarity_term"] is False
    assert matrices["weights"]["polarity"] == 0.0  # type: ignore[index]
    assert matrices["polarity_distance"] is None
