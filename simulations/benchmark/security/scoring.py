"""The security benchmark's side of the table: the true maps and what a guess scores.

The attacker never sees any of this. For each attack class the benchmark builds the
site's label maps exactly as the site's channel scores them (the slices of each case
the site uses for that release: every slice of each evaluation case for ``evaluate``
and ``train.consensus``, which score whole volumes; the run's slices of each labelled
case for LFTM; each labelled case's volume for a profile), and scores what came back
against three guesses without any query:

- the majority class (background) everywhere;
- another site's pixelwise-majority map (labels a coordinator might hold);
- the site's own pixelwise-majority map: the ceiling for any reconstruction that
  gives every case the same map, as a leak of the site's mean label map does. Only
  telling the site's cases apart goes beyond it.

It also turns a cell attack's values into maps (:func:`reconstruct_cells`): per case
where single-slice values decode exactly, else the mean map; and, for whole volumes,
every placement strategy of :mod:`simulations.benchmark.security.volume`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from core.config import ConfigValue, RunConfig, load_run_config
from core.data.dataset import build_slice_set, index_site, list_site_dirs, read_case
from core.data.site import read_applied_policy
from core.privacy.limits import SiteLimits, cap_slices_per_case, whole_case_config
from simulations.benchmark.security.attacks import CellMeasurements
from simulations.benchmark.security.decode import (
    BoolMap,
    decode_cases,
    decode_mean_map,
    score_maps,
)
from simulations.benchmark.security.volume import decode_volumes

MapsOf = Callable[[Path], list[BoolMap]]


def site_limits(site: Path, config: RunConfig, policy: Path | None) -> SiteLimits:
    """The limits the site applies (its policy file, or the safe defaults)."""
    applied, _source = read_applied_policy(site, config.privacy, policy_path=policy)
    return applied.limits


def _volumes(site: Path, config: RunConfig, cases: str) -> list[BoolMap]:
    """Foreground slices of each case of a split, stacked per case ``(N, S, S)``."""
    index = index_site(site)
    records = index.evaluation if cases == "evaluation" else index.labelled
    slices = build_slice_set(records, data=config.data, with_labels=True)
    assert slices.labels is not None
    labels = slices.labels.numpy() > 0
    owners = slices.case_of_slice.numpy()
    return [labels[owners == case] for case in range(len(slices.case_ids))]


def evaluate_maps_of(
    run_config: Mapping[str, ConfigValue], policy: Path | None
) -> MapsOf:
    """Each evaluation case as ``evaluate`` scores it: whole volumes, site's cap."""
    config = load_run_config(run_config)

    def maps(site: Path) -> list[BoolMap]:
        return _volumes(
            site,
            whole_case_config(config, site_limits(site, config, policy)),
            "evaluation",
        )

    return maps


def consensus_maps_of(
    run_config: Mapping[str, ConfigValue], policy: Path | None
) -> MapsOf:
    """Each evaluation case as ``train.consensus`` scores it: whole volumes.

    A site's consensus label-dice are Dice against its evaluation labels, scored as
    ``evaluate`` scores them.
    """
    return evaluate_maps_of(run_config, policy)


def training_maps_of(
    run_config: Mapping[str, ConfigValue], policy: Path | None
) -> MapsOf:
    """Each labelled training case as LFTM's slices are cut (the run's slices)."""
    config = load_run_config(run_config)

    def maps(site: Path) -> list[BoolMap]:
        return _volumes(
            site,
            cap_slices_per_case(config, site_limits(site, config, policy)),
            "labelled",
        )

    return maps


def labelled_volumes(site: Path) -> list[BoolMap]:
    """The foreground of each labelled training case, on its own grid."""
    index = index_site(site)
    volumes = []
    for case in index.labelled:
        label = read_case(case, num_classes=len(index.class_names)).label
        assert label is not None  # a labelled case
        volumes.append(label > 0)
    return volumes


def single_slices(maps: Sequence[BoolMap]) -> list[BoolMap]:
    """``(1, S, S)`` stacks as ``(S, S)`` maps; anything else unchanged."""
    return [m[0] if m.ndim == 3 and m.shape[0] == 1 else m for m in maps]


def other_site(site: Path) -> Path | None:
    """The first other site of the federation: the attacker's prior labels."""
    others = [path for path in list_site_dirs(site.parent) if path != site]
    return others[0] if others else None


def majority_map(maps: Sequence[BoolMap]) -> BoolMap:
    """The pixelwise majority of ``maps`` (all of one shape)."""
    result: BoolMap = np.mean(np.stack(list(maps)), axis=0) > 0.5
    return result


def baselines(
    truth: Sequence[BoolMap], prior: Sequence[BoolMap] | None, prior_site: str
) -> dict[str, object]:
    """Guesses without a query: another site's majority map, the site's own ceiling.

    Example:
        >>> truth = [np.array([[True, False]]), np.array([[True, True]])]
        >>> baselines(truth, [np.array([[False, False]])], "B")
        ... # doctest: +NORMALIZE_WHITESPACE
        {'prior_site': 'B', 'prior_share': 0.25, 'prior_dice': 0.0,
         'ceiling_share': 0.75, 'ceiling_dice': 0.8333}
    """
    ceiling = score_maps([majority_map(truth)] * len(truth), truth)
    found: dict[str, object] = {}
    if prior:
        guess = score_maps([majority_map(prior)] * len(truth), truth)
        found = {
            "prior_site": prior_site,
            "prior_share": round(guess.recovered_share, 4),
            "prior_dice": round(guess.dice, 4),
        }
    return found | {
        "ceiling_share": round(ceiling.recovered_share, 4),
        "ceiling_dice": round(ceiling.dice, 4),
    }


def reconstruct_cells(
    measured: CellMeasurements,
) -> tuple[list[BoolMap], dict[str, object]]:
    """The attacker's single-slice maps: exact per case when the values decode.

    Single pixels at full precision decode into each case's map; otherwise (blocks,
    rounded values, a stopped attack) every case gets the mean map.
    """
    code = measured.plan.code()
    cases = max(1, measured.num_cases)
    if code.block == 1 and measured.values:
        decoded = decode_cases(measured.values, num_cases=cases, size=code.size)
        details: dict[str, object] = {
            "consistent": decoded.consistent,
            "ambiguous_pixels": decoded.ambiguous,
            "unexplained_pixels": decoded.unexplained,
            "foreground_counts": sorted(decoded.counts),
        }
        if decoded.consistent:
            return list(decoded.maps), {"decoder": "per-case", **details}
    else:
        details = {}
    cells = {cell: code.cell_map(cell) for cell in measured.values}
    mean = decode_mean_map(measured.values, cells, size=code.size)
    return [mean] * cases, {"decoder": "mean-map", **details}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VolumeScore:
    """The best placement strategy's score and every strategy's share."""

    score: dict[str, object]
    details: dict[str, object]


def score_volume_attack(
    measured: CellMeasurements,
    truth: Sequence[BoolMap],
    prior: Sequence[BoolMap],
    *,
    decimals: int | None,
) -> VolumeScore:
    """Score every strategy's whole-volume guess; the best one is the attack's.

    The attacker cannot score its strategies (it never sees the maps); taking the
    best of them with hindsight overstates it a little, which a defence's figure
    may: it is an upper bound for this family of decoders.
    """
    code = measured.plan.code()
    guesses = decode_volumes(
        measured.values,
        measured.all_foreground,
        code,
        prior_volumes=prior,
        decimals=decimals,
    )
    scores = {
        name: score_maps([guess] * len(truth), truth)
        for name, guess in guesses.maps.items()
    }
    best = max(scores, key=lambda name: scores[name].recovered_share)
    middle = (truth[0].shape[0] - 1) // 2  # the slice a one-slice run keeps
    middle_truth = [volume[middle] for volume in truth]
    best_map = guesses.maps[best]
    middle_score = score_maps([best_map[middle]] * len(truth), middle_truth)
    return VolumeScore(
        score=scores[best].to_dict(),
        details={
            "decoder": best,
            "decoders": {
                name: round(score.recovered_share, 4) for name, score in scores.items()
            },
            "measured_cells": guesses.measured_cells,
            "mean_volume_estimate": round(guesses.estimate.mean_volume, 1),
            "mean_volume_from": guesses.estimate.source,
            "mean_volume_true": round(float(np.mean([v.sum() for v in truth])), 1),
            "middle_slice": {
                "slice": middle,
                "recovered_share": round(middle_score.recovered_share, 4),
                "majority_share": round(middle_score.majority_share, 4),
            },
        },
    )
