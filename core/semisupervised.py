"""UG-MCL training: uncertainty-guided mutual consistency, semi-supervised.

Owns the training loop of METHODS.md section 3 (and the UG-MCL bullet of section 0):
:class:`SemisupSettings`, :class:`SemisupResult` and :func:`train_semisupervised`,
whose variants (``core.config.SemisupVariant``) are the supervised baseline, a plain
mean teacher and the full method. The network is :mod:`core.dual_task`, the formulas
:mod:`core.semisup_terms`. The loop trains one site; federated use (FedAvg of the
student, each site keeping its own teacher) only needs the global step numbering that
:func:`train_semisupervised` takes. Pure PyTorch/MONAI; never imports flwr.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Final

import torch
from torch import nn

from core.config import SemisupVariant
from core.dual_task import DualTaskUNet
from core.semisup_terms import (
    compute_sdf_batch,
    consistency_weight,
    cross_consistency,
    ema_update,
    intra_consistency,
    noisy_probabilities,
    supervised_loss,
    teacher_predictions,
    uncertainty_threshold,
)
from core.training import augment_batch, seed_everything

LOGGER = logging.getLogger(__name__)

SGD_MOMENTUM: Final = 0.9
SGD_WEIGHT_DECAY: Final = 1e-4


def _check_at_least(name: str, value: float, bound: float) -> None:
    if not value >= bound:
        raise ValueError(f"SemisupSettings.{name} must be >= {bound}, got {value}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupSettings:
    """One call of :func:`train_semisupervised` (METHODS.md 3(b), 3(c)).

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
    seed: int = 0
    amp: bool = True
    augment: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", SemisupVariant(self.variant))
        for name, bound in (
            ("iterations", 1),
            ("labelled_batch", 1),
            ("unlabelled_batch", 0),
            ("passes", 1),
            ("consistency", 0.0),
            ("consistency_rampup", 0),
            ("sdf_weight", 0.0),
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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupResult:
    """What a :func:`train_semisupervised` call did.

    Attributes:
        num_examples: samples seen (labelled + unlabelled), never batches.
        iterations: optimiser steps taken.
        supervised_loss: mean over the steps.
        consistency_loss: mean intra-task consistency (0 for SUPERVISED).
        cross_task_loss: mean cross-task consistency (0 unless UGMCL).
        certain_fraction: mean fraction of voxels inside the intra-task mask: under
            the uncertainty threshold for UGMCL, 1 for MEAN_TEACHER (unmasked), 0 for
            SUPERVISED (no consistency).
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
    target, entropy = teacher_predictions(
        teacher, images, passes=settings.passes, generator=noise
    )
    mask = (entropy < threshold).float()
    cross = cross_consistency(
        student_logits,
        student_sdf,
        k=settings.k,
        mask=mask if settings.masked_cross else None,
    )
    return intra_consistency(probabilities, target, mask), cross, mask.mean()


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
    use_amp: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the step's loss and its detached (supervised, intra, cross, certain)."""
    labels, *sdf_target = targets
    with torch.autocast(images.device.type, dtype=torch.float16, enabled=use_amp):
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
        intra, cross, certain = _consistency_terms(
            logits,
            sdf,
            teacher,
            images,
            settings=settings,
            threshold=uncertainty_threshold(step, total_steps, student.num_classes),
            noise=noise,
        )
    weight = consistency_weight(
        step,
        weight=settings.consistency,
        rampup=settings.consistency_rampup or total_steps,
    )
    loss = supervised + weight * (intra + cross)
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
) -> SemisupResult:
    """Train ``student`` (and its EMA ``teacher``) for ``settings.iterations`` steps.

    Each step draws ``labelled_batch`` labelled and ``unlabelled_batch`` unlabelled
    samples (a fresh seeded permutation per epoch of each set), flips them alike when
    ``settings.augment``, and minimises ``L_sup + lambda(t) (L_intra + L_cross)``
    (METHODS.md 3(b)10) over SGD; the consistency terms cover the whole batch,
    labelled samples included. Without unlabelled images (M = 0) the consistency is
    taken over the labelled samples alone. After each optimiser step the teacher
    follows by :func:`ema_update` at the global step.

    Steps are numbered globally, ``start_step .. start_step + iterations - 1``: the
    threshold and consistency ramps run over ``total_steps``, and a teacher carried
    across federated rounds keeps its EMA (step 0 copies the student, so a fresh
    teacher needs no initialisation). ``settings.seed + start_step`` seeds sampling,
    noise and dropout, so successive rounds draw different batches, reproducibly.
    The SGD momentum starts from zero on every call.

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

    Returns:
        The call's :class:`SemisupResult`.

    Raises:
        ValueError: no labelled samples, shapes or spatial dimensions that do not
            match each other or the model, labels out of range, a missing teacher, or
            a negative step.
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

    report = progress or LOGGER.info
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
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    interval = max(1, settings.iterations // 10)
    sums = torch.zeros(4, dtype=torch.float64)
    started = time.perf_counter()
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    report(
        f"[{label}] {variant.value}: {len(labelled_images)} labelled + "
        f"{len(unlabelled) if unlabelled is not None else 0} unlabelled samples, "
        f"steps {start_step + 1}-{last_step} of {total} on {device}{threads}"
        f"{', AMP' if use_amp else ''}"
    )
    for offset in range(settings.iterations):
        step = start_step + offset
        images, targets = _draw_batch(
            labelled,
            unlabelled,
            labelled_index=next(labelled_order),
            unlabelled_index=next(unlabelled_order),
            augment=settings.augment,
            generator=generator,
            device=device,
        )
        optimizer.zero_grad(set_to_none=True)
        loss, terms = _step_loss(
            student,
            consistent,
            images,
            targets,
            settings=settings,
            step=step,
            total_steps=total,
            noise=noise,
            use_amp=use_amp,
        )
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.step(optimizer)
        scaler.update()
        if consistent is not None:
            ema_update(consistent, student, step, settings.ema_decay)
        # One host sync per step, for honest means and progress lines.
        sums += terms.cpu()
        if (offset + 1) % interval == 0 or offset + 1 == settings.iterations:
            means = (sums / (offset + 1)).tolist()
            report(
                f"[{label}] step {step + 1}/{total} sup {means[0]:.4f} "
                f"intra {means[1]:.4f} cross {means[2]:.4f} certain {means[3]:.2f} "
                f"({time.perf_counter() - started:.1f} s)"
            )
    student.eval()
    if consistent is not None:
        consistent.eval()
    means = (sums / settings.iterations).tolist()
    return SemisupResult(
        num_examples=settings.iterations * (settings.labelled_batch + unlabelled_batch),
        iterations=settings.iterations,
        supervised_loss=means[0],
        consistency_loss=means[1],
        cross_task_loss=means[2],
        certain_fraction=means[3],
        seconds=time.perf_counter() - started,
        device=str(device),
    )
