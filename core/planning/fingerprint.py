"""A site's fingerprint: aggregates of its training images that a plan is derived from.

What nnU-Net's dataset fingerprint holds, computed at the site and reduced to
aggregates: the median voxel spacing and image size over the site's training images,
and, for a CT site (``dataset.json`` modality CT) with labelled cases, its labelled
foreground's intensity percentiles, mean and standard deviation in Hounsfield units.
Each case contributes its own statistics and the site averages them over cases, so one
case's influence is bounded (what the DP release in :mod:`core.planning.job` needs).
Reads images through :mod:`core.data.dataset`; never imports flwr.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final

import numpy as np

from core.data.dataset import SiteIndex, index_site, read_case
from core.logs import Progress, quiet

# The foreground intensity percentiles a CT fingerprint holds (nnU-Net's clip points
# and the median), then the foreground mean and standard deviation.
CT_PERCENTILES: Final = (0.5, 50.0, 99.5)
CT_STATISTICS: Final = ("p0.5", "p50", "p99.5", "mean", "sd")
# Every CT intensity is clipped to this public range (the 12-bit HU range scanners
# store) before it enters a statistic, so one case moves a mean by a bounded amount.
CT_RANGE_HU: Final = (-1024.0, 3071.0)
# At most this many foreground voxels per case enter its statistics (nnU-Net samples
# 10 000), drawn evenly so the result is deterministic.
MAX_FOREGROUND_VOXELS: Final = 10_000


def is_ct(modality: str) -> bool:
    """Whether a ``dataset.json`` modality names CT (case and spaces ignored).

    Example:
        >>> is_ct("CT"), is_ct(" ct "), is_ct("MRI"), is_ct("synthetic-MR")
        (True, True, False, False)
    """
    return modality.strip().upper() == "CT"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteFingerprint:
    """A site's fingerprint, exact (before any DP noise).

    Attributes:
        modality: from ``dataset.json``.
        num_images: training images (labelled or not) the geometry stands on.
        num_labelled: labelled training cases the CT intensities stand on (0 when
            there are none: an MR site, or a CT site without labels).
        spacing_mm: median voxel size along ``(x, y, z)``.
        shape: median image size along ``(z, y, x)``.
        ct_intensities: for a CT site with labelled cases, the mean over cases of
            each case's foreground ``CT_STATISTICS`` (HU); None otherwise.
    """

    modality: str
    num_images: int
    num_labelled: int
    spacing_mm: tuple[float, float, float]
    shape: tuple[float, float, float]
    ct_intensities: tuple[float, ...] | None


def foreground_statistics(
    image: np.ndarray, label: np.ndarray
) -> tuple[float, ...] | None:
    """One case's ``CT_STATISTICS`` over its labelled foreground (None if empty).

    Intensities are clipped to :data:`CT_RANGE_HU` first; at most
    :data:`MAX_FOREGROUND_VOXELS` evenly spaced foreground voxels are used.

    Example:
        >>> image = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
        >>> label = (image >= 4).astype(np.int64)
        >>> [round(value, 2) for value in foreground_statistics(image, label)]
        [4.01, 5.5, 6.98, 5.5, 1.12]
    """
    values = np.clip(image[label > 0].astype(np.float64), *CT_RANGE_HU)
    if values.size == 0:
        return None
    if values.size > MAX_FOREGROUND_VOXELS:
        picks = np.linspace(0, values.size - 1, MAX_FOREGROUND_VOXELS).round()
        values = values[picks.astype(np.int64)]
    percentiles = np.percentile(values, CT_PERCENTILES)
    return (*map(float, percentiles), float(values.mean()), float(values.std()))


def compute_fingerprint(
    site_dir: Path | SiteIndex, *, num_classes: int, progress: Progress = quiet
) -> SiteFingerprint:
    """The site's exact fingerprint over its training images.

    Geometry stands on every training image, labelled or not (the label-free cases
    count, in case-id order, so whether the site holds labels cannot change it). The
    CT intensities stand on the labelled training cases of a CT site.

    Raises:
        SiteDataError: a training case is missing or invalid.
        ValueError: the site has no training images.
    """
    index = site_dir if isinstance(site_dir, SiteIndex) else index_site(Path(site_dir))
    cases = index.training_images
    if not cases:
        raise ValueError(f"{index.root}: no training images to fingerprint")
    ct = is_ct(index.modality)
    labelled = {case.case_id for case in index.labelled}
    spacings: list[tuple[float, float, float]] = []
    shapes: list[tuple[int, int, int]] = []
    statistics: list[tuple[float, ...]] = []
    for case in cases:
        with_label = ct and case.case_id in labelled
        record = case if with_label else dataclasses.replace(case, label_path=None)
        loaded = read_case(record, num_classes=num_classes)
        spacings.append(loaded.spacing_mm)
        shapes.append(loaded.image.shape)
        if with_label and loaded.label is not None:
            case_statistics = foreground_statistics(loaded.image, loaded.label)
            if case_statistics is not None:
                statistics.append(case_statistics)
    spacing = np.median(np.asarray(spacings, dtype=np.float64), axis=0)
    shape = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
    progress(
        f"fingerprint of {len(cases)} training images: median spacing "
        f"{'x'.join(f'{value:g}' for value in spacing)} mm, median size "
        f"{'x'.join(f'{value:g}' for value in shape)} (z, y, x)"
        + (f", CT foreground of {len(statistics)} labelled cases" if ct else "")
    )
    return SiteFingerprint(
        modality=index.modality,
        num_images=len(cases),
        num_labelled=len(statistics),
        spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        shape=(float(shape[0]), float(shape[1]), float(shape[2])),
        ct_intensities=(
            tuple(float(value) for value in np.mean(statistics, axis=0))
            if statistics
            else None
        ),
    )
