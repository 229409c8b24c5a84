"""SeqTran transfer-path search over a site distance matrix (docs/methods.md).

Owns the paper's landmark -> intermediate -> target choice and its generalisation to
the cheapest simple path of at most K hops, and the case-fraction start sites. Distances
come from :func:`core.affinity.matrix.distance_matrix`, but any non-negative finite
matrix works: ``d`` need not be symmetric or a metric. Both searches skip the edges the
one-factor rule removed (:mod:`core.affinity.graph`); the run's choice under its config
is :func:`core.affinity.path_choice.choose_path`. Pure Python over a
:class:`SiteMatrix`; never imports flwr or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence, Set

import numpy as np

from core.affinity.graph import Edge, edge
from core.affinity.matrix import SiteMatrix


class NoPathError(ValueError):
    """No path satisfies the search's constraints (hops, starts, removed edges)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TransferPath:
    """A transfer path: train on ``nodes[0]``, fine-tune along the rest.

    Attributes:
        nodes: the sites in order; the last one is the target.
        cost: the search cost ``d(first, target)`` plus ``path_length``.
        path_length: the sum of ``d`` over the path's edges (the paper's "path
            length", its transfer cost).
    """

    nodes: tuple[str, ...]
    cost: float
    path_length: float

    def __post_init__(self) -> None:
        if len(self.nodes) < 2:
            raise ValueError(f"a path needs at least two nodes, got {self.nodes}")

    @property
    def hops(self) -> int:
        """The number of edges (fine-tuning steps after the first training)."""
        return len(self.nodes) - 1


def _check_sites(
    distances: SiteMatrix, names: Iterable[str], *, role: str, target: str
) -> tuple[str, ...]:
    checked = tuple(names)
    if not checked:
        raise ValueError(f"no {role} given; a path needs at least one")
    if len(set(checked)) != len(checked):
        raise ValueError(f"{role} list has duplicates: {list(checked)}")
    for name in checked:
        distances.index(name)  # names an unknown site
        if name == target:
            raise ValueError(f"target {target!r} is also listed among the {role}")
    return checked


def _check_distances(distances: SiteMatrix, target: str) -> None:
    distances.index(target)
    negative = np.argwhere(distances.values < 0)
    if negative.size:
        row, col = negative[0]
        raise ValueError(
            f"distance from {distances.sites[row]} to {distances.sites[col]} is "
            f"{distances.values[row, col]}; path search needs distances >= 0"
        )


def path_order(path: TransferPath) -> tuple[float, int, float, tuple[str, ...]]:
    """The order paths are chosen in: the lowest first (see the comment inside)."""
    # Exact cost ties go to fewer fine-tuning steps, then to the lower transfer cost
    # (with a symmetric d, k -> i -> t and i -> k -> t always tie on cost; the one
    # whose last step is nearer the target is the sensible pick), then to the
    # lexicographically first nodes, so the answer never depends on input order.
    return path.cost, path.hops, path.path_length, path.nodes


def paper_path(
    distances: SiteMatrix,
    *,
    landmarks: Sequence[str],
    candidates: Sequence[str],
    target: str,
    removed: Set[Edge] = frozenset(),
) -> TransferPath:
    """Return the paper's best ``landmark -> intermediate -> target`` path.

    Minimises ``cost(k, i, t) = d(k, t) + d(k, i) + d(i, t)`` over landmarks ``k`` and
    intermediates ``i != k`` (docs/methods.md#path-search);
    ``path_length = d(k, i) + d(i, t)``.
    Ties as in :func:`cheapest_path` (with a symmetric ``d``, ``k, i`` and ``i, k``
    always tie on cost; the lower path length wins). A pair whose edge ``k - i`` or
    ``i - t`` is in ``removed`` is skipped.

    Example:
        >>> d = SiteMatrix(sites=("A", "B", "T"), values=np.array(
        ...     [[0.0, 1.0, 5.0], [1.0, 0.0, 1.0], [5.0, 1.0, 0.0]]))
        >>> paper_path(d, landmarks=["A", "B"], candidates=["A", "B"], target="T")
        TransferPath(nodes=('A', 'B', 'T'), cost=7.0, path_length=2.0)

    Raises:
        ValueError: an unknown site, the target among landmarks or candidates, empty
            or duplicated lists, or negative distances.
        NoPathError: no pair with ``i != k`` whose edges are not removed.
    """
    _check_distances(distances, target)
    landmarks = _check_sites(distances, landmarks, role="landmarks", target=target)
    candidates = _check_sites(distances, candidates, role="candidates", target=target)
    paths = []
    for landmark in landmarks:
        for middle in candidates:
            if middle == landmark or not {
                edge(landmark, middle),
                edge(middle, target),
            }.isdisjoint(removed):
                continue
            path_length = distances.get(landmark, middle) + distances.get(
                middle, target
            )
            # Summed as cheapest_path sums, so the same path costs exactly the same.
            paths.append(
                TransferPath(
                    nodes=(landmark, middle, target),
                    cost=distances.get(landmark, target) + path_length,
                    path_length=path_length,
                )
            )
    if not paths:
        raise NoPathError(
            f"no landmark -> intermediate pair with distinct sites among landmarks "
            f"{list(landmarks)} and candidates {list(candidates)}"
            + _removed_note(removed)
        )
    return min(paths, key=path_order)


def start_sites(labelled: Mapping[str, int], *, fraction: float) -> list[str]:
    """The sources a path may start from: enough labelled cases to train from scratch.

    A path's first site trains its model from scratch; every later site only
    fine-tunes it. The paper starts every path at a landmark, whose score
    ``sum_u d(v, u) / (n_v + n_u)`` favours sites with many cases; without its
    communities, the federated form keeps as starting points the sources holding at
    least ``fraction`` of the best-labelled source's cases (``affinity.start-case-
    fraction``; 0 = any source).

    Example:
        >>> start_sites({"A": 8, "B": 2, "C": 5}, fraction=0.5)
        ['A', 'C']

    Raises:
        ValueError: no sources, a negative count, or ``fraction`` outside [0, 1].
    """
    if not labelled:
        raise ValueError("no sources given; a path needs at least one")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if min(labelled.values()) < 0:
        raise ValueError(f"labelled case counts must be >= 0, got {dict(labelled)}")
    most = max(labelled.values())
    return sorted(name for name, count in labelled.items() if count >= fraction * most)


def cheapest_path(
    distances: SiteMatrix,
    *,
    sources: Sequence[str],
    target: str,
    max_hops: int,
    min_hops: int = 1,
    landmarks: Sequence[str] | None = None,
    removed: Set[Edge] = frozenset(),
) -> TransferPath:
    """Return the cheapest simple path ``s -> ... -> target`` of 1..``max_hops`` edges.

    ``cost = d(first, target) + sum of d over the edges``: the paper's search cost
    plus its transfer cost, for any number of hops. With ``min_hops = max_hops = 2``,
    ``landmarks`` as the allowed first nodes and ``sources`` as the candidates this is
    exactly :func:`paper_path`. With ``min_hops = 1`` a direct path costs
    ``2 d(s, t)`` and is never beaten, for any ``d >= 0``: a longer path
    ``s -> ... -> m -> t`` costs at least ``d(s, t) + d(m, t)``, and both terms are at
    least the nearest source's ``d(s*, t)``. So ``min_hops = 1`` always picks plain
    direct transfer from the nearest source; a sequential path needs ``min_hops >= 2``
    (the paper's one intermediate; ``affinity.min-hops``).

    Exact search: depth-first over simple paths in lexicographic order, pruning a
    partial path once it costs more than the best complete one (sound because
    ``d >= 0``). Worst case ``sum_{h=1..K} n! / (n - h)!`` paths for ``n`` sources;
    meant for the few sites of a federation (n = 10, K = 3: 820 paths).

    Args:
        distances: ``d`` over at least the sources and the target.
        sources: the sites a path may use before the target.
        target: the last node.
        max_hops: at most this many edges (>= 1).
        min_hops: at least this many edges (1 <= min_hops <= max_hops).
        landmarks: the allowed first nodes (a subset of ``sources``); ``None`` = any.
        removed: edges no step may take (:func:`core.affinity.graph.edge` pairs).

    Returns:
        The cheapest path; exact cost ties go to fewer hops, then the lower
        path length, then the lexicographically first nodes.

    Raises:
        ValueError: an unknown site, the target among the sources, no sources,
            landmarks outside the sources, bad hop bounds, or negative distances.
        NoPathError: no path within the hop bounds avoids the removed edges.
    """
    _check_distances(distances, target)
    sources = _check_sites(distances, sources, role="sources", target=target)
    if max_hops < 1:
        raise ValueError(f"max_hops must be >= 1, got {max_hops}")
    if not 1 <= min_hops <= max_hops:
        raise ValueError(
            f"min_hops must be in [1, max_hops={max_hops}], got {min_hops}"
        )
    starts = sources
    if landmarks is not None:
        starts = _check_sites(distances, landmarks, role="landmarks", target=target)
        outside = sorted(set(starts) - set(sources))
        if outside:
            raise ValueError(f"landmarks {outside} are not among the sources")
    best: TransferPath | None = None
    ordered = sorted(sources)

    def extend(nodes: tuple[str, ...], search: float, length: float) -> None:
        nonlocal best
        if best is not None and search + length > best.cost:
            return
        hops = len(nodes)  # edges once the target is appended
        if hops >= min_hops and edge(nodes[-1], target) not in removed:
            final = length + distances.get(nodes[-1], target)
            path = TransferPath(
                nodes=(*nodes, target), cost=search + final, path_length=final
            )
            if best is None or path_order(path) < path_order(best):
                best = path
        if hops < max_hops:
            for site in ordered:
                if site not in nodes and edge(nodes[-1], site) not in removed:
                    step = distances.get(nodes[-1], site)
                    extend((*nodes, site), search, length + step)

    for start in sorted(starts):
        extend((start,), distances.get(start, target), 0.0)
    if best is None:
        raise NoPathError(
            f"no simple path with {min_hops}..{max_hops} hops from {list(starts)} "
            f"through {list(sources)} to {target!r}" + _removed_note(removed)
        )
    return best


def _removed_note(removed: Set[Edge]) -> str:
    if not removed:
        return ""
    return f" without the removed edges {[list(pair) for pair in sorted(removed)]}"
