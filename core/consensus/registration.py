"""Atlas registration: transfer labelled atlases' labels onto a target site's images.

Runs where the target images are (docs/architecture.md#the-phases): a target site may
hold labelled atlases in ``<site>/atlases/imagesTr`` + ``<site>/atlases/labelsTr`` (the
nnU-Net naming of :mod:`core.data.dataset`), and each target image then gets one noisy
label per atlas, the DeepSTAPLE input of docs/methods.md#deepstaple. Each atlas image is
registered onto the target image in physical space (spacing, origin and direction of the
:class:`~core.data.io.Volume` respected): an affine stage, then a B-spline stage, both
driven by Mattes mutual information so that different contrasts still align. The atlas
label is then resampled onto the target grid with nearest-neighbour interpolation.

Uses SimpleITK's registration framework (it owns the transforms this module returns);
reads and writes files only through :mod:`core.data.io` and :mod:`core.data.dataset`;
never imports flwr, clients or server.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813 - the library's own spelling

from core.data.dataset import (
    CaseRecord,
    CaseSplit,
    SiteDataError,
    _check_label,
    _read_checked,
    _scan_images,
    _scan_labels,
)
from core.data.io import Volume, _describe_itk_error

ATLAS_FOLDER: Final = "atlases"
# Below this many sampled voxels per histogram bin, Mattes MI is mostly noise.
_MIN_SAMPLES_PER_BIN: Final = 4


class Initialization(StrEnum):
    """How the affine stage is started (SimpleITK ``CenteredTransformInitializer``).

    ``GEOMETRY`` aligns the image centres and is contrast-blind; ``MOMENTS`` aligns
    the intensity centres of mass, which assumes a similar contrast.
    """

    GEOMETRY = "geometry"
    MOMENTS = "moments"


class RegistrationError(ValueError):
    """Registration failed or its metric is undefined; names both images."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RegistrationSettings:
    """Settings of the affine then B-spline Mattes-MI registration.

    The defaults register a ``64 x 64 x 8`` volume in about a second on 2 CPU cores;
    raise the iteration counts and the sampling percentage for clinical volumes.

    Attributes:
        histogram_bins: Mattes mutual-information histogram bins (50, as ITK's
            examples use).
        sampling_percentage: fraction of fixed-image voxels sampled at random per
            metric evaluation, in ``(0, 1]``. The B-spline stage's time grows with
            it (0.05 is ~1 s for 64 x 64 x 8 voxels, 0.2 is ~6 s).
        affine_iterations: gradient-descent iterations per resolution level of the
            affine stage.
        bspline_mesh_size: B-spline control-grid cells per image dimension.
        bspline_iterations: L-BFGS-B iterations per level of the B-spline stage.
        shrink_factors: downsampling per resolution level, coarsest first.
        smoothing_sigmas_voxels: Gaussian smoothing per level, in voxels (same count
            as ``shrink_factors``).
        initialization: how the affine transform is initialised.
        seed: seed of the random metric sampling, ``>= 1`` (SimpleITK reads 0 as
            "seed from the wall clock", which would make runs irreproducible).
    """

    histogram_bins: int = 50
    sampling_percentage: float = 0.05
    affine_iterations: int = 100
    bspline_mesh_size: int = 4
    bspline_iterations: int = 10
    shrink_factors: tuple[int, ...] = (2, 1)
    smoothing_sigmas_voxels: tuple[float, ...] = (1.0, 0.0)
    initialization: Initialization = Initialization.GEOMETRY
    seed: int = 1

    def __post_init__(self) -> None:
        """Check every value; messages name the field."""
        if self.histogram_bins < 2:
            raise ValueError(f"histogram_bins must be >= 2, got {self.histogram_bins}")
        if not 0.0 < self.sampling_percentage <= 1.0:
            raise ValueError(
                f"sampling_percentage must be in (0, 1], got {self.sampling_percentage}"
            )
        for name in ("affine_iterations", "bspline_iterations", "bspline_mesh_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.shrink_factors or any(f < 1 for f in self.shrink_factors):
            raise ValueError(
                f"shrink_factors must be >= 1 each, got {self.shrink_factors}"
            )
        if len(self.smoothing_sigmas_voxels) != len(self.shrink_factors) or any(
            sigma < 0 for sigma in self.smoothing_sigmas_voxels
        ):
            raise ValueError(
                "smoothing_sigmas_voxels must be >= 0, one per shrink factor, got "
                f"{self.smoothing_sigmas_voxels} for {self.shrink_factors}"
            )
        if self.seed < 1:
            raise ValueError(f"seed must be >= 1, got {self.seed}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Atlas:
    """A labelled atlas, read: its image and label share one geometry."""

    case_id: str
    image: Volume
    label: Volume


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AtlasLabel:
    """One noisy label of a target image, transferred from one atlas.

    Attributes:
        atlas_id: the atlas's case id.
        label: ``(Z, Y, X)`` int64 classes on the target image's grid.
        metric: final Mattes MI of the B-spline stage (lower, i.e. more negative,
            is better aligned).
        seconds: wall time of the registration and resampling.
    """

    atlas_id: str
    label: npt.NDArray[np.int64]
    metric: float
    seconds: float


def index_atlases(site_dir: Path) -> tuple[CaseRecord, ...]:
    """Find the labelled atlases of a site without reading pixel data.

    Args:
        site_dir: a site folder; atlases live in ``atlases/imagesTr`` (named
            ``<case>_0000.*``) and ``atlases/labelsTr`` (``<case>.*``).

    Returns:
        The atlases sorted by case id; empty when the site has no ``atlases`` folder.

    Raises:
        SiteDataError: ``atlases`` lacks ``imagesTr``, an atlas image has no label, a
            label has no image, or a name breaks the nnU-Net rules; names the file.
    """
    folder = Path(site_dir) / ATLAS_FOLDER
    if not folder.is_dir():
        return ()
    if not (folder / "imagesTr").is_dir():
        raise SiteDataError(
            f"{folder / 'imagesTr'}: missing; atlases need imagesTr and labelsTr"
        )
    images = _scan_images(folder / "imagesTr")
    labels = _scan_labels(folder / "labelsTr", images)
    unlabelled = [
        images[case_id] for case_id in sorted(images) if case_id not in labels
    ]
    if unlabelled:
        raise SiteDataError(
            f"{unlabelled[0]}: atlas image has no label in {folder / 'labelsTr'}"
            + (f" ({len(unlabelled) - 1} more)" if len(unlabelled) > 1 else "")
        )
    return tuple(
        CaseRecord(
            case_id=case_id,
            image_path=images[case_id],
            label_path=labels[case_id],
            split=CaseSplit.TRAIN,
        )
        for case_id in sorted(images)
    )


def read_atlas(case: CaseRecord, *, num_classes: int) -> Atlas:
    """Read an atlas found by :func:`index_atlases`, keeping its geometry.

    Raises:
        SiteDataError: a file is unreadable, the case has no label, the geometries
            differ, or the label values are not ``0..num_classes - 1``.
    """
    if case.label_path is None:
        raise SiteDataError(f"{case.image_path}: atlas image has no label")
    image = _read_checked(case.image_path, "image")
    label = _read_checked(case.label_path, "label")
    if not image.same_geometry(label):
        raise SiteDataError(
            f"geometry mismatch between atlas image {case.image_path} and label "
            f"{case.label_path}: {image.geometry_differences(label)}"
        )
    checked = _check_label(case.label_path, label.array, num_classes)
    return Atlas(
        case_id=case.case_id,
        image=image,
        label=dataclasses.replace(label, array=checked),
    )


def _is_2d(volume: Volume) -> bool:
    return bool(volume.array.shape[0] == 1)


def _to_sitk(volume: Volume, pixel_type: int, *, as_2d: bool, name: str) -> sitk.Image:
    """A SimpleITK image of ``volume``; a one-slice volume becomes 2-D when asked."""
    if volume.array.ndim != 3 or volume.array.size == 0:
        raise RegistrationError(
            f"{name}: expected a non-empty (Z, Y, X) array, got {volume.array.shape}"
        )
    if as_2d and volume.array.shape[0] != 1:
        raise RegistrationError(
            f"{name}: {volume.array.shape[0]} slices, but the target image is 2-D"
        )
    if as_2d:
        image = sitk.GetImageFromArray(volume.array[0])
        image.SetSpacing(volume.spacing_mm[:2])
        image.SetOrigin(volume.origin_mm[:2])
        cosines = volume.direction
        image.SetDirection((cosines[0], cosines[1], cosines[3], cosines[4]))
    else:
        image = sitk.GetImageFromArray(volume.array)
        image.SetSpacing(volume.spacing_mm)
        image.SetOrigin(volume.origin_mm)
        image.SetDirection(volume.direction)
    return sitk.Cast(image, pixel_type)


def _check_intensities(volume: Volume, name: str) -> None:
    values = volume.array
    if not np.all(np.isfinite(values)):
        raise RegistrationError(f"{name}: intensities hold NaN/inf")
    if values.size and float(values.max()) == float(values.min()):
        raise RegistrationError(
            f"{name}: constant intensity {float(values.min()):g}; mutual information "
            "is undefined"
        )


def _build_method(
    settings: RegistrationSettings, sampled_voxels: int
) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    bins = min(settings.histogram_bins, max(2, sampled_voxels // _MIN_SAMPLES_PER_BIN))
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling_percentage, settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_voxels))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def _execute(
    method: sitk.ImageRegistrationMethod,
    fixed: sitk.Image,
    moving: sitk.Image,
    names: tuple[str, str],
    stage: str,
) -> float:
    """Run one stage; return its final metric, or raise naming both images."""
    try:
        method.Execute(fixed, moving)
    except RuntimeError as error:
        detail = _describe_itk_error(str(error))
        raise RegistrationError(
            f"{stage} registration of {names[1]} onto {names[0]} failed: {detail}"
        ) from error
    metric = float(method.GetMetricValue())
    if not math.isfinite(metric):
        raise RegistrationError(
            f"{stage} registration of {names[1]} onto {names[0]} failed: the "
            f"metric is undefined ({metric}); the images may not overlap"
        )
    return metric


def _register(
    fixed_image: Volume,
    moving_image: Volume,
    settings: RegistrationSettings,
    names: tuple[str, str],
) -> tuple[sitk.Transform, float]:
    as_2d = _is_2d(fixed_image)
    if _is_2d(moving_image) != as_2d:
        raise RegistrationError(
            f"cannot register {names[1]} {moving_image.array.shape} onto {names[0]} "
            f"{fixed_image.array.shape}: one is 2-D and the other 3-D"
        )
    _check_intensities(fixed_image, names[0])
    _check_intensities(moving_image, names[1])
    fixed = _to_sitk(fixed_image, sitk.sitkFloat32, as_2d=as_2d, name=names[0])
    moving = _to_sitk(moving_image, sitk.sitkFloat32, as_2d=as_2d, name=names[1])
    dimension = fixed.GetDimension()
    sampled = int(fixed_image.array.size * settings.sampling_percentage)

    initializer = (
        sitk.CenteredTransformInitializerFilter.GEOMETRY
        if settings.initialization is Initialization.GEOMETRY
        else sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    affine = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(dimension), initializer
    )
    affine_method = _build_method(settings, sampled)
    affine_method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=1e-4,
        numberOfIterations=settings.affine_iterations,
        gradientMagnitudeTolerance=1e-8,
    )
    affine_method.SetOptimizerScalesFromPhysicalShift()
    affine_method.SetInitialTransform(affine, inPlace=True)
    _execute(affine_method, fixed, moving, names, "affine")

    bspline = sitk.BSplineTransformInitializer(
        fixed, [settings.bspline_mesh_size] * dimension
    )
    bspline_method = _build_method(settings, sampled)
    bspline_method.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=settings.bspline_iterations,
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=2 * settings.bspline_iterations,
    )
    bspline_method.SetMovingInitialTransform(affine)
    bspline_method.SetInitialTransform(bspline, inPlace=True)
    metric = _execute(bspline_method, fixed, moving, names, "B-spline")
    # ITK applies a composite's transforms last-added first: B-spline, then affine,
    # which is the order the second stage optimised in.
    return sitk.CompositeTransform([affine, bspline]), metric


def register_atlas(
    fixed_image: Volume,
    moving_image: Volume,
    *,
    settings: RegistrationSettings,
    fixed_name: str = "fixed image",
    moving_name: str = "moving image",
) -> sitk.Transform:
    """Register ``moving_image`` onto ``fixed_image``: affine, then B-spline.

    Both are cast to float32 and registered in physical space with Mattes mutual
    information, so their contrasts may differ. One-slice volumes are registered
    as 2-D images.

    Args:
        fixed_image: the target image.
        moving_image: the atlas image.
        settings: metric, optimiser and pyramid settings.
        fixed_name: how errors name the fixed image (a path or case id).
        moving_name: how errors name the moving image.

    Returns:
        A composite transform mapping fixed (target) physical points to moving
        (atlas) points, as :func:`transfer_label` expects.

    Raises:
        RegistrationError: an image is empty, constant or non-finite, one is 2-D and
            the other 3-D, the optimiser fails or the metric is undefined (for
            example no overlap); the message names both images.
    """
    transform, _ = _register(
        fixed_image, moving_image, settings, (fixed_name, moving_name)
    )
    return transform


def transfer_label(
    atlas_label: Volume, transform: sitk.Transform, reference: Volume
) -> Volume:
    """Resample an atlas label onto the target grid (nearest neighbour, 0 outside).

    Args:
        atlas_label: integer classes on the atlas image's grid.
        transform: from :func:`register_atlas` (target points to atlas points).
        reference: the target image; only its grid is used.

    Returns:
        The label as int64 ``(Z, Y, X)`` with ``reference``'s shape, spacing, origin
        and direction.

    Raises:
        RegistrationError: the label's and the transform's dimensions differ.
    """
    as_2d = _is_2d(reference)
    label = _to_sitk(atlas_label, sitk.sitkInt32, as_2d=as_2d, name="atlas label")
    grid = _to_sitk(reference, sitk.sitkUInt8, as_2d=as_2d, name="reference")
    if transform.GetDimension() != grid.GetDimension():
        raise RegistrationError(
            f"a {transform.GetDimension()}-D transform cannot map a "
            f"{grid.GetDimension()}-D label"
        )
    resampled = sitk.Resample(
        label, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32
    )
    array = sitk.GetArrayFromImage(resampled).astype(np.int64)
    return dataclasses.replace(reference, array=array.reshape(reference.array.shape))


def transfer_atlas_labels(
    target_image: Volume,
    atlases: Sequence[Atlas],
    *,
    settings: RegistrationSettings,
    target_name: str = "target image",
    progress: Callable[[int, int, str], None] | None = None,
) -> list[AtlasLabel]:
    """Register every atlas onto a target image and transfer its label.

    Args:
        target_image: the target image.
        atlases: the atlases, read with :func:`read_atlas`.
        settings: registration settings, shared by all atlases.
        target_name: how errors name the target image.
        progress: called as ``progress(done, total, atlas_id)`` after each atlas.

    Returns:
        One noisy label per atlas, in the atlases' order.

    Raises:
        RegistrationError: an atlas could not be registered; names it and the target.
    """
    results = []
    for done, atlas in enumerate(atlases, start=1):
        started = time.perf_counter()
        transform, metric = _register(
            target_image, atlas.image, settings, (target_name, f"atlas {atlas.case_id}")
        )
        label = transfer_label(atlas.label, transform, target_image)
        results.append(
            AtlasLabel(
                atlas_id=atlas.case_id,
                label=label.array.astype(np.int64),
                metric=metric,
                seconds=time.perf_counter() - started,
            )
        )
        if progress is not None:
            progress(done, len(atlases), atlas.case_id)
    return results
