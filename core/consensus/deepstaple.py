"""DeepSTAPLE: data parameters learned on noisy labels, and softmax-weighted voting.

Owns the learned label consensus of docs/methods.md#deepstaple, whose numbering the
formulas below follow: one data parameter per noisy label instance (or per group of
instances that share one, such as the slices of one case) is learned while a
segmentation network trains on the noisy labels (formulas 1-5, out-of-line two-step
update by default), and the labels of one image are fused by softmax(data parameter)
voting (formula 6). The baselines it is compared with
(majority vote, STAPLE) live in :mod:`core.consensus.staple`, whose label-stack
validation this module reuses.

Depends on numpy, torch and :mod:`core.consensus.staple` (for the stack check); imports
neither SimpleITK nor flwr itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as functional
from torch import nn

from core.consensus.staple import check_label_stack
from core.logs import get_logger
from core.training.loop import MixedPrecision, TrainingClock
from core.training.trainer import seed_everything

LOGGER = get_logger("consensus")
CLASS_WEIGHT_EXPONENT: float = 0.35
NETWORK_LEARNING_RATE: float = 0.01
DATA_PARAMETER_LEARNING_RATE: float = 0.1
# The label-free priors (consensus.dp-prior, docs/methods.md#data-parameters): a source
# scored s in [0, 1] (its DTM, or its agreement with TGMA's main) starts at
# PRIOR_SCALE * (logit(s) - mean over sources of logit(s)), s clipped to
# [PRIOR_CLIP, 1 - PRIOR_CLIP]. Centring keeps the mean start at the paper's 0.0, so
# only the spread between sources changes. Scale 1.0: the pipeline's DTM (about
# 0.1-0.95) then spread the starts over about -2..+2, the distance SparseAdam at lr 0.1
# covers in about 20 of its 30 steps (one step per epoch), so the prior tilts the start
# without fixing the end. Not tuned.
PRIOR_SCALE: float = 1.0
PRIOR_CLIP: float = 0.05

BoolArray = npt.NDArray[np.bool_]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeepStapleResult:
    """What a DeepSTAPLE run produced.

    Attributes:
        model: the trained network (in eval mode, on the training device).
        data_parameters: ``(N,)`` raw data parameter per noisy label instance
            (instances that share a parameter get the same value).
        epoch_losses: mean network loss per epoch (class-weighted CE out-of-line,
            the data-parameter loss in-line).
        seconds: wall time of the loop.
    """

    model: nn.Module
    data_parameters: npt.NDArray[np.float32]
    epoch_losses: tuple[float, ...]
    seconds: float


class DataParameters(nn.Module):
    """One learnable scalar per noisy label instance (docs/methods.md#data-parameters).

    Stored as a sparse ``(count, 1)`` embedding initialised to 0.0 (the paper's flat
    start) or to ``initial``, so only the rows of a batch receive (sparse) gradients;
    optimise it with ``torch.optim.SparseAdam``.

    Args:
        count: number of noisy label instances N.
        initial: ``(count,)`` finite starting values; None: all 0.0.
    """

    def __init__(self, count: int, initial: torch.Tensor | None = None) -> None:
        super().__init__()
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.embedding = nn.Embedding(count, 1, sparse=True)
        nn.init.zeros_(self.embedding.weight)
        if initial is not None:
            if initial.shape != (count,) or not bool(torch.isfinite(initial).all()):
                raise ValueError(
                    f"initial data parameters must be ({count},) finite values, got "
                    f"{tuple(initial.shape)}"
                )
            with torch.no_grad():
                self.embedding.weight.copy_(initial.reshape(count, 1))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the raw data parameters ``(B,)`` of the instances ``indices``."""
        raw: torch.Tensor = self.embedding(indices).squeeze(-1)
        return raw


def prior_data_parameters(scores: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Return each source's starting data parameter from its label-free score.

    ``PRIOR_SCALE * (logit(s) - mean(logit(s)))`` with ``s`` clipped to
    ``[PRIOR_CLIP, 1 - PRIOR_CLIP]``; a nan score (a source without one, such as an
    atlas) starts at 0.0 and is left out of the mean.

    Args:
        scores: ``(A,)`` per source, its DTM or agreement on the target, in [0, 1].

    Example:
        >>> prior_data_parameters([0.5, 0.5]).tolist()
        [0.0, 0.0]
        >>> start = prior_data_parameters([0.75, 0.25, float("nan")])
        >>> [round(float(value), 3) for value in start]
        [1.099, -1.099, 0.0]
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"scores must be one per source (A,), got {values.shape}")
    known = np.isfinite(values)
    clipped = np.clip(values[known], PRIOR_CLIP, 1.0 - PRIOR_CLIP)
    log_odds = np.log(clipped / (1.0 - clipped))
    result = np.zeros(values.shape, dtype=np.float32)
    if log_odds.size:
        result[known] = PRIOR_SCALE * (log_odds - log_odds.mean())
    return result


def batch_weights(raw: torch.Tensor) -> torch.Tensor:
    """Return ``sigmoid(raw) / mean_batch sigmoid(raw)`` (formula 1).

    Example:
        >>> batch_weights(torch.zeros(3)).tolist()
        [1.0, 1.0, 1.0]
    """
    drawn = torch.sigmoid(raw)
    return drawn / drawn.mean()


def compensation_weights(
    normalised: torch.Tensor, foreground_counts: torch.Tensor
) -> torch.Tensor:
    """Return ``normalised / (log(G + e) + e)`` (formula 2, fixed weighting).

    Args:
        normalised: ``(B,)`` batch-normalised weights.
        foreground_counts: ``(B,)`` foreground voxel count G of each noisy label.

    Example:
        >>> round(float(compensation_weights(torch.ones(1), torch.zeros(1))), 4)
        0.2689
    """
    counts = foreground_counts.to(normalised.dtype)
    return normalised / (torch.log(counts + math.e) + math.e)


def data_parameter_loss(
    logits: torch.Tensor,
    noisy_labels: torch.Tensor,
    raw: torch.Tensor,
    foreground_counts: torch.Tensor,
    *,
    fixed_weighting: bool = True,
    risk_regularisation: bool = True,
) -> torch.Tensor:
    """Return the DeepSTAPLE data-parameter loss of one batch (formulas 1-4).

    ``sum_b w_b * CE_b`` where ``CE_b`` is the spatial mean of the unweighted voxelwise
    cross-entropy; with risk regularisation ``sum_b w_b * F_b`` is subtracted, where
    ``F_b`` is the detached fraction of voxels whose logits' argmax is not background,
    so a larger weight is rewarded where more foreground is predicted.

    Args:
        logits: ``(B, C, *spatial)``.
        noisy_labels: ``(B, *spatial)`` integer class maps.
        raw: ``(B,)`` raw data parameters of the batch's label instances.
        foreground_counts: ``(B,)`` foreground voxel counts of the noisy labels.
        fixed_weighting: apply the compensation weighting (formula 2).
        risk_regularisation: subtract the risk term (formula 4).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: the shapes of the arguments disagree.
    """
    expected = (logits.shape[0],)
    if (
        logits.ndim < 3
        or noisy_labels.shape != logits.shape[:1] + logits.shape[2:]
        or raw.shape != expected
        or foreground_counts.shape != expected
    ):
        raise ValueError(
            "data_parameter_loss needs logits (B, C, *spatial), noisy_labels "
            "(B, *spatial), raw (B,) and foreground_counts (B,), got "
            f"logits {tuple(logits.shape)}, noisy_labels {tuple(noisy_labels.shape)}, "
            f"raw {tuple(raw.shape)}, "
            f"foreground_counts {tuple(foreground_counts.shape)}"
        )
    weights = batch_weights(raw)
    if fixed_weighting:
        weights = compensation_weights(weights, foreground_counts)
    voxel_losses = functional.cross_entropy(
        logits.float(), noisy_labels.long(), reduction="none"
    )
    sample_losses = voxel_losses.flatten(1).mean(dim=1)
    loss = (weights * sample_losses).sum()
    if risk_regularisation:
        predicted = (logits.detach().argmax(dim=1) != 0).flatten(1)
        loss = loss - (weights * predicted.float().mean(dim=1)).sum()
    return loss


def class_weights(noisy_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return ``cw_c = count_c ** -0.35`` rescaled to mean 1 (formula 5).

    A class with no voxel in any noisy label gets weight 0 (it never is a target, so
    its weight cannot matter) and the mean is taken over the present classes.

    Args:
        noisy_labels: ``(N, *spatial)`` integer class maps of all training labels.
        num_classes: C.

    Returns:
        ``(C,)`` float32 weights.

    Raises:
        ValueError: a label value lies outside ``[0, num_classes)`` or the labels are
            empty.

    Example:
        >>> weights = class_weights(torch.tensor([[0, 0, 0, 1]]), 3)
        >>> [round(weight, 3) for weight in weights.tolist()]
        [0.81, 1.19, 0.0]
    """
    if noisy_labels.numel() == 0:
        raise ValueError(f"noisy_labels must not be empty, got {noisy_labels.shape}")
    low, high = int(noisy_labels.min()), int(noisy_labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"noisy_labels must lie in [0, {num_classes}), got [{low}, {high}] "
            f"in shape {tuple(noisy_labels.shape)}"
        )
    counts = torch.bincount(noisy_labels.flatten().long(), minlength=num_classes)
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float32)
    weights[present] = counts[present].float().pow(-CLASS_WEIGHT_EXPONENT)
    return weights / weights[present].mean()


def weighted_vote(
    labels: npt.NDArray[np.generic], raw_data_parameters: npt.ArrayLike
) -> BoolArray:
    """Fuse one image's binary labels by softmax(data parameter) voting (formula 6).

    Args:
        labels: ``(A, *spatial)`` binary masks of one image.
        raw_data_parameters: ``(A,)`` raw data parameters of those labels.

    Returns:
        ``(*spatial)`` mask ``sum_a softmax(d)_a * y_a > 0.5``.

    Raises:
        ValueError: the stack is empty or not binary, or the counts differ.

    Example:
        >>> stack = np.array([[[1, 1]], [[1, 0]], [[0, 0]]])
        >>> weighted_vote(stack, [2.0, 0.0, 0.0]).tolist()
        [[True, True]]
    """
    check_label_stack(labels, "labels", binary=True)
    raw = np.asarray(raw_data_parameters, dtype=np.float64)
    if raw.shape != labels.shape[:1]:
        raise ValueError(
            f"raw_data_parameters must have shape ({labels.shape[0]},) to match "
            f"labels {labels.shape}, got {raw.shape}"
        )
    weights = np.exp(raw - raw.max())
    weights /= weights.sum()
    votes = np.tensordot(weights, labels.astype(np.float64), axes=1)
    result: BoolArray = votes > 0.5
    return result


def step_network(
    model: nn.Module,
    images: torch.Tensor,
    noisy_labels: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    class_weight: torch.Tensor,
    precision: MixedPrecision,
) -> float:
    """Out-of-line step 1: class-weighted CE vs the noisy labels; network only.

    The data parameters take no part. Updates ``model`` in place.

    Args:
        model: the segmentation network.
        images: ``(B, 1, *spatial)`` on the model's device.
        noisy_labels: ``(B, *spatial)`` integer class maps on the same device.
        optimizer: the network's optimiser.
        class_weight: ``(C,)`` weights from :func:`class_weights`.
        precision: the network's autocast and gradient scaler (off on the CPU).

    Returns:
        The batch loss.
    """
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        logits = model(images)
    loss = functional.cross_entropy(
        logits.float(), noisy_labels.long(), weight=class_weight
    )
    precision.backward_and_step(loss, optimizer)
    return float(loss.detach())


def step_data_parameters(
    model: nn.Module,
    data_parameters: DataParameters,
    images: torch.Tensor,
    noisy_labels: torch.Tensor,
    indices: torch.Tensor,
    foreground_counts: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    precision: MixedPrecision,
    fixed_weighting: bool = True,
    risk_regularisation: bool = True,
) -> float:
    """Out-of-line step 2: data-parameter loss on a frozen network; DPs only.

    The network's parameters are frozen (``requires_grad`` False) for a second
    forward pass and restored afterwards, even on error. Updates ``data_parameters``
    in place; the network's weights are untouched.

    Args:
        model: the segmentation network.
        data_parameters: the table of raw data parameters.
        images: ``(B, 1, *spatial)`` on the model's device.
        noisy_labels: ``(B, *spatial)`` integer class maps.
        indices: ``(B,)`` label-instance indices into ``data_parameters``.
        foreground_counts: ``(B,)`` foreground voxel counts of the noisy labels.
        optimizer: the data parameters' ``SparseAdam``.
        precision: the data parameters' autocast and gradient scaler (off on the
            CPU).
        fixed_weighting: see :func:`data_parameter_loss`.
        risk_regularisation: see :func:`data_parameter_loss`.

    Returns:
        The batch's data-parameter loss.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            logits = model(images)
        loss = data_parameter_loss(
            logits,
            noisy_labels,
            data_parameters(indices),
            foreground_counts,
            fixed_weighting=fixed_weighting,
            risk_regularisation=risk_regularisation,
        )
        precision.backward_and_step(loss, optimizer)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return float(loss.detach())


def _check_training_inputs(images: torch.Tensor, noisy_labels: torch.Tensor) -> None:
    if images.ndim not in (4, 5) or images.shape[1] != 1:
        raise ValueError(
            "images must have shape (N, 1, H, W) or (N, 1, D, H, W), "
            f"got {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"images must not be empty, got {tuple(images.shape)}")
    if noisy_labels.shape != images.shape[:1] + images.shape[2:]:
        raise ValueError(
            f"noisy_labels must have shape {tuple(images.shape[:1] + images.shape[2:])}"
            f" to match images {tuple(images.shape)}, got {tuple(noisy_labels.shape)}"
        )
    if noisy_labels.is_floating_point():
        raise ValueError(f"noisy_labels must be integers, got {noisy_labels.dtype}")


def _check_parameter_index(index: torch.Tensor | None, count: int) -> torch.Tensor:
    """Return ``index`` (identity when None) after checking it maps onto 0..P-1."""
    if index is None:
        return torch.arange(count)
    if index.shape != (count,) or index.is_floating_point() or index.is_complex():
        raise ValueError(
            f"parameter_index must be ({count},) integers, one per instance, got "
            f"{tuple(index.shape)} {index.dtype}"
        )
    index = index.long().cpu()
    used = torch.unique(index)
    if int(used[0]) != 0 or int(used[-1]) != len(used) - 1:
        raise ValueError(
            "parameter_index must use every index 0..P-1, got "
            f"{len(used)} distinct values in [{int(used[0])}, {int(used[-1])}]"
        )
    return index


def train_deepstaple(
    images: torch.Tensor,
    noisy_labels: torch.Tensor,
    *,
    model: nn.Module,
    num_classes: int,
    epochs: int,
    batch_size: int,
    learning_rate: float = NETWORK_LEARNING_RATE,
    dp_learning_rate: float = DATA_PARAMETER_LEARNING_RATE,
    out_of_line: bool = True,
    fixed_weighting: bool = True,
    risk_regularisation: bool = True,
    device: torch.device,
    seed: int,
    amp: bool = False,
    parameter_index: torch.Tensor | None = None,
    initial_data_parameters: torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> DeepStapleResult:
    """Train a network on noisy labels and learn one data parameter per label.

    Row n of ``images`` and ``noisy_labels`` is one noisy label instance (repeat an
    image once per label); the caller keeps the grouping of instances into images
    and fuses each group with :func:`weighted_vote`. The network is optimised with
    AdamW, the data parameters with SparseAdam (betas 0.9/0.999, eps 1e-8). Out of
    line (default), each batch runs :func:`step_network` then
    :func:`step_data_parameters`, so the network never sees the data parameters;
    in line, :func:`data_parameter_loss` updates both at once. Foreground counts and
    class weights are computed once from all noisy labels before training.

    Args:
        images: ``(N, 1, H, W)`` or ``(N, 1, D, H, W)`` float inputs, kept on the host.
        noisy_labels: ``(N, *spatial)`` integer class maps.
        model: a network mapping images to ``(B, C, *spatial)`` logits; updated in
            place, moved to ``device`` and left in eval mode.
        num_classes: C.
        epochs: passes over the N instances.
        batch_size: instances per step.
        learning_rate: AdamW's learning rate.
        dp_learning_rate: SparseAdam's learning rate.
        out_of_line: the two-step update (formula 5); False for the in-line scheme.
        fixed_weighting: see :func:`data_parameter_loss`.
        risk_regularisation: see :func:`data_parameter_loss`.
        device: where to train.
        seed: seeds torch, numpy and the data order (not the model's initial weights,
            which the caller built).
        amp: float16 autocast with gradient scaling, used on CUDA only.
        parameter_index: ``(N,)`` integers: the data parameter of each instance, so
            instances with the same index share one (the paper's volume granularity:
            every slice of one case and label source); the indices must be
            ``0..P-1``, each used. None: one parameter per instance.
        initial_data_parameters: ``(P,)`` starting values of the P data parameters
            (``consensus.dp-prior``, :func:`prior_data_parameters`); None: all 0.0,
            the paper's flat start.
        progress: called with one line per epoch (defaults to the module logger).

    Returns:
        The :class:`DeepStapleResult`.

    Raises:
        ValueError: shapes disagree, inputs are empty, labels are out of range, or
            ``parameter_index`` is not ``(N,)`` integers using each of ``0..P-1``,
            or ``initial_data_parameters`` is not ``(P,)`` finite values.
    """
    _check_training_inputs(images, noisy_labels)
    count = int(images.shape[0])
    instance_parameter = _check_parameter_index(parameter_index, count)
    if epochs < 0 or batch_size < 1:
        raise ValueError(
            f"need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}"
        )
    class_weight = class_weights(noisy_labels, num_classes).to(device)
    generator = seed_everything(seed)
    foreground_counts = (noisy_labels != 0).flatten(1).sum(dim=1)
    model.to(device).train()
    data_parameters = DataParameters(
        int(instance_parameter.max()) + 1,
        None
        if initial_data_parameters is None
        else initial_data_parameters.detach().float().cpu(),
    ).to(device)
    network_optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    dp_optimizer = torch.optim.SparseAdam(
        list(data_parameters.parameters()),
        lr=dp_learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    # Each parameter set keeps its own loss scale.
    network_precision = MixedPrecision(device, amp=amp)
    dp_precision = MixedPrecision(device, amp=amp)
    epoch_losses: list[float] = []
    clock = TrainingClock("deepstaple", progress or LOGGER.info)
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        total = 0.0
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            batch_images = images[index].to(device, non_blocking=True)
            batch_labels = noisy_labels[index].to(device, non_blocking=True)
            batch_index = instance_parameter[index].to(device)
            batch_counts = foreground_counts[index].to(device)
            if out_of_line:
                loss = step_network(
                    model,
                    batch_images,
                    batch_labels,
                    optimizer=network_optimizer,
                    class_weight=class_weight,
                    precision=network_precision,
                )
                step_data_parameters(
                    model,
                    data_parameters,
                    batch_images,
                    batch_labels,
                    batch_index,
                    batch_counts,
                    optimizer=dp_optimizer,
                    precision=dp_precision,
                    fixed_weighting=fixed_weighting,
                    risk_regularisation=risk_regularisation,
                )
            else:
                loss = _step_in_line(
                    model,
                    data_parameters,
                    (batch_images, batch_labels, batch_index, batch_counts),
                    optimizers=(network_optimizer, dp_optimizer),
                    precision=network_precision,
                    fixed_weighting=fixed_weighting,
                    risk_regularisation=risk_regularisation,
                )
            total += loss * len(index)
        epoch_losses.append(total / count)
        raw = data_parameters.embedding.weight.detach().squeeze(-1)
        clock.epoch(
            epoch,
            epochs,
            epoch_losses[-1],
            f"data parameters {float(raw.min()):.3f}..{float(raw.max()):.3f}",
            samples=count,
        )
    model.eval()
    table = data_parameters.embedding.weight.detach().squeeze(-1).float().cpu()
    values = table[instance_parameter]
    return DeepStapleResult(
        model=model,
        data_parameters=values.numpy().astype(np.float32),
        epoch_losses=tuple(epoch_losses),
        seconds=clock.seconds,
    )


def _step_in_line(
    model: nn.Module,
    data_parameters: DataParameters,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    precision: MixedPrecision,
    fixed_weighting: bool,
    risk_regularisation: bool,
) -> float:
    """One in-line step: the data-parameter loss updates network and DPs together."""
    images, noisy_labels, indices, foreground_counts = batch
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        logits = model(images)
    loss = data_parameter_loss(
        logits,
        noisy_labels,
        data_parameters(indices),
        foreground_counts,
        fixed_weighting=fixed_weighting,
        risk_regularisation=risk_regularisation,
    )
    # One loss scale covers both parameter sets, so one scaler steps both optimisers.
    precision.backward_and_step(loss, *optimizers)
    return float(loss.detach())
