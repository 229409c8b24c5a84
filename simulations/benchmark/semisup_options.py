"""The ``semisup-options`` benchmark: federated UG-MCL options against its baselines.

Issue 22 item 4: at one labelled fraction (20% by default), federated across every
site, it trains the supervised baseline, a plain mean teacher, UG-MCL as the
defaults configure it, and UG-MCL with each named option of docs/methods.md#ug-mcl
(:data:`ARMS`: the gradient clip by network part, the distance branch's
student-teacher term, a global teacher, FedBN local normalisation), every arm from
the same seeded start and the same batches as far as its variant draws them. Each arm
is :func:`simulations.benchmark.semisup.train_federated`, so every site step is the
ClientApp's ``train.semisup`` job and the students are averaged by Flower's FedAvg
aggregation. Every variant runs under the same gradient clip
(``semisup.max-grad-norm``: by default the L2 norm of the whole update), and each
arm reports the share of its steps on which the clip bound.

A run's Dice is the mean over the last ``--last-rounds`` rounds of the sites' mean
Dice (each site scores the averaged student on its evaluation labels; a FedBN arm
scores each site's personalised model, reported apart as it is no single model).
Arms are compared by paired differences against the supervised baseline and mean
teacher, per seed (``train.seed``: the labelled cases, weights, batches), with a 95%
percentile-bootstrap interval over the seeds (:func:`core.metrics
.paired_bootstrap_interval`); with two seeds that interval only spans the two
differences, and the repository's rule for a claim is five seeds. ``--merge`` joins
documents of the same setup run at different seeds.

This module owns the run, its JSON document and the table between the
``<!-- benchmark:semisup-options -->`` markers of
``docs/semisup-options-benchmark.md``; the command line is ``simulations.benchmark``.
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

from core.coerce import is_number
from core.config import ConfigValue, RunConfig, SemisupVariant
from core.data.dataset import list_site_dirs
from core.logs import Progress
from core.metrics import paired_bootstrap_interval
from core.semisup.job import load_semisup_data
from simulations.benchmark.output import (
    describe_machine,
    leave_one_out_federation,
    log_progress,
    parse_seeds,
    read_document,
    with_seed,
)
from simulations.benchmark.semisup import (
    build_semisup_config,
    fraction_key,
    train_federated,
)

SEMISUP_OPTIONS_MARKER: Final = "benchmark:semisup-options"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Arm:
    """One trained student: a variant and the run-config keys it sets."""

    variant: SemisupVariant
    overrides: Mapping[str, ConfigValue] = dataclasses.field(default_factory=dict)
    personalised: bool = False  # every site scores its own model (FedBN)


# In the order they run (the baselines first, so a stopped run still compares).
ARMS: Final[dict[str, Arm]] = {
    "supervised": Arm(variant=SemisupVariant.SUPERVISED),
    "mean-teacher": Arm(variant=SemisupVariant.MEAN_TEACHER),
    "ugmcl": Arm(variant=SemisupVariant.UGMCL),
    "ugmcl+clip-parts": Arm(
        variant=SemisupVariant.UGMCL, overrides={"semisup.clip-scope": "parts"}
    ),
    "ugmcl+distance-consistency": Arm(
        variant=SemisupVariant.UGMCL,
        overrides={"semisup.distance-consistency": True},
    ),
    "ugmcl+global-teacher": Arm(
        variant=SemisupVariant.UGMCL, overrides={"semisup.teacher": "global"}
    ),
    # FedBN personalises every variant: its baselines are personalised too.
    "supervised+local-norm": Arm(
        variant=SemisupVariant.SUPERVISED,
        overrides={"semisup.local-norm": True},
        personalised=True,
    ),
    "mean-teacher+local-norm": Arm(
        variant=SemisupVariant.MEAN_TEACHER,
        overrides={"semisup.local-norm": True},
        personalised=True,
    ),
    "ugmcl+local-norm": Arm(
        variant=SemisupVariant.UGMCL,
        overrides={"semisup.local-norm": True},
        personalised=True,
    ),
}
BASELINES: Final = ("supervised", "mean-teacher")
# A personalised UG-MCL arm is compared with these too, and the table shows them.
PERSONALISED_BASELINES: Final = ("supervised+local-norm", "mean-teacher+local-norm")
DEFAULT_FRACTION: Final = 0.2
DEFAULT_LAST_ROUNDS: Final = 5
MISSING: Final = "—"


def parse_arms(text: str) -> tuple[str, ...]:
    """``--arms``: comma-separated names among :data:`ARMS`, run in ARMS order.

    Example:
        >>> parse_arms("ugmcl, supervised")
        ('supervised', 'ugmcl')

    Raises:
        argparse.ArgumentTypeError: an unknown or repeated name, or none given.
    """
    names = [part.strip() for part in text.split(",")]
    unknown = [name for name in names if name not in ARMS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"arms {text!r}: each must be one of {', '.join(ARMS)}, once"
        )
    return tuple(name for name in ARMS if name in names)


def arm_config(
    overrides: Mapping[str, ConfigValue], arm: str, *, fraction: float, seed: int
) -> RunConfig:
    """The benchmark's config with ``overrides``, then the arm's keys, at a seed.

    Raises:
        ValueError: an override that the arm sets too (the arm would silently win),
            or one the config rejects.
    """
    clash = sorted(set(overrides) & set(ARMS[arm].overrides))
    if clash:
        raise ValueError(f"--set {', '.join(clash)} is what arm {arm!r} sets itself")
    config = build_semisup_config(
        {
            **overrides,
            **ARMS[arm].overrides,
            "semisup.labelled-fraction": fraction,
        }
    )
    return with_seed(config, seed)


def last_rounds_mean(values: Sequence[float], count: int) -> float:
    """Mean of the last ``count`` values (all of them when there are fewer).

    Example:
        >>> last_rounds_mean([0.1, 0.2, 0.4, 0.6], 2)
        0.5
    """
    if not values:
        return math.nan
    return float(np.mean(values[-count:]))


def _summarise_run(run: Mapping[str, object], last: int) -> dict[str, object]:
    rounds = run["rounds"]
    site_rounds = run["site_rounds"]
    assert isinstance(rounds, list)
    assert isinstance(site_rounds, Mapping)
    return {
        "last_mean": last_rounds_mean(rounds, last),
        "site_last_mean": {
            name: last_rounds_mean(values, last) for name, values in site_rounds.items()
        },
    }


def _float(value: object) -> float:
    assert isinstance(value, int | float)
    return float(value)


def _floats(value: object) -> list[float]:
    assert isinstance(value, list)
    return [_float(item) for item in value]


def _site_values(value: object) -> dict[str, float]:
    assert isinstance(value, Mapping)
    return {str(name): _float(item) for name, item in value.items()}


Detail = Mapping[str, Mapping[str, Mapping[str, object]]]


def _paired(
    detail: Detail, summary: Mapping[str, Mapping[str, object]], arm: str, base: str
) -> dict[str, object]:
    """``arm`` - ``base``: per seed, the seeds' bootstrap, per site, seed x site."""
    first, second = (
        _floats(summary[arm]["per_seed"]),
        _floats(summary[base]["per_seed"]),
    )
    interval = paired_bootstrap_interval(first, second, resamples=10000)
    sites_first = _site_values(summary[arm]["sites"])
    sites_second = _site_values(summary[base]["sites"])
    pairs = [
        (
            _site_values(detail[seed][arm]["site_last_mean"])[name],
            _site_values(detail[seed][base]["site_last_mean"])[name],
        )
        for seed in detail
        for name in sites_first
    ]
    seed_site = paired_bootstrap_interval(
        [a for a, _ in pairs], [b for _, b in pairs], resamples=10000
    )
    return {
        "per_seed": [a - b for a, b in zip(first, second, strict=True)],
        "mean": interval.mean,
        "low": interval.low,
        "high": interval.high,
        "site_mean": {
            name: sites_first[name] - sites_second[name] for name in sites_first
        },
        "seed_site": {
            "mean": seed_site.mean,
            "low": seed_site.low,
            "high": seed_site.high,
            "count": seed_site.count,
        },
    }


def summarise_options(
    detail: Detail, *, arms: Sequence[str], last: int
) -> dict[str, object]:
    """Means over the seeds and paired differences, from seed -> arm -> run.

    Returns:
        ``arms`` (arm -> ``last_mean`` over the seeds, ``per_seed``, ``sites`` (each
        site's last-rounds mean over the seeds), ``clipped_fraction``,
        ``personalised``) and ``paired`` (each arm but a baseline -> baseline (and
        for a personalised UG-MCL arm the personalised baselines too) ->
        ``per_seed`` differences, ``mean``, ``low``/``high`` (95% bootstrap over
        seeds), ``site_mean`` (each site's mean difference), and ``seed_site``: the
        same bootstrap over seed x site pairs, which are not independent replicates).
    """
    summary: dict[str, dict[str, object]] = {}
    for arm in arms:
        runs = [detail[seed][arm] for seed in detail]
        site_means = [_site_values(run["site_last_mean"]) for run in runs]
        summary[arm] = {
            "last_mean": float(np.mean([_float(run["last_mean"]) for run in runs])),
            "per_seed": [_float(run["last_mean"]) for run in runs],
            "sites": {
                name: float(np.mean([sites[name] for sites in site_means]))
                for name in site_means[0]
            },
            "clipped_fraction": float(
                np.mean([_float(run["clipped_fraction"]) for run in runs])
            ),
            "personalised": ARMS[arm].personalised,
        }
    paired = {
        arm: {
            base: _paired(detail, summary, arm, base)
            for base in (
                *BASELINES,
                *(
                    PERSONALISED_BASELINES
                    if ARMS[arm].personalised
                    and ARMS[arm].variant is SemisupVariant.UGMCL
                    else ()
                ),
            )
            if base in arms
        }
        for arm in arms
        if arm not in BASELINES
    }
    return {"arms": summary, "paired": paired}


def run_semisup_options(
    overrides: Mapping[str, ConfigValue],
    *,
    federation_dir: Path,
    arms: Sequence[str] = tuple(ARMS),
    seeds: Sequence[int] = (0,),
    fraction: float = DEFAULT_FRACTION,
    last: int = DEFAULT_LAST_ROUNDS,
    progress: Progress = log_progress,
) -> dict[str, object]:
    """Train every arm federated at every seed; the document without the machine.

    Raises:
        ValueError: a fraction outside (0, 1), no seed, ``last`` < 1, an unknown
            arm, or ``semisup.sites`` naming a site the federation lacks.
    """
    started = time.perf_counter()
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the labelled fraction must lie in (0, 1), got {fraction}")
    if not seeds or last < 1 or any(arm not in ARMS for arm in arms):
        raise ValueError(
            f"need seeds, --last-rounds >= 1 and arms among {list(ARMS)}; got "
            f"{list(seeds)}, {last}, {list(arms)}"
        )
    base = arm_config(overrides, "ugmcl", fraction=fraction, seed=seeds[0])
    available = {path.name: path for path in list_site_dirs(federation_dir)}
    wanted = list(base.semisup.sites) or list(available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise ValueError(f"sites {unknown} not in {federation_dir}")
    sites = {name: available[name] for name in wanted}
    semisup = base.semisup
    progress(
        f"[semisup-options] {len(sites)} sites, {semisup.rounds} rounds x "
        f"{semisup.local_iterations} steps at {fraction:.0%} labels; arms "
        f"{list(arms)}; seeds {list(seeds)}"
    )
    detail: dict[str, dict[str, dict[str, object]]] = {}
    for seed in seeds:
        seeded = with_seed(base, seed)
        data = {name: load_semisup_data(path, seeded) for name, path in sites.items()}
        detail[str(seed)] = {}
        for arm in arms:
            config = arm_config(overrides, arm, fraction=fraction, seed=seed)
            run = train_federated(
                sites,
                config,
                variant=ARMS[arm].variant,
                data=data,
                label=f"seed {seed}: {arm}",
                progress=progress,
            )
            run.update(_summarise_run(run, last))
            detail[str(seed)][arm] = run
            progress(
                f"[semisup-options] seed {seed}: {arm}: last-{last}-round mean Dice "
                f"{_float(run['last_mean']):.3f}, clip bound on "
                f"{_float(run['clipped_fraction']):.0%} of steps "
                f"({_float(run['seconds']):.0f} s)"
            )
    document: dict[str, object] = dict(summarise_options(detail, arms=arms, last=last))
    document.update(
        {
            "detail": detail,
            "seeds": list(seeds),
            "arm_names": list(arms),
            "site_names": list(sites),
            "fraction": fraction_key(fraction),
            "last_rounds": last,
            "steps": {
                "rounds": semisup.rounds,
                "local_iterations": semisup.local_iterations,
            },
            "overrides": dict(overrides),
            "seconds": time.perf_counter() - started,
        }
    )
    return document


_SAME_SETUP: Final = (
    "machine",
    "federation",
    "site_names",
    "fraction",
    "last_rounds",
    "steps",
    "overrides",
)


def merge_options_documents(
    documents: Sequence[Mapping[str, object]],
) -> dict[str, object]:
    """One document from runs of the same setup at other seeds or with other arms.

    The runs are joined by seed and arm (e.g. seeds 0 and 1 of every arm, and an arm
    added later at both seeds); every seed must end up with every arm.

    Raises:
        ValueError: fewer than two documents, a document that is not one of this
            benchmark's, a setup that differs, an arm at a seed in more than one
            document, or a seed without one of the arms.
    """
    if len(documents) < 2:
        raise ValueError(f"merging needs at least two documents, got {len(documents)}")
    for index, document in enumerate(documents):
        missing = [k for k in (*_SAME_SETUP, "detail", "seeds") if k not in document]
        if missing:
            raise ValueError(
                f"document {index} is not a semisup-options document (no "
                f"{', '.join(missing)})"
            )
    first = documents[0]
    for index, document in enumerate(documents[1:], start=1):
        differs = [key for key in _SAME_SETUP if document[key] != first[key]]
        if differs:
            raise ValueError(
                f"document {index} was run with another setup than document 0 "
                f"(differs in {', '.join(differs)})"
            )
    detail: dict[str, dict[str, dict[str, object]]] = {}
    seeds: list[int] = []
    for document in documents:
        document_seeds, runs = document["seeds"], document["detail"]
        assert isinstance(document_seeds, list)
        assert isinstance(runs, Mapping)
        seeds += [seed for seed in document_seeds if seed not in seeds]
        for seed, arms_run in runs.items():
            assert isinstance(arms_run, Mapping)
            joined = detail.setdefault(str(seed), {})
            repeated = sorted(set(joined) & set(arms_run))
            if repeated:
                raise ValueError(
                    f"seed {seed}: arms {repeated} are in more than one document"
                )
            joined.update(arms_run)
    arms = [arm for arm in ARMS if any(arm in runs for runs in detail.values())]
    lacking = {
        seed: [arm for arm in arms if arm not in runs] for seed, runs in detail.items()
    }
    if any(lacking.values()):
        raise ValueError(
            "every seed needs every arm; missing: "
            + ", ".join(f"seed {s}: {', '.join(a)}" for s, a in lacking.items() if a)
        )
    detail = {str(seed): detail[str(seed)] for seed in seeds}
    last = first["last_rounds"]
    assert isinstance(last, int)
    merged: dict[str, object] = dict(summarise_options(detail, arms=arms, last=last))
    merged.update({key: first[key] for key in _SAME_SETUP})
    merged["arm_names"] = arms
    merged["detail"] = detail
    merged["seeds"] = seeds
    seconds = [document.get("seconds") for document in documents]
    merged["merged_seconds"] = seconds
    merged["seconds"] = float(sum(s for s in seconds if isinstance(s, int | float)))
    return merged


def _cell(value: object, digits: int = 3) -> str:
    if not is_number(value) or not math.isfinite(value):
        return MISSING
    return f"{value:.{digits}f}"


def _mapping(value: object, key: str) -> Mapping[str, object]:
    inner = value.get(key) if isinstance(value, Mapping) else None
    return inner if isinstance(inner, Mapping) else {}


def _difference(entry: Mapping[str, object]) -> str:
    if not entry:
        return MISSING
    return (
        f"{_cell(entry.get('mean'), 3)} [{_cell(entry.get('low'), 3)}, "
        f"{_cell(entry.get('high'), 3)}]"
    )


def format_options_table(document: Mapping[str, object]) -> str:
    """Markdown table of a ``semisup-options`` document.

    One row per arm: last-rounds mean Dice (and each seed's), each site's, the share
    of steps the clip bound, and the paired differences against the supervised
    baseline and mean teacher with their 95% bootstrap intervals over the seeds.
    """
    arms = _mapping(document, "arms")
    paired = _mapping(document, "paired")
    sites = document.get("site_names")
    names = [str(name) for name in sites] if isinstance(sites, list) else []
    lines = [
        "| arm | Dice | per seed | "
        + " | ".join(names)
        + (" | " if names else "")
        + "clip bound | Δ supervised [95% CI] | Δ mean teacher [95% CI] |",
        "|---" * (6 + len(names)) + "|",
    ]
    for arm, entry in arms.items():
        if not isinstance(entry, Mapping):
            continue
        per_seed = entry.get("per_seed")
        seeds_text = (
            " / ".join(_cell(value) for value in per_seed)
            if isinstance(per_seed, list)
            else MISSING
        )
        site_cells = [_cell(_mapping(entry, "sites").get(name)) for name in names]
        clipped = entry.get("clipped_fraction")
        label = f"{arm} (personalised)" if entry.get("personalised") else arm
        against = _mapping(paired, arm)
        differences = [
            _difference(_mapping(against, personalised)) + " (personalised)"
            if personalised in against
            else _difference(_mapping(against, base))
            for base, personalised in zip(
                BASELINES, PERSONALISED_BASELINES, strict=True
            )
        ]
        lines.append(
            f"| {label} | {_cell(entry.get('last_mean'))} | {seeds_text} | "
            + "".join(f"{cell} | " for cell in site_cells)
            + (f"{clipped:.0%}" if is_number(clipped) else MISSING)
            + f" | {differences[0]} | {differences[1]} |"
        )
    lines.append("")
    steps = _mapping(document, "steps")
    seeds = document.get("seeds")
    seed_list = seeds if isinstance(seeds, list) else []
    lines.append(
        f"Federated, {len(names)} sites, {steps.get('rounds')} FedAvg rounds x "
        f"{steps.get('local_iterations')} steps, "
        f"{float(str(document.get('fraction', 'nan'))):.0%} labels; Dice is the mean "
        f"over the last {document.get('last_rounds')} rounds of the sites' mean Dice "
        f"(per site: that site's), then over {len(seed_list)} seed(s) (train.seed "
        f"{', '.join(map(str, seed_list))}). Personalised: each site scores the "
        "average with its own normalisation parameters, not one shared model; a "
        "personalised UG-MCL arm's Δ is against the personalised baseline when it "
        "ran (marked so; the JSON has both). Clip "
        "bound: share of the site steps on which semisup.max-grad-norm scaled the "
        "update down. Δ: paired difference (arm - baseline) over the seeds, 95% "
        "percentile bootstrap; with fewer than 5 seeds it is no claim."
    )
    overrides = _mapping(document, "overrides")
    if overrides:
        lines.append(
            "Settings: "
            + ", ".join(f"`{key}={value}`" for key, value in overrides.items())
            + "."
        )
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


def add_options_options(command: argparse.ArgumentParser) -> None:
    """The ``semisup-options`` subcommand's own options."""
    command.add_argument(
        "--arms",
        type=parse_arms,
        default=tuple(ARMS),
        help=f"comma-separated arms among {', '.join(ARMS)}; default all",
    )
    command.add_argument(
        "--seeds",
        type=parse_seeds,
        default=(0,),
        help="comma-separated train.seed values; default 0",
    )
    command.add_argument(
        "--fraction",
        type=float,
        default=DEFAULT_FRACTION,
        help="the labelled fraction, in (0, 1); default 0.2",
    )
    command.add_argument(
        "--last-rounds",
        type=int,
        default=DEFAULT_LAST_ROUNDS,
        help="a run's Dice is the mean over its last this many rounds; default 5",
    )
    command.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="train nothing: join documents of the same setup run at different "
        "--seeds into one at --out",
    )
    command.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 = torch's default",
    )


def run_options_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``semisup-options`` subcommand; return the document.

    Raises:
        ValueError: ``--merge`` with ``--set`` overrides, or what
            :func:`run_semisup_options` or :func:`merge_options_documents` rejects.
    """
    if args.merge is not None:
        if overrides:
            raise ValueError("--merge trains nothing, so --set would be ignored")
        return merge_options_documents([read_document(path) for path in args.merge])
    started = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    federation = leave_one_out_federation(args, build_semisup_config(overrides))
    document: dict[str, object] = {
        "machine": describe_machine(),
        "federation": str(federation),
    }
    document.update(
        run_semisup_options(
            overrides,
            federation_dir=federation,
            arms=args.arms,
            seeds=args.seeds,
            fraction=args.fraction,
            last=args.last_rounds,
        )
    )
    document["seconds"] = time.perf_counter() - started
    return document
