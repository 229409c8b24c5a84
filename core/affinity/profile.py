"""Site task profiles for SeqTran affinity: what a site computes and publishes.

Owns the profile settings, the :class:`SiteProfile` wire contract and how a site builds
its exact profile from its training cases (docs/methods.md#task-profiles,
from profiles instead of raw image pairs, which cannot leave a site):

- Image term. Each training image is z-scored, resized to ``S^3`` with anti-aliasing,
  reshaped to ``(S*S, S)`` (rows in-plane voxels, columns slices) and projected on its
  own PCA keeping 75% of the variance. Its flattened scores, divided by ``sqrt(S)`` so
  values are in z-score units whatever ``S`` is (only a scale: H is min-max normalised),
  give a 1-D distribution whose quantile function at ``K`` midpoints is clipped to
  ``[-clip, clip]``. The site publishes the mean of these: in 1-D that is the
  Wasserstein-2 barycenter, and the mean has bounded sensitivity for DP.
- Label term. The mean foreground map of the labelled training cases on a ``G^3`` grid
  and the quantiles of their foreground fractions. ``R`` uses the map only.
- Polarity term (a named option, docs/methods.md#polarity-term; computed only when the
  run weighs it). Over the labelled training cases, each image z-scored as for the
  image term: the ``K_p`` midpoint quantiles of the intensities inside the foreground
  and inside an in-plane shell around it, clipped to ``[-clip, clip]``, averaged over
  the cases. The image term cannot see contrast polarity (z-scoring and the PCA sign
  rule map an inverted image onto nearly the same quantiles); foreground minus shell
  changes sign with it.

The optional DP release is :mod:`core.affinity.profile_noise`; what the coordinator
computes from profiles is :mod:`core.affinity.matrix`. Pure numpy/scipy; reads sites
through :mod:`core.data.dataset`; never imports flwr, opacus or either of those two
modules.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from core.coerce import as_float
from core.config import AffinityConfig
from core.data.dataset import index_site, normalise_intensity, read_case

FloatArray: TypeAlias = npt.NDArray[np.float64]
ProfileValue: TypeAlias = str | int | float | list[float] | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProfileSettings:
    """How a site computes its task profile (the coordinator sends the same to all).

    Attributes:
        image_size: ``S``, the side of the cube every image is resized to.
        pca_variance: explained-variance fraction the per-image PCA keeps.
        num_quantiles: ``K``, midpoint quantiles of the image term.
        quantile_clip: image quantiles are clipped to ``[-clip, clip]`` (z-score units)
            before averaging, bounding one image's influence.
        label_grid: ``G``, the side of the mean foreground map.
        num_foreground_quantiles: midpoint quantiles of the foreground fractions.
        polarity_quantiles: ``K_p``, midpoint quantiles of the polarity term's
            foreground and shell intensities; 0 computes no polarity term.
        polarity_shell: the shell's in-plane width in voxels (>= 1).
    """

    image_size: int
    pca_variance: float
    num_quantiles: int
    quantile_clip: float
    label_grid: int
    num_foreground_quantiles: int
    polarity_quantiles: int = 0
    polarity_shell: int = 3

    def __post_init__(self) -> None:
        for name in ("image_size", "num_quantiles", "label_grid"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if self.num_foreground_quantiles < 1:
            raise ValueError(
                "num_foreground_quantiles must be >= 1, got "
                f"{self.num_foreground_quantiles}"
            )
        if not 0.0 < self.pca_variance <= 1.0:
            raise ValueError(f"pca_variance must be in (0, 1], got {self.pca_variance}")
        if not (math.isfinite(self.quantile_clip) and self.quantile_clip > 0):
            raise ValueError(f"quantile_clip must be > 0, got {self.quantile_clip}")
        if self.polarity_quantiles < 0 or self.polarity_shell < 1:
            raise ValueError(
                "polarity_quantiles must be >= 0 and polarity_shell >= 1, got "
                f"{self.polarity_quantiles} and {self.polarity_shell}"
            )


def profile_settings(
    affinity: AffinityConfig, *, polarity: bool | None = None
) -> ProfileSettings:
    """The profile settings of the run config's ``affinity`` group.

    ``polarity`` None computes the polarity term exactly when the run weighs it
    (``affinity.polarity-weight > 0``), so the paper's form (weight 0) computes and
    releases what it always did; True or False forces it (the benchmark computes it
    to calibrate its weight).

    The defaults (pyproject): S = 32 suits our small volumes (the paper uses 128). A
    clip of 4 z-score units keeps the outermost quantiles of every synthetic case we
    tried (|q| <= 3.75, 64 cases) and cuts only the far tail of heavy-tailed scans;
    the DP noise grows with the clip.

    Example:
        >>> from core.config import load_default_config
        >>> profile_settings(load_default_config().affinity).num_quantiles
        101
    """
    return ProfileSettings(
        image_size=affinity.image_size,
        pca_variance=affinity.pca_variance,
        num_quantiles=affinity.quantiles,
        quantile_clip=affinity.quantile_clip,
        label_grid=affinity.label_grid,
        num_foreground_quantiles=affinity.foreground_quantiles,
        polarity_quantiles=(
            affinity.polarity_quantiles
            if (affinity.polarity_weight > 0 if polarity is None else polarity)
            else 0
        ),
        polarity_shell=affinity.polarity_shell,
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProfileNoise:
    """The Gaussian noise a released profile carries (ε at δ of this release only)."""

    noise_multiplier: float
    delta: float
    epsilon: float


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteProfile:
    """The aggregate statistics a site publishes for task affinity.

    Attributes:
        site: the site's name.
        image_quantiles: ``(K,)`` mean image quantile function, in ``[-clip, clip]``.
        quantile_clip: the clip bound the quantiles were computed with.
        mean_label_map: ``(G, G, G)`` mean foreground occupancy in [0, 1], or
            ``None`` for a site without labelled training cases.
        foreground_quantiles: ``(K_f,)`` foreground-fraction quantiles in [0, 1], or
            ``None`` without labels.
        num_images: training images (labelled and unlabelled) in the image term.
        num_labelled: labelled training cases in the label term.
        noise: the DP noise added, or ``None`` for an exact profile.
        foreground_intensities: ``(K_p,)`` mean quantile function of the z-scored
            intensities inside the foreground, in ``[-clip, clip]``; ``None`` without
            a polarity term (not computed, or no labelled cases).
        shell_intensities: ``(K_p,)`` the same inside the shell around the
            foreground; given exactly when ``foreground_intensities`` is.
    """

    site: str
    image_quantiles: FloatArray
    quantile_clip: float
    mean_label_map: FloatArray | None
    foreground_quantiles: FloatArray | None
    num_images: int
    num_labelled: int
    noise: ProfileNoise | None
    foreground_intensities: FloatArray | None = None
    shell_intensities: FloatArray | None = None

    def __post_init__(self) -> None:
        # A profile may come off the wire, so every invariant is checked here.
        quantiles = _frozen(self.image_quantiles)
        if quantiles.ndim != 1 or quantiles.size < 2:
            raise ValueError(
                f"site {self.site}: image_quantiles must be a vector of >= 2 "
                f"values, got shape {quantiles.shape}"
            )
        _check_range(self.site, "image_quantiles", quantiles, self.quantile_clip)
        if self.num_images < 1:
            raise ValueError(f"site {self.site}: num_images must be >= 1")
        # The label term comes with labelled cases, and both parts or neither; a
        # site with fewer labelled cases than its limits.min-cases withholds it, so
        # labelled cases without a label term are a profile too.
        has_map = self.mean_label_map is not None
        if has_map != (self.foreground_quantiles is not None) or (
            has_map and self.num_labelled < 1
        ):
            raise ValueError(
                f"site {self.site}: mean_label_map and foreground_quantiles must be "
                f"given together, and only with num_labelled > 0 (num_labelled = "
                f"{self.num_labelled})"
            )
        object.__setattr__(self, "image_quantiles", quantiles)
        if self.mean_label_map is not None and self.foreground_quantiles is not None:
            label_map = _frozen(self.mean_label_map)
            if label_map.ndim != 3 or len(set(label_map.shape)) != 1:
                raise ValueError(
                    f"site {self.site}: mean_label_map must be a (G, G, G) cube, "
                    f"got shape {label_map.shape}"
                )
            fractions = _frozen(self.foreground_quantiles)
            _check_range(self.site, "mean_label_map", label_map, None)
            _check_range(self.site, "foreground_quantiles", fractions, None)
            object.__setattr__(self, "mean_label_map", label_map)
            object.__setattr__(self, "foreground_quantiles", fractions)
        self._check_polarity()

    def _check_polarity(self) -> None:
        inside, shell = self.foreground_intensities, self.shell_intensities
        if (inside is None) != (shell is None):
            raise ValueError(
                f"site {self.site}: foreground_intensities and shell_intensities "
                "must come together (a polarity term) or not at all"
            )
        if inside is None or shell is None:
            return
        if self.num_labelled < 1:
            raise ValueError(
                f"site {self.site}: a polarity term needs labelled cases "
                f"(num_labelled = {self.num_labelled})"
            )
        inside, shell = _frozen(inside), _frozen(shell)
        if inside.ndim != 1 or inside.size < 1 or inside.shape != shell.shape:
            raise ValueError(
                f"site {self.site}: foreground_intensities and shell_intensities must "
                f"be vectors of the same length >= 1, got shapes {inside.shape} and "
                f"{shell.shape}"
            )
        _check_range(self.site, "foreground_intensities", inside, self.quantile_clip)
        _check_range(self.site, "shell_intensities", shell, self.quantile_clip)
        object.__setattr__(self, "foreground_intensities", inside)
        object.__setattr__(self, "shell_intensities", shell)

    def to_dict(self) -> dict[str, ProfileValue]:
        """Flatten to plain values for the wire (the label map as a flat list)."""
        noise = self.noise
        return {
            "site": self.site,
            "image_quantiles": self.image_quantiles.tolist(),
            "quantile_clip": self.quantile_clip,
            "label_grid": (
                None if self.mean_label_map is None else self.mean_label_map.shape[0]
            ),
            "mean_label_map": (
                None
                if self.mean_label_map is None
                else self.mean_label_map.ravel().tolist()
            ),
            "foreground_quantiles": (
                None
                if self.foreground_quantiles is None
                else self.foreground_quantiles.tolist()
            ),
            "num_images": self.num_images,
            "num_labelled": self.num_labelled,
            "noise_multiplier": None if noise is None else noise.noise_multiplier,
            "delta": None if noise is None else noise.delta,
            "epsilon": None if noise is None else noise.epsilon,
            "foreground_intensities": _as_list(self.foreground_intensities),
            "shell_intensities": _as_list(self.shell_intensities),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, ProfileValue]) -> SiteProfile:
        """Rebuild and check a profile written by :meth:`to_dict`.

        Raises:
            ValueError: a key is missing or unknown, or a value has the wrong type.
        """
        expected = set(_PROFILE_KEYS)
        if set(values) != expected:
            missing = sorted(expected - set(values))
            unknown = sorted(set(values) - expected)
            raise ValueError(f"profile keys: missing {missing}, unknown {unknown}")
        grid = values["label_grid"]
        flat_map = _optional_vector(values, "mean_label_map")
        label_map = None
        if flat_map is not None:
            if not isinstance(grid, int) or flat_map.size != grid**3:
                raise ValueError(
                    f"profile: mean_label_map has {flat_map.size} values, which is "
                    f"not label_grid^3 for label_grid = {grid!r}"
                )
            label_map = flat_map.reshape(grid, grid, grid)
        noise_values = [values[key] for key in ("noise_multiplier", "delta", "epsilon")]
        noise = None
        if any(value is not None for value in noise_values):
            multiplier, delta, epsilon = (_number(values, key) for key in _NOISE_KEYS)
            noise = ProfileNoise(
                noise_multiplier=multiplier, delta=delta, epsilon=epsilon
            )
        site, num_images, num_labelled = (
            values["site"],
            values["num_images"],
            values["num_labelled"],
        )
        if not isinstance(site, str):
            raise ValueError(f"profile: site must be a string, got {site!r}")
        if not (isinstance(num_images, int) and isinstance(num_labelled, int)):
            raise ValueError(
                f"profile: num_images and num_labelled must be integers, got "
                f"{num_images!r} and {num_labelled!r}"
            )
        image_quantiles = _optional_vector(values, "image_quantiles")
        if image_quantiles is None:
            raise ValueError("profile: image_quantiles must not be None")
        return cls(
            site=site,
            image_quantiles=image_quantiles,
            quantile_clip=_number(values, "quantile_clip"),
            mean_label_map=label_map,
            foreground_quantiles=_optional_vector(values, "foreground_quantiles"),
            num_images=num_images,
            num_labelled=num_labelled,
            noise=noise,
            foreground_intensities=_optional_vector(values, "foreground_intensities"),
            shell_intensities=_optional_vector(values, "shell_intensities"),
        )


def _as_list(values: FloatArray | None) -> list[float] | None:
    return None if values is None else values.tolist()


_NOISE_KEYS: Final = ("noise_multiplier", "delta", "epsilon")
_PROFILE_KEYS: Final = (
    "site",
    "image_quantiles",
    "quantile_clip",
    "label_grid",
    "mean_label_map",
    "foreground_quantiles",
    "num_images",
    "num_labelled",
    *_NOISE_KEYS,
    "foreground_intensities",
    "shell_intensities",
)


def _frozen(values: npt.ArrayLike) -> FloatArray:
    array = np.array(values, dtype=np.float64)
    array.flags.writeable = False
    return array


def _check_range(site: str, name: str, values: FloatArray, clip: float | None) -> None:
    low, high = (0.0, 1.0) if clip is None else (-clip, clip)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"site {site}: {name} holds NaN or inf values")
    if values.size and (values.min() < low or values.max() > high):
        raise ValueError(
            f"site {site}: {name} must lie in [{low}, {high}], found "
            f"[{values.min():.4g}, {values.max():.4g}]"
        )


def _optional_vector(values: Mapping[str, ProfileValue], key: str) -> FloatArray | None:
    value = values[key]
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"profile: {key} must be a list of numbers, got {value!r:.60}")
    return np.asarray(value, dtype=np.float64)


def _number(values: Mapping[str, ProfileValue], key: str) -> float:
    return as_float(values[key], f"profile: {key}")


def midpoint_quantiles(values: npt.ArrayLike, count: int) -> FloatArray:
    """Return the empirical quantile function of ``values`` at ``(k + 0.5) / count``.

    The exact inverse of the empirical CDF (``inverted_cdf``), so ``count`` equal to
    the sample size gives the sorted sample back.

    Example:
        >>> midpoint_quantiles([3.0, 1.0, 2.0], 3)
        array([1., 2., 3.])
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0 or count < 1:
        raise ValueError(
            f"need >= 1 value and count >= 1, got {flat.size} values, count {count}"
        )
    levels = (np.arange(count) + 0.5) / count
    return np.quantile(flat, levels, method="inverted_cdf")


def resize_volume(volume: npt.NDArray[np.floating], size: int) -> FloatArray:
    """Resize a ``(Z, Y, X)`` volume to ``(size, size, size)`` with anti-aliasing.

    As ``skimage.transform.resize(anti_aliasing=True)`` does (the reference code):
    a Gaussian pre-filter with sigma ``(factor - 1) / 2`` on each shrunk axis, then
    linear interpolation on the pixel grid. Values stay within the input's range.

    Example:
        >>> resize_volume(np.ones((10, 64, 64)), 8).shape
        (8, 8, 8)
    """
    values = np.asarray(volume, dtype=np.float64)
    if values.ndim != 3 or min(values.shape) < 1:
        raise ValueError(f"expected a non-empty (Z, Y, X) volume, got {values.shape}")
    factors = np.array(values.shape, dtype=np.float64) / size
    sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
    if np.any(sigma > 0):
        values = ndimage.gaussian_filter(values, sigma, mode="nearest")
    resized: FloatArray = ndimage.zoom(
        values, 1.0 / factors, order=1, mode="nearest", grid_mode=True
    )
    if resized.shape != (size, size, size):  # zoom rounds the output shape
        raise ValueError(f"resize to {size}^3 gave {resized.shape}")
    return resized


def build_image_quantiles(
    image: npt.NDArray[np.floating], *, settings: ProfileSettings
) -> FloatArray:
    """Return one image's clipped PCA-score quantile function ``(K,)``.

    Args:
        image: ``(Z, Y, X)`` intensities; z-scored here.
        settings: ``image_size``, ``pca_variance``, ``num_quantiles``,
            ``quantile_clip``.
    """
    size = settings.image_size
    cube = resize_volume(normalise_intensity(image.astype(np.float32)), size)
    # (Z, Y, X) -> rows = in-plane voxels (Y, X), columns = slices (Z).
    matrix = cube.transpose(1, 2, 0).reshape(size * size, size)
    matrix = matrix - matrix.mean(axis=0)
    left, singular, right = np.linalg.svd(matrix, full_matrices=False)
    variance = singular**2
    total = float(variance.sum())
    if total <= 0.0:  # a constant image: every score is 0
        scores = np.zeros(size * size)
    else:
        # sklearn's rule for a float n_components: the fewest components whose
        # cumulative ratio exceeds the fraction.
        ratio = np.cumsum(variance) / total
        keep = min(
            int(np.searchsorted(ratio, settings.pca_variance, "right")) + 1, size
        )
        # sklearn's sign rule (>= 1.5): each component's largest loading is positive;
        # the per-image axes are otherwise sign-ambiguous and would flip the scores.
        biggest = np.argmax(np.abs(right[:keep]), axis=1)
        signs = np.sign(right[np.arange(keep), biggest])
        scores = left[:, :keep] * (singular[:keep] * signs)
    quantiles = midpoint_quantiles(scores / math.sqrt(size), settings.num_quantiles)
    return np.clip(quantiles, -settings.quantile_clip, settings.quantile_clip)


def build_polarity_quantiles(
    image: npt.NDArray[np.floating],
    label: npt.NDArray[np.integer],
    *,
    settings: ProfileSettings,
) -> tuple[FloatArray, FloatArray]:
    """One labelled case's foreground and shell intensity quantiles, ``(K_p,)`` each.

    The image is z-scored as for the image term (at full resolution). The foreground
    is ``label > 0``; the shell is the foreground dilated in-plane (each slice, a 3 x 3
    cross ``polarity_shell`` times) minus the foreground: in-plane, so that a site's
    slice thickness does not change its width. Both quantile functions are clipped to
    ``[-clip, clip]``. A case with an empty foreground or shell gives zeros for that
    function, so every case weighs the same in the mean (the DP sensitivity assumes
    so).

    Example:
        >>> image = np.zeros((1, 9, 9)); image[0, 3:6, 3:6] = 1.0
        >>> label = (image > 0).astype(np.int64)
        >>> settings = ProfileSettings(image_size=2, pca_variance=0.75,
        ...     num_quantiles=2, quantile_clip=4.0, label_grid=2,
        ...     num_foreground_quantiles=1, polarity_quantiles=1)
        >>> inside, shell = build_polarity_quantiles(image, label, settings=settings)
        >>> bool(inside[0] > 0 > shell[0])
        True
    """
    if settings.polarity_quantiles < 1:
        raise ValueError("settings compute no polarity term (polarity_quantiles = 0)")
    values = normalise_intensity(image.astype(np.float32)).astype(np.float64)
    foreground = np.asarray(label) > 0
    if foreground.shape != values.shape:
        raise ValueError(
            f"label shape {foreground.shape} differs from image shape {values.shape}"
        )
    structure = np.zeros((1, 3, 3), dtype=bool)
    structure[0, 1, :] = structure[0, :, 1] = True
    dilated = ndimage.binary_dilation(
        foreground, structure=structure, iterations=settings.polarity_shell
    )
    shell = dilated & ~foreground
    count, clip = settings.polarity_quantiles, settings.quantile_clip
    functions = []
    for region in (foreground, shell):
        if not region.any():
            functions.append(np.zeros(count))
            continue
        quantiles = midpoint_quantiles(values[region], count)
        functions.append(np.clip(quantiles, -clip, clip))
    return functions[0], functions[1]


def build_foreground_map(label: npt.NDArray[np.integer], *, grid: int) -> FloatArray:
    """Return the foreground (``label > 0``) occupancy of a case on a ``grid^3`` cube.

    Resized like images (anti-aliased, linear), so each cell holds about the fraction
    of it covered by foreground: smoother than nearest-neighbour and still in [0, 1].
    """
    occupancy = resize_volume((label > 0).astype(np.float64), grid)
    return np.clip(occupancy, 0.0, 1.0)


def pool_values(values: list[float], group: int) -> list[float]:
    """``values`` sorted and pooled into means of at least ``group`` values each.

    With fewer than ``group`` values or ``group <= 1`` the values come back as they
    are (sorted). A quantile of a few values is one of those values; pooled, every
    value released stands on at least ``group`` of them.

    Example:
        >>> pool_values([0.4, 0.1, 0.3, 0.2, 0.9], 2)
        [0.15000000000000002, 0.5333333333333333]
        >>> pool_values([0.2, 0.1], 1)
        [0.1, 0.2]
    """
    ordered = sorted(values)
    if group <= 1 or len(ordered) < group:
        return ordered
    groups = len(ordered) // group
    bounds = [k * group for k in range(groups)] + [len(ordered)]
    return [
        float(np.mean(ordered[start:stop]))
        for start, stop in itertools.pairwise(bounds)
    ]


def build_site_profile(
    site_dir: Path, settings: ProfileSettings, *, pool_cases: int = 1
) -> SiteProfile:
    """Compute a site's exact (un-noised) task profile from its training cases.

    Args:
        site_dir: a site folder (docs/architecture.md#site-folders). The image term uses
            every training image (``imagesTr``, labelled or not); the label term the
            labelled training cases. Evaluation cases (``imagesTs``) are never read.
        settings: what to compute.
        pool_cases: the foreground-fraction quantiles are taken of the fractions
            pooled into means of at least this many cases (:func:`pool_values`), so
            that no released quantile is one case's fraction; 1 (the method as
            published) pools nothing. A site releasing its profile without DP pools
            by its ``limits.min-cases``; under DP the noise protects the cases and
            the quantiles are not pooled (the noise's sensitivity assumes so).

    Returns:
        The profile; a site without labelled training cases gets no label term.

    Raises:
        SiteDataError: a case is missing, unreadable or invalid
            (from core.data.dataset).
        ValueError: the site has no training images.
    """
    index = index_site(Path(site_dir))
    cases = index.training_images
    if not cases:
        raise ValueError(f"site {index.name}: no training images (imagesTr) to profile")
    image_quantiles, label_maps, fractions = [], [], []
    inside: list[FloatArray] = []
    shell: list[FloatArray] = []
    for case in cases:
        loaded = read_case(case, num_classes=len(index.class_names))
        image_quantiles.append(build_image_quantiles(loaded.image, settings=settings))
        if loaded.label is not None:
            label_maps.append(
                build_foreground_map(loaded.label, grid=settings.label_grid)
            )
            fractions.append(float(np.mean(loaded.label > 0)))
            if settings.polarity_quantiles > 0:
                case_inside, case_shell = build_polarity_quantiles(
                    loaded.image, loaded.label, settings=settings
                )
                inside.append(case_inside)
                shell.append(case_shell)
    return SiteProfile(
        site=index.name,
        image_quantiles=np.mean(image_quantiles, axis=0),
        quantile_clip=settings.quantile_clip,
        mean_label_map=np.mean(label_maps, axis=0) if label_maps else None,
        foreground_quantiles=(
            midpoint_quantiles(
                pool_values(fractions, pool_cases), settings.num_foreground_quantiles
            )
            if fractions
            else None
        ),
        num_images=len(cases),
        num_labelled=len(label_maps),
        noise=None,
        foreground_intensities=np.mean(inside, axis=0) if inside else None,
        shell_intensities=np.mean(shell, axis=0) if shell else None,
    )
