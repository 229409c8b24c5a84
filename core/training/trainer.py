"""The one training loop, batched inference, device and AMP handling.

Every model SiteBridge trains (source models, the target-supervised oracle, TGMA's
adapted pair) goes through :func:`run_training`: seeded, CUDA + AMP when available, CPU
otherwise, with one progress line per epoch. Inference goes through
:func:`predict_probabilities`. Pure PyTorch/MONAI; never imports flwr.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from core.config import TrainConfig
from core.logs import get_logger
from core.training.loop import MixedPrecision, TrainingClock, device_description

LOGGER = get_logger("train")

StepLoss = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """What a training run did.

    Attributes:
        num_examples: samples (slices) seen over all epochs, never batches.
        epoch_losses: mean loss per epoch.
        seconds: wall time of the loop.
        device: the device it ran on.
    """

    num_examples: int
    epoch_losses: tuple[float, ...]
    seconds: float
    device: str

    @property
    def final_loss(self) -> float:
        """Mean loss of the last epoch (nan when no epoch ran)."""
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


def select_device(name: str) -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda[:N]`` to a device (``auto`` prefers CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available here")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def augment_batch(
    tensors: Sequence[torch.Tensor], generator: torch.Generator
) -> list[torch.Tensor]:
    """Flip the whole batch left-right and/or up-down, identically for every tensor.

    Tensors share the last two (spatial) dimensions; flips are drawn from ``generator``
    so runs are reproducible.
    """
    flips = torch.rand(2, generator=generator) < 0.5
    dims = [dim for dim, flip in zip((-1, -2), flips.tolist(), strict=True) if flip]
    if not dims:
        return list(tensors)
    return [tensor.flip(dims) for tensor in tensors]


def augment_intensity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random gain, offset and Gaussian noise on ``(B, 1, ...)`` inputs.

    The nnU-Net-style intensity augmentation (multiplicative brightness, additive
    shift, noise), in z-score units; parameters are drawn from ``generator`` first,
    then applied. Slices ``(B, 1, H, W)`` and volumes ``(B, 1, D, H, W)`` alike.
    """
    count = images.shape[0]
    shape = (count,) + (1,) * (images.ndim - 1)
    gain = 0.8 + 0.4 * torch.rand(shape, generator=generator)
    offset = 0.3 * (torch.rand(shape, generator=generator) - 0.5)
    noise_sd = 0.15 * torch.rand(shape, generator=generator)
    noise = torch.randn(images.shape, generator=generator) * noise_sd
    return images * gain + offset + noise


def run_training(
    modules: Sequence[nn.Module],
    tensors: Sequence[torch.Tensor],
    step_loss: StepLoss,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
    amp: bool,
    augment: bool,
    label: str,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``modules`` jointly with Adam on mini-batches of ``tensors``.

    Args:
        modules: networks whose parameters are optimised; moved to ``device``, put
            in train mode, and left in eval mode at the end.
        tensors: aligned tensors with the sample dimension first (e.g. images
            ``(N, 1, H, W)`` and targets ``(N, H, W)``); kept on the host and moved
            per batch.
        step_loss: maps one batch (the tensors, on ``device``) to a scalar loss.
        epochs: passes over ``tensors``.
        batch_size: samples per optimiser step.
        learning_rate: Adam's learning rate.
        seed: seeds initial randomness, data order and augmentation.
        device: where to train.
        amp: float16 autocast + gradient scaling, used on CUDA only.
        augment: random flips applied identically to every tensor of a batch.
        label: names the run in progress lines.
        progress: called with one line per epoch (defaults to the module logger).

    Returns:
        The run's :class:`TrainResult`. Updates ``modules`` in place.
    """
    generator = seed_everything(seed)
    for module in modules:
        module.to(device).train()
    parameters = [
        p for module in modules for p in module.parameters() if p.requires_grad
    ]
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    precision = MixedPrecision(device, amp=amp)
    num_samples = int(tensors[0].shape[0])
    epoch_losses: list[float] = []
    clock = TrainingClock(label, progress or LOGGER.info)
    clock.line(
        f"{num_samples} samples x {epochs} epochs on "
        + device_description(device, amp=precision.enabled)
    )
    for epoch in range(epochs):
        order = torch.randperm(num_samples, generator=generator)
        total, count = 0.0, 0
        for start in range(0, num_samples, batch_size):
            index = order[start : start + batch_size]
            batch = [tensor[index] for tensor in tensors]
            if augment:
                batch = augment_batch(batch, generator)
                batch[0] = augment_intensity(batch[0], generator)
            batch = [tensor.to(device, non_blocking=True) for tensor in batch]
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = step_loss(batch)
            precision.backward_and_step(loss, optimizer)
            # One host sync per batch is the price of an honest epoch loss.
            total += float(loss.detach()) * len(index)
            count += len(index)
        epoch_losses.append(total / max(count, 1))
        clock.epoch(epoch, epochs, epoch_losses[-1], samples=count)
    for module in modules:
        module.eval()
    return TrainResult(
        num_examples=epochs * num_samples,
        epoch_losses=tuple(epoch_losses),
        seconds=clock.seconds,
        device=str(device),
    )


def train_supervised(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    train: TrainConfig,
    device: torch.device,
    label: str,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``model`` on labelled slices with Dice + cross-entropy.

    Args:
        model: a segmentation network with C output channels; updated in place.
        images: ``(N, 1, H, W)`` float inputs.
        labels: ``(N, H, W)`` integer class maps.
        train: the recipe (epochs, batch size, learning rate, seed, AMP, augment).
        device: where to train.
        label: names the run in progress lines.
        progress: called with progress lines.
    """
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def step_loss(batch: Sequence[torch.Tensor]) -> torch.Tensor:
        batch_images, batch_labels = batch
        loss: torch.Tensor = loss_function(
            model(batch_images), batch_labels.unsqueeze(1)
        )
        return loss

    return run_training(
        [model],
        [images, labels],
        step_loss,
        epochs=train.epochs,
        batch_size=train.batch_size,
        learning_rate=train.learning_rate,
        seed=train.seed,
        device=device,
        amp=train.amp,
        augment=train.augment,
        label=label,
        progress=progress,
    )


def predicted_classes(probabilities: torch.Tensor) -> torch.Tensor:
    """The class of highest probability per pixel: ``probabilities.argmax(1)``.

    The same result (ties go to the lower class, as ``argmax``), computed with one
    comparison per class: on the CPU, torch's ``argmax`` over the channel axis of an
    ``(N, C, H, W)`` tensor is about ten times slower (52 ms against 5 ms for 120
    two-class 64 px maps, one thread), and LFTM takes three per candidate
    (``benchmarks/perf.json``).

    Example:
        >>> maps = torch.tensor([[[[0.2]], [[0.8]]], [[[0.5]], [[0.5]]]])
        >>> predicted_classes(maps).flatten().tolist()
        [1, 0]
    """
    best = probabilities[:, 0]
    classes = torch.zeros(best.shape, dtype=torch.int64, device=probabilities.device)
    for index in range(1, probabilities.shape[1]):
        candidate = probabilities[:, index]
        classes[candidate > best] = index
        best = torch.maximum(best, candidate)
    return classes


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 64,
    amp: bool = True,
) -> torch.Tensor:
    """Return softmax probabilities ``(N, C, H, W)`` on the host for ``images``.

    Runs batched in eval mode; float16 autocast on CUDA when ``amp``.
    """
    model.to(device).eval()
    use_amp = amp and device.type == "cuda"
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(
            device_type=device.type, dtype=torch.float16, enabled=use_amp
        ):
            logits = model(batch)
        outputs.append(torch.softmax(logits.float(), dim=1).cpu())
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)


def predict_mixture(
    models: Sequence[nn.Module],
    weights: Sequence[float],
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 64,
    amp: bool = True,
) -> torch.Tensor:
    """Return ``sum_k weights[k] * softmax(models[k](images))`` ``(N, C, H, W)``.

    ``weights`` are used as given (callers normalise them).
    """
    if len(models) != len(weights) or not models:
        raise ValueError(
            "predict_mixture needs one weight per model, at least one model"
        )
    mixture: torch.Tensor | None = None
    for model, weight in zip(models, weights, strict=True):
        probabilities = weight * predict_probabilities(
            model, images, device=device, batch_size=batch_size, amp=amp
        )
        mixture = probabilities if mixture is None else mixture + probabilities
    assert mixture is not None
    return mixture
