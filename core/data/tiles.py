"""Slices at the plan's spacing, cut into overlapping tiles, and stitched back.

With ``data.resample = "spacing"`` a case's slices are not squeezed into
``data.image-size`` pixels: each is resampled to the in-plane target spacing
(``data.spacing-mm``, the resolution plan's by default) and cut into
``image-size`` x ``image-size`` tiles on a sliding-window grid with half a tile of
overlap (nnU-Net's and MONAI's default step), padded where a slice is smaller than a
tile. Training samples these tiles as its patches; every prediction is made per tile
and put back together with a Gaussian importance map (weights highest at a tile's
centre, sigma 1/8 of the tile, as nnU-Net and MONAI's ``sliding_window_inference``
blend), then resampled to the image's own grid. Pure torch; never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Final

import torch
import torch.nn.functional as functional

TILE_OVERLAP: Final = 0.5  # share of a tile its neighbour covers
GAUSSIAN_SIGMA: Final = 0.125  # of the tile size, nnU-Net's and MONAI's
# A slice is never resampled to more than this many times its own pixels per side: a
# target spacing far finer than the image's (a coordinator's plan may say anything)
# would otherwise multiply the memory one request takes.
MAX_UPSAMPLING: Final = 4.0
# The importance map's floor, so that a pixel only a tile's corner covers still counts.
MIN_IMPORTANCE: Final = 1e-3


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CaseTiling:
    """How one case's kept slices were resampled and tiled.

    Attributes:
        num_slices: the slices kept (each gives ``len(starts)`` tiles, in order).
        native: a slice's in-plane size ``(rows, cols)`` on the image's grid.
        resampled: its size at the target spacing.
        padded: its size once padded to hold whole tiles.
        size: the tile's side.
        starts: each tile's ``(row, col)`` origin in the padded slice.
    """

    num_slices: int
    native: tuple[int, int]
    resampled: tuple[int, int]
    padded: tuple[int, int]
    size: int
    starts: tuple[tuple[int, int], ...]

    @property
    def num_rows(self) -> int:
        """Tiles of the whole case: rows of its part of a SliceSet."""
        return self.num_slices * len(self.starts)


def tile_starts(
    length: int, size: int, overlap: float = TILE_OVERLAP
) -> tuple[int, ...]:
    """Origins of ``size``-long tiles covering ``length``, the last flush with the end.

    Example:
        >>> tile_starts(64, 64), tile_starts(40, 64), tile_starts(160, 64)
        ((0,), (0,), (0, 32, 64, 96))
    """
    if length <= size:
        return (0,)
    step = max(1, int(size * (1.0 - overlap)))
    count = math.ceil((length - size) / step) + 1
    return tuple(min(index * step, length - size) for index in range(count))


def plan_tiling(
    num_slices: int,
    native: tuple[int, int],
    spacing_mm: tuple[float, float],
    *,
    target_mm: float,
    size: int,
) -> CaseTiling:
    """The tiling of a case's slices of ``native`` pixels at ``spacing_mm``.

    Example:
        >>> tiling = plan_tiling(10, (384, 384), (0.5, 0.5), target_mm=0.75, size=128)
        >>> tiling.resampled, len(tiling.starts), tiling.num_rows
        ((256, 256), 9, 90)
    """
    resampled = (
        max(1, round(native[0] * spacing_mm[0] / target_mm)),
        max(1, round(native[1] * spacing_mm[1] / target_mm)),
    )
    if max(resampled[0] / native[0], resampled[1] / native[1]) > MAX_UPSAMPLING:
        raise ValueError(
            f"data.spacing-mm {target_mm:g} would resample a {native[0]}x{native[1]} "
            f"slice at {spacing_mm[0]:g}x{spacing_mm[1]:g} mm to "
            f"{resampled[0]}x{resampled[1]}, more than {MAX_UPSAMPLING:g} times its "
            "own size"
        )
    padded = (max(size, resampled[0]), max(size, resampled[1]))
    rows, cols = tile_starts(padded[0], size), tile_starts(padded[1], size)
    return CaseTiling(
        num_slices=num_slices,
        native=native,
        resampled=resampled,
        padded=padded,
        size=size,
        starts=tuple((row, col) for row in rows for col in cols),
    )


def resample(
    stack: torch.Tensor, size: tuple[int, int], *, labels: bool
) -> torch.Tensor:
    """``(N, C, H, W)`` resized to ``size``: bilinear, or nearest for labels.

    Bilinear is antialiased when it shrinks; nearest samples pixel centres.
    """
    if tuple(stack.shape[-2:]) == size:
        return stack
    if labels:
        return functional.interpolate(stack, size=size, mode="nearest-exact")
    shrinking = size[0] < stack.shape[-2] or size[1] < stack.shape[-1]
    return functional.interpolate(
        stack, size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )


def cut_tiles(stack: torch.Tensor, tiling: CaseTiling) -> torch.Tensor:
    """``(N, C, H', W')`` resampled slices -> ``(N * T, C, S, S)`` tiles (zero padded).

    Tiles are in slice order, each slice's tiles in ``tiling.starts`` order.
    """
    pad_rows = tiling.padded[0] - stack.shape[-2]
    pad_cols = tiling.padded[1] - stack.shape[-1]
    padded = functional.pad(stack, (0, pad_cols, 0, pad_rows))
    size = tiling.size
    tiles = [
        padded[:, :, row : row + size, col : col + size] for row, col in tiling.starts
    ]
    return torch.stack(tiles, dim=1).reshape(-1, stack.shape[1], size, size)


def gaussian_importance(size: int) -> torch.Tensor:
    """``(S, S)`` weights, 1 at the centre, sigma ``GAUSSIAN_SIGMA * S``.

    Example:
        >>> weights = gaussian_importance(8)
        >>> float(weights.max()), bool(weights.min() >= MIN_IMPORTANCE)
        (1.0, True)
    """
    centre = (size - 1) / 2.0
    offsets = torch.arange(size, dtype=torch.float32) - centre
    profile = torch.exp(-(offsets**2) / (2.0 * (GAUSSIAN_SIGMA * size) ** 2))
    weights = profile[:, None] * profile[None, :]
    return (weights / weights.max()).clamp_min(MIN_IMPORTANCE)


def stitch_tiles(rows: torch.Tensor, tiling: CaseTiling) -> torch.Tensor:
    """``(N * T, C, S, S)`` per-tile maps -> ``(N, C, H', W')`` blended slices.

    Each pixel is the importance-weighted mean of the tiles covering it; the padding
    is cut off again.
    """
    count, channels, size = tiling.num_slices, rows.shape[1], tiling.size
    if rows.shape[0] != tiling.num_rows:
        raise ValueError(
            f"a case tiled into {tiling.num_rows} tiles got {rows.shape[0]} rows"
        )
    weights = gaussian_importance(size).to(rows.device, rows.dtype)
    total = rows.new_zeros((count, channels, *tiling.padded))
    norm = rows.new_zeros((1, 1, *tiling.padded))
    per_slice = rows.reshape(count, len(tiling.starts), channels, size, size)
    for index, (row, col) in enumerate(tiling.starts):
        total[:, :, row : row + size, col : col + size] += per_slice[:, index] * weights
        norm[:, :, row : row + size, col : col + size] += weights
    blended = total / norm
    return blended[:, :, : tiling.resampled[0], : tiling.resampled[1]]


def classes_on_native_grid(
    rows: torch.Tensor, tiling: CaseTiling, *, num_classes: int
) -> torch.Tensor:
    """``(N * T, S, S)`` classes per tile -> ``(N, H, W)`` classes on the native grid.

    The tiles' one-hot maps are blended (a weighted vote where tiles overlap), the
    winning class taken at the target spacing, and resampled (nearest) to the slice's
    own size.
    """
    one_hot = functional.one_hot(rows.to(torch.int64), num_classes)
    votes = stitch_tiles(one_hot.permute(0, 3, 1, 2).to(torch.float32), tiling)
    classes = votes.argmax(dim=1, keepdim=True).to(torch.float32)
    return resample(classes, tiling.native, labels=True)[:, 0].to(torch.int64)
