"""Image I/O. The only module that imports SimpleITK.

Reads and writes volumes in any format SimpleITK knows by file name (NIfTI ``.nii``/
``.nii.gz``, NRRD, MHA/MHD) and DICOM series given as a folder. Arrays are returned in
SimpleITK's index order ``(Z, Y, X)`` (2-D images as ``(1, Y, X)``) with the geometry
kept beside them, so a label can be checked against its image. A file that cannot be
read completely (truncated, corrupt, not an image) is a :class:`VolumeReadError`
naming it and saying why, never a silently zero-filled array: ITK fills a short NIfTI
read with zeros and drops a damaged DICOM slice from its series without an error, so
both are checked here. Files are written through :func:`core.storage.write_atomically`.
"""

from __future__ import annotations

import dataclasses
import gzip
import locale
import math
import os
import re
import secrets
import struct
import zlib
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813 - the library's own spelling

from core.storage import write_atomically

VOLUME_SUFFIXES: Final = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

# Geometry agreement tolerance between an image and its label (mm and cosines).
GEOMETRY_TOLERANCE: Final = 1e-3
# What every read failure says, whatever the cause; the detail follows in brackets.
UNREADABLE: Final = "truncated or unreadable image"
# Bytes per element of the MetaImage element types a medical image uses.
_META_ELEMENT_BYTES: Final = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
_META_HEADER_LIMIT: Final = 65_536  # bytes searched for the header's last line
_ITK_ERROR_LINE: Final = re.compile(r"ERROR: (?:\w+\(0x[0-9a-fA-F]+\): )?(?P<text>.+)")


class VolumeReadError(ValueError):
    """A file or DICOM folder could not be read as an image; names the path."""


def _format_values(values: tuple[float, ...] | tuple[int, ...]) -> str:
    return "(" + ", ".join(f"{value:g}" for value in values) + ")"


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

    @property
    def size(self) -> tuple[int, ...]:
        """Voxels along ``(x, y, z)``, as SimpleITK orders them (the array reversed)."""
        return tuple(int(count) for count in reversed(self.array.shape))

    def same_geometry(self, other: Volume) -> bool:
        """Return whether ``other`` has the same shape, spacing, origin, direction."""
        return not self.geometry_differences(other)

    def geometry_differences(self, other: Volume) -> list[tuple[str, str, str]]:
        """Return ``(property, this value, other value)`` for each geometry mismatch.

        Properties are ``size`` (voxels along x, y, z), ``spacing`` (mm), ``origin``
        (mm) and ``direction`` (cosines), compared within ``GEOMETRY_TOLERANCE``.

        Example:
            >>> image = Volume(np.zeros((2, 3, 4)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
            ...                (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
            >>> label = dataclasses.replace(image, array=np.zeros((1, 3, 4)))
            >>> image.geometry_differences(label)
            [('size', '(4, 3, 2)', '(4, 3, 1)')]
        """
        differences = []
        if self.array.shape != other.array.shape:
            differences.append(
                ("size", _format_values(self.size), _format_values(other.size))
            )
        for name, unit, mine, theirs in (
            ("spacing", " mm", self.spacing_mm, other.spacing_mm),
            ("origin", " mm", self.origin_mm, other.origin_mm),
            ("direction", "", self.direction, other.direction),
        ):
            if len(mine) != len(theirs) or not np.allclose(
                mine, theirs, atol=GEOMETRY_TOLERANCE
            ):
                differences.append(
                    (name, _format_values(mine) + unit, _format_values(theirs) + unit)
                )
        return differences

    def describe_geometry(self) -> str:
        """Return a one-line description of the shape, spacing and origin."""
        return (
            f"shape {self.array.shape} (z, y, x), spacing "
            f"{_format_values(self.spacing_mm)} mm, origin "
            f"{_format_values(self.origin_mm)} mm"
        )


def is_volume_path(path: Path) -> bool:
    """Return whether ``path`` is a volume: a known suffix or a DICOM folder."""
    if path.is_dir():
        return any(child.suffix.lower() == ".dcm" for child in path.iterdir())
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def _unreadable(path: Path, detail: str) -> VolumeReadError:
    return VolumeReadError(f"{path}: {UNREADABLE} ({detail})")


def _shortfall(available: int, expected: int) -> str:
    return f"holds {available} of the {expected} data bytes its header declares"


def _read_nifti_stored(path: Path) -> npt.NDArray[np.floating] | None:
    """Check a NIfTI file is complete; return its float voxels exactly as stored.

    ITK's NIfTI reader zero-fills a short read and replaces NaN/inf with 0, both
    without any error, which would hide exactly the damage SiteBridge must report.

    Returns:
        The stored voxels, flat in file order, for float data; ``None`` otherwise.

    Raises:
        VolumeReadError: the file holds fewer bytes than its header declares, or its
            gzip stream ends early or is corrupt.
    """
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            content = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise _unreadable(
            path, f"gzip stream ends early or is corrupt: {error}"
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
    data_bytes = (count * bitpix + 7) // 8
    if len(content) < offset + data_bytes:
        raise _unreadable(path, _shortfall(max(0, len(content) - offset), data_bytes))
    float_types = {16: "f4", 64: "f8"}  # NIfTI DT_FLOAT32, DT_FLOAT64
    if datatype not in float_types:
        return None
    return np.frombuffer(
        content, dtype=f"{order}{float_types[datatype]}", count=count, offset=offset
    )


def _read_meta_header(content: bytes) -> tuple[dict[str, str], int | None] | None:
    """A MetaImage header's ``key = value`` fields and where its data starts.

    Returns ``None`` when ``content`` does not start like a MetaImage header, and a
    ``None`` data start when the header ends before its ``ElementDataFile`` line.
    """
    fields: dict[str, str] = {}
    start = 0
    while start < min(len(content), _META_HEADER_LIMIT):
        end = content.find(b"\n", start)
        end = len(content) if end < 0 else end
        key, equals, value = content[start:end].decode("latin-1").partition("=")
        if end == len(content) and fields:
            break  # the file ends inside the header
        if not equals or not key.strip().isidentifier():
            return None
        fields[key.strip()] = value.strip()
        start = end + 1
        if key.strip() == "ElementDataFile":
            return fields, start
    return (fields, None) if fields else None


def _meta_image_shortfall(path: Path) -> str | None:
    """How a MetaImage file (``.mha``/``.mhd``) falls short of its declared data.

    ITK reports a short MetaImage read as "No such file or directory"; this says what
    is actually wrong. Returns ``None`` when the data is complete or the header is not
    one this check understands.
    """
    if not path.name.lower().endswith((".mha", ".mhd")):
        return None
    try:
        with path.open("rb") as handle:
            content = handle.read(_META_HEADER_LIMIT)
            file_size = os.fstat(handle.fileno()).st_size
        header = _read_meta_header(content)
        if header is None:
            return None
        fields, data_start = header
        if data_start is None:
            if file_size >= _META_HEADER_LIMIT:
                return None
            return "the header ends early, before its ElementDataFile line"
        data_file = fields["ElementDataFile"]
        if data_file == "LOCAL":
            available = file_size - data_start
        elif "%" in data_file or data_file.upper().startswith("LIST"):
            return None  # one file per slice: ITK names the missing one itself
        else:
            data_path = path.parent / data_file
            if not data_path.is_file():
                return f"its data file {data_path} is missing"
            available = data_path.stat().st_size - max(
                0, int(fields.get("HeaderSize", "0"))
            )
        if fields.get("CompressedData", "False").lower() == "true":
            expected = int(fields.get("CompressedDataSize", "0"))
        else:
            element_bytes = _META_ELEMENT_BYTES[fields["ElementType"]]
            channels = int(fields.get("ElementNumberOfChannels", "1"))
            voxels = math.prod(int(size) for size in fields["DimSize"].split())
            expected = voxels * channels * element_bytes
    except (OSError, KeyError, ValueError):
        return None
    if expected > 0 and available < expected:
        return _shortfall(max(0, available), expected)
    return None


def _describe_itk_error(text: str) -> str:
    r"""The informative part of a SimpleITK exception, without source locations.

    Example:
        >>> _describe_itk_error(
        ...     "Exception thrown in SimpleITK ImageFileReader_Execute: x.cxx:935:\n"
        ...     "ITK ERROR: NrrdImageIO(0x55d0): Read: Error reading a.nrrd:\n"
        ...     "[nrrd] _nrrdRead: trouble reading NRRD file\n"
        ...     "[nrrd] _nrrdEncodingGzip_read: expected 32768 bytes but received 16"
        ... )
        'expected 32768 bytes but received 16'
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if any("Unable to determine ImageIO reader" in line for line in lines):
        return (
            "no image reader recognises the file: not NIfTI, NRRD or MHA/MHD, or a "
            "damaged header"
        )
    # NRRD nests its reasons; the last one is the most specific.
    nrrd = [
        line.split(":", 1)[1].strip()
        for line in lines
        if line.startswith("[nrrd]") and line.split(":", 1)[-1].strip()
    ]
    if nrrd:
        return nrrd[-1]
    for line in lines:
        match = _ITK_ERROR_LINE.search(line)
        if match is not None:
            return match["text"]
    return lines[-1] if lines else "unknown SimpleITK error"


def _check_dicom_series(folder: Path, series: tuple[str, ...]) -> None:
    """Refuse a DICOM folder whose files did not all make it into the series.

    GDCM leaves a truncated or unreadable slice out of the series without an error,
    which would silently remove that slice from the volume.
    """
    files = sorted(
        child.name for child in folder.iterdir() if child.suffix.lower() == ".dcm"
    )
    read = {Path(name).name for name in series}
    left_out = [name for name in files if name not in read]
    if left_out:
        shown = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        raise _unreadable(
            folder,
            f"{len(left_out)} of {len(files)} DICOM files could not be read as slices "
            f"of the series: {shown}",
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


def _read_image(path: Path) -> tuple[sitk.Image, npt.NDArray[np.floating] | None]:
    """Read with SimpleITK; return the image and, for float NIfTI, the stored voxels."""
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = tuple(reader.GetGDCMSeriesFileNames(str(path)))
        if not series:
            raise VolumeReadError(f"{path}: folder holds no DICOM series")
        _check_dicom_series(path, series)
        reader.SetFileNames(series)
        return reader.Execute(), None
    if path.stat().st_size == 0:
        raise _unreadable(path, "the file is empty")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        detail = _meta_image_shortfall(path) or _describe_itk_error(str(error))
        raise _unreadable(path, detail.replace(str(path), "the file")) from error
    return image, _read_nifti_stored(path)


def read_volume(path: Path) -> Volume:
    """Read a volume from a file, or a DICOM series from a folder.

    Args:
        path: an image file, or a folder holding one DICOM series.

    Returns:
        The volume, with 2-D images promoted to one slice.

    Raises:
        VolumeReadError: the path is missing, or cannot be read completely
            (``"<path>: truncated or unreadable image (<why>)"``).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: file not found")
    try:
        image, stored = _read_image(path)
        image = _to_3d(image)
    except VolumeReadError:
        raise
    except (RuntimeError, ValueError, OSError) as error:
        raise _unreadable(path, _describe_itk_error(str(error))) from error
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


def _to_sitk(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing_mm)
    image.SetOrigin(volume.origin_mm)
    image.SetDirection(volume.direction)
    return image


def write_volume(volume: Volume, path: Path, *, compress: bool = True) -> None:
    """Write ``volume`` to ``path`` (format from the suffix), creating parent folders.

    The file is written under a temporary name and renamed, so a reader never sees a
    half-written image. An ``.mhd`` header is renamed after its data file, which keeps
    its final name.

    Args:
        volume: the volume to write.
        path: the file; ``.nii.gz`` is always compressed and ``.nii`` never.
        compress: compress the voxels where the format allows (NRRD, MHA/MHD).
    """
    path = Path(path)
    image = _to_sitk(volume)
    if not path.name.lower().endswith(".mhd"):
        with write_atomically(path) as temporary:
            sitk.WriteImage(image, str(temporary), useCompression=compress)
        return
    # The header names its data file, so both are written under their final names in
    # a private folder beside them and moved out, data first.
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{secrets.token_hex(4)}.tmp.{path.name}.d")
    staging.mkdir()
    try:
        sitk.WriteImage(image, str(staging / path.name), useCompression=compress)
        for written in sorted(
            staging.iterdir(), key=lambda item: item.name == path.name
        ):
            with write_atomically(path.with_name(written.name)) as temporary:
                written.replace(temporary)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def write_dicom_series(volume: Volume, folder: Path) -> None:
    """Write ``volume`` as a DICOM series (one file per slice) into ``folder``.

    Used by tests and by users converting data; intensities are stored as int16.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = _to_sitk(dataclasses.replace(volume, array=volume.array.astype(np.int16)))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    # GDCM's writer sets the process locale to "C" and leaves it so, after which
    # Python opens text files as ASCII (a report holding "ε" then fails to write).
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        for index in range(image.GetDepth()):
            slice_image = image[:, :, index]
            slice_image.SetMetaData("0020|000e", series_uid)
            slice_image.SetMetaData("0020|0013", str(index + 1))
            position = image.TransformIndexToPhysicalPoint((0, 0, index))
            slice_image.SetMetaData("0020|0032", "\\".join(f"{v:f}" for v in position))
            slice_image.SetMetaData("0008|0060", "MR")
            writer.SetFileName(str(folder / f"slice_{index:04d}.dcm"))
            writer.Execute(slice_image)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
