"""Controlled noisy labels with known quality, for the label-consensus benchmark.

Each clean binary label is corrupted in one of six ways, at a level in (0, 1]:
erosion and dilation (radius up to :data:`MAX_MORPHOLOGY_PX`), a shift (up to a quarter
of the image side), an elastic warp (a smooth random displacement field up to
:data:`MAX_ELASTIC_PX`), an empty label, and a label swapped in from another image.
Every corrupted label keeps its true Dice against the clean one, so a consensus method
can be scored both on its fused label and on how well its per-label quality estimates
(DeepSTAPLE's data parameters, STAPLE's sensitivities) rank the labels.
Plain numpy/scipy; deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from enum import StrEnum
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from core.metrics import mask_dice

Mask = npt.NDArray[np.bool_]

MAX_MORPHOLOGY_PX: Final = 4  # erosion/dilation radius at level 1
MAX_SHIFT_FRACTION: Final = 0.25  # shift at level 1, as a fraction of the image side
MAX_ELASTIC_PX: Final = 6.0  # peak displacement of the elastic warp at level 1
ELASTIC_SMOOTHING_PX: Final = 4.0  # Gaussian sigma of the displacement field


class Corruption(StrEnum):
    """How a clean label is damaged."""

    ERODE = "erode"
    DILATE = "dilate"
    SHIFT = "shift"
    ELASTIC = "elastic"
    EMPTY = "empty"
    SWAP = "swap"


def _check_level(level: float) -> None:
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")


def corrupt_label(
    label: Mask,
    corruption: Corruption,
    level: float,
    rng: np.random.Generator,
    *,
    swap_with: Mask | None = None,
) -> Mask:
    """Return a damaged copy of the binary ``label`` (2-D or 3-D).

    Args:
        label: the clean binary mask.
        corruption: the kind of damage.
        level: its strength in (0, 1] (ignored by EMPTY and SWAP).
        rng: random source for the shift direction and the elastic field.
        swap_with: the other image's label, required for SWAP.

    Raises:
        ValueError: a level outside (0, 1], a non-binary label, or SWAP without a
            label of the same shape.
    """
    _check_level(level)
    mask = np.asarray(label)
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"label must be binary, got values {np.unique(mask)[:5]}")
        mask = mask.astype(bool)
    if corruption is Corruption.EMPTY:
        return np.zeros_like(mask)
    if corruption is Corruption.SWAP:
        if swap_with is None or np.shape(swap_with) != mask.shape:
            raise ValueError(
                f"SWAP needs swap_with of shape {mask.shape}, got "
                f"{None if swap_with is None else np.shape(swap_with)}"
            )
        return np.asarray(swap_with, dtype=bool).copy()
    if corruption in (Corruption.ERODE, Corruption.DILATE):
        radius = max(1, round(level * MAX_MORPHOLOGY_PX))
        structure = ndimage.generate_binary_structure(mask.ndim, 1)
        operation = (
            ndimage.binary_erosion
            if corruption is Corruption.ERODE
            else ndimage.binary_dilation
        )
        return np.asarray(operation(mask, structure, iterations=radius), dtype=bool)
    if corruption is Corruption.SHIFT:
        direction = rng.normal(size=mask.ndim)
        direction /= np.linalg.norm(direction) or 1.0
        offset = direction * level * MAX_SHIFT_FRACTION * min(mask.shape)
        shifted = ndimage.shift(mask.astype(np.float32), offset, order=0, cval=0.0)
        return np.asarray(shifted > 0.5, dtype=bool)
    # ELASTIC: a smooth random displacement field, scaled to the level's peak.
    fields = []
    for _ in range(mask.ndim):
        field = ndimage.gaussian_filter(
            rng.normal(size=mask.shape), ELASTIC_SMOOTHING_PX
        )
        peak = float(np.abs(field).max()) or 1.0
        fields.append(field / peak * level * MAX_ELASTIC_PX)
    grid = np.meshgrid(*(np.arange(n) for n in mask.shape), indexing="ij")
    coordinates = [axis + field for axis, field in zip(grid, fields, strict=True)]
    warped = ndimage.map_coordinates(mask.astype(np.float32), coordinates, order=0)
    return np.asarray(warped > 0.5, dtype=bool)


@dataclasses.dataclass(frozen=True, slots=True)
class NoisyLabel:
    """One corrupted label of one image, with what was done and its true Dice."""

    image: int
    corruption: Corruption
    level: float
    mask: Mask
    true_dice: float


# Per image: mild, moderate and severe damage, and one useless label (empty or
# swapped), so that good and bad labels coexist on every image.
DEFAULT_RECIPE: Final = (
    (Corruption.ERODE, 0.25),
    (Corruption.DILATE, 0.25),
    (Corruption.ELASTIC, 0.5),
    (Corruption.SHIFT, 0.3),
    (Corruption.ELASTIC, 1.0),
    (Corruption.SHIFT, 0.8),
)


def build_noisy_label_set(
    labels: Sequence[Mask],
    *,
    seed: int,
    recipe: Sequence[tuple[Corruption, float]] = DEFAULT_RECIPE,
    useless: Sequence[Corruption] = (Corruption.EMPTY, Corruption.SWAP),
) -> list[list[NoisyLabel]]:
    """Corrupt every clean label by each entry of ``recipe`` plus one useless label.

    The useless label alternates over ``useless`` from image to image (a swap takes
    the next image's label). The order of an image's labels is shuffled, so a
    method cannot learn quality from the position.

    Returns:
        One list of :class:`NoisyLabel` per image.

    Raises:
        ValueError: fewer than two images (a swap needs another image), or a bad level.
    """
    if len(labels) < 2:
        raise ValueError(f"need at least 2 clean labels, got {len(labels)}")
    rng = np.random.default_rng(seed)
    result: list[list[NoisyLabel]] = []
    for index, clean in enumerate(labels):
        clean_mask = np.asarray(clean, dtype=bool)
        plan = [*recipe, (useless[index % len(useless)], 1.0)] if useless else recipe
        noisy = []
        for corruption, level in plan:
            other = np.asarray(labels[(index + 1) % len(labels)], dtype=bool)
            mask = corrupt_label(clean_mask, corruption, level, rng, swap_with=other)
            noisy.append(
                NoisyLabel(index, corruption, level, mask, mask_dice(mask, clean_mask))
            )
        order = rng.permutation(len(noisy))
        result.append([noisy[i] for i in order])
    return result
