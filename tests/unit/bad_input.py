"""The classes of bad site input, as damage done to a copy of a site folder.

Shared by the ClientApp tests (``tests/unit/clients/test_bad_input.py``, through the
real app) and the offline check (``sitebridge site check`` in
``tests/unit/core/test_cli.py``), so both prove the same classes with the same
expected messages. Every damage works on a copy of synthetic site B (two labelled
training cases ``b_000``/``b_001``, six evaluation cases from ``b_002``) and returns
the path the error must name.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np

from core.data.io import Volume, read_volume, write_dicom_series, write_volume

SITE: Final = "B"
TRAIN_IMAGE: Final = "imagesTr/b_000_0000.nii.gz"
TRAIN_LABEL: Final = "labelsTr/b_000.nii.gz"
TEST_IMAGE: Final = "imagesTs/b_002_0000.nii.gz"
TEST_LABEL: Final = "labelsTs/b_002.nii.gz"
GARBAGE: Final = b"\x00this is not an image\xff" * 40
UNREADABLE: Final = "truncated or unreadable image"
RECOGNISES: Final = "no image reader recognises the file"
SHORT: Final = "data bytes its header declares"
FLIPPED: Final = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

SiteDamage = Callable[[Path], Path]  # breaks a site folder; returns what to name


@dataclasses.dataclass(frozen=True)
class BadSite:
    """One class of bad input in a site folder.

    Attributes:
        damage: breaks the site folder; returns the file or folder to be named.
        problem: fragments the error must hold (the problem, in plain words).
        before_data: the node refuses before reading any data (no site folder, no
            usable policy), so its handlers never run.
    """

    damage: SiteDamage
    problem: tuple[str, ...]
    before_data: bool = False


def copy_site(federation: Path, destination: Path) -> Path:
    """A private copy of site B at ``destination``."""
    shutil.copytree(federation / SITE, destination)
    return destination


def garbage(relative: str) -> SiteDamage:
    def damage(site: Path) -> Path:
        (site / relative).write_bytes(GARBAGE)
        return site / relative

    return damage


def cut_in_half(relative: str, *, suffix: str | None = None) -> SiteDamage:
    """Cut the file to half its bytes; first rewrite it uncompressed as ``suffix``."""

    def damage(site: Path) -> Path:
        path = site / relative
        if suffix is not None:
            volume = read_volume(path)
            path.unlink()
            path = path.with_name(path.name.replace(".nii.gz", suffix))
            write_volume(volume, path, compress=False)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    return damage


def dicom_with_a_cut_slice(relative: str) -> SiteDamage:
    """Replace the image by a DICOM series folder; cut its second slice file short."""

    def damage(site: Path) -> Path:
        path = site / relative
        folder = path.with_name(path.name.replace(".nii.gz", ""))
        write_dicom_series(read_volume(path), folder)
        path.unlink()
        cut = sorted(folder.iterdir())[1]
        cut.write_bytes(cut.read_bytes()[:-100])
        return folder

    return damage


def rewrite(relative: str, change: Callable[[Volume], Volume]) -> SiteDamage:
    def damage(site: Path) -> Path:
        path = site / relative
        write_volume(change(read_volume(path)), path)
        return path

    return damage


def with_voxels(
    value: float, dtype: type[np.generic] | None = None
) -> Callable[[Volume], Volume]:
    """The volume with voxels ``[0, 0, :3]`` set to ``value``."""

    def change(volume: Volume) -> Volume:
        array = volume.array.astype(dtype or volume.array.dtype)
        array[0, 0, :3] = value
        return dataclasses.replace(volume, array=array)

    return change


def remove_site(site: Path) -> Path:
    shutil.rmtree(site)
    return site


def empty_site_folder(site: Path) -> Path:
    shutil.rmtree(site)
    site.mkdir()
    return site


def no_cases(site: Path) -> Path:
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        shutil.rmtree(site / folder)
    (site / "imagesTr").mkdir()
    return site / "imagesTr"


def site_policy(text: str) -> SiteDamage:
    """Put ``text`` in the site's own ``policy.toml``."""

    def damage(site: Path) -> Path:
        (site / "policy.toml").write_text(text)
        return site / "policy.toml"

    return damage


# The classes a site folder can hold, by name. A policy that names an unknown key
# and one with a value of the wrong type stand for every malformed policy.
BAD_SITES: Final[dict[str, BadSite]] = {
    "garbage-train-image": BadSite(garbage(TRAIN_IMAGE), (UNREADABLE, RECOGNISES)),
    "garbage-train-label": BadSite(garbage(TRAIN_LABEL), (UNREADABLE, RECOGNISES)),
    "garbage-test-image": BadSite(garbage(TEST_IMAGE), (UNREADABLE, RECOGNISES)),
    "truncated-nii.gz": BadSite(
        cut_in_half(TRAIN_IMAGE), (UNREADABLE, "gzip stream ends early")
    ),
    "truncated-nii": BadSite(
        cut_in_half(TRAIN_IMAGE, suffix=".nii"), (UNREADABLE, SHORT)
    ),
    "truncated-mha": BadSite(
        cut_in_half(TRAIN_IMAGE, suffix=".mha"), (UNREADABLE, SHORT)
    ),
    "truncated-nii-test-label": BadSite(
        cut_in_half(TEST_LABEL, suffix=".nii"), (UNREADABLE, SHORT)
    ),
    "truncated-dicom-slice": BadSite(
        dicom_with_a_cut_slice(TRAIN_IMAGE),
        (
            UNREADABLE,
            "1 of 10 DICOM files could not be read as slices of the series: "
            "slice_0001.dcm",
        ),
    ),
    "geometry-size": BadSite(
        rewrite(TRAIN_LABEL, lambda v: dataclasses.replace(v, array=v.array[:-1])),
        (
            "geometry mismatch between image",
            "image size (64, 64, 10) != label size (64, 64, 9)",
        ),
    ),
    "geometry-spacing": BadSite(
        rewrite(TRAIN_LABEL, lambda v: dataclasses.replace(v, spacing_mm=(1, 1, 1))),
        ("image spacing (1.5, 1.5, 3) mm != label spacing (1, 1, 1) mm",),
    ),
    "geometry-origin": BadSite(
        rewrite(TRAIN_LABEL, lambda v: dataclasses.replace(v, origin_mm=(0, 5, 0))),
        ("image origin (0, 0, 0) mm != label origin (0, 5, 0) mm",),
    ),
    "geometry-direction": BadSite(
        rewrite(TRAIN_LABEL, lambda v: dataclasses.replace(v, direction=FLIPPED)),
        (
            "image direction (1, 0, 0, 0, 1, 0, 0, 0, 1) != label direction "
            "(-1, 0, 0, 0, 1, 0, 0, 0, 1)",
        ),
    ),
    "geometry-size-test-label": BadSite(
        rewrite(TEST_LABEL, lambda v: dataclasses.replace(v, array=v.array[:, 1:])),
        ("image size (64, 64, 10) != label size (64, 63, 10)",),
    ),
    "label-outside-classes": BadSite(
        rewrite(TRAIN_LABEL, with_voxels(3)),
        ("labels outside the declared classes 0..1: found [3]",),
    ),
    "label-outside-classes-test-label": BadSite(
        rewrite(TEST_LABEL, with_voxels(7)),
        ("labels outside the declared classes 0..1: found [7]",),
    ),
    "label-not-integer": BadSite(
        rewrite(TRAIN_LABEL, with_voxels(0.5, np.float32)),
        ("non-integer label values (found [0.5])",),
    ),
    "nan-train-image": BadSite(
        rewrite(TRAIN_IMAGE, with_voxels(np.nan)), ("image contains 3 NaN/inf voxels",)
    ),
    "inf-train-image": BadSite(
        rewrite(TRAIN_IMAGE, with_voxels(np.inf)), ("image contains 3 NaN/inf voxels",)
    ),
    "inf-test-image": BadSite(
        rewrite(TEST_IMAGE, with_voxels(-np.inf)), ("image contains 3 NaN/inf voxels",)
    ),
    "missing-site-folder": BadSite(
        remove_site, ("site folder not found",), before_data=True
    ),
    "empty-site-folder": BadSite(empty_site_folder, ("empty site folder",)),
    "no-cases-in-imagesTr": BadSite(no_cases, ("empty site, no cases in imagesTr",)),
    "policy-not-toml": BadSite(
        site_policy("[release]\nlftm = \n"),
        ("not valid TOML", "at line 2"),
        before_data=True,
    ),
    "policy-unknown-key": BadSite(
        site_policy("[release]\ncolour = 'red'\n"),
        ("unknown key release.colour",),
        before_data=True,
    ),
}
