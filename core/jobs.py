"""What a site computes on its own data, one function per federated action.

``train_source_model`` (``train.source``), ``score_candidates`` (``query.lftm``),
``adapt_target`` (``train.adapt``) and ``release_evaluation`` (``evaluate``) take a
site folder, the typed run config and weights as ``dict[str, numpy array]``, and return
only what may leave the site: weights, per-case scores and aggregate metrics. The
ClientApp handlers and the leave-one-site-out benchmark both call these functions, so
the benchmark measures exactly what the federation runs. Under a site policy that
requires DP, the actions that train on the site's data or release statistics of its
labels run DP mechanisms charged to the site's accountant
(:func:`core.privacy.reserve_privacy`): DP-SGD for ``train.source`` and
``train.adapt``, Gaussian noise on the mean Dice for ``evaluate``.
``train.consensus`` has its own module, :mod:`core.consensus_job`. Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from core.adaptation import adapt_pair, adapt_pair_private
from core.config import Norm, RunConfig
from core.data import SiteDataError, SiteIndex, SliceSet, build_slice_set, index_site
from core.metrics import SegmentationScores, score_cases
from core.models import Arrays, build_model, get_weights, set_weights
from core.privacy import (
    FULL_DATA_RATE,
    DpSettings,
    PrivacySpend,
    PrivateTrainResult,
    describe_spend,
    reserve_privacy,
    train_private,
)
from core.training import predict_mixture, select_device, train_supervised
from core.transferability import (
    build_pseudo_labels,
    compute_dtm,
    score_candidate,
)

Progress = Callable[[str], None]


def _quiet(_line: str) -> None:
    """Progress sink that drops lines."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SourceTraining:
    """A trained source model and how it was trained (no data leaves with it)."""

    weights: Arrays
    num_examples: int  # slices seen over all epochs
    num_cases: int
    final_loss: float
    seconds: float
    device: str
    privacy: PrivateTrainResult | None = None  # set when DP-SGD trained the model


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Transferability:
    """Per-case transferability of each candidate on the target (ITM) and its means.

    ``itm[n][i]`` is the score of ``sources[i]`` on target case ``n``; case identities
    stay at the site (rows are in a fixed but unnamed order).
    """

    metric: str
    sources: tuple[str, ...]
    itm: tuple[tuple[float, ...], ...]

    @property
    def dtm(self) -> dict[str, float]:
        """Domain-level transferability per source (column means of ITM)."""
        means = compute_dtm(torch.tensor(self.itm, dtype=torch.float64))
        return {
            name: float(value) for name, value in zip(self.sources, means, strict=True)
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Adaptation:
    """The adapted main/auxiliary weights and what adaptation did.

    Attributes:
        main_weights: the adapted main model.
        aux_weights: the adapted auxiliary model, or None.
        num_examples: target slices seen over all epochs (under DP: drawn).
        pseudo_label_foreground: fraction of target pixels pseudo-labelled
            foreground; nan (withheld) under DP, where it is a statistic of the
            site's images outside the guarantee.
        seconds: wall time.
        privacy: the DP-SGD spend, or None without DP.
    """

    main_weights: Arrays
    aux_weights: Arrays | None
    num_examples: int
    pseudo_label_foreground: float
    seconds: float
    privacy: PrivacySpend | None = None


_DP_BATCH_NORM = (
    "model.norm 'batch' keeps running statistics across samples, which DP-SGD "
    "cannot account for; run with model.norm 'instance' or 'group' where DP applies"
)


def _target_slices(index: SiteIndex, config: RunConfig) -> SliceSet:
    """All the target's training images, labels ignored (adaptation is unsupervised)."""
    cases = index.labelled + index.unlabelled
    if not cases:
        raise SiteDataError(f"{index.root}: no training images (imagesTr) to adapt on")
    return build_slice_set(cases, data=config.data, with_labels=False)


def build_model_with(
    name: str, weights: Mapping[str, object], config: RunConfig
) -> torch.nn.Module:
    """The run's model holding ``weights``; an error names the model ``name``."""
    model = build_model(config.model, data=config.data)
    try:
        set_weights(model, weights)  # type: ignore[arg-type]
    except ValueError as error:
        raise ValueError(f"model {name!r}: {error}") from error
    return model


def build_initial_weights(config: RunConfig) -> Arrays:
    """Seeded initial weights of the configured network (what the coordinator sends)."""
    torch.manual_seed(config.train.seed)
    return get_weights(build_model(config.model, data=config.data))


def train_source_model(
    site_dir: Path,
    config: RunConfig,
    *,
    initial_weights: Arrays | None = None,
    dp: DpSettings | None = None,
    accountant_path: Path | None = None,
    progress: Progress = _quiet,
) -> SourceTraining:
    """Train a model on the site's labelled training cases, with DP-SGD when asked.

    Args:
        site_dir: the site folder.
        config: the run config (model, data and training recipe).
        initial_weights: the coordinator's initial weights, or None for a seeded init.
        dp: DP-SGD settings (the applied policy's), or None for ordinary training.
        accountant_path: the site's accountant file: the training is planned,
            checked and recorded there before its first step
            (:func:`core.privacy.train_private`). None starts from an empty
            history and records nothing.
        progress: called with progress lines.

    Raises:
        SiteDataError: the site has no labelled cases, or its data is bad.
        PrivacyBudgetError: the DP training would exceed the site's budget; nothing
            was trained and the accountant file is unchanged.
        ValueError: DP is asked for a model with BatchNorm (``model.norm='batch'``).
    """
    index = index_site(Path(site_dir))
    if not index.labelled:
        raise SiteDataError(
            f"{index.root}: no labelled training cases (labelsTr) to "
            "train a source model on"
        )
    if dp is not None and config.model.norm is Norm.BATCH:
        # Opacus would swap BatchNorm for GroupNorm, and the weights would no longer
        # match the run's declared model, which the egress guard and the coordinator
        # hold every reply to.
        raise ValueError(_DP_BATCH_NORM)
    slices = build_slice_set(index.labelled, data=config.data, with_labels=True)
    assert slices.labels is not None
    model = build_model(config.model, data=config.data)
    if initial_weights is not None:
        try:
            set_weights(model, initial_weights)
        except ValueError as error:
            raise ValueError(f"initial weights: {error}") from error
    device = select_device(config.train.device)
    label = f"train {index.name}"
    private: PrivateTrainResult | None = None
    if dp is None:
        result = train_supervised(
            model,
            slices.images,
            slices.labels,
            train=config.train,
            device=device,
            label=label,
            progress=progress,
        )
    else:
        model, private = train_private(
            model,
            slices.images,
            slices.labels,
            case_of_slice=slices.case_of_slice,
            train=config.train,
            dp=dp,
            accountant_path=accountant_path,
            device=device,
            label=label,
            progress=progress,
        )
        spent = describe_spend(private.spend, budget_epsilon=dp.budget_epsilon)
        progress(f"[{label}] {spent}")
        result = private.train
    return SourceTraining(
        weights=get_weights(model),
        num_examples=result.num_examples,
        num_cases=len(slices.case_ids),
        final_loss=result.final_loss,
        seconds=result.seconds,
        device=result.device,
        privacy=private,
    )


def score_slices(
    slices: SliceSet,
    candidates: Mapping[str, Arrays],
    config: RunConfig,
    progress: Progress,
) -> tuple[Transferability, list[torch.Tensor]]:
    """Score each candidate on ``slices`` (ITM); also return its softmax maps.

    Candidates are taken in sorted name order, as ``Transferability.sources`` lists.
    """
    device = select_device(config.train.device)
    names = tuple(sorted(candidates))
    columns, probabilities = [], []
    for name in names:
        scores = score_candidate(
            build_model_with(name, candidates[name], config),
            slices.images,
            case_of_slice=slices.case_of_slice,
            num_cases=len(slices.case_ids),
            transfer=config.transfer,
            device=device,
        )
        columns.append(scores.per_case)
        probabilities.append(scores.probabilities)
        progress(
            f"[{config.transfer.metric.value}] {name}: mean "
            f"{float(scores.per_case.mean()):.3f} over {len(slices.case_ids)} cases"
        )
    itm = torch.stack(columns, dim=1)
    rows = tuple(tuple(float(value) for value in row) for row in itm.tolist())
    return (
        Transferability(metric=config.transfer.metric.value, sources=names, itm=rows),
        probabilities,
    )


def score_candidates(
    site_dir: Path,
    candidates: Mapping[str, Arrays],
    config: RunConfig,
    *,
    progress: Progress = _quiet,
) -> Transferability:
    """Score every candidate model on the target's own unlabelled images (ITM)."""
    if not candidates:
        raise ValueError("no candidate models to score")
    slices = _target_slices(index_site(Path(site_dir)), config)
    transferability, _ = score_slices(slices, candidates, config, progress)
    return transferability


def adapt_target(
    site_dir: Path,
    candidates: Mapping[str, Arrays],
    config: RunConfig,
    *,
    main: str,
    aux: str | None,
    weight_main: float,
    weight_aux: float,
    dp: DpSettings | None = None,
    accountant_path: Path | None = None,
    progress: Progress = _quiet,
) -> Adaptation:
    """Adapt the main/aux pair on the target with ITM-corrected pseudo-labels.

    ITM is recomputed here from ``candidates`` (deterministic, two forward passes per
    candidate), so the pseudo-labels never depend on what the site released. With
    ``dp`` the pair is adapted by DP-SGD (:func:`core.adaptation.adapt_pair_private`:
    per-sample Dice against each slice's pseudo-label, the pair clipped together),
    planned, checked and recorded in the site's accountant before its first step;
    the fraction of pixels pseudo-labelled foreground is then withheld (nan).

    Args:
        site_dir: the target site folder (all training images, labels ignored).
        candidates: the sent candidate models by name.
        config: the run config (``adapt``, ``transfer``, ``train.augment``).
        main: the main model's name among ``candidates``.
        aux: the auxiliary model's name, or None.
        weight_main: W_main.
        weight_aux: W_aux.
        dp: the applied policy's DP settings, or None for ordinary training.
        accountant_path: the site's accountant file (None: nothing recorded).
        progress: called with progress lines.

    Raises:
        ValueError: a selected source that is not a candidate, or DP asked for a
            model with BatchNorm.
        SiteDataError: the site has no training images, or its data is bad.
        PrivacyBudgetError: the DP adaptation would exceed the site's budget;
            nothing was trained and the accountant file is unchanged.
    """
    for name in (main, aux):
        if name is not None and name not in candidates:
            raise ValueError(
                f"selected source {name!r} is not among the candidates "
                f"{sorted(candidates)}"
            )
    if dp is not None and config.model.norm is Norm.BATCH:
        raise ValueError(_DP_BATCH_NORM)
    started = time.perf_counter()
    slices = _target_slices(index_site(Path(site_dir)), config)
    transferability, probabilities = score_slices(slices, candidates, config, progress)
    soft = build_pseudo_labels(
        probabilities,
        torch.tensor(transferability.itm),
        case_of_slice=slices.case_of_slice,
    )
    pseudo_labels = soft.argmax(1)
    names = [main] if aux is None else [main, aux]
    weights = [weight_main] if aux is None else [weight_main, weight_aux]
    models = [build_model_with(name, candidates[name], config) for name in names]
    device = select_device(config.train.device)
    privacy: PrivacySpend | None = None
    if dp is None:
        result = adapt_pair(
            models,
            weights,
            slices.images,
            pseudo_labels,
            adapt=config.adapt,
            train=config.train,
            device=device,
            progress=progress,
        )
        foreground = float((pseudo_labels > 0).float().mean())
    else:
        result, privacy = adapt_pair_private(
            models,
            weights,
            slices.images,
            pseudo_labels,
            case_of_slice=slices.case_of_slice,
            adapt=config.adapt,
            train=config.train,
            dp=dp,
            accountant_path=accountant_path,
            device=device,
            progress=progress,
        )
        if privacy is not None:
            spent = describe_spend(privacy, budget_epsilon=dp.budget_epsilon)
            progress(f"[adapt] {spent}")
        # A statistic of the site's images that the guarantee does not cover.
        foreground = math.nan
    return Adaptation(
        main_weights=get_weights(models[0]),
        aux_weights=get_weights(models[1]) if len(models) > 1 else None,
        num_examples=result.num_examples,
        pseudo_label_foreground=foreground,
        seconds=time.perf_counter() - started,
        privacy=privacy,
    )


def evaluate_predictors(
    site_dir: Path,
    models: Mapping[str, Arrays],
    predictors: Mapping[str, Sequence[tuple[str, float]]],
    config: RunConfig,
    *,
    with_hd95: bool = True,
    progress: Progress = _quiet,
) -> dict[str, SegmentationScores]:
    """Score predictors on the site's evaluation labels (``labelsTs``), per case.

    Args:
        site_dir: the site folder.
        models: weights by model name.
        predictors: predictor name -> ``[(model name, weight), ...]``; a predictor's
            output is the weighted sum of its models' softmax maps (one model with
            weight 1 is the model alone).
        config: the run config.
        with_hd95: compute HD95 as well as Dice.
        progress: called with one line per predictor.

    Raises:
        SiteDataError: the site has no evaluation cases.
        ValueError: a predictor names an unknown model.
    """
    index = index_site(Path(site_dir))
    if not index.evaluation:
        raise SiteDataError(
            f"{index.root}: no evaluation cases (imagesTs with labelsTs)"
        )
    slices = build_slice_set(index.evaluation, data=config.data, with_labels=True)
    assert slices.labels is not None
    device = select_device(config.train.device)
    built = {
        name: build_model_with(name, weights, config)
        for name, weights in models.items()
    }
    results = {}
    for predictor, members in predictors.items():
        unknown = [name for name, _ in members if name not in built]
        if unknown or not members:
            raise ValueError(f"predictor {predictor!r} names unknown models {unknown}")
        mixture = predict_mixture(
            [built[name] for name, _ in members],
            [weight for _, weight in members],
            slices.images,
            device=device,
        )
        results[predictor] = score_cases(
            mixture.argmax(1),
            slices.labels,
            case_of_slice=slices.case_of_slice,
            case_ids=slices.case_ids,
            spacing_mm=slices.spacing_mm,
            num_classes=config.data.num_classes,
            with_hd95=with_hd95,
        )
        progress(f"[evaluate] {predictor}: Dice {results[predictor].dice:.3f}")
    return results


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationRelease:
    """What an ``evaluate`` reply may carry: aggregates over the cases, and the cost.

    Attributes:
        num_cases: evaluation cases behind every aggregate.
        dice: per predictor, the mean Dice over the cases (noised under DP).
        hd95_mm: per predictor, the mean HD95 in mm (nan: undefined, or withheld
            under DP).
        privacy: the Gaussian releases' spend, or None without DP.
    """

    num_cases: int
    dice: dict[str, float]
    hd95_mm: dict[str, float]
    privacy: PrivacySpend | None = None


def release_evaluation(
    site_dir: Path,
    models: Mapping[str, Arrays],
    predictors: Mapping[str, Sequence[tuple[str, float]]],
    config: RunConfig,
    *,
    dp: DpSettings | None = None,
    accountant_path: Path | None = None,
    with_hd95: bool = True,
    rng: np.random.Generator | None = None,
    progress: Progress = _quiet,
) -> EvaluationRelease:
    """The ``evaluate`` action: each predictor's mean scores, noised under DP.

    Without ``dp`` the exact means of :func:`evaluate_predictors`. With ``dp`` each
    predictor's mean Dice over the n evaluation cases is a Gaussian mechanism: every
    case's Dice lies in [0, 1], so replacing one case moves the mean by at most 1/n
    (the L2 sensitivity; n is public), and the release adds N(0, (sigma / n)^2) and
    clips to [0, 1] (post-processing). HD95 is withheld (nan): it has no bounded
    sensitivity. The P predictors are P such mechanisms, charged together
    (:func:`core.privacy.reserve_privacy`: sample rate 1, P steps, 1 unit per case)
    before any score is computed; sigma is the policy's noise, or what its target
    epsilon needs for the P releases. The scores are computed first (a bad file or an
    unknown model fails without a charge) and nothing leaves before the charge is
    recorded. The privacy claim is patient-level (one case replaced) at the policy's
    delta, cumulative with every release in the site's accountant. Per-case values
    never leave this function.

    Args:
        site_dir: the site folder (``imagesTs``/``labelsTs``).
        models: weights by model name.
        predictors: predictor name -> ``[(model name, weight), ...]``.
        config: the run config.
        dp: the applied policy's DP settings, or None for exact means.
        accountant_path: the site's accountant file (None: nothing recorded).
        with_hd95: compute HD95 as well (ignored under DP).
        rng: the noise source; None (a site) seeds it from the operating system.
        progress: called with progress lines.

    Raises:
        SiteDataError: the site has no evaluation cases.
        ValueError: no predictors, or one names an unknown model (nothing is
            recorded).
        PrivacyBudgetError: the releases would exceed the site's budget; nothing is
            released and the accountant file is unchanged.
    """
    if dp is None:
        scores = evaluate_predictors(
            site_dir,
            models,
            predictors,
            config,
            with_hd95=with_hd95,
            progress=progress,
        )
        return EvaluationRelease(
            num_cases=len(next(iter(scores.values())).cases) if scores else 0,
            dice={name: result.dice for name, result in scores.items()},
            hd95_mm={name: result.hd95_mm for name, result in scores.items()},
        )
    if not predictors:
        raise ValueError("no predictors to evaluate")
    # Scored first (a bad file or an unknown model fails here, charging nothing);
    # nothing leaves before the releases are recorded.
    scores = evaluate_predictors(
        site_dir, models, predictors, config, with_hd95=False, progress=_quiet
    )
    num_cases = len(next(iter(scores.values())).cases)
    reservation = reserve_privacy(
        accountant_path,
        sample_rate=FULL_DATA_RATE,
        steps=len(scores),
        units_per_case=1,
        dp=dp,
    )
    noise = rng or np.random.default_rng(secrets.randbits(128))
    scale = reservation.plan.noise_multiplier / num_cases
    dice = {
        name: float(np.clip(result.dice + noise.normal(0.0, scale), 0.0, 1.0))
        for name, result in scores.items()
    }
    spent = describe_spend(reservation.spend, budget_epsilon=dp.budget_epsilon)
    progress(
        f"[evaluate] {len(dice)} predictor(s) on {num_cases} cases, mean Dice noised "
        f"(sd {scale:.4f}): {spent}"
    )
    return EvaluationRelease(
        num_cases=num_cases,
        dice=dice,
        hd95_mm={name: math.nan for name in scores},
        privacy=reservation.spend,
    )
