"""Segmentation quality as plain floats: Dice and HD95 per case, through MONAI metrics.

Slices predicted by the 2-D network are stacked back into their case's volume, and each
metric is computed per 3-D case and then averaged over cases, as is usual for this
field. Also the one Spearman rank correlation every method and benchmark uses, and the
AUROC of a score separating two groups (the consensus benchmark's within-case figure).
Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from monai.metrics import compute_hausdorff_distance
from monai.networks.utils import one_hot
from scipy.stats import rankdata, spearmanr


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CaseScores:
    """Foreground-mean Dice and HD95 (mm) of one case; HD95 is nan when undefined."""

    case_id: str
    dice: float
    hd95_mm: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SegmentationScores:
    """Per-case scores and their means (HD95 mean over cases where it is defined)."""

    cases: tuple[CaseScores, ...]

    @property
    def dice(self) -> float:
        """Mean Dice over cases."""
        return float(np.mean([case.dice for case in self.cases])) if self.cases else 0.0

    @property
    def hd95_mm(self) -> float:
        """Mean HD95 over cases where both masks are non-empty (nan if none)."""
        defined = [case.hd95_mm for case in self.cases if not math.isnan(case.hd95_mm)]
        return float(np.mean(defined)) if defined else float("nan")


def dice_coefficient(
    first: torch.Tensor,
    second: torch.Tensor,
    *,
    smooth: float = 0.0,
    empty: float = 1.0,
) -> torch.Tensor:
    """Dice of each sample: ``(2 sum(x y) + smooth) / (sum(x^2) + sum(y^2) + smooth)``.

    The one Dice every caller uses: on binary masks (where ``x^2 = x``, so the
    denominator is the two masks' sizes) it is the overlap metric; on probabilities
    against a one-hot target it is the soft Dice of the segmentation losses, which
    pass ``smooth`` (a small constant that keeps the ratio and its gradient defined
    when both are empty). Without smoothing, a sample where both are empty (0/0)
    gets ``empty``: 1.0 by default (two empty masks agree), MONAI's convention.

    Args:
        first: ``(B, ...)`` masks or probabilities.
        second: ``(B, ...)`` masks or targets, same shape (cast to ``first``'s dtype).
        smooth: added to the numerator and the denominator.
        empty: the value where both are empty and ``smooth`` is 0.

    Returns:
        ``(B,)`` Dice values, in ``first``'s dtype (differentiable).

    Example:
        >>> a = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
        >>> dice_coefficient(a, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        tensor([0.6667, 1.0000])
    """
    first = first.flatten(1)
    second = second.to(first.dtype).flatten(1)
    overlap = (first * second).sum(dim=1)
    total = (first * first).sum(dim=1) + (second * second).sum(dim=1)
    if smooth:
        return (2.0 * overlap + smooth) / (total + smooth)
    value = 2.0 * overlap / total.clamp_min(torch.finfo(first.dtype).tiny)
    return torch.where(total > 0, value, torch.full_like(value, empty))


def mask_dice(first: npt.NDArray[np.bool_], second: npt.NDArray[np.bool_]) -> float:
    """Dice of two binary masks of the same shape; 1.0 when both are empty.

    Example:
        >>> mask_dice(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool))
        0.6666666666666666
    """
    # float64 sums of 0/1 are exact, so the ratio is the exactly rounded one.
    pair = [
        torch.from_numpy(np.asarray(mask, bool)).reshape(1, -1)
        for mask in (first, second)
    ]
    return float(dice_coefficient(pair[0].double(), pair[1])[0])


def dice_score(
    prediction: torch.Tensor, reference: torch.Tensor, *, num_classes: int
) -> float:
    """Mean foreground Dice between two integer label maps of the same shape.

    :func:`dice_coefficient` of each foreground class's masks, averaged over the
    classes; both empty gives 1.0, one empty 0.0 (MONAI's ``ignore_empty=False``).

    Example:
        >>> a = torch.tensor([[0, 1], [1, 1]])
        >>> round(dice_score(a, torch.tensor([[0, 1], [0, 1]]), num_classes=2), 3)
        0.8
    """
    pred = one_hot(prediction[None].long(), num_classes=num_classes, dim=0)
    ref = one_hot(reference[None].long(), num_classes=num_classes, dim=0)
    return float(dice_coefficient(pred[1:], ref[1:]).mean())


def hd95_mm(
    prediction: torch.Tensor,
    reference: torch.Tensor,
    *,
    num_classes: int,
    spacing_mm: Sequence[float],
) -> float:
    """95th-percentile Hausdorff distance in mm (nan when either mask is empty).

    Args:
        prediction: integer label map of one case, ``(Z, H, W)`` or ``(H, W)``.
        reference: the reference label map, same shape.
        num_classes: number of classes including background.
        spacing_mm: voxel size along the same axes as the maps.
    """
    if not bool((prediction > 0).any()) or not bool((reference > 0).any()):
        return float("nan")
    pred = one_hot(prediction[None, None].long(), num_classes=num_classes, dim=1)
    ref = one_hot(reference[None, None].long(), num_classes=num_classes, dim=1)
    values = compute_hausdorff_distance(
        pred, ref, include_background=False, percentile=95, spacing=list(spacing_mm)
    )
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else float("nan")


def score_cases(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    *,
    case_of_slice: torch.Tensor,
    case_ids: Sequence[str],
    spacing_mm: Sequence[Sequence[float]],
    num_classes: int,
    with_hd95: bool = True,
) -> SegmentationScores:
    """Score slice predictions per case.

    Args:
        predictions: ``(N, H, W)`` predicted class per pixel.
        labels: ``(N, H, W)`` reference classes.
        case_of_slice: ``(N,)`` index into ``case_ids`` for each slice.
        case_ids: one id per case.
        spacing_mm: per case, the voxel size ``(slice, row, col)`` in mm.
        num_classes: number of classes including background.
        with_hd95: compute HD95 too (it is the slow part).
    """
    scores = []
    for index, case_id in enumerate(case_ids):
        selected = case_of_slice == index
        if not bool(selected.any()):
            continue
        pred, ref = predictions[selected], labels[selected]
        scores.append(
            CaseScores(
                case_id=case_id,
                dice=dice_score(pred, ref, num_classes=num_classes),
                hd95_mm=(
                    hd95_mm(
                        pred, ref, num_classes=num_classes, spacing_mm=spacing_mm[index]
                    )
                    if with_hd95
                    else float("nan")
                ),
            )
        )
    return SegmentationScores(cases=tuple(scores))


def spearman(
    scores: Sequence[float],
    truth: Sequence[float],
    *,
    undefined: float = math.nan,
    min_pairs: int = 2,
) -> float:
    """Spearman's rank correlation of ``scores`` with ``truth``.

    Ties take their average rank (scipy's ``spearmanr``). Pairs with a NaN or an
    infinity on either side are left out: an undefined or unbounded score or truth
    says nothing about the ranking.
    The correlation is undefined when fewer than ``min_pairs`` pairs remain or either
    side is constant (a constant has no ranking, so rho is 0/0); the function then
    returns ``undefined``. Callers choose it by what they do with the value: NaN
    where an undefined correlation is reported as such (the consensus figures), 0.0
    where values are averaged over targets and "no ranking information" should
    count as no correlation (the TGMA and SeqTran benchmarks).

    Args:
        scores: one score per item.
        truth: the true figure per item (same length).
        undefined: the value returned when the correlation is undefined.
        min_pairs: the fewest defined pairs to correlate.

    Example:
        >>> spearman([0.1, 0.2, 0.3], [1.0, 3.0, 2.0])
        0.5
        >>> spearman([0.1, 0.1, 0.1], [1.0, 3.0, 2.0])
        nan
        >>> spearman([0.1, 0.1, 0.1], [1.0, 3.0, 2.0], undefined=0.0)
        0.0
        >>> spearman([0.1, math.nan, 0.3, 0.2], [1.0, 9.0, 3.0, 2.0])
        1.0
    """
    pairs = [
        (score, true)
        for score, true in zip(scores, truth, strict=True)
        if math.isfinite(score) and math.isfinite(true)
    ]
    if (
        len(pairs) < min_pairs
        or len({score for score, _ in pairs}) < 2
        or len({true for _, true in pairs}) < 2
    ):
        return undefined
    value = float(spearmanr(*zip(*pairs, strict=True)).statistic)
    return undefined if math.isnan(value) else value


def auroc(
    scores: Sequence[float],
    positive: Sequence[bool],
    *,
    undefined: float = math.nan,
) -> float:
    """Area under the ROC curve of ``scores`` separating positives from negatives.

    The probability that a random positive scores above a random negative, ties
    counting half (the Mann-Whitney rank formula with average ranks). Items with a
    NaN or infinite score are left out. Undefined (returns ``undefined``) unless both
    groups keep at least one item.

    Args:
        scores: one score per item; higher should mean positive.
        positive: whether each item is positive (same length).
        undefined: the value returned when one group is empty.

    Example:
        >>> auroc([0.9, 0.8, 0.1], [True, False, False])
        1.0
        >>> auroc([0.5, 0.5, 0.1, 0.7], [True, False, False, False])
        0.5
        >>> auroc([0.9, 0.8], [True, True])
        nan
    """
    pairs = [
        (float(score), bool(flag))
        for score, flag in zip(scores, positive, strict=True)
        if math.isfinite(score)
    ]
    positives = sum(flag for _, flag in pairs)
    negatives = len(pairs) - positives
    if positives == 0 or negatives == 0:
        return undefined
    ranks = rankdata([score for score, _ in pairs])
    rank_sum = float(
        sum(rank for rank, (_, flag) in zip(ranks, pairs, strict=True) if flag)
    )
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


@dataclasses.dataclass(frozen=True, slots=True)
class PairedInterval:
    """The mean of paired differences and its percentile-bootstrap interval."""

    mean: float
    low: float
    high: float
    count: int
    level: float

    @property
    def above_zero(self) -> bool:
        """Whether the whole interval is above 0 (a claim "A beats B" holds)."""
        return self.low > 0.0


def paired_bootstrap_interval(
    first: Sequence[float],
    second: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedInterval:
    """Mean of ``first - second`` over pairs, with a percentile-bootstrap interval.

    The pairs (e.g. one per target and seed) are resampled with replacement.

    Example:
        >>> interval = paired_bootstrap_interval([0.9, 0.8, 0.7], [0.5, 0.6, 0.6])
        >>> round(interval.mean, 3), interval.count, interval.above_zero
        (0.233, 3, True)
    """
    if len(first) != len(second) or not first:
        raise ValueError(
            f"paired samples must be non-empty and equal in length, got "
            f"{len(first)} and {len(second)}"
        )
    differences = np.asarray(first, dtype=np.float64) - np.asarray(
        second, dtype=np.float64
    )
    generator = np.random.default_rng(seed)
    draws = generator.integers(0, len(differences), (resamples, len(differences)))
    means = differences[draws].mean(1)
    tail = (1.0 - level) / 2.0
    return PairedInterval(
        mean=float(differences.mean()),
        low=float(np.quantile(means, tail)),
        high=float(np.quantile(means, 1.0 - tail)),
        count=len(differences),
        level=level,
    )
