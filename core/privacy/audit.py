"""Membership-inference audit: how well a model's losses reveal its training cases.

Owns the audit a site runs on a model trained on its own data: the members are the
site's labelled training cases (``imagesTr``/``labelsTr``), the non-members its
labelled held-out cases (``imagesTs``/``labelsTs``), and each attack gives every case a
score (larger = more likely a member). The result is the attack's AUC with a
percentile-bootstrap 95% interval: 0.5 means the model's outputs say nothing about
membership, 1.0 that they reveal it perfectly.

Attacks work per *case* (a patient, the unit a site protects), on the mean per-slice
Dice + cross-entropy loss the training minimised:

- ``loss-threshold`` (Yeom et al., CSF 2018): score = -loss of the target model.
- ``calibrated-loss`` (Watson et al., ICLR 2022, difficulty calibration): score =
  -(target loss - mean loss of reference models that did *not* train on the case).
  Some cases are hard for any model (small organ, low contrast), which a raw loss
  threshold mistakes for non-membership; subtracting the case's expected loss when
  unseen removes that difficulty. Chosen over LiRA (Carlini et al. 2022) because it
  needs only a few reference models (LiRA's per-case Gaussians need dozens to be
  estimated), which matters on a CPU site. Reference models are trained like the
  target (same architecture and ``train`` recipe, without DP) on halves of the pooled
  members and non-members, in complementary pairs, so every case is unseen by at
  least ``references // 2`` of them.

Never imports flwr or Opacus; AUC and bootstrap use numpy only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as functional
from monai.losses import DiceLoss
from torch import nn

from core.config import RunConfig
from core.data.dataset import SiteDataError, SliceSet, build_slice_set, index_site
from core.logs import Progress, quiet
from core.training.networks import Arrays, build_model, load_weights, set_weights
from core.training.trainer import select_device, train_supervised

FloatArray: TypeAlias = npt.NDArray[np.float64]
Scores: TypeAlias = Sequence[float] | FloatArray

CI_LEVEL: Final = 0.95


class MiaAttack(StrEnum):
    """Membership-inference attacks the audit runs."""

    LOSS_THRESHOLD = "loss-threshold"
    CALIBRATED_LOSS = "calibrated-loss"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MiaResult:
    """One attack's AUC (members vs non-members, per case) and its bootstrap interval.

    ``references`` is 0 for attacks without reference models; ``resamples`` is the
    bootstrap count behind ``ci``.
    """

    attack: str
    auc: float
    ci: tuple[float, float]
    n_members: int
    n_nonmembers: int
    references: int
    resamples: int

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready form (``ci`` as a two-element list)."""
        return {
            "attack": self.attack,
            "auc": self.auc,
            "ci": list(self.ci),
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "references": self.references,
            "resamples": self.resamples,
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuditCases:
    """The audited cases as slices: the members first, then the non-members."""

    slices: SliceSet
    num_members: int

    @property
    def is_member(self) -> npt.NDArray[np.bool_]:
        """``(cases,)`` membership truth, in ``slices.case_ids`` order."""
        return np.arange(len(self.slices.case_ids)) < self.num_members


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReferenceLosses:
    """Per-case losses of the reference models and which cases each trained on.

    Attributes:
        case_ids: the pooled cases, in :class:`AuditCases` order.
        losses: ``(K, cases)`` mean per-slice loss of reference ``k`` on each case.
        trained_on: ``(K, cases)`` true where reference ``k`` trained on the case.
    """

    case_ids: tuple[str, ...]
    losses: FloatArray
    trained_on: npt.NDArray[np.bool_]


def compute_auc(members: Scores, nonmembers: Scores) -> float:
    """Exact ROC AUC of member vs non-member scores (Mann-Whitney U, ties count 0.5).

    Example:
        >>> compute_auc([3.0, 2.0], [1.0, 2.0])
        0.875
    """
    positive = np.asarray(members, dtype=np.float64)
    negative = np.sort(np.asarray(nonmembers, dtype=np.float64))
    if positive.size == 0 or negative.size == 0:
        raise ValueError("AUC needs at least one member and one non-member score")
    below = np.searchsorted(negative, positive, side="left")
    below_or_tied = np.searchsorted(negative, positive, side="right")
    wins = float(np.sum(below) + 0.5 * np.sum(below_or_tied - below))
    return wins / (positive.size * negative.size)


def bootstrap_auc_interval(
    members: Scores,
    nonmembers: Scores,
    *,
    resamples: int,
    seed: int,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of :func:`compute_auc`.

    Members and non-members are resampled separately (with replacement, each to its
    own size), so every resample keeps the audit's class balance.

    Args:
        members: member scores.
        nonmembers: non-member scores.
        resamples: bootstrap resamples (>= 1).
        seed: seeds the resampling; the same seed gives the same interval.
        level: coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``: the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles.
    """
    if resamples < 1:
        raise ValueError(f"bootstrap resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    positive = np.asarray(members, dtype=np.float64)
    negative = np.asarray(nonmembers, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = np.empty(resamples, dtype=np.float64)
    for index in range(resamples):
        values[index] = compute_auc(
            rng.choice(positive, size=positive.size),
            rng.choice(negative, size=negative.size),
        )
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def build_audit_cases(site_dir: Path, config: RunConfig) -> AuditCases:
    """Load a site's labelled training (members) and held-out (non-members) cases.

    Raises:
        SiteDataError: the site has no labelled training cases or no labelled
            held-out cases (naming the folder), or its data is bad.
    """
    index = index_site(Path(site_dir))
    if not index.labelled:
        raise SiteDataError(
            f"{index.root}: no labelled training cases (imagesTr with labelsTr); "
            "a membership audit needs the model's training members"
        )
    if not index.evaluation:
        raise SiteDataError(
            f"{index.root}: no labelled held-out cases (imagesTs with labelsTs); "
            "a membership audit needs non-members"
        )
    slices = build_slice_set(
        index.labelled + index.evaluation, data=config.data, with_labels=True
    )
    return AuditCases(slices=slices, num_members=len(index.labelled))


def read_audit_weights(path: Path, config: RunConfig) -> Arrays:
    """Read a model file and check it fits the configured architecture.

    Raises:
        ValueError: the file is missing or not a weights file, or its parameters do
            not fit ``config.model`` (naming the file and the first mismatch).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: model file not found")
    try:
        weights = load_weights(path)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: not a weights file (.npz) ({error})") from None
    build_scored_model(weights, config, source=str(path))
    return weights


def build_scored_model(
    weights: Arrays, config: RunConfig, *, source: str = "weights"
) -> nn.Module:
    """Build the configured network and load ``weights`` into it.

    Raises:
        ValueError: the weights do not fit the architecture (``source`` names them).
    """
    model = build_model(config.model, data=config.data)
    try:
        set_weights(model, weights)
    except ValueError as error:
        channels = ",".join(str(value) for value in config.model.channels)
        raise ValueError(
            f"{source}: do not fit the configured architecture (model.channels="
            f"{channels}, data.num-classes={config.data.num_classes}): {error}"
        ) from None
    return model


@torch.no_grad()
def compute_case_losses(
    model: nn.Module, slices: SliceSet, *, device: torch.device, batch_size: int = 64
) -> FloatArray:
    """Mean per-slice Dice + cross-entropy loss of each case, ``(cases,)``.

    Per slice the loss equals MONAI's ``DiceCELoss(batch=False)`` on that slice alone
    (the loss the models were trained with), without augmentation.
    """
    assert slices.labels is not None, "losses need labelled slices"
    model.to(device).eval()
    dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")
    per_slice = []
    for start in range(0, len(slices), batch_size):
        images = slices.images[start : start + batch_size].to(device)
        labels = slices.labels[start : start + batch_size].to(device)
        logits = model(images).float()
        dice_loss = dice(logits, labels.unsqueeze(1)).flatten(1).mean(1)
        cross_entropy = functional.cross_entropy(logits, labels, reduction="none")
        per_slice.append((dice_loss + cross_entropy.mean((1, 2))).cpu())
    losses = torch.cat(per_slice).to(torch.float64)
    cases = len(slices.case_ids)
    totals = torch.zeros(cases, dtype=torch.float64).index_add_(
        0, slices.case_of_slice, losses
    )
    counts = torch.bincount(slices.case_of_slice, minlength=cases).to(torch.float64)
    means: FloatArray = (totals / counts).numpy()
    return means


def plan_reference_halves(
    num_cases: int, *, references: int, seed: int
) -> npt.NDArray[np.bool_]:
    """``(references, num_cases)`` training masks: random halves in complementary pairs.

    Each pair is one random half and its complement; an odd count adds one more
    random half. Every case is left out by at least ``references // 2`` references.

    Example:
        >>> plan_reference_halves(4, references=2, seed=0).sum(axis=0).tolist()
        [1, 1, 1, 1]
    """
    if references < 2:
        raise ValueError(
            f"calibrated-loss needs >= 2 reference models, got {references}"
        )
    if num_cases < 2:
        raise ValueError(f"reference models need >= 2 cases, got {num_cases}")
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range((references + 1) // 2):
        half = np.zeros(num_cases, dtype=bool)
        half[rng.permutation(num_cases)[: num_cases // 2]] = True
        masks.extend([half, ~half])
    return np.stack(masks[:references])


def train_reference_losses(
    cases: AuditCases,
    config: RunConfig,
    *,
    references: int,
    seed: int,
    progress: Progress = quiet,
) -> ReferenceLosses:
    """Train the reference models of ``calibrated-loss`` and score every case.

    Each reference trains with ``config.train`` (its own seed drawn from ``seed``) on
    its half of the pooled members and non-members; the models are then dropped.
    """
    case_count = len(cases.slices.case_ids)
    trained_on = plan_reference_halves(case_count, references=references, seed=seed)
    seeds = np.random.default_rng([seed, references]).integers(0, 2**31, references)
    device = select_device(config.train.device)
    losses = np.empty((references, case_count), dtype=np.float64)
    for number, mask in enumerate(trained_on):
        half = cases.slices.subset_cases(np.flatnonzero(mask).tolist())
        assert half.labels is not None
        recipe = dataclasses.replace(config.train, seed=int(seeds[number]))
        torch.manual_seed(recipe.seed)
        model = build_model(config.model, data=config.data)
        label = f"reference {number + 1}/{references}"
        progress(f"[audit] training {label} on {len(half.case_ids)} cases")
        train_supervised(
            model,
            half.images,
            half.labels,
            train=recipe,
            device=device,
            label=label,
            progress=progress,
        )
        losses[number] = compute_case_losses(model, cases.slices, device=device)
    return ReferenceLosses(
        case_ids=cases.slices.case_ids, losses=losses, trained_on=trained_on
    )


def score_membership(
    attack: MiaAttack, target_losses: FloatArray, reference: ReferenceLosses | None
) -> FloatArray:
    """Membership scores per case (larger = more likely a member).

    Raises:
        ValueError: ``calibrated-loss`` without reference losses.
    """
    if attack is MiaAttack.LOSS_THRESHOLD:
        return -target_losses
    if reference is None:
        raise ValueError("calibrated-loss needs reference losses")
    unseen = ~reference.trained_on
    expected = (reference.losses * unseen).sum(axis=0) / unseen.sum(axis=0)
    calibrated: FloatArray = -(target_losses - expected)
    return calibrated


def attack_membership(
    cases: AuditCases,
    weights: Arrays,
    config: RunConfig,
    *,
    attacks: Sequence[MiaAttack],
    reference: ReferenceLosses | None,
    resamples: int,
    seed: int,
) -> tuple[MiaResult, ...]:
    """Run ``attacks`` on one model, given the (shared) reference losses.

    Raises:
        ValueError: the weights do not fit the architecture, ``calibrated-loss`` is
            asked without ``reference``, or ``reference`` scored other cases.
    """
    if reference is not None and reference.case_ids != cases.slices.case_ids:
        raise ValueError("reference losses were computed on other cases")
    model = build_scored_model(weights, config)
    losses = compute_case_losses(
        model, cases.slices, device=select_device(config.train.device)
    )
    member = cases.is_member
    results = []
    for attack in attacks:
        scores = score_membership(attack, losses, reference)
        members, nonmembers = scores[member], scores[~member]
        results.append(
            MiaResult(
                attack=attack.value,
                auc=compute_auc(members, nonmembers),
                ci=bootstrap_auc_interval(
                    members, nonmembers, resamples=resamples, seed=seed
                ),
                n_members=len(members),
                n_nonmembers=len(nonmembers),
                references=(
                    len(reference.losses)
                    if reference is not None and attack is MiaAttack.CALIBRATED_LOSS
                    else 0
                ),
                resamples=resamples,
            )
        )
    return tuple(results)


def audit_site(
    site_dir: Path,
    weights: Arrays,
    config: RunConfig,
    *,
    attacks: Sequence[MiaAttack] = tuple(MiaAttack),
    references: int = 4,
    resamples: int = 1000,
    seed: int = 0,
    progress: Progress = quiet,
) -> tuple[MiaResult, ...]:
    """Audit a model trained on ``site_dir``'s labelled training cases.

    Args:
        site_dir: the site folder; ``imagesTr``/``labelsTr`` are the members and
            ``imagesTs``/``labelsTs`` the non-members.
        weights: the audited model's weights (the architecture is ``config.model``).
        config: the run config the model was trained with (the reference models of
            ``calibrated-loss`` use its ``train`` recipe).
        attacks: which attacks to run, in this order.
        references: reference models for ``calibrated-loss`` (>= 2).
        resamples: bootstrap resamples per interval.
        seed: seeds reference halves, reference training and the bootstrap.
        progress: called with progress lines (reference training is the slow part).

    Returns:
        One result per attack.

    Raises:
        SiteDataError: no labelled training or no labelled held-out cases, or bad
            site data.
        ValueError: the weights do not fit the architecture.
    """
    cases = build_audit_cases(site_dir, config)
    build_scored_model(weights, config)  # fail before the slow reference training
    progress(
        f"[audit] {cases.num_members} members, "
        f"{len(cases.slices.case_ids) - cases.num_members} non-members, "
        f"{len(cases.slices)} slices"
    )
    reference = None
    if MiaAttack.CALIBRATED_LOSS in attacks:
        reference = train_reference_losses(
            cases, config, references=references, seed=seed, progress=progress
        )
    return attack_membership(
        cases,
        weights,
        config,
        attacks=attacks,
        reference=reference,
        resamples=resamples,
        seed=seed,
    )
