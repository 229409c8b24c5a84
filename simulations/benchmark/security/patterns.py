"""Crafted models of an adversarial coordinator: fixed spatial patterns, any input.

A MONAI U-Net whose input-layer weights are zero computes the same output for every
image: its first layer is a constant map, and the zero padding of every later
convolution turns that constant into position. Trained offline (on nothing but a zero
image, which is exact here, because the output cannot depend on the input), such a
model of the run's declared architecture paints any fixed pattern. This module owns:

- :class:`PixelCode`: which pattern models the attacker crafts and how an even
  mixture of ``digits`` of them isolates one cell of the image. A cell's index is
  written in base ``base`` with ``digits`` digits; model ``(d, v)`` is foreground (at a
  modest probability) on the cells whose digit ``d`` is ``v`` and confidently
  background elsewhere, so the even mixture of a cell's ``digits`` models is
  foreground on that cell only. Two digits of base 32 on a 32 px image are the row
  and column stripes: 64 models give 1024 single-pixel predictors. All weights are
  non-negative and sum to 1.
- :func:`craft_pattern_model`: trains one such model and checks that it really ignores
  its input.
- :func:`predictor_regions`: the region each predictor paints at the site, computed
  with the site's own ``core.training.trainer`` functions, so the attacker knows exactly
  what each returned Dice measures.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from core.config import RunConfig
from core.training.networks import Arrays, build_model, get_weights, set_weights
from core.training.trainer import predict_probabilities

BoolMap = npt.NDArray[np.bool_]
Key = TypeVar("Key", bound=Hashable)
# Background confidence of a pattern model off its pattern: 2 p(fg) - 1 <= -OFF.
OFF_LEVEL = 0.9


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PixelCode:
    """How crafted models isolate cells of a ``size`` x ``size`` image.

    Attributes:
        size: the run's ``data.image-size``.
        block: side of one cell in pixels (1 = single pixels); divides ``size``.
        digits: models per predictor (``D``); cells are numbered in base ``base``.
    """

    size: int
    block: int
    digits: int

    def __post_init__(self) -> None:
        if self.block < 1 or self.size % self.block:
            raise ValueError(
                f"block {self.block} must divide the image size {self.size}"
            )
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}")

    @property
    def cells_per_side(self) -> int:
        """Cells along one side of the image."""
        return self.size // self.block

    @property
    def num_cells(self) -> int:
        """Cells in the image, numbered row-major."""
        return self.cells_per_side**2

    @property
    def base(self) -> int:
        """The smallest base whose ``digits`` digits number every cell."""
        base = max(2, math.ceil(self.num_cells ** (1.0 / self.digits)))
        # Floating-point roots can land one off either way.
        while base**self.digits < self.num_cells:
            base += 1
        while base > 2 and (base - 1) ** self.digits >= self.num_cells:
            base -= 1
        return int(base)

    def digit(self, cell: int, position: int) -> int:
        """Digit ``position`` of ``cell`` in base :attr:`base`."""
        return int((cell // self.base**position) % self.base)

    @staticmethod
    def model_name(position: int, value: int) -> str:
        """The model painting the cells whose digit ``position`` is ``value``."""
        return f"d{position}v{value}"

    def patterns(self) -> dict[str, BoolMap]:
        """Every model's foreground pattern, by model name (only values in use)."""
        cells = np.arange(self.num_cells).reshape(self.cells_per_side, -1)
        patterns = {}
        for position in range(self.digits):
            digits = (cells // self.base**position) % self.base
            for value in np.unique(digits):
                grid = np.kron(digits == value, np.ones((self.block, self.block)))
                patterns[self.model_name(position, int(value))] = grid.astype(bool)
        return patterns

    def members(self, cell: int) -> list[tuple[str, float]]:
        """The predictor of ``cell``: its digits' models, each weighted 1 / digits."""
        return [
            (self.model_name(position, self.digit(cell, position)), 1.0 / self.digits)
            for position in range(self.digits)
        ]

    def cell_map(self, cell: int) -> BoolMap:
        """The pixels of ``cell``."""
        grid = np.zeros((self.cells_per_side, self.cells_per_side), dtype=bool)
        grid.flat[cell] = True
        return np.kron(grid, np.ones((self.block, self.block))).astype(bool)

    def on_level(self) -> tuple[float, float]:
        """The range of ``2 p(fg) - 1`` a model takes on its pattern.

        With ``D`` digits, a cell sharing ``D - 1`` digits with the target must stay
        background: ``(D - 1) * high < OFF_LEVEL``, with a fifth to spare.
        """
        high = (
            0.7 if self.digits == 1 else min(0.7, 0.8 * OFF_LEVEL / (self.digits - 1))
        )
        return high / 2.0, high


def input_weight_names(model: nn.Module) -> tuple[str, ...]:
    """The convolution weights of the U-Net's first block that read the image.

    MONAI's UNet feeds the image to ``model.0`` only (its skip connections carry
    that block's output, never the image); with these weights zero, nothing
    downstream depends on the input.
    """
    return tuple(
        name
        for name, tensor in model.named_parameters()
        if name.startswith("model.0.") and tensor.ndim >= 3 and tensor.shape[1] == 1
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CraftedModel:
    """One pattern model: its weights and what crafting it cost."""

    weights: Arrays
    steps: int
    seconds: float
    converged: bool


def craft_pattern_model(
    config: RunConfig,
    pattern: BoolMap,
    *,
    on_level: tuple[float, float],
    seed: int,
    max_steps: int = 500,
) -> CraftedModel:
    """Train a model of the run's architecture to paint ``pattern`` on any image.

    Its output is ``2 p(fg) - 1`` in ``on_level`` on the pattern and at most
    ``-OFF_LEVEL`` elsewhere (checked on the zero image, which stands for every
    image: the input weights are zero and stay zero).

    Raises:
        ValueError: the run is not binary (``data.num-classes`` != 2), the pattern
            does not have the image's size, or the output still depends on the
            input (an architecture this construction does not know).
    """
    size = config.data.image_size
    if config.data.num_classes != 2:
        raise ValueError(
            f"pattern models paint one foreground class; data.num-classes is "
            f"{config.data.num_classes}"
        )
    if pattern.shape != (size, size):
        raise ValueError(f"pattern shape {pattern.shape} is not ({size}, {size})")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(config.model, data=config.data)
    frozen = set(input_weight_names(model))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in frozen:
            parameters[name].zero_()
    optimiser = torch.optim.Adam(
        [p for name, p in parameters.items() if name not in frozen], lr=1e-2
    )
    on = torch.from_numpy(pattern)
    low, high = (2.0 * math.atanh(level) for level in on_level)
    off = 2.0 * math.atanh(-OFF_LEVEL)
    spare = 0.25  # train a little inside the bounds, accept on the bounds
    image = torch.zeros(1, 1, size, size)
    model.train()
    steps, converged = 0, False
    for steps in range(1, max_steps + 1):  # noqa: B007 - steps is reported
        logits = model(image)[0]
        gap = logits[1] - logits[0]  # 2 atanh(2 p(fg) - 1)
        inside = bool(
            ((gap[on] >= low) & (gap[on] <= high)).all() and (gap[~on] <= off).all()
        )
        if inside:
            converged = True
            break
        loss = (
            torch.relu(low + spare - gap[on]).square().sum()
            + torch.relu(gap[on] - high + spare).square().sum()
            + torch.relu(gap[~on] - off + spare).square().sum()
        ) / gap.numel()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    check_input_independent(model, size)
    return CraftedModel(
        weights=get_weights(model),
        steps=steps,
        seconds=time.perf_counter() - started,
        converged=converged,
    )


def check_input_independent(model: nn.Module, size: int) -> None:
    """Raise ValueError unless two unrelated images give the very same output."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, size, size, generator=generator) * 3.0
    with torch.no_grad():
        first, second = model(images)
    if not torch.equal(first, second):
        raise ValueError(
            "the crafted model's output depends on its input; this architecture "
            "feeds the image past model.0"
        )


def pattern_probabilities(
    models: Mapping[str, Arrays], config: RunConfig
) -> dict[str, torch.Tensor]:
    """Each model's softmax map ``(C, S, S)`` as the site computes it (any image)."""
    size = config.data.image_size
    image = torch.zeros(1, 1, size, size)
    maps = {}
    for name, weights in models.items():
        model = build_model(config.model, data=config.data)
        set_weights(model, weights)
        maps[name] = predict_probabilities(model, image, device=torch.device("cpu"))[0]
    return maps


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    """What one predictor paints: its foreground and how far from a tie it is."""

    foreground: BoolMap
    margin: float  # smallest |p(fg) - p(bg)| of the mixture over the image


def predictor_regions(
    maps: Mapping[str, torch.Tensor],
    predictors: Mapping[Key, Sequence[tuple[str, float]]],
) -> dict[Key, Region]:
    """The region of each predictor: the arithmetic of ``predict_mixture``.

    The mixture is summed in the predictor's member order from the same softmax
    maps, and its argmax taken, as ``core.training.evaluation.evaluate_predictors``
    does.
    """
    regions = {}
    for name, members in predictors.items():
        mixture: torch.Tensor | None = None
        for model, weight in members:
            term = weight * maps[model]
            mixture = term if mixture is None else mixture + term
        assert mixture is not None
        regions[name] = Region(
            foreground=(mixture.argmax(0) > 0).numpy(),
            margin=float((mixture[1] - mixture[0]).abs().min()),
        )
    return regions


def craft_code_models(
    config: RunConfig, code: PixelCode, *, seed: int
) -> tuple[dict[str, Arrays], dict[str, object]]:
    """Every pattern model of ``code`` and what crafting them cost (seconds, steps)."""
    models: dict[str, Arrays] = {}
    steps, seconds, unconverged = 0, 0.0, []
    for offset, (name, pattern) in enumerate(sorted(code.patterns().items())):
        crafted = craft_pattern_model(
            config, pattern, on_level=code.on_level(), seed=seed + offset
        )
        models[name] = crafted.weights
        steps += crafted.steps
        seconds += crafted.seconds
        if not crafted.converged:
            unconverged.append(name)
    cost: dict[str, object] = {
        "models": len(models),
        "training_steps": steps,
        "seconds": round(seconds, 2),
        "unconverged": unconverged,
    }
    return models, cost
