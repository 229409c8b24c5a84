"""UG-MCL's formulas: signed distances, schedules, mean teacher and losses.

Owns docs/methods.md#losses term by term: the signed-distance ground truth, the sigmoid
ramp and the uncertainty-threshold and consistency-weight schedules, the EMA teacher
update, clipped input noise, predictive entropy over noisy dropout passes, the
supervised loss (CE + Dice + Dice on the distance map's soft mask; per sample for
DP-SGD) and the intra-task (uncertainty-masked) and cross-task consistencies. The
training loop that combines them is :mod:`core.semisup.training`. Pure
PyTorch/numpy/scipy; never imports flwr.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as functional
from scipy.ndimage import (
    binary_erosion,
    distance_transform_edt,
    generate_binary_structure,
)
from torch import nn

from core.metrics import dice_coefficient

ENTROPY_EPSILON: Final = 1e-6  # inside the log, as the reference code
MASK_EPSILON: Final = 1e-16  # keeps an all-uncertain batch at loss 0, not nan

# --------------------------------------------------------- signed distance maps


def compute_sdf(mask: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """Return the normalised signed distance map of one binary mask (docs/methods.md).

    ``d_out / max d_out - d_in / max d_in``, where ``d_in`` is each foreground
    voxel's Euclidean distance to the nearest background voxel and ``d_out`` each
    background voxel's to the nearest foreground voxel (both minima are 0). Inner
    boundary voxels (foreground with a 4-/6-neighbour in the background; the image
    border is not background) are set to 0. Negative inside, positive outside, in
    [-1, 1]. A mask with no background or no foreground has no boundary to measure
    from and gives zeros.

    Args:
        mask: ``(*spatial)`` boolean or integer mask of one sample (non-zero is
            foreground).

    Returns:
        ``(*spatial)`` float32.

    Example:
        >>> compute_sdf(np.array([1, 1, 1, 1, 0, 0])).tolist()
        [-1.0, -0.75, -0.5, 0.0, 0.5, 1.0]
    """
    foreground = np.asarray(mask) != 0
    if foreground.all() or not foreground.any():
        return np.zeros(foreground.shape, dtype=np.float32)
    inside = distance_transform_edt(foreground)
    outside = distance_transform_edt(~foreground)
    sdf = outside / outside.max() - inside / inside.max()
    neighbours = generate_binary_structure(foreground.ndim, 1)
    interior = binary_erosion(foreground, structure=neighbours, border_value=1)
    sdf[foreground & ~interior] = 0.0
    result: npt.NDArray[np.float32] = sdf.astype(np.float32)
    return result


def compute_sdf_batch(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return the SDF of ``labels == c`` for every sample and class c.

    Args:
        labels: ``(B, *spatial)`` integer class maps (any device).
        num_classes: C.

    Returns:
        ``(B, C, *spatial)`` float32 on ``labels``' device.
    """
    host = labels.detach().cpu().numpy()
    maps = [[compute_sdf(sample == c) for c in range(num_classes)] for sample in host]
    # The explicit shape keeps an empty batch (B, C, *spatial) rather than (0,).
    stacked = np.asarray(maps, dtype=np.float32).reshape(
        (host.shape[0], num_classes, *host.shape[1:])
    )
    return torch.from_numpy(stacked).to(labels.device)


# ------------------------------------------------------------------ schedules


def sigmoid_rampup(step: float, length: float) -> float:
    """Return ``exp(-5 (1 - clip(step, 0, L) / L)^2)``; 1.0 when ``length`` is 0.

    Raises:
        ValueError: ``length`` is negative.

    Example:
        >>> sigmoid_rampup(10, 10), sigmoid_rampup(5, 0)
        (1.0, 1.0)
    """
    if length < 0:
        raise ValueError(f"ramp-up length must be >= 0, got {length}")
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(step, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def uncertainty_threshold(step: int, max_steps: int, num_classes: int = 2) -> float:
    """Return ``(0.75 + 0.25 * sigmoid_rampup(step, max_steps)) * ln(num_classes)``.

    ``ln C`` is the largest possible entropy, ``ln 2`` for the binary task of
    docs/methods.md#losses. At step 0 the ramp is ``exp(-5)``, not 0, so the
    threshold starts just above ``0.75 ln C``.

    Example:
        >>> round(uncertainty_threshold(100, 100), 6) == round(math.log(2), 6)
        True
    """
    return (0.75 + 0.25 * sigmoid_rampup(step, max_steps)) * math.log(num_classes)


def consistency_weight(step: int, *, weight: float, rampup: int) -> float:
    """Return ``weight * sigmoid_rampup(step, rampup)``, lambda(t) of docs/methods.md.

    The paper's ``0.1 * r(floor(t / 150), 200)`` is ``weight=0.1, rampup=30000`` without
    the quantisation to blocks of 150 steps, which only makes the ramp a staircase.

    Example:
        >>> consistency_weight(50, weight=0.1, rampup=50)
        0.1
    """
    return weight * sigmoid_rampup(step, rampup)


# --------------------------------------------------------------- mean teacher


def _floating_state(module: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = dict(module.named_parameters())
    state.update(
        (name, buffer)
        for name, buffer in module.named_buffers()
        if buffer.is_floating_point()
    )
    return state


@torch.no_grad()
def ema_update(
    teacher: nn.Module, student: nn.Module, step: int, decay: float = 0.99
) -> None:
    """Move ``teacher`` towards ``student``: ``t <- alpha t + (1 - alpha) s``.

    ``alpha = min(1 - 1 / (step + 1), decay)``, so step 0 copies the student. Applies to
    parameters and floating-point buffers; updates ``teacher`` in place.

    Raises:
        ValueError: ``step`` is negative, ``decay`` outside [0, 1], or the two
            models' parameter names differ.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    teacher_state, student_state = _floating_state(teacher), _floating_state(student)
    if teacher_state.keys() != student_state.keys():
        differing = sorted(teacher_state.keys() ^ student_state.keys())
        raise ValueError(f"teacher and student differ in parameters {differing[:5]}")
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    for name, value in teacher_state.items():
        source = student_state[name].detach()
        if alpha == 0.0:
            # An exact copy, even from an uninitialised (non-finite) teacher.
            value.copy_(source)
        else:
            value.mul_(alpha).add_(source, alpha=1.0 - alpha)


def clipped_noise(
    images: torch.Tensor,
    *,
    std: float = 0.1,
    clip: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return Gaussian noise ``N(0, std^2)`` clipped to ``[-clip, clip]``.

    The teacher's input is ``images + clipped_noise(images)`` (docs/methods.md#losses).

    Args:
        images: gives shape, dtype and device of the noise.
        std: standard deviation before clipping.
        clip: bound on the absolute value.
        generator: drawn from (on its own device) when given, else the global RNG.
    """
    device = images.device if generator is None else generator.device
    noise = torch.randn(images.shape, generator=generator, device=device) * std
    return noise.clamp(-clip, clip).to(images)


def predictive_entropy(mean_probabilities: torch.Tensor) -> torch.Tensor:
    """Return ``-sum_c p_c log(p_c + 1e-6)`` over dim 1: ``(B, C, ...) -> (B, 1, ...)``.

    Example:
        >>> round(float(predictive_entropy(torch.full((1, 2, 1), 0.5))), 4)
        0.6931
    """
    return -(mean_probabilities * torch.log(mean_probabilities + ENTROPY_EPSILON)).sum(
        dim=1, keepdim=True
    )


def noisy_probabilities(
    teacher: nn.Module, images: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Softmax of one pass of ``teacher`` on ``images`` plus clipped noise."""
    return noisy_outputs(teacher, images, generator)[0]


def noisy_outputs(
    teacher: nn.Module, images: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax and signed distances of one pass of ``teacher`` on noisy ``images``."""
    logits, sdf = teacher(images + clipped_noise(images, generator=generator))
    return torch.softmax(logits.float(), dim=1), sdf.float()


@torch.no_grad()
def teacher_predictions(
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    passes: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the teacher's consistency target and its uncertainty (docs/methods.md).

    The teacher runs in train mode (dropout active; its previous mode is restored),
    each pass on the images plus fresh :func:`clipped_noise`. The target comes from a
    pass of its own, separate from the ``passes`` whose mean softmax gives the entropy.

    Args:
        teacher: maps ``(B, 1, *spatial)`` to ``(logits, sdf)`` (a DualTaskUNet).
        images: ``(B, 1, *spatial)``.
        passes: stochastic passes T behind the uncertainty.
        generator: source of the input noise (dropout uses the global RNG).

    Returns:
        ``(probabilities (B, C, *spatial), entropy (B, 1, *spatial))``, float32.

    Raises:
        ValueError: ``passes`` < 1.
    """
    probabilities, _, entropy = teacher_targets(
        teacher, images, passes=passes, generator=generator
    )
    return probabilities, entropy


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    passes: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`teacher_predictions` with the target pass's signed distances too.

    Returns:
        ``(probabilities (B, C, *spatial), sdf (B, C, *spatial), entropy (B, 1,
        *spatial))``, float32; the distances come from the same noisy pass as the
        probabilities (the distance branch's consistency target,
        ``semisup.distance-consistency``), so the random stream is the one
        :func:`teacher_predictions` draws.

    Raises:
        ValueError: ``passes`` < 1.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    was_training = teacher.training
    teacher.train()
    try:
        target, sdf = noisy_outputs(teacher, images, generator)
        mean = sum(
            (noisy_probabilities(teacher, images, generator) for _ in range(passes)),
            torch.zeros_like(target),
        )
    finally:
        teacher.train(was_training)
    return target, sdf, predictive_entropy(mean / passes)


# --------------------------------------------------------------------- losses


def dice_loss(
    probabilities: torch.Tensor, target: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Return ``1 - (2 sum p g + eps) / (sum p^2 + sum g^2 + eps)`` over the batch.

    Example:
        >>> float(dice_loss(torch.ones(4), torch.ones(4)))
        0.0
    """
    return _per_sample_dice(probabilities.reshape(1, -1), target.reshape(1, -1), eps)[0]


def _mean_foreground_dice(
    probabilities: torch.Tensor, one_hot: torch.Tensor
) -> torch.Tensor:
    return _per_sample_foreground_dice(
        probabilities.movedim(0, 1).unsqueeze(0), one_hot.movedim(0, 1).unsqueeze(0)
    )[0]


def supervised_loss(
    logits: torch.Tensor,
    sdf: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: float = 1500.0,
    sdf_weight: float = 0.0,
    dual_task: bool = True,
    sdf_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the loss on labelled samples and its terms (docs/methods.md#losses).

    Dual task: ``0.5 * (CE + Dice_fg(softmax) + Dice_fg(sigmoid(-k sdf)))`` plus
    ``sdf_weight * MSE(sdf, SDF(labels))`` when ``sdf_weight`` > 0. Otherwise
    ``0.5 * (CE + Dice_fg(softmax))`` (``sdf`` and ``sdf_weight`` unused). ``Dice_fg``
    is :func:`dice_loss` averaged over the foreground classes 1..C-1.

    Args:
        logits: ``(B, C, *spatial)``.
        sdf: ``(B, C, *spatial)`` predicted signed distances in [-1, 1].
        labels: ``(B, *spatial)`` integer class maps.
        k: sharpness of the SDF-to-mask sigmoid.
        sdf_weight: weight of the SDF regression term (0 = none, the BraTS code).
        dual_task: include the SDF terms.
        sdf_target: ``compute_sdf_batch(labels, C)`` if already computed (it costs a
            distance transform per sample and class otherwise).

    Returns:
        The scalar loss and its terms: ``cross_entropy`` and ``dice``, plus
        ``sdf_dice`` (dual task) and ``sdf_mse`` (dual task, ``sdf_weight`` > 0).
    """
    num_classes = logits.shape[1]
    one_hot = functional.one_hot(labels.long(), num_classes).movedim(-1, 1)
    terms = {
        "cross_entropy": functional.cross_entropy(logits, labels.long()),
        "dice": _mean_foreground_dice(torch.softmax(logits, dim=1), one_hot),
    }
    if dual_task:
        terms["sdf_dice"] = _mean_foreground_dice(torch.sigmoid(-k * sdf), one_hot)
    loss = 0.5 * torch.stack(list(terms.values())).sum()
    if dual_task and sdf_weight > 0:
        target = (
            compute_sdf_batch(labels, num_classes) if sdf_target is None else sdf_target
        )
        terms["sdf_mse"] = functional.mse_loss(sdf, target)
        loss = loss + sdf_weight * terms["sdf_mse"]
    values = torch.stack(list(terms.values())).detach().tolist()
    return loss, dict(zip(terms, values, strict=True))


def _per_sample_dice(
    probabilities: torch.Tensor, target: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """:func:`dice_loss` of each sample on its own: ``(B, ...)`` twice -> ``(B,)``."""
    return 1.0 - dice_coefficient(probabilities, target, smooth=eps)


def _per_sample_foreground_dice(
    probabilities: torch.Tensor, one_hot: torch.Tensor
) -> torch.Tensor:
    losses = [
        _per_sample_dice(probabilities[:, c], one_hot[:, c])
        for c in range(1, probabilities.shape[1])
    ]
    return torch.stack(losses).mean(dim=0)


def per_sample_supervised_loss(
    logits: torch.Tensor,
    sdf: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: float = 1500.0,
    sdf_weight: float = 0.0,
    dual_task: bool = True,
    sdf_target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return :func:`supervised_loss` of each sample on its own, ``(B,)``.

    The same terms and constants, each reduced over one sample's voxels only (CE's
    mean, each Dice's sums, the SDF MSE's mean), so sample ``i``'s loss depends on
    sample ``i`` alone: ``per_sample_supervised_loss(...)[i]`` equals
    ``supervised_loss`` of the batch ``[i]``. DP-SGD needs this: a loss pooled over
    the batch (as :func:`supervised_loss`'s Dice is) couples the samples' gradients,
    and clipping then no longer bounds one sample's influence.

    Args:
        logits: ``(B, C, *spatial)``.
        sdf: ``(B, C, *spatial)`` predicted signed distances in [-1, 1].
        labels: ``(B, *spatial)`` integer class maps.
        k: sharpness of the SDF-to-mask sigmoid.
        sdf_weight: weight of the SDF regression term (0 = none).
        dual_task: include the SDF terms.
        sdf_target: ``compute_sdf_batch(labels, C)`` if already computed.

    Example:
        >>> logits, labels = torch.zeros(3, 2, 4, 4), torch.ones(3, 4, 4).long()
        >>> per_sample_supervised_loss(logits, torch.zeros(3, 2, 4, 4), labels).shape
        torch.Size([3])
    """
    num_classes = logits.shape[1]
    labels = labels.long()
    one_hot = functional.one_hot(labels, num_classes).movedim(-1, 1)
    terms = [
        functional.cross_entropy(logits, labels, reduction="none").flatten(1).mean(1),
        _per_sample_foreground_dice(torch.softmax(logits, dim=1), one_hot),
    ]
    if dual_task:
        terms.append(_per_sample_foreground_dice(torch.sigmoid(-k * sdf), one_hot))
    loss = 0.5 * torch.stack(terms).sum(dim=0)
    if dual_task and sdf_weight > 0:
        target = (
            compute_sdf_batch(labels, num_classes) if sdf_target is None else sdf_target
        )
        loss = loss + sdf_weight * ((sdf - target) ** 2).flatten(1).mean(1)
    return loss


def intra_consistency(
    student_probabilities: torch.Tensor,
    teacher_probabilities: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Return ``0.5 * sum(mask * (s - t)^2) / (C * sum(mask) + 1e-16)`` (L_intra).

    With C = 2 this is the reference code's constant; voxels where ``mask`` is 0
    contribute nothing.

    Args:
        student_probabilities: ``(B, C, *spatial)``.
        teacher_probabilities: ``(B, C, *spatial)``.
        mask: ``(B, 1, *spatial)``, 1 where the teacher is certain.

    Raises:
        ValueError: the shapes disagree.
    """
    shape = student_probabilities.shape
    if teacher_probabilities.shape != shape or mask.shape != (
        shape[0],
        1,
        *shape[2:],
    ):
        raise ValueError(
            "intra_consistency needs probabilities (B, C, *spatial) twice and mask "
            f"(B, 1, *spatial), got {tuple(shape)}, "
            f"{tuple(teacher_probabilities.shape)} and {tuple(mask.shape)}"
        )
    squared = (student_probabilities - teacher_probabilities) ** 2
    return 0.5 * (mask * squared).sum() / (shape[1] * mask.sum() + MASK_EPSILON)


def cross_consistency(
    logits: torch.Tensor,
    sdf: torch.Tensor,
    *,
    k: float = 1500.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the mean of ``(sigmoid(-k sdf) - softmax(logits))^2`` (L_cross).

    Over every voxel, channel and sample; with ``mask`` ``(B, 1, *spatial)``, over the
    voxels where it is 1 (0 when there are none).
    """
    squared = (torch.sigmoid(-k * sdf) - torch.softmax(logits, dim=1)) ** 2
    if mask is None:
        return squared.mean()
    return (mask * squared).sum() / (logits.shape[1] * mask.sum() + MASK_EPSILON)
