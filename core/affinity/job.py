"""The site side of SeqTran (docs/methods.md#seqtran): released profile, fine-tune.

Owns what a site runs for the two affinity actions of the pipeline:

- ``query.profile``: :func:`release_profile` computes the site's task profile from its
  training cases (:func:`core.affinity.profile.build_site_profile`) and, when the
  applied policy requires DP, releases it through the Gaussian mechanism of
  :mod:`core.affinity.profile_noise`. That release is recorded in the site's accountant
  through :func:`core.privacy.dp.reserve_privacy`, the same locked RDP history DP-SGD
  uses: ``num_parts`` Gaussian mechanisms are ``(noise, sample rate 1, num_parts
  steps)`` there with 1 unit per case (their sensitivities are already those of
  replacing one case), so the budget check and the cumulative ε compose with every
  DP training of the site.
- ``train.finetune``: :func:`finetune_model` trains the given model further on the
  site's labelled cases with the fine-tuning recipe of :func:`finetune_config`
  (``affinity.finetune-epochs`` at ``affinity.finetune-learning-rate``), with DP-SGD
  when the policy requires it. The ``affinity`` benchmark uses the same recipe.

The coordinator's side (distances, the path) is :mod:`core.affinity.matrix` and
:mod:`core.affinity.paths`; the wire form is ``core.protocol.ProfileReply``.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import numpy as np

from core.affinity.profile import SiteProfile, build_site_profile, profile_settings
from core.affinity.profile_noise import get_profile_sensitivity, noise_profile
from core.config import RunConfig
from core.logs import Progress, quiet
from core.privacy.dp import (
    FULL_DATA_RATE,
    DpSettings,
    PrivacySpend,
    reserve_privacy,
)
from core.training.job import SourceTraining, train_source_model
from core.training.networks import Arrays

# Each part of a profile is one full-data Gaussian mechanism: sample rate 1.
PROFILE_SAMPLE_RATE = FULL_DATA_RATE


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReleasedProfile:
    """A profile as it leaves the site, and what it cost (None when exact)."""

    profile: SiteProfile
    privacy: PrivacySpend | None


def release_profile(
    site_dir: Path,
    config: RunConfig,
    *,
    dp: DpSettings | None = None,
    accountant_path: Path | None = None,
    rng: np.random.Generator | None = None,
    pool_cases: int = 1,
    progress: Progress = quiet,
) -> ReleasedProfile:
    """The site's task profile, noised when ``dp`` is given.

    Args:
        site_dir: the site folder; training cases only are read.
        config: the run config; ``affinity`` says how the profile is computed.
        dp: the applied policy's DP settings, or None for the exact profile. The
            noise is ``dp.noise_multiplier``, raised to what ``dp.target_epsilon``
            needs for this release when that is set (as for DP-SGD).
        accountant_path: the site's accountant file: the release is planned,
            checked against the budget and recorded there (under its lock) after the
            exact profile is computed and before the noised one exists. None starts
            from an empty history and records nothing.
        rng: the noise source; None (what a site runs with) seeds it from the
            operating system, as the run's seed is known to the coordinator.
        pool_cases: without ``dp``, the exact profile's foreground-fraction
            quantiles stand on means of at least this many cases (the site's
            ``limits.min-cases``; see :func:`core.affinity.profile.build_site_profile`).
        progress: called with one line.

    Raises:
        SiteDataError: a training case is missing or invalid.
        ValueError: the site has no training images.
        PrivacyBudgetError: the release would bring the site's cumulative ε above its
            budget; nothing is released and the accountant file is unchanged.
    """
    profile = build_site_profile(
        Path(site_dir),
        profile_settings(config.affinity),
        pool_cases=1 if dp is not None else pool_cases,
    )
    if dp is None:
        progress(
            f"profile of {profile.num_images} training images "
            f"({profile.num_labelled} labelled), exact"
        )
        return ReleasedProfile(profile=profile, privacy=None)
    reservation = reserve_privacy(
        accountant_path,
        sample_rate=PROFILE_SAMPLE_RATE,
        steps=get_profile_sensitivity(profile).num_parts,
        units_per_case=1,
        dp=dp,
    )
    plan, spend = reservation.plan, reservation.spend
    noised, _epsilon = noise_profile(
        profile,
        noise_multiplier=plan.noise_multiplier,
        delta=dp.delta,
        rng=rng or np.random.default_rng(secrets.randbits(128)),
    )
    progress(
        f"profile of {profile.num_images} training images ({profile.num_labelled} "
        f"labelled), noise {plan.noise_multiplier:.3f}: epsilon "
        f"{spend.epsilon_spent:.3f} (site total {spend.epsilon_total:.3f}, delta "
        f"{dp.delta:g})"
    )
    return ReleasedProfile(profile=noised, privacy=spend)


def finetune_config(config: RunConfig) -> RunConfig:
    """``config`` with the fine-tuning recipe of ``affinity`` as its training recipe.

    Example:
        >>> from core.config import load_default_config
        >>> tuned = finetune_config(load_default_config())
        >>> tuned.train.epochs, tuned.train.learning_rate
        (15, 0.0003)
    """
    return dataclasses.replace(
        config,
        train=dataclasses.replace(
            config.train,
            epochs=config.affinity.finetune_epochs,
            learning_rate=config.affinity.finetune_learning_rate,
        ),
    )


def finetune_model(
    site_dir: Path,
    weights: Arrays,
    config: RunConfig,
    *,
    dp: DpSettings | None = None,
    accountant_path: Path | None = None,
    progress: Progress = quiet,
) -> SourceTraining:
    """Fine-tune ``weights`` on the site's labelled cases (one step of a path).

    Raises:
        SiteDataError: the site has no labelled cases, or its data is bad.
        PrivacyBudgetError: a DP fine-tuning would exceed the site's budget.
    """
    return train_source_model(
        Path(site_dir),
        finetune_config(config),
        initial_weights=weights,
        dp=dp,
        accountant_path=accountant_path,
        progress=progress,
    )
