"""Differentially private training (DP-SGD) and the site's privacy accountant.

The only module that imports Opacus. It makes a model Opacus-compatible (no BatchNorm
running statistics: validated, and fixed by Opacus' ``ModuleValidator`` before
training), trains with per-sample clipping and Gaussian noise under Poisson sampling,
and keeps the site's RDP accountant history as a plain JSON file, so epsilon is
cumulative across phases and runs. A training that would push the site past its
budget is refused before any step. :func:`train_private` is a whole supervised
training; :class:`PrivateGradient` is the mechanism alone (Poisson draw, per-sample
gradients, clipping, noise), for a training loop that adds public gradients of its
own: the semi-supervised loop (:mod:`core.semisupervised`) privatises its supervised
part with it. Both are planned by :func:`plan_dp_sgd` (noise, budget check) and
recorded by :func:`account_steps`.

Privacy claims: epsilon is *sample-level* (neighbouring datasets differ in one
*labelled* training slice, image and label), at the stated delta, *cumulative* over
every DP training this site recorded in its accountant file, computed by Opacus' RDP
accountant at the site. Unlabelled images that a semi-supervised training also uses
are not covered. Dataset sizes (case and slice counts, hence the sample rate) are
treated as public, as the replies carry them. Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import torch
from monai.losses import DiceCELoss
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
# _OPACUS_LAZY: Opacus is imported inside the functions that use it, never at module
# level. Importing it pulls in torch.distributed.tensor and sympy, about a quarter of
# a site process's start-up, and in deployment every message starts a new ClientApp
# process that imports this module (through clients.site) whether or not the site
# trains under DP. tests/unit/test_boundaries.py checks that the ClientApp module
# loads without Opacus.
CLIP_EPSILON: Final = 1e-6  # in the clip factor's denominator, as Opacus' optimiser
_SEED_BOUND: Final = 2**62  # seeds drawn from the mechanism's own generator


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
        from opacus.accountants import RDPAccountant  # lazy: see _OPACUS_LAZY

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
    from opacus.validators import ModuleValidator  # lazy: see _OPACUS_LAZY

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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DpSgdPlan:
    """One DP-SGD training's mechanism, as the site's accountant records it.

    Attributes:
        noise_multiplier: sigma; the noise's standard deviation is sigma * C.
        sample_rate: q, each sample's independent chance to enter a step (Poisson).
        steps: optimiser steps; every one is accounted, an empty draw included.
        max_grad_norm: C, the per-sample clipping norm.
        delta: the delta at which epsilon is reported.
        seed: seeds the mechanism's own randomness (Poisson draws, noise, the private
            pass's augmentation and dropout). ``None`` (what a site runs with) draws
            a seed from the operating system: the run's seed is known to the
            coordinator, and noise or a sample it could regenerate would protect
            nothing. Tests fix it for reproducibility.

    Raises:
        ValueError: a value outside its range (naming it).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(
                f"DP-SGD noise multiplier must be > 0, got {self.noise_multiplier}"
            )
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(
                f"DP-SGD sample rate must be in (0, 1], got {self.sample_rate}"
            )
        if self.steps < 1:
            raise ValueError(f"DP-SGD needs at least one step, got {self.steps}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max-grad-norm must be > 0, got {self.max_grad_norm}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


def plan_dp_sgd(
    sample_rate: float,
    steps: int,
    *,
    dp: DpSettings,
    accountant: AccountantState,
    seed: int | None = None,
) -> DpSgdPlan:
    """The noise of ``steps`` DP-SGD steps at ``sample_rate``, checked against budget.

    The noise is ``dp.noise_multiplier``, raised to what ``dp.target_epsilon`` needs
    for exactly these steps when that is set (both bind). The check projects the
    site's cumulative epsilon after these steps; nothing is recorded here (see
    :func:`account_steps`).

    Args:
        sample_rate: q of the Poisson sampling, in (0, 1].
        steps: optimiser steps the training will take.
        dp: noise or target epsilon, delta, clipping norm and the site's budget.
        accountant: the site's accountant before this training.
        seed: see :class:`DpSgdPlan` (``None`` at a site).

    Raises:
        ValueError: a sample rate outside (0, 1] or fewer than one step.
        PrivacyBudgetError: the training would bring the site's cumulative epsilon
            above ``dp.budget_epsilon`` (nothing has been trained).
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"DP-SGD sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"DP-SGD needs at least one step, got {steps}")
    noise = dp.noise_multiplier or 0.0
    if dp.target_epsilon is not None:
        from opacus.accountants.utils import (  # lazy: _OPACUS_LAZY
            get_noise_multiplier,
        )

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
    return DpSgdPlan(
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=dp.max_grad_norm,
        delta=dp.delta,
        seed=seed,
    )


def plan_private_training(
    num_samples: int, *, train: TrainConfig, dp: DpSettings, accountant: AccountantState
) -> tuple[float, float, int]:
    """Noise multiplier, sample rate and steps of a DP training, checked against budget.

    The sample rate is ``batch_size / num_samples`` (at most 1), the steps
    ``epochs * round(1 / rate)``; :func:`plan_dp_sgd` does the rest.

    Raises:
        PrivacyBudgetError: the training would bring the site's cumulative epsilon
            above ``dp.budget_epsilon`` (nothing has been trained).
    """
    if num_samples < 1:
        raise ValueError("DP training needs at least one sample")
    sample_rate = min(1.0, train.batch_size / num_samples)
    steps = train.epochs * max(1, round(1 / sample_rate))
    plan = plan_dp_sgd(sample_rate, steps, dp=dp, accountant=accountant)
    return plan.noise_multiplier, plan.sample_rate, plan.steps


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PrivacySpend:
    """What some DP-SGD steps cost, and the site's accountant after them."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_spent: float  # these steps alone, at delta
    epsilon_total: float  # cumulative at this site after them, at delta
    delta: float
    accountant: AccountantState


def account_steps(
    accountant: AccountantState,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
) -> PrivacySpend:
    """Record ``steps`` DP-SGD steps in ``accountant``; their epsilon and the total.

    Example:
        >>> spend = account_steps(AccountantState(()), noise_multiplier=1.0,
        ...                       sample_rate=0.25, steps=40, delta=1e-5)
        >>> spend.epsilon_spent == spend.epsilon_total > 0
        True
        >>> spend.accountant.history
        ((1.0, 0.25, 40),)
    """
    entry = (noise_multiplier, sample_rate, steps)
    after = accountant.extended(*entry)
    return PrivacySpend(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        epsilon_spent=AccountantState((entry,)).epsilon(delta),
        epsilon_total=after.epsilon(delta),
        delta=delta,
        accountant=after,
    )


PerSampleLoss = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class PrivateGradient:
    """DP-SGD's Gaussian mechanism on one model's trainable parameters.

    Each :meth:`step` (at most ``plan.steps`` of them, all accounted):

    1. draws a Poisson sample of ``0 .. num_samples - 1``, each index independently
       with probability q = ``plan.sample_rate``;
    2. runs the caller's per-sample loss on the drawn samples under Opacus'
       ``GradSampleModule`` hooks and backpropagates the *sum* of the losses, giving
       one gradient per sample;
    3. clips each sample's gradient (all trainable parameters together) to norm
       C = ``plan.max_grad_norm``, sums them, adds N(0, (sigma C)^2) to every
       coordinate (sigma = ``plan.noise_multiplier``) and divides by the expected
       batch size q * ``num_samples``;
    4. *replaces* every trainable parameter's ``.grad`` with the result.

    A caller may then add public gradients (a backward of a loss on data the
    guarantee does not cover) and take its optimiser step: that is post-processing
    as long as those gradients never depend on the protected samples. Call
    :meth:`step` first in each optimiser step, after ``zero_grad``.

    An empty draw (probability (1 - q)^N) runs no forward and still releases the
    noise divided by the expected batch size, and counts as a step: that is exactly
    the subsampled Gaussian mechanism the RDP accountant analyses (skipping it would
    release a step whose absence depends on the data set's size). A parameter the
    loss does not reach gets a zero per-sample gradient, and noise like the others.

    The mechanism's randomness (the draws, the noise, and through the ``generator``
    it hands to the per-sample loss, any augmentation) comes from ``plan.seed``
    (the operating system's entropy when ``None``); the loss runs under a forked
    global RNG seeded from it too, so dropout in the private pass uses secret
    randomness and the global RNG the caller sees afterwards does not depend on
    which samples were drawn (or how many).

    Args:
        model: trained in train mode (per-sample gradients are captured only then);
            already on ``device``; must pass Opacus' validator (no BatchNorm).
        plan: the mechanism (noise, sample rate, steps, clipping norm, seed).
        num_samples: N, the number of protected samples the indices range over.
        device: where the model and its gradients live.

    Raises:
        ValueError: no samples, or a model Opacus rejects (naming the problem).
    """

    def __init__(
        self,
        model: nn.Module,
        plan: DpSgdPlan,
        *,
        num_samples: int,
        device: torch.device,
    ) -> None:
        if num_samples < 1:
            raise ValueError("DP-SGD needs at least one protected sample, got 0")
        from opacus import GradSampleModule  # lazy: see _OPACUS_LAZY
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"model is not DP-compatible: {errors[0]}")
        self.plan = plan
        self.num_samples = num_samples
        self.steps_taken = 0
        self._model = model
        self._device = device
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        seed = secrets.randbits(63) if plan.seed is None else plan.seed
        self._draws = torch.Generator().manual_seed(seed)
        self._noise = torch.Generator(device=device).manual_seed(self._next_seed())
        self._module = GradSampleModule(model, loss_reduction="sum", strict=True)
        self._module.disable_hooks()

    @property
    def expected_batch_size(self) -> float:
        """The expected batch size q * N, the denominator of every private gradient."""
        return self.plan.sample_rate * self.num_samples

    def _next_seed(self) -> int:
        return int(torch.randint(_SEED_BOUND, (1,), generator=self._draws))

    def step(self, per_sample_loss: PerSampleLoss) -> torch.Tensor:
        """Fill every trainable parameter's ``.grad`` with one step's private gradient.

        Args:
            per_sample_loss: called as ``per_sample_loss(indices, generator)`` with
                the drawn indices (int64, sorted) and the mechanism's generator (for
                augmentation); runs the model on those samples and returns one loss
                per sample, ``(len(indices),)``, each depending on its own sample
                only. Not called on an empty draw.

        Returns:
            The detached per-sample losses (empty on an empty draw): a statistic of
            the protected samples that the guarantee does not cover, for the site's
            own progress lines only.

        Raises:
            RuntimeError: more steps than ``plan.steps`` (the accountant records the
                plan), a model not in train mode, or a loss that reaches no
                trainable parameter.
            ValueError: the losses do not have one entry per drawn sample.
        """
        if self.steps_taken >= self.plan.steps:
            raise RuntimeError(
                f"DP-SGD was planned and is accounted for {self.plan.steps} steps; "
                "a further step is refused"
            )
        if not all(module.training for module in self._model.modules()):
            raise RuntimeError(
                "DP-SGD needs the model in train mode: Opacus captures per-sample "
                "gradients only then"
            )
        self.steps_taken += 1
        drawn = torch.rand(self.num_samples, generator=self._draws)
        indices = (drawn < self.plan.sample_rate).nonzero().flatten()
        summed = [torch.zeros_like(p) for p in self._parameters]
        losses = torch.zeros(0)
        if indices.numel():
            losses = self._clipped_sum(per_sample_loss, indices, summed)
        std = self.plan.noise_multiplier * self.plan.max_grad_norm
        for parameter, total in zip(self._parameters, summed, strict=True):
            noise = torch.normal(
                0.0,
                std,
                size=tuple(parameter.shape),
                generator=self._noise,
                device=self._noise.device,
                dtype=parameter.dtype,
            )
            parameter.grad = (total + noise.to(total.device)) / self.expected_batch_size
        return losses

    def _clipped_sum(
        self,
        per_sample_loss: PerSampleLoss,
        indices: torch.Tensor,
        summed: list[torch.Tensor],
    ) -> torch.Tensor:
        """Add the drawn samples' clipped gradients to ``summed``; return the losses."""
        self._module.set_grad_sample_to_none()
        pass_seed = self._next_seed()
        device = self._device
        forked: list[int] = []
        if device.type == "cuda":
            forked.append(
                torch.cuda.current_device() if device.index is None else device.index
            )
        with torch.random.fork_rng(devices=forked):
            torch.default_generator.manual_seed(pass_seed)
            for index in forked:
                torch.cuda.default_generators[index].manual_seed(pass_seed)
            self._module.enable_hooks()
            try:
                losses = per_sample_loss(indices, self._draws)
                if losses.shape != (len(indices),):
                    raise ValueError(
                        f"a per-sample loss must have shape ({len(indices)},) for "
                        f"{len(indices)} drawn samples, got {tuple(losses.shape)}"
                    )
                losses.sum().backward()  # type: ignore[no-untyped-call]
            finally:
                self._module.disable_hooks()
        samples: list[torch.Tensor | None] = [
            getattr(p, "grad_sample", None) for p in self._parameters
        ]
        present = [sample for sample in samples if sample is not None]
        if not present:
            raise RuntimeError(
                "the per-sample loss reached no trainable parameter with per-sample "
                "gradients"
            )
        norms = torch.stack(
            [sample.flatten(1).norm(dim=1) for sample in present], dim=1
        ).norm(dim=1)
        factors = (self.plan.max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)
        for total, sample in zip(summed, samples, strict=True):
            if sample is not None:
                total += torch.einsum("i,i...->...", factors, sample)
        self._module.set_grad_sample_to_none()
        return losses.detach()

    def close(self) -> None:
        """Remove Opacus' hooks and attributes: the model is a plain module again."""
        self._module.cleanup()


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
    AMP is not used under DP. The Poisson draws and the noise come from the
    operating system, not ``train.seed``: a DP training is not bit-reproducible.

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
    # train.seed fixes the initial weights and the augmentation; which slices each
    # step draws and the noise come from the operating system, because the
    # coordinator knows the run's seed and could otherwise replay (and subtract)
    # the noise.
    generator = seed_everything(train.seed)
    model = make_dp_compatible(model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=train.learning_rate)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels),
        batch_size=train.batch_size,
        generator=torch.Generator().manual_seed(secrets.randbits(62)),
    )
    from opacus import PrivacyEngine  # lazy: see _OPACUS_LAZY

    engine = PrivacyEngine(accountant="rdp")
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        noise_generator=torch.Generator(device=device).manual_seed(
            secrets.randbits(62)
        ),
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
    spend = account_steps(
        accountant,
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps=sum(int(entry[2]) for entry in engine.accountant.history),
        delta=dp.delta,
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
        noise_multiplier=spend.noise_multiplier,
        sample_rate=spend.sample_rate,
        steps=spend.steps,
        epsilon_spent=spend.epsilon_spent,
        epsilon_total=spend.epsilon_total,
        delta=spend.delta,
        accountant=spend.accountant,
    )
    return model, result
