"""The affinity phase (SeqTran, docs/methods.md#seqtran): profiles, path, fine-tuning.

Every site publishes its task profile (``query.profile``); the coordinator builds the
distance matrix over the sources and the target, chooses the transfer path
(``core.affinity.path_choice``) and has the model fine-tuned along it
(``train.finetune``). Only profiles, weights and training figures arrive here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from core import protocol
from core.affinity.graph import TaskFactors
from core.affinity.matrix import (
    SiteMatrix,
    affinity_matrices,
    distance_matrix,
    has_polarity,
    normalise,
    normalise_polarity,
    polarity_matrix,
)
from core.affinity.path_choice import PathChoice, choose_path
from core.affinity.profile import SiteProfile
from core.config import RunConfig
from core.training.networks import Arrays
from server import records
from server.coordinator import Coordinator, PhaseError, SiteInfo, names_by_site
from server.results import (
    PROFILE_LABEL_TERM,
    AffinityResult,
    LabelUse,
    TransferPathRecord,
)

SEQTRAN_CANDIDATE: Final = "seqtran"  # the path's model among the TGMA candidates


def _profile_key(name: str) -> str:
    return protocol.field_key(protocol.ProfileReply, name)


def _matrix(matrix: SiteMatrix) -> list[list[float]]:
    return [[float(value) for value in row] for row in matrix.values]


def _collect_profiles(
    coordinator: Coordinator, sites: Mapping[int, SiteInfo]
) -> tuple[dict[str, SiteProfile], dict[str, dict[str, Any]], dict[int, str]]:
    """Every site's task profile; what each release cost; who failed and why."""
    replies = coordinator.ask(
        {node: records.build_request() for node in sites}, protocol.PROFILE
    )
    profiles: dict[str, SiteProfile] = {}
    releases: dict[str, dict[str, Any]] = {}
    failed = dict(replies.failed)
    for node, reply in sorted(replies.ok.items(), key=lambda item: sites[item[0]].name):
        name = sites[node].name
        try:
            released = protocol.ProfileReply.from_fields(
                records.read_metrics(reply.content)
            )
            profiles[name] = SiteProfile.from_dict(released.profile_values(name))
        except (ValueError, KeyError) as error:
            failed[node] = f"malformed reply: {error}"
            continue
        releases[name] = {
            _profile_key("num_images"): released.num_images,
            _profile_key("num_labelled"): released.num_labelled,
            PROFILE_LABEL_TERM: released.mean_label_map is not None,
            protocol.DP_EPSILON_SPENT: released.epsilon_spent,
            protocol.DP_EPSILON_TOTAL: released.epsilon_total,
            protocol.DP_DELTA: released.delta,
            protocol.DP_NOISE_MULTIPLIER: released.noise_multiplier,
        }
    return profiles, releases, failed


def choose_affinity_path(
    config: RunConfig,
    profiles: Mapping[str, SiteProfile],
    sources: Sequence[str],
    target: str,
    *,
    factors: Mapping[str, TaskFactors],
) -> tuple[PathChoice, dict[str, Any]]:
    """The path to ``target`` (:func:`choose_path`) and the matrices it was chosen on.

    The label term needs labels at every site of the matrix; when the target (or a
    source) has none, ``d`` is the image term alone. The polarity term
    (``affinity.polarity-weight > 0``) likewise needs every site's; without it ``d``
    has no polarity term. ``factors`` (each site's
    modality and labels from ``query.hello``) serve ``affinity.one-factor-edges``.
    """
    names = [*sorted(sources), target]
    scenario = {name: profiles[name] for name in names}
    with_labels = all(
        profile.mean_label_map is not None for profile in scenario.values()
    )
    image, label = affinity_matrices(scenario, with_labels=with_labels)
    image_norm, label_norm = normalise(image, label)
    affinity = config.affinity
    label_weight = affinity.label_weight if with_labels else 0.0
    with_polarity = affinity.polarity_weight > 0.0 and has_polarity(scenario)
    polarity = polarity_matrix(scenario) if with_polarity else None
    polarity_weight = affinity.polarity_weight if with_polarity else 0.0
    if affinity.image_weight == 0.0 and label_weight == 0.0:
        raise PhaseError(
            "affinity: affinity.image-weight is 0 and the label term cannot be "
            f"computed (a site among {names} has no labelled cases), so every "
            "distance would be 0"
        )
    distances = distance_matrix(
        image_norm,
        label_norm,
        image_weight=affinity.image_weight,
        label_weight=label_weight,
        polarity_norm=None if polarity is None else normalise_polarity(polarity),
        polarity_weight=polarity_weight,
    )
    choice = choose_path(
        distances,
        labelled={name: profiles[name].num_labelled for name in sources},
        target=target,
        affinity=affinity,
        factors=factors,
    )
    return choice, {
        "sites": names,
        "label_term": with_labels,
        "polarity_term": with_polarity,
        "weights": {
            "image": affinity.image_weight,
            "label": label_weight,
            "polarity": polarity_weight,
        },
        "image_distance": _matrix(image),
        "label_similarity": _matrix(label) if with_labels else None,
        "polarity_distance": None if polarity is None else _matrix(polarity),
        "distance": _matrix(distances),
        "graph": {
            "landmarks": affinity.landmarks.value,
            "starts": list(choice.starts),
            "communities": [
                {"members": list(c.members), "landmark": c.landmark}
                for c in choice.communities
            ],
            "one_factor_removed": [list(pair) for pair in choice.removed],
        },
    }


def _finetune_along(
    coordinator: Coordinator,
    steps: Sequence[SiteInfo],
    start: Arrays,
) -> tuple[Arrays | None, list[dict[str, Any]], str | None]:
    """Fine-tune ``start`` at each site in turn; the model, the steps, a failure."""
    weights = start
    done: list[dict[str, Any]] = []
    for number, site in enumerate(steps, start=1):
        replies = coordinator.ask(
            {site.node_id: records.build_request(weights=weights)}, protocol.FINETUNE
        )
        reply = replies.ok.get(site.node_id)
        try:
            if reply is None:
                raise ValueError(replies.failed.get(site.node_id, "no reply"))
            weights = records.read_weights(reply.content)
            report = protocol.TrainReply.from_fields(
                records.read_metrics(reply.content)
            )
        except ValueError as error:
            return None, done, f"step {number} at {site.name} failed: {error}"
        done.append({"site": site.name, **report.to_fields()})
        coordinator.log(
            f"affinity: step {number}/{len(steps)} fine-tuned at {site.name}, loss "
            f"{report.loss:.4f}, {report.num_examples} examples, "
            f"{report.seconds:.1f} s"
        )
    return weights, done, None


def transferred_label_use(
    target: str,
    *,
    matrices: Mapping[str, Any],
    target_labelled: int,
    steps: Sequence[Mapping[str, Any]],
) -> LabelUse:
    """What the transferred model used of ``target``'s labels, from what happened.

    The path was chosen with the target's labels when the distance had a label term
    (``matrices``: every site's profile carried one, and its weight was not 0): the
    target's mean label map over its ``target_labelled`` cases; likewise with a
    weighed polarity term (its intensities inside and around the target's labelled
    foreground). And each fine-tuning step at the target trained on its labelled
    cases (``num-cases`` of the step).

    Example:
        >>> use = transferred_label_use("A", matrices={"label_term": False},
        ...     target_labelled=2, steps=[{"site": "B"}, {"site": "A", "num-cases": 2}])
        >>> use.via, use.cases
        (('SeqTran candidate fine-tuned at A on 2 labelled cases',), 2)
        >>> transferred_label_use("A", matrices={"label_term": True,
        ...     "polarity_term": True, "weights": {"label": 0.0, "polarity": 1.0}},
        ...     target_labelled=2, steps=[]).via
        ("SeqTran path chosen with A's polarity term (2 labelled cases)",)
    """
    uses = []
    weights = matrices.get("weights", {})
    for term in ("label", "polarity"):
        if matrices.get(f"{term}_term") and weights.get(term, 0.0) > 0:
            uses.append(
                LabelUse(
                    via=(
                        f"SeqTran path chosen with {target}'s {term} term "
                        f"({target_labelled} labelled cases)",
                    ),
                    cases=target_labelled,
                )
            )
    cases_key = protocol.field_key(protocol.TrainReply, "num_cases")
    for step in steps:
        if step["site"] == target:
            cases = int(step[cases_key])
            uses.append(
                LabelUse(
                    via=(
                        f"SeqTran candidate fine-tuned at {target} on {cases} "
                        "labelled cases",
                    ),
                    cases=cases,
                )
            )
    return LabelUse.joined(uses)


def run(
    coordinator: Coordinator,
    sites: Mapping[int, SiteInfo],
    target: SiteInfo,
    models: Mapping[str, Arrays],
) -> tuple[AffinityResult, Arrays | None]:
    """Phase 3: SeqTran. Profiles, the cheapest transfer path, sequential fine-tuning.

    Every site publishes its task profile (``query.profile``; noised where its
    policy requires DP). The coordinator computes ``d = a*H + b*(1 - R)`` over the
    sources with a model and the target and picks the path by
    :func:`core.affinity.path_choice.choose_path` (docs/methods.md#path-search: the
    cheapest of ``affinity.min-hops``..``affinity.max-hops`` edges, or with
    ``affinity.landmarks = "communities"`` a landmark -> intermediate -> target path
    within a community; the communities and the edges the one-factor rule removed are
    recorded under ``graph``; settings the federation cannot meet stop the phase, not
    the run). The path's first site's source
    model is fine-tuned (``train.finetune``) at each later site in turn and, when the
    target holds labelled cases, last at the target. The result joins the TGMA
    candidates as :data:`SEQTRAN_CANDIDATE`. Nothing later depends on it, so a missing
    profile or a failed step is recorded and the run goes on without the candidate.
    What the candidate used of the target's labels is recorded with it
    (:func:`transferred_label_use`).

    Returns:
        The phase result (persisted) and the transferred model, or None.
    """
    if SEQTRAN_CANDIDATE in models:
        raise PhaseError(
            f"affinity: a source site is named {SEQTRAN_CANDIDATE!r}, the name of "
            "the transferred model among the candidates; rename the site or set "
            "affinity.enabled = false"
        )
    profiles, releases, failed = _collect_profiles(coordinator, sites)
    sources = [name for name in models if name in profiles]
    choice: PathChoice | None = None
    matrices: dict[str, Any] = {}
    stopped: str | None = None
    if target.name not in profiles or not sources:
        stopped = (
            f"no profile from the target {target.name}"
            if target.name not in profiles
            else "no source with both a model and a profile"
        )
    else:
        factors = {
            site.name: TaskFactors.from_class_names(
                site.hello.modality, site.hello.class_names
            )
            for site in sites.values()
        }
        try:
            choice, matrices = choose_affinity_path(
                coordinator.config, profiles, sources, target.name, factors=factors
            )
        except ValueError as error:
            # Settings this federation cannot meet (affinity.communities above the
            # sources that answered, the one-factor rule leaving no path) cost the
            # optional candidate, not the run.
            stopped = f"no transfer path: {error}"
    path_record: TransferPathRecord | None = None
    steps_done: list[dict[str, Any]] = []
    transferred: Arrays | None = None
    if choice is not None:
        path = choice.path
        path_record = TransferPathRecord(
            nodes=tuple(path.nodes), cost=path.cost, path_length=path.path_length
        )
        by_name = {site.name: site for site in sites.values()}
        steps = [by_name[name] for name in path.nodes[1:-1]]
        if target.hello.labelled > 0:
            steps.append(target)
        coordinator.log(
            f"affinity: path {' -> '.join(path.nodes)} (cost {path.cost:.3f}); "
            f"fine-tuning at {[site.name for site in steps] or 'no site'}"
        )
        if not steps:
            stopped = (
                f"the path is direct from {path.nodes[0]} and the target has no "
                "labelled case: the source model itself is already a candidate"
            )
        else:
            transferred, steps_done, stopped = _finetune_along(
                coordinator, steps, models[path.nodes[0]]
            )
            if transferred is not None:
                coordinator.store.save_model(
                    f"affinity-{SEQTRAN_CANDIDATE}", transferred
                )
    if stopped:
        coordinator.warn(f"affinity: no transferred model ({stopped})")
    result = AffinityResult(
        target=target.name,
        profiles=releases,
        missing=names_by_site(sites, failed),
        path=path_record,
        steps=tuple(steps_done),
        model=None if transferred is None else SEQTRAN_CANDIDATE,
        label_use=LabelUse()
        if transferred is None
        else transferred_label_use(
            target.name,
            matrices=matrices,
            target_labelled=profiles[target.name].num_labelled,
            steps=steps_done,
        ),
        stopped=stopped,
        matrices=matrices,
    )
    coordinator.store.save_result(result)
    if transferred is None:
        return result, None
    return result, coordinator.store.load_model(f"affinity-{SEQTRAN_CANDIDATE}")
