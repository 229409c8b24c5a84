"""Image I/O. The only module that imports SimpleITK.

Reads and writes volumes in any format SimpleITK knows by file name (NIfTI ``.nii``/
``.nii.gz``, NRRD, MHA/MHD) and DICOM series given as a folder. Arrays are returned in
SimpleITK's index order ``(Z, Y, X)`` (2-D images as ``(1, Y, X)``) with the geometry
kept beside them, so a label can be checked against its image.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813 - the library's own spelling

VOLUME_SUFFIXES: Final = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

# Geometry agreement tolerance between an image and its label (mm and cosines).
GEOMETRY_TOLERANCE: Final = 1e-3


class VolumeReadError(ValueError):
    """A file or DICOM folder could not be read as an image; names the path."""


@dataclasses.dataclass(frozen=True, slots=True)
class Volume:
    """A 3-D array with its physical geometry.

    Attributes:
        array: ``(Z, Y, X)`` voxel values; 2-D images have ``Z == 1``.
        spacing_mm: voxel size along ``(x, y, z)``, as SimpleITK orders it.
        origin_mm: physical position of voxel ``(0, 0, 0)`` along ``(x, y, z)``.
        direction: 9 direction cosines, row-major, as SimpleITK returns them.
    """

    array: npt.NDArray[np.generic]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: tuple[float, ...]

    def same_geometry(self, other: Volume) -> bool:
        """Return whether ``other`` has the same shape, spacing, origin, direction."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=GEOMETRY_TOLERANCE)
            and np.allclose(self.origin_mm, other.origin_mm, atol=GEOMETRY_TOLERANCE)
            and np.allclose(self.direction, other.direction, atol=GEOMETRY_TOLERANCE)
        )

    def describe_geometry(self) -> str:
        """Return a one-line description used in geometry-mismatch errors."""
        spacing = ", ".join(f"{value:g}" for value in self.spacing_mm)
        origin = ", ".join(f"{value:g}" for value in self.origin_mm)
        return (
            f"shape {self.array.shape} (z, y, x), spacing ({spacing}) mm, "
            f"origin ({origin}) mm"
        )


def is_volume_path(path: Path) -> bool:
    """Return whether ``path`` is a volume: a known suffix or a DICOM folder."""
    if path.is_dir():
        return any(child.suffix.lower() == ".dcm" for child in path.iterdir())
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def _read_nifti_stored(path: Path) -> npt.NDArray[np.floating] | None:
    """Check a NIfTI file is complete; return its float voxels exactly as stored.

    ITK's NIfTI reader zero-fills a short read and replaces NaN/inf with 0, both
    without any error, which would hide exactly the damage SiteBridge must report.

    Returns:
        The stored voxels, flat in file order, for float data; ``None`` otherwise.

    Raises:
        VolumeReadError: the file holds fewer bytes than its header declares.
    """
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            content = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise VolumeReadError(
            f"{path}: unreadable image (truncated or corrupt: {error})"
        ) from error
    for order in "<>":
        if len(content) >= 348 and struct.unpack(f"{order}i", content[:4])[0] == 348:
            datatype, bitpix = struct.unpack(f"{order}2h", content[70:74])
            dims = struct.unpack(f"{order}8h", content[40:56])
            offset = int(struct.unpack(f"{order}f", content[108:112])[0])
            break
        if len(content) >= 540 and struct.unpack(f"{order}i", content[:4])[0] == 540:
            datatype, bitpix = struct.unpack(f"{order}2h", content[12:16])
            dims = struct.unpack(f"{order}8q", content[16:80])
            offset = struct.unpack(f"{order}q", content[168:176])[0]
            break
    else:
        return None  # not a header layout we know; ITK accepted it, so trust ITK
    if not 1 <= dims[0] <= 7:
        return None
    count = math.prod(dims[1 : dims[0] + 1])
    expected = offset + (count * bitpix + 7) // 8
    if len(content) < expected:
        raise VolumeReadError(
            f"{path}: unreadable image (truncated: {len(content)} of {expected} bytes)"
        )
    float_types = {16: "f4", 64: "f8"}  # NIfTI DT_FLOAT32, DT_FLOAT64
    if datatype not in float_types:
        return None
    return np.frombuffer(
        content, dtype=f"{order}{float_types[datatype]}", count=count, offset=offset
    )


def _restore_non_finite(
    array: npt.NDArray[np.generic], stored: npt.NDArray[np.floating] | None
) -> npt.NDArray[np.generic]:
    """Put back the NaN/inf voxels that ITK's NIfTI reader replaced with 0."""
    if stored is None or stored.size != array.size or array.dtype.kind != "f":
        return array
    non_finite = ~np.isfinite(stored)
    if not non_finite.any():
        return array
    # NIfTI stores x fastest, which is the C order of the (Z, Y, X) array.
    return np.where(
        non_finite.reshape(array.shape),
        stored.reshape(array.shape).astype(array.dtype),
        array,
    )


def _to_3d(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 3:
        return image
    if image.GetDimension() == 2:
        return sitk.JoinSeries([image])
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        return image[:, :, :, 0]
    raise ValueError(f"{image.GetDimension()}-D images are not supported")


def read_volume(path: Path) -> Volume:
    """Read a volume from a file, or a DICOM series from a folder.

    Args:
        path: an image file, or a folder holding one DICOM series.

    Returns:
        The volume, with 2-D images promoted to one slice.

    Raises:
        VolumeReadError: the path is missing or cannot be read; the message names it.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: file not found")
    stored = None
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesFileNames(str(path))
            if not series:
                raise VolumeReadError(f"{path}: folder holds no DICOM series")
            reader.SetFileNames(series)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
            stored = _read_nifti_stored(path)
        image = _to_3d(image)
    except VolumeReadError:
        raise
    except (RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise VolumeReadError(f"{path}: unreadable image ({first_line})") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per "
            "voxel; SiteBridge reads single-channel images (one file per channel)"
        )
    return Volume(
        array=_restore_non_finite(sitk.GetArrayFromImage(image), stored),
        spacing_mm=tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
        origin_mm=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in image.GetDirection()),
    )


def write_volume(volume: Volume, path: Path) -> None:
    """Write ``volume`` to ``path`` (format from the suffix), creating parent folders.

    The file is written under a temporary name and renamed, so a reader never sees a
    half-written image.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing_mm)
    image.SetOrigin(volume.origin_mm)
    image.SetDirection(volume.direction)
    suffix = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), "")
    temporary = path.with_name(
        f".{path.name[: len(path.name) - len(suffix)]}.tmp{suffix}"
    )
    sitk.WriteImage(image, str(temporary), useCompression=True)
    temporary.replace(path)


def write_dicom_series(volume: Volume, folder: Path) -> None:
    """Write ``volume`` as a DICOM series (one file per slice) into ``folder``.

    Used by tests and by users converting data; intensities are stored as int16.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume.array.astype(np.int16))
    image.SetSpacing(volume.spacing_mm)
    image.SetOrigin(volume.origin_mm)
    image.SetDirection(volume.direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    for index in range(image.GetDepth()):
        slice_image = image[:, :, index]
        slice_image.SetMetaData("0020|000e", series_uid)
        slice_image.SetMetaData("0020|0013", str(index + 1))
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        slice_image.SetMetaData("0020|0032", "\\".join(f"{v:f}" for v in position))
        slice_image.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(folder / f"slice_{index:04d}.dcm"))
        writer.Execute(slice_image)
