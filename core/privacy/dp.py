"""Differential privacy at a site: DP-SGD, Gaussian releases and the accountant.

The only module that imports Opacus. Every DP release at a site goes through one
function, :func:`reserve_privacy`: under an exclusive lock on the site's accountant it
reads the history, plans the mechanism (noise, checked against the budget) and records
the spend, *before* anything is trained or released; the caller then runs exactly that
plan. :func:`train_private` is a whole supervised DP-SGD training;
:class:`PrivateGradient` is the mechanism alone (Poisson draw, per-sample gradients,
clipping, noise), which the private training, TGMA's private adaptation
(:mod:`core.transfer.adaptation`) and the semi-supervised loop
(:mod:`core.semisup.training`) all use; the task-profile and evaluation releases are
Gaussian mechanisms charged through the same function.

Privacy claims, stated for the site's accountant file (computed at the site, by this
module, from the recorded history; nobody else computes them):

- *Slice-level* epsilon (``epsilon_spent``/``epsilon_total``): at the stated delta,
  cumulative over every DP release the site recorded, by Opacus' RDP accountant. For a
  DP-SGD entry the protected record is one preprocessed 2-D slice (its image and
  label, or pseudo-label), neighbouring data sets differing by adding or removing one
  slice. A slice is cut from a volume that is z-scored as a whole, and a pseudo-label
  may use its whole case's scores, so a slice-level figure protects a record *as the
  training sees it*, not a person.
- *Patient-level* epsilon (``patient_epsilon_spent``/``patient_epsilon_total``): the
  same history, for neighbouring data sets that differ by one case (a patient's scan:
  all of its slices). Each entry records ``units_per_case`` (k), the most records of
  that mechanism one case can touch: for DP-SGD the largest number of slices any case
  contributes to that training (removing a case removes its own slices and changes no
  other record), for the Gaussian releases 1 (their sensitivity is already that of
  replacing one case, with counts public). The conversion is RDP group privacy (see
  :meth:`AccountantState.patient_epsilon`). With ``data.max-slices-per-case = 1`` every
  k is 1 and the two figures coincide; otherwise the patient-level figure is the one
  that describes a person, and it grows quickly with k.
- Unlabelled images that a semi-supervised training also uses, and anything a site
  releases outside this accountant, are not covered. Data set sizes (case and slice
  counts, hence sample rates) are public: the replies carry them.

Never imports flwr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import numpy as np
import torch
from monai.losses import DiceLoss
from torch import nn
from torch.nn import functional

from core.coerce import is_integer, is_number
from core.config import TrainConfig
from core.privacy.policy import AppliedPolicy
from core.storage import hold_exclusive_lock, write_atomically
from core.training.loop import TrainingClock
from core.training.trainer import TrainResult, augment_batch, augment_intensity

ACCOUNTANT_FILE: Final = "accountant.json"
# The accountant file itself is replaced by an atomic rename (a new inode each time),
# so the lock lives in a file of its own beside it, created once and never removed
# (removing a lock file races with a process about to lock it).
LOCK_SUFFIX: Final = ".lock"
# _OPACUS_LAZY: Opacus is imported inside the functions that use it, never at module
# level. Importing it pulls in torch.distributed.tensor and sympy, about a quarter of
# a site process's start-up, and in deployment every message starts a new ClientApp
# process that imports this module (through clients.site) whether or not the site
# trains under DP. tests/unit/test_boundaries.py checks that the ClientApp module
# loads without Opacus.
CLIP_EPSILON: Final = 1e-6  # in the clip factor's denominator, as Opacus' optimiser
_SEED_BOUND: Final = 2**62  # seeds drawn from the mechanism's own generator
# Opacus' RDPAccountant.DEFAULT_ALPHAS (checked by a test), spelled out so the
# patient-level conversion needs no Opacus import to know its orders.
RDP_ORDERS: Final = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# The Gaussian releases (task profile, evaluation) are full-data mechanisms.
FULL_DATA_RATE: Final = 1.0


class PrivacyBudgetError(ValueError):
    """A DP release would exceed the site's epsilon budget; nothing was released."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DpSettings:
    """How one DP training runs and what the site allows in total.

    At least one of ``noise_multiplier`` and ``target_epsilon`` is set: a fixed noise
    level, or the epsilon this one training may cost (noise is then derived). When
    both are set both bind (site policy and run config each named one): the larger of
    the fixed noise and the noise the target needs is used. ``budget_epsilon`` caps
    the site's cumulative *slice-level* epsilon (the patient-level figure is reported
    beside it, not capped here).
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
        >>> from core.privacy.policy import default_policy, resolve_policy
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


@functools.lru_cache(maxsize=256)
def _per_step_group_rdp(
    noise_multiplier: float, sample_rate: float, units: int
) -> tuple[float, ...]:
    """RDP of one step at each of :data:`RDP_ORDERS` for neighbours ``units`` apart.

    ``units = 1`` is Opacus' own ``compute_rdp`` at its default orders (so the
    patient-level figure of a history whose every k is 1 is bit for bit the
    slice-level one). A full-data Gaussian mechanism (``sample_rate = 1``) moves by at
    most ``units`` times its sensitivity, so its RDP is ``units**2`` times the
    single-record RDP at every order. A Poisson-subsampled step uses Mironov's group
    privacy (Proposition 2): with ``c = ceil(log2 units)`` the RDP at order ``beta``
    is ``3**c`` times the single-record RDP at order ``2**c * beta``, for ``beta >=
    2`` only; lower orders are infinite (unusable).
    """
    from opacus.accountants.analysis.rdp import compute_rdp  # lazy: _OPACUS_LAZY

    orders = list(RDP_ORDERS)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if units == 1 or sample_rate == FULL_DATA_RATE:
            single = np.asarray(
                compute_rdp(
                    q=sample_rate,
                    noise_multiplier=noise_multiplier,
                    steps=1,
                    orders=orders,
                ),
                dtype=np.float64,
            )
            return tuple((units**2 * single).tolist())
        doubling = (units - 1).bit_length()  # c = ceil(log2 units)
        result = np.full(len(orders), np.inf)
        usable = np.asarray(orders) >= 2.0
        scaled = [2**doubling * order for order in orders if order >= 2.0]
        result[usable] = 3**doubling * np.asarray(
            compute_rdp(
                q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=scaled
            ),
            dtype=np.float64,
        )
    return tuple(result.tolist())


@dataclasses.dataclass(frozen=True, slots=True)
class AccountantState:
    """The accountant's history: ``(noise multiplier, sample rate, steps)`` entries.

    One entry per DP release, in order, and beside each the number of the entry's
    protected records one case can affect (``units_per_case``; ``None`` for entries
    recorded before that was kept: unknown). Omitting ``units_per_case`` marks every
    entry unknown.

    Example:
        >>> AccountantState(()).epsilon(1e-5)
        0.0
        >>> AccountantState(((1.0, 1.0, 1),)).units_per_case
        (None,)
    """

    history: tuple[tuple[float, float, int], ...]
    units_per_case: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        units = self.units_per_case
        if units is None:
            units = (None,) * len(self.history)
        units = tuple(units)
        if len(units) != len(self.history):
            raise ValueError(
                f"units_per_case has {len(units)} entries for a history of "
                f"{len(self.history)}"
            )
        for unit in units:
            if unit is not None and (isinstance(unit, bool) or unit < 1):
                raise ValueError(f"units_per_case must be >= 1 or None, got {unit}")
        object.__setattr__(self, "units_per_case", units)

    def epsilon(self, delta: float) -> float:
        """Cumulative slice-level epsilon at ``delta`` (0 when empty), by Opacus."""
        if not self.history:
            return 0.0
        from opacus.accountants import RDPAccountant  # lazy: see _OPACUS_LAZY

        accountant = RDPAccountant()
        accountant.history = [tuple(entry) for entry in self.history]
        return float(accountant.get_epsilon(delta))

    def patient_epsilon(self, delta: float) -> float | None:
        """Cumulative patient-level epsilon at ``delta``; None when a k is unknown.

        Neighbouring data sets differ by one case. Each entry's RDP is converted to
        its group of ``k`` records: for a Poisson-subsampled step by RDP group
        privacy (I. Mironov, "Rényi Differential Privacy", IEEE CSF 2017,
        Proposition 2: if f is (alpha, eps)-RDP, g is 2^c-stable and alpha >=
        2^(c+1), then f o g is (alpha / 2^c, 3^c eps)-RDP; a case touches at most k
        <= 2^c records, c = ceil(log2 k)), for a full-data Gaussian mechanism by its
        sensitivity growing k-fold (RDP times k^2). The entries' RDP is summed at each
        of Opacus' default orders (adaptive composition), converted to (epsilon,
        delta) with Opacus' ``get_privacy_spent`` and minimised over the orders.
        Orders below 2 are unusable for an entry with k > 1 (the proposition needs
        alpha >= 2^(c+1)). Every k = 1 gives exactly :meth:`epsilon`. A bound, and
        a loose one for large k; it may be ``inf`` (no useful guarantee).

        Example:
            >>> state = AccountantState(((1.0, 0.1, 100),), (1,))
            >>> state.patient_epsilon(1e-5) == state.epsilon(1e-5)
            True
            >>> AccountantState(((1.0, 0.1, 100),)).patient_epsilon(1e-5) is None
            True
        """
        if not self.history:
            return 0.0
        units = self.units_per_case
        assert units is not None  # normalised in __post_init__
        if any(unit is None for unit in units):
            return None
        from opacus.accountants.analysis.rdp import (  # lazy: _OPACUS_LAZY
            get_privacy_spent,
        )

        total = sum(
            np.asarray(_per_step_group_rdp(float(noise), float(rate), int(unit)))
            * steps
            for (noise, rate, steps), unit in zip(self.history, units, strict=True)
            if unit is not None
        )
        with np.errstate(invalid="ignore"):
            epsilon, _order = get_privacy_spent(
                orders=list(RDP_ORDERS), rdp=total, delta=delta
            )
        return float(epsilon)

    def extended(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        units_per_case: int | None = None,
    ) -> AccountantState:
        """The state after ``steps`` more steps at this noise and sample rate."""
        assert self.units_per_case is not None  # normalised in __post_init__
        return AccountantState(
            (*self.history, (noise_multiplier, sample_rate, steps)),
            (*self.units_per_case, units_per_case),
        )


def _parse_entry(entry: object) -> tuple[tuple[float, float, int], int | None]:
    """One history entry of an accountant file; ValueError says what is wrong."""
    if not isinstance(entry, list) or len(entry) not in (3, 4):
        raise ValueError(f"entry {entry!r} is not [noise, rate, steps(, units)]")
    noise, rate, steps, *rest = entry
    units = rest[0] if rest else None
    numbers_ok = is_number(noise) and is_number(rate)
    if not (numbers_ok and math.isfinite(noise) and noise > 0 and 0 < rate <= 1):
        raise ValueError(f"entry {entry!r}: noise must be > 0 and rate in (0, 1]")
    if not is_integer(steps) or steps < 1:
        raise ValueError(f"entry {entry!r}: steps must be an integer >= 1")
    if units is not None and (not is_integer(units) or units < 1):
        raise ValueError(f"entry {entry!r}: units per case must be an integer >= 1")
    return (float(noise), float(rate), steps), units


def read_accountant_state(path: Path) -> AccountantState:
    """Read a site's accountant file; a missing file is an empty history.

    The file is ``{"mechanism": "rdp", "history": [[noise, rate, steps, units per
    case], ...]}``; entries of three numbers (written before units per case were
    kept) read as unknown units.

    Raises:
        ValueError: the file exists but is not a valid accountant file (torn,
            not JSON, an entry out of range), naming it. Nothing may be spent on
            top of a history that cannot be read.
    """
    path = Path(path)
    if not path.exists():
        return AccountantState(())
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or not isinstance(
            document.get("history"), list
        ):
            raise ValueError("no history list")
        entries = [_parse_entry(entry) for entry in document["history"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid accountant file ({error})") from None
    return AccountantState(
        tuple(entry for entry, _ in entries), tuple(units for _, units in entries)
    )


def write_accountant_state(state: AccountantState, path: Path) -> None:
    """Write the accountant file atomically (JSON, no pickle).

    A failure part-way leaves the previous file as it was (see
    :func:`core.storage.write_atomically`), so ε spent is never lost to a torn write.
    A site spends only through :func:`reserve_privacy`, which calls this under the
    accountant's lock; writing it directly is for tests and tools.
    """
    assert state.units_per_case is not None  # normalised in __post_init__
    document = {
        "mechanism": "rdp",
        "history": [
            [*entry, units]
            for entry, units in zip(state.history, state.units_per_case, strict=True)
        ],
    }
    with write_atomically(Path(path)) as temporary:
        temporary.write_text(json.dumps(document, indent=2) + "\n")


def accountant_lock_path(path: Path) -> Path:
    """The lock file beside the accountant file ``path``.

    Example:
        >>> accountant_lock_path(Path("state/accountant.json")).name
        'accountant.json.lock'
    """
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


@contextlib.contextmanager
def locked_accountant(path: Path) -> Iterator[None]:
    """Hold the exclusive ``flock`` of the accountant file ``path`` (blocking).

    Every process and thread that spends from the accountant takes this lock (each
    its own ``open()``, so threads of one process exclude each other too), from
    reading the history to writing the extended one.
    """
    with hold_exclusive_lock(accountant_lock_path(path)):
        yield


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse a model Opacus cannot take per-sample gradients of (BatchNorm, eval mode).

    Raises:
        ValueError: naming Opacus' first objection.
    """
    from opacus.validators import ModuleValidator  # lazy: see _OPACUS_LAZY

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-compatible: {errors[0]}")


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
class DpSgdPlan:
    """One DP mechanism's parameters, exactly as the site's accountant records them.

    Attributes:
        noise_multiplier: sigma; the noise's standard deviation is sigma * C.
        sample_rate: q, each sample's independent chance to enter a step (Poisson);
            1 for a full-data Gaussian release.
        steps: optimiser steps (or Gaussian releases); every one is accounted, an
            empty draw included.
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
    site's cumulative slice-level epsilon after these steps. Pure: nothing is
    recorded here; a site plans through :func:`reserve_privacy`, which records the
    plan under the accountant's lock.

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


def dp_sgd_schedule(
    num_samples: int, *, batch_size: int, epochs: int
) -> tuple[float, int]:
    """The sample rate and step count of a DP-SGD training: exactly what then runs.

    q = ``min(1, batch_size / num_samples)`` (the expected Poisson batch is
    ``batch_size``) and ``epochs * ceil(num_samples / batch_size)`` steps: an "epoch"
    is ``ceil(N / B)`` Poisson steps, so it draws at least N samples in expectation.
    :class:`PrivateGradient` then draws at exactly rate q for exactly these steps, and
    the accountant records exactly this pair.

    Example:
        >>> dp_sgd_schedule(120, batch_size=16, epochs=30)
        (0.13333333333333333, 240)
        >>> dp_sgd_schedule(10, batch_size=16, epochs=2)
        (1.0, 2)

    Raises:
        ValueError: no samples, or a batch size or epoch count below 1.
    """
    if num_samples < 1:
        raise ValueError("DP training needs at least one sample")
    if batch_size < 1 or epochs < 1:
        raise ValueError(
            f"DP training needs batch size and epochs >= 1, got {batch_size} and "
            f"{epochs}"
        )
    sample_rate = min(1.0, batch_size / num_samples)
    return sample_rate, epochs * math.ceil(num_samples / batch_size)


def largest_case(case_of_slice: torch.Tensor) -> int:
    """The most slices any one case contributes: a DP-SGD entry's units per case.

    Example:
        >>> largest_case(torch.tensor([0, 0, 1, 2, 2, 2]))
        3
    """
    if case_of_slice.numel() == 0:
        raise ValueError("no slices: a DP training needs at least one")
    return int(torch.bincount(case_of_slice.long()).max())


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PrivacySpend:
    """What one DP release costs, and the site's accountant after it.

    Attributes:
        noise_multiplier: sigma of the release.
        sample_rate: q (1 for a full-data Gaussian release).
        steps: steps (or Gaussian mechanisms) recorded.
        units_per_case: k, the release's records one case can affect.
        epsilon_spent: slice-level epsilon of this release alone, at ``delta``.
        epsilon_total: the site's cumulative slice-level epsilon after it.
        patient_epsilon_spent: patient-level epsilon of this release alone.
        patient_epsilon_total: the site's cumulative patient-level epsilon after it;
            None when an earlier entry does not state its units per case.
        delta: the delta of every figure.
        accountant: the site's accountant after this release.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    units_per_case: int
    epsilon_spent: float
    epsilon_total: float
    patient_epsilon_spent: float
    patient_epsilon_total: float | None
    delta: float
    accountant: AccountantState


def account_steps(
    accountant: AccountantState,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    units_per_case: int,
    delta: float,
) -> PrivacySpend:
    """``accountant`` with one more entry; its epsilon and the totals. Pure.

    Example:
        >>> spend = account_steps(AccountantState(()), noise_multiplier=1.0,
        ...                       sample_rate=0.25, steps=40, units_per_case=1,
        ...                       delta=1e-5)
        >>> spend.epsilon_spent == spend.epsilon_total == spend.patient_epsilon_total
        True
        >>> spend.accountant.history, spend.accountant.units_per_case
        (((1.0, 0.25, 40),), (1,))
    """
    if isinstance(units_per_case, bool) or units_per_case < 1:
        raise ValueError(f"units per case must be >= 1, got {units_per_case}")
    entry = (noise_multiplier, sample_rate, steps)
    alone = AccountantState((entry,), (units_per_case,))
    after = accountant.extended(*entry, units_per_case)
    patient_alone = alone.patient_epsilon(delta)
    assert patient_alone is not None  # its one entry states its units
    return PrivacySpend(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        units_per_case=units_per_case,
        epsilon_spent=alone.epsilon(delta),
        epsilon_total=after.epsilon(delta),
        patient_epsilon_spent=patient_alone,
        patient_epsilon_total=after.patient_epsilon(delta),
        delta=delta,
        accountant=after,
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyReservation:
    """A DP release the accountant has approved *and recorded*: run exactly ``plan``."""

    plan: DpSgdPlan
    spend: PrivacySpend


def reserve_privacy(
    accountant_path: Path | None,
    *,
    sample_rate: float,
    steps: int,
    units_per_case: int,
    dp: DpSettings,
    seed: int | None = None,
) -> PrivacyReservation:
    """Plan a DP release, check it against the budget and record it, atomically.

    The one way a site spends privacy budget (DP-SGD source training and
    fine-tuning, private adaptation, the semi-supervised private part, the profile
    and evaluation releases). Under the accountant's exclusive lock
    (:func:`locked_accountant`) it reads the history, plans the noise
    (:func:`plan_dp_sgd`: the policy's noise, or what the target epsilon needs),
    checks the projected slice-level epsilon against ``dp.budget_epsilon`` and writes
    the extended history; only then is the lock released. Two releases arriving at
    once are therefore checked one after the other, each against the other's spend.

    The spend is recorded *before* the caller trains or releases anything, and the
    caller must then run exactly ``plan`` (:class:`PrivateGradient` refuses a step
    beyond it). A training that fails or stops early keeps its charge: conservative,
    since some of its steps may already have left traces the site cannot take back.

    Args:
        accountant_path: the site's accountant file; None plans against an empty
            history and records nothing (benchmarks, tests).
        sample_rate: q of the mechanism (1 for a full-data Gaussian release).
        steps: steps of the mechanism (DP-SGD steps, or Gaussian mechanisms).
        units_per_case: k, the most of this mechanism's records one case can affect
            (see :meth:`AccountantState.patient_epsilon`).
        dp: the applied policy's DP settings.
        seed: see :class:`DpSgdPlan` (``None`` at a site).

    Raises:
        PrivacyBudgetError: the release would bring the site's cumulative epsilon
            above its budget; nothing is recorded.
        ValueError: an unreadable accountant file (naming it; nothing is recorded),
            or a rate, step count or units per case out of range.
    """

    def approve(before: AccountantState) -> PrivacyReservation:
        plan = plan_dp_sgd(sample_rate, steps, dp=dp, accountant=before, seed=seed)
        spend = account_steps(
            before,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            units_per_case=units_per_case,
            delta=plan.delta,
        )
        return PrivacyReservation(plan=plan, spend=spend)

    if accountant_path is None:
        return approve(AccountantState(()))
    with locked_accountant(accountant_path):
        reservation = approve(read_accountant_state(accountant_path))
        write_accountant_state(reservation.spend.accountant, accountant_path)
    return reservation


def describe_spend(spend: PrivacySpend, *, budget_epsilon: float) -> str:
    """One progress line: the slice- and patient-level figures of a spend.

    Example:
        >>> spend = account_steps(AccountantState(()), noise_multiplier=2.0,
        ...                       sample_rate=1.0, steps=1, units_per_case=1,
        ...                       delta=1e-5)
        >>> describe_spend(spend, budget_epsilon=10.0)
        'epsilon 2.166 spent, 2.166 of 10 in total per slice; per patient (1 slice(s) per case) 2.166 spent, 2.166 in total (delta 1e-05)'
    """  # noqa: E501
    total = (
        "unknown (earlier entries do not state slices per case)"
        if spend.patient_epsilon_total is None
        else f"{spend.patient_epsilon_total:.3f}"
    )
    return (
        f"epsilon {spend.epsilon_spent:.3f} spent, {spend.epsilon_total:.3f} of "
        f"{budget_epsilon:g} in total per slice; per patient "
        f"({spend.units_per_case} slice(s) per case) "
        f"{spend.patient_epsilon_spent:.3f} spent, {total} in total "
        f"(delta {spend.delta:g})"
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

        check_dp_compatible(model)
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


def per_sample_dice_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy of each sample on its own, ``(B,)``.

    MONAI's ``DiceCELoss(batch=False)`` per sample: the Dice loss averaged over the
    classes of that sample plus its pixel-mean cross-entropy, so the mean over the
    batch is ``DiceCELoss``'s value, and sample ``i``'s loss depends on sample ``i``
    alone (DP-SGD clips each sample's gradient; a pooled loss would couple them).

    Args:
        logits: ``(B, C, H, W)``.
        labels: ``(B, H, W)`` integer class maps.

    Example:
        >>> logits, labels = torch.zeros(2, 2, 4, 4), torch.zeros(2, 4, 4).long()
        >>> per_sample_dice_ce(logits, labels).shape
        torch.Size([2])
    """
    labels = labels.long()
    cross_entropy = functional.cross_entropy(logits, labels, reduction="none")
    dice = DiceLoss(to_onehot_y=True, softmax=True, batch=False, reduction="none")(
        logits, labels.unsqueeze(1)
    )
    loss: torch.Tensor = dice.flatten(1).mean(1) + cross_entropy.flatten(1).mean(1)
    return loss


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PrivateTrainResult:
    """A DP training's outcome and its spend (the site's accountant after it)."""

    train: TrainResult
    spend: PrivacySpend

    @property
    def noise_multiplier(self) -> float:
        """The noise multiplier sigma of the training."""
        return self.spend.noise_multiplier

    @property
    def sample_rate(self) -> float:
        """The Poisson sample rate q."""
        return self.spend.sample_rate

    @property
    def steps(self) -> int:
        """The steps planned, recorded and run."""
        return self.spend.steps

    @property
    def units_per_case(self) -> int:
        """The most training slices one case contributed."""
        return self.spend.units_per_case

    @property
    def epsilon_spent(self) -> float:
        """Slice-level epsilon of this training alone, at ``delta``."""
        return self.spend.epsilon_spent

    @property
    def epsilon_total(self) -> float:
        """The site's cumulative slice-level epsilon after this training."""
        return self.spend.epsilon_total

    @property
    def patient_epsilon_spent(self) -> float:
        """Patient-level epsilon of this training alone, at ``delta``."""
        return self.spend.patient_epsilon_spent

    @property
    def patient_epsilon_total(self) -> float | None:
        """The site's cumulative patient-level epsilon (None: not stated)."""
        return self.spend.patient_epsilon_total

    @property
    def delta(self) -> float:
        """The delta of every figure."""
        return self.spend.delta

    @property
    def accountant(self) -> AccountantState:
        """The site's accountant after this training."""
        return self.spend.accountant


def train_private(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    case_of_slice: torch.Tensor,
    train: TrainConfig,
    dp: DpSettings,
    accountant_path: Path | None,
    device: torch.device,
    label: str,
    progress: Callable[[str], None] | None = None,
    seed: int | None = None,
) -> tuple[nn.Module, PrivateTrainResult]:
    """Train a segmentation model with DP-SGD: one plan, recorded, then run exactly.

    The plan is :func:`dp_sgd_schedule`'s (q = B/N, ``epochs * ceil(N/B)`` steps),
    reserved through :func:`reserve_privacy` (budget check and record under the
    accountant's lock) before the first step, with ``units_per_case`` the most
    slices any case contributes. :class:`PrivateGradient` then takes exactly those
    steps (an empty draw counts), each followed by an Adam step. The loss is
    :func:`per_sample_dice_ce`; with ``train.augment`` each drawn batch is flipped
    and intensity-augmented with the mechanism's own generator. AMP is not used. The
    Poisson draws, noise and augmentation come from the operating system (``seed``
    overrides, for tests), not ``train.seed``: the coordinator knows the run's seed,
    and a DP training is not bit-reproducible.

    Args:
        model: the network; made DP-compatible first (a fixed copy may be returned).
        images: ``(N, 1, H, W)`` inputs.
        labels: ``(N, H, W)`` integer class maps.
        case_of_slice: ``(N,)`` the case each slice comes from.
        train: epochs, batch size (the expected Poisson batch), learning rate,
            augmentation.
        dp: noise or target epsilon, delta, clipping norm and the site's budget.
        accountant_path: the site's accountant file (None: an empty history,
            nothing recorded).
        device: where to train.
        label: names the run in progress lines.
        progress: called with one line per epoch (defaults to the
            ``sitebridge.train`` logger).
        seed: the mechanism's seed; None (a site) draws one from the OS.

    Returns:
        The trained model (eval mode) and the result with the spend.

    Raises:
        PrivacyBudgetError: before any step, when the budget would be exceeded
            (nothing is recorded).
        ValueError: a model Opacus rejects, or tensors that do not line up (before
            anything is recorded).
    """
    num_samples = int(images.shape[0])
    if labels.shape[0] != num_samples or case_of_slice.shape != (num_samples,):
        raise ValueError(
            f"images, labels and case_of_slice must have {num_samples} rows each"
        )
    model = make_dp_compatible(model).to(device).train()
    result, spend = run_private_training(
        model,
        images,
        labels,
        case_of_slice=case_of_slice,
        per_sample_loss=lambda batch, targets: per_sample_dice_ce(
            model(batch).float(), targets
        ),
        schedule=PrivateSchedule(
            epochs=train.epochs,
            batch_size=train.batch_size,
            learning_rate=train.learning_rate,
            augment=train.augment,
        ),
        dp=dp,
        accountant_path=accountant_path,
        device=device,
        label=label,
        progress=progress,
        seed=seed,
    )
    model.eval()
    return model, PrivateTrainResult(train=result, spend=spend)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PrivateSchedule:
    """How long and how a DP-SGD training runs (the Poisson batch is expected)."""

    epochs: int
    batch_size: int
    learning_rate: float  # Adam
    augment: bool  # flips and intensity, drawn from the mechanism's generator


def run_private_training(
    module: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    case_of_slice: torch.Tensor,
    per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: PrivateSchedule,
    dp: DpSettings,
    accountant_path: Path | None,
    device: torch.device,
    label: str,
    progress: Callable[[str], None] | None = None,
    seed: int | None = None,
) -> tuple[TrainResult, PrivacySpend]:
    """DP-SGD of ``module`` on ``(images, targets)``: reserve, then run that plan.

    The one loop every DP-SGD training of a site runs (source training, fine-tuning,
    adaptation): q = ``batch_size / N`` and ``epochs * ceil(N / batch_size)`` steps
    (:func:`dp_sgd_schedule`), reserved in the site's accountant before the first
    step (:func:`reserve_privacy`: the budget check and the recorded spend under one
    lock), with the most slices any case contributes as its units per case; then
    exactly those steps of :class:`PrivateGradient` and Adam. Updates ``module`` in
    place and leaves it in train mode.

    Args:
        module: already DP-compatible, on ``device``, in train mode.
        images: ``(N, 1, H, W)`` inputs.
        targets: ``(N, H, W)`` integer class maps (labels or pseudo-labels).
        case_of_slice: ``(N,)`` the case each slice comes from.
        per_sample_loss: ``(batch images, batch targets) -> (n,)`` losses on
            ``device``, each depending on its own sample only.
        schedule: epochs, expected batch size, learning rate, augmentation.
        dp: noise or target epsilon, delta, clipping norm and the site's budget.
        accountant_path: the site's accountant (None: nothing recorded).
        device: where to train.
        label: names the run in progress lines.
        progress: called with one line per epoch (defaults to the
            ``sitebridge.train`` logger).
        seed: the mechanism's seed; None (a site) draws one from the OS.

    Returns:
        The training's result (its losses stay at the site) and the spend.

    Raises:
        PrivacyBudgetError: before any step, when the budget would be exceeded.
        RuntimeError: the steps run differ from the steps recorded.
    """
    num_samples = int(images.shape[0])
    sample_rate, steps = dp_sgd_schedule(
        num_samples, batch_size=schedule.batch_size, epochs=schedule.epochs
    )
    reservation = reserve_privacy(
        accountant_path,
        sample_rate=sample_rate,
        steps=steps,
        units_per_case=largest_case(case_of_slice),
        dp=dp,
        seed=seed,
    )
    plan = reservation.plan
    mechanism = PrivateGradient(module, plan, num_samples=num_samples, device=device)
    optimizer = torch.optim.Adam(
        [p for p in module.parameters() if p.requires_grad], lr=schedule.learning_rate
    )

    def drawn_loss(indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = [images[indices], targets[indices]]
        if schedule.augment:
            batch = augment_batch(batch, generator)
            batch[0] = augment_intensity(batch[0], generator)
        batch_images, batch_targets = (tensor.to(device) for tensor in batch)
        return per_sample_loss(batch_images, batch_targets)

    clock = TrainingClock(label, progress)
    clock.line(
        f"DP-SGD: {num_samples} samples, {plan.steps} steps "
        f"({schedule.epochs} epochs of {plan.steps // schedule.epochs}), noise "
        f"{plan.noise_multiplier:.3f}, clip {plan.max_grad_norm:g}, sample rate "
        f"{plan.sample_rate:.4f}"
    )
    epoch_losses: list[float] = []
    seen = 0
    try:
        for epoch in range(schedule.epochs):
            total, count = 0.0, 0
            for _ in range(plan.steps // schedule.epochs):
                optimizer.zero_grad(set_to_none=True)
                losses = mechanism.step(drawn_loss)
                optimizer.step()
                total += float(losses.sum())
                count += int(losses.numel())
            seen += count
            epoch_losses.append(total / max(count, 1))
            clock.epoch(epoch, schedule.epochs, epoch_losses[-1], samples=count)
    finally:
        mechanism.close()
    if mechanism.steps_taken != plan.steps:  # the schedule divides by construction
        raise RuntimeError(
            f"DP-SGD ran {mechanism.steps_taken} of {plan.steps} recorded steps"
        )
    return (
        TrainResult(
            num_examples=seen,
            epoch_losses=tuple(epoch_losses),
            seconds=clock.seconds,
            device=str(device),
        ),
        reservation.spend,
    )
