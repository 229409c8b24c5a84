"""TGMA target optimisation of the main/auxiliary pair (METHODS.md sections 0 and 1).

Both networks start from their source weights and are trained together on the target's
unlabelled images with a Dice loss between the (fixed, precomputed) ITM-corrected
pseudo-label and ``W_main * softmax(F_main(x)) + W_aux * softmax(F_aux(x))``. Inference
uses the same weighted pair. Never imports flwr.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.losses import DiceLoss
from torch import nn

from core.config import AdaptConfig, TrainConfig
from core.training import TrainResult, run_training


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
