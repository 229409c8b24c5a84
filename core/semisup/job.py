"""The ``train.semisup`` job: one round of semi-supervised training at a site.

A site holds a few labelled cases and many unlabelled ones. :func:`run_semisup_round`
loads them (a labelled fraction keeps only a seeded share of the labelled cases as
labelled and sets the rest aside, to emulate a few-label site: the site's own setting,
passed by the caller, ``semisup.labelled-fraction`` of the run config only when the
caller passes none), loads the student it was sent and the teacher it kept from its
previous round, runs :func:`core.semisup.training.train_semisupervised` for the round's
steps and returns both networks' weights. Without DP the cases set aside join the
unlabelled ones; under DP they are left out entirely (their labels must not reach the
non-private consistency part through their images either). The student may leave; the
teacher stays at the site (the ClientApp keeps it in the node's state). Evaluation
images are never trained on.

The same function serves the refinement at the target (one round) and the federated
rounds (FedAvg of the student across sites, ``server/phases/semisup.py``); the
semisup benchmark calls it too, so it measures what the federation runs. With DP
settings (a site policy that requires DP-SGD) the round's supervised part is DP-SGD on
the labelled slices, planned, checked and recorded in the site's accountant file
(:func:`core.privacy.dp.reserve_privacy`) before its first step; the unlabelled images
are not covered by the guarantee. Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from core.config import Norm, RunConfig, SemisupTeacher, SemisupVariant
from core.data.dataset import (
    CaseRecord,
    SiteDataError,
    SliceSet,
    build_slice_set,
    index_site,
)
from core.logs import Progress, quiet
from core.privacy.dp import (
    DpSettings,
    PrivacySpend,
    describe_spend,
    largest_case,
    reserve_privacy,
)
from core.semisup.dual_task import (
    DualTaskUNet,
    build_dual_task_model,
    keep_local_norm,
    load_segmentation_weights,
    norm_state_names,
)
from core.semisup.training import (
    SemisupResult,
    SemisupSettings,
    train_semisupervised,
)
from core.training.networks import Arrays, get_weights, set_weights
from core.training.trainer import seed_everything, select_device


def split_labelled_cases(
    cases: Sequence[CaseRecord], fraction: float, *, seed: int
) -> tuple[tuple[CaseRecord, ...], tuple[CaseRecord, ...]]:
    """Keep a seeded ``fraction`` of labelled cases labelled; set the rest aside.

    At least one case stays labelled; the count rounds half up (12 cases at 0.1 keep
    1, at 0.2 keep 2). Both parts keep the site's case order.

    Example:
        >>> from core.data.dataset import CaseSplit
        >>> cases = [CaseRecord(case_id=f"c{i}", image_path=Path(f"c{i}"),
        ...          label_path=Path(f"l{i}"), split=CaseSplit.TRAIN)
        ...          for i in range(10)]
        >>> kept, aside = split_labelled_cases(cases, 0.2, seed=0)
        >>> len(kept), len(aside)
        (2, 8)
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"labelled fraction must be in (0, 1], got {fraction}")
    keep = min(len(cases), max(1, math.floor(fraction * len(cases) + 0.5)))
    chosen = set(np.random.default_rng(seed).permutation(len(cases))[:keep].tolist())
    kept = tuple(case for number, case in enumerate(cases) if number in chosen)
    aside = tuple(case for number, case in enumerate(cases) if number not in chosen)
    return kept, aside


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupData:
    """A site's training slices for semi-supervised rounds.

    Attributes:
        labelled: slices of the cases kept labelled, with their labels.
        unlabelled_images: ``(M, 1, S, S)`` slices of the site's unlabelled cases,
            and without DP of the labelled ones set aside too; M may be 0.
        num_labelled: labelled cases used.
        num_unlabelled: unlabelled cases used (set-aside labelled ones included
            without DP).
        num_left_out: labelled cases set aside and not used at all (only under DP;
            0 otherwise).
        private: loaded for a DP round (set-aside cases left out).
    """

    labelled: SliceSet
    unlabelled_images: torch.Tensor
    num_labelled: int
    num_unlabelled: int
    num_left_out: int = 0
    private: bool = False


def load_semisup_data(
    site_dir: Path,
    config: RunConfig,
    *,
    labelled_fraction: float | None = None,
    private: bool = False,
) -> SemisupData:
    """Read a site's training cases and keep a seeded fraction of the labelled ones.

    Args:
        site_dir: the site folder.
        config: the run config (``data``, ``train.seed``).
        labelled_fraction: the share of labelled cases kept labelled, the site's
            setting; None uses ``config.semisup.labelled_fraction``.
        private: the round runs under DP: the labelled cases set aside are left out
            instead of joining the unlabelled (non-private) part.

    Raises:
        SiteDataError: the site has no labelled training case, or a case is bad.
        ValueError: a labelled fraction outside (0, 1].
    """
    index = index_site(Path(site_dir))
    if not index.labelled:
        raise SiteDataError(
            f"{index.root}: no labelled training cases (labelsTr); train.semisup "
            "needs at least one"
        )
    fraction = (
        config.semisup.labelled_fraction
        if labelled_fraction is None
        else labelled_fraction
    )
    kept, aside = split_labelled_cases(index.labelled, fraction, seed=config.train.seed)
    labelled = build_slice_set(kept, data=config.data, with_labels=True)
    unlabelled_cases = (*(() if private else aside), *index.unlabelled)
    unlabelled_images = (
        build_slice_set(unlabelled_cases, data=config.data, with_labels=False).images
        if unlabelled_cases
        else torch.zeros((0, *labelled.images.shape[1:]))
    )
    return SemisupData(
        labelled=labelled,
        unlabelled_images=unlabelled_images,
        num_labelled=len(kept),
        num_unlabelled=len(unlabelled_cases),
        num_left_out=len(aside) if private else 0,
        private=private,
    )


def semisup_settings(
    config: RunConfig,
    *,
    iterations: int,
    variant: SemisupVariant | None = None,
) -> SemisupSettings:
    """The training settings of ``config.semisup`` (``variant`` overrides its own)."""
    semisup = config.semisup
    chosen = variant or semisup.variant
    return SemisupSettings(
        variant=chosen,
        iterations=iterations,
        labelled_batch=semisup.labelled_batch,
        unlabelled_batch=(
            0 if chosen is SemisupVariant.SUPERVISED else semisup.unlabelled_batch
        ),
        learning_rate=semisup.learning_rate,
        ema_decay=semisup.ema_decay,
        passes=semisup.passes,
        consistency=semisup.consistency,
        consistency_rampup=semisup.consistency_rampup,
        k=semisup.sdf_k,
        sdf_weight=semisup.sdf_weight,
        masked_cross=semisup.masked_cross,
        distance_consistency=semisup.distance_consistency,
        max_grad_norm=semisup.max_grad_norm,
        clip_scope=semisup.clip_scope,
        seed=config.train.seed,
        amp=config.train.amp,
        augment=config.train.augment,
    )


def build_student(config: RunConfig) -> DualTaskUNet:
    """The run's dual-task network (architecture from ``model``/``semisup``)."""
    return build_dual_task_model(
        config.model,
        config.data,
        shared_head=config.semisup.shared_head,
        dropout=config.semisup.dropout,
    )


def initial_student_weights(
    config: RunConfig, start: Mapping[str, npt.NDArray[np.generic]] | None = None
) -> Arrays:
    """A student's first weights: seeded, its segmentation from ``start`` if given.

    ``start`` holds ordinary segmentation weights (e.g. the adapted model); the
    distance head keeps its seeded initialisation.
    """
    seed_everything(config.train.seed)
    student = build_student(config)
    if start is not None:
        load_segmentation_weights(student, start)
    return get_weights(student)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupRound:
    """One site's round: the student that may leave and the teacher that stays.

    ``privacy`` is the round's DP-SGD cost and the site's accountant after it, or
    None when the round ran without DP. ``num_left_out`` counts the labelled cases
    the labelled fraction set aside and the DP round did not use at all.
    """

    student: Arrays
    teacher: Arrays
    num_labelled: int
    num_unlabelled: int
    result: SemisupResult
    privacy: PrivacySpend | None = None
    num_left_out: int = 0

    def own_norm(self, config: RunConfig) -> Arrays | None:
        """The student's normalisation entries, kept for the site's next round.

        Only with ``semisup.local-norm``; None when the option is off.
        """
        if not config.semisup.local_norm:
            return None
        names = norm_state_names(build_student(config))
        return {name: self.student[name] for name in sorted(names)}


def round_start(
    config: RunConfig,
    student_weights: Mapping[str, npt.NDArray[np.generic]],
    *,
    teacher_weights: Mapping[str, npt.NDArray[np.generic]] | None,
    own_norm: Mapping[str, npt.NDArray[np.generic]] | None,
) -> tuple[
    dict[str, npt.NDArray[np.generic]], Mapping[str, npt.NDArray[np.generic]] | None
]:
    """The student and teacher a site's round starts from (docs/methods.md#ug-mcl).

    ``semisup.local-norm``: the student's normalisation entries are replaced by the
    site's ``own_norm`` (FedBN; the global model's are not used), when the site has
    them. ``semisup.teacher`` ``global``: the kept teacher is dropped, so the teacher
    restarts from that student (the EMA's first step copies it); ``local`` keeps it.

    Returns:
        The student's weights and the teacher's (None: start from the student).
    """
    student = dict(student_weights)
    if config.semisup.local_norm and own_norm is not None:
        names = norm_state_names(build_student(config))
        student = keep_local_norm(student, own_norm, names)
    if config.semisup.teacher is SemisupTeacher.GLOBAL:
        teacher_weights = None
    return student, teacher_weights


def run_semisup_round(
    site_dir: Path,
    student_weights: Mapping[str, npt.NDArray[np.generic]],
    config: RunConfig,
    *,
    teacher_weights: Mapping[str, npt.NDArray[np.generic]] | None,
    start_step: int,
    total_steps: int,
    iterations: int,
    variant: SemisupVariant | None = None,
    data: SemisupData | None = None,
    dp: DpSettings | None = None,
    accountant_path: Path | None = None,
    labelled_fraction: float | None = None,
    own_norm: Mapping[str, npt.NDArray[np.generic]] | None = None,
    progress: Progress = quiet,
) -> SemisupRound:
    """Train the sent student for one round on the site's cases.

    With ``dp``, the round is DP-SGD on its supervised part
    (:func:`core.semisup.training.train_semisupervised` with a plan): the labelled
    slices are Poisson-sampled at q = ``min(1, semisup.labelled-batch / N)`` (N
    labelled slices) for ``iterations`` steps, the noise is the policy's (or what its
    target epsilon needs for these steps), and the site's accountant must have room
    for them: they are reserved there (recorded under its lock) before any step,
    with the most labelled slices any case contributes as the units per case. The
    consistency terms use unlabelled images only, and the labelled cases the
    labelled fraction sets aside are left out. The guarantee is slice-level (and,
    through the units per case, patient-level) for the labelled slices, image and
    label; unlabelled images are not covered. A round that fails after its
    reservation keeps its charge.

    Args:
        site_dir: the site folder.
        student_weights: the dual-task student as sent (FedAvg'd in federated rounds).
        config: the run config (``semisup``, ``model``, ``data``, ``train.device``).
        teacher_weights: the teacher the site kept from its previous round; ``None``
            starts one from the student (the EMA's step 0 copies it anyway).
            Unused with ``semisup.teacher`` ``global`` (:func:`round_start`).
        start_step: global number of the round's first step (ramps and EMA use it).
        total_steps: steps over all rounds (the ramps' length).
        iterations: steps of this round.
        variant: train a baseline instead of ``semisup.variant``.
        data: the site's slices when the caller already loaded them (loaded with
            ``private`` matching ``dp``; ``labelled_fraction`` is then unused).
        dp: DP-SGD settings (the applied policy's), or None for ordinary training.
        accountant_path: the site's accountant file, where a DP round is recorded
            before its first step. None starts from an empty history and records
            nothing.
        labelled_fraction: the share of the site's labelled cases kept labelled,
            the site's own setting; None uses ``config.semisup.labelled_fraction``.
        own_norm: with ``semisup.local-norm``, the normalisation entries the site
            kept from its previous round (:meth:`SemisupRound.own_norm`); they
            replace the sent student's. None: the sent student's are used.
        progress: called with progress lines.

    Raises:
        SiteDataError: the site has no labelled training case.
        PrivacyBudgetError: the DP round would exceed the site's budget; nothing was
            trained and the accountant file is unchanged.
        ValueError: weights that do not match the run's student architecture, DP
            asked for a model with BatchNorm (``model.norm='batch'``), or a labelled
            fraction outside (0, 1].
    """
    if dp is not None and config.model.norm is Norm.BATCH:
        raise ValueError(
            "model.norm 'batch' keeps running statistics across samples, which DP-SGD "
            "cannot account for; run with model.norm 'instance' or 'group' where DP "
            "applies"
        )
    if dp is not None and data is not None and not data.private:
        raise ValueError(
            "a DP round needs its data loaded with private=True: the labelled cases "
            "set aside must not join the unlabelled (non-private) part"
        )
    data = data or load_semisup_data(
        site_dir, config, labelled_fraction=labelled_fraction, private=dp is not None
    )
    start, teacher_start = round_start(
        config, student_weights, teacher_weights=teacher_weights, own_norm=own_norm
    )
    student = build_student(config)
    set_weights(student, start)
    teacher = build_student(config)
    set_weights(teacher, teacher_start or start)
    assert data.labelled.labels is not None
    settings = semisup_settings(config, iterations=iterations, variant=variant)
    plan = None
    privacy = None
    if dp is not None:
        reservation = reserve_privacy(
            accountant_path,
            sample_rate=min(1.0, settings.labelled_batch / len(data.labelled)),
            steps=iterations,
            units_per_case=largest_case(data.labelled.case_of_slice),
            dp=dp,
        )
        plan, privacy = reservation.plan, reservation.spend
    left_out = (
        f", {data.num_left_out} labelled case(s) left out under DP"
        if data.num_left_out
        else ""
    )
    progress(
        f"semisup: {data.num_labelled} labelled case(s) ({len(data.labelled)} slices), "
        f"{data.num_unlabelled} unlabelled ({data.unlabelled_images.shape[0]} slices)"
        f"{left_out}, steps {start_step}..{start_step + iterations - 1} of "
        f"{total_steps}"
    )
    result = train_semisupervised(
        student,
        teacher,
        data.labelled.images,
        data.labelled.labels,
        data.unlabelled_images,
        settings,
        device=select_device(config.train.device),
        start_step=start_step,
        total_steps=total_steps,
        label="semisup",
        progress=progress,
        private=plan,
    )
    if privacy is not None and dp is not None:
        spent = describe_spend(privacy, budget_epsilon=dp.budget_epsilon)
        progress(f"semisup: on the labelled slices, {spent}")
    return SemisupRound(
        student=get_weights(student),
        teacher=get_weights(teacher),
        num_labelled=data.num_labelled,
        num_unlabelled=data.num_unlabelled,
        result=result,
        privacy=privacy,
        num_left_out=data.num_left_out,
    )
