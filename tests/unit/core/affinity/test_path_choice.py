"""The run's transfer path under ``affinity.landmarks`` and the one-factor rule."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from core.affinity.graph import TaskFactors
from core.affinity.matrix import SiteMatrix
from core.affinity.path_choice import Community, choose_path
from core.affinity.paths import (
    TransferPath,
    cheapest_path,
    paper_path,
    path_order,
    start_sites,
)
from core.config import AffinityConfig, LandmarkRule, load_default_config
from tests.unit.core.affinity.test_graph import SIX, two_clusters

SEVEN = (*SIX, "T")
# The target T is near D, E, F (0.5-1) and 3 from A, B, C.
TO_TARGET = {"A": 3.0, "B": 3.0, "C": 3.0, "D": 1.0, "E": 0.5, "F": 0.8}
# Landmarks: A (0.1/10 + 0.2/10 = 0.03, B 0.0475, C 0.0575) and E (0.1/10 + 0.15/10 =
# 0.025, D 0.06, F 0.065).
CASES = {"A": 8, "B": 2, "C": 2, "D": 2, "E": 8, "F": 2}


def clustered_with_target(**to_target: float) -> SiteMatrix:
    """The two clusters and T, at ``TO_TARGET`` updated by ``to_target``."""
    values = np.zeros((7, 7))
    values[:6, :6] = two_clusters()
    for site, value in (TO_TARGET | to_target).items():
        values[SIX.index(site), 6] = values[6, SIX.index(site)] = value
    return SiteMatrix(sites=SEVEN, values=values)


def affinity(**changes: object) -> AffinityConfig:
    return dataclasses.replace(load_default_config().affinity, **changes)


COMMUNITIES = affinity(landmarks=LandmarkRule.COMMUNITIES)


# -------------------------------------------------------------- case-fraction


@pytest.mark.parametrize("seed", range(6))
def test_default_config_chooses_as_before(seed):
    # Prepare: the default is case-fraction landmarks, no one-factor rule
    rng = np.random.default_rng(seed)
    values = rng.random((6, 6)).round(1)
    np.fill_diagonal(values, 0.0)
    distances = SiteMatrix(sites=tuple("ABCDET"), values=values)
    labelled = dict(zip("ABCDE", rng.integers(0, 9, size=5).tolist(), strict=True))
    config = load_default_config().affinity

    # Execute
    choice = choose_path(distances, labelled=labelled, target="T", affinity=config)
    before = cheapest_path(
        distances,
        sources=sorted(labelled),
        target="T",
        min_hops=config.min_hops,
        max_hops=config.max_hops,
        landmarks=start_sites(labelled, fraction=config.start_case_fraction),
    )

    # Assert
    assert config.landmarks is LandmarkRule.CASE_FRACTION
    assert config.one_factor_edges is False
    assert choice.path == before
    assert choice.starts == tuple(start_sites(labelled, fraction=0.5))
    assert choice.communities == ()
    assert choice.removed == ()


# ---------------------------------------------------------------- communities


def test_communities_path_starts_at_a_landmark_and_stays_in_its_community():
    # Prepare
    distances = clustered_with_target()

    # Execute
    choice = choose_path(distances, labelled=CASES, target="T", affinity=COMMUNITIES)
    anywhere = choose_path(
        distances, labelled=CASES, target="T", affinity=affinity(start_case_fraction=0)
    )

    # Assert: E -> F -> T costs 0.5 + 0.15 + 0.8 = 1.45, E -> D -> T 1.6, A -> B -> T
    # 6.1. Any start allowed, F -> E -> T ties at 1.45 with the lower path length.
    assert choice.communities == (
        Community(members=("A", "B", "C"), landmark="A"),
        Community(members=("D", "E", "F"), landmark="E"),
    )
    assert choice.starts == ("A", "E")
    assert choice.path == TransferPath(
        nodes=("E", "F", "T"), cost=pytest.approx(1.45), path_length=pytest.approx(0.95)
    )
    assert anywhere.path.nodes == ("F", "E", "T")


@pytest.mark.parametrize("seed", range(6))
def test_communities_path_is_the_best_landmark_path_within_a_community(seed):
    # Prepare: random distances to the target; the communities stay A-C and D-F
    rng = np.random.default_rng(seed)
    to_target = rng.uniform(0.0, 4.0, size=6).round(1).tolist()
    distances = clustered_with_target(**dict(zip(SIX, to_target, strict=True)))
    labelled = dict(zip(SIX, rng.integers(1, 9, size=6).tolist(), strict=True))

    # Execute
    choice = choose_path(distances, labelled=labelled, target="T", affinity=COMMUNITIES)

    # Assert: brute force over every landmark and every other site of its community
    candidates = [
        paper_path(distances, landmarks=[c.landmark], candidates=[i], target="T")
        for c in choice.communities
        for i in c.members
        if i != c.landmark
    ]
    assert choice.path == min(candidates, key=path_order)
    community = next(c for c in choice.communities if choice.path.nodes[0] in c.members)
    assert choice.path.nodes[0] == community.landmark
    assert choice.path.nodes[1] in community.members
    assert choice.path.hops == 2


def test_a_lone_site_community_gives_no_path():
    # Prepare: three communities (the third split cuts the longer edges A - C, then
    # B - C); C, alone, is the nearest site to the target
    distances = clustered_with_target(C=0.0)

    # Execute
    choice = choose_path(
        distances,
        labelled=CASES,
        target="T",
        affinity=affinity(landmarks=LandmarkRule.COMMUNITIES, communities=3),
    )

    # Assert
    assert [c.members for c in choice.communities] == [
        ("A", "B"),
        ("C",),
        ("D", "E", "F"),
    ]
    assert choice.starts == ("A", "E")  # A and B tie on the landmark score: names
    assert choice.path.nodes == ("E", "F", "T")


# ------------------------------------------------------------ one-factor rule

# L1 (MR, liver) - M (CT, kidney) and L2 (MR, kidney) - T (CT, liver) differ in both.
FACTORS = {
    "L1": TaskFactors(modality="MR", labels=("liver",)),
    "M": TaskFactors(modality="CT", labels=("kidney",)),
    "L2": TaskFactors(modality="MR", labels=("kidney",)),
    "T": TaskFactors(modality="CT", labels=("liver",)),
}
FOUR = SiteMatrix(
    sites=("L1", "L2", "M", "T"),
    values=np.array(
        [
            [0.0, 0.4, 0.1, 0.5],
            [0.4, 0.0, 0.45, 0.3],
            [0.1, 0.45, 0.0, 0.1],
            [0.5, 0.3, 0.1, 0.0],
        ]
    ),
)


@pytest.mark.parametrize(
    ("config", "without", "with_rule"),
    [
        # L1 -> M -> T costs 0.5 + 0.1 + 0.1 = 0.7; without L1 - M and L2 - T the
        # cheapest left is L2 -> M -> T, 0.3 + 0.45 + 0.1 = 0.85.
        (affinity(), ("L1", "M", "T"), ("L2", "M", "T")),
        # One community, landmark L1 (sums of d times 16: L1 0.5, M 0.55, L2 0.85;
        # without L1 - M: L1 0.4, M 0.45, L2 0.85): L1 -> M -> T without the rule;
        # with it L1 - M is gone and L1 -> L2 -> T ends on the removed L2 - T.
        (
            affinity(landmarks=LandmarkRule.COMMUNITIES, communities=1),
            ("L1", "M", "T"),
            None,
        ),
    ],
)
def test_one_factor_rule_removes_the_edges_and_changes_the_path(
    config, without, with_rule
):
    # Prepare
    labelled = {"L1": 8, "L2": 8, "M": 8}
    ruled = dataclasses.replace(config, one_factor_edges=True)

    # Execute
    plain = choose_path(
        FOUR, labelled=labelled, target="T", affinity=config, factors=FACTORS
    )

    # Assert
    assert plain.path.nodes == without
    assert plain.removed == ()
    if with_rule is None:
        with pytest.raises(ValueError, match=r"one-factor rule .* removed every path"):
            choose_path(
                FOUR, labelled=labelled, target="T", affinity=ruled, factors=FACTORS
            )
        return
    chosen = choose_path(
        FOUR, labelled=labelled, target="T", affinity=ruled, factors=FACTORS
    )
    assert chosen.path.nodes == with_rule
    assert chosen.removed == (("L1", "M"), ("L2", "T"))


# --------------------------------------------------------------------- errors

NO_PATH_FACTORS = {
    site: TaskFactors(modality="MR", labels=("kidney",)) for site in SIX
} | {"T": TaskFactors(modality="CT", labels=("liver",))}


@pytest.mark.parametrize(
    ("config", "labelled", "factors", "message"),
    [
        (
            affinity(landmarks=LandmarkRule.COMMUNITIES, communities=7),
            CASES,
            None,
            r"^affinity.communities = 7 is more than the 6 sources \['A', 'B', 'C', "
            r"'D', 'E', 'F'\]",
        ),
        (
            affinity(landmarks=LandmarkRule.COMMUNITIES, communities=6),
            CASES,
            None,
            r"^no community has two sites, so no landmark -> intermediate path "
            r"exists: communities \[\['A'\], \['B'\], .*\['F'\]\] "
            r"\(affinity.communities = 6",
        ),
        (
            COMMUNITIES,
            CASES | {"A": 0, "B": 0},
            None,
            "A and B both hold 0 labelled cases",
        ),
        (
            affinity(one_factor_edges=True),
            CASES,
            None,
            "affinity.one-factor-edges is on but no site's modality and labels",
        ),
        (
            affinity(one_factor_edges=True),
            CASES,
            NO_PATH_FACTORS,
            r"^the one-factor rule \(affinity.one-factor-edges\) removed every path "
            "to 'T'",
        ),
        (
            affinity(one_factor_edges=True, landmarks=LandmarkRule.COMMUNITIES),
            CASES,
            NO_PATH_FACTORS,
            r"^the one-factor rule \(affinity.one-factor-edges\) removed every path "
            "to 'T'",
        ),
        (
            affinity(
                one_factor_edges=True,
                landmarks=LandmarkRule.COMMUNITIES,
                communities=1,
            ),
            CASES,
            NO_PATH_FACTORS | {"A": TaskFactors(modality="CT", labels=("liver",))},
            r"^affinity.communities = 1: without the removed edges the sites already "
            r"fall into 2 groups \[\['A'\], \['B', 'C', 'D', 'E', 'F'\]\]",
        ),
    ],
)
def test_choose_path_rejects(config, labelled, factors, message):
    with pytest.raises(ValueError, match=message):
        choose_path(
            clustered_with_target(),
            labelled=labelled,
            target="T",
            affinity=config,
            factors=factors,
        )


def test_the_rejected_federation_has_a_path_when_nothing_is_removed():
    # The cases above fail for their fault only: same factors everywhere give a path.
    for rule in LandmarkRule:
        choice = choose_path(
            clustered_with_target(),
            labelled=CASES,
            target="T",
            affinity=affinity(landmarks=rule),
            factors={site: NO_PATH_FACTORS["A"] for site in SEVEN},
        )
        assert choice.path.nodes[-1] == "T"
        assert all(a != b for a, b in itertools.pairwise(choice.path.nodes))
