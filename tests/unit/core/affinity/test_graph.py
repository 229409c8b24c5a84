"""The SeqTran source graph: one-factor edges, Girvan-Newman communities, landmarks."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest

from core.affinity.graph import (
    TaskFactors,
    _build_graph,
    _edge_betweenness,
    choose_landmark,
    edge,
    find_communities,
    one_factor_removed,
)
from core.affinity.matrix import SiteMatrix

SIX = "ABCDEF"


def matrix(sites: str, rows: npt.ArrayLike) -> SiteMatrix:
    return SiteMatrix(sites=tuple(sites), values=np.array(rows, dtype=np.float64))


def two_clusters() -> npt.NDArray[np.float64]:
    """A, B, C and D, E, F: 0.1-0.2 apart inside, 5-13 apart across (all distinct).

    Pairs across route through the shortest edges across (A - D is the first bridge:
    A -> D -> E costs 5.1 against A -> E's 6), so Girvan-Newman cuts across first.
    """
    values = np.zeros((6, 6))
    inside = {("A", "B"): 0.1, ("A", "C"): 0.2, ("B", "C"): 0.15}
    inside |= {("D", "E"): 0.1, ("D", "F"): 0.2, ("E", "F"): 0.15}
    across = dict(zip(itertools.product("ABC", "DEF"), range(5, 14), strict=True))
    for (first, second), value in (inside | across).items():
        values[SIX.index(first), SIX.index(second)] = value
        values[SIX.index(second), SIX.index(first)] = value
    return values


# ------------------------------------------------------------------ communities


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (1, (tuple(SIX),)),
        (2, (("A", "B", "C"), ("D", "E", "F"))),
        (6, tuple((site,) for site in SIX)),
    ],
)
def test_two_obvious_clusters_are_found(count, expected):
    # Prepare
    distances = matrix(SIX, two_clusters())

    # Execute
    actual = find_communities(distances, list(SIX), count=count)
    shuffled = find_communities(distances, list("FBDACE"), count=count)

    # Assert
    assert actual == expected
    assert shuffled == expected  # input order does not matter


def test_asymmetric_distances_are_split_on_the_mean_of_both_directions():
    # Prepare: d(u, v) and d(v, u) differ by +-x, so their mean is the symmetric d
    symmetric = two_clusters()
    skew = np.triu(np.full((6, 6), 0.04), 1)
    asymmetric = matrix(SIX, symmetric + skew - skew.T)

    # Execute
    actual = find_communities(asymmetric, list(SIX), count=2)

    # Assert
    assert actual == (("A", "B", "C"), ("D", "E", "F"))


def test_removed_edges_are_not_in_the_graph():
    # Prepare: without A - B and A - C, A is on its own
    distances = matrix(SIX, two_clusters())
    removed = {edge("A", site) for site in "BCDEF"}

    # Execute
    actual = find_communities(distances, list(SIX), count=2, removed=removed)

    # Assert
    assert actual == (("A",), ("B", "C", "D", "E", "F"))


@pytest.mark.parametrize("seed", range(4))
def test_edge_betweenness_matches_networkx(seed):
    # Prepare: networkx ships with torch; its unnormalised betweenness counts each
    # unordered pair once, ours once per direction
    networkx = pytest.importorskip("networkx")
    values = np.random.default_rng(seed).random((6, 6)).round(1)
    graph = _build_graph(matrix(SIX, values), list(SIX), {edge("A", "B")})
    reference = networkx.Graph()
    for node, neighbours in graph.items():
        for neighbour, length in neighbours.items():
            reference.add_edge(node, neighbour, weight=length)

    # Execute
    actual = _edge_betweenness(graph)
    expected = networkx.edge_betweenness_centrality(
        reference, weight="weight", normalized=False
    )

    # Assert
    assert set(actual) == {edge(*pair) for pair in expected}
    for pair, value in expected.items():
        assert actual[edge(*pair)] == pytest.approx(2 * value, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, r"cannot split 6 sites into 0 communities; need 1 <= "),
        ({"count": 7}, r"cannot split 6 sites into 7 communities; need .* <= 6"),
        ({"sites": ["A", "A"]}, "site list has duplicates"),
        ({"sites": ["A", "Q"], "count": 1}, "unknown site 'Q'"),
        (
            {"count": 1, "removed": {edge("A", site) for site in "BCDEF"}},
            r"already fall into 2 groups \[\['A'\], \['B', 'C', 'D', 'E', 'F'\]\], "
            "more than the 1 communities",
        ),
    ],
)
def test_find_communities_rejects_bad_input(kwargs, message):
    arguments = {"sites": list(SIX), "count": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        find_communities(matrix(SIX, two_clusters()), **arguments)


# -------------------------------------------------------------------- landmarks

# d(A, B) = 1, d(A, C) = 2, d(B, C) = 1.5; d(C, A) = 4 (only C's score reads it).
TRIANGLE = matrix("ABC", [[0, 1, 2], [1, 0, 1.5], [4, 1.5, 0]])


@pytest.mark.parametrize(
    ("labelled", "expected"),
    [
        # A: 1/12 + 2/14 = 0.226; B: 1/12 + 1.5/6 = 0.333; C: 4/14 + 1.5/6 = 0.536
        ({"A": 10, "B": 2, "C": 4}, "A"),
        # A: 1/2 + 2/2 = 1.5; B: 1/2 + 1.5/2 = 1.25; C: 4/2 + 1.5/2 = 2.75
        ({"A": 1, "B": 1, "C": 1}, "B"),
        # A: 1/3 + 2/21 = 0.429; B: 1/3 + 1.5/22 = 0.402; C: 4/21 + 1.5/22 = 0.259
        ({"A": 1, "B": 2, "C": 20}, "C"),
    ],
)
def test_landmark_minimises_the_case_weighted_distances(labelled, expected):
    assert choose_landmark(TRIANGLE, ["C", "B", "A"], labelled=labelled) == expected


def test_landmark_skips_removed_edges_and_a_lone_site_is_its_own():
    # Without B - C: A 1/12 + 2/14 = 0.226; B 1/12 = 0.083; C 4/14 = 0.286 (with it,
    # A wins: the first case above).
    labelled = {"A": 10, "B": 2, "C": 4}
    removed = {edge("C", "B")}
    assert choose_landmark(TRIANGLE, "ABC", labelled=labelled, removed=removed) == "B"
    assert choose_landmark(TRIANGLE, ["C"], labelled={"C": 0}) == "C"


@pytest.mark.parametrize(
    ("community", "labelled", "message"),
    [
        (
            ["A", "B", "C"],
            {"A": 0, "B": 0, "C": 3},
            r"A and B both hold 0 labelled cases, so the landmark score "
            r"d / \(n_A \+ n_B\) of community \['A', 'B', 'C'\] is undefined",
        ),
        ([], {}, "an empty community has no landmark"),
        (["A", "B"], {"A": 1}, r"no labelled case count for sites \['B'\]"),
        (["A", "B"], {"A": 1, "B": -1}, "labelled case counts must be >= 0"),
    ],
)
def test_choose_landmark_rejects_bad_input(community, labelled, message):
    with pytest.raises(ValueError, match=message):
        choose_landmark(TRIANGLE, community, labelled=labelled)


# -------------------------------------------------------------- one-factor rule


def factors(modality: str, *labels: str) -> TaskFactors:
    return TaskFactors.from_class_names(modality, ["background", *labels])


@pytest.mark.parametrize(
    ("first", "second", "removed"),
    [
        (factors("MR", "liver"), factors("MR", "liver"), False),
        (factors("MR", "liver"), factors("CT", "liver"), False),  # modality only
        (factors("MR", "liver"), factors("MR", "kidney"), False),  # label only
        (factors("MR", "liver"), factors("CT", "kidney"), True),  # both
        (factors("MR", "ET"), factors("MR", "ET", "NCR"), False),  # label only
        (factors("MR", "ET"), factors("T2", "ET", "NCR"), True),
        (factors("unknown", "liver"), factors("CT", "kidney"), False),  # no modality
        (
            TaskFactors.from_class_names("MR", ["bg", "liver"]),
            TaskFactors.from_class_names("CT", ["background", "liver"]),
            False,  # the background's name is not a label
        ),
    ],
)
def test_one_factor_rule_removes_an_edge_only_when_both_factors_differ(
    first, second, removed
):
    # Execute
    actual = one_factor_removed({"X": first, "Y": second}, ["X", "Y"])

    # Assert
    assert actual == ({("X", "Y")} if removed else set())


def test_one_factor_rule_over_a_federation():
    # Prepare
    known = {
        "A": factors("MR", "liver"),
        "B": factors("MR", "kidney"),
        "C": factors("CT", "kidney"),
        "D": factors("CT", "liver"),
    }

    # Execute
    actual = one_factor_removed(known, ["D", "C", "B", "A"])

    # Assert: the diagonals of the modality x label square
    assert actual == {("A", "C"), ("B", "D")}
    with pytest.raises(
        ValueError, match=r"no modality and labels known for sites \['E'\]"
    ):
        one_factor_removed(known, ["A", "E"])
