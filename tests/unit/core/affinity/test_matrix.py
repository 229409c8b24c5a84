from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from core.affinity.matrix import (
    SiteMatrix,
    affinity_matrices,
    distance_matrix,
    global_ssim,
    image_distance,
    label_similarity,
    normalise,
    wasserstein_1d_from_quantiles,
)
from core.affinity.path_choice import choose_path
from core.affinity.paths import (
    TransferPath,
    cheapest_path,
    paper_path,
    start_sites,
)
from core.affinity.profile import midpoint_quantiles
from core.config import load_default_config


def matrix(sites: str, rows: npt.ArrayLike) -> SiteMatrix:
    return SiteMatrix(sites=tuple(sites), values=np.array(rows, dtype=np.float64))


# ---------------------------------------------------------------- Wasserstein


@pytest.mark.parametrize(
    "sampler",
    [
        lambda rng: (rng.normal(size=257), rng.normal(1.0, 2.0, size=257)),
        lambda rng: (rng.exponential(size=64), rng.uniform(-1, 3, size=64)),
        lambda rng: (rng.integers(0, 5, size=30) * 1.0, rng.normal(size=30)),
    ],
)
def test_wasserstein_equals_scipy_when_quantiles_are_the_sorted_samples(sampler):
    # Prepare
    first, second = sampler(np.random.default_rng(7))
    # Execute: K = n midpoint quantiles are exactly the sorted samples
    actual = wasserstein_1d_from_quantiles(
        midpoint_quantiles(first, first.size), midpoint_quantiles(second, second.size)
    )
    # Assert
    np.testing.assert_array_equal(midpoint_quantiles(first, first.size), np.sort(first))
    assert actual == pytest.approx(stats.wasserstein_distance(first, second), rel=1e-12)


@pytest.mark.parametrize(
    ("location", "scale", "expected"),
    [(0.5, 1.0, 0.5), (0.0, 2.0, math.sqrt(2 / math.pi))],  # W1 to N(0, 1)
)
def test_wasserstein_from_101_quantiles_is_close_to_scipy_on_large_samples(
    location, scale, expected
):
    # Prepare
    rng = np.random.default_rng(3)
    count, num_quantiles = 200_000, 101
    first = rng.normal(size=count)
    second = rng.normal(location, scale, size=count)
    # Both numbers come from the same samples; they differ only by the K-point
    # midpoint rule applied to the quantile-difference function. For the populations
    # that rule's error is exactly computable (0 for a pure shift, whose difference
    # is constant); sampling moves it by O(n^-1/2), hence the tolerance below.
    levels = (np.arange(num_quantiles) + 0.5) / num_quantiles
    population = np.mean(np.abs((scale - 1) * stats.norm.ppf(levels) + location))
    tolerance = abs(population - expected) + 1 / math.sqrt(count)
    # Execute
    actual = wasserstein_1d_from_quantiles(
        midpoint_quantiles(first, num_quantiles),
        midpoint_quantiles(second, num_quantiles),
    )
    # Assert
    assert actual == pytest.approx(
        stats.wasserstein_distance(first, second), abs=tolerance
    )
    assert actual == pytest.approx(expected, abs=tolerance + 0.01)


def test_wasserstein_is_symmetric_zero_on_itself_and_sorts_its_input():
    first, second = [3.0, 1.0, 2.0], [0.0, 5.0, 1.0]
    assert wasserstein_1d_from_quantiles(first, first) == 0.0
    assert wasserstein_1d_from_quantiles(first, second) == pytest.approx(
        wasserstein_1d_from_quantiles(second, first)
    )
    assert wasserstein_1d_from_quantiles(first, second) == pytest.approx(
        stats.wasserstein_distance(first, second)
    )


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ([1.0, 2.0], [1.0, 2.0, 3.0], "got 2 and 3"),
        ([], [], "non-zero number"),
        ([1.0, math.nan], [1.0, 2.0], "NaN or inf"),
    ],
)
def test_wasserstein_rejects_bad_quantiles(first, second, message):
    with pytest.raises(ValueError, match=message):
        wasserstein_1d_from_quantiles(first, second)


# ---------------------------------------------------------------------- SSIM


def test_global_ssim_matches_a_hand_computation():
    # a = [0, 0, 1, 1], b = [0, 1, 1, 1]: means 1/2, 3/4; variances 1/4, 3/16;
    # covariance 1/8; C1 = C2 = 0.09.
    expected = (2 * 0.5 * 0.75 + 0.09) * (2 * 0.125 + 0.09)
    expected /= (0.5**2 + 0.75**2 + 0.09) * (0.25 + 0.1875 + 0.09)
    actual = global_ssim(np.array([0.0, 0.0, 1.0, 1.0]), np.array([0.0, 1, 1, 1]))
    assert actual == pytest.approx(expected, rel=1e-12)
    assert actual == pytest.approx(0.59991, abs=1e-5)


@pytest.mark.parametrize(("k1", "k2", "data_range"), [(0.3, 0.3, 1.0), (0.01, 0.03, 2)])
def test_global_ssim_matches_a_direct_loop_over_a_volume(k1, k2, data_range):
    # Prepare
    rng = np.random.default_rng(11)
    first, second = rng.random((4, 5, 6)), rng.random((4, 5, 6)) ** 2
    a_values, b_values = first.ravel().tolist(), second.ravel().tolist()
    count = len(a_values)
    mean_a, mean_b = sum(a_values) / count, sum(b_values) / count
    var_a = sum((x - mean_a) ** 2 for x in a_values) / count
    var_b = sum((y - mean_b) ** 2 for y in b_values) / count
    cov = sum(
        (x - mean_a) * (y - mean_b) for x, y in zip(a_values, b_values, strict=True)
    )
    cov /= count
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    expected = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / (
        (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    )
    # Execute
    actual = global_ssim(first, second, k1=k1, k2=k2, data_range=data_range)
    # Assert
    assert actual == pytest.approx(expected, rel=1e-10)
    assert actual == pytest.approx(
        global_ssim(second, first, k1=k1, k2=k2, data_range=data_range)
    )


def test_global_ssim_is_one_on_identical_arrays_and_rejects_shape_mismatch():
    volume = np.random.default_rng(1).random((3, 4, 5))
    assert global_ssim(volume, volume) == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match=r"\(3, 4, 5\) and \(3, 4, 4\)"):
        global_ssim(volume, volume[..., :4])
    with pytest.raises(ValueError, match="k1, k2 and data_range must be > 0"):
        global_ssim(volume, volume, k1=0.0)


# ----------------------------------------------------- affinity from profiles


def test_site_compared_with_itself_has_h_0_and_r_1(profiles):
    image, label = affinity_matrices(profiles)
    np.testing.assert_array_equal(np.diag(image.values), 0.0)
    np.testing.assert_allclose(np.diag(label.values), 1.0, rtol=0, atol=1e-15)
    assert image_distance(profiles["C"], profiles["C"]) == 0.0
    assert label_similarity(profiles["C"], profiles["C"]) == pytest.approx(1.0)


def test_affinity_grows_along_the_synthetic_continuum(profiles):
    # Sites A, B, C sit at shifts 0, 0.5, 1: A-C is the farthest pair.
    image, label = affinity_matrices(profiles)
    h_ab, h_ac, h_bc = (image.get(*pair) for pair in ("AB", "AC", "BC"))
    r_ab, r_ac, r_bc = (label.get(*pair) for pair in ("AB", "AC", "BC"))
    assert h_ac > h_ab
    assert h_ac > h_bc
    assert r_ac < r_ab
    assert r_ac < r_bc
    assert np.allclose(image.values, image.values.T)


def test_unlabelled_site_has_no_label_term(unlabelled_profile, profiles):
    assert unlabelled_profile.mean_label_map is None
    assert unlabelled_profile.foreground_quantiles is None
    assert (unlabelled_profile.num_images, unlabelled_profile.num_labelled) == (2, 0)
    # Same images as A: the image term is unchanged.
    assert image_distance(unlabelled_profile, profiles["A"]) == 0.0
    with pytest.raises(ValueError, match="site U has no label term"):
        label_similarity(profiles["A"], unlabelled_profile)
    with pytest.raises(ValueError, match="site U has no label term"):
        affinity_matrices({"A": profiles["A"], "U": unlabelled_profile})


def test_affinity_matrices_reject_a_misfiled_profile(profiles):
    with pytest.raises(ValueError, match="profile of site A is filed under B"):
        affinity_matrices({"B": profiles["A"]})


# ---------------------------------------------------- normalisation, distance


def test_normalise_min_max_off_diagonal_with_sqrt_for_h():
    # Prepare
    image = matrix("ABC", [[0, 1, 3], [1, 0, 2], [3, 2, 0]])
    label = matrix("ABC", [[1, 0.9, 0.5], [0.9, 1, 0.7], [0.5, 0.7, 1]])
    # Execute
    image_norm, label_norm = normalise(image, label)
    # Assert
    np.testing.assert_allclose(
        image_norm.values, np.sqrt([[0, 0, 1], [0, 0, 0.5], [1, 0.5, 0]])
    )
    np.testing.assert_allclose(label_norm.values, [[1, 1, 0], [1, 1, 0.5], [0, 0.5, 1]])


def test_normalise_gives_a_constant_term_no_weight():
    image, label = matrix("AB", [[0, 2], [2, 0]]), matrix("AB", [[1, 0.8], [0.8, 1]])
    image_norm, label_norm = normalise(image, label)
    np.testing.assert_array_equal(image_norm.values, 0.0)
    np.testing.assert_array_equal(label_norm.values, 1.0)


def test_distance_matrix_combines_the_terms():
    image_norm = matrix("AB", [[0, 0.25], [0.25, 0]])
    label_norm = matrix("AB", [[1, 0.5], [0.5, 1]])
    actual = distance_matrix(image_norm, label_norm, image_weight=2, label_weight=3)
    np.testing.assert_allclose(actual.values, [[0, 2.0], [2.0, 0]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_weight": -1.0}, "image_weight must be finite and >= 0, got -1.0"),
        ({"label_weight": math.nan}, "label_weight must be finite"),
        ({"image_weight": 0.0, "label_weight": 0.0}, "both 0"),
    ],
)
def test_distance_matrix_rejects_bad_weights(kwargs, message):
    square = matrix("AB", [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=message):
        distance_matrix(square, square, **kwargs)


def test_matrices_over_different_sites_are_rejected():
    first, second = matrix("AB", [[0, 1], [1, 0]]), matrix("AC", [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="different sites"):
        normalise(first, second)
    with pytest.raises(ValueError, match="different sites"):
        distance_matrix(first, second)
    with pytest.raises(ValueError, match="at least two sites"):
        normalise(matrix("A", [[0]]), matrix("A", [[1]]))


@pytest.mark.parametrize(
    ("sites", "rows", "message"),
    [
        ("AB", [[0, math.nan], [1, 0]], "from A to B is nan"),
        ("AB", [[0, 1]], r"must be \(2, 2\)"),
        ("AA", [[0, 1], [1, 0]], "must be unique"),
    ],
)
def test_site_matrix_rejects_bad_values(sites, rows, message):
    with pytest.raises(ValueError, match=message):
        matrix(sites, rows)


# ---------------------------------------------------------------- path search

# Chain A - B - C - T: the target is far from A, each link is short. Landmark A.
CHAIN = matrix(
    "ABCT",
    [
        [0, 1, 3, 4],
        [1, 0, 1, 2.5],
        [3, 1, 0, 1],
        [4, 2.5, 1, 0],
    ],
)


@pytest.mark.parametrize(
    ("max_hops", "nodes", "cost"),
    [
        (1, ("A", "T"), 8.0),  # direct: search 4 + transfer 4
        (2, ("A", "B", "T"), 7.5),  # 4 + 1 + 2.5 beats A -> C -> T (8)
        (3, ("A", "B", "C", "T"), 7.0),  # 4 + 1 + 1 + 1
        (5, ("A", "B", "C", "T"), 7.0),  # more hops than sources is harmless
    ],
)
def test_cheapest_path_through_the_chain_is_limited_by_max_hops(max_hops, nodes, cost):
    actual = cheapest_path(
        CHAIN, sources=["A", "B", "C"], target="T", max_hops=max_hops, landmarks=["A"]
    )
    assert actual.nodes == nodes
    assert actual.cost == pytest.approx(cost)
    assert actual.hops == len(nodes) - 1
    assert actual.path_length == pytest.approx(cost - 4.0)


def test_direct_transfer_wins_when_a_source_is_close_to_the_target():
    actual = cheapest_path(CHAIN, sources=["A", "B", "C"], target="T", max_hops=3)
    assert actual == TransferPath(nodes=("C", "T"), cost=2.0, path_length=1.0)


def test_direct_transfer_always_wins_on_a_metric():
    points = np.random.default_rng(2).normal(size=(6, 2))
    euclidean = np.linalg.norm(points[:, None] - points[None], axis=-1)
    distances = SiteMatrix(sites=tuple("ABCDET"), values=euclidean)
    actual = cheapest_path(distances, sources=list("ABCDE"), target="T", max_hops=4)
    assert actual.hops == 1


def test_asymmetric_distances_give_direction():
    # A -> B is cheap, B -> A expensive; both sites are 3 from the target.
    forward = matrix("ABT", [[0, 1, 3], [5, 0, 3], [3, 3, 0]])
    backward = SiteMatrix(sites=forward.sites, values=forward.values.T)
    kwargs = {"sources": ["A", "B"], "target": "T", "max_hops": 2, "min_hops": 2}
    assert cheapest_path(forward, **kwargs).nodes == ("A", "B", "T")
    assert cheapest_path(backward, **kwargs).nodes == ("B", "A", "T")


def test_ties_go_to_fewer_hops_then_path_length_then_names():
    # Direct A -> T costs 3 + 3; A -> B -> T costs 3 + 1 + 2: equal, direct wins.
    distances = matrix("ABT", [[0, 1, 3], [1, 0, 2], [3, 2, 0]])
    actual = cheapest_path(
        distances, sources=["B", "A"], target="T", max_hops=2, landmarks=["A"]
    )
    assert actual.nodes == ("A", "T")
    # Symmetric d: A -> B -> T and B -> A -> T both cost 6; the lower path length
    # (A -> B -> T: 3, against B -> A -> T: 4) wins.
    two_hops = cheapest_path(
        distances, sources=["B", "A"], target="T", max_hops=2, min_hops=2
    )
    assert two_hops.nodes == ("A", "B", "T")
    # Full tie (same cost, hops and length): lexicographic.
    even = matrix("ABT", [[0, 1, 2], [1, 0, 2], [2, 2, 0]])
    assert cheapest_path(even, sources=["B", "A"], target="T", max_hops=1).nodes == (
        "A",
        "T",
    )


def test_paper_path_on_a_hand_made_graph():
    actual = paper_path(CHAIN, landmarks=["A", "C"], candidates=["B", "C"], target="T")
    # C -> B -> T costs 1 + 1 + 2.5; A -> B -> T 7.5; A -> C -> T 8.
    assert actual == TransferPath(nodes=("C", "B", "T"), cost=4.5, path_length=3.5)


@pytest.mark.parametrize("seed", range(8))
def test_cheapest_two_hop_path_is_the_paper_path(seed):
    # Prepare: an asymmetric, non-metric d on 5 sources and a target.
    rng = np.random.default_rng(seed)
    values = rng.random((6, 6)).round(1)  # rounded, so exact ties occur
    np.fill_diagonal(values, 0.0)
    distances = SiteMatrix(sites=tuple("ABCDET"), values=values)
    sources = list("ABCDE")
    # Execute
    paper = paper_path(distances, landmarks=sources, candidates=sources, target="T")
    general = cheapest_path(
        distances, sources=sources, target="T", min_hops=2, max_hops=2
    )
    restricted_paper = paper_path(
        distances, landmarks=["C", "E"], candidates=sources, target="T"
    )
    restricted = cheapest_path(
        distances,
        sources=sources,
        target="T",
        min_hops=2,
        max_hops=2,
        landmarks=["E", "C"],
    )
    # Assert
    assert general == paper
    assert restricted == restricted_paper


@pytest.mark.parametrize("seed", range(6))
def test_cheapest_path_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    values = rng.random((6, 6))
    np.fill_diagonal(values, 0.0)
    distances = SiteMatrix(sites=tuple("ABCDET"), values=values)
    candidates = []
    for hops in range(1, 4):
        for nodes in itertools.permutations("ABCDE", hops):
            length = sum(
                values["ABCDET".index(a), "ABCDET".index(b)]
                for a, b in itertools.pairwise((*nodes, "T"))
            )
            candidates.append((values["ABCDET".index(nodes[0]), 5] + length, nodes))
    expected_cost, expected_nodes = min(candidates)
    actual = cheapest_path(distances, sources=list("ABCDE"), target="T", max_hops=3)
    assert actual.nodes == (*expected_nodes, "T")
    assert actual.cost == pytest.approx(expected_cost, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "X"}, "unknown site 'X'"),
        ({"sources": ["A", "T"]}, "target 'T' is also listed among the sources"),
        ({"sources": []}, "no sources given"),
        ({"sources": ["A", "A"]}, "duplicates"),
        ({"sources": ["A", "Q"]}, "unknown site 'Q'"),
        ({"max_hops": 0}, "max_hops must be >= 1, got 0"),
        ({"min_hops": 3}, r"min_hops must be in \[1, max_hops=2\], got 3"),
        ({"landmarks": ["D"]}, r"landmarks \['D'\] are not among the sources"),
        ({"sources": ["A"], "min_hops": 2}, "no simple path with 2..2 hops"),
    ],
)
def test_cheapest_path_rejects_bad_input(kwargs, message):
    square = matrix("ABDT", np.ones((4, 4)) - np.eye(4))
    arguments = {"sources": ["A", "B"], "target": "T", "max_hops": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        cheapest_path(square, **arguments)


def test_path_search_rejects_negative_distances():
    negative = matrix("ABT", [[0, -1, 1], [1, 0, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match=r"from A to B is -1\.0; path search needs"):
        cheapest_path(negative, sources=["A", "B"], target="T", max_hops=2)
    with pytest.raises(ValueError, match="distances >= 0"):
        paper_path(negative, landmarks=["A"], candidates=["B"], target="T")


def test_paper_path_needs_two_distinct_sites():
    square = matrix("AT", [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="no landmark -> intermediate pair"):
        paper_path(square, landmarks=["A"], candidates=["A"], target="T")
    with pytest.raises(
        ValueError, match="target 'T' is also listed among the candidates"
    ):
        paper_path(square, landmarks=["A"], candidates=["T"], target="T")


@pytest.mark.parametrize("seed", range(5))
def test_with_one_hop_allowed_the_nearest_sources_direct_path_always_wins(seed):
    # Prepare: an arbitrary non-negative, non-metric, asymmetric distance
    rng = np.random.default_rng(seed)
    sites = "ABCDET"
    values = rng.uniform(0.0, 1.0, size=(6, 6))
    np.fill_diagonal(values, 0.0)
    distances = matrix(sites, values)
    nearest = min("ABCDE", key=lambda site: (distances.get(site, "T"), site))

    # Execute
    free = cheapest_path(distances, sources=list("ABCDE"), target="T", max_hops=3)
    sequential = cheapest_path(
        distances, sources=list("ABCDE"), target="T", min_hops=2, max_hops=3
    )

    # Assert: why affinity.min-hops defaults to 2 (the paper's one intermediate)
    assert free.nodes == (nearest, "T")
    assert sequential.hops >= 2


def test_start_sites_keep_the_sources_with_enough_labelled_cases():
    counts = {"L": 8, "I": 6, "T": 2, "E": 0}
    assert start_sites(counts, fraction=0.5) == ["I", "L"]
    assert start_sites(counts, fraction=0.0) == ["E", "I", "L", "T"]
    assert start_sites(counts, fraction=1.0) == ["L"]


@pytest.mark.parametrize(
    ("counts", "fraction", "message"),
    [
        ({}, 0.5, "no sources given"),
        ({"A": 2}, 1.5, r"fraction must be in \[0, 1\], got 1.5"),
        ({"A": -1}, 0.5, "labelled case counts must be >= 0"),
    ],
)
def test_start_sites_reject_bad_input(counts, fraction, message):
    with pytest.raises(ValueError, match=message):
        start_sites(counts, fraction=fraction)


def test_choose_path_starts_at_a_data_rich_source_and_caps_the_hops():
    # Prepare: T2 (two cases) is nearest the target but may not start a path
    distances = matrix(
        ["L", "I", "S", "T"],
        [
            [0.0, 0.2, 0.9, 0.9],
            [0.2, 0.0, 0.5, 0.4],
            [0.9, 0.5, 0.0, 0.1],
            [0.9, 0.4, 0.1, 0.0],
        ],
    )
    affinity = load_default_config().affinity

    # Execute
    chosen = choose_path(
        distances, labelled={"L": 8, "I": 8, "S": 2}, target="T", affinity=affinity
    ).path
    alone = choose_path(
        distances, labelled={"L": 8}, target="T", affinity=affinity
    ).path

    # Assert
    assert chosen.nodes[0] in ("L", "I")
    assert chosen.hops == 2
    assert chosen.nodes == ("I", "S", "T")
    assert alone.nodes == ("L", "T")  # one source: only a direct path exists
