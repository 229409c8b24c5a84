"""Site data: index a site folder, validate it, and cut its volumes into 2-D slices.

Owns the nnU-Net/MSD site layout of docs/architecture.md#site-folders
(``imagesTr``/``labelsTr``, ``imagesTs``/``labelsTs``, optional ``dataset.json``), the
checks that turn bad input into a :class:`SiteDataError` naming the file and the
problem, and the :class:`SliceSet` of network inputs. Reads images only through
:mod:`core.data.io`; never imports SimpleITK, flwr, clients or server.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as functional

from core.config import DataConfig, IntensityNormalisation, Resample, SliceAxis
from core.data.tiles import (
    CaseTiling,
    classes_on_native_grid,
    cut_tiles,
    plan_tiling,
    resample,
)
from core.data.io import (
    VOLUME_SUFFIXES,
    Volume,
    VolumeReadError,
    is_volume_path,
    read_volume,
)

IMAGE_CHANNEL: Final = "0000"
DEFAULT_CLASS_NAMES: Final = ("background", "foreground")
FEDERATION_FILE: Final = "federation.toml"

_CHANNEL_PATTERN: Final = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# Index of the (row, col) in-plane axes in SimpleITK's (x, y, z) spacing, per cut axis.
# Per slice axis: (through-plane, row, col) indices into SimpleITK's (x, y, z) spacing.
_SLICE_SPACING_AXES: Final = {
    SliceAxis.Z: (2, 1, 0),
    SliceAxis.Y: (1, 2, 0),
    SliceAxis.X: (0, 2, 1),
}
_ScalarT = TypeVar("_ScalarT", bound=np.generic)


class CaseSplit(StrEnum):
    """Which part of a site a case comes from."""

    TRAIN = "train"
    EVALUATION = "evaluation"


class SiteDataError(ValueError):
    """Bad site input; the message names the offending file or folder and problem."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CaseRecord:
    """One case of a site, located but not read.

    Attributes:
        case_id: the file name without channel suffix and extension.
        image_path: the channel-0 image file, or DICOM series folder.
        label_path: the label file or folder; ``None`` for unlabelled cases.
        split: training (``imagesTr``) or evaluation (``imagesTs``).
    """

    case_id: str
    image_path: Path
    label_path: Path | None
    split: CaseSplit


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteIndex:
    """The cases of one site folder and its ``dataset.json`` metadata."""

    name: str
    root: Path
    modality: str
    class_names: tuple[str, ...]
    labelled: tuple[CaseRecord, ...]
    unlabelled: tuple[CaseRecord, ...]
    evaluation: tuple[CaseRecord, ...]
    # Every imagesTs image, labelled or not (``evaluation`` holds the labelled ones).
    evaluation_images: tuple[CaseRecord, ...] = ()

    @property
    def training_images(self) -> tuple[CaseRecord, ...]:
        """Every training image, labelled or not, in case-id order.

        What a label-free computation (LFTM, adaptation, consensus, the profile's
        image term) reads: the same cases in the same order whether or not the site
        holds their labels, so the site's labels cannot change its result.
        """
        return tuple(
            sorted(self.labelled + self.unlabelled, key=lambda case: case.case_id)
        )

    @property
    def num_cases(self) -> int:
        """Return the number of labelled, unlabelled and evaluation cases."""
        return len(self.labelled) + len(self.unlabelled) + len(self.evaluation)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LoadedCase:
    """A case read from disk and checked.

    Attributes:
        case_id: as in the :class:`CaseRecord`.
        image: ``(Z, Y, X)`` intensities, all finite.
        label: ``(Z, Y, X)`` classes in ``0..num_classes - 1``, or ``None``.
        spacing_mm: voxel size along ``(x, y, z)``.
    """

    case_id: str
    image: npt.NDArray[np.float32]
    label: npt.NDArray[np.int64] | None
    spacing_mm: tuple[float, float, float]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteSummary:
    """What :func:`validate_site` found in a site whose every case passed the checks.

    Attributes:
        name: the site folder's name.
        modality: from ``dataset.json`` (``"unknown"`` without one).
        class_names: the classes ``dataset.json`` declares, index = label value.
        num_classes: the classes the labels were checked against (the run's).
        labelled: training cases with a label (``imagesTr`` + ``labelsTr``).
        unlabelled: training cases without one.
        evaluation: ``imagesTs`` cases with a ``labelsTs`` label.
        shapes: the distinct image shapes ``(z, y, x)``, sorted.
        spacing_min_mm: the smallest voxel size along ``(x, y, z)`` over all cases.
        spacing_max_mm: the largest voxel size along ``(x, y, z)`` over all cases.
        intensity_min: the lowest image intensity over all cases.
        intensity_max: the highest image intensity over all cases.
        label_voxels: voxels per class over all labels (labelled and evaluation).
        foreground_fraction: mean over labels of the non-background voxel fraction;
            0 without labels.
    """

    name: str
    modality: str
    class_names: tuple[str, ...]
    num_classes: int
    labelled: int
    unlabelled: int
    evaluation: int
    shapes: tuple[tuple[int, int, int], ...]
    spacing_min_mm: tuple[float, float, float]
    spacing_max_mm: tuple[float, float, float]
    intensity_min: float
    intensity_max: float
    label_voxels: tuple[int, ...]
    foreground_fraction: float

    def to_lines(self) -> list[str]:
        """Return a human-readable summary, one line per fact."""
        shapes = ", ".join(
            "x".join(str(size) for size in shape) for shape in self.shapes
        )
        spacing = ", ".join(
            f"{low:g}-{high:g}"
            for low, high in zip(self.spacing_min_mm, self.spacing_max_mm, strict=True)
        )
        classes = ", ".join(
            f"{index} {name}" for index, name in enumerate(self.class_names)
        )
        total = sum(self.label_voxels)
        voxels = ", ".join(
            f"{index}: {count} ({count / total:.2%})" if total else f"{index}: 0"
            for index, count in enumerate(self.label_voxels)
        )
        return [
            f"site {self.name} ({self.modality})",
            f"  cases: {self.labelled} labelled, {self.unlabelled} unlabelled, "
            f"{self.evaluation} evaluation",
            f"  classes (dataset.json): {classes}; labels checked against "
            f"0..{self.num_classes - 1}",
            f"  image shapes (z, y, x): {shapes}",
            f"  spacing (x, y, z) mm: {spacing}",
            f"  intensity range: {self.intensity_min:g} to {self.intensity_max:g}",
            f"  label voxels per class: {voxels or 'no labels'}",
            f"  foreground fraction: {self.foreground_fraction:.2%}",
        ]


def _volume_stem(path: Path) -> str:
    name = path.name
    if path.is_dir():
        return name
    suffix = next(s for s in VOLUME_SUFFIXES if name.lower().endswith(s))
    return name[: len(name) - len(suffix)]


def _scan_images(folder: Path) -> dict[str, Path]:
    """Map case id to its channel-0 image in ``folder`` (empty when it is absent)."""
    images: dict[str, Path] = {}
    if not folder.is_dir():
        return images
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not is_volume_path(path):
            continue
        match = _CHANNEL_PATTERN.match(_volume_stem(path))
        if match is None:
            raise SiteDataError(
                f"{path}: image name lacks a channel suffix; expected <case>_0000"
            )
        if match["channel"] != IMAGE_CHANNEL:
            continue
        if match["case"] in images:
            raise SiteDataError(
                f"{path}: second image for case {match['case']!r} "
                f"(first: {images[match['case']].name})"
            )
        images[match["case"]] = path
    return images


def _scan_labels(folder: Path, images: Mapping[str, Path]) -> dict[str, Path]:
    """Map case id to its label in ``folder``; every label must have an image."""
    labels: dict[str, Path] = {}
    if not folder.is_dir():
        return labels
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not is_volume_path(path):
            continue
        case_id = _volume_stem(path)
        if case_id not in images:
            raise SiteDataError(
                f"{path}: label has no matching image "
                f"{case_id}_{IMAGE_CHANNEL}.* in images{folder.name[len('labels') :]}"
            )
        if case_id in labels:
            raise SiteDataError(f"{path}: second label for case {case_id!r}")
        labels[case_id] = path
    return labels


def _read_metadata(site_dir: Path) -> tuple[str, tuple[str, ...]]:
    """Return (modality, class names) from ``dataset.json``, with defaults."""
    path = site_dir / "dataset.json"
    if not path.is_file():
        return "unknown", DEFAULT_CLASS_NAMES
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SiteDataError(f"{path}: malformed dataset.json ({error})") from error
    if not isinstance(document, dict):
        raise SiteDataError(f"{path}: malformed dataset.json (not a JSON object)")
    modality = document.get("modality", document.get("channel_names", "unknown"))
    if isinstance(modality, dict):
        modality = next(iter(modality.values()), "unknown")
    labels = document.get("labels")
    if labels is None:
        return str(modality), DEFAULT_CLASS_NAMES
    if not isinstance(labels, dict) or not labels:
        raise SiteDataError(
            f"{path}: malformed dataset.json (labels must be a non-empty mapping "
            f'such as {{"0": "background", "1": "organ"}})'
        )
    # MSD writes {"0": "background"}; nnU-Net v2 writes {"background": 0}.
    if all(isinstance(value, int) for value in labels.values()):
        by_index = {value: str(key) for key, value in labels.items()}
    elif all(str(key).isdigit() for key in labels):
        by_index = {int(key): str(value) for key, value in labels.items()}
    else:
        raise SiteDataError(
            f"{path}: malformed dataset.json (label keys must be class numbers)"
        )
    if sorted(by_index) != list(range(len(by_index))):
        raise SiteDataError(
            f"{path}: malformed dataset.json (label classes must be 0..N-1, "
            f"got {sorted(by_index)})"
        )
    return str(modality), tuple(by_index[index] for index in range(len(by_index)))


def index_site(site_dir: Path) -> SiteIndex:
    """Find the cases of a site folder without reading any pixel data.

    Args:
        site_dir: a folder in the layout of docs/architecture.md#site-folders. Only
            channel ``_0000`` images are used; DICOM series are folders of ``.dcm``
            files.

    Returns:
        The cases sorted by case id. ``evaluation`` holds the ``imagesTs`` cases
        with a label, ``evaluation_images`` every ``imagesTs`` case.

    Raises:
        SiteDataError: the folder or its ``imagesTr`` is missing, it holds no images,
            a label has no image, or ``dataset.json`` is malformed.
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        problem = "is not a folder" if site_dir.exists() else "site folder not found"
        raise SiteDataError(f"{site_dir}: {problem}")
    if not (site_dir / "imagesTr").is_dir():
        # Hidden entries (the default state folder .sitebridge) are not site data.
        if not any(not child.name.startswith(".") for child in site_dir.iterdir()):
            raise SiteDataError(
                f"{site_dir}: empty site folder; a site needs "
                f"imagesTr/<case>_{IMAGE_CHANNEL} images"
            )
        raise SiteDataError(f"{site_dir / 'imagesTr'}: missing; a site needs imagesTr")
    modality, class_names = _read_metadata(site_dir)
    train_images = _scan_images(site_dir / "imagesTr")
    train_labels = _scan_labels(site_dir / "labelsTr", train_images)
    test_images = _scan_images(site_dir / "imagesTs")
    test_labels = _scan_labels(site_dir / "labelsTs", test_images)
    if not train_images and not test_labels:
        raise SiteDataError(
            f"{site_dir / 'imagesTr'}: empty site, no cases in imagesTr (no "
            f"<case>_{IMAGE_CHANNEL} images)"
        )

    def records(
        images: Mapping[str, Path],
        labels: Mapping[str, Path],
        split: CaseSplit,
        *,
        labelled: bool,
    ) -> tuple[CaseRecord, ...]:
        return tuple(
            CaseRecord(
                case_id=case_id,
                image_path=images[case_id],
                label_path=labels.get(case_id),
                split=split,
            )
            for case_id in sorted(images)
            if (case_id in labels) == labelled
        )

    return SiteIndex(
        name=site_dir.name,
        root=site_dir,
        modality=modality,
        class_names=class_names,
        labelled=records(train_images, train_labels, CaseSplit.TRAIN, labelled=True),
        unlabelled=records(train_images, train_labels, CaseSplit.TRAIN, labelled=False),
        evaluation=records(
            test_images, test_labels, CaseSplit.EVALUATION, labelled=True
        ),
        evaluation_images=tuple(
            CaseRecord(
                case_id=case_id,
                image_path=test_images[case_id],
                label_path=test_labels.get(case_id),
                split=CaseSplit.EVALUATION,
            )
            for case_id in sorted(test_images)
        ),
    )


def _read_checked(path: Path, role: str) -> Volume:
    try:
        volume = read_volume(path)
    except VolumeReadError as error:
        raise SiteDataError(str(error)) from error
    if volume.array.size == 0:
        raise SiteDataError(f"{path}: {role} has zero voxels {volume.array.shape}")
    return volume


def _check_label(
    path: Path, array: npt.NDArray[np.generic], num_classes: int
) -> npt.NDArray[np.int64]:
    if not np.issubdtype(array.dtype, np.integer):
        values = array.astype(np.float64)
        fractional = values[~np.isfinite(values) | (values != np.round(values))]
        if fractional.size:
            found = np.unique(fractional)[:5].tolist()
            raise SiteDataError(
                f"{path}: non-integer label values (found {found}); labels must be "
                f"the classes 0..{num_classes - 1}"
            )
    label = array.astype(np.int64)
    outside = label[(label < 0) | (label >= num_classes)]
    if outside.size:
        raise SiteDataError(
            f"{path}: labels outside the declared classes 0..{num_classes - 1}: "
            f"found {np.unique(outside)[:10].tolist()}"
        )
    return label


def read_case(case: CaseRecord, *, num_classes: int) -> LoadedCase:
    """Read a case's image and label and check them.

    Args:
        case: the case to read; its label is read when ``label_path`` is set.
        num_classes: labels must lie in ``0..num_classes - 1``.

    Returns:
        The image as float32 and the label as int64, both ``(Z, Y, X)``.

    Raises:
        SiteDataError: a file is unreadable or empty, the image holds NaN/inf, the
            label's geometry differs from the image's, or label values are
            non-integer or outside the declared classes; the message names the file.
    """
    image_volume = _read_checked(case.image_path, "image")
    image = image_volume.array.astype(np.float32)
    non_finite = int(np.count_nonzero(~np.isfinite(image)))
    if non_finite:
        raise SiteDataError(
            f"{case.image_path}: image contains {non_finite} NaN/inf voxels "
            f"(of {image.size})"
        )
    label = None
    if case.label_path is not None:
        label_volume = _read_checked(case.label_path, "label")
        differences = image_volume.geometry_differences(label_volume)
        if differences:
            described = "; ".join(
                f"image {name} {mine} != label {name} {theirs}"
                for name, mine, theirs in differences
            )
            raise SiteDataError(
                f"geometry mismatch between image {case.image_path} and label "
                f"{case.label_path}: {described}"
            )
        label = _check_label(case.label_path, label_volume.array, num_classes)
    return LoadedCase(
        case_id=case.case_id,
        image=image,
        label=label,
        spacing_mm=image_volume.spacing_mm,
    )


def validate_site(index: SiteIndex, *, num_classes: int) -> SiteSummary:
    """Read and check every case of a site (all splits), one at a time.

    The same :func:`read_case` checks the handlers apply to the cases they use, here
    applied to every case (``sitebridge site check``).

    Args:
        index: the site, from :func:`index_site`.
        num_classes: labels must lie in ``0..num_classes - 1``.

    Returns:
        Counts, classes, shapes, spacing and intensity ranges, label voxels per class
        and mean foreground fraction of the labels.

    Raises:
        SiteDataError: the site has no cases, or the first bad case, as
            :func:`read_case` reports it.
    """
    if index.num_cases == 0:
        raise SiteDataError(f"{index.root}: empty site, no cases to validate")
    shapes: set[tuple[int, int, int]] = set()
    spacings: list[tuple[float, float, float]] = []
    intensities: list[tuple[float, float]] = []
    label_voxels = np.zeros(num_classes, dtype=np.int64)
    fractions: list[float] = []
    for case in (*index.labelled, *index.unlabelled, *index.evaluation):
        loaded = read_case(case, num_classes=num_classes)
        depth, height, width = loaded.image.shape
        shapes.add((depth, height, width))
        spacings.append(loaded.spacing_mm)
        intensities.append((float(loaded.image.min()), float(loaded.image.max())))
        if loaded.label is not None:
            label_voxels += np.bincount(loaded.label.ravel(), minlength=num_classes)
            fractions.append(float(np.count_nonzero(loaded.label)) / loaded.label.size)
    spacing = np.asarray(spacings, dtype=np.float64)
    low, high = spacing.min(axis=0).tolist(), spacing.max(axis=0).tolist()
    return SiteSummary(
        name=index.name,
        modality=index.modality,
        class_names=index.class_names,
        num_classes=num_classes,
        labelled=len(index.labelled),
        unlabelled=len(index.unlabelled),
        evaluation=len(index.evaluation),
        shapes=tuple(sorted(shapes)),
        spacing_min_mm=(low[0], low[1], low[2]),
        spacing_max_mm=(high[0], high[1], high[2]),
        intensity_min=min(low for low, _ in intensities),
        intensity_max=max(high for _, high in intensities),
        label_voxels=tuple(int(count) for count in label_voxels) if fractions else (),
        foreground_fraction=float(np.mean(fractions)) if fractions else 0.0,
    )


def normalise_intensity(
    image: npt.NDArray[np.float32], *, ct_window: Sequence[float] = ()
) -> npt.NDArray[np.float32]:
    """Z-score a whole volume, or apply a CT window when one is given.

    Without ``ct_window``: subtract the volume's mean, divide by its std (if not ~0).
    With ``(clip low, clip high, mean, sd)``: clip to the window, subtract its mean,
    divide by its sd, the same for every volume (nnU-Net's CT normalisation, so an
    intensity in HU means the same input everywhere).

    Example:
        >>> normalise_intensity(np.array([1.0, 2.0, 3.0], dtype=np.float32)).round(3)
        array([-1.225,  0.   ,  1.225], dtype=float32)
        >>> hu = np.array([-1000.0, 40.0, 90.0], dtype=np.float32)
        >>> normalise_intensity(hu, ct_window=(-100.0, 200.0, 40.0, 50.0))
        array([-2.8,  0. ,  1. ], dtype=float32)
    """
    if ct_window:
        low, high, mean, sd = ct_window
        clipped = np.clip(image.astype(np.float64), low, high)
        return ((clipped - mean) / sd).astype(np.float32)
    values = image.astype(np.float64)
    centred: npt.NDArray[np.float64] = values - float(values.mean())
    std = float(values.std())
    scaled = centred / std if std >= 1e-6 else centred
    return scaled.astype(np.float32)


def cut_slices(
    volume: npt.NDArray[_ScalarT], *, axis: SliceAxis
) -> npt.NDArray[_ScalarT]:
    """Return ``volume`` ``(Z, Y, X)`` as a stack of 2-D slices ``(N, H, W)`` (a view).

    ``z`` gives ``(Z, Y, X)``, ``y`` gives ``(Y, Z, X)`` and ``x`` gives ``(X, Z, Y)``.

    Example:
        >>> cut_slices(np.zeros((2, 3, 4)), axis=SliceAxis.X).shape
        (4, 2, 3)
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {volume.shape}")
    order = {SliceAxis.Z: (0, 1, 2), SliceAxis.Y: (1, 0, 2), SliceAxis.X: (2, 0, 1)}
    return volume.transpose(order[axis])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SliceSet:
    """2-D network inputs cut from a list of cases.

    Attributes:
        images: ``(N, 1, S, S)`` float32, normalised per ``data.normalisation``
            (z-scored per volume, or a CT window), resized bilinearly.
        labels: ``(N, S, S)`` int64 (nearest resize), or ``None`` without labels.
        case_ids: one per case, in order.
        case_of_slice: ``(N,)`` int64 index into ``case_ids``.
        spacing_mm: per case, voxel size ``(slice, row, col)`` in mm after resizing
            (the through-plane spacing is the original one), for HD95.
        tilings: with ``data.resample = "spacing"``, per case how its slices were
            resampled and cut into tiles (its rows are tiles, not whole slices;
            :mod:`core.data.tiles`); None when every row is a whole slice.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    case_ids: tuple[str, ...]
    case_of_slice: torch.Tensor
    spacing_mm: tuple[tuple[float, float, float], ...]
    tilings: tuple[CaseTiling, ...] | None = None

    def __post_init__(self) -> None:
        count = self.images.shape[0]
        if self.case_of_slice.shape != (count,) or (
            self.labels is not None and self.labels.shape[0] != count
        ):
            raise ValueError("images, labels and case_of_slice must have N rows each")
        if len(self.spacing_mm) != len(self.case_ids):
            raise ValueError("spacing_mm needs one entry per case")
        if self.tilings is not None and len(self.tilings) != len(self.case_ids):
            raise ValueError("tilings needs one entry per case")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset_cases(self, case_indices: Sequence[int]) -> SliceSet:
        """Return the slices of the given cases, in that order, re-indexed from 0."""
        if len(set(case_indices)) != len(case_indices):
            raise ValueError(f"case indices repeat: {list(case_indices)}")
        for index in case_indices:
            if not 0 <= index < len(self.case_ids):
                raise IndexError(
                    f"case index {index} not in 0..{len(self.case_ids) - 1}"
                )
        rows = [
            torch.nonzero(self.case_of_slice == index).flatten()
            for index in case_indices
        ]
        keep = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        return SliceSet(
            images=self.images[keep],
            labels=None if self.labels is None else self.labels[keep],
            case_ids=tuple(self.case_ids[index] for index in case_indices),
            case_of_slice=torch.cat(
                [
                    torch.full((len(row),), new, dtype=torch.int64)
                    for new, row in enumerate(rows)
                ]
            )
            if rows
            else keep,
            spacing_mm=tuple(self.spacing_mm[index] for index in case_indices),
            tilings=None
            if self.tilings is None
            else tuple(self.tilings[index] for index in case_indices),
        )


def _middle(count: int, keep: int) -> slice:
    if keep <= 0 or keep >= count:
        return slice(0, count)
    start = (count - keep) // 2
    return slice(start, start + keep)


def _in_plane_spacing(
    spacing_mm: tuple[float, float, float], axis: SliceAxis
) -> tuple[float, float, float]:
    """``(slice, row, col)`` voxel size of slices cut along ``axis``."""
    slice_axis, row_axis, col_axis = _SLICE_SPACING_AXES[axis]
    return spacing_mm[slice_axis], spacing_mm[row_axis], spacing_mm[col_axis]


def case_tiling(
    shape: tuple[int, ...], spacing_mm: tuple[float, float, float], *, data: DataConfig
) -> CaseTiling:
    """How a ``(Z, Y, X)`` volume's kept slices are tiled (``resample = "spacing"``).

    Raises:
        ValueError: no target spacing (``data.spacing-mm`` 0 and no plan applied), or
            one that would upsample a slice beyond
            :data:`core.data.tiles.MAX_UPSAMPLING`.
    """
    if data.spacing_mm <= 0:
        raise ValueError(
            "data.resample is 'spacing' but data.spacing-mm is 0 and no plan gave a "
            "target spacing: run with plan.enabled = true, or set data.spacing-mm"
        )
    stack_shape = cut_slices(np.empty(shape, dtype=np.bool_), axis=data.slice_axis).shape
    kept = len(range(*_middle(stack_shape[0], data.max_slices_per_case).indices(stack_shape[0])))
    _, row_mm, col_mm = _in_plane_spacing(spacing_mm, data.slice_axis)
    return plan_tiling(
        kept,
        (stack_shape[1], stack_shape[2]),
        (row_mm, col_mm),
        target_mm=data.spacing_mm,
        size=data.image_size,
    )


def label_slices(
    label: npt.NDArray[np.integer],
    *,
    data: DataConfig,
    spacing_mm: tuple[float, float, float] | None = None,
) -> torch.Tensor:
    """Cut a ``(Z, Y, X)`` label volume into ``(N, S, S)`` int64 slices (or tiles).

    The same rows, in the same order, as :func:`build_slice_set` cuts from the
    volume's image (the label must lie on the image's grid, whose ``spacing_mm`` the
    ``spacing`` resampling needs).
    """
    stack = cut_slices(label, axis=data.slice_axis)
    classes = stack[_middle(stack.shape[0], data.max_slices_per_case)]
    pixels = torch.from_numpy(np.ascontiguousarray(classes, dtype=np.int64))[:, None]
    if data.resample is Resample.SPACING:
        if spacing_mm is None:
            raise ValueError("resample = 'spacing' needs the label's voxel spacing")
        tiling = case_tiling(label.shape, spacing_mm, data=data)
        resampled = resample(pixels.to(torch.float32), tiling.resampled, labels=True)
        return cut_tiles(resampled, tiling)[:, 0].to(torch.int64)
    # nearest-exact samples pixel centres, matching bilinear's alignment.
    return functional.interpolate(
        pixels.to(torch.float32),
        size=(data.image_size, data.image_size),
        mode="nearest-exact",
    )[:, 0].to(torch.int64)


def label_volume_from_slices(
    slices: torch.Tensor,
    shape: tuple[int, int, int],
    *,
    data: DataConfig,
    tiling: CaseTiling | None = None,
) -> npt.NDArray[np.int64]:
    """Inverse of :func:`label_slices`: put ``(N, S, S)`` rows back on the grid.

    Whole slices are resized (nearest) to the volume's in-plane size; tiles
    (``tiling`` given) are blended back into their slices first
    (:func:`core.data.tiles.classes_on_native_grid`). Each slice goes back to the
    position it was cut from; slices :func:`build_slice_set` did not keep
    (``data.max_slices_per_case``) stay 0.

    Raises:
        ValueError: the row count does not match what the volume gives.

    Example:
        >>> from core.config import load_default_config
        >>> data = load_default_config().data
        >>> label = np.zeros((4, 20, 30), dtype=np.int64); label[1, 5:15, 10:20] = 1
        >>> back = label_volume_from_slices(label_slices(label, data=data),
        ...                                 label.shape, data=data)
        >>> bool((back == label).all())
        True
    """
    volume = np.zeros(shape, dtype=np.int64)
    stack = cut_slices(volume, axis=data.slice_axis)  # a view into ``volume``
    keep = _middle(stack.shape[0], data.max_slices_per_case)
    expected = len(range(*keep.indices(stack.shape[0])))
    rows = expected if tiling is None else expected * len(tiling.starts)
    if slices.shape[0] != rows or (tiling is not None and tiling.num_slices != expected):
        raise ValueError(
            f"a volume of shape {shape} gives {rows} "
            f"{'slices' if tiling is None else 'tiles'} along "
            f"{data.slice_axis.value}, got {slices.shape[0]}"
        )
    if tiling is not None:
        classes = classes_on_native_grid(slices, tiling, num_classes=data.num_classes)
        stack[keep] = classes.numpy()
        return volume
    resized = functional.interpolate(
        slices[:, None].to(torch.float32),
        size=tuple(stack.shape[1:]),
        mode="nearest-exact",
    )[:, 0]
    stack[keep] = resized.to(torch.int64).numpy()
    return volume


def build_slice_set(
    cases: Sequence[CaseRecord], *, data: DataConfig, with_labels: bool
) -> SliceSet:
    """Read cases and cut them into 2-D network inputs along ``data.slice_axis``.

    ``data.resample = "slice"`` resizes each whole slice to ``data.image_size``;
    ``"spacing"`` resamples it to ``data.spacing_mm`` and cuts it into tiles
    (:mod:`core.data.tiles`; the set's ``tilings`` say how, per case).

    Args:
        cases: the cases to load, in order.
        data: image size, slice axis, class count and slices kept per case (the
            ``max_slices_per_case`` slices nearest the middle of the stack; 0 = all)
            and the intensity normalisation: ``ct`` applies ``data.ct_window``;
            ``zscore`` and an ``auto`` the site has not resolved
            (:func:`clients.site.resolve_setup` does, by modality) z-score.
        with_labels: require and load every case's label; ``False`` ignores labels.

    Returns:
        The slices; labels are ``None`` when ``with_labels`` is false.

    Raises:
        SiteDataError: ``cases`` is empty, a label is required but missing, or a
            case fails :func:`read_case`.
        ValueError: ``data.image-size`` is 0 (no plan applied), or the CT scheme
            has no window.
    """
    if not cases:
        raise SiteDataError("no cases to load")
    if data.image_size == 0:
        raise ValueError(
            "data.image-size is 0 (the resolution plan's) but no plan was applied: "
            "run the pipeline with plan.enabled = true, or set data.image-size"
        )
    ct_window = data.ct_window if data.normalisation is IntensityNormalisation.CT else ()
    if data.normalisation is IntensityNormalisation.CT and not ct_window:
        raise ValueError(
            "data.normalisation is 'ct' but data.ct-window is empty and no plan gave "
            "one: set data.ct-window = 'clip-low,clip-high,mean,sd' (HU)"
        )
    size = (data.image_size, data.image_size)
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    owners: list[torch.Tensor] = []
    spacings: list[tuple[float, float, float]] = []
    tilings: list[CaseTiling] = []
    for number, case in enumerate(cases):
        if with_labels and case.label_path is None:
            raise SiteDataError(
                f"{case.image_path}: case {case.case_id!r} has no label, but labels "
                "are required here"
            )
        record = case if with_labels else dataclasses.replace(case, label_path=None)
        loaded = read_case(record, num_classes=data.num_classes)
        normalised = normalise_intensity(loaded.image, ct_window=ct_window)
        stack = cut_slices(normalised, axis=data.slice_axis)
        keep = _middle(stack.shape[0], data.max_slices_per_case)
        pixels = torch.from_numpy(np.ascontiguousarray(stack[keep]))[:, None]
        through_mm, row_mm, col_mm = _in_plane_spacing(
            loaded.spacing_mm, data.slice_axis
        )
        if data.resample is Resample.SPACING:
            tiling = case_tiling(loaded.image.shape, loaded.spacing_mm, data=data)
            tilings.append(tiling)
            rows = cut_tiles(resample(pixels, tiling.resampled, labels=False), tiling)
            spacings.append((through_mm, data.spacing_mm, data.spacing_mm))
        else:
            rows = functional.interpolate(
                pixels, size=size, mode="bilinear", align_corners=False, antialias=False
            )
            spacings.append(
                (
                    through_mm,
                    row_mm * stack.shape[1] / data.image_size,
                    col_mm * stack.shape[2] / data.image_size,
                )
            )
        images.append(rows)
        if loaded.label is not None:
            labels.append(
                label_slices(loaded.label, data=data, spacing_mm=loaded.spacing_mm)
            )
        owners.append(torch.full((rows.shape[0],), number, dtype=torch.int64))
    return SliceSet(
        images=torch.cat(images),
        labels=torch.cat(labels) if with_labels else None,
        case_ids=tuple(case.case_id for case in cases),
        case_of_slice=torch.cat(owners),
        spacing_mm=tuple(spacings),
        tilings=tuple(tilings) if data.resample is Resample.SPACING else None,
    )


def list_site_dirs(federation_dir: Path) -> tuple[Path, ...]:
    """Return the sub-folders of a federation folder that hold an ``imagesTr``, sorted.

    Raises:
        SiteDataError: the folder is missing or holds no site folder.
    """
    federation_dir = Path(federation_dir)
    if not federation_dir.is_dir():
        raise SiteDataError(f"{federation_dir}: federation folder not found")
    sites = tuple(
        sorted(
            path for path in federation_dir.iterdir() if (path / "imagesTr").is_dir()
        )
    )
    if not sites:
        raise SiteDataError(
            f"{federation_dir}: no site folders (sub-folders with imagesTr) found"
        )
    return sites


def read_federation_target(federation_dir: Path) -> str | None:
    """Return ``target`` from ``federation.toml``, or ``None`` if absent or empty.

    Raises:
        SiteDataError: the file is not valid TOML or ``target`` is not a string.
    """
    path = Path(federation_dir) / FEDERATION_FILE
    if not path.is_file():
        return None
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SiteDataError(f"{path}: malformed TOML ({error})") from error
    target = document.get("target")
    if target is None or target == "":
        return None
    if not isinstance(target, str):
        raise SiteDataError(
            f"{path}: target must be a site folder name, got {target!r}"
        )
    return target
