"""Predictions scored where a clinician reads them: on each image's own grid, in mm.

:func:`score_on_native_grid` puts a prediction's rows (whole slices or tiles) back on
the image's grid (:func:`core.data.dataset.label_volume_from_slices`), optionally
post-processes that volume, and compares it with the label as the site stores it:
Dice, and HD95 in mm at the image's own voxel size. The evaluation and a source's
post-processing decision both score this way. Never imports flwr.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch

from core.config import RunConfig
from core.data.dataset import LoadedCase, SliceSet, label_volume_from_slices
from core.metrics import CaseScores, SegmentationScores, dice_score, hd95_mm

# A post-processing of a predicted label volume: ``(Z, Y, X)`` classes -> classes.
VolumeTransform = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.int64]]


def score_on_native_grid(
    classes: torch.Tensor,
    slices: SliceSet,
    references: Sequence[LoadedCase],
    config: RunConfig,
    *,
    with_hd95: bool = True,
    postprocess: VolumeTransform | None = None,
) -> SegmentationScores:
    """Score predictions on each case's own grid, against its own label, in mm.

    The rows' classes go back to the image's grid first
    (:func:`core.data.dataset.label_volume_from_slices`: whole slices resized,
    tiles blended and resampled); Dice and HD95 (in mm, at the image's own voxel
    size) then compare that volume with the label as the site stores it, so a
    prediction is scored at the resolution a clinician would read it, whatever
    ``data.image-size`` the network saw. ``postprocess``, when given, transforms
    each predicted volume on that grid before it is scored.
    """
    scores = []
    num_classes = config.data.num_classes
    for number, reference_case in enumerate(references):
        label = reference_case.label
        if label is None:
            raise ValueError(f"case {reference_case.case_id!r} has no label to score")
        rows = slices.case_of_slice == number
        volume = label_volume_from_slices(
            classes[rows].cpu(),
            label.shape,
            data=config.data,
            tiling=None if slices.tilings is None else slices.tilings[number],
        )
        if postprocess is not None:
            volume = postprocess(volume)
        prediction = torch.from_numpy(volume)
        reference = torch.from_numpy(label)
        scores.append(
            CaseScores(
                case_id=reference_case.case_id,
                dice=dice_score(prediction, reference, num_classes=num_classes),
                hd95_mm=(
                    hd95_mm(
                        prediction,
                        reference,
                        num_classes=num_classes,
                        spacing_mm=reference_case.spacing_mm[::-1],
                    )
                    if with_hd95
                    else math.nan
                ),
            )
        )
    return SegmentationScores(cases=tuple(scores))
