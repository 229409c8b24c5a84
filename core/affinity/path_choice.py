"""The run's SeqTran transfer path under its ``affinity`` settings.

Owns :func:`choose_path`, what the pipeline's ``affinity`` phase and the ``affinity``
benchmark call: it reads ``affinity.landmarks``, ``affinity.communities``,
``affinity.one-factor-edges`` and the hop bounds, and combines the searches of
:mod:`core.affinity.paths` with the graph of :mod:`core.affinity.graph`. Pure Python;
never imports flwr or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence, Set

from core.affinity.graph import (
    Edge,
    TaskFactors,
    choose_landmark,
    find_communities,
    one_factor_removed,
)
from core.affinity.matrix import SiteMatrix
from core.affinity.paths import (
    NoPathError,
    TransferPath,
    cheapest_path,
    paper_path,
    path_order,
    start_sites,
)
from core.config import AffinityConfig, LandmarkRule


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Community:
    """A Girvan-Newman community of sources and its landmark."""

    members: tuple[str, ...]  # sorted
    landmark: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PathChoice:
    """The chosen path and what it was chosen among.

    Attributes:
        path: the transfer path.
        starts: the sites a path could start from (the start sites, or the
            landmarks of the communities with an intermediate).
        communities: the communities (``affinity.landmarks = "communities"``; empty
            otherwise), in order of their first member.
        removed: the edges the one-factor rule removed (empty when it is off).
    """

    path: TransferPath
    starts: tuple[str, ...]
    communities: tuple[Community, ...]
    removed: tuple[Edge, ...]


def _community_path(
    distances: SiteMatrix,
    communities: Sequence[Community],
    *,
    target: str,
    removed: Set[Edge],
) -> TransferPath:
    """The paper's search: each landmark -> a site of its community -> target."""
    paths = []
    for community in communities:
        if len(community.members) < 2:
            continue  # a lone site has no intermediate
        try:
            paths.append(
                paper_path(
                    distances,
                    landmarks=[community.landmark],
                    candidates=community.members,
                    target=target,
                    removed=removed,
                )
            )
        except NoPathError:
            continue  # every step from this landmark was removed
    if not paths:
        raise NoPathError(
            f"no landmark -> intermediate -> {target!r} path within a community "
            f"{[list(c.members) for c in communities]}"
        )
    return min(paths, key=path_order)


def _build_communities(
    distances: SiteMatrix,
    labelled: Mapping[str, int],
    *,
    count: int,
    removed: Set[Edge],
) -> tuple[Community, ...]:
    sources = sorted(labelled)
    if count > len(sources):
        raise ValueError(
            f"affinity.communities = {count} is more than the {len(sources)} "
            f"sources {sources}; set it to at most {len(sources)}"
        )
    try:
        groups = find_communities(distances, sources, count=count, removed=removed)
    except ValueError as error:
        raise ValueError(f"affinity.communities = {count}: {error}") from error
    if all(len(group) < 2 for group in groups):
        raise ValueError(
            f"no community has two sites, so no landmark -> intermediate path "
            f"exists: communities {[list(group) for group in groups]} "
            f"(affinity.communities = {count}; lower it)"
        )
    return tuple(
        Community(
            members=group,
            landmark=choose_landmark(
                distances, group, labelled=labelled, removed=removed
            ),
        )
        for group in groups
    )


def choose_path(
    distances: SiteMatrix,
    *,
    labelled: Mapping[str, int],
    target: str,
    affinity: AffinityConfig,
    factors: Mapping[str, TaskFactors] | None = None,
) -> PathChoice:
    """The run's transfer path to ``target`` under the ``affinity`` settings.

    The sources are the sites of ``labelled`` (name -> labelled cases). With
    ``affinity.one-factor-edges`` the edges between two sites (target included)
    whose modality and labels both differ are removed first
    (:func:`core.affinity.graph.one_factor_removed` on ``factors``). Then, by
    ``affinity.landmarks``:

    - ``case-fraction``: :func:`core.affinity.paths.cheapest_path` over the sources
      with ``affinity.min-hops``..``affinity.max-hops`` edges (capped at the number of
      sources: a simple path cannot use more), starting at
      :func:`core.affinity.paths.start_sites`.
    - ``communities``: the sources split into ``affinity.communities`` Girvan-Newman
      communities, each with its landmark; the cheapest ``landmark -> intermediate ->
      target`` path with the intermediate in the landmark's community (
      docs/methods.md#path-search; the config guarantees the hop bounds allow 2).

    Raises:
        ValueError: ``affinity.communities`` above the number of sources, no
            community with two sites, a zero-case pair in a community, the rule on
            without ``factors`` for every site, the one-factor rule removing every
            path, or as :func:`core.affinity.paths.cheapest_path` and
            :func:`core.affinity.graph.find_communities`.
    """
    sources = sorted(labelled)
    removed: frozenset[Edge] = frozenset()
    if affinity.one_factor_edges:
        if factors is None:
            raise ValueError(
                "affinity.one-factor-edges is on but no site's modality and labels "
                "were given"
            )
        removed = one_factor_removed(factors, [*sources, target])
    communities: tuple[Community, ...] = ()
    try:
        if affinity.landmarks is LandmarkRule.COMMUNITIES:
            communities = _build_communities(
                distances, labelled, count=affinity.communities, removed=removed
            )
            starts = tuple(c.landmark for c in communities if len(c.members) > 1)
            path = _community_path(
                distances, communities, target=target, removed=removed
            )
        else:
            starts = tuple(start_sites(labelled, fraction=affinity.start_case_fraction))
            path = cheapest_path(
                distances,
                sources=sources,
                target=target,
                min_hops=min(affinity.min_hops, len(sources)),
                max_hops=min(affinity.max_hops, len(sources)),
                landmarks=starts,
                removed=removed,
            )
    except NoPathError as error:
        if not removed:
            raise
        # Without removed edges a path always exists: the rule took them all.
        raise ValueError(
            f"the one-factor rule (affinity.one-factor-edges) removed every path to "
            f"{target!r}: {error}"
        ) from error
    return PathChoice(
        path=path,
        starts=starts,
        communities=communities,
        removed=tuple(sorted(removed)),
    )
