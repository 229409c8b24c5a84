"""The SeqTran source graph: which transfer steps exist, communities and landmarks.

Owns docs/methods.md#path-search: the optional one-factor edge rule (a transfer
step may change a site's modality or its labels, not both), the Girvan-Newman
communities of the sources and each community's landmark. Nodes are sites, every pair
is an edge weighted by the distance ``d`` of
:func:`core.affinity.matrix.distance_matrix` unless the rule removes it. Knows nothing
of paths (:mod:`core.affinity.paths`) or the run config
(:mod:`core.affinity.path_choice`); pure Python, never imports flwr or torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence, Set
from typing import Final, TypeAlias

from core.affinity.matrix import SiteMatrix

Edge: TypeAlias = tuple[str, str]  # an unordered pair of sites, names sorted
# What core.data.dataset reports without dataset.json.
UNKNOWN_MODALITY: Final = "unknown"
# Edge betweenness values this close are a tie (the sums run in different orders).
_RELATIVE_TIE: Final = 1e-9


def edge(first: str, second: str) -> Edge:
    """The unordered edge between two sites.

    Example:
        >>> edge("B", "A")
        ('A', 'B')
    """
    return (first, second) if first <= second else (second, first)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TaskFactors:
    """The two factors of a site's task that the one-factor rule compares.

    Attributes:
        modality: the site's ``dataset.json`` ``"modality"`` as ``query.hello``
            reports it (``"unknown"`` without one); compared exactly.
        labels: the foreground class names, in class order: ``query.hello``'s
            ``class-names`` (``dataset.json`` ``"labels"``) without class 0, the
            background, whose name says nothing about the task.
    """

    modality: str
    labels: tuple[str, ...]

    @classmethod
    def from_class_names(cls, modality: str, class_names: Sequence[str]) -> TaskFactors:
        """Factors from what ``query.hello`` reports (class 0 is the background).

        Example:
            >>> TaskFactors.from_class_names("MR", ["background", "tumour"])
            TaskFactors(modality='MR', labels=('tumour',))
        """
        return cls(modality=modality, labels=tuple(class_names[1:]))

    def differs_in_both(self, other: TaskFactors) -> bool:
        """Whether the modality and the labels both differ.

        An unknown modality never differs: a site without ``dataset.json`` cannot be
        told apart from any other.
        """
        known = UNKNOWN_MODALITY not in (self.modality, other.modality)
        return known and self.modality != other.modality and self.labels != other.labels


def one_factor_removed(
    factors: Mapping[str, TaskFactors], sites: Sequence[str]
) -> frozenset[Edge]:
    """The edges the one-factor rule removes among ``sites``: both factors differ.

    Example:
        >>> f = {"A": TaskFactors(modality="CT", labels=("liver",)),
        ...      "B": TaskFactors(modality="MR", labels=("liver",)),
        ...      "C": TaskFactors(modality="MR", labels=("kidney",))}
        >>> sorted(one_factor_removed(f, ["A", "B", "C"]))
        [('A', 'C')]

    Raises:
        ValueError: a site has no factors.
    """
    missing = sorted(set(sites) - set(factors))
    if missing:
        raise ValueError(f"no modality and labels known for sites {missing}")
    return frozenset(
        edge(first, second)
        for first, second in itertools.combinations(sites, 2)
        if factors[first].differs_in_both(factors[second])
    )


Graph: TypeAlias = dict[str, dict[str, float]]  # node -> neighbour -> edge length


def _build_graph(
    distances: SiteMatrix, sites: Sequence[str], removed: Set[Edge]
) -> Graph:
    graph: Graph = {site: {} for site in sorted(sites)}
    for first, second in itertools.combinations(sorted(sites), 2):
        if (first, second) not in removed:
            # d may be asymmetric; an undirected edge's length is the mean of both.
            length = (distances.get(first, second) + distances.get(second, first)) / 2
            graph[first][second] = graph[second][first] = length
    return graph


def _components(graph: Graph) -> tuple[tuple[str, ...], ...]:
    seen: set[str] = set()
    found = []
    for start in graph:  # sorted, so components come in order of their first member
        if start in seen:
            continue
        members, frontier = {start}, [start]
        while frontier:
            for neighbour in graph[frontier.pop()]:
                if neighbour not in members:
                    members.add(neighbour)
                    frontier.append(neighbour)
        seen |= members
        found.append(tuple(sorted(members)))
    return tuple(found)


def _close(first: float, second: float) -> bool:
    return math.isclose(first, second, rel_tol=1e-12, abs_tol=1e-15)


def _edge_betweenness(graph: Graph) -> dict[Edge, float]:
    """Brandes' edge betweenness over weighted shortest paths (each pair twice)."""
    betweenness = {edge(node, other): 0.0 for node in graph for other in graph[node]}
    for source in graph:
        distance = {source: 0.0}
        paths = {source: 1.0}  # shortest paths from the source
        parents: dict[str, list[str]] = {source: []}
        order: list[str] = []  # settled nodes, nearest first (Dijkstra)
        settled: set[str] = set()
        while len(order) < len(distance):
            node = min(
                (n for n in distance if n not in settled),
                key=lambda n: (distance[n], n),
            )
            order.append(node)
            settled.add(node)
            for neighbour, length in graph[node].items():
                if neighbour in settled:
                    continue
                reach = distance[node] + length
                if neighbour not in distance or (
                    reach < distance[neighbour]
                    and not _close(reach, distance[neighbour])
                ):
                    distance[neighbour] = reach
                    paths[neighbour] = paths[node]
                    parents[neighbour] = [node]
                elif _close(reach, distance[neighbour]):
                    paths[neighbour] += paths[node]
                    parents[neighbour].append(node)
        dependency = dict.fromkeys(order, 0.0)
        for node in reversed(order):
            for parent in parents[node]:
                share = paths[parent] / paths[node] * (1.0 + dependency[node])
                betweenness[edge(parent, node)] += share
                dependency[parent] += share
    return betweenness


def find_communities(
    distances: SiteMatrix,
    sites: Sequence[str],
    *,
    count: int,
    removed: Set[Edge] = frozenset(),
) -> tuple[tuple[str, ...], ...]:
    """Split ``sites`` into ``count`` communities by Girvan-Newman.

    The graph has an edge between every two sites not in ``removed``, of length
    ``(d(u, v) + d(v, u)) / 2`` (``d`` may be asymmetric; betweenness needs undirected
    edges). Until the graph has ``count`` connected components, the edge of highest
    edge betweenness (Brandes, over all shortest paths by that length, recomputed
    after each removal) is removed. Ties, up to a relative 1e-9, go to the longer
    edge, then to the lexicographically first (its names sorted), so the split never
    depends on input order.

    On a complete graph this finds clusters only where the distances inside a
    cluster are small against the spread of the distances between clusters, so that
    pairs across clusters route through a few short "bridges". Where every edge is
    its own shortest path (a metric ``d`` with clusters no tighter than that), all
    edges tie, and once a site's edges across are gone its traffic crosses its own
    cluster's edges, which are cut next: the split tends to isolate single sites.

    Example:
        >>> import numpy as np
        >>> d = SiteMatrix(sites=("A", "B", "C", "D"), values=np.array(
        ...     [[0, .1, 5, 6], [.1, 0, 7, 8], [5, 7, 0, .1], [6, 8, .1, 0]]))
        >>> find_communities(d, ["D", "C", "B", "A"], count=2)
        (('A', 'B'), ('C', 'D'))

    Returns:
        The communities, each sorted, in order of their first member.

    Raises:
        ValueError: ``count`` outside ``[1, len(sites)]``, duplicated or unknown sites,
            or more than ``count`` components once ``removed`` is taken out.
    """
    if len(set(sites)) != len(sites):
        raise ValueError(f"site list has duplicates: {list(sites)}")
    if not 1 <= count <= len(sites):
        raise ValueError(
            f"cannot split {len(sites)} sites into {count} communities; need "
            f"1 <= communities <= {len(sites)}"
        )
    for site in sites:
        distances.index(site)  # names an unknown site
    graph = _build_graph(distances, sites, removed)
    communities = _components(graph)
    if len(communities) > count:
        raise ValueError(
            f"without the removed edges the sites already fall into "
            f"{len(communities)} groups {[list(c) for c in communities]}, more than "
            f"the {count} communities asked for"
        )
    while len(communities) < count:
        betweenness = _edge_betweenness(graph)
        highest = max(betweenness.values())
        first, second = min(
            (
                pair
                for pair, value in betweenness.items()
                if math.isclose(value, highest, rel_tol=_RELATIVE_TIE)
            ),
            key=lambda pair: (-graph[pair[0]][pair[1]], pair),
        )
        del graph[first][second], graph[second][first]
        communities = _components(graph)
    return communities


def choose_landmark(
    distances: SiteMatrix,
    community: Sequence[str],
    *,
    labelled: Mapping[str, int],
    removed: Set[Edge] = frozenset(),
) -> str:
    """The community's landmark: the site ``v`` minimising its weighted distances.

    ``score(v) = sum over the other sites u of the community of d(v, u) / (n_v + n_u)``
    with ``n`` the labelled case count (docs/methods.md#path-search: the paper's
    institution case count). ``d(v, u)`` is taken from ``v``, the direction a landmark's
    model travels; an edge in ``removed`` does not count, as the paper sums over the
    node's edges. Ties go to the first name; a single site is its own landmark.

    Example:
        >>> import numpy as np
        >>> d = SiteMatrix(sites=("A", "B", "C"), values=np.array(
        ...     [[0, 1, 2], [1, 0, 1], [2, 1, 0.0]]))
        >>> choose_landmark(d, ["A", "B", "C"], labelled={"A": 1, "B": 1, "C": 8})
        'C'

    Raises:
        ValueError: an empty community, a site without a case count, a negative count
            or a counted pair with no labelled case between them.
    """
    if not community:
        raise ValueError("an empty community has no landmark")
    missing = sorted(set(community) - set(labelled))
    if missing:
        raise ValueError(f"no labelled case count for sites {missing}")
    if min(labelled[site] for site in community) < 0:
        raise ValueError(
            f"labelled case counts must be >= 0, got "
            f"{ {site: labelled[site] for site in community} }"
        )
    scores = {}
    for site in sorted(community):
        score = 0.0
        for other in sorted(community):
            if other == site or edge(site, other) in removed:
                continue
            cases = labelled[site] + labelled[other]
            if cases == 0:
                raise ValueError(
                    f"{site} and {other} both hold 0 labelled cases, so the landmark "
                    f"score d / (n_{site} + n_{other}) of community "
                    f"{sorted(community)} is undefined"
                )
            score += distances.get(site, other) / cases
        scores[site] = score
    return min(scores, key=lambda site: (scores[site], site))
