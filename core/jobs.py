"""What a site computes on its own data, one function per federated action.

``train_source_model`` (``train.source``), ``score_candidates`` (``query.lftm``),
``adapt_target`` (``train.adapt``) and ``evaluate_predictors`` (``evaluate``) take a
site folder, the typed run config and weights as ``dict[str, numpy array]``, and return
only what may leave the site: weights, per-case scores and aggregate metrics. The
ClientApp handlers and the leave-one-site-out benchmark both call these functions, so
the benchmark measures exactly what the federation runs. ``train.consensus`` has its
own module, :mod:`core.consensus_job`. Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from core.adaptation import adapt_pair
from core.config import Norm, RunConfig
from core.data import SiteDataError, SiteIndex, SliceSet, build_slice_set, index_site
from core.metrics import SegmentationScores, score_cases
from core.models import Arrays, build_model, get_weights, set_weights
from core.privacy import (
    AccountantState,
    DpSettings,
    PrivateTrainResult,
    read_accountant_state,
    train_private,
    write_accountant_state,
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
    """The adapted main/auxiliary weights and what adaptation did."""

    main_weights: Arrays
    aux_weights: Arrays | None
    num_examples: int
    pseudo_label_foreground: (
        float  # fraction of target pixels pseudo-labelled foreground
    )
    seconds: float


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
        accountant_path: the site's accountant file; read before a DP training (the
            budget check counts what is already spent) and rewritten after it. None
            starts from an empty history and records nothing.
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
        raise ValueError(
            "model.norm 'batch' keeps running statistics across samples, which DP-SGD "
            "cannot account for; run with model.norm 'instance' or 'group' where DP "
            "applies"
        )
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
        accountant = (
            read_accountant_state(accountant_path)
            if accountant_path is not None
            else AccountantState(())
        )
        model, private = train_private(
            model,
            slices.images,
            slices.labels,
            train=config.train,
            dp=dp,
            accountant=accountant,
            device=device,
            label=label,
            progress=progress,
        )
        if accountant_path is not None:
            write_accountant_state(private.accountant, accountant_path)
        progress(
            f"[{label}] epsilon {private.epsilon_spent:.3f} spent, "
            f"{private.epsilon_total:.3f} of {dp.budget_epsilon:g} in total "
            f"(delta {dp.delta:g})"
        )
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
    progress: Progress = _quiet,
) -> Adaptation:
    """Adapt the main/aux pair on the target with ITM-corrected pseudo-labels.

    ITM is recomputed here from ``candidates`` (deterministic, two forward passes per
    candidate), so the pseudo-labels never depend on what the site released.
    """
    for name in (main, aux):
        if name is not None and name not in candidates:
            raise ValueError(
                f"selected source {name!r} is not among the candidates "
                f"{sorted(candidates)}"
            )
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
    result = adapt_pair(
        models,
        weights,
        slices.images,
        pseudo_labels,
        adapt=config.adapt,
        train=config.train,
        device=select_device(config.train.device),
        progress=progress,
    )
    return Adaptation(
        main_weights=get_weights(models[0]),
        aux_weights=get_weights(models[1]) if len(models) > 1 else None,
        num_examples=result.num_examples,
        pseudo_label_foreground=float((pseudo_labels > 0).float().mean()),
        seconds=time.perf_counter() - started,
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
