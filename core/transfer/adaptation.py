"""TGMA target optimisation of the main/auxiliary pair (docs/methods.md#tgma).

Both networks start from their source weights and are trained together on the target's
unlabelled images with a Dice loss between the (fixed, precomputed) ITM-corrected
pseudo-label and ``W_main * softmax(F_main(x)) + W_aux * softmax(F_aux(x))``. Inference
uses the same weighted pair. :func:`adapt_pair` is the ordinary training;
:func:`adapt_pair_private` the same objective under DP-SGD (per-sample Dice, the
mechanism of :class:`core.privacy.dp.PrivateGradient` on a module holding both networks,
charged to the site's accountant), for a site whose policy requires DP. Never imports
flwr.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from monai.losses import DiceLoss
from torch import nn

from core.config import AdaptConfig, TrainConfig
from core.privacy.dp import (
    DpSettings,
    PrivacySpend,
    PrivateSchedule,
    check_dp_compatible,
    run_private_training,
)
from core.training.trainer import TrainResult, run_training


def weighted_pair_loss(
    models: Sequence[nn.Module],
    weights: Sequence[float],
    images: torch.Tensor,
    pseudo_labels: torch.Tensor,
) -> torch.Tensor:
    """Dice loss between hard pseudo-labels ``(B, H, W)`` and the weighted softmax mix.

    Example:
        >>> class Fixed(nn.Module):
        ...     def forward(self, x):
        ...         return torch.stack([torch.zeros_like(x[:, 0]), 20 * x[:, 0]], 1)
        >>> images = torch.tensor([[[[1.0, -1.0]]]]); labels = torch.tensor([[[1, 0]]])
        >>> round(float(weighted_pair_loss([Fixed()], [1.0], images, labels)), 3)
        0.0
    """
    mixture = sum(
        weight * torch.softmax(model(images).float(), dim=1)
        for model, weight in zip(models, weights, strict=True)
    )
    assert isinstance(mixture, torch.Tensor)
    loss_function = DiceLoss(to_onehot_y=True, softmax=False, batch=True)
    loss: torch.Tensor = loss_function(mixture, pseudo_labels.unsqueeze(1))
    return loss


def adapt_pair(
    models: Sequence[nn.Module],
    weights: Sequence[float],
    images: torch.Tensor,
    pseudo_labels: torch.Tensor,
    *,
    adapt: AdaptConfig,
    train: TrainConfig,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Adapt the main (and auxiliary) model to the target. Updates ``models`` in place.

    Args:
        models: ``[F_main]`` or ``[F_main, F_aux]``, initialised from source weights.
        weights: ``[W_main]`` or ``[W_main, W_aux]`` (fixed; from the DTM).
        images: ``(N, 1, H, W)`` unlabelled target slices.
        pseudo_labels: ``(N, H, W)`` hard ITM-corrected pseudo-labels.
        adapt: epochs, batch size and learning rate of adaptation.
        train: seed, AMP and augmentation settings shared with source training.
        device: where to train.
        progress: called with one line per epoch.
    """
    if len(models) != len(weights) or not 1 <= len(models) <= 2:
        raise ValueError("adapt_pair takes one or two models with one weight each")

    def step_loss(batch: Sequence[torch.Tensor]) -> torch.Tensor:
        batch_images, batch_labels = batch
        return weighted_pair_loss(models, weights, batch_images, batch_labels)

    return run_training(
        models,
        [images, pseudo_labels],
        step_loss,
        epochs=adapt.epochs,
        batch_size=adapt.batch_size,
        learning_rate=adapt.learning_rate,
        seed=train.seed,
        device=device,
        amp=train.amp,
        augment=train.augment,
        label="adapt",
        progress=progress,
    )


def per_sample_pair_loss(
    models: Sequence[nn.Module],
    weights: Sequence[float],
    images: torch.Tensor,
    pseudo_labels: torch.Tensor,
) -> torch.Tensor:
    """:func:`weighted_pair_loss` of each sample on its own, ``(B,)``.

    The Dice loss of one sample's weighted softmax mix against its own pseudo-label,
    averaged over the classes (``DiceLoss(batch=False)``), so sample ``i``'s loss
    depends on sample ``i`` alone, as DP-SGD's per-sample clipping needs.

    Example:
        >>> class Fixed(nn.Module):
        ...     def forward(self, x):
        ...         return torch.stack([torch.zeros_like(x[:, 0]), 20 * x[:, 0]], 1)
        >>> images = torch.tensor([[[[1.0, -1.0]]], [[[1.0, 1.0]]]])
        >>> labels = torch.tensor([[[1, 0]], [[1, 1]]])
        >>> per_sample_pair_loss([Fixed()], [1.0], images, labels).shape
        torch.Size([2])
    """
    mixture = sum(
        weight * torch.softmax(model(images).float(), dim=1)
        for model, weight in zip(models, weights, strict=True)
    )
    assert isinstance(mixture, torch.Tensor)
    loss_function = DiceLoss(
        to_onehot_y=True, softmax=False, batch=False, reduction="none"
    )
    loss: torch.Tensor = loss_function(mixture, pseudo_labels.unsqueeze(1))
    return loss.flatten(1).mean(1)


def adapt_pair_private(
    models: Sequence[nn.Module],
    weights: Sequence[float],
    images: torch.Tensor,
    pseudo_labels: torch.Tensor,
    *,
    case_of_slice: torch.Tensor,
    adapt: AdaptConfig,
    train: TrainConfig,
    dp: DpSettings,
    accountant_path: Path | None,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
    seed: int | None = None,
) -> tuple[TrainResult, PrivacySpend | None]:
    """Adapt the pair to the target with DP-SGD. Updates ``models`` in place.

    The mechanism is :class:`core.privacy.dp.PrivateGradient` on one module holding both
    networks (each sample's gradient is clipped over both together): q =
    ``adapt.batch_size / N`` and ``adapt.epochs * ceil(N / adapt.batch_size)`` steps
    (:func:`core.privacy.dp.dp_sgd_schedule`), reserved in the site's accountant
    (:func:`core.privacy.dp.reserve_privacy`) before the first step, with the most
    slices any case contributes as its units per case. Each step's per-sample loss
    is :func:`per_sample_pair_loss` of the drawn slices against their pseudo-labels,
    flipped (and intensity-augmented) alike with the mechanism's generator when
    ``train.augment``; then one Adam step at ``adapt.learning_rate``.

    Privacy claim: the protected record is a target training slice as adaptation
    sees it (its image and its pseudo-label). A pseudo-label is computed from the
    sent candidates on that slice, weighted by its case's transferability scores,
    so the slices of one case are tied together: the patient-level figure (k = the
    case's slices) is the one that covers a patient. Weights sent by the coordinator
    are public. The loss values are not covered (the result's losses stay at the
    site).

    Args:
        models: ``[F_main]`` or ``[F_main, F_aux]``; no BatchNorm.
        weights: ``[W_main]`` or ``[W_main, W_aux]``.
        images: ``(N, 1, H, W)`` target slices.
        pseudo_labels: ``(N, H, W)`` hard pseudo-labels.
        case_of_slice: ``(N,)`` the case each slice comes from.
        adapt: epochs, batch size (the expected Poisson batch) and learning rate.
        train: the augmentation switch.
        dp: the site's DP settings.
        accountant_path: the site's accountant file (None: nothing recorded).
        device: where to train.
        progress: called with one line per epoch.
        seed: the mechanism's seed; None (a site) draws one from the OS.

    Returns:
        The training's result (losses for the site's own log) and the spend; None
        with ``adapt.epochs = 0`` (nothing is trained, nothing charged).

    Raises:
        PrivacyBudgetError: before any step, when the budget would be exceeded.
        ValueError: a model Opacus rejects or mismatched inputs (nothing recorded).
    """
    if len(models) != len(weights) or not 1 <= len(models) <= 2:
        raise ValueError("adapt_pair_private takes one or two models with one weight")
    num_samples = int(images.shape[0])
    if pseudo_labels.shape[0] != num_samples or case_of_slice.shape != (num_samples,):
        raise ValueError(
            f"images, pseudo-labels and case_of_slice must have {num_samples} rows"
        )
    pair = nn.ModuleList(models).to(device).train()
    check_dp_compatible(pair)  # before anything is recorded
    if adapt.epochs == 0:
        pair.eval()
        return TrainResult(
            num_examples=0, epoch_losses=(), seconds=0.0, device=str(device)
        ), None
    result, spend = run_private_training(
        pair,
        images,
        pseudo_labels,
        case_of_slice=case_of_slice,
        per_sample_loss=lambda batch, targets: per_sample_pair_loss(
            models, weights, batch, targets
        ),
        schedule=PrivateSchedule(
            epochs=adapt.epochs,
            batch_size=adapt.batch_size,
            learning_rate=adapt.learning_rate,
            augment=train.augment,
        ),
        dp=dp,
        accountant_path=accountant_path,
        device=device,
        label="adapt",
        progress=progress,
        seed=seed,
    )
    pair.eval()
    return result, spend
