"""The ``affinity`` benchmark: SeqTran's transfer paths against direct transfer.

On the chain federation (:mod:`core.data.synthetic_chain`: a 3 x 3 grid of appearance x
anatomy, the target ``T-bright-large`` with 2 labelled cases), each target's sources
are the other sites. Per target it reports the Dice on the target's evaluation labels
after transfer along the cheapest path under the affinity distance ``d``
(:func:`core.affinity.paths.cheapest_path`, at most ``affinity.max-hops`` hops), along
the paper's landmark -> intermediate -> target path, directly from the source nearest
by ``d``, directly from the source whose one-step Dice is truly highest (the oracle),
and along a seeded random path with the chosen path's hop count; and the Spearman
correlation between ``-d(source, target)`` and the one-step Dice (the source's model
fine-tuned on the target's few labels). Every Dice is the mean over ``--seeds``
(``train.seed`` values; each retrains every path), as one seed is too noisy to rank
the sources. Two intermediates, their labels cut to the target's count, are targets
too. Every profile carries the polarity term (docs/methods.md#polarity-term), which
``affinity.polarity-weight`` = 0 leaves out of ``d``. ``--calibrate`` fits ``a``, ``b``
and ``c`` on the one-step Dice (:mod:`simulations.benchmark.affinity_calibration`),
writes them into pyproject.toml and chooses the paths with them. With ``c > 0`` each
target is also scored under the paper's two-term form (``paper_form``: its Spearman,
chosen path and affinity-best source), at the two-term fit when calibrating and at
:data:`PAPER_FORM_WEIGHTS` otherwise. Training and scoring are
:mod:`simulations.benchmark.affinity_transfer`; this module owns the run, its JSON
document and the table between the ``<!-- benchmark:affinity -->`` markers of
``docs/affinity-benchmark.md``; the command line is ``simulations.benchmark``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import torch

from core.affinity.profile import build_site_profile, profile_settings
from core.coerce import is_number
from core.config import ConfigValue, RunConfig, load_default_config, to_flat
from core.data.dataset import list_site_dirs
from core.data.synthetic_chain import ensure_chain_federation
from core.logs import Progress
from simulations.benchmark.affinity_calibration import (
    PairTerms,
    fit_leave_one_out,
    fit_weights,
    mean_spearman,
    write_affinity_weights,
)
from simulations.benchmark.affinity_transfer import (
    PathTrainer,
    SingleSteps,
    TargetSetup,
    average_single_steps,
    build_recipe,
    evaluate_target,
    few_label_view,
    measure_single_steps,
    read_federation_roles,
    setup_target,
)
from simulations.benchmark.output import (
    describe_machine,
    log_progress,
    parse_seeds,
    with_seed,
)
from simulations.benchmark.tgma import spearman

AFFINITY_MARKER: Final = "benchmark:affinity"
# The benchmark's scale: a few minutes on 2 CPU cores. Build with
# build_affinity_config; each transfer step's recipe is the run config's
# affinity.finetune-* (the pipeline's), overridable with --set.
AFFINITY_RUN_CONFIG: Final[dict[str, ConfigValue]] = {
    "data.image-size": 32,
    "data.max-slices-per-case": 0,
    "model.channels": "16,32,64",
    "model.strides": "2,2",
    "train.epochs": 30,  # a path's first site, from the seeded start
}
# Labelled training cases per landmark and intermediate, and the target's default
# (--target-cases; the paper leaves the target's label count open, so
# docs/affinity-benchmark.md reports several few-shot counts).
CHAIN_CASES: Final = (8, 8, 2)
EXTRA_TARGETS: Final = ("I-dark-large", "I-bright-small")
COLUMNS: Final = (
    "path",
    "paper_path",
    "direct_affinity_best",
    "direct_oracle_best",
    "random_path",
)
HEADERS: Final = (
    "chosen path",
    "paper path",
    "direct: affinity-best",
    "direct: oracle-best",
    "random path",
)
TARGET_SPEARMAN: Final = 0.6
SPEARMAN_KEYS: Final = ("spearman", "spearman_zero_shot", "spearman_factor_levels")
SEED_RESAMPLES: Final = 2000  # bootstrap draws of the seeds for the Spearman interval
# One seed's one-step Dice moves by about 0.06 between train.seed values (seeds 0-2:
# mean per-step standard deviation 0.056-0.072 per target, up to 0.2 for a source
# whose fine-tuning sometimes collapses), as much as the sources differ. Over three
# seeds the mean Spearman's bootstrap interval was [0.32, 0.65]: too wide to say
# which side of 0.6 it is on. Ten seeds (about 100 s each on one core) narrow every
# Dice's standard error by sqrt(10 / 3).
DEFAULT_SEEDS: Final = tuple(range(10))
MISSING: Final = "—"
# The paper's two-term form as calibrated on chain seed 0 before the polarity term
# (a, b; commit 064819c's pyproject.toml): what an uncalibrated run with c > 0 compares
# its paths and Spearman with.
PAPER_FORM_WEIGHTS: Final = (1.0, 0.0875)
RANDOM_PATHS_SHOWN: Final = 3  # per target in the docs table; the JSON has every seed's


def build_affinity_config(overrides: Mapping[str, ConfigValue]) -> RunConfig:
    """Load the defaults with :data:`AFFINITY_RUN_CONFIG`, then ``overrides``, on top.

    Raises:
        ValueError: an override names an unknown key or breaks a config rule.
    """
    return load_default_config(**{**AFFINITY_RUN_CONFIG, **overrides})


def _with_weights(
    config: RunConfig, image: float, label: float, polarity: float
) -> RunConfig:
    return dataclasses.replace(
        config,
        affinity=dataclasses.replace(
            config.affinity,
            image_weight=image,
            label_weight=label,
            polarity_weight=polarity,
        ),
    )


def _mean(targets: Mapping[str, Mapping[str, object]], key: str) -> float:
    values = [row[key] for row in targets.values()]
    numbers = [float(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    return float(np.mean(numbers)) if numbers else math.nan


def run_affinity(
    config: RunConfig,
    *,
    federation_dir: Path,
    targets: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    calibrate: bool = False,
    pyproject: Path | None = None,
    progress: Progress = log_progress,
) -> dict[str, object]:
    """Measure one-step transfer, optionally calibrate, then score every target's paths.

    Args:
        config: the run config (:func:`build_affinity_config`); its affinity weights
            choose the paths unless ``calibrate``.
        federation_dir: a chain federation (with ``federation.toml``).
        targets: extra target sites besides the federation's own, each cut to the
            federation target's number of labelled cases.
        seeds: ``train.seed`` values; every path is trained once per seed (weights,
            batches) and every Dice is the mean over them. The Spearman and the
            calibration use the mean one-step Dice; each seed's own is recorded.
        calibrate: fit ``a, b, c`` on the one-step Dice and choose the paths with
            them.
        pyproject: where ``calibrate`` writes the fitted weights; None writes nothing.
        progress: called with one line per training step.

    Returns:
        The JSON-able document (see ``docs/affinity-benchmark.md``): ``targets``,
        ``mean``, ``targets_met``, ``weights``, ``calibration`` (None without
        ``calibrate``), the recipe and the flat run config.

    Raises:
        ValueError: a target is not a site of the federation, or is listed twice;
            no seed, or a seed repeats; ``federation.toml`` is missing or
            incomplete.
    """
    roles = read_federation_roles(federation_dir)
    main_target = str(roles["target"])
    landmarks = [str(site) for site in roles["landmarks"]]  # type: ignore[attr-defined]
    sites = {path.name: path for path in list_site_dirs(federation_dir)}
    names = [main_target, *targets]
    unknown = [name for name in names if name not in sites]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"targets {names} must be distinct sites of {federation_dir} "
            f"(sites there: {sorted(sites)})"
        )
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    settings = profile_settings(config.affinity, polarity=True)
    profiles = {name: build_site_profile(sites[name], settings) for name in sites}
    few = profiles[main_target].num_labelled
    trainers = {
        seed: PathTrainer(build_recipe(with_seed(config, seed)), progress=progress)
        for seed in seeds
    }
    with tempfile.TemporaryDirectory(prefix="affinity-views-") as views:
        setups: dict[str, TargetSetup] = {}
        for name in names:
            folder = sites[name]
            if name != main_target:
                folder = few_label_view(folder, Path(views) / name, num_labelled=few)
            setups[name] = setup_target(name, folder, sites, profiles, config)
        measured: dict[str, list[SingleSteps]] = {
            name: [
                measure_single_steps(trainer, setup, config)
                for trainer in trainers.values()
            ]
            for name, setup in setups.items()
        }
        terms: dict[str, PairTerms] = {}
        for name, setup in setups.items():
            mean_steps = average_single_steps(measured[name])
            terms[name] = setup.terms({s: d["dice"] for s, d in mean_steps.items()})
        calibration: dict[str, object] | None = None
        paper_form = PAPER_FORM_WEIGHTS
        if calibrate:
            fit = fit_weights(terms)
            two_terms = fit_weights(terms, polarity=False)
            paper_form = (two_terms.image_weight, two_terms.label_weight)
            calibration = {
                "image_weight": fit.image_weight,
                "label_weight": fit.label_weight,
                "polarity_weight": fit.polarity_weight,
                "spearman_fitted": fit.spearman,
                "two_term_fit": {
                    "image_weight": two_terms.image_weight,
                    "label_weight": two_terms.label_weight,
                    "spearman": two_terms.spearman,
                },
                "spearman_defaults": mean_spearman(
                    terms, image_weight=1.0, label_weight=1.0
                ),
                "spearman_before": mean_spearman(
                    terms,
                    image_weight=config.affinity.image_weight,
                    label_weight=config.affinity.label_weight,
                    polarity_weight=config.affinity.polarity_weight,
                ),
                "held_out_spearman": fit_leave_one_out(terms),
                "written_to": None if pyproject is None else str(pyproject),
            }
            progress(
                f"[affinity] calibrated a = {fit.image_weight:g}, b = "
                f"{fit.label_weight:g}, c = {fit.polarity_weight:g}: mean Spearman "
                f"{fit.spearman:.3f} (two terms: a = {two_terms.image_weight:g}, b = "
                f"{two_terms.label_weight:g}, {two_terms.spearman:.3f}; defaults "
                f"a = b = 1: {calibration['spearman_defaults']:.3f})"
            )
            if pyproject is not None:
                write_affinity_weights(
                    pyproject,
                    image_weight=fit.image_weight,
                    label_weight=fit.label_weight,
                    polarity_weight=fit.polarity_weight,
                )
            config = _with_weights(
                config, fit.image_weight, fit.label_weight, fit.polarity_weight
            )
        rows = {
            name: evaluate_target(
                trainers,
                setup,
                measured[name],
                config,
                landmarks=landmarks,
                number=number,
                paper_form=paper_form,
            )
            for number, (name, setup) in enumerate(setups.items())
        }
    mean = {key: _mean(rows, key) for key in (*COLUMNS, *SPEARMAN_KEYS)}
    interval = spearman_seed_interval(rows)
    if interval is not None:
        progress(
            f"[affinity] mean Spearman {mean['spearman']:.3f}, "
            f"{interval['level']:.0%} interval over the seeds "
            f"[{interval['low']:.3f}, {interval['high']:.3f}]; the generator's factor "
            f"distance ranks the same Dice at {mean['spearman_factor_levels']:.3f}"
        )
    return {
        "targets": rows,
        "mean": mean,
        "targets_met": {
            "path_beats_direct_affinity_best": bool(
                mean["path"] > mean["direct_affinity_best"]
            ),
            "spearman_at_least_0.6": bool(mean["spearman"] >= TARGET_SPEARMAN),
        },
        "weights": {
            "image_weight": config.affinity.image_weight,
            "label_weight": config.affinity.label_weight,
            "polarity_weight": config.affinity.polarity_weight,
            "max_hops": config.affinity.max_hops,
        },
        "spearman_interval": interval,
        "paper_form": summarise_paper_form(rows),
        "calibration": calibration,
        "recipe": {
            "scratch_epochs": config.train.epochs,
            "scratch_learning_rate": config.train.learning_rate,
            "finetune_epochs": config.affinity.finetune_epochs,
            "finetune_learning_rate": config.affinity.finetune_learning_rate,
            "target_labelled_cases": few,
            "training_steps": sum(t.steps_trained for t in trainers.values()),
        },
        "seeds": list(seeds),
        "config": to_flat(config),
    }


def summarise_paper_form(
    rows: Mapping[str, Mapping[str, object]],
) -> dict[str, object] | None:
    """The paper's two-term form over the targets: its means and Spearman interval.

    None when the rows carry no ``paper_form`` (the run's ``d`` had no polarity
    term, so it was the paper's form).
    """
    forms = {name: row.get("paper_form") for name, row in rows.items()}
    if not all(isinstance(form, Mapping) for form in forms.values()):
        return None
    typed = {name: form for name, form in forms.items() if isinstance(form, Mapping)}
    mean = {
        key: float(np.mean([float(form[key]) for form in typed.values()]))
        for key in ("path", "direct_affinity_best", "spearman")
    }
    resampled = {}
    for name, form in typed.items():
        steps = rows[name]["single_step"]
        distance = form["distance"]
        assert isinstance(steps, Mapping)
        assert isinstance(distance, Mapping)
        resampled[name] = {
            "single_step": {
                source: {
                    "distance": distance[source],
                    "dice_per_seed": step["dice_per_seed"],
                }
                for source, step in steps.items()
            }
        }
    first = next(iter(typed.values()))
    return {
        "weights": first["weights"],
        "mean": mean,
        "spearman_interval": spearman_seed_interval(resampled),
        "path_beats_direct_affinity_best": bool(
            mean["path"] > mean["direct_affinity_best"]
        ),
    }


def spearman_seed_interval(
    rows: Mapping[str, Mapping[str, object]],
    *,
    resamples: int = SEED_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float] | None:
    """Percentile-bootstrap interval of the mean Spearman(-d, one-step Dice) over seeds.

    Each resample draws the ``train.seed`` values with replacement (the same draw for
    every target, as one seed trains every target's paths), averages each source's
    one-step Dice over the drawn seeds and takes the mean over targets of
    Spearman(-d, that Dice). It measures how much the training seeds move the
    figure at the run's weights ``d``; it does not refit the calibration per resample.

    Args:
        rows: per target, an ``evaluate_target`` row
            (:mod:`simulations.benchmark.affinity_transfer`): its ``single_step``
            sources with ``distance`` and ``dice_per_seed``.
        resamples: bootstrap draws.
        level: the interval's coverage, in (0, 1).
        seed: the draws' random seed.

    Returns:
        ``{"low", "high", "level", "resamples", "seeds"}``, or ``None`` with fewer
        than two seeds (nothing to resample).

    Raises:
        ValueError: no target, a row without ``single_step``, sources with different
            numbers of seeds, or ``resamples`` / ``level`` out of range.
    """
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(
            f"resamples must be >= 1 and level in (0, 1), got {resamples} and {level}"
        )
    if not rows:
        raise ValueError("no target rows to resample")
    tables = []  # per target: (-d per source, (sources, seeds) Dice)
    for name, row in rows.items():
        steps = row.get("single_step")
        if not isinstance(steps, Mapping) or not steps:
            raise ValueError(f"target {name}: its row has no single_step sources")
        scores = [-float(step["distance"]) for step in steps.values()]
        dice = [list(map(float, step["dice_per_seed"])) for step in steps.values()]
        if len({len(values) for values in dice}) != 1:
            raise ValueError(
                f"target {name}: every source needs the same number of seeds, got "
                f"{sorted({len(values) for values in dice})}"
            )
        tables.append((scores, np.asarray(dice, dtype=np.float64)))
    counts = {table.shape[1] for _, table in tables}
    if len(counts) != 1:
        raise ValueError(f"targets were measured over different seeds: {counts}")
    count = counts.pop()
    if count < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        drawn = rng.integers(0, count, size=count)
        values.append(
            np.mean(
                [
                    spearman(scores, table[:, drawn].mean(axis=1).tolist())
                    for scores, table in tables
                ]
            )
        )
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return {
        "low": float(low),
        "high": float(high),
        "level": level,
        "resamples": resamples,
        "seeds": count,
    }


def _percent(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, float) else MISSING


def _cell(value: object, digits: int = 3) -> str:
    if not is_number(value):
        return MISSING
    return f"{value:.{digits}f}" if math.isfinite(value) else MISSING


def _mapping(value: object, key: str) -> Mapping[str, object]:
    inner = value.get(key) if isinstance(value, Mapping) else None
    return inner if isinstance(inner, Mapping) else {}


def _nodes(value: object) -> str:
    if isinstance(value, list):
        return " → ".join(map(str, value))
    return str(value) if isinstance(value, str) else MISSING


def _seeds(value: object) -> str:
    if isinstance(value, list) and value:
        return ", ".join(map(str, value))
    return MISSING


def _random_nodes(value: object) -> str:
    """One random path per seed, separated by commas; past three, the count.

    Example:
        >>> _random_nodes([["A", "T"], ["B", "T"], ["C", "T"], ["D", "T"]])
        'A → T, B → T, C → T and 1 more (every draw is in the JSON)'
    """
    if not isinstance(value, list) or not value:
        return MISSING
    shown = ", ".join(_nodes(nodes) for nodes in value[:RANDOM_PATHS_SHOWN])
    hidden = len(value) - RANDOM_PATHS_SHOWN
    return shown + (
        f" and {hidden} more (every draw is in the JSON)" if hidden > 0 else ""
    )


def format_affinity_table(document: Mapping[str, object]) -> str:
    """Markdown table of an ``affinity`` benchmark document.

    One row per target and a mean row: Dice per strategy and the Spearman; then the
    chosen paths, the calibration, the targets and the machine. A dash for a value
    that is absent or nan.
    """
    lines = [
        f"| target | {' | '.join(HEADERS)} | Spearman(-d, Dice) |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    targets = _mapping(document, "targets")
    rows = [(name, row) for name, row in targets.items() if isinstance(row, Mapping)]
    for name, row in [*rows, ("**mean**", _mapping(document, "mean"))]:
        cells = [_cell(row.get(key)) for key in (*COLUMNS, "spearman")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append("")
    for name, row in rows:
        chosen = _mapping(row, "chosen")
        lines.append(
            f"- {name}: chosen {_nodes(chosen.get('path'))}; paper "
            f"{_nodes(chosen.get('paper_path'))}; affinity-best "
            f"{_nodes(chosen.get('direct_affinity_best'))}; oracle "
            f"{_nodes(chosen.get('direct_oracle_best'))}; random "
            f"{_random_nodes(chosen.get('random_paths'))}."
        )
    lines.append("")
    weights = _mapping(document, "weights")
    calibration = _mapping(document, "calibration")
    if calibration:
        held = _mapping(calibration, "held_out_spearman")
        held_text = ", ".join(f"{n} {_cell(v)}" for n, v in held.items())
        two = _mapping(calibration, "two_term_fit")
        two_text = (
            f"; the paper's two terms alone fit a = {_cell(two.get('image_weight'))}, "
            f"b = {_cell(two.get('label_weight'))}: {_cell(two.get('spearman'))}"
            if two
            else ""
        )
        lines.append(
            f"Calibrated a = {_cell(calibration.get('image_weight'))}, b = "
            f"{_cell(calibration.get('label_weight'))}, c = "
            f"{_cell(calibration.get('polarity_weight', 0.0))}: mean Spearman "
            f"{_cell(calibration.get('spearman_fitted'))} (defaults a = b = 1, c = 0: "
            f"{_cell(calibration.get('spearman_defaults'))}{two_text}); fitted on the "
            "same one-step Dice it is scored on"
            + (f"; fitted on the other targets: {held_text}." if held else ".")
        )
    elif weights:
        lines.append(
            f"Weights a = {_cell(weights.get('image_weight'))}, b = "
            f"{_cell(weights.get('label_weight'))}, c = "
            f"{_cell(weights.get('polarity_weight', 0.0))} (not calibrated in this "
            "run)."
        )
    interval = _mapping(document, "spearman_interval")
    if interval:
        lines.append(
            f"Spearman over the seeds: {_percent(interval.get('level'))} interval "
            f"[{_cell(interval.get('low'))}, {_cell(interval.get('high'))}] "
            f"(bootstrap of the {interval.get('seeds', '?')} train.seed values, "
            f"{interval.get('resamples', '?')} draws, at these weights)."
        )
    paper = _mapping(document, "paper_form")
    if paper:
        paper_weights = _mapping(paper, "weights")
        paper_mean = _mapping(paper, "mean")
        paper_interval = _mapping(paper, "spearman_interval")
        lines.append(
            "The paper's two-term form (c = 0) at a = "
            f"{_cell(paper_weights.get('image_weight'))}, b = "
            f"{_cell(paper_weights.get('label_weight'))} on the same Dice: mean "
            f"Spearman {_cell(paper_mean.get('spearman'))}"
            + (
                f" (interval [{_cell(paper_interval.get('low'))}, "
                f"{_cell(paper_interval.get('high'))}])"
                if paper_interval
                else ""
            )
            + f", its chosen path {_cell(paper_mean.get('path'))}, direct from its "
            f"affinity-best source {_cell(paper_mean.get('direct_affinity_best'))}."
        )
    reference = _mapping(document, "mean").get("spearman_factor_levels")
    if isinstance(reference, float) and math.isfinite(reference):
        per_target = ", ".join(
            f"{name} {_cell(row.get('spearman_factor_levels'))}" for name, row in rows
        )
        lines.append(
            "Reference: the generator's own factor distance (appearance plus anatomy "
            "levels apart, which no site publishes) ranks the same one-step Dice at "
            f"Spearman {_cell(reference)} ({per_target})."
        )
    met = _mapping(document, "targets_met")
    if met:
        beats = bool(met.get("path_beats_direct_affinity_best"))
        rho = bool(met.get("spearman_at_least_0.6"))
        lines.append(
            "Targets (chosen path above direct affinity-best on average; Spearman ≥ "
            f"{TARGET_SPEARMAN}): {'met' if beats and rho else 'not met'} (path "
            f"{'above' if beats else 'not above'} direct, Spearman "
            f"{'≥' if rho else '<'} {TARGET_SPEARMAN})."
        )
    recipe = _mapping(document, "recipe")
    lines.append(
        f"Recipe: {recipe.get('scratch_epochs', '?')} epochs from scratch, "
        f"{recipe.get('finetune_epochs', '?')} epochs at learning rate "
        f"{recipe.get('finetune_learning_rate', '?')} per transfer step; "
        f"{recipe.get('target_labelled_cases', '?')} labelled cases per target; "
        f"every Dice a mean over train.seed {_seeds(document.get('seeds'))}. "
        f"Measured on {document.get('machine', 'an unknown machine')} in "
        f"{_cell(document.get('seconds'), 0)} s."
    )
    return "\n".join(lines)


def parse_target_cases(text: str) -> int:
    """``--target-cases``: an integer from 1 to the intermediates' labelled cases.

    Extra targets are intermediates cut to the target's count, so it cannot exceed
    theirs.

    Example:
        >>> parse_target_cases("5")
        5

    Raises:
        argparse.ArgumentTypeError: not an integer, or out of range.
    """
    intermediate = CHAIN_CASES[1]
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--target-cases must be an integer, got {text!r}"
        ) from None
    if not 1 <= count <= intermediate:
        raise argparse.ArgumentTypeError(
            f"--target-cases must be in [1, {intermediate}] (extra targets are "
            f"intermediates with {intermediate} labelled cases, cut to the target's "
            f"count), got {count}"
        )
    return count


def add_affinity_options(command: argparse.ArgumentParser) -> None:
    """The ``affinity`` subcommand's own options."""
    command.add_argument(
        "--calibrate",
        action="store_true",
        help="fit a, b and c (the polarity term's weight) to the measured transfer "
        "Dice and write them into --pyproject (the run config reads them from there)",
    )
    command.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    command.add_argument(
        "--target-cases",
        type=parse_target_cases,
        default=CHAIN_CASES[2],
        help="labelled training cases of the generated federation's target (every "
        "extra target is cut to the same); at most the intermediates' "
        f"{CHAIN_CASES[1]}; default {CHAIN_CASES[2]}",
    )
    command.add_argument(
        "--targets",
        default=",".join(EXTRA_TARGETS),
        help="comma-separated extra target sites (labels cut to the federation "
        f"target's count); default {','.join(EXTRA_TARGETS)}; '' for none",
    )
    command.add_argument(
        "--seeds",
        type=parse_seeds,
        default=DEFAULT_SEEDS,
        help="comma-separated train.seed values; every Dice is the mean over them "
        f"(each seed retrains every path); default {','.join(map(str, DEFAULT_SEEDS))}",
    )
    command.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 = torch's default (1 avoids oversubscription on "
        "a CPU shared with other work)",
    )


def run_affinity_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``affinity`` subcommand from its parsed arguments; the document."""
    started = time.perf_counter()
    config = build_affinity_config(overrides)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    landmark, intermediate, _ = CHAIN_CASES
    target = args.target_cases
    federation = args.federation_dir or ensure_chain_federation(
        args.cache_dir,
        seed=config.federation.synthetic_seed,
        num_train_cases=landmark,
        num_intermediate_cases=intermediate,
        num_target_cases=target,
        progress=log_progress,
    )
    document: dict[str, object] = {
        "machine": describe_machine(),
        "federation": str(federation),
    }
    document.update(
        run_affinity(
            config,
            federation_dir=federation,
            targets=[name.strip() for name in args.targets.split(",") if name.strip()],
            seeds=args.seeds,
            calibrate=args.calibrate,
            pyproject=args.pyproject if args.calibrate else None,
        )
    )
    document["seconds"] = time.perf_counter() - started
    return document
