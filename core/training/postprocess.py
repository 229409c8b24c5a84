"""Post-processing as nnU-Net decides it: the largest 3-D connected component per class.

Owns :func:`keep_largest_component` (per foreground class of a label volume, 3-D
face connectivity, nnU-Net's ``scipy.ndimage.label`` default, applied to each
prediction on its image's own grid), its application to a case's stacked slice
predictions (:func:`keep_largest_per_case`), and the source
site's decision (:func:`decide_largest_component`): the site predicts its own
labelled evaluation cases with the model it trained and turns the post-processing
on only when it strictly raises their mean foreground Dice (nnU-Net's rule). The
decision, and the two mean Dice figures behind it, travel with the model
(``core.protocol.TrainReply``); the target applies it (``core.training.evaluation``).
Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from core.config import LargestComponent, RunConfig
from core.data.dataset import CaseRecord, build_slice_set, index_site, read_case
from core.logs import Progress, quiet
from core.training.job import build_model_with
from core.training.networks import Arrays
from core.training.scoring import score_on_native_grid
from core.training.trainer import predict_mixture, predicted_classes, select_device


def keep_largest_component(
    labels: npt.NDArray[np.integer], *, num_classes: int
) -> npt.NDArray[np.int64]:
    """``labels`` with only the largest connected component of each foreground class.

    Components are face-connected (6-neighbourhood in 3-D, 4 in 2-D: the default
    structure of ``scipy.ndimage.label``, which nnU-Net uses); every voxel of a
    smaller component becomes background (0). An empty class stays empty; of two
    equally large components the one met first in C order is kept.

    Args:
        labels: integer label map of any dimension (a case's ``(Z, Y, X)`` volume).
        num_classes: classes including background; classes ``1..num_classes - 1``
            are processed.

    Returns:
        A new int64 array of the same shape.

    Example:
        >>> volume = np.zeros((3, 1, 5), dtype=np.int64)
        >>> volume[0, 0, :2] = 1; volume[1, 0, 1] = 1; volume[2, 0, 4] = 1
        >>> keep_largest_component(volume, num_classes=2)[:, 0].tolist()
        [[1, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    """
    kept = np.asarray(labels).astype(np.int64, copy=True)
    for label in range(1, num_classes):
        mask = kept == label
        components, count = ndimage.label(mask)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # background of the mask
        kept[mask & (components != int(np.argmax(sizes)))] = 0
    return kept


def keep_largest_per_case(
    predictions: torch.Tensor, case_of_slice: torch.Tensor, *, num_classes: int
) -> torch.Tensor:
    """:func:`keep_largest_component` on each case's slices stacked as a volume.

    A case's slices, in their order, are its ``(slices, S, S)`` volume on the grid
    every score is computed on (``core.metrics.score_cases``), so components connect
    across neighbouring slices.

    Args:
        predictions: ``(N, S, S)`` predicted classes.
        case_of_slice: ``(N,)`` the case of each slice (a case's slices in order).
        num_classes: classes including background.
    """
    kept = predictions.clone()
    for case in torch.unique(case_of_slice).tolist():
        rows = case_of_slice == case
        volume = predictions[rows].cpu().numpy()
        kept[rows] = torch.from_numpy(
            keep_largest_component(volume, num_classes=num_classes)
        ).to(kept.dtype)
    return kept


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PostprocessDecision:
    """A source site's decision on keeping the largest component, and why.

    Attributes:
        enabled: whether the model's predictions are to be post-processed.
        dice_raw: mean foreground Dice of the raw predictions on the site's
            evaluation cases (None: not measured).
        dice_postprocessed: the same after post-processing (None: not measured).
        num_cases: evaluation cases behind the figures (0: not measured).
        reason: one line saying what decided.
    """

    enabled: bool
    dice_raw: float | None
    dice_postprocessed: float | None
    num_cases: int
    reason: str


def decision_off(reason: str) -> PostprocessDecision:
    """The decision "off" without a measurement, saying why."""
    return PostprocessDecision(
        enabled=False,
        dice_raw=None,
        dice_postprocessed=None,
        num_cases=0,
        reason=reason,
    )


def decide_largest_component(
    site_dir: Path,
    weights: Arrays,
    config: RunConfig,
    *,
    min_cases: int = 1,
    progress: Progress = quiet,
) -> PostprocessDecision:
    """Decide at a source whether its model's predictions keep the largest component.

    The site predicts its labelled evaluation cases (``imagesTs`` with ``labelsTs``)
    slice by slice, as the evaluation does, and scores each case's volume on its own
    grid with and without :func:`keep_largest_component`; the post-processing is on
    only when the mean foreground Dice over the cases strictly improves (nnU-Net's
    rule). It is off, unmeasured, when ``postprocess.largest-component`` is
    ``"off"``, or the site has fewer than ``min_cases`` labelled evaluation cases
    (none: nothing to decide on; fewer than the policy's ``limits.min-cases``: the
    two means would be about too few cases to leave the site).

    Args:
        site_dir: the site folder.
        weights: the trained model's weights.
        config: the run config; pass the whole-case one
            (``core.privacy.limits.whole_case_config``) so each case is its volume.
        min_cases: the fewest labelled evaluation cases to decide on.
        progress: called with one line saying the decision and why.
    """
    if config.postprocess.largest_component is LargestComponent.OFF:
        decision = decision_off("postprocess.largest-component is 'off'")
    else:
        index = index_site(Path(site_dir))
        cases = len(index.evaluation)
        if cases == 0 or cases < min_cases:
            decision = decision_off(
                f"{cases} labelled evaluation cases (imagesTs with labelsTs) to "
                f"decide on, {max(min_cases, 1)} needed"
            )
        else:
            decision = _measure(index.evaluation, weights, config)
    progress(
        f"[postprocess] largest component {'on' if decision.enabled else 'off'}: "
        f"{decision.reason}"
    )
    return decision


def _measure(
    cases: tuple[CaseRecord, ...], weights: Arrays, config: RunConfig
) -> PostprocessDecision:
    references = [
        read_case(case, num_classes=config.data.num_classes) for case in cases
    ]
    slices = build_slice_set(cases, data=config.data, with_labels=False)
    model = build_model_with("source", weights, config)
    device = select_device(config.train.device)
    raw = predicted_classes(
        predict_mixture([model], [1.0], slices.images, device=device)
    ).cpu()
    num_classes = config.data.num_classes

    def keep_largest(volume: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return keep_largest_component(volume, num_classes=num_classes)

    dice = [
        score_on_native_grid(
            raw, slices, references, config, with_hd95=False, postprocess=transform
        ).dice
        for transform in (None, keep_largest)
    ]
    enabled = math.isfinite(dice[1]) and dice[1] > dice[0]
    return PostprocessDecision(
        enabled=enabled,
        dice_raw=dice[0],
        dice_postprocessed=dice[1],
        num_cases=len(slices.case_ids),
        reason=(
            f"mean Dice on {len(slices.case_ids)} evaluation cases "
            f"{dice[0]:.4f} raw, {dice[1]:.4f} post-processed"
            + ("" if enabled else " (not a strict improvement)")
        ),
    )
