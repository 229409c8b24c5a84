"""Calibrating SeqTran's affinity weights a, b and c, and writing them into pyproject.

The distance is ``d = a * H_norm + b * (1 - R_norm) + c * P_norm``
(:mod:`core.affinity.matrix`; ``c``, the polarity term's weight, is 0 in the paper's
form). Scaling the weights together changes no ranking and no cheapest path, so only
their direction is fitted: ``(a, b, c) = (cos t cos u, sin t cos u, sin u)`` over a
grid of angles ``t`` in ``[0, pi/2]`` and ``u`` in ``[0, pi/2)`` (1 degree apart),
rescaled so the largest is 1. ``u = 0`` is the paper's two-term form, where ``t = pi/4``
is the default ``a = b = 1``; ``u`` stops short of ``pi/2``, as ``a = b = 0`` is not a
valid config. The fitted direction maximises the mean over targets of the Spearman
correlation between ``-d(source, target)`` and the measured transfer Dice; ties go to
the smallest ``u`` (the paper's form unless the polarity term ranks strictly better),
then to the ``t`` nearest the defaults. Without polarity terms only ``u = 0`` is
searched, which is the two-term fit. The fitted weights are written into the lines of
``[tool.flwr.app.config.affinity]`` the run config reads (``image-weight``,
``label-weight``, ``polarity-weight``), keeping the file's comments and layout. Used
by the ``affinity`` benchmark (:mod:`simulations.benchmark.affinity`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np

from simulations.benchmark.tgma import spearman

AFFINITY_SECTION: Final = "tool.flwr.app.config.affinity"
WEIGHT_KEYS: Final = ("image-weight", "label-weight")
POLARITY_KEY: Final = "polarity-weight"
ANGLE_STEPS: Final = 91  # 1 degree apart over [0, 90]
DEFAULT_ANGLE: Final = math.pi / 4  # a = b


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PairTerms:
    """One target's sources: their normalised terms to it and the measured Dice.

    Attributes:
        image: ``H_norm(source, target)`` per source.
        label: ``1 - R_norm(source, target)`` per source.
        dice: the measured transfer Dice per source, in the same order.
        polarity: ``P_norm(source, target)`` per source, or empty without a
            polarity term (the fit then keeps ``c = 0``).
    """

    image: tuple[float, ...]
    label: tuple[float, ...]
    dice: tuple[float, ...]
    polarity: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not len(self.image) == len(self.label) == len(self.dice) or len(
            self.polarity
        ) not in (0, len(self.image)):
            raise ValueError(
                f"terms and Dice must have one value per source, got {len(self.image)}"
                f" image, {len(self.label)} label, {len(self.polarity)} polarity and "
                f"{len(self.dice)} Dice values"
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WeightFit:
    """Fitted affinity weights and the mean Spearman they reach."""

    image_weight: float  # a
    label_weight: float  # b
    spearman: float
    polarity_weight: float = 0.0  # c


def weights_at(angle: float) -> tuple[float, float]:
    """``(a, b) = (cos t, sin t)`` rescaled so the larger is 1, rounded to 4 places.

    Example:
        >>> weights_at(math.pi / 4), weights_at(0.0), weights_at(math.pi / 2)
        ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0))
    """
    cos, sin = math.cos(angle), math.sin(angle)
    scale = max(cos, sin)
    return round(max(cos, 0.0) / scale, 4), round(max(sin, 0.0) / scale, 4)


def weights_at_direction(angle: float, polarity_angle: float) -> tuple[float, ...]:
    """``(a, b, c) = (cos t cos u, sin t cos u, sin u)``, the largest rescaled to 1.

    Rounded to 4 places; ``u = 0`` gives :func:`weights_at` with ``c = 0``.

    Example:
        >>> weights_at_direction(math.pi / 4, 0.0)
        (1.0, 1.0, 0.0)
        >>> weights_at_direction(0.0, math.pi / 4)
        (1.0, 0.0, 1.0)
    """
    cos_u, sin_u = math.cos(polarity_angle), math.sin(polarity_angle)
    raw = (math.cos(angle) * cos_u, math.sin(angle) * cos_u, sin_u)
    scale = max(raw)
    return tuple(round(max(value, 0.0) / scale, 4) for value in raw)


def mean_spearman(
    terms: Mapping[str, PairTerms],
    *,
    image_weight: float,
    label_weight: float,
    polarity_weight: float = 0.0,
) -> float:
    """Mean over targets of Spearman(-d, Dice), ``d = a * H + b * (1 - R) + c * P``.

    Raises:
        ValueError: no targets, or ``c > 0`` for a target without polarity terms.
    """
    if not terms:
        raise ValueError("no targets to correlate: measure transfer Dice first")
    values = []
    for name, pair in terms.items():
        distance = image_weight * np.asarray(pair.image) + label_weight * np.asarray(
            pair.label
        )
        if polarity_weight > 0.0:
            if not pair.polarity:
                raise ValueError(
                    f"target {name} has no polarity terms to weigh by {polarity_weight}"
                )
            distance = distance + polarity_weight * np.asarray(pair.polarity)
        values.append(spearman([-float(value) for value in distance], pair.dice))
    return float(np.mean(values))


def fit_weights(
    terms: Mapping[str, PairTerms],
    *,
    steps: int = ANGLE_STEPS,
    polarity: bool = True,
) -> WeightFit:
    """Fit ``a, b, c >= 0`` maximising :func:`mean_spearman` over a direction grid.

    ``c`` is searched only with ``polarity`` and when every target has polarity
    terms; otherwise the fit is the two-term one (``c = 0``).

    Example:
        >>> # Dice follows the label term alone, ties included: any a > 0 breaks
        >>> # the tie between the first two sources, so the fit is a = 0, b = 1.
        >>> pair = PairTerms(image=(0.2, 0.8, 0.5, 0.1), label=(0.5, 0.5, 0.1, 0.9),
        ...                  dice=(0.6, 0.6, 0.9, 0.1))
        >>> fit_weights({"T": pair})
        WeightFit(image_weight=0.0, label_weight=1.0, spearman=1.0, polarity_weight=0.0)

    Raises:
        ValueError: no targets, or fewer than 2 grid steps.
    """
    if steps < 2:
        raise ValueError(f"the angle grid needs at least 2 steps, got {steps}")
    if not terms:
        raise ValueError("no targets to correlate: measure transfer Dice first")
    angles = np.linspace(0.0, math.pi / 2, steps)
    with_polarity = polarity and all(pair.polarity for pair in terms.values())
    polarity_angles = angles[:-1] if with_polarity else angles[:1]
    # (-rho, u, |t - pi/4|, t) over the grid, the smallest wins
    best: tuple[float, float, float, float] | None = None
    for polarity_angle in polarity_angles:
        for angle in angles:
            a, b, c = weights_at_direction(float(angle), float(polarity_angle))
            rho = mean_spearman(
                terms, image_weight=a, label_weight=b, polarity_weight=c
            )
            key = (
                -round(rho, 12),
                float(polarity_angle),
                abs(float(angle) - DEFAULT_ANGLE),
                float(angle),
            )
            if best is None or key < best:
                best = key
    assert best is not None
    a, b, c = weights_at_direction(best[3], best[1])
    return WeightFit(
        image_weight=a, label_weight=b, spearman=-best[0], polarity_weight=c
    )


def fit_leave_one_out(terms: Mapping[str, PairTerms]) -> dict[str, float]:
    """Per target: the Spearman at the weights fitted on the other targets only.

    Empty with fewer than two targets (nothing to fit on).
    """
    if len(terms) < 2:
        return {}
    held_out = {}
    for target, pair in terms.items():
        fit = fit_weights({name: t for name, t in terms.items() if name != target})
        held_out[target] = mean_spearman(
            {target: pair},
            image_weight=fit.image_weight,
            label_weight=fit.label_weight,
            polarity_weight=fit.polarity_weight,
        )
    return held_out


_LINE: Final = re.compile(
    r"^(?P<key>[A-Za-z0-9_-]+)(?P<eq>\s*=\s*)(?P<value>[^\s#]+)(?P<pad>[ \t]*)"
    r"(?P<comment>#.*)?$"
)


def _format_weight(value: float) -> str:
    return repr(float(value))


def write_affinity_weights(
    pyproject: Path,
    *,
    image_weight: float,
    label_weight: float,
    polarity_weight: float | None = None,
) -> None:
    """Set ``image-weight``, ``label-weight`` (and ``polarity-weight``), in place.

    Only those values change: the keys, comments and the comments' column stay
    (the padding shrinks or grows with the value, at least one space).
    ``polarity_weight`` None leaves ``polarity-weight`` as it is.

    Raises:
        ValueError: a weight is negative or not finite; the file has no
            ``[tool.flwr.app.config.affinity]`` section or the section lacks a key
            (the file is left unchanged).
    """
    weights = dict(zip(WEIGHT_KEYS, (image_weight, label_weight), strict=True))
    if polarity_weight is not None:
        weights[POLARITY_KEY] = polarity_weight
    for key, value in weights.items():
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{key} must be finite and >= 0, got {value}")
    lines = pyproject.read_text().splitlines(keepends=True)
    header = f"[{AFFINITY_SECTION}]"
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == header)
    except StopIteration:
        raise ValueError(
            f"{pyproject}: no {header} section; the run config reads the affinity "
            "weights from there, so there is nothing to calibrate"
        ) from None
    found: dict[str, int] = {}
    for number in range(start + 1, len(lines)):
        text = lines[number].rstrip("\r\n")
        if text.lstrip().startswith("["):
            break
        match = _LINE.match(text)
        if match and match["key"] in weights:
            found[match["key"]] = number
    missing = [key for key in weights if key not in found]
    if missing:
        raise ValueError(
            f"{pyproject}: {header} has no {' or '.join(missing)} line; add "
            f"'{missing[0]} = 1.0' there before calibrating"
        )
    for key, number in found.items():
        line = lines[number]
        ending = line[len(line.rstrip("\r\n")) :]
        match = _LINE.match(line.rstrip("\r\n"))
        assert match is not None
        text = _format_weight(weights[key])
        comment = match["comment"] or ""
        pad = ""
        if comment:
            width = len(match["value"]) + len(match["pad"])
            pad = " " * max(1, width - len(text))
        lines[number] = f"{match['key']}{match['eq']}{text}{pad}{comment}{ending}"
    pyproject.write_text("".join(lines))


def read_affinity_weights(pyproject: Path) -> tuple[float, float]:
    """``(image-weight, label-weight)`` as the run config reads them."""
    section = tomllib.loads(pyproject.read_text())
    for part in AFFINITY_SECTION.split("."):
        section = section[part]
    return float(section[WEIGHT_KEYS[0]]), float(section[WEIGHT_KEYS[1]])


def read_polarity_weight(pyproject: Path) -> float:
    """``polarity-weight`` as the run config reads it (0 where the line is absent)."""
    section = tomllib.loads(pyproject.read_text())
    for part in AFFINITY_SECTION.split("."):
        section = section[part]
    return float(section.get(POLARITY_KEY, 0.0))


def pair_terms(
    image: Sequence[float],
    label: Sequence[float],
    dice: Sequence[float],
    polarity: Sequence[float] = (),
) -> PairTerms:
    """:class:`PairTerms` from the sequences (floats coerced)."""
    return PairTerms(
        image=tuple(map(float, image)),
        label=tuple(map(float, label)),
        dice=tuple(map(float, dice)),
        polarity=tuple(map(float, polarity)),
    )
