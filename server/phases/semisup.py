"""The semisup phase (UG-MCL, docs/methods.md#ug-mcl): at the target and federated.

The target refines the adapted model on its few labelled and many unlabelled cases;
the federated rounds average the student with Flower's FedAvg strategy across the
participating sites, each keeping its own teacher, and score every round's average
at each site with evaluation labels. Only weights and aggregate figures arrive here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from flwr.app import Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from core import protocol
from core.semisup.dual_task import segmentation_weights
from core.semisup.job import initial_student_weights
from core.training.networks import Arrays
from server import records
from server.coordinator import (
    ADAPTED_START,
    Coordinator,
    PhaseError,
    SiteInfo,
    names_by_site,
)
from server.results import (
    FederatedSemisup,
    LabelUse,
    SemisupResult,
    SemisupRound,
    TargetSemisup,
)

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
    return dict(sorted(dice.items())), names_by_site(sites, replies.failed)


def semisup_federated(
    coordinator: Coordinator, sites: Mapping[int, SiteInfo], start: Arrays
) -> tuple[Arrays | None, FederatedSemisup]:
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
    strategy = FedAvg(weighted_by_key=protocol.FEDAVG_WEIGHT_KEY)
    student: Arrays | None = None
    dice, missing = _evaluate_rounds_model(coordinator, participants, start)
    history = [SemisupRound(round=0, dice=dice, missing=missing, train={})]
    stopped: str | None = None
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
            failures = names_by_site(participants, replies.failed)
            stopped = (
                f"round {round_number}: {len(replies.ok)} site(s) replied, "
                f"{required} needed; failures: {failures}"
            )
            coordinator.warn(f"semisup rounds stopped: {stopped}")
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
        missing.update(names_by_site(participants, replies.failed))
        history.append(
            SemisupRound(
                round=round_number,
                dice=dice,
                missing=missing,
                train={
                    participants[node].name: _read_semisup_reply(reply).to_fields()
                    for node, reply in replies.ok.items()
                },
            )
        )
        coordinator.log(
            f"semisup round {round_number}/{rounds}: Dice "
            + ", ".join(f"{name} {value:.3f}" for name, value in dice.items())
        )
    return student, FederatedSemisup(
        sites=tuple(names), rounds=tuple(history), stopped=stopped
    )


def semisup_target(
    coordinator: Coordinator, target: SiteInfo, start: Arrays
) -> tuple[Arrays | None, TargetSemisup]:
    """The target refines the student on its few labelled and unlabelled cases.

    Returns the refined student and the target's reply figures, or None and the
    reason (``missing``) when the target refused or failed.
    """
    iterations = coordinator.config.semisup.iterations
    replies = coordinator.ask(
        {target.node_id: _semisup_request("target", 1, 1, iterations, start)},
        protocol.SEMISUP,
    )
    reply = replies.ok.get(target.node_id)
    if reply is None:
        reason = replies.failed.get(target.node_id, "no reply")
        coordinator.warn(f"semisup at target {target.name} failed: {reason}")
        return None, TargetSemisup(site=target.name, missing=reason)
    outcome = _read_semisup_reply(reply)
    coordinator.log(
        f"semisup at target {target.name}: {outcome.num_labelled} labelled and "
        f"{outcome.num_unlabelled} unlabelled cases, {outcome.seconds:.1f} s"
    )
    return records.read_weights(reply.content), TargetSemisup(
        site=target.name, reply=outcome.to_fields()
    )


_NUM_LABELLED: Final = protocol.field_key(protocol.SemisupReply, "num_labelled")


def students_label_use(
    target: str,
    *,
    start: LabelUse,
    at_target: TargetSemisup | None,
    federated: FederatedSemisup | None,
) -> dict[str, LabelUse]:
    """What each student used of ``target``'s labels, from the replies.

    Both inherit the start model's use. The target's refinement used the labelled
    cases its reply counts; the federated student used the target's whenever the
    target trained a round on labelled cases (its rounds' replies count them).

    Example:
        >>> rounds = (SemisupRound(round=1, dice={}, missing={},
        ...     train={"A": {"num-labelled": 2}, "B": {"num-labelled": 12}}),)
        >>> uses = students_label_use("A", start=LabelUse(), at_target=None,
        ...     federated=FederatedSemisup(sites=("A", "B"), rounds=rounds,
        ...                                stopped=None))
        >>> uses["federated"].via
        ('federated UG-MCL rounds trained at A on 2 labelled cases',)
    """
    uses: dict[str, LabelUse] = {}
    if at_target is not None and at_target.missing is None:
        cases = int(at_target.reply[_NUM_LABELLED])
        own = (
            LabelUse(
                via=(f"UG-MCL refined at {target} on {cases} labelled cases",),
                cases=cases,
            )
            if cases
            else LabelUse()
        )
        uses["target"] = LabelUse.joined([start, own])
    if federated is not None:
        cases = max(
            (
                int(entry.train[target][_NUM_LABELLED])
                for entry in federated.rounds
                if target in entry.train
            ),
            default=0,
        )
        own = (
            LabelUse(
                via=(
                    f"federated UG-MCL rounds trained at {target} on {cases} "
                    "labelled cases",
                ),
                cases=cases,
            )
            if cases
            else LabelUse()
        )
        uses["federated"] = LabelUse.joined([start, own])
    return uses


def run(
    coordinator: Coordinator,
    sites: Mapping[int, SiteInfo],
    target: SiteInfo,
    adapted: Mapping[str, Arrays],
    *,
    start_use: LabelUse,
) -> tuple[SemisupResult, dict[str, Arrays]]:
    """Phase 7: UG-MCL at the target and as federated rounds; segmentation models.

    Both start from the adapted main model (``adapted[ADAPTED_START]``, whose label
    use is ``start_use``; a fresh student without adaptation). The target refinement
    runs when ``semisup.target`` is set and the target holds labelled cases; the
    federated rounds when ``semisup.rounds`` > 0. Nothing later depends on this
    phase, so a site that refuses or fails (e.g. a DP site whose epsilon budget is
    spent) is recorded and the run goes on. Returns the phase's result (with what
    each student used of the target's labels, :func:`students_label_use`) and the
    segmentation models by scope (``target``, ``federated``).
    """
    config = coordinator.config
    start = initial_student_weights(config, adapted.get(ADAPTED_START))
    students: dict[str, Arrays | None] = {}
    at_target: TargetSemisup | None = None
    federated: FederatedSemisup | None = None
    if not config.semisup.target:
        coordinator.log("semisup at the target: off (semisup.target = false)")
    elif target.hello.labelled == 0:
        coordinator.log(f"semisup at the target: {target.name} has no labelled case")
    else:
        students["target"], at_target = semisup_target(coordinator, target, start)
    if config.semisup.rounds > 0:
        students["federated"], federated = semisup_federated(coordinator, sites, start)
    models = {
        scope: segmentation_weights(student)
        for scope, student in students.items()
        if student is not None
    }
    for scope, weights in models.items():
        coordinator.store.save_model(f"semisup-{scope}", weights)
    uses = students_label_use(
        target.name,
        start=start_use if ADAPTED_START in adapted else LabelUse(),
        at_target=at_target,
        federated=federated,
    )
    result = SemisupResult(
        variant=config.semisup.variant.value,
        labelled_fraction=config.semisup.labelled_fraction,
        start=ADAPTED_START if ADAPTED_START in adapted else "initial",
        target=at_target,
        federated=federated,
        models=tuple(sorted(models)),
        label_use={scope: uses[scope] for scope in sorted(models)},
    )
    coordinator.store.save_result(result)
    return result, models
