"""The ``semisup`` benchmark: UG-MCL against its baselines at few labelled cases.

At each labelled fraction (10% and 20% of a site's labelled cases; the rest of its
training cases count as unlabelled), it trains four students from the same seeded
start: the supervised baseline on the labelled part alone, a plain mean teacher,
UG-MCL (docs/methods.md#ug-mcl), and the fully supervised upper bound (every labelled
case labelled; the same for every fraction, so it is trained once per setting). Each is
trained in two settings: *central*, one site for ``semisup.iterations`` steps, scored
on that site's evaluation labels; and *federated*, every site (``semisup.sites``) for
``semisup.rounds`` FedAvg rounds of ``semisup.local-iterations`` steps, each site
keeping its own teacher, scored as the mean over the sites of the averaged student's
Dice on each site's evaluation labels. Every site step is
:func:`core.semisup.job.run_semisup_round`, the ClientApp's ``train.semisup`` job, and
the students are averaged by Flower's own FedAvg aggregation
(:func:`flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords` weighted by
``num-examples``), as ``server/phases/semisup.py`` averages the sites' replies.
This module owns the run, its JSON document and the table between the
``<!-- benchmark:semisup -->`` markers of ``docs/semisup-benchmark.md``; the command
line is ``simulations.benchmark``.

``--seeds`` repeats everything at several ``train.seed`` values (which cases stay
labelled, the initial weights, the batches, noise and dropout) and reports the mean,
with each seed's Dice beside it; ``--merge`` joins documents of the same setup run
at different seeds in separate processes (:func:`merge_semisup_documents`). At this
scale one seed cannot rank the methods (issue 6, measured on the central 20% setting,
site A):

- the consistency terms barely train the student: with the paper's lambda <= 0.1,
  ramped over the 300 steps, the gradient of lambda (L_intra + L_cross) has a median
  norm of 0.01-0.4% of the supervised gradient's for mean teacher and 0.07-1.8% for
  UG-MCL (rising to the end), and mean teacher with lambda = 0 scores 0.896 where
  lambda = 0.1 scores 0.896 (supervised 0.853, same seed). A single seed's gap
  between variants is then mostly a different random stream, not the unlabelled
  images;
- which one or two cases stay labelled, and the random stream, move one run's Dice
  by 0.02-0.05 (seeds 0-2: supervised 0.853/0.858/0.875, mean teacher
  0.896/0.847/0.869, UG-MCL 0.862/0.873/0.899).

UG-MCL's supervised loss adds the SDF terms, whose gradient through
``sigmoid(-1500 SDF)`` makes its update exceed ``semisup.max-grad-norm`` (1.0) on
about half of the steps (2-3% for the baselines), so its steps are shorter; without
the clip the distance head saturates (Dice 0.849 against 0.862, seed 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from core import protocol
from core.coerce import is_number
from core.config import (
    ConfigValue,
    RunConfig,
    SemisupVariant,
    load_default_config,
    to_flat,
)
from core.data.dataset import list_site_dirs
from core.logs import Countdown, Progress
from core.semisup.dual_task import (
    keep_local_norm,
    norm_state_names,
    segmentation_weights,
)
from core.semisup.job import (
    SemisupData,
    build_student,
    initial_student_weights,
    load_semisup_data,
    run_semisup_round,
)
from core.training.evaluation import evaluate_predictors
from core.training.networks import Arrays
from server.records import from_array_record, to_array_record
from simulations.benchmark.output import (
    describe_machine,
    leave_one_out_federation,
    log_progress,
    parse_seeds,
    read_document,
    with_seed,
)

SEMISUP_MARKER: Final = "benchmark:semisup"
# The benchmark's scale: about 15 minutes on 2 CPU cores (UG-MCL's nine teacher
# passes per step are most of it). Build its config with build_semisup_config.
# semisup.learning-rate 0.05: SGD at the pyproject's 0.01 leaves the fully supervised
# model visibly short of convergence in 300 steps from scratch; 0.05 is the same for
# every variant. semisup.sdf-weight 0.3 (DTC's SDF regression; docs/methods.md):
# with separate heads and k = 1500, the Dice on sigmoid(-k SDF) alone gives the
# distance head almost no gradient, so without it the cross-task term pulls the
# segmentation towards an untrained mask (it is the pyproject default now, as is
# semisup.max-grad-norm 1.0, which keeps that term from saturating the head).
SEMISUP_RUN_CONFIG: Final[dict[str, ConfigValue]] = {
    "data.image-size": 32,
    "data.max-slices-per-case": 0,
    "model.channels": "16,32,64",
    "model.strides": "2,2",
    "semisup.iterations": 300,  # central steps
    "semisup.rounds": 6,  # federated: rounds x local iterations = the central steps
    "semisup.local-iterations": 50,
    "semisup.labelled-batch": 4,
    "semisup.unlabelled-batch": 4,
    "semisup.learning-rate": 0.05,
    "semisup.sdf-weight": 0.3,
}
FRACTIONS: Final = (0.1, 0.2)
TARGET_FRACTION: Final = 0.2  # the targets are stated at 20% labels
TARGET_GAP: Final = 0.6  # UG-MCL recovers at least this share of the gap
SETTINGS: Final = ("central", "federated")
# Document key -> the variant trained, and whether every labelled case stays labelled.
VARIANTS: Final[dict[str, tuple[SemisupVariant, bool]]] = {
    "supervised": (SemisupVariant.SUPERVISED, False),
    "mean_teacher": (SemisupVariant.MEAN_TEACHER, False),
    "ugmcl": (SemisupVariant.UGMCL, False),
    "full": (SemisupVariant.SUPERVISED, True),
}
COLUMNS: Final = ("supervised", "mean_teacher", "ugmcl", "full")
GAP_METHODS: Final = ("mean_teacher", "ugmcl")
MISSING: Final = "—"


def build_semisup_config(overrides: Mapping[str, ConfigValue]) -> RunConfig:
    """Load the defaults with :data:`SEMISUP_RUN_CONFIG`, then ``overrides``, on top.

    Raises:
        ValueError: an override names an unknown key or breaks a config rule.
    """
    return load_default_config(**{**SEMISUP_RUN_CONFIG, **overrides})


def fraction_key(fraction: float) -> str:
    """The document key of a labelled fraction.

    Example:
        >>> fraction_key(0.1), fraction_key(0.25)
        ('0.1', '0.25')
    """
    return f"{fraction:g}"


def parse_fractions(text: str) -> tuple[float, ...]:
    """``--fractions``: comma-separated labelled fractions, each in (0, 1).

    Example:
        >>> parse_fractions("0.1,0.2")
        (0.1, 0.2)

    Raises:
        argparse.ArgumentTypeError: a value is not a number in (0, 1), or none given.
    """
    fractions = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(
                f"labelled fraction {item!r} must be a number in (0, 1); 1 is the "
                "fully supervised upper bound, reported with every fraction"
            )
        fractions.append(value)
    if len({fraction_key(value) for value in fractions}) != len(fractions):
        raise argparse.ArgumentTypeError(f"repeated labelled fraction in {text!r}")
    return tuple(fractions)


def gap_recovered(*, supervised: float, method: float, full: float) -> float:
    """Share of the supervised-to-full Dice gap that ``method`` recovers.

    ``(method - supervised) / (full - supervised)``: 1 reaches the upper bound, 0
    does no better than the supervised baseline, negative does worse. nan when the
    gap is not positive (the upper bound is not above the baseline) or a value is nan.

    Example:
        >>> round(gap_recovered(supervised=0.6, method=0.75, full=0.8), 3)
        0.75
        >>> gap_recovered(supervised=0.8, method=0.85, full=0.8)
        nan
    """
    gap = full - supervised
    if not gap > 0 or math.isnan(method):
        return math.nan
    return (method - supervised) / gap


def parse_settings(text: str) -> tuple[str, ...]:
    """``--settings``: comma-separated names among :data:`SETTINGS`.

    Example:
        >>> parse_settings("federated, central")
        ('federated', 'central')

    Raises:
        argparse.ArgumentTypeError: an unknown or repeated name, or none given.
    """
    names = tuple(part.strip() for part in text.split(","))
    unknown = [name for name in names if name not in SETTINGS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"settings {text!r}: each must be one of {', '.join(SETTINGS)}, once"
        )
    return names


def _with_fraction(config: RunConfig, fraction: float) -> RunConfig:
    return dataclasses.replace(
        config,
        semisup=dataclasses.replace(config.semisup, labelled_fraction=fraction),
    )


def _score(site_dir: Path, student: Arrays, config: RunConfig) -> float:
    """Dice of the student's segmentation on the site's evaluation labels."""
    scores = evaluate_predictors(
        site_dir,
        {"student": segmentation_weights(student)},
        {"student": [("student", 1.0)]},
        config,
        with_hd95=False,
    )
    return scores["student"].dice


def train_central(
    site_dir: Path,
    config: RunConfig,
    *,
    variant: SemisupVariant,
    data: SemisupData,
    progress: Progress = log_progress,
) -> dict[str, object]:
    """Train one student at one site for ``semisup.iterations`` steps; score it.

    Returns:
        ``dice`` on the site's evaluation labels, the labelled and unlabelled case
        counts, the mean losses, ``num_examples`` and ``seconds``.
    """
    started = time.perf_counter()
    steps = config.semisup.iterations
    outcome = run_semisup_round(
        site_dir,
        initial_student_weights(config),
        config,
        teacher_weights=None,
        start_step=0,
        total_steps=steps,
        iterations=steps,
        variant=variant,
        data=data,
    )
    result = outcome.result
    return {
        "dice": _score(site_dir, outcome.student, config),
        "num_labelled": outcome.num_labelled,
        "num_unlabelled": outcome.num_unlabelled,
        "supervised_loss": result.supervised_loss,
        "consistency_loss": result.consistency_loss,
        "cross_task_loss": result.cross_task_loss,
        "certain_fraction": result.certain_fraction,
        "clipped_fraction": result.clipped_fraction,
        "num_examples": result.num_examples,
        "seconds": time.perf_counter() - started,
    }


def average_students(students: Sequence[tuple[Arrays, int]]) -> Arrays:
    """FedAvg of ``(student, num_examples)`` pairs, by Flower's own aggregation.

    Each pair becomes the record a site's reply carries (one ArrayRecord, one
    MetricRecord with ``num-examples``) and :func:`aggregate_arrayrecords` averages
    them weighted by ``num-examples``, as ``FedAvg(weighted_by_key="num-examples")``
    does in ``server/phases/semisup.py``.
    """
    records = [
        RecordDict(
            {
                "student": to_array_record(student),
                "metrics": MetricRecord({protocol.FEDAVG_WEIGHT_KEY: num_examples}),
            }
        )
        for student, num_examples in students
    ]
    return from_array_record(
        aggregate_arrayrecords(records, protocol.FEDAVG_WEIGHT_KEY)
    )


def train_federated(
    site_dirs: Mapping[str, Path],
    config: RunConfig,
    *,
    variant: SemisupVariant,
    data: Mapping[str, SemisupData],
    label: str,
    progress: Progress = log_progress,
) -> dict[str, object]:
    """FedAvg rounds of one student across the sites, each keeping its own teacher.

    Every round each site trains the averaged student for
    ``semisup.local-iterations`` steps (global step numbering over all rounds) with
    the teacher it kept; the students are averaged weighted by samples seen, and
    every site scores the average on its evaluation labels. With
    ``semisup.local-norm`` each site keeps its own normalisation entries (FedBN) and
    scores its personalised model, the average with those entries; with
    ``semisup.teacher`` ``global`` no site keeps a teacher (the job restarts it).

    Returns:
        ``dice`` (mean over the sites after the last round), ``sites`` (each site's
        Dice then), ``rounds`` (the mean Dice after each round), ``site_rounds``
        (each site's Dice after each round), ``clipped_fraction`` (the share of all
        site steps on which the gradient clip bound) and ``site_clipped`` (each
        site's share), the labelled case counts per site and ``seconds``.
    """
    started = time.perf_counter()
    rounds, local = config.semisup.rounds, config.semisup.local_iterations
    total = rounds * local
    student = initial_student_weights(config)
    teachers: dict[str, Arrays] = {}
    own_norm: dict[str, Arrays] = {}
    names = norm_state_names(build_student(config))
    history: list[float] = []
    site_history: dict[str, list[float]] = {name: [] for name in site_dirs}
    clipped: dict[str, list[float]] = {name: [] for name in site_dirs}
    dice: dict[str, float] = {}
    countdown = Countdown(rounds)
    for round_number in range(1, rounds + 1):
        replies: list[tuple[Arrays, int]] = []
        for name, site_dir in site_dirs.items():
            outcome = run_semisup_round(
                site_dir,
                student,
                config,
                teacher_weights=teachers.get(name),
                start_step=(round_number - 1) * local,
                total_steps=total,
                iterations=local,
                variant=variant,
                data=data[name],
                own_norm=own_norm.get(name),
            )
            teachers[name] = outcome.teacher
            norm = outcome.own_norm(config)
            if norm is not None:
                own_norm[name] = norm
            clipped[name].append(outcome.result.clipped_fraction)
            replies.append((outcome.student, outcome.result.num_examples))
        student = average_students(replies)
        dice = {
            name: _score(
                site_dir, keep_local_norm(student, own_norm.get(name), names), config
            )
            for name, site_dir in site_dirs.items()
        }
        for name, value in dice.items():
            site_history[name].append(value)
        history.append(float(np.mean(list(dice.values()))))
        progress(
            f"[semisup] federated {label}: mean Dice {history[-1]:.3f}, round "
            f"{countdown.tick()}"
        )
    return {
        "dice": history[-1] if history else math.nan,
        "sites": dice,
        "rounds": history,
        "site_rounds": site_history,
        "clipped_fraction": float(np.mean([v for c in clipped.values() for v in c]))
        if rounds
        else 0.0,
        "site_clipped": {
            name: float(np.mean(values)) if values else 0.0
            for name, values in clipped.items()
        },
        "num_labelled": {name: data[name].num_labelled for name in site_dirs},
        "seconds": time.perf_counter() - started,
    }


def _dice(run: Mapping[str, object]) -> float:
    value = run["dice"]
    assert isinstance(value, float)
    return value


def _summarise(
    runs: Mapping[str, Mapping[str, Mapping[str, object]]],
) -> dict[str, dict[str, float]]:
    """Fraction -> variant -> Dice, from fraction -> variant -> run detail."""
    return {
        fraction: {key: _dice(run) for key, run in variants.items()}
        for fraction, variants in runs.items()
    }


def _gaps(dice: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {
        fraction: {
            method: gap_recovered(
                supervised=row["supervised"], method=row[method], full=row["full"]
            )
            for method in GAP_METHODS
        }
        for fraction, row in dice.items()
    }


def _targets(
    dice: Mapping[str, Mapping[str, float]], gaps: Mapping[str, Mapping[str, float]]
) -> dict[str, bool] | None:
    """The issue's targets at :data:`TARGET_FRACTION`; None when it was not run."""
    key = fraction_key(TARGET_FRACTION)
    if key not in dice:
        return None
    return {
        "ugmcl_recovers_60pct_of_gap": bool(gaps[key]["ugmcl"] >= TARGET_GAP),
        "ugmcl_beats_mean_teacher": bool(
            dice[key]["ugmcl"] > dice[key]["mean_teacher"]
        ),
    }


Runs = dict[str, dict[str, dict[str, dict[str, object]]]]


def _run_seed(
    config: RunConfig,
    *,
    available: Mapping[str, Path],
    central: str,
    federated_sites: Mapping[str, Path],
    fractions: Sequence[float],
    settings: Sequence[str],
    progress: Progress,
) -> Runs:
    """Every variant at every fraction, in each of ``settings``, at one seed.

    Returns:
        setting -> fraction -> variant -> run detail (``full`` in every fraction).
    """
    runs: Runs = {s: {} for s in settings}
    full: dict[str, dict[str, object]] = {}
    prefix = f"seed {config.train.seed}: "
    for fraction in (*fractions, 1.0):
        key = fraction_key(fraction)
        fraction_config = _with_fraction(config, fraction)
        needed = {
            **(federated_sites if "federated" in settings else {}),
            **({central: available[central]} if "central" in settings else {}),
        }
        data = {
            name: load_semisup_data(path, fraction_config)
            for name, path in needed.items()
        }
        variants = (
            {"full": VARIANTS["full"][0]}
            if fraction == 1.0
            else {k: v for k, (v, everything) in VARIANTS.items() if not everything}
        )
        for name, variant in variants.items():
            label = f"{prefix}{name} at {key}" if fraction < 1.0 else f"{prefix}full"
            trained: dict[str, dict[str, object]] = {}
            if "central" in settings:
                trained["central"] = train_central(
                    available[central],
                    fraction_config,
                    variant=variant,
                    data=data[central],
                    progress=progress,
                )
                progress(
                    f"[semisup] central {label}: Dice "
                    f"{_dice(trained['central']):.3f} "
                    f"({trained['central']['seconds']:.0f} s)"
                )
            if "federated" in settings:
                trained["federated"] = train_federated(
                    federated_sites,
                    fraction_config,
                    variant=variant,
                    data={name: data[name] for name in federated_sites},
                    label=label,
                    progress=progress,
                )
            for setting, run in trained.items():
                if fraction == 1.0:
                    full[setting] = run
                else:
                    runs[setting].setdefault(key, {})[name] = run
    for setting in settings:
        for row in runs[setting].values():
            row["full"] = full[setting]
    return runs


def _mean_over_seeds(
    per_seed: Sequence[Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """Fraction -> variant -> mean Dice over the seeds' fraction -> variant tables."""
    first = per_seed[0]
    return {
        fraction: {
            variant: float(np.mean([table[fraction][variant] for table in per_seed]))
            for variant in row
        }
        for fraction, row in first.items()
    }


def summarise_seeds(
    detail: Mapping[str, Runs], settings: Sequence[str]
) -> dict[str, object]:
    """The document's summary from every seed's runs (seed -> setting -> ... -> run).

    Returns:
        For each of ``settings``, fraction -> variant -> mean Dice over the seeds;
        ``per_seed`` (each seed's Dice, in ``detail`` order), ``gap_recovered`` and
        ``targets_met`` (from the means).
    """
    document: dict[str, object] = {}
    per_seed: dict[str, object] = {}
    gaps: dict[str, object] = {}
    targets: dict[str, object] = {}
    for setting in settings:
        tables = [_summarise(runs[setting]) for runs in detail.values()]
        dice = _mean_over_seeds(tables)
        setting_gaps = _gaps(dice)
        document[setting] = dice
        per_seed[setting] = {
            fraction: {
                variant: [table[fraction][variant] for table in tables]
                for variant in row
            }
            for fraction, row in dice.items()
        }
        gaps[setting] = setting_gaps
        targets[setting] = _targets(dice, setting_gaps)
    document["per_seed"] = per_seed
    document["gap_recovered"] = gaps
    document["targets_met"] = targets
    return document


def run_semisup(
    config: RunConfig,
    *,
    federation_dir: Path,
    fractions: Sequence[float] = FRACTIONS,
    seeds: Sequence[int] = (0,),
    central_site: str | None = None,
    settings: Sequence[str] = SETTINGS,
    progress: Progress = log_progress,
) -> dict[str, object]:
    """Run every variant at every fraction, central and federated, at every seed.

    A seed is ``train.seed``: it draws which cases stay labelled, the initial
    weights, the batches, the noise and the dropout. Every variant of one seed starts
    from the same draw, so the comparison between variants is paired; the Dice values
    are means over the seeds (with one or two labelled cases, which cases are drawn
    moves a run's Dice by more than the differences between methods).

    Args:
        config: the run config (see :func:`build_semisup_config` for its scale);
            its ``train.seed`` is replaced by each of ``seeds``.
        federation_dir: a folder of site folders.
        fractions: labelled fractions, each in (0, 1).
        seeds: the ``train.seed`` values to average over.
        central_site: the site of the central setting; default the first site in
            folder order.
        settings: ``central``, ``federated`` or both; the document has a key for
            each one run (a longer schedule can then be measured centrally alone).
        progress: called with one line per run and per federated round.

    Returns:
        The JSON-able document: ``central`` and ``federated`` (fraction -> variant
        -> Dice, the mean over the seeds), ``per_seed`` (setting -> fraction ->
        variant -> each seed's Dice, in ``seeds`` order), ``gap_recovered`` (setting
        -> fraction -> mean teacher's and UG-MCL's share of the gap, from the means),
        ``targets_met`` (setting -> the issue's two targets at 20%, or None),
        ``detail`` (seed -> setting -> fraction -> variant -> every run's numbers),
        the seeds, the sites, the steps, the flat run config and ``seconds``.

    Raises:
        ValueError: a fraction outside (0, 1), no seed or a negative one, no
            setting or an unknown one, an unknown central site, or
            ``semisup.sites`` naming a site the federation lacks.
        SiteDataError: a site has no labelled training or no evaluation case.
    """
    started = time.perf_counter()
    bad = [fraction for fraction in fractions if not 0.0 < fraction < 1.0]
    if bad or not fractions:
        raise ValueError(
            f"labelled fractions must lie in (0, 1), got {list(fractions)}"
        )
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"seeds must be distinct non-negative integers, got {list(seeds)}"
        )
    if not settings or any(setting not in SETTINGS for setting in settings):
        raise ValueError(
            f"settings must be some of {list(SETTINGS)}, got {list(settings)}"
        )
    settings = [setting for setting in SETTINGS if setting in settings]
    available = {path.name: path for path in list_site_dirs(federation_dir)}
    central = central_site or next(iter(available))
    wanted = list(config.semisup.sites) or list(available)
    unknown = [name for name in (central, *wanted) if name not in available]
    if unknown:
        raise ValueError(
            f"sites {unknown} not in {federation_dir} "
            f"(sites there: {sorted(available)})"
        )
    federated_sites = {name: available[name] for name in wanted}
    semisup = config.semisup
    described = {
        "central": f"central: site {central}, {semisup.iterations} steps",
        "federated": (
            f"federated: {len(federated_sites)} sites, {semisup.rounds} rounds x "
            f"{semisup.local_iterations} steps"
        ),
    }
    progress(
        f"[semisup] {'; '.join(described[setting] for setting in settings)}; "
        f"fractions {list(fractions)}; seeds {list(seeds)}"
    )
    detail = {
        str(seed): _run_seed(
            with_seed(config, seed),
            available=available,
            central=central,
            federated_sites=federated_sites,
            fractions=fractions,
            settings=settings,
            progress=progress,
        )
        for seed in seeds
    }
    document = summarise_seeds(detail, settings)
    document["detail"] = detail
    document["seeds"] = list(seeds)
    document["settings"] = list(settings)
    document["central_site"] = central
    document["federated_sites"] = list(federated_sites)
    document["fractions"] = [fraction_key(fraction) for fraction in fractions]
    document["steps"] = {
        **({"central": semisup.iterations} if "central" in settings else {}),
        **(
            {"rounds": semisup.rounds, "local_iterations": semisup.local_iterations}
            if "federated" in settings
            else {}
        ),
    }
    document["config"] = to_flat(config)
    document["seconds"] = time.perf_counter() - started
    return document


# What documents merged by merge_semisup_documents must share: the same runs, told
# apart only by train.seed.
_SAME_SETUP: Final = (
    "machine",
    "federation",
    "settings",
    "fractions",
    "central_site",
    "federated_sites",
    "steps",
)


def merge_semisup_documents(
    documents: Sequence[Mapping[str, object]],
) -> dict[str, object]:
    """One document from runs of the same setup at different seeds.

    The semisup benchmark is single-process; ``--seeds`` runs the seeds one after
    another. A long schedule is faster as one process per seed (``--threads 1``
    each, on a machine with a core per process), and this joins their documents as
    if one run had made them: the means, per-seed lists, gaps and targets are
    recomputed from the joined ``detail``. ``seconds`` is the sum of the runs'
    (``merged_seconds`` lists each).

    Raises:
        ValueError: fewer than two documents, a document that is not a semisup
            benchmark document, documents whose setup differs (machine, federation,
            settings, fractions, sites, steps or any run-config value but
            ``train.seed``), or a seed in more than one document.
    """
    if len(documents) < 2:
        raise ValueError(f"merging needs at least two documents, got {len(documents)}")
    for index, document in enumerate(documents):
        missing = [
            key
            for key in (*_SAME_SETUP, "seeds", "detail", "config")
            if key not in document
        ]
        if missing:
            raise ValueError(
                f"document {index} is not a semisup benchmark document "
                f"(no {', '.join(missing)})"
            )
    first = documents[0]
    for index, document in enumerate(documents[1:], start=1):
        differs = [key for key in _SAME_SETUP if document[key] != first[key]]
        config, first_config = document["config"], first["config"]
        assert isinstance(config, Mapping)
        assert isinstance(first_config, Mapping)
        differs += [
            key
            for key in sorted(set(config) | set(first_config))
            if key != "train.seed" and config.get(key) != first_config.get(key)
        ]
        if differs:
            raise ValueError(
                f"document {index} was run with another setup than document 0 "
                f"(differs in {', '.join(differs)})"
            )
    seeds: list[int] = []
    detail: dict[str, Runs] = {}
    for document in documents:
        document_seeds, runs = document["seeds"], document["detail"]
        assert isinstance(document_seeds, list)
        assert isinstance(runs, Mapping)
        repeated = sorted(set(seeds) & set(document_seeds))
        if repeated:
            raise ValueError(f"seeds {repeated} are in more than one document")
        seeds += document_seeds
        detail.update(runs)
    settings = first["settings"]
    assert isinstance(settings, list)
    merged: dict[str, object] = {
        "machine": first["machine"],
        "federation": first["federation"],
    }
    merged.update(summarise_seeds(detail, settings))
    merged["detail"] = detail
    merged["seeds"] = seeds
    for key in _SAME_SETUP[2:]:
        merged[key] = first[key]
    merged["config"] = {**first["config"], "train.seed": seeds[0]}  # type: ignore[dict-item]
    seconds = [document.get("seconds") for document in documents]
    merged["merged_seconds"] = seconds
    merged["seconds"] = float(
        sum(value for value in seconds if isinstance(value, int | float))
    )
    return merged


def _cell(value: object, digits: int = 3) -> str:
    if not is_number(value):
        return MISSING
    return f"{value:.{digits}f}" if math.isfinite(value) else MISSING


def _percent(value: object) -> str:
    if not is_number(value):
        return MISSING
    return f"{value:.0%}" if math.isfinite(value) else MISSING


def _mapping(value: object, key: str) -> Mapping[str, object]:
    inner = value.get(key) if isinstance(value, Mapping) else None
    return inner if isinstance(inner, Mapping) else {}


def _describe_targets(document: Mapping[str, object]) -> str | None:
    targets = _mapping(document, "targets_met")
    parts = []
    for setting in SETTINGS:
        met = targets.get(setting)
        if not isinstance(met, Mapping):
            continue
        gap = met.get("ugmcl_recovers_60pct_of_gap")
        beats = met.get("ugmcl_beats_mean_teacher")
        parts.append(
            f"{setting}: {'met' if gap and beats else 'not met'} (gap "
            f"{'≥' if gap else '<'} {TARGET_GAP:.0%}, "
            f"{'above' if beats else 'not above'} mean teacher)"
        )
    if not parts:
        return None
    return (
        f"Targets at {TARGET_FRACTION:.0%} labels (UG-MCL recovers at least "
        f"{TARGET_GAP:.0%} of the gap and beats mean teacher): "
        + "; ".join(parts)
        + "."
    )


def _largest_seed_range(document: Mapping[str, object]) -> float:
    """Largest max - min over the seeds of one cell's Dice; nan when there is none."""
    ranges = [
        max(values) - min(values)
        for setting in SETTINGS
        for row in _mapping(_mapping(document, "per_seed"), setting).values()
        if isinstance(row, Mapping)
        for values in row.values()
        if isinstance(values, list)
        and values
        and all(isinstance(value, int | float) for value in values)
    ]
    return max(ranges, default=math.nan)


def _describe_clipping(document: Mapping[str, object]) -> str | None:
    """The share of steps the gradient clip bound, per setting and variant.

    The mean over the seeds, fractions and (federated) sites of each run's
    ``clipped_fraction``; None for documents from before it was recorded.
    """
    shares: dict[str, dict[str, list[float]]] = {}
    for runs in _mapping(document, "detail").values():
        for setting, fractions in (runs if isinstance(runs, Mapping) else {}).items():
            for row in (fractions if isinstance(fractions, Mapping) else {}).values():
                for variant, run in (row if isinstance(row, Mapping) else {}).items():
                    value = (
                        run.get("clipped_fraction")
                        if isinstance(run, Mapping)
                        else None
                    )
                    if is_number(value):
                        shares.setdefault(setting, {}).setdefault(variant, []).append(
                            float(value)
                        )
    if not shares:
        return None
    parts = [
        f"{setting}: "
        + ", ".join(
            f"{variant.replace('_', ' ')} {np.mean(values):.0%}"
            for variant, values in shares[setting].items()
        )
        for setting in SETTINGS
        if setting in shares
    ]
    return (
        "Share of steps on which the gradient clip (semisup.max-grad-norm, the same "
        "rule for every variant) bound: " + "; ".join(parts) + "."
    )


def format_semisup_table(document: Mapping[str, object]) -> str:
    """Markdown table of a ``semisup`` benchmark document.

    One row per setting and labelled fraction present; Dice per variant and the share
    of the supervised-to-full gap that mean teacher and UG-MCL recover. A dash for a
    value that is absent or nan.
    """
    lines = [
        "| setting | labelled | supervised | mean teacher | UG-MCL | full | "
        "gap recovered: mean teacher | gap recovered: UG-MCL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        rows = _mapping(document, setting)
        gaps = _mapping(_mapping(document, "gap_recovered"), setting)
        for fraction, row in sorted(rows.items(), key=lambda item: float(item[0])):
            dice = row if isinstance(row, Mapping) else {}
            gap = _mapping(gaps, fraction)
            cells = [
                *(_cell(dice.get(column)) for column in COLUMNS),
                *(_percent(gap.get(method)) for method in GAP_METHODS),
            ]
            lines.append(f"| {setting} | {float(fraction):.0%} | {' | '.join(cells)} |")
    lines.append("")
    steps = _mapping(document, "steps")
    sites = document.get("federated_sites")
    ran = document.get("settings", list(SETTINGS))  # older documents ran both
    if steps and isinstance(sites, list) and isinstance(ran, list):
        described = {
            "central": f"Central: site {document.get('central_site', '?')}, "
            f"{steps.get('central')} steps",
            "federated": f"federated: {len(sites)} sites "
            f"({', '.join(map(str, sites))}), {steps.get('rounds')} FedAvg rounds x "
            f"{steps.get('local_iterations')} steps",
        }
        parts = [text for setting, text in described.items() if setting in ran]
        sentence = "; ".join(parts)
        lines.append(
            sentence[:1].upper()
            + sentence[1:]
            + ". Dice on the evaluation labels"
            + (" (federated: mean over the sites)." if "federated" in ran else ".")
        )
    seeds = document.get("seeds")
    if isinstance(seeds, list) and seeds:
        spread = _largest_seed_range(document)
        lines.append(
            f"Dice is the mean over {len(seeds)} seed(s) (train.seed "
            f"{', '.join(map(str, seeds))}: which cases are labelled, the initial "
            "weights, the batches); each seed's Dice is in the JSON (`per_seed`)"
            + (
                f"; one cell's seeds differ by up to {spread:.3f}."
                if len(seeds) > 1 and math.isfinite(spread)
                else "."
            )
        )
    targets = _describe_targets(document)
    if targets is not None:
        lines.append(targets)
    clipping = _describe_clipping(document)
    if clipping is not None:
        lines.append(clipping)
    merged = document.get("merged_seconds")
    lines.append(
        f"Measured on {document.get('machine', 'an unknown machine')} in "
        f"{_cell(document.get('seconds'), 0)} s"
        + (
            f" (the sum of {len(merged)} runs merged with --merge)."
            if isinstance(merged, list)
            else "."
        )
    )
    return "\n".join(lines)


def add_semisup_options(command: argparse.ArgumentParser) -> None:
    """The ``semisup`` subcommand's own options."""
    command.add_argument(
        "--fractions",
        type=parse_fractions,
        default=FRACTIONS,
        help="comma-separated labelled fractions in (0, 1); default 0.1,0.2",
    )
    command.add_argument(
        "--seeds",
        type=parse_seeds,
        default=(0,),
        help="comma-separated train.seed values; Dice is the mean over them (each "
        "seed redraws the labelled cases, weights and batches); default 0",
    )
    command.add_argument(
        "--settings",
        type=parse_settings,
        default=SETTINGS,
        help="comma-separated settings to run: central, federated; default both",
    )
    command.add_argument(
        "--central-site",
        default=None,
        help="the site of the central setting; default the first site",
    )
    command.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="train nothing: join semisup documents of the same setup run at "
        "different --seeds (e.g. one process per seed) into one at --out",
    )
    command.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 = torch's default. On a CPU shared with other "
        "work, 1 avoids the thread oversubscription that slows 2 threads tenfold",
    )


def run_semisup_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``semisup`` subcommand from its parsed arguments; return the document.

    Raises:
        ValueError: ``--merge`` with ``--set`` overrides (a merge trains nothing),
            or documents :func:`merge_semisup_documents` rejects.
    """
    if args.merge is not None:
        if overrides:
            raise ValueError(
                f"--merge trains nothing, so --set {', '.join(overrides)} would be "
                "ignored; the documents keep the config they were run with"
            )
        return merge_semisup_documents([read_document(path) for path in args.merge])
    started = time.perf_counter()
    config = build_semisup_config(overrides)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    federation = leave_one_out_federation(args, config)
    document: dict[str, object] = {
        "machine": describe_machine(),
        "federation": str(federation),
    }
    document.update(
        run_semisup(
            config,
            federation_dir=federation,
            fractions=args.fractions,
            seeds=args.seeds,
            central_site=args.central_site,
            settings=args.settings,
        )
    )
    document["seconds"] = time.perf_counter() - started
    return document
