"""UG-MCL training: uncertainty-guided mutual consistency, semi-supervised.

Owns the training loop of docs/methods.md#ug-mcl:
:class:`SemisupSettings`, :class:`SemisupResult` and :func:`train_semisupervised`,
whose variants (``core.config.SemisupVariant``) are the supervised baseline, a plain
mean teacher and the full method. The network is :mod:`core.semisup.dual_task`, the
formulas :mod:`core.semisup.terms`. The loop trains one site; federated use (FedAvg of
the student, each site keeping its own teacher) only needs the global step numbering
that :func:`train_semisupervised` takes. Under DP-SGD the supervised part goes through
:class:`core.privacy.dp.PrivateGradient` (the loop itself never imports Opacus) and the
consistency part sees unlabelled images only. Pure PyTorch/MONAI; never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Final

import torch
from torch import nn

from core.config import ClipScope, SemisupVariant
from core.logs import get_logger
from core.privacy.dp import DpSgdPlan, PrivateGradient
from core.semisup.dual_task import DualTaskUNet
from core.semisup.terms import (
    compute_sdf_batch,
    consistency_weight,
    cross_consistency,
    ema_update,
    intra_consistency,
    noisy_probabilities,
    per_sample_supervised_loss,
    supervised_loss,
    teacher_targets,
    uncertainty_threshold,
)
from core.training.loop import MixedPrecision, TrainingClock, device_description
from core.training.trainer import augment_batch, seed_everything

LOGGER = get_logger("semisup")

SGD_MOMENTUM: Final = 0.9
SGD_WEIGHT_DECAY: Final = 1e-4


def _check_at_least(name: str, value: float, bound: float) -> None:
    if not value >= bound:
        raise ValueError(f"SemisupSettings.{name} must be >= {bound}, got {value}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupSettings:
    """One call of :func:`train_semisupervised` (docs/methods.md#losses).

    Attributes:
        variant: what is optimised (a plain string is converted).
        iterations: optimiser steps of this call.
        labelled_batch: labelled samples per step.
        unlabelled_batch: unlabelled samples per step (ignored by SUPERVISED, and
            when there are no unlabelled images).
        learning_rate: SGD with momentum 0.9 and weight decay 1e-4.
        ema_decay: the teacher's EMA decay.
        passes: teacher passes T behind the uncertainty (UGMCL).
        consistency: the consistency weight reached at the end of its ramp.
        consistency_rampup: ramp-up length in steps; 0 = the whole schedule.
        k: sharpness of the SDF-to-mask sigmoid (UGMCL).
        sdf_weight: weight of the SDF regression term (UGMCL; 0 = none).
        masked_cross: mask the cross-task term with the uncertainty too (UGMCL).
        distance_consistency: add the student-teacher term on the distance branch
            (UGMCL; the paper's, docs/methods.md#federated-options): the
            intra-task consistency of the student's and the teacher's signed
            distances, under the same uncertainty mask, added to the intra-task term.
        max_grad_norm: the whole update's gradient is clipped to this L2 norm before
            each step (0 = no clipping). Not in the paper (docs/methods.md): with k =
            1500 the cross-task term's gradient reaches the distance head multiplied by
            up to k/4, and unclipped SGD steps saturate the head's tanh for good
            (measured: every pixel at +1, and a federated UG-MCL student at Dice 0.30
            against 0.60 with clipping at 1.0). The same rule for every variant: the
            L2 norm over all the student's parameters that have a gradient.
        clip_scope: ``model`` clips that one norm; ``parts`` clips the
            segmentation network's and the distance head's gradients each on its
            own (the baselines' distance head has none, so for them it is the same).
        seed: seeds sampling, noise and dropout (mixed with the start step).
        amp: float16 autocast and gradient scaling, on CUDA only.
        augment: random flips, the same for student and teacher inputs.
    """

    variant: SemisupVariant
    iterations: int
    labelled_batch: int
    unlabelled_batch: int
    learning_rate: float
    ema_decay: float = 0.99
    passes: int = 8
    consistency: float = 0.1
    consistency_rampup: int = 0
    k: float = 1500.0
    sdf_weight: float = 0.0
    masked_cross: bool = False
    distance_consistency: bool = False
    max_grad_norm: float = 0.0
    clip_scope: ClipScope = ClipScope.MODEL
    seed: int = 0
    amp: bool = True
    augment: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", SemisupVariant(self.variant))
        object.__setattr__(self, "clip_scope", ClipScope(self.clip_scope))
        for name, bound in (
            ("iterations", 1),
            ("labelled_batch", 1),
            ("unlabelled_batch", 0),
            ("passes", 1),
            ("consistency", 0.0),
            ("consistency_rampup", 0),
            ("sdf_weight", 0.0),
            ("max_grad_norm", 0.0),
        ):
            _check_at_least(name, getattr(self, name), bound)
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(
                f"SemisupSettings.learning_rate must be > 0, got {self.learning_rate}"
            )
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(
                f"SemisupSettings.ema_decay must be in [0, 1], got {self.ema_decay}"
            )
        if not self.k > 0:
            raise ValueError(f"SemisupSettings.k must be > 0, got {self.k}")


def _clip_gradients(
    model: DualTaskUNet, max_norm: float, scope: ClipScope = ClipScope.MODEL
) -> bool:
    """Clip the student's gradient to ``max_norm`` (L2); 0 leaves it alone.

    The same rule for every variant: ``MODEL`` clips the L2 norm over every
    parameter that has a gradient (a baseline's distance head has none); ``PARTS``
    clips the segmentation network's and the distance head's each on its own.
    Returns whether the clip bound: a norm exceeded ``max_norm`` (or was not
    finite), so (part of) the update was scaled down.
    """
    if max_norm <= 0:
        return False
    parts = (
        [list(model.parameters())]
        if scope is ClipScope.MODEL or model.distance_head is None
        else [
            list(model.segmentation.parameters()),
            list(model.distance_head.parameters()),
        ]
    )
    bound = False
    for parameters in parts:
        if any(parameter.grad is not None for parameter in parameters):
            norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
            bound = bound or not norm <= max_norm
    return bound


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupResult:
    """What a :func:`train_semisupervised` call did.

    Attributes:
        num_examples: samples seen (labelled + unlabelled), never batches. Under
            DP-SGD the labelled part is the expected count, ``iterations * q * N``
            (the Poisson draws' sizes stay at the site).
        iterations: optimiser steps taken.
        supervised_loss: mean over the steps (under DP-SGD over the steps that drew
            a labelled sample; a statistic of the labelled slices the DP guarantee
            does not cover, for the site's own use).
        consistency_loss: mean intra-task consistency (0 for SUPERVISED).
        cross_task_loss: mean cross-task consistency (0 unless UGMCL).
        certain_fraction: mean fraction of voxels inside the intra-task mask: under
            the uncertainty threshold for UGMCL, 1 for MEAN_TEACHER (unmasked), 0 for
            SUPERVISED (no consistency).
        clipped_fraction: share of the steps on which ``max_grad_norm`` bound (the
            gradient's norm exceeded it and the update was scaled down); 0 without
            clipping.
        seconds: wall time of the loop.
        device: the device it ran on.
    """

    num_examples: int
    iterations: int
    supervised_loss: float
    consistency_loss: float
    cross_task_loss: float
    certain_fraction: float
    seconds: float
    device: str
    clipped_fraction: float = 0.0


def _check_training_inputs(
    student: DualTaskUNet,
    labelled_images: torch.Tensor,
    labels: torch.Tensor,
    unlabelled_images: torch.Tensor,
) -> None:
    dims = student.spatial_dims
    if labelled_images.ndim != dims + 2 or labelled_images.shape[1] != 1:
        raise ValueError(
            f"labelled_images must have shape (N, 1, *spatial) with {dims} spatial "
            f"dimensions for this {dims}-D model, got {tuple(labelled_images.shape)}"
        )
    if labelled_images.shape[0] == 0:
        raise ValueError("no labelled samples: labelled_images is empty")
    expected = labelled_images.shape[:1] + labelled_images.shape[2:]
    if labels.shape != expected:
        raise ValueError(
            f"labels must have shape {tuple(expected)} to match labelled_images "
            f"{tuple(labelled_images.shape)}, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= student.num_classes:
        raise ValueError(
            f"label values must lie in [0, {student.num_classes}), got [{low}, {high}]"
        )
    if unlabelled_images.numel() and (
        unlabelled_images.shape[1:] != labelled_images.shape[1:]
    ):
        raise ValueError(
            "unlabelled_images must have shape (M, "
            f"{', '.join(map(str, labelled_images.shape[1:]))}) like labelled_images,"
            f" got {tuple(unlabelled_images.shape)}"
        )
    downsampling = math.prod(student.segmentation.strides)
    if any(size % downsampling for size in labelled_images.shape[2:]):
        raise ValueError(
            f"spatial sizes {tuple(labelled_images.shape[2:])} must be divisible by "
            f"the product of the U-Net strides ({downsampling})"
        )


def _sample_indices(
    count: int, batch: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    # Each epoch is a fresh permutation; a batch may straddle two epochs, so every
    # sample is seen once per epoch whatever the batch size.
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch:
            pending = torch.cat([pending, torch.randperm(count, generator=generator)])
        yield pending[:batch]
        pending = pending[batch:]


def _consistency_terms(
    student_logits: torch.Tensor,
    student_sdf: torch.Tensor,
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    settings: SemisupSettings,
    threshold: float,
    noise: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (intra-task, cross-task, certain fraction) for MEAN_TEACHER or UGMCL."""
    probabilities = torch.softmax(student_logits, dim=1)
    if settings.variant is SemisupVariant.MEAN_TEACHER:
        with torch.no_grad():
            target = noisy_probabilities(teacher, images, noise)
        mask = torch.ones_like(target[:, :1])
        intra = intra_consistency(probabilities, target, mask)
        return intra, torch.zeros_like(intra), mask.mean()
    target, target_sdf, entropy = teacher_targets(
        teacher, images, passes=settings.passes, generator=noise
    )
    mask = (entropy < threshold).float()
    cross = cross_consistency(
        student_logits,
        student_sdf,
        k=settings.k,
        mask=mask if settings.masked_cross else None,
    )
    intra = intra_consistency(probabilities, target, mask)
    if settings.distance_consistency:
        intra = intra + intra_consistency(student_sdf, target_sdf, mask)
    return intra, cross, mask.mean()


def _weighted_consistency(
    student_logits: torch.Tensor,
    student_sdf: torch.Tensor,
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    settings: SemisupSettings,
    step: int,
    total_steps: int,
    noise: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (ramped weight x (intra + cross), intra, cross, certain fraction).

    The uncertainty threshold and the consistency weight both follow the global
    step over ``total_steps`` (docs/methods.md#losses).
    """
    intra, cross, certain = _consistency_terms(
        student_logits,
        student_sdf,
        teacher,
        images,
        settings=settings,
        threshold=uncertainty_threshold(step, total_steps, student_logits.shape[1]),
        noise=noise,
    )
    weight = consistency_weight(
        step,
        weight=settings.consistency,
        rampup=settings.consistency_rampup or total_steps,
    )
    return weight * (intra + cross), intra, cross, certain


def _step_loss(
    student: DualTaskUNet,
    teacher: DualTaskUNet | None,
    images: torch.Tensor,
    targets: list[torch.Tensor],
    *,
    settings: SemisupSettings,
    step: int,
    total_steps: int,
    noise: torch.Generator,
    precision: MixedPrecision,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the step's loss and its detached (supervised, intra, cross, certain)."""
    labels, *sdf_target = targets
    with precision.autocast():
        logits, sdf = student(images)
        logits, sdf = logits.float(), sdf.float()
        supervised, _ = supervised_loss(
            logits[: len(labels)],
            sdf[: len(labels)],
            labels,
            k=settings.k,
            sdf_weight=settings.sdf_weight,
            dual_task=settings.variant is SemisupVariant.UGMCL,
            sdf_target=sdf_target[0] if sdf_target else None,
        )
        if teacher is None:
            zero = torch.zeros_like(supervised)
            return supervised, torch.stack([supervised.detach(), zero, zero, zero])
        weighted, intra, cross, certain = _weighted_consistency(
            logits,
            sdf,
            teacher,
            images,
            settings=settings,
            step=step,
            total_steps=total_steps,
            noise=noise,
        )
    loss = supervised + weighted
    return loss, torch.stack([supervised, intra, cross, certain]).detach()


def _draw_batch(
    labelled: tuple[torch.Tensor, ...],
    unlabelled_images: torch.Tensor | None,
    *,
    labelled_index: torch.Tensor,
    unlabelled_index: torch.Tensor,
    augment: bool,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return the images (labelled first) and the labelled targets, on ``device``."""
    tensors = [tensor[labelled_index] for tensor in labelled]
    if unlabelled_images is not None:
        tensors.append(unlabelled_images[unlabelled_index])
    if augment:
        tensors = augment_batch(tensors, generator)
    tensors = [tensor.to(device, non_blocking=True) for tensor in tensors]
    images = tensors[0]
    if unlabelled_images is not None:
        images = torch.cat([images, tensors.pop()])
    return images, tensors[1:]


def _private_step(
    student: DualTaskUNet,
    teacher: DualTaskUNet | None,
    mechanism: PrivateGradient,
    labelled: tuple[torch.Tensor, ...],
    unlabelled_images: torch.Tensor | None,
    *,
    unlabelled_index: torch.Tensor,
    settings: SemisupSettings,
    step: int,
    total_steps: int,
    generator: torch.Generator,
    noise: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, bool]:
    """Fill one DP-SGD step's gradients; return its four terms and whether it drew.

    The terms are (supervised, intra, cross, certain) as :func:`_step_loss`'s.

    The supervised part is :class:`PrivateGradient`'s (labelled slices, per-sample
    loss, clipped and noised); the consistency part is an ordinary backward on the
    unlabelled batch alone, added to it. Labelled slices enter nothing else.
    """
    dual_task = settings.variant is SemisupVariant.UGMCL

    def per_sample_loss(indices: torch.Tensor, secret: torch.Generator) -> torch.Tensor:
        tensors = [tensor[indices] for tensor in labelled]
        if settings.augment:
            tensors = augment_batch(tensors, secret)
        images, labels, *sdf_target = (
            tensor.to(device, non_blocking=True) for tensor in tensors
        )
        logits, sdf = student(images)
        return per_sample_supervised_loss(
            logits.float(),
            sdf.float(),
            labels,
            k=settings.k,
            sdf_weight=settings.sdf_weight,
            dual_task=dual_task,
            sdf_target=sdf_target[0] if sdf_target else None,
        )

    losses = mechanism.step(per_sample_loss)
    drawn = bool(losses.numel())
    supervised = losses.mean().cpu() if drawn else torch.zeros(())
    zero = torch.zeros(())
    if teacher is None or unlabelled_images is None:
        return torch.stack([supervised, zero, zero, zero]), drawn
    images = unlabelled_images[unlabelled_index]
    if settings.augment:
        (images,) = augment_batch([images], generator)
    images = images.to(device, non_blocking=True)
    logits, sdf = student(images)
    weighted, intra, cross, certain = _weighted_consistency(
        logits.float(),
        sdf.float(),
        teacher,
        images,
        settings=settings,
        step=step,
        total_steps=total_steps,
        noise=noise,
    )
    # Adds to the private gradient.
    weighted.backward()  # type: ignore[no-untyped-call]
    consistency = torch.stack([intra, cross, certain]).detach().cpu()
    return torch.cat([supervised.reshape(1), consistency]), drawn


def train_semisupervised(
    student: DualTaskUNet,
    teacher: DualTaskUNet | None,
    labelled_images: torch.Tensor,
    labels: torch.Tensor,
    unlabelled_images: torch.Tensor,
    settings: SemisupSettings,
    *,
    device: torch.device,
    start_step: int = 0,
    total_steps: int | None = None,
    label: str = "semisup",
    progress: Callable[[str], None] | None = None,
    private: DpSgdPlan | None = None,
) -> SemisupResult:
    """Train ``student`` (and its EMA ``teacher``) for ``settings.iterations`` steps.

    Each step draws ``labelled_batch`` labelled and ``unlabelled_batch`` unlabelled
    samples (a fresh seeded permutation per epoch of each set), flips them alike when
    ``settings.augment``, and minimises ``L_sup + lambda(t) (L_intra + L_cross)``
    (docs/methods.md#losses) over SGD; the consistency terms cover the whole batch,
    labelled samples included. Without unlabelled images (M = 0) the consistency is
    taken over the labelled samples alone. After each optimiser step the teacher
    follows by :func:`ema_update` at the global step.

    Steps are numbered globally, ``start_step .. start_step + iterations - 1``: the
    threshold and consistency ramps run over ``total_steps``, and a teacher carried
    across federated rounds keeps its EMA (step 0 copies the student, so a fresh
    teacher needs no initialisation). ``settings.seed + start_step`` seeds sampling,
    noise and dropout, so successive rounds draw different batches, reproducibly.
    The SGD momentum starts from zero on every call.

    With ``private`` (DP-SGD on the supervised part; the guarantee covers the
    labelled slices, not the unlabelled images), each step instead:

    - Poisson-samples the labelled slices at the plan's rate q (``labelled_batch``
      is not used: the caller plans q, normally ``labelled_batch / N``) and gets the
      private gradient of the per-sample supervised loss
      (:func:`core.semisup.terms.per_sample_supervised_loss`) from
      :class:`core.privacy.dp.PrivateGradient`: clipped per sample, summed, noised,
      divided by q N. An empty draw still adds the noise and counts as a step;
    - computes the consistency terms on the unlabelled batch only and adds
      ``lambda(t)`` times their ordinary gradient (without unlabelled images there
      is no consistency: labelled slices never enter a non-private gradient);
    - takes the same SGD step; the teacher follows by EMA and runs its passes on
      unlabelled images only (post-processing: no further privacy cost).

    AMP is off under DP. The call takes exactly ``private.steps`` steps, which is
    what the caller's accountant records.

    Args:
        student: trained in place; moved to ``device`` and left in eval mode.
        teacher: the EMA model, same architecture; required for MEAN_TEACHER and
            UGMCL, unused by SUPERVISED. Moved to ``device``, updated in place, left
            in eval mode.
        labelled_images: ``(N, 1, *spatial)`` float, kept on the host.
        labels: ``(N, *spatial)`` integer class maps in ``[0, C)``.
        unlabelled_images: ``(M, 1, *spatial)`` float; M may be 0 (any empty tensor).
        settings: the recipe.
        device: where to train.
        start_step: global number of this call's first step.
        total_steps: length of the whole schedule (default: this call's last step
            + 1).
        label: names the run in progress lines.
        progress: called with about ten progress lines (default: the module logger).
        private: the DP-SGD mechanism of this call (see above), or None for
            ordinary training.

    Returns:
        The call's :class:`SemisupResult`.

    Raises:
        ValueError: no labelled samples, shapes or spatial dimensions that do not
            match each other or the model, labels out of range, a missing teacher, a
            negative step, a DP plan for another number of steps, or (under DP) a
            model that Opacus rejects.
    """
    _check_training_inputs(student, labelled_images, labels, unlabelled_images)
    variant = settings.variant
    if variant is not SemisupVariant.SUPERVISED and teacher is None:
        raise ValueError(f"variant {variant.value!r} needs a teacher, got None")
    last_step = start_step + settings.iterations
    total = last_step if total_steps is None else total_steps
    if start_step < 0 or total < 0:
        raise ValueError(
            f"start_step and total_steps must be >= 0, got {start_step} and {total}"
        )
    if private is not None and private.steps != settings.iterations:
        raise ValueError(
            f"the DP-SGD plan is for {private.steps} steps but the call takes "
            f"settings.iterations = {settings.iterations}; the accountant must record "
            "the steps that run"
        )
    consistent = teacher if variant is not SemisupVariant.SUPERVISED else None
    use_unlabelled = consistent is not None and settings.unlabelled_batch > 0
    unlabelled = (
        unlabelled_images if use_unlabelled and unlabelled_images.numel() else None
    )
    unlabelled_batch = settings.unlabelled_batch if unlabelled is not None else 0
    labelled: tuple[torch.Tensor, ...] = (labelled_images, labels.long())
    if variant is SemisupVariant.UGMCL and settings.sdf_weight > 0:
        # Computed once: flips commute with the distance transform.
        labelled += (compute_sdf_batch(labels, student.num_classes),)

    generator = seed_everything(settings.seed + start_step)
    noise = torch.Generator(device=device).manual_seed(settings.seed + start_step)
    labelled_order = _sample_indices(
        len(labelled_images), settings.labelled_batch, generator
    )
    unlabelled_order = _sample_indices(
        len(unlabelled) if unlabelled is not None else 0, unlabelled_batch, generator
    )
    student.to(device).train()
    if consistent is not None:
        consistent.to(device).train()
    optimizer = torch.optim.SGD(
        [p for p in student.parameters() if p.requires_grad],
        lr=settings.learning_rate,
        momentum=SGD_MOMENTUM,
        weight_decay=SGD_WEIGHT_DECAY,
    )
    mechanism = (
        None
        if private is None
        else PrivateGradient(
            student, private, num_samples=len(labelled_images), device=device
        )
    )
    # DP-SGD computes per-sample gradients in float32: no mixed precision under it.
    precision = MixedPrecision(device, amp=settings.amp and mechanism is None)
    interval = max(1, settings.iterations // 10)
    sums = torch.zeros(4, dtype=torch.float64)
    counts = torch.zeros(4, dtype=torch.float64)
    clock = TrainingClock(label, progress or LOGGER.info)
    reported = 0  # steps already in a progress line
    clipped = 0  # steps on which the gradient clip bound
    dp_line = (
        ""
        if private is None
        else f", DP-SGD on the labelled part (noise {private.noise_multiplier:.3f}, "
        f"clip {private.max_grad_norm:g}, sample rate {private.sample_rate:.3f})"
    )
    clock.line(
        f"{variant.value}: {len(labelled_images)} labelled + "
        f"{len(unlabelled) if unlabelled is not None else 0} unlabelled samples, "
        f"steps {start_step + 1}-{last_step} of {total} on "
        f"{device_description(device, amp=precision.enabled)}{dp_line}"
    )
    try:
        for offset in range(settings.iterations):
            step = start_step + offset
            optimizer.zero_grad(set_to_none=True)
            if mechanism is None:
                images, targets = _draw_batch(
                    labelled,
                    unlabelled,
                    labelled_index=next(labelled_order),
                    unlabelled_index=next(unlabelled_order),
                    augment=settings.augment,
                    generator=generator,
                    device=device,
                )
                loss, terms = _step_loss(
                    student,
                    consistent,
                    images,
                    targets,
                    settings=settings,
                    step=step,
                    total_steps=total,
                    noise=noise,
                    precision=precision,
                )
                precision.backward(loss)
                precision.unscale(optimizer)
                clipped += _clip_gradients(
                    student, settings.max_grad_norm, settings.clip_scope
                )
                precision.step(optimizer)
                counts += 1
            else:
                terms, drawn = _private_step(
                    student,
                    consistent,
                    mechanism,
                    labelled,
                    unlabelled,
                    unlabelled_index=next(unlabelled_order),
                    settings=settings,
                    step=step,
                    total_steps=total,
                    generator=generator,
                    noise=noise,
                    device=device,
                )
                # Clipping the private update is post-processing: no privacy cost.
                clipped += _clip_gradients(
                    student, settings.max_grad_norm, settings.clip_scope
                )
                optimizer.step()
                counts += torch.tensor(
                    [float(drawn), 1.0, 1.0, 1.0], dtype=counts.dtype
                )
            if consistent is not None:
                ema_update(consistent, student, step, settings.ema_decay)
            # One host sync per step, for honest means and progress lines.
            sums += terms.cpu()
            if (offset + 1) % interval == 0 or offset + 1 == settings.iterations:
                means = (sums / counts.clamp(min=1)).tolist()
                # The figures are this call's (this round's) steps: its rate and ETA.
                clock.progress(
                    offset + 1,
                    settings.iterations,
                    f"step {step + 1}/{total} sup {means[0]:.4f} "
                    f"intra {means[1]:.4f} cross {means[2]:.4f} "
                    f"certain {means[3]:.2f} clipped {clipped / (offset + 1):.2f}",
                    count=offset + 1 - reported,
                )
                reported = offset + 1
    finally:
        if mechanism is not None:
            mechanism.close()
    student.eval()
    if consistent is not None:
        consistent.eval()
    means = (sums / counts.clamp(min=1)).tolist()
    labelled_per_step = (
        settings.labelled_batch if mechanism is None else mechanism.expected_batch_size
    )
    return SemisupResult(
        num_examples=round(settings.iterations * labelled_per_step)
        + settings.iterations * unlabelled_batch,
        iterations=settings.iterations,
        supervised_loss=means[0],
        consistency_loss=means[1],
        cross_task_loss=means[2],
        certain_fraction=means[3],
        seconds=clock.seconds,
        device=str(device),
        clipped_fraction=clipped / settings.iterations,
    )
