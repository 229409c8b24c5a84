"""The coordinator's phases (DESIGN.md section 5).

discover -> source training -> affinity (SeqTran) -> transferability -> adaptation ->
consensus -> semisup -> evaluation.

Each phase sends one kind of message, waits for the replies, records which sites did
not answer and why, persists its result to the run store before the next phase starts,
and returns it. Only weights, scores and aggregate metrics arrive here; the
coordinator never sees an image, a label or a prediction map.

The coordinator keeps its own hash-chained ledger (``runs/<run-id>/ledger.jsonl``):
one ``egress`` entry per request it sends and one ``ingress`` entry per reply it
receives, digested exactly as the site digests it (``core.egress``), so an auditor can
match each site's ledger against it. It also keeps the policy each site reported it
applied, for the report's privacy section.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from core import protocol
from core.affinity import SiteMatrix, affinity_matrices, distance_matrix, normalise
from core.config import RunConfig
from core.dual_task import segmentation_weights
from core.egress import measure_content, measure_error
from core.jobs import Transferability, build_initial_weights
from core.ledger import EGRESS, INGRESS, RELEASED, Ledger
from core.models import Arrays
from core.semisup_job import initial_student_weights
from core.task_profile import SiteProfile
from core.transfer_choice import PathChoice, choose_path
from core.transfer_graph import TaskFactors
from core.transferability import select_sources
from server import records
from server.store import RunStore

Log = Callable[[str], None]
COORDINATOR: Final = "coordinator"  # the coordinator's name in ledgers
LEDGER_FILE: Final = "ledger.jsonl"


class PhaseError(RuntimeError):
    """A phase could not proceed (too few sites answered, or a required one failed)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SiteInfo:
    """A site as the coordinator knows it: its node and what it said in hello."""

    node_id: int
    hello: protocol.HelloReply

    @property
    def name(self) -> str:
        """The site's name."""
        return self.hello.site


@dataclasses.dataclass(frozen=True, slots=True)
class Replies:
    """Replies of one phase by node id, and the nodes that failed with the reason."""

    ok: dict[int, Message]
    failed: dict[int, str]


@dataclasses.dataclass
class Coordinator:
    """Sends a phase's messages, collects its replies and records both in its ledger.

    Attributes:
        site_names: node id -> site name, known after discover.
        applied_policies: site name -> the ``policy.*`` fields its last reply said
            were applied.
    """

    grid: Grid
    config: RunConfig
    store: RunStore
    log: Log
    site_names: dict[int, str] = dataclasses.field(default_factory=dict)
    applied_policies: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=dict
    )

    @property
    def ledger(self) -> Ledger:
        """The coordinator's ledger of this run."""
        return Ledger(self.store.run_dir / LEDGER_FILE)

    def site_name(self, node: int, reply: Message | None = None) -> str:
        """The node's site name: known, or said in its hello reply, or ``node <id>``."""
        if node in self.site_names:
            return self.site_names[node]
        if reply is not None and not reply.has_error():
            said = records.read_settings(reply.content).get("site")
            if isinstance(said, str) and said:
                return said
        return f"node {node}"

    def _record(self, message: Message, *, direction: str, sender: str) -> None:
        if message.has_error():
            egress = measure_error(message.error.reason or "")
        else:
            egress = measure_content(
                message.content, message_type=message.metadata.message_type
            ).egress
        self.ledger.append(
            run_id=str(message.metadata.run_id),
            message_type=message.metadata.message_type,
            sender=sender,
            direction=direction,
            egress=egress,
            decision=RELEASED,
            policy={},
            epsilon_spent=0.0,
            epsilon_total=0.0,
        )

    def _keep_applied_policy(self, node: int, reply: Message) -> None:
        if reply.has_error():
            return
        settings = records.read_settings(reply.content)
        applied = {
            key: value
            for key, value in settings.items()
            if key.startswith(protocol.APPLIED_POLICY_PREFIX)
        }
        if applied:
            self.applied_policies[self.site_name(node, reply)] = applied

    def ask(self, requests: Mapping[int, RecordDict], message_type: str) -> Replies:
        """Send one message per node and wait up to the reply timeout.

        Replies are matched to requests by message id (an error reply made by the
        SuperLink does not carry the dead node's id); a node that neither answered nor
        errored before the timeout is reported as timed out. Every request and reply
        is recorded in the coordinator's ledger.
        """
        messages = {
            node: Message(content, dst_node_id=node, message_type=message_type)
            for node, content in requests.items()
        }
        for message in messages.values():
            self._record(message, direction=EGRESS, sender=COORDINATOR)
        replies = list(
            self.grid.send_and_receive(
                list(messages.values()), timeout=self.config.federation.reply_timeout_s
            )
        )
        # The grid assigns message ids when it pushes, so map them only afterwards.
        by_message_id = {
            message.metadata.message_id: node for node, message in messages.items()
        }
        ok: dict[int, Message] = {}
        failed: dict[int, str] = {}
        for reply in replies:
            node = by_message_id.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            self._record(reply, direction=INGRESS, sender=self.site_name(node, reply))
            self._keep_applied_policy(node, reply)
            if reply.has_error():
                failed[node] = f"error {reply.error.code}: {reply.error.reason}"
            else:
                ok[node] = reply
        for node in requests:
            if node not in ok and node not in failed:
                failed[node] = (
                    f"no reply within {self.config.federation.reply_timeout_s:g} s"
                )
        return Replies(ok=ok, failed=failed)


def _names(
    sites: Mapping[int, SiteInfo], nodes: Mapping[int, object]
) -> dict[str, Any]:
    return {
        sites[node].name if node in sites else str(node): value
        for node, value in nodes.items()
    }


def wait_for_nodes(grid: Grid, *, expected: int, wait_s: float, log: Log) -> list[int]:
    """Wait until ``expected`` nodes are connected or ``wait_s`` passes."""
    deadline = time.monotonic() + wait_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    log(f"{len(nodes)} of {expected} expected nodes connected")
    return sorted(nodes)


def _say_hello(
    coordinator: Coordinator, nodes: list[int]
) -> tuple[dict[int, SiteInfo], dict[int, str]]:
    replies = coordinator.ask(
        {node: records.build_request() for node in nodes}, protocol.HELLO
    )
    sites, failed = {}, dict(replies.failed)
    for node, reply in replies.ok.items():
        try:
            sites[node] = SiteInfo(
                node,
                protocol.HelloReply.from_fields(records.read_settings(reply.content)),
            )
        except ValueError as error:
            failed[node] = f"malformed reply: {error}"
    coordinator.site_names.update({node: site.name for node, site in sites.items()})
    for node, reason in failed.items():
        coordinator.log(f"node {node} did not say hello: {reason}")
    return sites, failed


def discover(
    coordinator: Coordinator, *, nodes: list[int], default_target: str | None
) -> tuple[dict[int, SiteInfo], str]:
    """Phase 1: ask every node who it is; choose the target site."""
    config = coordinator.config
    sites, failed = _say_hello(coordinator, nodes)
    if len(sites) < config.federation.min_sites:
        raise PhaseError(
            f"discover: only {len(sites)} site(s) answered, federation."
            f"min-sites is {config.federation.min_sites}; failures: "
            f"{failed}"
        )
    target = config.federation.target_site or default_target
    names = sorted(site.name for site in sites.values())
    if not target or target not in names:
        raise PhaseError(
            f"discover: target site {target!r} is not among the sites that "
            f"answered {names}; set federation.target-site"
        )
    coordinator.store.save_phase(
        "discover",
        {
            "sites": [
                {"name": site.name, "node_id": node, **site.hello.to_fields()}
                for node, site in sorted(sites.items(), key=lambda item: item[1].name)
            ],
            "target": target,
            "missing": {str(node): reason for node, reason in failed.items()},
        },
    )
    coordinator.log(f"discover: sites {names}, target {target}")
    return sites, target


def rediscover(
    coordinator: Coordinator, *, nodes: list[int], saved: Mapping[str, Any]
) -> dict[int, SiteInfo]:
    """Map the sites of a resumed run onto this run's nodes (hello, not persisted).

    Node ids belong to a Flower run (in simulation they change with every run), so a
    resumed run asks every node who it is again; the saved discover result stays the
    run's record. Only the target must answer: the finished phases do not need the
    others, and later phases proceed without the missing ones as usual.

    Raises:
        PhaseError: the saved target did not answer.
    """
    sites, failed = _say_hello(coordinator, nodes)
    names = sorted(site.name for site in sites.values())
    if saved["target"] not in names:
        raise PhaseError(
            f"resume: target site {saved['target']!r} is not among the sites that "
            f"answered {names}; failures: {failed}"
        )
    known = {site["name"] for site in saved["sites"]}
    coordinator.log(
        f"resume: sites {names} answered; the run's sites were {sorted(known)}"
    )
    return sites


def train_sources(
    coordinator: Coordinator, sources: Mapping[int, SiteInfo]
) -> dict[str, Arrays]:
    """Phase 2: every source trains a model on its own labels; keep the weights."""
    config = coordinator.config
    initial = build_initial_weights(config)
    coordinator.log(f"source training at {sorted(s.name for s in sources.values())}")
    replies = coordinator.ask(
        {node: records.build_request(weights=initial) for node in sources},
        protocol.TRAIN_SOURCE,
    )
    models, training = {}, {}
    failed = dict(replies.failed)
    for node, reply in replies.ok.items():
        name = sources[node].name
        try:
            weights = records.read_weights(reply.content)
            report = protocol.TrainReply.from_fields(
                records.read_metrics(reply.content)
            )
        except ValueError as error:
            failed[node] = f"malformed reply: {error}"
            continue
        models[name] = weights
        coordinator.store.save_model(f"source-{name}", weights)
        training[name] = report.to_fields()
        privacy = (
            f", DP epsilon {report.epsilon_spent:.3f} (site total "
            f"{report.epsilon_total:.3f}, delta {report.delta:g})"
            if report.private
            else ""
        )
        coordinator.log(
            f"source {name}: loss {report.loss:.4f}, {report.num_examples} "
            f"examples{privacy}"
        )
    required = min(config.federation.min_sites, len(sources))
    if len(models) < max(required, 1):
        raise PhaseError(
            f"source training: {len(models)} source model(s) arrived, "
            f"{required} needed; failures: {_names(sources, failed)}"
        )
    coordinator.store.save_phase(
        "source-training", {"training": training, "missing": _names(sources, failed)}
    )
    return models


SEQTRAN_CANDIDATE: Final = "seqtran"  # the path's model among the TGMA candidates


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
            "num-images": released.num_images,
            "num-labelled": released.num_labelled,
            "label-term": released.mean_label_map is not None,
            "dp.epsilon-spent": released.epsilon_spent,
            "dp.epsilon-total": released.epsilon_total,
            "dp.delta": released.delta,
            "dp.noise-multiplier": released.noise_multiplier,
        }
    return profiles, releases, failed


def _choose_path(
    config: RunConfig,
    profiles: Mapping[str, SiteProfile],
    sources: Sequence[str],
    target: str,
    *,
    factors: Mapping[str, TaskFactors],
) -> tuple[PathChoice, dict[str, Any]]:
    """The path to ``target`` (:func:`choose_path`) and the matrices it was chosen on.

    The label term needs labels at every site of the matrix; when the target (or a
    source) has none, ``d`` is the image term alone. ``factors`` (each site's
    modality and labels from ``query.hello``) serve ``affinity.one-factor-edges``.
    """
    names = [*sorted(sources), target]
    scenario = {name: profiles[name] for name in names}
    with_labels = all(profile.num_labelled > 0 for profile in scenario.values())
    image, label = affinity_matrices(scenario, with_labels=with_labels)
    image_norm, label_norm = normalise(image, label)
    affinity = config.affinity
    label_weight = affinity.label_weight if with_labels else 0.0
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
        "weights": {"image": affinity.image_weight, "label": label_weight},
        "image_distance": _matrix(image),
        "label_similarity": _matrix(label) if with_labels else None,
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


def affinity(
    coordinator: Coordinator,
    sites: Mapping[int, SiteInfo],
    target: SiteInfo,
    models: Mapping[str, Arrays],
) -> tuple[dict[str, Any], Arrays | None]:
    """Phase 3: SeqTran. Profiles, the cheapest transfer path, sequential fine-tuning.

    Every site publishes its task profile (``query.profile``; noised where its
    policy requires DP). The coordinator computes ``d = a*H + b*(1 - R)`` over the
    sources with a model and the target and picks the path by
    :func:`core.transfer_choice.choose_path` (METHODS.md 4 (b) 5-7: the cheapest of
    ``affinity.min-hops``..``affinity.max-hops`` edges, or with ``affinity.landmarks
    = "communities"`` a landmark -> intermediate -> target path within a community;
    the communities and the edges the one-factor rule removed are recorded under
    ``graph``; settings the federation cannot meet stop the phase, not the run).
    The path's first site's source
    model is fine-tuned (``train.finetune``) at each later site in turn and, when the
    target holds labelled cases, last at the target. The result joins the TGMA
    candidates as :data:`SEQTRAN_CANDIDATE`. Nothing later depends on it, so a missing
    profile or a failed step is recorded and the run goes on without the candidate.

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
    result: dict[str, Any] = {
        "target": target.name,
        "profiles": releases,
        "missing": _names(sites, failed),
        "path": None,
        "steps": [],
        "model": None,
        "stopped": None,
    }
    sources = [name for name in models if name in profiles]
    choice: PathChoice | None = None
    if target.name not in profiles or not sources:
        result["stopped"] = (
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
            choice, matrices = _choose_path(
                coordinator.config, profiles, sources, target.name, factors=factors
            )
        except ValueError as error:
            # Settings this federation cannot meet (affinity.communities above the
            # sources that answered, the one-factor rule leaving no path) cost the
            # optional candidate, not the run.
            result["stopped"] = f"no transfer path: {error}"
        else:
            result.update(matrices)
    if choice is not None:
        path = choice.path
        result["path"] = {
            "nodes": list(path.nodes),
            "cost": path.cost,
            "path_length": path.path_length,
        }
        by_name = {site.name: site for site in sites.values()}
        steps = [by_name[name] for name in path.nodes[1:-1]]
        if target.hello.labelled > 0:
            steps.append(target)
        coordinator.log(
            f"affinity: path {' -> '.join(path.nodes)} (cost {path.cost:.3f}); "
            f"fine-tuning at {[site.name for site in steps] or 'no site'}"
        )
        if not steps:
            result["stopped"] = (
                f"the path is direct from {path.nodes[0]} and the target has no "
                "labelled case: the source model itself is already a candidate"
            )
        else:
            transferred, result["steps"], result["stopped"] = _finetune_along(
                coordinator, steps, models[path.nodes[0]]
            )
            if transferred is not None:
                coordinator.store.save_model(
                    f"affinity-{SEQTRAN_CANDIDATE}", transferred
                )
                result["model"] = SEQTRAN_CANDIDATE
    if result["stopped"]:
        coordinator.log(f"affinity: no transferred model ({result['stopped']})")
    coordinator.store.save_phase("affinity", result)
    if result["model"] is None:
        return result, None
    return result, coordinator.store.load_model(f"affinity-{SEQTRAN_CANDIDATE}")


def _ask_target(
    coordinator: Coordinator,
    target: SiteInfo,
    content: RecordDict,
    message_type: str,
    phase: str,
) -> Message:
    replies = coordinator.ask({target.node_id: content}, message_type)
    if target.node_id not in replies.ok:
        raise PhaseError(
            f"{phase}: target {target.name} failed: "
            f"{replies.failed.get(target.node_id)}"
        )
    return replies.ok[target.node_id]


def transferability(
    coordinator: Coordinator, target: SiteInfo, models: Mapping[str, Arrays]
) -> dict[str, Any]:
    """Phase 4: the target scores every source model (ITM); choose main/aux by DTM."""
    reply = _ask_target(
        coordinator,
        target,
        records.build_request(models=models),
        protocol.LFTM,
        "transferability",
    )
    lftm = protocol.LftmReply.from_fields(
        records.read_settings(reply.content), records.read_metrics(reply.content)
    )
    itm = lftm.itm_rows()
    dtm = (
        lftm.dtm
        if itm is None
        else Transferability(metric=lftm.metric, sources=lftm.sources, itm=itm).dtm
    )
    selection = select_sources(dtm)
    result = {
        "metric": lftm.metric,
        "release": lftm.release,
        "sources": list(lftm.sources),
        "itm": itm,
        "dtm": dtm,
        "main": selection.main,
        "aux": selection.aux,
        "weights": {"main": selection.weight_main, "aux": selection.weight_aux},
    }
    coordinator.store.save_phase("transferability", result)
    coordinator.log(
        "DTM "
        + ", ".join(f"{n} {v:.3f}" for n, v in dtm.items())
        + f" -> main {selection.main}, aux {selection.aux}"
    )
    return result


def adaptation(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    selection: Mapping[str, Any],
) -> dict[str, Arrays]:
    """Phase 5: the target adapts the main/aux pair on its own images."""
    request = protocol.AdaptRequest(
        main=selection["main"],
        aux=selection["aux"] or "",
        weight_main=selection["weights"]["main"],
        weight_aux=selection["weights"]["aux"],
    )
    reply = _ask_target(
        coordinator,
        target,
        records.build_request(settings=request.to_fields(), models=models),
        protocol.ADAPT,
        "adaptation",
    )
    adapted = records.read_named_models(reply.content)
    if "main" not in adapted:
        raise PhaseError(f"adaptation: target {target.name} returned no adapted model")
    for name, weights in adapted.items():
        coordinator.store.save_model(f"adapted-{name}", weights)
    outcome = protocol.AdaptReply.from_fields(records.read_metrics(reply.content))
    coordinator.store.save_phase(
        "adaptation", {**outcome.to_fields(), "models": sorted(adapted)}
    )
    coordinator.log(
        f"adaptation: {outcome.num_examples} examples, "
        f"{outcome.pseudo_label_foreground:.3f} pseudo-foreground, "
        f"{outcome.seconds:.1f} s at the target"
    )
    return adapted


ADAPTED_START: Final = "adapted:main"  # the model the consensus phase refines


def consensus(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    adapted: Mapping[str, Arrays],
) -> dict[str, Arrays]:
    """Phase 6: the target fuses the sources' predictions (and its atlases' labels).

    The target builds its noisy label set, learns DeepSTAPLE data parameters, keeps
    the consensus labels and trains the adapted main model on each consensus; only
    aggregate figures and those models come back.
    """
    request = protocol.ConsensusRequest(
        label_sources=tuple(sorted(models)), start=ADAPTED_START
    )
    reply = _ask_target(
        coordinator,
        target,
        records.build_request(
            settings=request.to_fields(),
            models={**models, ADAPTED_START: adapted["main"]},
        ),
        protocol.CONSENSUS,
        "consensus",
    )
    trained = records.read_named_models(reply.content)
    if "deepstaple" not in trained:
        raise PhaseError(
            f"consensus: target {target.name} returned no DeepSTAPLE-trained model"
        )
    outcome = protocol.ConsensusReply.from_fields(records.read_metrics(reply.content))
    for method, weights in trained.items():
        coordinator.store.save_model(f"consensus-{method}", weights)
    coordinator.store.save_phase(
        "consensus",
        {
            **dataclasses.asdict(outcome),
            "sources": sorted(outcome.data_parameter),
            "models": sorted(trained),
        },
    )
    coordinator.log(
        f"consensus: {outcome.num_labels} noisy labels on {outcome.num_images} "
        "images; mean data parameter "
        + ", ".join(f"{n} {v:.3f}" for n, v in outcome.data_parameter.items())
        + f"; {outcome.seconds:.1f} s at the target"
    )
    return trained


SEMISUP_PREDICTOR: Final = "semisup"  # the model scored after every federated round


def _semisup_participants(
    coordinator: Coordinator, sites: Mapping[int, SiteInfo]
) -> dict[int, SiteInfo]:
    """The sites of the federated rounds: ``semisup.sites``, or all with labels.

    Raises:
        PhaseError: ``semisup.sites`` names a site that did not answer, or one
            without labelled cases.
    """
    wanted = coordinator.config.semisup.sites
    by_name = {site.name: (node, site) for node, site in sites.items()}
    unknown = sorted(set(wanted) - set(by_name))
    if unknown:
        raise PhaseError(
            f"semisup: semisup.sites names {unknown}, which did not answer; "
            f"sites: {sorted(by_name)}"
        )
    chosen = wanted or tuple(sorted(by_name))
    unlabelled = [name for name in wanted if by_name[name][1].hello.labelled == 0]
    if unlabelled:
        raise PhaseError(
            f"semisup: semisup.sites names {unlabelled}, which hold no labelled case"
        )
    return {
        by_name[name][0]: by_name[name][1]
        for name in chosen
        if by_name[name][1].hello.labelled > 0
    }


def _semisup_request(
    scope: str, round_number: int, rounds: int, iterations: int, student: Arrays
) -> RecordDict:
    request = protocol.SemisupRequest(
        scope=scope, round=round_number, rounds=rounds, iterations=iterations
    )
    return records.build_request(settings=request.to_fields(), weights=student)


def _read_semisup_reply(reply: Message) -> protocol.SemisupReply:
    return protocol.SemisupReply.from_fields(records.read_metrics(reply.content))


def _evaluate_rounds_model(
    coordinator: Coordinator, sites: Mapping[int, SiteInfo], student: Arrays
) -> tuple[dict[str, float], dict[str, str]]:
    """Each site with evaluation labels scores the student; Dice by site."""
    request = protocol.EvaluateRequest(
        predictors={SEMISUP_PREDICTOR: [(SEMISUP_PREDICTOR, 1.0)]}
    )
    content = records.build_request(
        settings=request.to_fields(),
        models={SEMISUP_PREDICTOR: segmentation_weights(student)},
    )
    evaluators = {node: site for node, site in sites.items() if site.hello.evaluation}
    replies = coordinator.ask({node: content for node in evaluators}, protocol.EVALUATE)
    dice = {
        evaluators[node].name: protocol.EvaluateReply.from_fields(
            records.read_metrics(reply.content)
        ).dice[SEMISUP_PREDICTOR]
        for node, reply in replies.ok.items()
    }
    return dict(sorted(dice.items())), _names(sites, replies.failed)


def semisup_federated(
    coordinator: Coordinator, sites: Mapping[int, SiteInfo], start: Arrays
) -> tuple[Arrays | None, dict[str, Any]]:
    """FedAvg rounds of the UG-MCL student across the participating sites.

    Each round: every participant trains the student for
    ``semisup.local-iterations`` steps with its own teacher; Flower's FedAvg
    strategy averages the replies weighted by samples seen (``num-examples``); every
    participant with evaluation labels scores the average. Round 0 scores the start.
    A round that fewer than ``federation.min-sites`` participants answered ends the
    rounds (``stopped`` says why); the student of the last full round is returned,
    or None when no round finished.
    """
    config = coordinator.config
    participants = _semisup_participants(coordinator, sites)
    rounds, iterations = config.semisup.rounds, config.semisup.local_iterations
    names = sorted(site.name for site in participants.values())
    coordinator.log(
        f"semisup: {rounds} federated round(s) of {iterations} steps at {names}"
    )
    strategy = FedAvg(weighted_by_key="num-examples")
    student: Arrays | None = None
    dice, missing = _evaluate_rounds_model(coordinator, participants, start)
    history: list[dict[str, Any]] = [
        {"round": 0, "dice": dice, "missing": missing, "train": {}}
    ]
    result: dict[str, Any] = {"sites": names, "rounds": history, "stopped": None}
    required = max(1, min(config.federation.min_sites, len(participants)))
    for round_number in range(1, rounds + 1):
        sent = start if student is None else student
        replies = coordinator.ask(
            {
                node: _semisup_request(
                    "federated", round_number, rounds, iterations, sent
                )
                for node in participants
            },
            protocol.SEMISUP,
        )
        if len(replies.ok) < required:
            result["stopped"] = (
                f"round {round_number}: {len(replies.ok)} site(s) replied, "
                f"{required} needed; failures: {_names(participants, replies.failed)}"
            )
            coordinator.log(f"semisup rounds stopped: {result['stopped']}")
            break
        # Replies arrive in any order; float sums depend on it, so average in site
        # order (a resumed run then reproduces the rounds bit for bit).
        ordered = sorted(
            replies.ok.items(), key=lambda item: participants[item[0]].name
        )
        averaged, _ = strategy.aggregate_train(
            round_number, [reply for _node, reply in ordered]
        )
        assert averaged is not None  # there were replies to average
        student = records.from_array_record(averaged)
        dice, missing = _evaluate_rounds_model(coordinator, participants, student)
        missing.update(_names(participants, replies.failed))
        history.append(
            {
                "round": round_number,
                "dice": dice,
                "missing": missing,
                "train": {
                    participants[node].name: _read_semisup_reply(reply).to_fields()
                    for node, reply in replies.ok.items()
                },
            }
        )
        coordinator.log(
            f"semisup round {round_number}/{rounds}: Dice "
            + ", ".join(f"{name} {value:.3f}" for name, value in dice.items())
        )
    return student, result


def semisup_target(
    coordinator: Coordinator, target: SiteInfo, start: Arrays
) -> tuple[Arrays | None, dict[str, Any]]:
    """The target refines the student on its few labelled and unlabelled cases.

    Returns the refined student and the target's reply figures, or None and
    ``{"missing": reason}`` when the target refused or failed.
    """
    iterations = coordinator.config.semisup.iterations
    replies = coordinator.ask(
        {target.node_id: _semisup_request("target", 1, 1, iterations, start)},
        protocol.SEMISUP,
    )
    reply = replies.ok.get(target.node_id)
    if reply is None:
        reason = replies.failed.get(target.node_id, "no reply")
        coordinator.log(f"semisup at target {target.name} failed: {reason}")
        return None, {"site": target.name, "missing": reason}
    outcome = _read_semisup_reply(reply)
    coordinator.log(
        f"semisup at target {target.name}: {outcome.num_labelled} labelled and "
        f"{outcome.num_unlabelled} unlabelled cases, {outcome.seconds:.1f} s"
    )
    return records.read_weights(reply.content), {
        "site": target.name,
        **outcome.to_fields(),
    }


def semisup(
    coordinator: Coordinator,
    sites: Mapping[int, SiteInfo],
    target: SiteInfo,
    adapted: Mapping[str, Arrays],
) -> dict[str, Arrays]:
    """Phase 7: UG-MCL at the target and as federated rounds; segmentation models.

    Both start from the adapted main model (a fresh student without adaptation).
    The target refinement runs when ``semisup.target`` is set and the target holds
    labelled cases; the federated rounds when ``semisup.rounds`` > 0. Nothing later
    depends on this phase, so a site that refuses or fails (e.g. a DP site whose
    epsilon budget is spent) is recorded and the run goes on. Returns the
    resulting segmentation models by scope (``target``, ``federated``).
    """
    config = coordinator.config
    start = initial_student_weights(config, adapted.get("main"))
    students: dict[str, Arrays | None] = {}
    result: dict[str, Any] = {
        "variant": config.semisup.variant.value,
        "labelled_fraction": config.semisup.labelled_fraction,
        "start": ADAPTED_START if "main" in adapted else "initial",
        "target": None,
        "federated": None,
    }
    if not config.semisup.target:
        coordinator.log("semisup at the target: off (semisup.target = false)")
    elif target.hello.labelled == 0:
        coordinator.log(f"semisup at the target: {target.name} has no labelled case")
    else:
        students["target"], result["target"] = semisup_target(
            coordinator, target, start
        )
    if config.semisup.rounds > 0:
        students["federated"], result["federated"] = semisup_federated(
            coordinator, sites, start
        )
    models = {
        scope: segmentation_weights(student)
        for scope, student in students.items()
        if student is not None
    }
    for scope, weights in models.items():
        coordinator.store.save_model(f"semisup-{scope}", weights)
    result["models"] = sorted(models)
    coordinator.store.save_phase("semisup", result)
    return models


def build_predictors(
    sources: list[str],
    selection: Mapping[str, Any],
    *,
    adapted: bool,
    later_models: Sequence[str] = (),
) -> dict[str, list[tuple[str, float]]]:
    """The predictors every report compares.

    Each source alone, their uniform average, the TGMA pair and its main model, and
    each model the later phases trained, alone. Model names are ``source:<name>``,
    ``adapted:main``/``adapted:aux``, ``consensus:<method>`` and
    ``semisup:<scope>``.

    Example:
        >>> sel = {"main": "B", "aux": "C", "weights": {"main": 0.6, "aux": 0.4}}
        >>> sorted(build_predictors(["B", "C"], sel, adapted=True,
        ...                         later_models=["consensus:deepstaple"]))
        ['consensus:deepstaple', 'source:B', 'source:C', 'tgma', 'tgma-main', 'uniform']
    """
    predictors: dict[str, list[tuple[str, float]]] = {
        f"source:{name}": [(f"source:{name}", 1.0)] for name in sources
    }
    predictors["uniform"] = [(f"source:{name}", 1.0 / len(sources)) for name in sources]
    if adapted:
        pair = [("adapted:main", float(selection["weights"]["main"]))]
        if selection["aux"]:
            pair.append(("adapted:aux", float(selection["weights"]["aux"])))
        predictors["tgma"] = pair
        predictors["tgma-main"] = [("adapted:main", 1.0)]
    for name in later_models:
        predictors[name] = [(name, 1.0)]
    return predictors


def evaluation(
    coordinator: Coordinator,
    target: SiteInfo,
    models: Mapping[str, Arrays],
    adapted: Mapping[str, Arrays],
    selection: Mapping[str, Any],
    later_models: Mapping[str, Arrays] | None = None,
) -> dict[str, Any]:
    """Phase 8: the target scores every predictor on its evaluation labels.

    ``later_models`` are the consensus and semisup phases' models under their
    ``consensus:<method>``/``semisup:<scope>`` names.
    """
    later_models = later_models or {}
    named = {f"source:{name}": weights for name, weights in models.items()}
    named.update({f"adapted:{name}": weights for name, weights in adapted.items()})
    named.update(later_models)
    predictors = build_predictors(
        sorted(models),
        selection,
        adapted=bool(adapted),
        later_models=sorted(later_models),
    )
    request = protocol.EvaluateRequest(predictors=predictors)
    reply = _ask_target(
        coordinator,
        target,
        records.build_request(settings=request.to_fields(), models=named),
        protocol.EVALUATE,
        "evaluation",
    )
    scores = protocol.EvaluateReply.from_fields(records.read_metrics(reply.content))
    result = {
        "site": target.name,
        "num_cases": scores.num_cases,
        "dice": scores.dice,
        "hd95_mm": scores.hd95_mm,
    }
    coordinator.store.save_phase("evaluation", result)
    coordinator.log(
        "evaluation: "
        + ", ".join(f"{name} {value:.3f}" for name, value in scores.dice.items())
    )
    return result
