"""SeqTran task affinity: what the coordinator computes from site task profiles.

Owns the affinity terms of docs/methods.md#affinity, computed from
:class:`~core.affinity.profile.SiteProfile` values (built by
:mod:`core.affinity.profile`, optionally noised by :mod:`core.affinity.profile_noise`):

- ``H`` = exact 1-D Wasserstein-1 distance between quantile functions; ``R`` = global
  single-window SSIM (K1 = K2 = 0.3, L = 1); both min-max normalised;
  ``d = a * H_norm + b * (1 - R_norm)``. Path search is in :mod:`core.affinity.paths`.
- The named option ``P`` (docs/methods.md#polarity-term): the mean absolute
  difference of two sites' contrast functions (foreground minus shell intensity
  quantiles), min-max normalised; ``d = a * H_norm + b * (1 - R_norm) + c * P_norm``,
  and ``c = 0`` is exactly the paper's two-term ``d``.

Pure numpy; never reads site data and never imports flwr or opacus.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from core.affinity.profile import SiteProfile

FloatArray: TypeAlias = npt.NDArray[np.float64]


def wasserstein_1d_from_quantiles(
    quantiles_a: npt.ArrayLike, quantiles_b: npt.ArrayLike
) -> float:
    """Return the exact W1 between two quantile functions at the same K midpoints.

    Each is an equal-weight K-point distribution, whose optimal coupling matches
    sorted values, so ``W1 = mean |sort(a) - sort(b)|``.

    Example:
        >>> wasserstein_1d_from_quantiles([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
        1.0
    """
    first = np.sort(np.asarray(quantiles_a, dtype=np.float64).ravel())
    second = np.sort(np.asarray(quantiles_b, dtype=np.float64).ravel())
    if first.shape != second.shape or first.size == 0:
        raise ValueError(
            "quantile functions must have the same, non-zero number of quantiles, "
            f"got {first.size} and {second.size}"
        )
    if not (np.all(np.isfinite(first)) and np.all(np.isfinite(second))):
        raise ValueError("quantile functions hold NaN or inf values")
    return float(np.mean(np.abs(first - second)))


def global_ssim(
    first: npt.ArrayLike,
    second: npt.ArrayLike,
    *,
    k1: float = 0.3,
    k2: float = 0.3,
    data_range: float = 1.0,
) -> float:
    """Return the single-window SSIM of two whole arrays (docs/methods.md#affinity).

    ``(2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))``
    with ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range``. Variances and the
    covariance are population moments (the reference code mixed ``np.var`` with
    ``np.cov``'s n - 1, which puts an array's SSIM with itself above 1).

    Example:
        >>> global_ssim(np.eye(3), np.eye(3))
        1.0

    Raises:
        ValueError: the shapes differ or are empty, or a constant is not > 0 (it
            keeps the ratio defined on constant arrays).
    """
    if min(k1, k2, data_range) <= 0:
        raise ValueError(
            f"k1, k2 and data_range must be > 0, got {k1}, {k2}, {data_range}"
        )
    array_a = np.asarray(first, dtype=np.float64)
    array_b = np.asarray(second, dtype=np.float64)
    if array_a.shape != array_b.shape or array_a.size == 0:
        raise ValueError(
            "SSIM needs two non-empty arrays of the same shape, got "
            f"{array_a.shape} and {array_b.shape}"
        )
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mean_a, mean_b = float(array_a.mean()), float(array_b.mean())
    centred_a, centred_b = array_a - mean_a, array_b - mean_b
    var_a, var_b = float(np.mean(centred_a**2)), float(np.mean(centred_b**2))
    covariance = float(np.mean(centred_a * centred_b))
    numerator = (2 * mean_a * mean_b + c1) * (2 * covariance + c2)
    denominator = (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    return numerator / denominator


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteMatrix:
    """A square matrix over named sites; ``values[i, j]`` goes from site i to site j.

    Attributes:
        sites: the site names, unique, in row/column order.
        values: ``(n, n)`` finite values (stored read-only).
    """

    sites: tuple[str, ...]
    values: FloatArray

    def __post_init__(self) -> None:
        values = np.array(self.values, dtype=np.float64)
        values.flags.writeable = False
        count = len(self.sites)
        if len(set(self.sites)) != count:
            raise ValueError(f"site names must be unique, got {self.sites}")
        if values.shape != (count, count):
            raise ValueError(
                f"a matrix over {count} sites must be ({count}, {count}), got "
                f"{values.shape}"
            )
        bad = np.argwhere(~np.isfinite(values))
        if bad.size:
            row, col = bad[0]
            raise ValueError(
                f"matrix value from {self.sites[row]} to {self.sites[col]} is "
                f"{values[row, col]} (NaN/inf); every value must be finite"
            )
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "values", values)

    def get(self, source: str, target: str) -> float:
        """Return the value from ``source`` to ``target``."""
        return float(self.values[self.index(source), self.index(target)])

    def index(self, site: str) -> int:
        """Return the row of ``site``; ValueError names it when unknown."""
        try:
            return self.sites.index(site)
        except ValueError:
            raise ValueError(
                f"unknown site {site!r}; the matrix covers {list(self.sites)}"
            ) from None


def image_distance(first: SiteProfile, second: SiteProfile) -> float:
    """Return H: the W1 distance between two sites' mean image quantile functions.

    Raises:
        ValueError: the profiles were computed with different K or clip.
    """
    if first.quantile_clip != second.quantile_clip:
        raise ValueError(
            f"sites {first.site} and {second.site} used different quantile clips "
            f"({first.quantile_clip} and {second.quantile_clip})"
        )
    if first.image_quantiles.size != second.image_quantiles.size:
        raise ValueError(
            f"sites {first.site} and {second.site} have different numbers of image "
            f"quantiles ({first.image_quantiles.size} and "
            f"{second.image_quantiles.size})"
        )
    return wasserstein_1d_from_quantiles(first.image_quantiles, second.image_quantiles)


def label_similarity(first: SiteProfile, second: SiteProfile) -> float:
    """Return R: the global SSIM (K1 = K2 = 0.3, L = 1) of two mean label maps.

    Raises:
        ValueError: a site has no label term (no labelled training cases), or the maps
            are on different grids.
    """
    maps = []
    for profile in (first, second):
        if profile.mean_label_map is None:
            raise ValueError(
                f"site {profile.site} has no label term (no labelled training "
                "cases), so its label similarity is undefined"
            )
        maps.append(profile.mean_label_map)
    if maps[0].shape != maps[1].shape:
        raise ValueError(
            f"sites {first.site} and {second.site} have label maps on different "
            f"grids: {maps[0].shape} and {maps[1].shape}"
        )
    return global_ssim(maps[0], maps[1])


def contrast_function(profile: SiteProfile) -> FloatArray:
    """Foreground minus shell intensity quantiles ``(K_p,)`` of a site's profile.

    Positive where the structure is brighter than its surroundings; an inverted
    contrast flips its sign, which the image term cannot see.

    Raises:
        ValueError: the profile has no polarity term.
    """
    inside, shell = profile.foreground_intensities, profile.shell_intensities
    if inside is None or shell is None:
        raise ValueError(
            f"site {profile.site} has no polarity term (not computed, or no labelled "
            "cases), so its polarity distance is undefined"
        )
    contrast: FloatArray = np.sort(inside) - np.sort(shell)
    return contrast


def polarity_distance(first: SiteProfile, second: SiteProfile) -> float:
    """Return P: the mean absolute difference of two sites' contrast functions.

    ``mean_k |c_1(k) - c_2(k)|`` with ``c`` = :func:`contrast_function`, in z-score
    units: sites whose structure stands out the same way from its surroundings are
    near, sites of opposite polarity far apart (about twice their contrast).

    Raises:
        ValueError: a site has no polarity term, or the terms differ in K_p or clip.
    """
    if first.quantile_clip != second.quantile_clip:
        raise ValueError(
            f"sites {first.site} and {second.site} used different quantile clips "
            f"({first.quantile_clip} and {second.quantile_clip})"
        )
    contrast_a, contrast_b = contrast_function(first), contrast_function(second)
    if contrast_a.shape != contrast_b.shape:
        raise ValueError(
            f"sites {first.site} and {second.site} have polarity terms of different "
            f"lengths ({contrast_a.size} and {contrast_b.size})"
        )
    return float(np.mean(np.abs(contrast_a - contrast_b)))


def polarity_matrix(profiles: Mapping[str, SiteProfile]) -> SiteMatrix:
    """Return the raw pairwise ``P`` over the sites, in the mapping's order.

    Raises:
        ValueError: a key differs from its profile's site name, or a pair fails
            :func:`polarity_distance` (a site without a polarity term).
    """
    for name, profile in profiles.items():
        if profile.site != name:
            raise ValueError(f"profile of site {profile.site} is filed under {name}")
    sites = tuple(profiles)
    values = np.zeros((len(sites), len(sites)))
    for row, first in enumerate(sites):
        for col in range(row + 1, len(sites)):
            values[row, col] = values[col, row] = polarity_distance(
                profiles[first], profiles[sites[col]]
            )
    return SiteMatrix(sites=sites, values=values)


def has_polarity(profiles: Mapping[str, SiteProfile]) -> bool:
    """Whether every profile carries a polarity term (so ``P`` is defined)."""
    return all(
        profile.foreground_intensities is not None for profile in profiles.values()
    )


def affinity_matrices(
    profiles: Mapping[str, SiteProfile], *, with_labels: bool = True
) -> tuple[SiteMatrix, SiteMatrix]:
    """Return the raw pairwise ``(H, R)`` over the sites, in the mapping's order.

    With ``with_labels=False`` (a site without labelled cases takes part, e.g. an
    unlabelled target) ``R`` is 1 everywhere: a constant term that :func:`normalise`
    turns into no contribution, so ``d`` is the image term alone.

    Raises:
        ValueError: a key differs from its profile's site name, or a pair fails
            :func:`image_distance` / :func:`label_similarity` (e.g. a site without
            labels: callers decide whether to drop it).
    """
    for name, profile in profiles.items():
        if profile.site != name:
            raise ValueError(f"profile of site {profile.site} is filed under {name}")
    sites = tuple(profiles)
    count = len(sites)
    image = np.zeros((count, count))
    label = np.ones((count, count))
    for row, first in enumerate(sites):
        for col in range(row, count):
            second = profiles[sites[col]]
            image[row, col] = image[col, row] = image_distance(profiles[first], second)
            if with_labels:
                label[row, col] = label[col, row] = label_similarity(
                    profiles[first], second
                )
    return SiteMatrix(sites=sites, values=image), SiteMatrix(sites=sites, values=label)


def _min_max_off_diagonal(values: FloatArray) -> FloatArray | None:
    off_diagonal = values[~np.eye(len(values), dtype=bool)]
    low, high = float(off_diagonal.min()), float(off_diagonal.max())
    if high - low <= 0.0:
        return None
    scaled: FloatArray = np.clip((values - low) / (high - low), 0.0, 1.0)
    return scaled


def normalise(
    image_distances: SiteMatrix, label_similarities: SiteMatrix
) -> tuple[SiteMatrix, SiteMatrix]:
    """Min-max ``H`` and ``R`` over all off-diagonal pairs (docs/methods.md#affinity).

    ``H_norm = sqrt(minmax(H))`` (the reference's "Sqrt Normalized WD");
    ``R_norm = minmax(R)``. The diagonal is set to a site's affinity with itself
    (``H_norm = 0``, ``R_norm = 1``). A term whose off-diagonal values are all equal
    separates no pair, so it is set to contribute nothing (``H_norm = 0``,
    ``R_norm = 1``) rather than dividing by zero.

    Example:
        >>> h = SiteMatrix(sites=("A", "B", "C"), values=np.array(
        ...     [[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]))
        >>> h_norm, _ = normalise(h, h)
        >>> h_norm.values[1].round(3)
        array([0.   , 0.   , 0.707])

    Raises:
        ValueError: fewer than two sites, or the two matrices' sites differ.
    """
    if image_distances.sites != label_similarities.sites:
        raise ValueError(
            f"H and R cover different sites: {image_distances.sites} and "
            f"{label_similarities.sites}"
        )
    if len(image_distances.sites) < 2:
        raise ValueError("normalising needs at least two sites")
    diagonal = np.eye(len(image_distances.sites), dtype=bool)
    image = _min_max_off_diagonal(image_distances.values)
    image = (
        np.zeros_like(diagonal, dtype=np.float64) if image is None else np.sqrt(image)
    )
    label = _min_max_off_diagonal(label_similarities.values)
    label = np.ones_like(diagonal, dtype=np.float64) if label is None else label
    image[diagonal], label[diagonal] = 0.0, 1.0
    return (
        SiteMatrix(sites=image_distances.sites, values=image),
        SiteMatrix(sites=image_distances.sites, values=label),
    )


def normalise_polarity(polarity: SiteMatrix) -> SiteMatrix:
    """``P_norm = minmax(P)`` over the off-diagonal pairs, with a zero diagonal.

    No square root (unlike ``H_norm``): ``P`` of a chain of contrasts is already
    about linear in the levels apart. A constant ``P`` separates no pair and becomes
    0 everywhere.

    Example:
        >>> p = SiteMatrix(sites=("A", "B", "C"), values=np.array(
        ...     [[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]))
        >>> normalise_polarity(p).values[1]
        array([0. , 0. , 0.5])

    Raises:
        ValueError: fewer than two sites.
    """
    if len(polarity.sites) < 2:
        raise ValueError("normalising needs at least two sites")
    scaled = _min_max_off_diagonal(polarity.values)
    values = np.zeros_like(polarity.values) if scaled is None else scaled
    np.fill_diagonal(values, 0.0)
    return SiteMatrix(sites=polarity.sites, values=values)


def distance_matrix(
    image_norm: SiteMatrix,
    label_norm: SiteMatrix,
    *,
    image_weight: float = 1.0,
    label_weight: float = 1.0,
    polarity_norm: SiteMatrix | None = None,
    polarity_weight: float = 0.0,
) -> SiteMatrix:
    """Return ``d = a * H_norm + b * (1 - R_norm) + c * P_norm``, zero diagonal.

    ``c = 0`` (the default) is the paper's two-term distance, bit for bit.

    Defaults ``a = b = 1`` (equal weight on the two normalised terms) until
    calibrated. The paper's ``0.0044 * H + 2.4756 * (1 - R)`` is on raw H in its own
    intensity units, and the H range it was fitted on is not published, so it cannot
    be carried over to normalised terms.

    Args:
        image_norm: ``H_norm`` from :func:`normalise`.
        label_norm: ``R_norm`` from :func:`normalise`.
        image_weight: ``a >= 0``.
        label_weight: ``b >= 0``; not both 0.
        polarity_norm: ``P_norm`` from :func:`normalise_polarity`; needed when
            ``polarity_weight > 0``.
        polarity_weight: ``c >= 0``.

    Raises:
        ValueError: a weight is negative or not finite, a and b are both 0, ``c > 0``
            without ``polarity_norm``, or the matrices cover different sites.
    """
    weights = {
        "image_weight": image_weight,
        "label_weight": label_weight,
        "polarity_weight": polarity_weight,
    }
    for name, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"{name} must be finite and >= 0, got {weight}")
    if image_weight == 0.0 and label_weight == 0.0:
        raise ValueError("image_weight and label_weight are both 0: every d would be 0")
    if image_norm.sites != label_norm.sites:
        raise ValueError(
            f"H_norm and R_norm cover different sites: {image_norm.sites} and "
            f"{label_norm.sites}"
        )
    values = image_weight * image_norm.values + label_weight * (1.0 - label_norm.values)
    if polarity_weight > 0.0:
        if polarity_norm is None:
            raise ValueError(
                f"polarity_weight is {polarity_weight} but no P_norm was given"
            )
        if polarity_norm.sites != image_norm.sites:
            raise ValueError(
                f"P_norm and H_norm cover different sites: {polarity_norm.sites} and "
                f"{image_norm.sites}"
            )
        values = values + polarity_weight * polarity_norm.values
    np.fill_diagonal(values, 0.0)
    return SiteMatrix(sites=image_norm.sites, values=values)
