"""Decoding ``evaluate`` replies when the site scores each case as a whole volume.

A site scores every evaluation case over all its slices (up to its own cap), whatever
the run says. A crafted predictor ignores its input, so it paints the same region
``R`` on every slice, and on case ``c`` (``Z_c`` slices, ``y_c`` foreground voxels)
it scores

    Dice_c(R) = 2 * sum over p in R of n_c(p) / (Z_c |R| + y_c)

where ``n_c(p)`` is the number of slices on which pixel ``p`` is foreground: the
case's projection along the slice axis. For cells of equal area ``b^2`` the returned
mean over ``C`` cases is linear in the projections,

    v(R) = (2 / C) * sum over c of sum over p in R of n_c(p) / (Z_c b^2 + y_c),

so the values give, per cell, the mean foreground count of its pixels, weighted by
case (:func:`estimate_counts`): ``m(R) = v(R) (Z b^2 + y) / (2 b^2)`` with ``y`` the
mean foreground volume, which the whole-image predictor's Dice ``W = 2 y / (Z S^2 +
y)`` gives (else the sum of all cells' values, ``T = 2 y / (Z b^2 + y)``, when they
cover the image). Which case holds which pixel, and on which slices, the values do
not say: every case gets the same map, and each pixel's count is placed along the
slice axis by what the attacker can infer without the site (:func:`decode_volumes`):

- ``centred``: ``round(m)`` slices centred on the stack's middle (a compact organ
  is symmetric about its centre);
- ``prior-ranked``: ``round(m)`` slices, on the slices where another site's organ
  is most often found;
- ``prior-calibrated``: per count, the slices on which another site's pixels of
  that count are foreground more often than not (its maps run through the same
  release and decoding, so the calibration sees what the attacker sees).

Cells the attack never measured take the other site's map (background without one).
The attacker is assumed to know how many slices a case has (its acquisition
protocol, as the profile attack assumes the matrix): it takes the other site's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from simulations.benchmark.security.patterns import PixelCode

BoolVolume = npt.NDArray[np.bool_]
FloatMap = npt.NDArray[np.float64]
STRATEGIES: Final = ("centred", "prior-ranked", "prior-calibrated")
# Counts are grouped in steps of half a slice for the calibration.
COUNT_STEP: Final = 0.5


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CountEstimate:
    """The mean per-pixel foreground count the values imply.

    Attributes:
        counts: ``(S, S)`` mean slices per pixel on which it is foreground (nan where
            no cell was measured).
        mean_volume: the mean foreground voxels per case used to scale them.
        source: where ``mean_volume`` came from: ``whole-image`` (the whole-image
            predictor), ``cell-sum`` (all cells measured) or ``prior``.
    """

    counts: FloatMap
    mean_volume: float
    source: str


def release_values(
    volumes: Sequence[BoolVolume], code: PixelCode, *, decimals: int | None = None
) -> tuple[dict[int, float], float]:
    """What a site returns for every cell of ``code`` and the whole image.

    The mean over the cases of each cell's whole-volume Dice, rounded as a site
    with ``limits.metric-decimals`` rounds it. The attacker uses it on maps it holds
    (another site's) to calibrate its decoder; the tests, on made-up maps.

    Example:
        >>> volume = np.zeros((2, 4, 4), dtype=bool)
        >>> volume[:, 1, 1] = True  # one pixel on both slices: y = 2
        >>> values, whole = release_values([volume], PixelCode(size=4, block=1,
        ...                                                     digits=2))
        >>> values[5], values[0], round(whole, 4)  # 2*2/(2*1+2), 0, 2*2/(2*16+2)
        (1.0, 0.0, 0.1176)
    """
    size = code.size
    block = code.block
    side = code.cells_per_side
    total = np.zeros((side, side))
    whole = 0.0
    for volume in volumes:
        slices, foreground = volume.shape[0], int(volume.sum())
        projection = volume.sum(axis=0).reshape(side, block, side, block).sum((1, 3))
        total += 2.0 * projection / (slices * block * block + foreground)
        whole += 2.0 * foreground / (slices * size * size + foreground)
    mean = total / len(volumes)
    whole /= len(volumes)
    values = {cell: float(mean.flat[cell]) for cell in range(code.num_cells)}
    if decimals is not None:
        values = {cell: round(value, decimals) for cell, value in values.items()}
        whole = round(whole, decimals)
    return values, whole


def estimate_counts(
    values: Mapping[int, float],
    whole: float,
    code: PixelCode,
    *,
    slices: int,
    prior_volume: float = math.nan,
) -> CountEstimate:
    """Mean foreground slices per pixel, from cell values (module docstring).

    Args:
        values: cell -> returned mean Dice.
        whole: the whole-image predictor's mean Dice (nan if not measured).
        code: the cells.
        slices: ``Z``, the slices per case the attacker assumes.
        prior_volume: the mean foreground voxels per case of another site, used
            when neither the whole image nor every cell was measured.

    Example:
        >>> volume = np.zeros((4, 4, 4), dtype=bool)
        >>> volume[1:3, 1, 1] = True; volume[:, 2, 2] = True  # 2 and 4 slices
        >>> code = PixelCode(size=4, block=1, digits=2)
        >>> values, whole = release_values([volume], code)
        >>> found = estimate_counts(values, whole, code, slices=4)
        >>> found.source, round(found.mean_volume, 6), float(found.counts[1, 1])
        ('whole-image', 6.0, 2.0)
    """
    size, area = code.size, code.block * code.block
    if 0.0 < whole < 2.0:
        mean_volume, source = (
            whole * slices * size * size / (2.0 - whole),
            "whole-image",
        )
    elif len(values) == code.num_cells and 0.0 < sum(values.values()) < 2.0:
        cell_sum = float(sum(values.values()))
        mean_volume, source = cell_sum * slices * area / (2.0 - cell_sum), "cell-sum"
    else:
        mean_volume, source = prior_volume, "prior"
    counts = np.full((size, size), np.nan)
    if math.isfinite(mean_volume):
        for cell, value in values.items():
            mean_count = value * (slices * area + mean_volume) / (2.0 * area)
            counts[code.cell_map(cell)] = min(float(slices), max(0.0, mean_count))
    return CountEstimate(counts=counts, mean_volume=mean_volume, source=source)


def place_centred(counts: FloatMap, slices: int) -> BoolVolume:
    """``round(m)`` slices per pixel, centred on the middle of the stack.

    Example:
        >>> place_centred(np.array([[3.0, 0.4]]), 5)[:, 0, :].astype(int).tolist()
        [[0, 0], [1, 0], [1, 0], [1, 0], [0, 0]]
    """
    length = np.nan_to_num(np.round(counts))[None]
    start = np.floor((slices - length) / 2.0 + 0.5)
    depth = np.arange(slices)[:, None, None]
    placed: BoolVolume = (depth >= start) & (depth < start + length)
    return placed


def place_ranked(counts: FloatMap, order: Sequence[int]) -> BoolVolume:
    """``round(m)`` slices per pixel, taken in ``order`` (most likely slice first).

    Example:
        >>> place_ranked(np.array([[2.0]]), [2, 1, 3, 0])[:, 0, 0].tolist()
        [False, True, True, False]
    """
    rank = np.empty(len(order), dtype=np.int64)
    rank[np.asarray(order)] = np.arange(len(order))
    length = np.nan_to_num(np.round(counts))[None]
    placed: BoolVolume = rank[:, None, None] < length
    return placed


def slice_order(volumes: Sequence[BoolVolume]) -> list[int]:
    """Slices by how much foreground ``volumes`` hold there, most first."""
    per_slice = np.sum([volume.sum(axis=(1, 2)) for volume in volumes], axis=0)
    return [int(z) for z in np.argsort(-per_slice, kind="stable")]


def place_calibrated(
    counts: FloatMap, prior_counts: FloatMap, prior_volumes: Sequence[BoolVolume]
) -> BoolVolume:
    """Per count, the slices where the other site's pixels of that count are mostly fg.

    The other site's counts are estimated from its own release, as the attacker's
    are, so the calibration sees what the attacker sees.

    Example:
        >>> prior = np.zeros((3, 1, 2), dtype=bool); prior[0:2, 0, 0] = True
        >>> placed = place_calibrated(np.array([[1.9, 0.0]]), np.array([[2.0, 0.0]]),
        ...                           [prior])
        >>> placed[:, 0, 0].tolist(), placed[:, 0, 1].tolist()
        ([True, True, False], [False, False, False])
    """
    frequency = np.mean(np.stack(prior_volumes), axis=0)
    prior_bins = np.round(np.nan_to_num(prior_counts) / COUNT_STEP)
    bins = np.round(np.nan_to_num(counts) / COUNT_STEP)
    known = np.unique(prior_bins[prior_bins > 0])
    placed = np.zeros(frequency.shape, dtype=bool)
    if known.size == 0:
        return placed
    for value in np.unique(bins[bins > 0]):
        nearest = known[np.argmin(np.abs(known - value))]
        profile = frequency[:, prior_bins == nearest].mean(axis=1) > 0.5
        placed[:, bins == value] = profile[:, None]
    return placed


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VolumeGuesses:
    """One map per strategy, each the attacker's guess for every case.

    Attributes:
        maps: strategy -> ``(Z, S, S)`` map (every case gets the same).
        estimate: the counts the strategies placed.
        measured_cells: cells whose value came back.
    """

    maps: dict[str, BoolVolume]
    estimate: CountEstimate
    measured_cells: int


def decode_volumes(
    values: Mapping[int, float],
    whole: float,
    code: PixelCode,
    *,
    prior_volumes: Sequence[BoolVolume],
    decimals: int | None,
) -> VolumeGuesses:
    """Every strategy's guess (module docstring) from the returned cell values.

    Args:
        values: cell -> returned mean Dice.
        whole: the whole-image predictor's mean Dice (nan if not measured).
        code: the cells.
        prior_volumes: another site's maps, at the site's image size (the attacker
            holds them); their slice count is the one assumed.
        decimals: the precision the site states (``limits.metric-decimals``), used
            to release the prior's maps as the site would for the calibration
            (None: full precision).

    Raises:
        ValueError: no prior maps (they give the slice count).
    """
    if not prior_volumes:
        raise ValueError("decoding whole volumes needs another site's maps")
    slices = int(prior_volumes[0].shape[0])
    prior_mean = float(np.mean([volume.sum() for volume in prior_volumes]))
    estimate = estimate_counts(
        values, whole, code, slices=slices, prior_volume=prior_mean
    )
    prior_values, prior_whole = release_values(prior_volumes, code, decimals=decimals)
    prior_counts = estimate_counts(
        prior_values, prior_whole, code, slices=slices
    ).counts
    prior_map = np.mean(np.stack(prior_volumes), axis=0) > 0.5
    unmeasured = np.isnan(estimate.counts)
    maps = {
        "centred": place_centred(estimate.counts, slices),
        "prior-ranked": place_ranked(estimate.counts, slice_order(prior_volumes)),
        "prior-calibrated": place_calibrated(
            estimate.counts, prior_counts, prior_volumes
        ),
    }
    for guess in maps.values():
        guess[:, unmeasured] = prior_map[:, unmeasured]
    return VolumeGuesses(maps=maps, estimate=estimate, measured_cells=len(values))
