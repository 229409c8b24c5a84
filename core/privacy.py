"""Differentially private training (DP-SGD) and the site's privacy accountant.

The only module that imports Opacus. It makes a model Opacus-compatible (no BatchNorm
running statistics: validated, and fixed by Opacus' ``ModuleValidator`` before
training), trains with per-sample clipping and Gaussian noise under Poisson sampling,
and keeps the site's RDP accountant history as a plain JSON file, so epsilon is
cumulative across phases and runs. A training that would push the site past its
budget is refused before any step.

Privacy claims: epsilon is *sample-level* (neighbouring datasets differ in one
training slice), at the stated delta, *cumulative* over every DP training this site
recorded in its accountant file, computed by Opacus' RDP accountant at the site.
Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import torch
from monai.losses import DiceCELoss
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn

from core.config import TrainConfig
from core.policy import AppliedPolicy
from core.storage import write_atomically
from core.training import (
    TrainResult,
    augment_batch,
    augment_intensity,
    seed_everything,
)

ACCOUNTANT_FILE: Final = "accountant.json"


class PrivacyBudgetError(ValueError):
    """A DP training would exceed the site's epsilon budget; nothing was trained."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DpSettings:
    """How one DP training runs and what the site allows in total.

    At least one of ``noise_multiplier`` and ``target_epsilon`` is set: a fixed noise
    level, or the epsilon this one training may cost (noise is then derived). When
    both are set both bind (site policy and run config each named one): the larger of
    the fixed noise and the noise the target needs is used.
    """

    noise_multiplier: float | None
    target_epsilon: float | None
    delta: float
    max_grad_norm: float
    budget_epsilon: float

    def __post_init__(self) -> None:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                "DP needs noise-multiplier or target-epsilon (or both); neither is set"
            )
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ValueError(
                f"noise-multiplier must be > 0, got {self.noise_multiplier}"
            )
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"target-epsilon must be > 0, got {self.target_epsilon}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.budget_epsilon <= 0:
            raise ValueError(f"budget-epsilon must be > 0, got {self.budget_epsilon}")


def dp_settings_for(
    policy: AppliedPolicy, *, max_grad_norm: float
) -> DpSettings | None:
    """The DP-SGD settings an applied policy demands, or None when DP is not required.

    Example:
        >>> from core.policy import default_policy, resolve_policy
        >>> applied = resolve_policy(
        ...     default_policy(), run_dp_required=True, run_noise_multiplier=None,
        ...     run_target_epsilon=3.0, run_max_reply_mb=None)
        >>> settings = dp_settings_for(applied, max_grad_norm=1.0)
        >>> settings.noise_multiplier, settings.target_epsilon, settings.budget_epsilon
        (1.0, 3.0, 10.0)
    """
    if not policy.dp_required:
        return None
    return DpSettings(
        noise_multiplier=policy.noise_multiplier,
        target_epsilon=policy.target_epsilon,
        delta=policy.delta,
        max_grad_norm=max_grad_norm,
        budget_epsilon=policy.epsilon_budget,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class AccountantState:
    """The RDP accountant's history: ``(noise multiplier, sample rate, steps)`` entries.

    One entry per DP training, in order.

    Example:
        >>> AccountantState(()).epsilon(1e-5)
        0.0
    """

    history: tuple[tuple[float, float, int], ...]

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` over the whole history (0 when empty)."""
        if not self.history:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [tuple(entry) for entry in self.history]
        return float(accountant.get_epsilon(delta))

    def extended(
        self, noise_multiplier: float, sample_rate: float, steps: int
    ) -> AccountantState:
        """The state after ``steps`` more steps at this noise and sample rate."""
        return AccountantState((*self.history, (noise_multiplier, sample_rate, steps)))


def read_accountant_state(path: Path) -> AccountantState:
    """Read a site's accountant file; a missing file is an empty history.

    Raises:
        ValueError: the file exists but is not a valid accountant file (naming it).
    """
    path = Path(path)
    if not path.exists():
        return AccountantState(())
    try:
        document = json.loads(path.read_text())
        history = tuple(
            (float(noise), float(rate), int(steps))
            for noise, rate, steps in document["history"]
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a valid accountant file ({error})") from None
    return AccountantState(history)


def write_accountant_state(state: AccountantState, path: Path) -> None:
    """Write the accountant file atomically (JSON, no pickle).

    A failure part-way leaves the previous file as it was (see
    :func:`core.storage.write_atomically`), so ε spent is never lost to a torn write.
    """
    document = {"mechanism": "rdp", "history": [list(entry) for entry in state.history]}
    with write_atomically(Path(path)) as temporary:
        temporary.write_text(json.dumps(document, indent=2) + "\n")


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Return ``model`` fixed for Opacus (BatchNorm -> GroupNorm), validated strictly.

    Raises:
        ValueError: Opacus still rejects the model after fixing (naming the problem).
    """
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-compatible: {errors[0]}")
    return model


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PrivateTrainResult:
    """A DP training's outcome and the site's accountant after it."""

    train: TrainResult
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_spent: float  # this training alone, at delta
    epsilon_total: float  # cumulative at this site after this training, at delta
    delta: float
    accountant: AccountantState


def plan_private_training(
    num_samples: int, *, train: TrainConfig, dp: DpSettings, accountant: AccountantState
) -> tuple[float, float, int]:
    """Noise multiplier, sample rate and steps of a DP training, checked against budget.

    Raises:
        PrivacyBudgetError: the training would bring the site's cumulative epsilon
            above ``dp.budget_epsilon`` (nothing has been trained).
    """
    if num_samples < 1:
        raise ValueError("DP training needs at least one sample")
    sample_rate = min(1.0, train.batch_size / num_samples)
    steps = train.epochs * max(1, round(1 / sample_rate))
    noise = dp.noise_multiplier or 0.0
    if dp.target_epsilon is not None:
        noise = max(
            noise,
            float(
                get_noise_multiplier(
                    target_epsilon=dp.target_epsilon,
                    target_delta=dp.delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                )
            ),
        )
    spent_before = accountant.epsilon(dp.delta)
    projected = accountant.extended(noise, sample_rate, steps).epsilon(dp.delta)
    if projected > dp.budget_epsilon:
        raise PrivacyBudgetError(
            f"refused before training: the site's budget is epsilon "
            f"{dp.budget_epsilon:g} at delta {dp.delta:g}; {spent_before:.3f} is spent "
            f"and this training ({steps} steps, noise {noise:.3f}, sample rate "
            f"{sample_rate:.3f}) would bring it to {projected:.3f}"
        )
    return noise, sample_rate, steps


def train_private(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    train: TrainConfig,
    dp: DpSettings,
    accountant: AccountantState,
    device: torch.device,
    label: str,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.Module, PrivateTrainResult]:
    """Train a segmentation model with DP-SGD (Opacus, Poisson sampling, Adam).

    The loss is Dice + cross-entropy per sample (never pooled over the batch, which
    would couple samples' gradients), so clipping bounds each sample's influence.
    AMP is not used under DP.

    Args:
        model: the network; made DP-compatible first (a fixed copy may be returned).
        images: ``(N, 1, H, W)`` inputs.
        labels: ``(N, H, W)`` integer class maps.
        train: epochs, batch size (the expected Poisson batch), learning rate, seed,
            augmentation.
        dp: noise or target epsilon, delta, clipping norm and the site's budget.
        accountant: the site's accountant before this training.
        device: where to train.
        label: names the run in progress lines.
        progress: called with one line per epoch.

    Returns:
        The trained (unwrapped) model and the result with the updated accountant.

    Raises:
        PrivacyBudgetError: before any training, when the budget would be exceeded.
    """
    report = progress or print
    num_samples = int(images.shape[0])
    noise, sample_rate, _planned_steps = plan_private_training(
        num_samples, train=train, dp=dp, accountant=accountant
    )
    generator = seed_everything(train.seed)
    model = make_dp_compatible(model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=train.learning_rate)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels),
        batch_size=train.batch_size,
        generator=generator,
    )
    engine = PrivacyEngine(accountant="rdp")
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
    )
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
    report(
        f"[{label}] DP-SGD: {num_samples} samples x {train.epochs} epochs, noise "
        f"{noise:.3f}, clip {dp.max_grad_norm:g}, sample rate {sample_rate:.3f}"
    )
    started = time.perf_counter()
    epoch_losses: list[float] = []
    seen = 0
    for epoch in range(train.epochs):
        total, count = 0.0, 0
        for batch_images, batch_labels in private_loader:
            if batch_images.shape[0] == 0:
                # An empty Poisson batch (probability (1 - q)^N, about 1e-7 for the
                # default 16 of 120 slices) releases no update and is not counted.
                continue
            batch = [batch_images, batch_labels]
            if train.augment:
                batch = augment_batch(batch, generator)
                batch[0] = augment_intensity(batch[0], generator)
            batch_images, batch_labels = (tensor.to(device) for tensor in batch)
            private_optimizer.zero_grad(set_to_none=True)
            loss = loss_function(private_model(batch_images), batch_labels.unsqueeze(1))
            loss.backward()
            private_optimizer.step()
            total += float(loss.detach()) * batch_images.shape[0]
            count += batch_images.shape[0]
        seen += count
        epoch_losses.append(total / max(count, 1))
        report(
            f"[{label}] epoch {epoch + 1}/{train.epochs} loss {epoch_losses[-1]:.4f} "
            f"({time.perf_counter() - started:.1f} s)"
        )
    # The accountant records what actually ran; the plan fixed noise and sample rate.
    taken_steps = sum(int(entry[2]) for entry in engine.accountant.history)
    after = accountant.extended(noise, sample_rate, taken_steps)
    epsilon_spent = AccountantState(((noise, sample_rate, taken_steps),)).epsilon(
        dp.delta
    )
    model = private_model._module  # unwrap: the caller never sees Opacus' wrapper
    model.eval()
    result = PrivateTrainResult(
        train=TrainResult(
            num_examples=seen,
            epoch_losses=tuple(epoch_losses),
            seconds=time.perf_counter() - started,
            device=str(device),
        ),
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps=taken_steps,
        epsilon_spent=epsilon_spent,
        epsilon_total=after.epsilon(dp.delta),
        delta=dp.delta,
        accountant=after,
    )
    return model, result
