"""Hospital-scale synthetic sites: realistic sizes, anisotropic spacing, MR and CT.

``federation.synthetic-scale = "hospital"`` writes the built-in federation with this
module's volumes instead of the small 10 x 64 x 64 ones. The sites keep their place on
the domain-shift continuum (:func:`core.data.synthetic.build_site_styles`) and the
site layout, but each site now scans like a hospital: its in-plane size, in-plane
spacing and slice thickness are drawn from the federation seed (MR-like: 224-288
pixels of 0.5-0.8 mm, 16-24 slices of 3-3.6 mm; cases vary by a few pixels and slices,
as real scans do), and the last site is CT-like: a 512 x 512 matrix over a 380-460 mm
field of view (0.74-0.9 mm), 2.5-5 mm slices, and intensities in Hounsfield units.

The anatomy is drawn in millimetres in the patient's frame, the same for every site
whatever its spacing: an elliptical body outline (air outside) with subcutaneous fat,
two bone-like discs (femoral heads), a prostate-like organ 40-50 mm across with a thin
fat capsule, two round vessels in front of it and a rectum-like tube behind it. An MR
site renders it in arbitrary positive units (its own intensity scale, the continuum's
organ contrast, weakening and inverting past the middle, bias field, blur and noise);
the CT site in HU (air -1000, fat -100, soft tissue 40, the organ 75, vessels 160,
bone 700), with scanner noise and no bias field. Both are stored as int16, as
scanners store them.

Speed: everything extruded along z (body, fat, bone, vessels, tube) is drawn once as
a 2-D map; smooth fields are drawn on a coarse grid and upsampled; only the organ, the
texture and the noise are 3-D (docs/development.md#the-hospital-scale-federation).
Randomness is explicit, as in :mod:`core.data.synthetic`. Never imports flwr or torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from enum import StrEnum
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from core.config import SyntheticShift
from core.data.io import Volume, write_volume
from core.data.synthetic import (
    SPACING_MM,
    TISSUE_LEVEL,
    TUBE_CONTRAST,
    VESSEL_CONTRAST,
    SiteStyle,
    build_site_styles,
)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

# Bump when the hospital generator's output changes: the cached folder's name gets it
# (``-hospital`` for version 1, ``-hospital<N>`` after), and the small federation's
# name and files are untouched.
HOSPITAL_VERSION: Final = 1

# MR-like sites' geometry, drawn per site (a case varies by a few pixels and slices).
MR_IN_PLANE_MM: Final = (0.5, 0.8)
MR_SLICE_MM: Final = (3.0, 3.6)
MR_IN_PLANE_SIZE: Final = (224, 288)  # a multiple of 8 in this range
MR_SLICES: Final = (16, 24)
# The CT-like site: a 512 matrix over a field of view that holds the whole body.
CT_MATRIX: Final = 512
CT_FIELD_OF_VIEW_MM: Final = (380.0, 460.0)
CT_SLICE_MM: Final = (2.5, 5.0)
CT_COVERAGE_MM: Final = (64.0, 80.0)  # slices x thickness
CASE_SIZE_STEP: Final = 8  # a case's in-plane size is its site's +- one step (MR)
CASE_SLICE_JITTER: Final = 2  # and its slice count its site's +- up to this
MIN_SLICES: Final = 8

# Hounsfield units of the CT-like site's tissues (a contrast-enhanced pelvic CT).
AIR_HU: Final = -1000.0
FAT_HU: Final = -100.0
SOFT_TISSUE_HU: Final = 40.0
ORGAN_HU: Final = 75.0
VESSEL_HU: Final = 160.0
TUBE_HU: Final = 20.0
BONE_HU: Final = 700.0
CT_NOISE_HU: Final = (8.0, 18.0)
CT_CLIP_HU: Final = (-1024.0, 3071.0)
CT_BLUR_MM: Final = (0.4, 0.8)

# MR-like tissue levels, in the small generator's units (TISSUE_LEVEL = soft tissue):
# fat is bright in T1 and T2 weighting alike, bone shows its fatty marrow.
FAT_LEVEL: Final = 0.85
BONE_LEVEL: Final = 0.62
MR_INTENSITY_SCALE: Final = (400.0, 3000.0)  # log-uniform, arbitrary units per level

# Anatomy, in millimetres in the patient's frame (x left-right, y front-back, z up).
BODY_SEMI_AXES_MM: Final = ((150.0, 175.0), (100.0, 125.0))  # (x range, y range)
FAT_THICKNESS_MM: Final = (12.0, 25.0)
ORGAN_SEMI_AXES_MM: Final = ((20.0, 25.0), (16.0, 21.0), (15.0, 21.0))  # x, y, z
ORGAN_CAPSULE_MM: Final = (2.0, 4.0)  # the fat around the organ
PATIENT_OFFSET_MM: Final = (8.0, 8.0, 4.0)  # the anatomy's jitter in the field (x,y,z)

# Stream id of a site's geometry draw (the mild scanners use 1_000_003).
_GEOMETRY_STREAM: Final = 2_000_003


class Modality(StrEnum):
    """How a hospital-scale site renders the anatomy."""

    MR = "MR"
    CT = "CT"


# Tissue classes of the label-free map every case is rendered from.
_AIR, _TISSUE, _FAT, _BONE, _VESSEL, _TUBE, _ORGAN = range(7)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HospitalSite:
    """One hospital-scale site: its place on the continuum and its scanner."""

    style: SiteStyle
    modality: Modality
    spacing_mm: tuple[float, float, float]  # (x, y, z), as SimpleITK orders it
    in_plane_size: int  # pixels along x and y of a typical case
    slices: int  # slices of a typical case
    intensity_scale: float  # MR: units per tissue level; CT: 1 (HU)
    noise_sd: float  # MR: in tissue levels (the style's); CT: HU
    blur_sigma_mm: float

    @property
    def name(self) -> str:
        """The site's folder name."""
        return self.style.name

    def describe(self) -> dict[str, object]:
        """What ``dataset.json`` records of the site's scanner."""
        return {
            "modality": str(self.modality),
            "spacing_mm": [round(value, 4) for value in self.spacing_mm],
            "size": [self.in_plane_size, self.in_plane_size, self.slices],
            "intensity": "HU" if self.modality is Modality.CT else "arbitrary units",
            "intensity_scale": round(self.intensity_scale, 2),
            "noise_sd": round(self.noise_sd, 4),
            "blur_sigma_mm": round(self.blur_sigma_mm, 4),
            "bias_amplitude": (
                0.0
                if self.modality is Modality.CT
                else round(self.style.bias_amplitude, 4)
            ),
        }


def ct_site_index(num_sites: int) -> int:
    """The CT-like site: the last one (never the default target, the first).

    Example:
        >>> ct_site_index(6)
        5
    """
    return num_sites - 1


def build_hospital_sites(
    num_sites: int,
    *,
    shift: SyntheticShift = SyntheticShift.WIDE,
    seed: int = 0,
) -> tuple[HospitalSite, ...]:
    """The sites of a hospital-scale federation, each scanner drawn from ``seed``.

    The continuum places (and, for ``shift`` MILD, the noise, bias and blur) are the
    small federation's; size, spacing and intensity scale are drawn here per site.

    Example:
        >>> sites = build_hospital_sites(3)
        >>> [str(site.modality) for site in sites]
        ['MR', 'MR', 'CT']
        >>> all(site.spacing_mm[2] > 3 * site.spacing_mm[0] for site in sites)
        True
    """
    ct_index = ct_site_index(num_sites)
    sites = []
    for index, style in enumerate(build_site_styles(num_sites, shift=shift, seed=seed)):
        rng = np.random.default_rng([seed, index, _GEOMETRY_STREAM])
        if index == ct_index:
            in_plane = float(rng.uniform(*CT_FIELD_OF_VIEW_MM)) / CT_MATRIX
            thickness = float(rng.uniform(*CT_SLICE_MM))
            slices = round(float(rng.uniform(*CT_COVERAGE_MM)) / thickness)
            sites.append(
                HospitalSite(
                    style=style,
                    modality=Modality.CT,
                    spacing_mm=(in_plane, in_plane, thickness),
                    in_plane_size=CT_MATRIX,
                    slices=max(slices, MIN_SLICES),
                    intensity_scale=1.0,
                    noise_sd=float(rng.uniform(*CT_NOISE_HU)),
                    blur_sigma_mm=float(rng.uniform(*CT_BLUR_MM)),
                )
            )
            continue
        in_plane = float(rng.uniform(*MR_IN_PLANE_MM))
        low, high = (bound // CASE_SIZE_STEP for bound in MR_IN_PLANE_SIZE)
        size = CASE_SIZE_STEP * int(rng.integers(low, high + 1))
        sites.append(
            HospitalSite(
                style=style,
                modality=Modality.MR,
                spacing_mm=(in_plane, in_plane, float(rng.uniform(*MR_SLICE_MM))),
                in_plane_size=size,
                slices=int(rng.integers(MR_SLICES[0], MR_SLICES[1] + 1)),
                intensity_scale=float(np.exp(rng.uniform(*np.log(MR_INTENSITY_SCALE)))),
                noise_sd=style.noise_sd,
                # The small generator's blur, in its pixels of SPACING_MM, as mm.
                blur_sigma_mm=style.blur_sigma_px * SPACING_MM[0],
            )
        )
    return tuple(sites)


@dataclasses.dataclass(frozen=True, slots=True)
class HospitalCase:
    """One hospital-scale case: int16 image and uint8 label, ``(Z, Y, X)``."""

    image: npt.NDArray[np.int16]
    label: npt.NDArray[np.uint8]
    spacing_mm: tuple[float, float, float]  # (x, y, z)

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """Voxel (0, 0, 0)'s position: the volume is centred on the origin."""
        depth, height, width = self.image.shape
        x, y, z = self.spacing_mm
        return (-x * (width - 1) / 2, -y * (height - 1) / 2, -z * (depth - 1) / 2)


def _upsample_linearly(array: FloatArray, axis: int, count: int) -> FloatArray:
    """``array`` stretched to ``count`` samples along ``axis``, ends kept, linearly.

    Several times faster than ``scipy.ndimage.zoom(order=1)`` at these sizes (one
    gather and one blend per axis, in float32).
    """
    size = array.shape[axis]
    if size == count:
        return array
    position = np.linspace(0.0, size - 1.0, count)
    low = np.minimum(position.astype(np.intp), size - 2)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = count
    weight = (position - low).astype(np.float32).reshape(weight_shape)
    below = np.take(array, low, axis=axis)
    above = np.take(array, low + 1, axis=axis)
    blended: FloatArray = below + (above - below) * weight
    return blended


def _smooth_field(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    length_mm: float,
) -> FloatArray:
    """Zero-mean, unit-std random field smooth over about ``length_mm``.

    White noise on a grid of ``length_mm`` cells, smoothed there and upsampled
    linearly: a field of any size costs one interpolation at full resolution.
    """
    coarse = tuple(
        min(count, math.ceil(count * step / length_mm) + 2)
        for count, step in zip(shape, spacing_zyx, strict=True)
    )
    field: FloatArray = ndimage.gaussian_filter(
        rng.standard_normal(coarse, dtype=np.float32), sigma=0.7, mode="wrap"
    )
    for axis, count in enumerate(shape):
        field = _upsample_linearly(field, axis, count)
    field -= field.mean()
    field /= field.std() + 1e-8
    return field


def _ellipse(
    x: FloatArray, y: FloatArray, centre: tuple[float, float], axes: tuple[float, float]
) -> BoolArray:
    inside: BoolArray = ((x - centre[0]) / axes[0]) ** 2 + (
        (y - centre[1]) / axes[1]
    ) ** 2 <= 1.0
    return inside


def _case_shape(site: HospitalSite, rng: np.random.Generator) -> tuple[int, int, int]:
    slices = site.slices + int(rng.integers(-CASE_SLICE_JITTER, CASE_SLICE_JITTER + 1))
    size = site.in_plane_size
    if site.modality is Modality.MR:
        size += CASE_SIZE_STEP * int(rng.integers(-1, 2))
    return (max(slices, MIN_SLICES), size, size)


@dataclasses.dataclass(frozen=True, slots=True)
class Patient:
    """One patient's anatomy in millimetres, whatever scanner it meets.

    Positions are from the centre of the field of view (x left-right, y front-back,
    z along the slices); the whole patient is displaced by ``offset``.
    """

    offset: tuple[float, float, float]
    body_axes: tuple[float, float]
    fat_thickness: float
    organ_centre: tuple[float, float, float]
    organ_axes: tuple[float, float, float]
    harmonics: tuple[float, ...]
    phases: tuple[float, ...]
    capsule: float
    bone_centre: tuple[float, float]  # the right disc; the left one mirrors it
    bone_radius: float
    vessels: tuple[tuple[float, float, float], ...]  # (x, y, radius)
    tube_centre: tuple[float, float]
    tube_axes: tuple[float, float]


def draw_patient(rng: np.random.Generator) -> Patient:
    """Draw one patient (before anything about the scanner is drawn)."""
    offset = tuple(float(rng.uniform(-limit, limit)) for limit in PATIENT_OFFSET_MM)
    body_axes = (
        float(rng.uniform(*BODY_SEMI_AXES_MM[0])),
        float(rng.uniform(*BODY_SEMI_AXES_MM[1])),
    )
    fat = float(rng.uniform(*FAT_THICKNESS_MM))
    organ_centre = (
        float(rng.uniform(-4, 4)),
        float(rng.uniform(5, 15)),
        float(rng.uniform(-3, 3)),
    )
    organ_axes = tuple(float(rng.uniform(*bounds)) for bounds in ORGAN_SEMI_AXES_MM)
    harmonics = tuple(float(value) for value in rng.uniform(0, 0.12, 3))
    phases = tuple(float(value) for value in rng.uniform(0, 6.3, 3))
    capsule = float(rng.uniform(*ORGAN_CAPSULE_MM))
    bone_centre = (float(rng.uniform(85, 100)), float(rng.uniform(0, 15)))
    bone_radius = float(rng.uniform(20, 25))
    vessels = tuple(
        (
            side * float(rng.uniform(40, 55)),
            organ_centre[1] - float(rng.uniform(28, 38)),
            float(rng.uniform(4, 7)),
        )
        for side in (-1.0, 1.0)
    )
    tube_axes = (float(rng.uniform(15, 20)), float(rng.uniform(10, 14)))
    tube_centre = (
        organ_centre[0] + float(rng.uniform(-4, 4)),
        organ_centre[1]
        + organ_axes[1]
        + capsule
        + tube_axes[1]
        + float(rng.uniform(2, 6)),
    )
    return Patient(
        offset=(offset[0], offset[1], offset[2]),
        body_axes=body_axes,
        fat_thickness=fat,
        organ_centre=organ_centre,
        organ_axes=(organ_axes[0], organ_axes[1], organ_axes[2]),
        harmonics=harmonics,
        phases=phases,
        capsule=capsule,
        bone_centre=bone_centre,
        bone_radius=bone_radius,
        vessels=vessels,
        tube_centre=tube_centre,
        tube_axes=tube_axes,
    )


def rasterise(
    patient: Patient, shape: tuple[int, int, int], spacing_mm: tuple[float, ...]
) -> tuple[npt.NDArray[np.int8], BoolArray]:
    """Lay ``patient`` on a voxel grid of ``shape`` ``(Z, Y, X)`` and ``spacing_mm``.

    Returns the tissue class of every voxel and the organ mask (the label).
    """
    depth, height, width = shape
    step_x, step_y, step_z = spacing_mm[0], spacing_mm[1], spacing_mm[2]
    offset = patient.offset
    # Voxel centres in mm from the patient's centre (the field's centre, offset).
    x = ((np.arange(width, dtype=np.float32) - (width - 1) / 2) * step_x - offset[0])[
        None, :
    ]
    y = ((np.arange(height, dtype=np.float32) - (height - 1) / 2) * step_y - offset[1])[
        :, None
    ]
    z = (np.arange(depth, dtype=np.float32) - (depth - 1) / 2) * step_z - offset[2]
    body_axes, fat = patient.body_axes, patient.fat_thickness
    organ_centre, organ_axes = patient.organ_centre, patient.organ_axes
    capsule = patient.capsule

    # Everything but the organ runs along z: one 2-D map.
    plane = np.full((height, width), _AIR, dtype=np.int8)
    plane[_ellipse(x, y, (0.0, 0.0), body_axes)] = _FAT
    inner = (body_axes[0] - fat, body_axes[1] - fat)
    plane[_ellipse(x, y, (0.0, 0.0), inner)] = _TISSUE
    bone_x, bone_y = patient.bone_centre
    for side in (-1.0, 1.0):
        plane[_ellipse(x, y, (side * bone_x, bone_y), (patient.bone_radius,) * 2)] = (
            _BONE
        )
    for vessel_x, vessel_y, radius in patient.vessels:
        plane[_ellipse(x, y, (vessel_x, vessel_y), (radius, radius))] = _VESSEL
    plane[_ellipse(x, y, patient.tube_centre, patient.tube_axes)] = _TUBE

    # The organ: an ellipsoid whose in-plane radius a few angular harmonics modulate,
    # inside a fat capsule; the in-plane part is 2-D, z enters by broadcasting.
    dx = (x - organ_centre[0]) / organ_axes[0]
    dy = (y - organ_centre[1]) / organ_axes[1]
    angle = np.arctan2(dy, dx)
    modulation = 1.0 + sum(
        amplitude * np.cos((order + 2) * angle + phase)
        for order, (amplitude, phase) in enumerate(
            zip(patient.harmonics, patient.phases, strict=True)
        )
    )
    radial = ((dx**2 + dy**2) / modulation**2).astype(np.float32)
    dz2 = (((z - organ_centre[2]) / organ_axes[2]) ** 2)[:, None, None]
    organ: BoolArray = dz2 + radial[None] <= 1.0
    grown = 1.0 + capsule / min(organ_axes)
    in_capsule = dz2 / grown**2 + radial[None] / grown**2 <= 1.0
    classes = np.broadcast_to(plane, shape).copy()
    classes[in_capsule & (classes == _TISSUE)] = _FAT
    classes[organ] = _ORGAN
    return classes, organ


def _levels(site: HospitalSite) -> tuple[FloatArray, FloatArray]:
    """Each tissue class's level and texture strength in the site's units."""
    style = site.style
    if site.modality is Modality.CT:
        level = [AIR_HU, SOFT_TISSUE_HU, FAT_HU, BONE_HU, VESSEL_HU, TUBE_HU, ORGAN_HU]
        texture = [0.0, 6.0, 8.0, 60.0, 5.0, 8.0, 7.0]
    else:
        sign = style.contrast_sign()
        level = [
            0.0,
            TISSUE_LEVEL,
            FAT_LEVEL,
            BONE_LEVEL,
            TISSUE_LEVEL + sign * VESSEL_CONTRAST,
            TISSUE_LEVEL + sign * TUBE_CONTRAST,
            TISSUE_LEVEL + style.organ_contrast,
        ]
        texture = [0.0, 0.04, 0.04, 0.05, 0.03, 0.03, 0.07]
    return np.asarray(level, dtype=np.float32), np.asarray(texture, dtype=np.float32)


def generate_hospital_case(
    site: HospitalSite, rng: np.random.Generator
) -> HospitalCase:
    """Draw one patient and scan it with ``site``'s scanner."""
    patient = draw_patient(rng)
    shape = _case_shape(site, rng)
    classes, organ = rasterise(patient, shape, site.spacing_mm)
    spacing_zyx = (site.spacing_mm[2], site.spacing_mm[1], site.spacing_mm[0])
    levels, strengths = _levels(site)
    texture = _smooth_field(rng, shape, spacing_zyx, length_mm=2.0)
    image = levels[classes] + strengths[classes] * texture
    body = classes != _AIR
    lumpy = _smooth_field(rng, shape, spacing_zyx, length_mm=30.0)
    image += np.where(body, lumpy * (6.0 if site.modality is Modality.CT else 0.04), 0)
    sigma_px = site.blur_sigma_mm / site.spacing_mm[0]
    image = ndimage.gaussian_filter(image, sigma=(0, sigma_px, sigma_px), truncate=3.0)
    noise = rng.standard_normal(shape, dtype=np.float32)
    if site.modality is Modality.CT:
        image += site.noise_sd * noise
        image = np.clip(image, *CT_CLIP_HU)
    else:
        bias = np.exp(
            site.style.bias_amplitude
            * _smooth_field(rng, shape, spacing_zyx, length_mm=120.0)
        )
        # Magnitude images: the noise folds at zero (Rician-like background).
        image = np.abs(image * bias + site.noise_sd * noise) * site.intensity_scale
    return HospitalCase(
        image=np.rint(image).astype(np.int16),
        label=organ.astype(np.uint8),
        spacing_mm=site.spacing_mm,
    )


def write_hospital_case(
    case: HospitalCase,
    site_dir: Path,
    *,
    case_id: str,
    training: bool,
    labelled: bool = True,
) -> None:
    """Write one case's image (and label) NIfTI into the site layout.

    As :func:`core.data.synthetic.write_case` does, with the case's own geometry.
    """
    split = "Tr" if training else "Ts"
    files: list[tuple[npt.NDArray[np.generic], str, str]] = [
        (case.image, f"images{split}", f"{case_id}_0000.nii.gz")
    ]
    if labelled:
        files.append((case.label, f"labels{split}", f"{case_id}.nii.gz"))
    for array, folder, file_name in files:
        write_volume(
            Volume(
                array=array,
                spacing_mm=case.spacing_mm,
                origin_mm=case.origin_mm,
                direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
            ),
            site_dir / folder / file_name,
        )


def write_hospital_site(
    site: HospitalSite,
    site_dir: Path,
    *,
    site_index: int,
    seed: int,
    num_train_cases: int,
    num_labelled: int,
    num_evaluation: int,
) -> None:
    """Write one hospital-scale site, laid out as the small ones are.

    Case ``i``'s generator is seeded from ``(seed, site_index, i)``, as in the small
    federation (the draws differ, so the cases do).
    """
    site_dir.mkdir(parents=True, exist_ok=True)
    for case_index in range(num_train_cases + num_evaluation):
        training = case_index < num_train_cases
        write_hospital_case(
            generate_hospital_case(
                site, np.random.default_rng([seed, site_index, case_index])
            ),
            site_dir,
            case_id=f"{site.name.lower()}_{case_index:03d}",
            training=training,
            labelled=not training or case_index < num_labelled,
        )
    dataset: dict[str, object] = {
        "name": f"synthetic hospital-scale site {site.name}",
        "modality": str(site.modality),
        "labels": {"0": "background", "1": "organ"},
        "shift": site.style.shift,
        "scanner": site.describe(),
    }
    (site_dir / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
