"""Optional DP release of a site task profile: sensitivities, noise and its ε.

Owns the replace-one-case L2 sensitivities of a
:class:`~core.affinity.profile.SiteProfile`, the Gaussian mechanism that noises it, and
the RDP-to-(ε, δ) conversion that states the cost of one release. The noise record
itself, :class:`~core.affinity.profile.ProfileNoise`, is part of the profile's wire
contract and lives with it. Pure numpy; never imports flwr or opacus (the conversion is
re-implemented here and tested against Opacus) nor :mod:`core.affinity.matrix`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt

from core.affinity.profile import ProfileNoise, SiteProfile

FloatArray: TypeAlias = npt.NDArray[np.float64]

# Opacus' RDPAccountant.DEFAULT_ALPHAS, so our ε equals Opacus' for the same history.
RDP_ORDERS: Final = np.array(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=np.float64
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProfileSensitivity:
    """L2 sensitivities of a profile's parts when one training case is replaced.

    Case counts are public (they travel with the profile), so a neighbouring site has
    the same ``num_images`` and ``num_labelled``.

    Attributes:
        image: ``2 * clip * sqrt(K) / num_images``: each image's clipped quantile
            vector lies in ``[-clip, clip]^K``.
        label_map: ``sqrt(G^3) / num_labelled``: each case's map lies in ``[0, 1]``.
        foreground: ``sqrt(ceil(K_f / num_labelled))``. Replacing one of n fractions
            moves the sorted fractions by at most 1 in total (their W1 moves by at
            most 1/n) and each by at most 1, and one order statistic feeds at most
            ``ceil(K_f / n)`` midpoint quantiles, so the squared change is at most
            ``ceil(K_f / n) * 1 * 1``; tighter than ``sqrt(K_f)`` once n > 1.
        polarity: ``2 * clip * sqrt(2 * K_p) / num_labelled`` for the polarity
            term's two quantile vectors released together (one mechanism): each
            case's pair lies in ``[-clip, clip]^(2 K_p)``; 0 without the term.
        num_parts: Gaussian mechanisms in the release (1 without a label term, one
            more with a polarity term).
    """

    image: float
    label_map: float
    foreground: float
    num_parts: int
    polarity: float = 0.0


def get_profile_sensitivity(profile: SiteProfile) -> ProfileSensitivity:
    """Return the replace-one-case L2 sensitivities of ``profile``'s parts."""
    num_quantiles = profile.image_quantiles.size
    image = 2.0 * profile.quantile_clip * math.sqrt(num_quantiles) / profile.num_images
    if profile.mean_label_map is None or profile.foreground_quantiles is None:
        return ProfileSensitivity(
            image=image, label_map=0.0, foreground=0.0, num_parts=1
        )
    count = profile.foreground_quantiles.size
    polarity = 0.0
    if profile.foreground_intensities is not None:
        polarity = (
            2.0
            * profile.quantile_clip
            * math.sqrt(2 * profile.foreground_intensities.size)
            / profile.num_labelled
        )
    return ProfileSensitivity(
        image=image,
        label_map=math.sqrt(profile.mean_label_map.size) / profile.num_labelled,
        foreground=math.sqrt(min(count, math.ceil(count / profile.num_labelled))),
        num_parts=3 if polarity == 0.0 else 4,
        polarity=polarity,
    )


def compute_gaussian_epsilon(
    noise_multiplier: float, *, delta: float, num_mechanisms: int = 1
) -> float:
    """Return ε at ``delta`` of Gaussian mechanisms, each with ``noise_multiplier``.

    RDP of one mechanism at order ``a`` is ``a / (2 z^2)``; RDP adds up over them, and
    the conversion to (ε, δ) is Opacus' ``get_privacy_spent`` (Balle et al. 2020,
    Thm. 21) minimised over Opacus' default orders, so the result equals
    ``RDPAccountant`` with history ``[(z, 1.0, num_mechanisms)]``.

    Example:
        >>> round(compute_gaussian_epsilon(1.0, delta=1e-5), 3)
        4.729
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if num_mechanisms < 1:
        raise ValueError(f"num_mechanisms must be >= 1, got {num_mechanisms}")
    orders = RDP_ORDERS
    rdp = num_mechanisms * orders / (2.0 * noise_multiplier**2)
    epsilon = (
        rdp
        - (math.log(delta) + np.log(orders)) / (orders - 1)
        + np.log((orders - 1) / orders)
    )
    return float(np.nanmin(epsilon))


def noise_profile(
    profile: SiteProfile,
    *,
    noise_multiplier: float,
    delta: float,
    rng: np.random.Generator,
) -> tuple[SiteProfile, float]:
    """Release ``profile`` with Gaussian noise; return it and the ε it costs.

    Each part gets noise of standard deviation ``noise_multiplier * sensitivity``
    (:func:`get_profile_sensitivity`): one Gaussian mechanism per part, composed. The
    values are then clipped back to their ranges and the quantile vectors sorted
    (post-processing, free under DP).

    Args:
        profile: an exact profile (not already noised).
        noise_multiplier: ``z``, noise standard deviation over sensitivity.
        delta: the δ the ε is stated at.
        rng: the noise source (explicit, so a release can be reproduced in tests).

    Returns:
        The noised profile (with :class:`~core.affinity.profile.ProfileNoise`) and ε:
        case-level (replace-one training case), for this single release. The site adds
        it to its ledger; further releases compose on top.

    Raises:
        ValueError: the profile is already noised, or ``noise_multiplier``/``delta``
            are out of range.
    """
    if profile.noise is not None:
        raise ValueError(f"site {profile.site}: profile is already noised")
    sensitivity = get_profile_sensitivity(profile)
    epsilon = compute_gaussian_epsilon(
        noise_multiplier, delta=delta, num_mechanisms=sensitivity.num_parts
    )

    def noised(values: FloatArray, scale: float, low: float, high: float) -> FloatArray:
        noise = rng.normal(0.0, noise_multiplier * scale, size=values.shape)
        return np.clip(values + noise, low, high)

    clip = profile.quantile_clip
    label_map, fractions = profile.mean_label_map, profile.foreground_quantiles
    inside, shell = profile.foreground_intensities, profile.shell_intensities
    if inside is not None and shell is not None:
        # One mechanism: both vectors noised at the pair's joint sensitivity.
        pair = noised(
            np.concatenate([inside, shell]), sensitivity.polarity, -clip, clip
        )
        inside, shell = np.sort(pair[: inside.size]), np.sort(pair[inside.size :])
    released = dataclasses.replace(
        profile,
        image_quantiles=np.sort(
            noised(profile.image_quantiles, sensitivity.image, -clip, clip)
        ),
        mean_label_map=(
            None
            if label_map is None
            else noised(label_map, sensitivity.label_map, 0.0, 1.0)
        ),
        foreground_quantiles=(
            None
            if fractions is None
            else np.sort(noised(fractions, sensitivity.foreground, 0.0, 1.0))
        ),
        noise=ProfileNoise(
            noise_multiplier=noise_multiplier, delta=delta, epsilon=epsilon
        ),
        foreground_intensities=inside,
        shell_intensities=shell,
    )
    return released, epsilon
