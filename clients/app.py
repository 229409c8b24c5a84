"""The SiteBridge ClientApp: one small handler per action (docs/architecture.md).

Each handler gets its site's setup (run config, site folder, applied policy, state
folder), calls one site job (a ``job`` module of core) and encodes only what the
contract lets leave: weights, per-case scores without case names (or only their means,
per policy), and aggregate metrics. A failure becomes an error reply whose reason names
the file and the problem; the node keeps serving. Every handler runs inside the egress
guard (``clients/guard.py``), registered once for the whole app. The site's progress
and failures go to its logger, ``sitebridge.site.<name>`` (``core/logs.py``); before
each message the app configures SiteBridge's logging from the run config's
``output.log-level``, unless its process did (``sitebridge-serve --log-level``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from clients import records
from clients.guard import egress_guard
from clients.site import SiteSetup, resolve_setup, segmentations_dir
from core import protocol
from core.affinity.job import finetune_model, release_profile
from core.config import SemisupTeacher, load_run_config
from core.consensus.job import run_consensus
from core.data.dataset import SiteDataError, index_site
from core.logs import DEFAULT_LEVEL, configure_logging, get_logger
from core.planning.job import release_fingerprint
from core.privacy.dp import (
    DpSettings,
    PrivacySpend,
    PrivateTrainResult,
    dp_settings_for,
)
from core.privacy.limits import LimitError, label_term_allowed, whole_case_config
from core.privacy.policy import PolicyError
from core.semisup.job import run_semisup_round
from core.training.evaluation import release_evaluation, write_segmentations
from core.training.job import SourceTraining, train_source_model
from core.training.postprocess import (
    PostprocessDecision,
    decide_largest_component,
    decision_off,
)
from core.transfer.job import adapt_target, score_candidates

LOGGER = get_logger("site")  # before the site is known; then the site's own

app = ClientApp(mods=[egress_guard])

Handler = Callable[[Message, Context, SiteSetup], Message]


@app.lifespan()
def site_logging(context: Context) -> Iterator[None]:
    """Before each message: send the site's lines through SiteBridge's logging.

    The run config's ``output.log-level`` applies unless this process configured its
    logging itself: in a deployment ``sitebridge-serve`` did, from the site's own
    ``--log-level``, which a coordinator's run config does not override. A bad value
    is left to the guard, whose refusal names the key.
    """
    try:
        level = load_run_config(context.run_config).output.log_level
    except ValueError:
        level = DEFAULT_LEVEL
    configure_logging(level, if_unconfigured=True)
    yield


def site_handler(handler: Handler) -> Callable[[Message, Context], Message]:
    """Resolve the site's setup; turn a site failure into a naming error reply.

    A refused privacy budget (``PrivacyBudgetError``) and a bad policy are
    ``ValueError``s too, so they arrive as error replies that say why.
    """

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        setup: SiteSetup | None = None
        try:
            setup = resolve_setup(context, message)
            return handler(message, context, setup)
        except (
            SiteDataError,
            PolicyError,
            ValueError,
            FileNotFoundError,
            RuntimeError,
        ) as error:
            reason = f"{type(error).__name__}: {error}"
            logger = LOGGER if setup is None else setup.site.logger()
            logger.error("%s failed: %s", message.metadata.message_type, reason)
            return Message(
                Error(code=protocol.SITE_ERROR_CODE, reason=reason), reply_to=message
            )

    return wrapped


def _progress(setup: SiteSetup) -> Callable[[str], None]:
    """The site's progress sink for one request; it also enforces the time cap.

    Every long loop reports progress through it (per epoch or per stretch of steps),
    so a request past ``limits.max-request-seconds`` stops at its next report. Lines
    go to the site's logger (INFO), which names the site.
    """
    logger, deadline = setup.site.logger(), setup.deadline

    def emit(line: str) -> None:
        logger.info("%s", line)
        if deadline is not None and time.monotonic() > deadline:
            raise LimitError(
                "the request ran past limits.max-request-seconds "
                f"({setup.policy.limits.max_request_seconds:g} s) and was stopped"
            )

    return emit


def _privacy_figures(
    private: PrivateTrainResult | PrivacySpend | None,
) -> dict[str, Any]:
    """A DP release's reply fields (``core.protocol.DP_METRICS``); zeros without DP.

    Epsilon per slice (the accountant's unit) and per patient (group privacy over
    the slices one case contributed; nan when an older accountant entry does not say
    how many).
    """
    if private is None:
        return {
            "epsilon_spent": 0.0,
            "epsilon_total": 0.0,
            "delta": 0.0,
            "noise_multiplier": 0.0,
            "patient_epsilon_spent": 0.0,
            "patient_epsilon_total": 0.0,
            "slices_per_case": 0,
        }
    patient_total = private.patient_epsilon_total
    return {
        "epsilon_spent": private.epsilon_spent,
        "epsilon_total": private.epsilon_total,
        "delta": private.delta,
        "noise_multiplier": private.noise_multiplier,
        "patient_epsilon_spent": private.patient_epsilon_spent,
        "patient_epsilon_total": math.nan if patient_total is None else patient_total,
        "slices_per_case": private.units_per_case,
    }


@app.query("hello")
@site_handler
def hello(message: Message, _context: Context, setup: SiteSetup) -> Message:
    """Describe the site: name, modality and case counts (never case names)."""
    site = setup.site
    index = index_site(site.directory)
    reply = protocol.HelloReply(
        site=site.name,
        modality=index.modality,
        labelled=len(index.labelled),
        unlabelled=len(index.unlabelled),
        evaluation=len(index.evaluation),
        class_names=index.class_names,
    )
    return records.build_reply(message, settings=reply.to_fields())


@app.query("fingerprint")
@site_handler
def fingerprint(message: Message, _context: Context, setup: SiteSetup) -> Message:
    """The site's fingerprint for the resolution plan (aggregates, never a case).

    Geometry medians of the training images and, for a CT site with at least
    ``limits.min-cases`` labelled cases, its foreground intensity statistics, noised
    when the applied policy requires DP (recorded in the site's accountant first).
    """
    released = release_fingerprint(
        setup.site.directory,
        setup.config,
        min_cases=setup.policy.limits.min_cases,
        dp=_dp_settings(setup),
        accountant_path=setup.accountant_path,
        progress=_progress(setup),
    )
    found = released.fingerprint
    reply = protocol.FingerprintReply(
        num_images=found.num_images,
        num_labelled=found.num_labelled,
        spacing_mm=found.spacing_mm,
        shape=found.shape,
        ct_intensities=found.ct_intensities,
        **_privacy_figures(released.privacy),
    )
    return records.build_reply(message, metrics=reply.to_fields())


@app.train("source")
@site_handler
def train_source(message: Message, _context: Context, setup: SiteSetup) -> Message:
    """Train a source model on the site's labelled cases; reply with its weights.

    DP-SGD runs when the applied policy requires it; the site's accountant (in its
    state folder) refuses a training that would exceed the budget before any step.
    Then the site decides whether the model's predictions keep the largest connected
    component per class (docs/methods.md#post-processing), on its own labelled
    evaluation cases, each a whole volume; the decision and its two mean Dice
    figures travel with the weights. Under DP it is off, unmeasured: the decision
    and the figures would be an un-noised release about the evaluation labels.
    """
    initial = message.content.array_records.get(protocol.WEIGHTS_KEY)
    dp = _dp_settings(setup)
    result = train_source_model(
        setup.site.directory,
        setup.config,
        initial_weights=None if initial is None else records.from_array_record(initial),
        dp=dp,
        accountant_path=setup.accountant_path,
        progress=_progress(setup),
    )
    if dp is not None:
        decision = decision_off(
            "this site trains under DP, and the decision would be an un-noised "
            "release about its evaluation labels"
        )
        _progress(setup)(f"[postprocess] largest component off: {decision.reason}")
    else:
        decision = decide_largest_component(
            setup.site.directory,
            result.weights,
            whole_case_config(setup.config, setup.policy.limits),
            min_cases=setup.policy.limits.min_cases,
            progress=_progress(setup),
        )
    return _training_reply(message, result, decision)


def _dp_settings(setup: SiteSetup) -> DpSettings | None:
    """The DP settings the site's applied policy demands (None: no DP)."""
    return dp_settings_for(
        setup.policy, max_grad_norm=setup.config.privacy.max_grad_norm
    )


def _training_reply(
    message: Message,
    result: SourceTraining,
    decision: PostprocessDecision | None = None,
) -> Message:
    """A ``train.source``/``train.finetune`` reply: the weights and their figures.

    A source's reply also carries its post-processing decision (``decision``); a
    fine-tuning step's carries none.
    """
    private = result.privacy
    reply = protocol.TrainReply(
        num_examples=result.num_examples,
        num_cases=result.num_cases,
        # Under DP the loss is withheld: it is computed from the labelled slices
        # outside the noised gradient, so it is not covered by the guarantee.
        loss=result.final_loss if private is None else 0.0,
        seconds=result.seconds,
        largest_component=None if decision is None else int(decision.enabled),
        dice_raw=None if decision is None else decision.dice_raw,
        dice_postprocessed=None if decision is None else decision.dice_postprocessed,
        **_privacy_figures(private),
    )
    return records.build_reply(
        message, metrics=reply.to_fields(), weights=result.weights
    )


@app.train("finetune")
@site_handler
def finetune(message: Message, _context: Context, setup: SiteSetup) -> Message:
    """One step of a transfer path: fine-tune the given model on the site's labels.

    The recipe is the run's ``affinity.finetune-*``; DP-SGD runs when the applied
    policy requires it, as for ``train.source``.
    """
    weights = message.content.array_records.get(protocol.WEIGHTS_KEY)
    if weights is None:
        raise ValueError(
            f"a {protocol.FINETUNE!r} request carries the model to fine-tune under "
            f"{protocol.WEIGHTS_KEY!r}; this one has none"
        )
    result = finetune_model(
        setup.site.directory,
        records.from_array_record(weights),
        setup.config,
        dp=_dp_settings(setup),
        accountant_path=setup.accountant_path,
        progress=_progress(setup),
    )
    return _training_reply(message, result)


@app.query("profile")
@site_handler
def profile(message: Message, _context: Context, setup: SiteSetup) -> Message:
    """The site's task profile (aggregates of its training cases, never a case).

    Noised when the applied policy requires DP; the release is then recorded in the
    site's accountant and refused when it would exceed the budget.
    """
    released = release_profile(
        setup.site.directory,
        setup.config,
        dp=_dp_settings(setup),
        accountant_path=setup.accountant_path,
        pool_cases=setup.policy.limits.min_cases,
        progress=_progress(setup),
    )
    values = released.profile.to_dict()
    if not label_term_allowed(setup.policy.limits, released.profile.num_labelled):
        # A mean label map over fewer than limits.min-cases cases is (nearly) those
        # cases' label maps: the label term stays home, the image term leaves. So
        # does the polarity term, the same cases' foreground and shell intensities.
        values = {
            **values,
            "label_grid": None,
            "mean_label_map": None,
            "foreground_quantiles": None,
            "foreground_intensities": None,
            "shell_intensities": None,
        }
        _progress(setup)(
            f"profile: label term left out ({released.profile.num_labelled} labelled "
            f"cases, limits.min-cases is {setup.policy.limits.min_cases})"
        )
    reply = dataclasses.replace(
        protocol.ProfileReply.from_profile_values(values),
        **_privacy_figures(released.privacy),
    )
    return records.build_reply(message, metrics=reply.to_fields())


@app.query("lftm")
@site_handler
def lftm(message: Message, _context: Context, setup: SiteSetup) -> Message:
    """Score every candidate on this (target) site's images; reply ITM or only DTM.

    The policy's ``release.lftm`` decides: ``instance`` replies one score per case
    and source (ITM columns), ``domain`` only the per-source means (DTM). Either way
    the reply carries the candidates' agreement matrix, means over the site's cases.
    """
    candidates = records.read_named_models(message.content)
    transferability = score_candidates(
        setup.site.directory,
        candidates,
        setup.config,
        progress=_progress(setup),
    )
    columns = {
        name: [row[column] for row in transferability.itm]
        for column, name in enumerate(transferability.sources)
    }
    reply = protocol.LftmReply.from_itm(
        transferability.metric,
        transferability.sources,
        columns,
        release=setup.policy.lftm_release.value,
        agreement={
            name: list(transferability.agreement[row])
            for row, name in enumerate(transferability.sources)
        },
    )
    settings, metrics = reply.to_fields()
    return records.build_reply(message, settings=settings, metrics=metrics)


@app.train("adapt")
@site_handler
def adapt(message: Message, _context: Context, setup: SiteSetup) -> Message:
    """Adapt the main/aux pair on this (target) site; reply the adapted weights.

    Adaptation trains on every image of the site, labelled cases' included: where
    the applied policy requires DP it runs DP-SGD, charged to the site's accountant.
    """
    config, site = setup.config, setup.site
    request = protocol.AdaptRequest.from_fields(records.read_request(message.content))
    candidates = records.read_named_models(message.content)
    result = adapt_target(
        site.directory,
        candidates,
        config,
        main=request.main,
        aux=request.aux or None,
        weight_main=request.weight_main,
        weight_aux=request.weight_aux,
        dp=_dp_settings(setup),
        accountant_path=setup.accountant_path,
        progress=_progress(setup),
    )
    models = {protocol.ADAPT_MAIN_MODEL: result.main_weights}
    if result.aux_weights is not None:
        models[protocol.ADAPT_AUX_MODEL] = result.aux_weights
    reply = protocol.AdaptReply(
        num_examples=result.num_examples,
        pseudo_label_foreground=result.pseudo_label_foreground,
        seconds=result.seconds,
        **_privacy_figures(result.privacy),
    )
    return records.build_reply(message, metrics=reply.to_fields(), models=models)


@app.train("consensus")
@site_handler
def consensus(message: Message, _context: Context, setup: SiteSetup) -> Message:
    """Fuse noisy labels on this (target) site; reply aggregates and trained models.

    The consensus labels are written to the site's state folder
    (``consensus/run-<run id>/<method>/<case>.nii.gz``) and never sent.
    """
    # Whole cases, as evaluate: the reply's label-dice.* are Dice against the
    # evaluation labels, which a coordinator must not aim at one chosen slice.
    config = whole_case_config(setup.config, setup.policy.limits)
    site = setup.site
    request = protocol.ConsensusRequest.from_fields(
        records.read_request(message.content)
    )
    outcome = run_consensus(
        site.directory,
        records.read_named_models(message.content),
        config,
        label_sources=request.label_sources,
        start=request.start,
        labels_dir=setup.state_dir / "consensus" / f"run-{message.metadata.run_id}",
        progress=_progress(setup),
    )
    reply = protocol.ConsensusReply(
        num_images=outcome.num_images,
        num_labels=outcome.num_labels,
        num_atlases=outcome.num_atlases,
        seconds=outcome.seconds,
        data_parameter=outcome.data_parameter,
        staple_sensitivity=outcome.staple_sensitivity,
        agreement=outcome.agreement,
        label_dice=outcome.label_dice,
        spearman_dp=outcome.spearman_dp,
        spearman_staple=outcome.spearman_staple,
    )
    return records.build_reply(
        message, metrics=reply.to_fields(), models=outcome.models
    )


def _teacher_key(scope: str) -> str:
    """Where the node state keeps a schedule's teacher (never sent)."""
    return f"semisup.teacher.{scope}"


def _norm_key(scope: str) -> str:
    """Where the node state keeps a schedule's own normalisation entries.

    Only with ``semisup.local-norm``: they are in every student the site sends, but
    the global model's never replace them here.
    """
    return f"semisup.norm.{scope}"


@app.train("semisup")
@site_handler
def semisup(message: Message, context: Context, setup: SiteSetup) -> Message:
    """One round of UG-MCL on this site's cases; reply the student (FedAvg input).

    The teacher stays in the node's state between rounds (``context.state``, one per
    scope). A node that lost it (restarted) starts a new teacher from the student and
    says so. With ``semisup.teacher`` ``global`` no teacher is kept: each round's
    starts from the student sent. With ``semisup.local-norm`` the student's
    normalisation entries are kept there too and replace the sent student's
    (FedBN). When the applied policy requires DP, the round's supervised part is
    DP-SGD on the labelled slices (the consistency part sees unlabelled images only);
    the site's accountant refuses a round that would exceed the budget before any
    step, and the reply carries the ε spent and the site's total (unlabelled images
    are not covered). Under DP the reply's supervised loss is withheld (0): it is a
    statistic of the labelled slices outside the guarantee.
    """
    request = protocol.SemisupRequest.from_fields(records.read_request(message.content))
    site = setup.site
    key = _teacher_key(request.scope)
    kept = context.state.array_records.get(key)
    own_norm = context.state.array_records.get(_norm_key(request.scope))
    local_teacher = setup.config.semisup.teacher is SemisupTeacher.LOCAL
    if kept is None and request.round > 1 and local_teacher:
        _progress(setup)(
            f"semisup round {request.round}: no teacher kept from earlier rounds "
            "(node restarted?); a new one starts from the student"
        )
    outcome = run_semisup_round(
        site.directory,
        records.read_weights(message.content),
        setup.config,
        teacher_weights=None if kept is None else records.from_array_record(kept),
        start_step=request.start_step,
        total_steps=request.total_steps,
        iterations=request.iterations,
        # The site's own share (its policy's semisup.labelled-fraction), never the
        # run's: under DP the cases it sets aside are left out, not made unlabelled.
        labelled_fraction=setup.policy.semisup_labelled_fraction,
        dp=_dp_settings(setup),
        accountant_path=setup.accountant_path,
        own_norm=None if own_norm is None else records.from_array_record(own_norm),
        progress=_progress(setup),
    )
    if local_teacher:
        context.state[key] = records.to_array_record(outcome.teacher)
    norm = outcome.own_norm(setup.config)
    if norm is not None:
        context.state[_norm_key(request.scope)] = records.to_array_record(norm)
    result, private = outcome.result, outcome.privacy
    reply = protocol.SemisupReply(
        num_examples=result.num_examples,
        num_labelled=outcome.num_labelled,
        num_unlabelled=outcome.num_unlabelled,
        supervised_loss=result.supervised_loss if private is None else 0.0,
        consistency_loss=result.consistency_loss,
        cross_task_loss=result.cross_task_loss,
        certain_fraction=result.certain_fraction,
        seconds=result.seconds,
        **_privacy_figures(private),
    )
    return records.build_reply(
        message, metrics=reply.to_fields(), weights=outcome.student
    )


@app.evaluate()
@site_handler
def evaluate(message: Message, _context: Context, setup: SiteSetup) -> Message:
    """Score the requested predictors on the evaluation labels (aggregates only).

    Each evaluation case counts as a whole volume (every slice, up to the site's own
    cap), whatever the run's ``data.max-slices-per-case`` says. Where the applied
    policy requires DP, each mean Dice is released with Gaussian noise (HD95
    withheld), charged to the site's accountant. When the request names a predictor
    to ``segment``, its segmentation of every image of the site is written as NIfTI
    under ``<state-dir>/segmentations/run-<run id>/`` and only their count is sent.
    The predictors the request names in ``postprocess`` keep the largest connected
    component per class before they are scored or written; their raw Dice and HD95
    are sent too (docs/methods.md#post-processing). A name there that is not a
    predictor of the request is refused before any work.
    """
    config = whole_case_config(setup.config, setup.policy.limits)
    site = setup.site
    request = protocol.EvaluateRequest.from_fields(
        records.read_request(message.content)
    )
    models = records.read_named_models(message.content)
    written = 0
    if request.segment:
        # Written first: a site that cannot write them charges no DP release.
        written = write_segmentations(
            site.directory,
            models,
            request.predictors[request.segment],
            config,
            segmentations_dir(setup.state_dir, message.metadata.run_id),
            predictor=request.segment,
            postprocess=request.segment in request.postprocess,
            progress=_progress(setup),
        )
    released = release_evaluation(
        site.directory,
        models,
        request.predictors,
        config,
        postprocess=request.postprocess,
        dp=_dp_settings(setup),
        accountant_path=setup.accountant_path,
        progress=_progress(setup),
    )
    reply = protocol.EvaluateReply(
        num_cases=released.num_cases,
        dice=released.dice,
        hd95_mm=released.hd95_mm,
        dice_raw=released.dice_raw,
        hd95_raw_mm=released.hd95_raw_mm,
        segmentations=written,
        **_privacy_figures(released.privacy),
    )
    return records.build_reply(message, metrics=reply.to_fields())
