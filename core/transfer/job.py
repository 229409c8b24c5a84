"""The site side of TGMA (docs/methods.md#tgma): ``query.lftm`` and ``train.adapt``.

``score_candidates`` scores candidate models on the target's own unlabelled images
(ITM, whose column means are DTM); ``adapt_target`` adapts the chosen main/auxiliary
pair on them. Both take a site folder, the typed run config and weights as
``dict[str, numpy array]`` and return only what may leave the site. Under a site
policy that requires DP, adaptation runs DP-SGD charged to the site's accountant.
Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from core.config import Norm, RunConfig, SelectionRule, TransferConfig
from core.data.dataset import (
    SiteDataError,
    SiteIndex,
    SliceSet,
    build_slice_set,
    index_site,
)
from core.logs import Countdown, Progress, quiet
from core.privacy.dp import (
    DpSettings,
    PrivacySpend,
    describe_spend,
)
from core.training.job import DP_BATCH_NORM_ERROR, build_model_with
from core.training.networks import Arrays, get_weights
from core.training.trainer import predicted_classes, select_device
from core.transfer.adaptation import adapt_pair, adapt_pair_private
from core.transfer.transferability import (
    SourceSelection,
    build_pseudo_labels,
    compute_dtm,
    prediction_agreement,
    score_candidate,
    select_sources,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Transferability:
    """Per-case transferability of each candidate on the target (ITM) and its means.

    ``itm[n][i]`` is the score of ``sources[i]`` on target case ``n``; case identities
    stay at the site (rows are in a fixed but unnamed order). ``agreement[i][j]`` is
    the mean per-case Dice between ``sources[i]``'s and ``sources[j]``'s predictions
    (:func:`core.transfer.transferability.prediction_agreement`), for the agreement
    selection; empty when not computed.
    """

    metric: str
    sources: tuple[str, ...]
    itm: tuple[tuple[float, ...], ...]
    agreement: tuple[tuple[float, ...], ...] = ()

    @property
    def agreement_by_name(self) -> dict[str, dict[str, float]]:
        """``agreement`` keyed by candidate names (empty when not computed)."""
        return {
            first: {
                second: self.agreement[row][column]
                for column, second in enumerate(self.sources)
            }
            for row, first in enumerate(self.sources)
            if self.agreement
        }

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


def _target_slices(index: SiteIndex, config: RunConfig) -> SliceSet:
    """All the target's training images, labels ignored (adaptation is unsupervised)."""
    cases = index.training_images
    if not cases:
        raise SiteDataError(f"{index.root}: no training images (imagesTr) to adapt on")
    return build_slice_set(cases, data=config.data, with_labels=False)


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
    countdown = Countdown(len(names))
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
            f"{float(scores.per_case.mean()):.3f} over {len(slices.case_ids)} cases, "
            f"candidate {countdown.tick()}"
        )
    itm = torch.stack(columns, dim=1)
    rows = tuple(tuple(float(value) for value in row) for row in itm.tolist())
    agreement = prediction_agreement(
        [predicted_classes(maps) for maps in probabilities],
        case_of_slice=slices.case_of_slice,
        num_cases=len(slices.case_ids),
    )
    return (
        Transferability(
            metric=config.transfer.metric.value,
            sources=names,
            itm=rows,
            agreement=tuple(tuple(float(v) for v in row) for row in agreement.tolist()),
        ),
        probabilities,
    )


def select_pair(
    transferability: Transferability,
    transfer: TransferConfig,
    *,
    rule: SelectionRule | None = None,
) -> SourceSelection:
    """The main/aux pair and pseudo-label voters from a target's own scores.

    ``rule`` defaults to ``transfer.selection``; the threshold is the config's.
    """
    return select_sources(
        transferability.dtm,
        rule=transfer.selection if rule is None else rule,
        agreement=transferability.agreement_by_name or None,
        threshold=transfer.agreement_threshold,
    )


def score_candidates(
    site_dir: Path,
    candidates: Mapping[str, Arrays],
    config: RunConfig,
    *,
    progress: Progress = quiet,
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
    progress: Progress = quiet,
) -> Adaptation:
    """Adapt the main/aux pair on the target with ITM-corrected pseudo-labels.

    ITM is recomputed here from ``candidates`` (deterministic, two forward passes per
    candidate), so the pseudo-labels never depend on what the site released. With
    ``dp`` the pair is adapted by DP-SGD
    (:func:`core.transfer.adaptation.adapt_pair_private`: per-sample Dice against each
    slice's pseudo-label, the pair clipped together), planned, checked and recorded in
    the site's accountant before its first step; the fraction of pixels pseudo-labelled
    foreground is then withheld (nan).

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
        raise ValueError(DP_BATCH_NORM_ERROR)
    started = time.perf_counter()
    slices = _target_slices(index_site(Path(site_dir)), config)
    transferability, probabilities = score_slices(slices, candidates, config, progress)
    soft = build_pseudo_labels(
        probabilities,
        torch.tensor(transferability.itm),
        case_of_slice=slices.case_of_slice,
    )
    pseudo_labels = predicted_classes(soft)
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
