"""TGMA transferability: LFTM, ITM, DTM, source selection and pseudo-label correction.

Implements docs/methods.md#tgma:

- ``LFTM(x, F) = Dice(argmax F(x), argmax F(x_masked))``; ``x_masked`` keeps the region
  the model attends to and sets the rest to 0 (the image mean after z-scoring). The
  default attention is the model's own foreground probability, Gaussian-smoothed,
  thresholded, and dilated by a fraction of the image side; Grad-CAM is an option. An
  empty prediction on ``x`` gives LFTM = 0.
- An *instance* is one target case (volume): its slices are scored together, so
  ``ITM[n, i]`` is the LFTM of source ``i`` on case ``n`` and only per-case numbers
  ever leave the target.
- ``DTM[i] = mean_n ITM[n, i]``; main = argmax, aux = second; the pair's weights are
  their DTM values normalised to sum 1.
- Pseudo-labels: ``argmax_c sum_i ITM[n, i] * softmax(F_i(x_n))`` with each ITM row
  normalised to sum 1.
- SiteBridge's agreement selection (``transfer.selection = "agreement"``, a named
  departure, docs/methods.md#agreement-selection): ``A[i, j]`` is the mean per-case
  Dice between candidates ``i`` and ``j``'s predictions on the target; the main
  maximises ``DTM[i] * max_{j != i} A[i, j]``, and only candidates with
  ``A[main, j] >= threshold`` may be aux or vote in the pseudo-labels.
- The entropy baseline scores a case by ``1 - mean normalised predictive entropy``.

Pure PyTorch; never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as functional
from torch import nn

from core.config import Attention, SelectionRule, TransferConfig, TransferMetric
from core.training.trainer import predict_probabilities, predicted_classes


def gaussian_smooth(maps: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Smooth ``(N, H, W)`` maps with a separable Gaussian (``sigma_px`` = 0: copy)."""
    if sigma_px <= 0:
        return maps.clone()
    radius = max(1, math.ceil(3 * sigma_px))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    smoothed = maps[:, None]
    smoothed = functional.conv2d(
        functional.pad(smoothed, (radius, radius, 0, 0), mode="replicate"),
        kernel.view(1, 1, 1, -1),
    )
    smoothed = functional.conv2d(
        functional.pad(smoothed, (0, 0, radius, radius), mode="replicate"),
        kernel.view(1, 1, -1, 1),
    )
    return smoothed[:, 0]


def dilate(mask: torch.Tensor, radius_px: int) -> torch.Tensor:
    """Dilate boolean ``(N, H, W)`` masks by a square of side ``2 * radius_px + 1``.

    A square is a row times a column, so two 1-D max pools give exactly the 2-D one,
    about four times faster at the default radius (6 px at 64 px).
    """
    if radius_px <= 0:
        return mask.clone()
    side = 2 * radius_px + 1
    grown = functional.max_pool2d(
        mask[:, None].float(), kernel_size=(1, side), stride=1, padding=(0, radius_px)
    )
    grown = functional.max_pool2d(
        grown, kernel_size=(side, 1), stride=1, padding=(radius_px, 0)
    )
    return grown[:, 0] > 0.5


def build_keep_mask(
    attention: torch.Tensor, *, transfer: TransferConfig
) -> torch.Tensor:
    """Turn attention maps ``(N, H, W)`` in [0, 1] into boolean keep-masks.

    Smooth with ``transfer.smoothing_sigma_px``, threshold at ``transfer.threshold``,
    dilate by ``transfer.dilation_fraction`` of the image side.

    Example:
        >>> from core.config import load_default_config
        >>> spot = torch.zeros(1, 32, 32); spot[0, 12:20, 12:20] = 1.0
        >>> keep = build_keep_mask(spot, transfer=load_default_config().transfer)
        >>> bool(keep[0, 16, 16]), bool(keep[0, 0, 0])
        (True, False)
    """
    smoothed = gaussian_smooth(attention, transfer.smoothing_sigma_px)
    side = max(attention.shape[-2:])
    radius = round(transfer.dilation_fraction * side)
    return dilate(smoothed >= transfer.threshold, radius)


def mask_images(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep ``images`` ``(N, 1, H, W)`` where ``keep`` ``(N, H, W)``; 0 elsewhere."""
    return images * keep[:, None].to(images.dtype)


def gradcam_attention(
    model: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 32,
) -> torch.Tensor:
    """Grad-CAM maps ``(N, H, W)`` in [0, 1] at the U-Net's last decoder features.

    The score is the sum of foreground logits over the predicted foreground; channel
    weights are its spatially averaged gradients (Selvaraju et al.). Works on MONAI's
    ``UNet``, whose last block (``model.model[-1]``) maps decoder features to logits.
    """
    blocks = getattr(model, "model", None)
    if not isinstance(blocks, nn.Sequential):
        raise TypeError(
            "Grad-CAM attention needs a MONAI UNet (model.model Sequential)"
        )
    model.to(device).eval()
    captured: list[torch.Tensor] = []

    def keep_input(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        inputs[0].retain_grad()
        captured.append(inputs[0])

    handle = blocks[-1].register_forward_pre_hook(keep_input)
    maps = []
    try:
        for start in range(0, images.shape[0], batch_size):
            captured.clear()
            batch = images[start : start + batch_size].to(device).requires_grad_(True)
            logits = model(batch)
            foreground = logits.argmax(1, keepdim=True) > 0
            score = (logits[:, 1:].sum(1, keepdim=True) * foreground).sum()
            model.zero_grad(set_to_none=True)
            score.backward()
            features = captured[0]
            assert features.grad is not None
            weights = features.grad.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * features).sum(1, keepdim=True)).detach()
            cam = functional.interpolate(
                cam, size=images.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
            peak = cam.flatten(1).amax(1).clamp_min(1e-8).view(-1, 1, 1)
            maps.append((cam / peak).cpu())
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return torch.cat(maps)


def foreground_dice_per_case(
    first: torch.Tensor,
    second: torch.Tensor,
    *,
    case_of_slice: torch.Tensor,
    num_cases: int,
) -> torch.Tensor:
    """Per-case Dice of two label maps' foreground (class > 0); 0 if ``first`` is empty.

    Args:
        first: ``(N, H, W)`` labels whose emptiness decides the degenerate case (the
            prediction on the unmasked image).
        second: ``(N, H, W)`` labels to compare with.
        case_of_slice: ``(N,)`` case index per slice.
        num_cases: number of cases.

    Example:
        >>> a = torch.tensor([[[1, 1], [0, 0]]]); b = torch.tensor([[[1, 0], [0, 0]]])
        >>> foreground_dice_per_case(a, b, case_of_slice=torch.tensor([0]), num_cases=1)
        tensor([0.6667])
    """
    first_fg = (first > 0).flatten(1).float()
    second_fg = (second > 0).flatten(1).float()
    overlap = torch.zeros(num_cases).index_add_(
        0, case_of_slice, (first_fg * second_fg).sum(1)
    )
    first_size = torch.zeros(num_cases).index_add_(0, case_of_slice, first_fg.sum(1))
    second_size = torch.zeros(num_cases).index_add_(0, case_of_slice, second_fg.sum(1))
    dice = 2 * overlap / (first_size + second_size).clamp_min(1.0)
    return torch.where(first_size > 0, dice, torch.zeros_like(dice))


def entropy_score_per_case(
    probabilities: torch.Tensor, *, case_of_slice: torch.Tensor, num_cases: int
) -> torch.Tensor:
    """``1 - mean normalised entropy`` of ``(N, C, H, W)`` probabilities, per case."""
    num_classes = probabilities.shape[1]
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1)
    per_slice = entropy.flatten(1).mean(1) / math.log(num_classes)
    total = torch.zeros(num_cases).index_add_(0, case_of_slice, per_slice)
    count = torch.zeros(num_cases).index_add_(
        0, case_of_slice, torch.ones_like(per_slice)
    )
    return 1.0 - total / count.clamp_min(1.0)


@dataclasses.dataclass(frozen=True, slots=True)
class CandidateScores:
    """One candidate model's per-case scores and its softmax on every target slice."""

    per_case: torch.Tensor  # (num_cases,)
    probabilities: torch.Tensor  # (N, C, H, W)


def score_candidate(
    model: nn.Module,
    images: torch.Tensor,
    *,
    case_of_slice: torch.Tensor,
    num_cases: int,
    transfer: TransferConfig,
    device: torch.device,
) -> CandidateScores:
    """Score one candidate on the target's slices with LFTM (or the entropy baseline).

    Args:
        model: the candidate source model (not modified).
        images: ``(N, 1, H, W)`` z-scored target slices.
        case_of_slice: ``(N,)`` case index per slice.
        num_cases: number of target cases (ITM rows).
        transfer: metric, attention and mask settings.
        device: where to run inference.
    """
    probabilities = predict_probabilities(model, images, device=device)
    if transfer.metric is TransferMetric.ENTROPY:
        per_case = entropy_score_per_case(
            probabilities, case_of_slice=case_of_slice, num_cases=num_cases
        )
        return CandidateScores(per_case=per_case, probabilities=probabilities)
    if transfer.attention is Attention.GRADCAM:
        attention = gradcam_attention(model, images, device=device)
    else:
        attention = 1.0 - probabilities[:, 0]
    keep = build_keep_mask(attention, transfer=transfer)
    # A slice where the model attends nowhere leaves a blank input: its prediction on
    # that blank says nothing about x, so it counts as empty (like an empty prediction,
    # a model that is confident nowhere earns no trust). Those slices need no second
    # pass: only the attended ones are predicted again (each slice's prediction is
    # its own in eval mode, so the result is the same).
    attended = keep.flatten(1).any(1)
    masked_labels = torch.zeros(keep.shape, dtype=torch.int64)
    if bool(attended.any()):
        masked = predict_probabilities(
            model, mask_images(images[attended], keep[attended]), device=device
        )
        masked_labels[attended] = predicted_classes(masked)
    per_case = foreground_dice_per_case(
        predicted_classes(probabilities),
        masked_labels,
        case_of_slice=case_of_slice,
        num_cases=num_cases,
    )
    return CandidateScores(per_case=per_case, probabilities=probabilities)


def compute_dtm(itm: torch.Tensor) -> torch.Tensor:
    """Domain-level transferability: the column means of ITM ``(num_cases, M)``."""
    return itm.mean(0)


def prediction_agreement(
    labels: Sequence[torch.Tensor], *, case_of_slice: torch.Tensor, num_cases: int
) -> torch.Tensor:
    """``(M, M)`` mean per-case foreground Dice between candidates' predictions.

    ``A[i, j]`` averages, over the target's cases, the Dice of candidate ``i``'s and
    candidate ``j``'s predicted foreground on the case's slices; a case where either
    predicts nothing counts 0, so a silent model earns no agreement. ``A[i, i]`` is 1
    for a candidate that predicts foreground on every case.

    Args:
        labels: per candidate, hard predictions ``(N, H, W)`` on the same target slices.
        case_of_slice: ``(N,)`` case index per slice.
        num_cases: number of target cases.

    Example:
        >>> a = torch.tensor([[[1, 1], [0, 0]]]); b = torch.tensor([[[1, 0], [0, 0]]])
        >>> prediction_agreement([a, b], case_of_slice=torch.tensor([0]), num_cases=1)
        tensor([[1.0000, 0.6667],
                [0.6667, 1.0000]])
    """
    count = len(labels)
    agreement = torch.zeros(count, count)
    for first in range(count):
        for second in range(first, count):
            value = foreground_dice_per_case(
                labels[first],
                labels[second],
                case_of_slice=case_of_slice,
                num_cases=num_cases,
            ).mean()
            agreement[first, second] = agreement[second, first] = value
    return agreement


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SourceSelection:
    """The main and auxiliary sources, their fixed weights (summing to 1), the voters.

    ``voters`` are the candidates whose predictions form the pseudo-labels: every
    candidate under the paper's rule, the main and those agreeing with it under the
    agreement rule. An empty tuple means every candidate.
    """

    main: str
    aux: str | None
    weight_main: float
    weight_aux: float
    voters: tuple[str, ...] = ()

    def as_pairs(self) -> tuple[tuple[str, float], ...]:
        """Return ``((main, W_main), (aux, W_aux))`` without an absent aux."""
        if self.aux is None:
            return ((self.main, self.weight_main),)
        return ((self.main, self.weight_main), (self.aux, self.weight_aux))


def _pair(
    dtm: Mapping[str, float], ranked: Sequence[str]
) -> tuple[str | None, float, float]:
    """The aux (second of ``ranked``) and the pair's DTM-normalised weights."""
    main = ranked[0]
    if len(ranked) == 1:
        return None, 1.0, 0.0
    aux = ranked[1]
    total = dtm[main] + dtm[aux]
    if total <= 0:
        return aux, 0.5, 0.5
    return aux, dtm[main] / total, dtm[aux] / total


def predicts_by_ensemble(
    voters: Sequence[str], *, rule: SelectionRule, min_voters: int
) -> bool:
    """Whether TGMA predicts by its voters' uniform average rather than the pair.

    Only under the agreement selection, whose voters are the candidates that agree
    with the main (under the paper's rule every candidate votes, and their average
    is the uniform baseline), and only with at least ``min_voters`` of them
    (``transfer.ensemble-min-voters``; 0 = never): docs/methods.md#voter-ensemble.

    Example:
        >>> predicts_by_ensemble(("A", "B", "C"), rule=SelectionRule.AGREEMENT,
        ...                      min_voters=3)
        True
        >>> predicts_by_ensemble(("A", "B"), rule=SelectionRule.AGREEMENT, min_voters=3)
        False
        >>> predicts_by_ensemble(("A", "B", "C"), rule=SelectionRule.DTM, min_voters=3)
        False
    """
    return (
        rule is SelectionRule.AGREEMENT and min_voters > 0 and len(voters) >= min_voters
    )


def select_sources(
    dtm: Mapping[str, float],
    *,
    rule: SelectionRule = SelectionRule.DTM,
    agreement: Mapping[str, Mapping[str, float]] | None = None,
    threshold: float = 0.5,
) -> SourceSelection:
    """Pick the main and auxiliary sources, their weights and the pseudo-label voters.

    ``rule = DTM`` (the paper): main = argmax DTM, aux = second, every candidate votes.
    ``rule = AGREEMENT``: the main maximises ``DTM[i] * max_{j != i} agreement[i][j]``
    (a high DTM that no other candidate's predictions confirm is not trusted); the aux
    is the best-scored candidate whose agreement with the main is at least
    ``threshold`` (none: the main alone), and the voters are the main and every
    candidate that agrees with it that much. Either way the pair's weights are the
    DTM values normalised to 1. Ties go to the name that sorts first; when both DTM
    are 0 the weights are equal.

    Args:
        dtm: per candidate, its DTM.
        rule: the selection rule.
        agreement: ``agreement[i][j]``, mean Dice between candidates' predictions on
            the target (:func:`prediction_agreement`); required by ``AGREEMENT``.
        threshold: least agreement with the main to be aux or vote.

    Raises:
        ValueError: no candidates, or ``AGREEMENT`` without an agreement for every
            pair of candidates.

    Example:
        >>> paper = select_sources({"A": 0.25, "B": 0.75, "C": 0.25})
        >>> paper.main, paper.aux, paper.weight_main, paper.voters
        ('B', 'A', 0.75, ('A', 'B', 'C'))
        >>> agree = {"A": {"B": 0.1, "C": 0.8}, "B": {"A": 0.1, "C": 0.1},
        ...          "C": {"A": 0.8, "B": 0.1}}
        >>> confirmed = select_sources({"A": 0.5, "B": 0.6, "C": 0.4},
        ...                rule=SelectionRule.AGREEMENT, agreement=agree)
        >>> confirmed.main, confirmed.aux, confirmed.voters
        ('A', 'C', ('A', 'C'))
    """
    if not dtm:
        raise ValueError("no candidate sources to select from")
    names = sorted(dtm)
    if rule is SelectionRule.DTM or len(names) == 1:
        ranked = sorted(names, key=lambda name: (-dtm[name], name))
        aux, weight_main, weight_aux = _pair(dtm, ranked)
        return SourceSelection(
            main=ranked[0],
            aux=aux,
            weight_main=weight_main,
            weight_aux=weight_aux,
            voters=tuple(names),
        )
    if agreement is None:
        raise ValueError("the agreement selection needs the candidates' agreement")
    missing = [
        f"{first}/{second}"
        for first in names
        for second in names
        if first != second and second not in agreement.get(first, {})
    ]
    if missing:
        raise ValueError(f"no agreement for candidate pair(s) {', '.join(missing)}")
    confirmed = {
        name: dtm[name]
        * max(agreement[name][other] for other in names if other != name)
        for name in names
    }
    main = min(names, key=lambda name: (-confirmed[name], name))
    voters = tuple(
        name for name in names if name == main or agreement[main][name] >= threshold
    )
    others = sorted(
        (name for name in voters if name != main),
        key=lambda name: (-confirmed[name], name),
    )
    ranked = [main, *others]
    aux, weight_main, weight_aux = _pair(dtm, ranked)
    return SourceSelection(
        main=main,
        aux=aux,
        weight_main=weight_main,
        weight_aux=weight_aux,
        voters=voters,
    )


def build_pseudo_labels(
    probabilities: Sequence[torch.Tensor],
    itm: torch.Tensor,
    *,
    case_of_slice: torch.Tensor,
) -> torch.Tensor:
    """ITM-weighted soft pseudo-labels ``(N, C, H, W)``; ``argmax(1)`` gives hard ones.

    Args:
        probabilities: per source, softmax maps ``(N, C, H, W)`` on the target slices.
        itm: ``(num_cases, M)`` transferability, columns in the order of
            ``probabilities``; each row is normalised to sum 1 (an all-zero row gives
            equal weights).
        case_of_slice: ``(N,)`` case index per slice.
    """
    if len(probabilities) != itm.shape[1]:
        raise ValueError(
            f"ITM has {itm.shape[1]} columns for {len(probabilities)} sources"
        )
    row_sums = itm.sum(1, keepdim=True)
    uniform = torch.full_like(itm, 1.0 / itm.shape[1])
    weights = torch.where(row_sums > 0, itm / row_sums.clamp_min(1e-12), uniform)
    per_slice = weights[case_of_slice]  # (N, M)
    stacked = torch.stack(list(probabilities), dim=1)  # (N, M, C, H, W)
    return (per_slice[:, :, None, None, None] * stacked).sum(1)
