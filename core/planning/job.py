"""The ``query.fingerprint`` job: the site's fingerprint as it may leave the site.

:func:`release_fingerprint` computes the exact fingerprint
(:func:`core.planning.fingerprint.compute_fingerprint`) and applies the site's rules
before anything leaves:

- the CT intensity term stands on the labelled foreground of at least
  ``limits.min-cases`` cases, or stays home (a mean over one case is that case);
- under a policy that requires DP, the CT intensity term is one Gaussian mechanism
  over its five statistics at their replace-one-case L2 sensitivity, recorded in the
  site's accountant through :func:`core.privacy.dp.reserve_privacy` before the noised
  values exist, and refused when it would exceed the budget. The geometry (median
  spacing and size) is released exactly: it describes the acquisition protocol, the
  same for every scan of it, and no coordinator parameter shapes it
  (docs/privacy.md#fingerprints).

Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from pathlib import Path

import numpy as np

from core.config import RunConfig
from core.logs import Progress, quiet
from core.planning.fingerprint import (
    CT_RANGE_HU,
    CT_STATISTICS,
    SiteFingerprint,
    compute_fingerprint,
)
from core.privacy.dp import FULL_DATA_RATE, DpSettings, PrivacySpend, reserve_privacy


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReleasedFingerprint:
    """A fingerprint as it leaves the site, and what it cost (None when exact).

    ``withheld`` says why a CT intensity term stayed home ("" when it did not).
    """

    fingerprint: SiteFingerprint
    privacy: PrivacySpend | None
    withheld: str = ""


def ct_sensitivity(num_labelled: int) -> float:
    """L2 sensitivity of the mean over cases of ``CT_STATISTICS`` (replace one case).

    Each case's three percentiles and mean lie in :data:`CT_RANGE_HU` (width ``w``)
    and its standard deviation in ``[0, w / 2]``, so replacing one of ``n`` cases moves
    the means by at most ``sqrt(4 w^2 + w^2 / 4) / n``.

    Example:
        >>> round(ct_sensitivity(12), 1)
        703.5
    """
    width = CT_RANGE_HU[1] - CT_RANGE_HU[0]
    return math.sqrt(4 * width**2 + (width / 2) ** 2) / num_labelled


def noise_ct_intensities(
    values: tuple[float, ...],
    *,
    num_labelled: int,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[float, ...]:
    """``values`` plus Gaussian noise at ``noise_multiplier`` times the sensitivity.

    Post-processing (free under DP): values clipped back to their ranges, the three
    percentiles sorted.
    """
    scale = noise_multiplier * ct_sensitivity(num_labelled)
    noised = np.asarray(values, dtype=np.float64) + rng.normal(0.0, scale, len(values))
    low, high = CT_RANGE_HU
    percentiles = np.sort(np.clip(noised[:3], low, high))
    mean = float(np.clip(noised[3], low, high))
    sd = float(np.clip(noised[4], 1.0, (high - low) / 2))
    return (*map(float, percentiles), mean, sd)


def release_fingerprint(
    site_dir: Path,
    config: RunConfig,
    *,
    min_cases: int,
    dp: DpSettings | None = None,
    accountant_path: Path | None = None,
    rng: np.random.Generator | None = None,
    progress: Progress = quiet,
) -> ReleasedFingerprint:
    """The site's fingerprint, its CT term withheld or noised as the site requires.

    Args:
        site_dir: the site folder; training cases only are read.
        config: the run config (its class count checks the labels).
        min_cases: the site's ``limits.min-cases``.
        dp: the applied policy's DP settings, or None for the exact fingerprint.
        accountant_path: the site's accountant file (see
            :func:`core.privacy.dp.reserve_privacy`); None records nothing.
        rng: the noise source; None seeds it from the operating system.
        progress: called with progress lines.

    Raises:
        SiteDataError: a training case is missing or invalid.
        ValueError: the site has no training images.
        PrivacyBudgetError: the DP release would exceed the site's budget; nothing
            is released and the accountant file is unchanged.
    """
    exact = compute_fingerprint(
        Path(site_dir), num_classes=config.data.num_classes, progress=progress
    )
    values = exact.ct_intensities
    if values is None:
        return ReleasedFingerprint(fingerprint=exact, privacy=None)
    if exact.num_labelled < min_cases:
        reason = (
            f"CT intensity term left out ({exact.num_labelled} labelled cases with "
            f"foreground, limits.min-cases is {min_cases})"
        )
        progress(f"fingerprint: {reason}")
        withheld = dataclasses.replace(exact, ct_intensities=None, num_labelled=0)
        return ReleasedFingerprint(fingerprint=withheld, privacy=None, withheld=reason)
    if dp is None:
        return ReleasedFingerprint(fingerprint=exact, privacy=None)
    reservation = reserve_privacy(
        accountant_path,
        sample_rate=FULL_DATA_RATE,
        steps=1,
        units_per_case=1,
        dp=dp,
    )
    plan, spend = reservation.plan, reservation.spend
    noised = noise_ct_intensities(
        values,
        num_labelled=exact.num_labelled,
        noise_multiplier=plan.noise_multiplier,
        rng=rng or np.random.default_rng(secrets.randbits(128)),
    )
    progress(
        f"fingerprint: CT term ({', '.join(CT_STATISTICS)}) noised at "
        f"{plan.noise_multiplier:.3f} x {ct_sensitivity(exact.num_labelled):.1f} HU: "
        f"epsilon {spend.epsilon_spent:.3f} (site total {spend.epsilon_total:.3f}, "
        f"delta {dp.delta:g})"
    )
    return ReleasedFingerprint(
        fingerprint=dataclasses.replace(exact, ct_intensities=noised), privacy=spend
    )
