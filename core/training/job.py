"""The ``train.source`` job: a source model trained on the site's labelled cases.

``train_source_model`` takes a site folder, the typed run config and optional initial
weights (``dict[str, numpy array]``) and returns only what may leave the site: the
weights and how they were trained. The ClientApp handler and the benchmarks call this
function, so a benchmark measures exactly what the federation runs. Under a site
policy that requires DP it trains with DP-SGD charged to the site's accountant
(:func:`core.privacy.dp.reserve_privacy`). Never imports flwr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

from core.config import Norm, RunConfig
from core.data.dataset import (
    SiteDataError,
    build_slice_set,
    index_site,
)
from core.logs import Progress, quiet
from core.privacy.dp import (
    DpSettings,
    PrivateTrainResult,
    describe_spend,
    train_private,
)
from core.training.networks import Arrays, build_model, get_weights, set_weights
from core.training.trainer import select_device, train_supervised


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


DP_BATCH_NORM_ERROR = (
    "model.norm 'batch' keeps running statistics across samples, which DP-SGD "
    "cannot account for; run with model.norm 'instance' or 'group' where DP applies"
)


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
    progress: Progress = quiet,
) -> SourceTraining:
    """Train a model on the site's labelled training cases, with DP-SGD when asked.

    Args:
        site_dir: the site folder.
        config: the run config (model, data and training recipe).
        initial_weights: the coordinator's initial weights, or None for a seeded init.
        dp: DP-SGD settings (the applied policy's), or None for ordinary training.
        accountant_path: the site's accountant file: the training is planned,
            checked and recorded there before its first step
            (:func:`core.privacy.dp.train_private`). None starts from an empty
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
        raise ValueError(DP_BATCH_NORM_ERROR)
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
