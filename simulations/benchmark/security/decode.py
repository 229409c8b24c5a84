"""Turning returned Dice values back into label maps, and scoring what came back.

A site averages Dice over its evaluation cases (``core.metrics``: Dice per case, then
the mean). A predictor that paints one pixel ``p`` on every slice of a case with one
slice scores ``2 Y_c(p) / (1 + y_c)`` on case ``c`` (``y_c`` its foreground pixels),
so the returned mean is

    v(p) = (2 / C) * sum over cases c with Y_c(p) = 1 of 1 / (1 + y_c)

a subset sum of ``C`` unknown terms, each the reciprocal of an integer. At full float
precision the subset, hence every case's map, follows (:func:`decode_cases`): the
smallest unexplained value is one more term, and an integer ``y`` must come out of it;
every term's pixel count must then equal its ``y``. When values are rounded, or cells
are blocks, :func:`decode_mean_map` estimates the mean foreground share of each cell
over the cases instead and predicts that map for every case.

Scoring (:func:`score_maps`) is the benchmark's, not the attacker's: it matches the
reconstructed maps to the true ones (the site never names its cases) and counts equal
pixels, against predicting the majority class everywhere.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from core.metrics import mask_dice

BoolMap = npt.NDArray[np.bool_]
# A returned Dice is a float32 per case averaged in float64: 1e-7 separates sums.
VALUE_TOLERANCE = 1e-7
# How close to an integer a term's implied foreground count must come.
COUNT_TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DecodedCases:
    """Per-case maps recovered from single-pixel Dice values.

    Attributes:
        maps: one ``(S, S)`` map per case, in no particular order (cases that never
            showed foreground are empty maps).
        counts: the foreground count ``y`` of each decoded case, as ``maps``.
        unexplained: pixels whose value no combination of terms explains.
        ambiguous: pixels whose owner cannot be told: the value has several
            decompositions, or only some of the cases sharing one ``y`` hold the
            pixel (the mean Dice is linear in each case's overlap, so cases with the
            same ``y`` are interchangeable; such pixels go to all of them when most
            hold it, else to none).
        consistent: every term's pixel count equals its ``y`` times its
            multiplicity, and every value is explained.
    """

    maps: tuple[BoolMap, ...]
    counts: tuple[int, ...]
    unexplained: int
    ambiguous: int
    consistent: bool


Terms = dict[int, int]  # foreground count y -> cases with that count


def _term(count: int, num_cases: int) -> float:
    return 2.0 / (num_cases * (1.0 + count))


def _combinations(terms: Terms, num_cases: int) -> list[tuple[float, tuple[int, ...]]]:
    """Every non-zero combination ``sum_y n_y t(y)``, ``0 <= n_y <= m_y``, by sum."""
    counts = sorted(terms)
    sums = []
    for picks in itertools.product(*(range(terms[y] + 1) for y in counts)):
        if any(picks):
            total = sum(
                n * _term(y, num_cases) for n, y in zip(picks, counts, strict=True)
            )
            sums.append((total, picks))
    return sorted(sums)


def _explain(
    value: float, sums: Sequence[tuple[float, tuple[int, ...]]]
) -> list[tuple[int, ...]]:
    """The combinations whose sum is ``value`` (within float tolerance)."""
    low = bisect.bisect_left(sums, (value - VALUE_TOLERANCE,))
    found = []
    for total, picks in sums[low:]:
        if total > value + VALUE_TOLERANCE:
            break
        found.append(picks)
    return found


def _new_terms(value: float, terms: Terms, num_cases: int) -> list[int]:
    """Counts ``y`` of a new term that, with known terms, make ``value``.

    Known counts come first: twice ``t(19)`` is exactly ``t(9)``, and a second case
    with a count already seen is the likelier reading (the search backtracks if not).
    """
    counts = sorted(terms)
    found: list[int] = []
    for picks in itertools.product(*(range(terms[y] + 1) for y in counts)):
        rest = value - sum(
            n * _term(y, num_cases) for n, y in zip(picks, counts, strict=True)
        )
        if rest <= VALUE_TOLERANCE:
            continue
        implied = 2.0 / (num_cases * rest) - 1.0
        if implied >= 0.5 and abs(implied - round(implied)) <= COUNT_TOLERANCE:
            found.append(round(implied))
    return sorted(set(found), key=lambda y: (y not in terms, y))


def _owners(
    values: Mapping[int, float], terms: Terms, num_cases: int
) -> tuple[dict[int, tuple[int, ...]], int, int]:
    """Each pixel's combination; the unexplained and multiply explained counts."""
    sums = _combinations(terms, num_cases)
    owners, unexplained, ambiguous = {}, 0, 0
    for pixel, value in values.items():
        if value <= VALUE_TOLERANCE:
            continue
        found = _explain(value, sums)
        if not found:
            unexplained += 1
            continue
        ambiguous += len(found) > 1
        owners[pixel] = found[0]
    return owners, unexplained, ambiguous


def _consistent(owners: Mapping[int, tuple[int, ...]], terms: Terms) -> bool:
    counts = sorted(terms)
    held = np.zeros(len(counts), dtype=np.int64)
    for picks in owners.values():
        held += np.asarray(picks)
    return all(int(held[i]) == y * terms[y] for i, y in enumerate(counts))


def _search_terms(
    values: Sequence[float], terms: Terms, pixels: Mapping[int, float], num_cases: int
) -> Terms | None:
    """Depth-first: add terms until every value is explained and counts agree."""
    sums = _combinations(terms, num_cases)
    pending = next((v for v in values if not _explain(v, sums)), None)
    if pending is None:
        owners, unexplained, _ = _owners(pixels, terms, num_cases)
        return terms if not unexplained and _consistent(owners, terms) else None
    if sum(terms.values()) >= num_cases:
        return None
    for count in _new_terms(pending, terms, num_cases):
        found = _search_terms(
            values, {**terms, count: terms.get(count, 0) + 1}, pixels, num_cases
        )
        if found is not None:
            return found
    return None


def _greedy_terms(values: Sequence[float], num_cases: int) -> Terms:
    """The first reading of each unexplained value, for when no search succeeds."""
    terms: Terms = {}
    for value in values:
        if sum(terms.values()) >= num_cases:
            break
        if not _explain(value, _combinations(terms, num_cases)):
            found = _new_terms(value, terms, num_cases)
            if found:
                terms[found[0]] = terms.get(found[0], 0) + 1
    return terms


def decode_cases(
    values: Mapping[int, float], *, num_cases: int, size: int
) -> DecodedCases:
    """Recover each case's map from the mean Dice of single-pixel predictors.

    Args:
        values: pixel index (row-major) -> returned mean Dice; pixels not queried
            are taken as background.
        num_cases: ``C``, the evaluation cases the site averaged over.
        size: the image side.
    """
    distinct = sorted({v for v in values.values() if v > VALUE_TOLERANCE})
    terms = _search_terms(distinct, {}, values, num_cases)
    consistent = terms is not None
    if terms is None:
        terms = _greedy_terms(distinct, num_cases)
    owners, unexplained, ambiguous = _owners(values, terms, num_cases)
    counts = sorted(terms)
    maps, labels = [], []
    shared_pixels: set[int] = set()
    for index, count in enumerate(counts):
        shared = np.zeros(size * size, dtype=bool)
        for pixel, picks in owners.items():
            held = picks[index]
            if 0 < held < terms[count]:
                shared_pixels.add(pixel)
            shared[pixel] = 2 * held > terms[count]
        maps += [shared.reshape(size, size)] * terms[count]
        labels += [count] * terms[count]
    empty = np.zeros((size, size), dtype=bool)
    maps += [empty] * max(0, num_cases - len(maps))
    return DecodedCases(
        maps=tuple(maps),
        counts=tuple(labels),
        unexplained=unexplained,
        ambiguous=ambiguous + len(shared_pixels),
        consistent=consistent and not unexplained,
    )


def decode_mean_map(
    values: Mapping[int, float], cells: Mapping[int, BoolMap], *, size: int
) -> BoolMap:
    """The cells where most cases are foreground, from (possibly rounded) Dice values.

    A cell of ``b^2`` pixels holding ``k_c`` foreground pixels of case ``c`` scores
    about ``2 k / (b^2 + y)`` on average over cases (``k``, ``y`` the means). All
    cells together hold every foreground pixel once: their values sum to about
    ``2 y / (b^2 + y)``, which gives ``y``, then ``k`` per cell; a cell is predicted
    foreground when ``k`` is at least half of it.
    """
    prediction = np.zeros((size, size), dtype=bool)
    if not values:
        return prediction
    area = float(next(iter(cells.values())).sum())
    total = float(sum(values.values()))
    if total >= 2.0 or total <= 0.0:  # not the sum of a partition: nothing to scale
        return prediction
    mean_count = total * area / (2.0 - total)
    for cell, value in values.items():
        if value * (area + mean_count) / 2.0 >= area / 2.0:
            prediction |= cells[cell]
    return prediction


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MapScore:
    """Recovered pixels against the majority-class baseline, over the target maps."""

    recovered_share: float
    majority_share: float
    dice: float  # mean foreground Dice of the matched maps (both empty: 1)
    pixels: int
    per_case: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        """The document's fields (shares rounded to 4 decimals)."""
        return {
            "recovered_share": round(self.recovered_share, 4),
            "majority_share": round(self.majority_share, 4),
            "dice": round(self.dice, 4),
            "pixels": self.pixels,
            "recovered_share_per_case": [round(v, 4) for v in self.per_case],
        }


def score_maps(reconstructed: Sequence[BoolMap], truth: Sequence[BoolMap]) -> MapScore:
    """Match reconstructed maps to true maps (best total agreement) and score them.

    The site never says which case a value belongs to, so the reconstructed maps are
    an unordered set; each true map is paired with one reconstruction (missing ones
    count as all background) by the assignment that maximises agreement.
    """
    if not truth:
        raise ValueError("no true maps to score against")
    shape = truth[0].shape
    pool = list(reconstructed) + [np.zeros(shape, dtype=bool)] * max(
        0, len(truth) - len(reconstructed)
    )
    agreement = np.array(
        [[float((guess == true).mean()) for guess in pool] for true in truth]
    )
    rows, columns = linear_sum_assignment(-agreement)
    pairs = list(zip(rows, columns, strict=True))
    per_case = tuple(float(agreement[r, c]) for r, c in pairs)
    stacked = np.stack(list(truth))
    foreground = float(stacked.mean())
    return MapScore(
        recovered_share=float(np.mean(per_case)),
        majority_share=max(foreground, 1.0 - foreground),
        dice=float(np.mean([mask_dice(pool[c], truth[r]) for r, c in pairs])),
        pixels=int(stacked.size),
        per_case=per_case,
    )
