"""The coordinator's plan rules: one resolution plan from the sites' fingerprints.

nnU-Net's rules, adapted to released aggregates (each site sends medians, not every
image's values) and to this pipeline's 2-D slices (docs/planning.md):

- target spacing: per axis, the median of the sites' median spacings, each site
  weighed by its training images; where the coarsest axis is more than
  :data:`ANISOTROPY_THRESHOLD` times the others and has fewer than
  1 / :data:`ANISOTROPY_THRESHOLD` of their voxels, it takes the 10th percentile
  instead (nnU-Net's anisotropy rule), never finer than the other axes;
- slice axis: slices are cut across the coarsest axis (nnU-Net's 2-D configuration);
- in-plane size: the median over sites of the larger in-plane extent at the target
  spacing, rounded up to what the U-Net's strides divide, within
  ``plan.max-image-size``;
- batch size: as many slices as ``plan.pixels-per-batch`` holds, but no more than
  5 % of the median site's training slices and at least 2 (nnU-Net's rule);
- normalisation per modality: CT sites clip to the pooled foreground 0.5 and 99.5
  percentiles and scale by the pooled foreground mean and standard deviation; every
  other modality is z-scored per volume.

Pure numpy; never imports flwr, torch or a site's data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from core.config import IntensityNormalisation, PlanConfig, RunConfig, SliceAxis
from core.planning.fingerprint import SiteFingerprint, is_ct

ANISOTROPY_THRESHOLD: Final = 3.0  # nnU-Net's ANISO_THRESHOLD
ANISOTROPIC_PERCENTILE: Final = 10.0
BATCH_DATASET_FRACTION: Final = 0.05  # a batch covers at most this share of the slices
MIN_BATCH_SIZE: Final = 2
# (x, y, z) spacing index of the axis slices are cut across -> the slice axis.
_SLICE_AXIS_OF: Final = (SliceAxis.X, SliceAxis.Y, SliceAxis.Z)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ResolutionPlan:
    """The plan every site's data is prepared by (saved as ``plan.json``).

    Attributes:
        sites: the sites whose fingerprints it stands on, sorted.
        target_spacing_mm: along ``(x, y, z)``.
        slice_axis: the axis 2-D slices are cut across (its recommendation: the
            run's ``data.slice-axis`` is what cuts them).
        image_size: in-plane size of a slice at the target spacing.
        batch_size: training slices per batch.
        normalisation: per modality (as the sites' ``dataset.json`` name it), the
            intensity scheme: ``"ct"`` or ``"zscore"``.
        ct_window: ``(clip low, clip high, mean, sd)`` in HU for CT sites; ``()``
            when no CT site released an intensity term.
        rules: one line per decision, saying which rule gave it.
    """

    sites: tuple[str, ...]
    target_spacing_mm: tuple[float, float, float]
    slice_axis: SliceAxis
    image_size: int
    batch_size: int
    normalisation: dict[str, str]
    ct_window: tuple[float, ...]
    rules: tuple[str, ...]

    @property
    def in_plane_spacing_mm(self) -> float:
        """The target spacing within a slice: the mean over the two in-plane axes.

        Example:
            >>> plan = ResolutionPlan(sites=(), target_spacing_mm=(0.6, 0.7, 3.0),
            ...     slice_axis=SliceAxis.Z, image_size=256, batch_size=2,
            ...     normalisation={}, ct_window=(), rules=())
            >>> round(plan.in_plane_spacing_mm, 3)
            0.65
        """
        through = _SLICE_AXIS_OF.index(self.slice_axis)
        return (
            sum(
                value
                for axis, value in enumerate(self.target_spacing_mm)
                if axis != through
            )
            / 2.0
        )

    def to_document(self) -> dict[str, object]:
        """The plan as ``plan.json`` holds it."""
        return {
            "sites": list(self.sites),
            "target-spacing-mm": list(self.target_spacing_mm),
            "slice-axis": self.slice_axis.value,
            "image-size": self.image_size,
            "batch-size": self.batch_size,
            "normalisation": dict(self.normalisation),
            "ct-window": list(self.ct_window),
            "rules": list(self.rules),
        }

    @classmethod
    def from_document(cls, document: Mapping[str, object]) -> ResolutionPlan:
        """Read ``plan.json`` back (a KeyError or ValueError names what is wrong)."""
        spacing = [float(value) for value in document["target-spacing-mm"]]  # type: ignore[attr-defined]
        return cls(
            sites=tuple(str(site) for site in document["sites"]),  # type: ignore[attr-defined]
            target_spacing_mm=(spacing[0], spacing[1], spacing[2]),
            slice_axis=SliceAxis(str(document["slice-axis"])),
            image_size=int(document["image-size"]),  # type: ignore[call-overload]
            batch_size=int(document["batch-size"]),  # type: ignore[call-overload]
            normalisation={
                str(key): str(value)
                for key, value in document["normalisation"].items()  # type: ignore[attr-defined]
            },
            ct_window=tuple(float(value) for value in document["ct-window"]),  # type: ignore[attr-defined]
            rules=tuple(str(line) for line in document["rules"]),  # type: ignore[attr-defined]
        )


def weighted_percentile(
    values: Sequence[float] | npt.NDArray[np.float64],
    weights: Sequence[float],
    percentile: float,
) -> float:
    """The ``percentile`` of ``values`` with each repeated ``weights`` times.

    The lower of the two middle values for an even total (a value some site has).

    Example:
        >>> weighted_percentile([0.5, 0.8, 3.0], [10, 1, 1], 50)
        0.5
        >>> weighted_percentile([1.0, 3.0], [1, 3], 10)
        1.0
    """
    order = np.argsort(values)
    sorted_values = np.asarray(values, dtype=np.float64)[order]
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    position = percentile / 100.0 * cumulative[-1]
    index = int(np.searchsorted(cumulative, position, side="left"))
    return float(sorted_values[min(index, len(sorted_values) - 1)])


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def derive_plan(
    fingerprints: Mapping[str, SiteFingerprint],
    *,
    plan: PlanConfig,
    strides: Sequence[int],
) -> ResolutionPlan:
    """The resolution plan of the fingerprints (rules in the module docstring).

    Args:
        fingerprints: site name -> its released fingerprint.
        plan: the run's ``plan.*`` settings (caps).
        strides: the U-Net's strides; the in-plane size must be divisible by their
            product.

    Raises:
        ValueError: no fingerprint to plan from.
    """
    if not fingerprints:
        raise ValueError("no site released a fingerprint to plan from")
    names = tuple(sorted(fingerprints))
    prints = [fingerprints[name] for name in names]
    weights = [float(max(1, item.num_images)) for item in prints]
    spacings = np.asarray([item.spacing_mm for item in prints], dtype=np.float64)
    # Sizes along (x, y, z), as the spacings are.
    sizes = np.asarray([item.shape[::-1] for item in prints], dtype=np.float64)
    rules: list[str] = []

    target = np.array(
        [weighted_percentile(spacings[:, axis], weights, 50) for axis in range(3)]
    )
    extents_mm = sizes * spacings
    median_extent_mm = np.array(
        [weighted_percentile(extents_mm[:, axis], weights, 50) for axis in range(3)]
    )
    coarse = int(np.argmax(target)) if np.ptp(target) > 0 else 2
    others = [axis for axis in range(3) if axis != coarse]
    rules.append(
        "target spacing: median of the sites' median spacings (x, y, z) "
        + "x".join(f"{value:.3g}" for value in target)
        + " mm"
    )
    extent_voxels = median_extent_mm / target
    anisotropic_spacing = target[coarse] > ANISOTROPY_THRESHOLD * target[others].max()
    anisotropic_voxels = (
        extent_voxels[coarse] * ANISOTROPY_THRESHOLD < extent_voxels[others].min()
    )
    if anisotropic_spacing and anisotropic_voxels:
        finer = weighted_percentile(
            spacings[:, coarse], weights, ANISOTROPIC_PERCENTILE
        )
        target[coarse] = max(finer, float(target[others].max()))
        rules.append(
            f"anisotropic: the coarse axis {'xyz'[coarse]} takes the "
            f"{ANISOTROPIC_PERCENTILE:g}th percentile, {target[coarse]:.3g} mm"
        )
    slice_axis = _SLICE_AXIS_OF[coarse]
    rules.append(f"slice axis: {slice_axis.value}, across the coarsest spacing")

    divisor = math.lcm(8, math.prod(strides))
    in_plane = [
        float(
            max(
                sizes[row, axis] * spacings[row, axis] / target[axis] for axis in others
            )
        )
        for row in range(len(prints))
    ]
    wanted = weighted_percentile(in_plane, weights, 50)
    ceiling = plan.max_image_size - plan.max_image_size % divisor
    image_size = min(_round_up(wanted, divisor), max(divisor, ceiling))
    image_size = max(image_size, _round_up(16, divisor))
    rules.append(
        f"image size: {image_size} px (median in-plane extent {wanted:.0f} px at the "
        f"target spacing, rounded up to a multiple of {divisor}"
        + (
            f", capped by plan.max-image-size {plan.max_image_size})"
            if image_size < _round_up(wanted, divisor)
            else ")"
        )
    )

    slices_per_site = [item.num_images * item.shape[2 - coarse] for item in prints]
    median_slices = weighted_percentile(slices_per_site, [1.0] * len(prints), 50)
    by_memory = plan.pixels_per_batch // (image_size * image_size)
    by_data = int(BATCH_DATASET_FRACTION * median_slices)
    batch_size = max(MIN_BATCH_SIZE, min(by_memory, by_data))
    rules.append(
        f"batch size: {batch_size} (plan.pixels-per-batch holds {by_memory} slices; "
        f"5% of the median site's {median_slices:.0f} training slices is {by_data}; "
        f"at least {MIN_BATCH_SIZE})"
    )

    normalisation = {
        item.modality: (
            IntensityNormalisation.CT.value
            if is_ct(item.modality)
            else IntensityNormalisation.ZSCORE.value
        )
        for item in prints
    }
    ct_prints = [item for item in prints if item.ct_intensities is not None]
    ct_window: tuple[float, ...] = ()
    if ct_prints:
        values = np.asarray([item.ct_intensities for item in ct_prints])
        counts = np.asarray([item.num_labelled for item in ct_prints], dtype=np.float64)
        share = counts / counts.sum()
        low, _median, high, mean = (share @ values[:, :4]).tolist()
        pooled_variance = share @ (values[:, 4] ** 2 + (values[:, 3] - mean) ** 2)
        ct_window = (low, high, mean, max(1.0, float(math.sqrt(pooled_variance))))
        rules.append(
            f"CT window from {len(ct_prints)} CT site(s): clip {low:.1f} to {high:.1f} "
            f"HU, mean {mean:.1f}, sd {ct_window[3]:.1f}"
        )
    elif any(is_ct(item.modality) for item in prints):
        rules.append(
            "CT sites released no intensity term: they are z-scored per volume"
        )
    return ResolutionPlan(
        sites=names,
        target_spacing_mm=(float(target[0]), float(target[1]), float(target[2])),
        slice_axis=slice_axis,
        image_size=image_size,
        batch_size=batch_size,
        normalisation=dict(sorted(normalisation.items())),
        ct_window=ct_window,
        rules=tuple(rules),
    )


def apply_plan(
    config: RunConfig,
    *,
    image_size: int,
    batch_size: int,
    spacing_mm: float,
    ct_window: tuple[float, ...],
) -> RunConfig:
    """``config`` with the plan's values where the run leaves them to the plan.

    ``data.image-size = 0``, ``train.batch-size = 0``, ``data.spacing-mm = 0`` and an
    empty ``data.ct-window`` take the plan's; any value the run sets overrides the
    plan.

    Raises:
        ValueError: a planned value the run's model cannot take (naming the key).
    """
    data, train = config.data, config.train
    planned_data = dataclasses.replace(
        data,
        image_size=data.image_size or image_size,
        spacing_mm=data.spacing_mm or spacing_mm,
        ct_window=data.ct_window or ct_window,
    )
    planned_train = dataclasses.replace(
        train, batch_size=train.batch_size or batch_size
    )
    return dataclasses.replace(config, data=planned_data, train=planned_train)


def resolve_normalisation(config: RunConfig, modality: str) -> RunConfig:
    """``config`` with ``data.normalisation = "auto"`` resolved for a site's modality.

    ``ct`` at a site whose ``dataset.json`` names CT when there is a CT window (the
    run's or the plan's), else ``zscore``; a scheme the run names stays.

    Example:
        >>> from core.config import load_default_config
        >>> config = load_default_config(**{"data.ct-window": "-100,200,40,50"})
        >>> resolve_normalisation(config, "CT").data.normalisation.value
        'ct'
        >>> resolve_normalisation(config, "MRI").data.normalisation.value
        'zscore'
    """
    data = config.data
    if data.normalisation is not IntensityNormalisation.AUTO:
        return config
    scheme = (
        IntensityNormalisation.CT
        if is_ct(modality) and data.ct_window
        else IntensityNormalisation.ZSCORE
    )
    return dataclasses.replace(
        config, data=dataclasses.replace(data, normalisation=scheme)
    )
