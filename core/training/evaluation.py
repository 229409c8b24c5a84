"""The ``evaluate`` job: predictors scored on the site's labelled evaluation cases.

``evaluate_predictors`` scores each predictor (a model, or a weighted mixture of
models) per case; ``score_predictors`` also post-processes the predictors the request
names (the largest connected component per class, docs/methods.md#post-processing)
and keeps their raw scores; ``release_evaluation`` turns those scores into what an
``evaluate`` reply may carry: aggregates over the cases, with Gaussian noise on the
mean Dice and HD95 withheld where the site's policy requires DP.
``write_segmentations`` writes one predictor's segmentation of every image of the site
as NIfTI on the image's own grid, for the site's clinicians; those files never leave
the site. Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.config import RunConfig
from core.data.dataset import (
    SiteDataError,
    build_slice_set,
    index_site,
    label_volume_from_slices,
    read_case,
)
from core.data.io import read_volume, write_volume
from core.logs import Progress, quiet
from core.metrics import (
    SegmentationScores,
)
from core.privacy.dp import (
    FULL_DATA_RATE,
    DpSettings,
    PrivacySpend,
    describe_spend,
    reserve_privacy,
)
from core.training.job import build_model_with
from core.training.networks import Arrays
from core.training.postprocess import keep_largest_component
from core.training.scoring import score_on_native_grid
from core.training.trainer import predict_mixture, predicted_classes, select_device


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PredictorScores:
    """Per predictor, its per-case scores; and for the post-processed, the raw ones.

    ``scores`` are what a predictor is reported with: post-processed (the largest
    connected component per class kept, docs/methods.md#post-processing) for the
    predictors in ``raw``, which holds their scores before post-processing.
    """

    scores: dict[str, SegmentationScores]
    raw: dict[str, SegmentationScores]


def evaluate_predictors(
    site_dir: Path,
    models: Mapping[str, Arrays],
    predictors: Mapping[str, Sequence[tuple[str, float]]],
    config: RunConfig,
    *,
    with_hd95: bool = True,
    progress: Progress = quiet,
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
    return score_predictors(
        site_dir, models, predictors, config, with_hd95=with_hd95, progress=progress
    ).scores


def score_predictors(
    site_dir: Path,
    models: Mapping[str, Arrays],
    predictors: Mapping[str, Sequence[tuple[str, float]]],
    config: RunConfig,
    *,
    postprocess: Collection[str] = (),
    with_hd95: bool = True,
    progress: Progress = quiet,
) -> PredictorScores:
    """:func:`evaluate_predictors`, post-processing the ``postprocess`` predictors.

    Each case's prediction, back on the image's own grid, keeps the largest 3-D
    connected component per class
    (:func:`core.training.postprocess.keep_largest_component`) before it is scored;
    the raw scores are kept beside.

    Raises:
        SiteDataError: the site has no evaluation cases.
        ValueError: a predictor names an unknown model, or ``postprocess`` names a
            predictor that is not one.
    """
    unknown = sorted(set(postprocess) - set(predictors))
    if unknown:
        raise ValueError(f"predictors to post-process are not predictors: {unknown}")
    index = index_site(Path(site_dir))
    if not index.evaluation:
        raise SiteDataError(
            f"{index.root}: no evaluation cases (imagesTs with labelsTs)"
        )
    references = [
        read_case(case, num_classes=config.data.num_classes)
        for case in index.evaluation
    ]
    slices = build_slice_set(index.evaluation, data=config.data, with_labels=False)
    device = select_device(config.train.device)
    built = {
        name: build_model_with(name, weights, config)
        for name, weights in models.items()
    }
    results: dict[str, SegmentationScores] = {}
    raw: dict[str, SegmentationScores] = {}
    num_classes = config.data.num_classes

    def keep_largest(volume: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return keep_largest_component(volume, num_classes=num_classes)

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
        classes = predicted_classes(mixture).cpu()
        if predictor in postprocess:
            raw[predictor] = score_on_native_grid(
                classes, slices, references, config, with_hd95=with_hd95
            )
        results[predictor] = score_on_native_grid(
            classes,
            slices,
            references,
            config,
            with_hd95=with_hd95,
            postprocess=keep_largest if predictor in postprocess else None,
        )
        line = f"[evaluate] {predictor}: Dice {results[predictor].dice:.3f}"
        if predictor in raw:
            line += f" post-processed (raw {raw[predictor].dice:.3f})"
        progress(line)
    return PredictorScores(scores=results, raw=raw)


# What a segmentation folder holds besides the volumes: which predictor made them.
SEGMENTATIONS_MANIFEST = "segmentations.json"


def write_segmentations(
    site_dir: Path,
    models: Mapping[str, Arrays],
    members: Sequence[tuple[str, float]],
    config: RunConfig,
    out_dir: Path,
    *,
    predictor: str,
    postprocess: bool = False,
    progress: Progress = quiet,
) -> int:
    """Segment every image of the site with one predictor; write them as NIfTI.

    Every training image (labelled or not) and every evaluation image, one case at a
    time, is cut into slices as for scoring, predicted by the weighted mixture of
    ``members``, and put back on the image's own grid (size, spacing, origin,
    direction) as ``out_dir/<case id>.nii.gz`` (uint8 classes), beside
    ``segmentations.json`` naming the predictor and its members. Existing files of
    the same cases are replaced (a resumed run writes them again).

    Args:
        site_dir: the site folder.
        models: weights by model name.
        members: ``[(model name, weight), ...]`` of the predictor.
        config: the run config (``data`` decides the slices).
        out_dir: the folder to write, under the site's state folder.
        predictor: the predictor's name, recorded in the manifest only (never in a
            path).
        postprocess: keep the largest 3-D connected component per class of each
            volume, on its own grid (docs/methods.md#post-processing); the manifest
            says so.
        progress: called with one line at the end.

    Returns:
        The number of volumes written.

    Raises:
        SiteDataError: the site has no images, or an image cannot be read.
        ValueError: ``members`` is empty or names an unknown model.
    """
    unknown = [name for name, _ in members if name not in models]
    if unknown or not members:
        raise ValueError(
            f"predictor {predictor!r} to segment with names unknown models {unknown}"
        )
    index = index_site(Path(site_dir))
    cases = (*index.training_images, *index.evaluation_images)
    if not cases:
        raise SiteDataError(f"{index.root}: no images to segment")
    device = select_device(config.train.device)
    built = [build_model_with(name, models[name], config) for name, _ in members]
    weights = [weight for _, weight in members]
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        slices = build_slice_set([case], data=config.data, with_labels=False)
        classes = predict_mixture(built, weights, slices.images, device=device)
        image = read_volume(case.image_path)
        volume = label_volume_from_slices(
            predicted_classes(classes).cpu(),
            image.array.shape,
            data=config.data,
            tiling=None if slices.tilings is None else slices.tilings[0],
        )
        if postprocess:
            volume = keep_largest_component(volume, num_classes=config.data.num_classes)
        write_volume(
            dataclasses.replace(image, array=volume.astype(np.uint8)),
            out_dir / f"{case.case_id}.nii.gz",
        )
    manifest: dict[str, Any] = {
        "predictor": predictor,
        "members": [[name, weight] for name, weight in members],
        "cases": [case.case_id for case in cases],
    }
    if postprocess:
        manifest["postprocess"] = "largest-component"
    (out_dir / SEGMENTATIONS_MANIFEST).write_text(
        json.dumps(manifest, indent=2) + "\n", encoding="utf-8"
    )
    progress(f"[segment] {predictor}: {len(cases)} volumes written to {out_dir}")
    return len(cases)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationRelease:
    """What an ``evaluate`` reply may carry: aggregates over the cases, and the cost.

    Attributes:
        num_cases: evaluation cases behind every aggregate.
        dice: per predictor, the mean Dice over the cases (noised under DP).
        hd95_mm: per predictor, the mean HD95 in mm (nan: undefined, or withheld
            under DP).
        dice_raw: per post-processed predictor, its mean Dice before
            post-processing (noised under DP, as ``dice``).
        hd95_raw_mm: per post-processed predictor, its mean HD95 before
            post-processing (nan under DP).
        privacy: the Gaussian releases' spend, or None without DP.
    """

    num_cases: int
    dice: dict[str, float]
    hd95_mm: dict[str, float]
    dice_raw: dict[str, float] = dataclasses.field(default_factory=dict)
    hd95_raw_mm: dict[str, float] = dataclasses.field(default_factory=dict)
    privacy: PrivacySpend | None = None


def release_evaluation(
    site_dir: Path,
    models: Mapping[str, Arrays],
    predictors: Mapping[str, Sequence[tuple[str, float]]],
    config: RunConfig,
    *,
    postprocess: Collection[str] = (),
    dp: DpSettings | None = None,
    accountant_path: Path | None = None,
    with_hd95: bool = True,
    rng: np.random.Generator | None = None,
    progress: Progress = quiet,
) -> EvaluationRelease:
    """The ``evaluate`` action: each predictor's mean scores, noised under DP.

    Without ``dp`` the exact means of :func:`evaluate_predictors`. With ``dp`` each
    predictor's mean Dice over the n evaluation cases is a Gaussian mechanism: every
    case's Dice lies in [0, 1], so replacing one case moves the mean by at most 1/n
    (the L2 sensitivity; n is public), and the release adds N(0, (sigma / n)^2) and
    clips to [0, 1] (post-processing). HD95 is withheld (nan): it has no bounded
    sensitivity. The P predictors are P such mechanisms, charged together
    (:func:`core.privacy.dp.reserve_privacy`: sample rate 1, P steps, 1 unit per case;
    a post-processed predictor's raw Dice is one more release, one more step)
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
        postprocess: the predictors whose predictions keep the largest connected
            component per class (:func:`score_predictors`); their raw figures are
            released too.
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
        scored = score_predictors(
            site_dir,
            models,
            predictors,
            config,
            postprocess=postprocess,
            with_hd95=with_hd95,
            progress=progress,
        )
        scores = scored.scores
        return EvaluationRelease(
            num_cases=len(next(iter(scores.values())).cases) if scores else 0,
            dice={name: result.dice for name, result in scores.items()},
            hd95_mm={name: result.hd95_mm for name, result in scores.items()},
            dice_raw={name: result.dice for name, result in scored.raw.items()},
            hd95_raw_mm={name: result.hd95_mm for name, result in scored.raw.items()},
        )
    if not predictors:
        raise ValueError("no predictors to evaluate")
    # Scored first (a bad file or an unknown model fails here, charging nothing);
    # nothing leaves before the releases are recorded.
    scored = score_predictors(
        site_dir,
        models,
        predictors,
        config,
        postprocess=postprocess,
        with_hd95=False,
        progress=quiet,
    )
    scores = scored.scores
    num_cases = len(next(iter(scores.values())).cases)
    reservation = reserve_privacy(
        accountant_path,
        sample_rate=FULL_DATA_RATE,
        steps=len(scores) + len(scored.raw),
        units_per_case=1,
        dp=dp,
    )
    noise = rng or np.random.default_rng(secrets.randbits(128))
    scale = reservation.plan.noise_multiplier / num_cases

    def noised(results: Mapping[str, SegmentationScores]) -> dict[str, float]:
        return {
            name: float(np.clip(result.dice + noise.normal(0.0, scale), 0.0, 1.0))
            for name, result in results.items()
        }

    dice, dice_raw = noised(scores), noised(scored.raw)
    spent = describe_spend(reservation.spend, budget_epsilon=dp.budget_epsilon)
    progress(
        f"[evaluate] {len(dice) + len(dice_raw)} mean Dice release(s) on "
        f"{num_cases} cases, noised (sd {scale:.4f}): {spent}"
    )
    return EvaluationRelease(
        num_cases=num_cases,
        dice=dice,
        hd95_mm={name: math.nan for name in scores},
        dice_raw=dice_raw,
        hd95_raw_mm={name: math.nan for name in scored.raw},
        privacy=reservation.spend,
    )
