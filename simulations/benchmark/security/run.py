"""The ``security`` benchmark: what an adversarial coordinator reconstructs at a site.

Issue 20, item 8, reconstruction classes 2 and 3: against one site of a tiny
synthetic federation, through the site's real ClientApp (guard, ledger and handlers
included; :mod:`simulations.benchmark.security.attacks`), run each attack and measure
the share of pixels of the site's label maps it recovers, against guesses without any
query (the majority class; another site's majority map) and against the ceiling of a map
shared by every case (the site's own majority map;
:mod:`simulations.benchmark.security.scoring`), with the queries, requests and runs it
used:

- ``evaluate`` (class 2a): single-pixel predictors on the evaluation cases, decoded
  per case where the site scores one slice per case, else as whole volumes
  (:mod:`simulations.benchmark.security.volume`);
- ``consensus`` (class 2b): the same cells as ``train.consensus`` label sources,
  decoded as ``evaluate``'s are (one slice per case, or whole volumes);
- ``lftm`` (class 2b): crafted cell models as ``query.lftm`` candidates;
- ``profile`` (class 3): one ``query.profile`` with a fine ``affinity.label-grid``;
  ``profile-two-labelled``: the same at a site with two labelled cases.

The site runs with its policy: the safe defaults, or ``--policy FILE`` (passed as the
node config's ``policy``). ``--stage`` names where the figures go in the document:
``before`` (the undefended code), ``after`` (the defended code, default policy),
``after-dp`` (a policy that requires DP) or ``after-<name>`` (a candidate setting);
the other stages already in ``--out`` are kept, so they sit side by side. Each
attack class gets a fresh site state folder (ledger, accountant, query book), so one
class's spending does not starve the next. This module owns the options, the
federations, the attack runners, the JSON document and its table; the command line
is ``simulations.benchmark``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import numpy as np
import torch

from core.config import ConfigValue, read_default_run_config
from core.data.dataset import index_site, list_site_dirs, read_federation_target
from core.data.synthetic import (
    EVALUATION_CASES_PER_SITE,
    GENERATOR_VERSION,
    build_site_styles,
    generate_case,
    write_case,
    write_federation,
)
from core.logs import Countdown
from core.privacy.ledger import Ledger
from core.privacy.limits import CANDIDATES, LABEL_SOURCES, PREDICTORS
from simulations.benchmark.output import describe_machine, log_progress
from simulations.benchmark.security.attacks import (
    CellMeasurements,
    SiteChannel,
    ask_consensus,
    ask_evaluate,
    measure_cells,
)
from simulations.benchmark.security.decode import BoolMap, score_maps
from simulations.benchmark.security.fallbacks import AttackPlan
from simulations.benchmark.security.queries import (
    ProfileMeasurement,
    ask_lftm,
    measure_profile,
    reconstruct_volume,
)
from simulations.benchmark.security.scoring import (
    MapsOf,
    baselines,
    consensus_maps_of,
    evaluate_maps_of,
    labelled_volumes,
    other_site,
    reconstruct_cells,
    score_volume_attack,
    single_slices,
    training_maps_of,
)

SECURITY_MARKER: Final = "benchmark:security"
# Stages: the undefended code, the defended code under its default policy, under a
# policy requiring DP, and under candidate settings (after-<name>).
STAGE_PATTERN: Final = re.compile(r"before|after(-[a-z0-9][a-z0-9-]*)?")
FIRST_STAGES: Final = ("before", "after", "after-dp")
ATTACKS: Final = ("evaluate", "consensus", "lftm", "profile", "profile-two-labelled")
# What the document's figures mean (written into it, for whoever reads the JSON).
DEFINITIONS: Final = {
    "recovered_share": "share of the target maps' pixels whose class the attacker's "
    "reconstruction gets right (reconstructed maps matched to true ones by the best "
    "assignment: the site never names its cases); where the attack has several "
    "decoders ('decoders'), the best of them, chosen with hindsight (an upper bound)",
    "majority_share": "the same share for predicting the majority class (background) "
    "everywhere: what an attacker gets without the site",
    "prior_share": "the same share for predicting, for every case, the pixelwise "
    "majority of another site's maps: a guess from labels the coordinator might hold",
    "ceiling_share": "the same share for predicting, for every case, the pixelwise "
    "majority of the site's own maps: the most any reconstruction that gives every "
    "case the same map can get (a leak of the site's mean label map); only telling "
    "the site's cases apart goes beyond it",
    "dice": "mean foreground Dice of the matched reconstructed and true maps",
    "queries": "predictors (evaluate), label-source sets (consensus), candidates "
    "(lftm) or profiles the site computed and answered",
    "requests": "messages sent to the site, query.hello and refused ones included",
    "runs": "run ids the attack used (a new one whenever a per-run cap bound)",
    "seconds": "wall time of the attack, offline crafting of its models included",
    "offline": "crafting the attacker's pattern models (done before any request)",
    "target_map": "the site's label maps exactly as the channel scores them: whole "
    "volumes for evaluate and consensus (after), the run's slices for LFTM, each "
    "labelled case's volume for a profile",
    "middle_slice": "for whole-volume targets: the best reconstruction's share on "
    "the middle slice alone (the slice the before stage's targets were)",
}
# What the coordinator chooses for every attack: one slice per case (the middle one),
# so a case's Dice is a single map's where the site lets the run decide; the
# cheapest consensus job; the CPU.
SECURITY_RUN_CONFIG: Final[dict[str, ConfigValue]] = {
    "data.max-slices-per-case": 1,
    "train.device": "cpu",
    "consensus.epochs": 1,
    "consensus.refine-epochs": 1,
    "consensus.baselines": False,
    "consensus.atlases": False,
}
# Training cases beyond the first get generator indices past the base federation's
# (its one training case and six evaluation cases), so the base cases stay the same.
_EXTRA_CASE_INDEX: Final = 1 + EVALUATION_CASES_PER_SITE


def ensure_security_federation(
    cache_dir: Path, *, seed: int, extra_labelled: int = 0, extra_unlabelled: int = 0
) -> Path:
    """Three synthetic sites, one labelled training case each (and 6 evaluation).

    One labelled case is the issue's class-3 setting (a profile over one case); the
    six evaluation cases are what ``evaluate`` and ``consensus`` average over. A
    defended site refuses every aggregate over fewer than ``limits.min-cases`` cases,
    so the after stages add training cases to every site: ``extra_unlabelled`` images
    without a label (consensus and LFTM read them; a profile's label term stays at
    one case), ``extra_labelled`` labelled ones (a profile's label term over two).
    The base cases are the same in every variant.
    """
    suffix = "".join(
        f"-{kind}{count}"
        for kind, count in (("l", extra_labelled), ("u", extra_unlabelled))
        if count
    )
    folder = Path(cache_dir) / f"security-v{GENERATOR_VERSION}-seed{seed}{suffix}"
    if folder.exists():
        return folder
    log_progress(f"generating the security benchmark federation in {folder}")
    staging = folder.with_name(f".{folder.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    write_federation(staging, seed=seed, num_sites=3, num_train_cases=1)
    styles = build_site_styles(3)
    for site_index, style in enumerate(styles):
        for extra in range(extra_labelled + extra_unlabelled):
            index = _EXTRA_CASE_INDEX + extra
            case_id = f"{style.name.lower()}_{index:03d}"
            # core.data.synthetic seeds each case from (seed, site, case) alike.
            rng = np.random.default_rng([seed, site_index, index])
            write_case(
                generate_case(style, rng),
                staging / style.name,
                case_id=case_id,
                training=True,
            )
            if extra >= extra_labelled:
                (staging / style.name / "labelsTr" / f"{case_id}.nii.gz").unlink()
    staging.rename(folder)
    return folder


def _describe_site(site: Path) -> dict[str, int]:
    index = index_site(site)
    return {
        "labelled": len(index.labelled),
        "unlabelled": len(index.unlabelled),
        "evaluation": len(index.evaluation),
    }


def ledger_decisions(state_dir: Path) -> dict[str, int]:
    """How many site ledger entries carry each decision (``released``, ``blocked``)."""
    counts: dict[str, int] = {}
    for entry in Ledger(state_dir / "ledger.jsonl").entries():
        decision = entry.decision.split(":")[0]
        counts[decision] = counts.get(decision, 0) + 1
    return counts


def _cell_costs(measured: CellMeasurements) -> dict[str, object]:
    """What a cell attack asked and what it cost, for its entry."""
    plan, code = measured.plan, measured.plan.code()
    values = list(measured.values.values())
    return {
        "queries": measured.queries,
        "requests": measured.requests,
        "runs": measured.runs,
        "units_charged": measured.units,
        "seconds": round(measured.seconds, 2),
        "offline": measured.crafting,
        "construction": {
            "block": code.block,
            "models_per_predictor": code.digits,
            "base": code.base,
            "cells": code.num_cells,
            "predictors_per_request": plan.predictors_per_request,
            "models_per_request": plan.models_per_request,
            "units_per_run": plan.units_per_run,
            "budget": plan.budget,
            "whole_image": plan.whole_image,
            "final_run_id": plan.run_id,
        },
        "advertised_limits": measured.limits,
        "distinct_values": len({round(v, 12) for v in values}),
        "all_foreground_dice": (
            None if math.isnan(measured.all_foreground) else measured.all_foreground
        ),
        "refusals": list(measured.refusals),
        "adaptations": list(measured.adaptations),
        "stopped": plan.stopped,
    }


def _cell_entry(
    name: str,
    measured: CellMeasurements,
    truth: list[BoolMap],
    *,
    target: str,
    prior: list[BoolMap] | None,
    prior_site: str,
) -> dict[str, object]:
    """A single-slice cell attack's entry: decoded maps scored against the truth."""
    maps, decoding = reconstruct_cells(measured)
    score = score_maps(maps, truth)
    plan, code = measured.plan, measured.plan.code()
    _report(name, score.recovered_share, score.majority_share, measured)
    return {
        "target_map": target,
        "site": {
            "cases": measured.num_cases,
            "slices_per_case": 1,
            "image_size": code.size,
            "model_channels": list(plan.config.model.channels),
        },
        **score.to_dict(),
        **baselines(truth, prior, prior_site),
        **_cell_costs(measured),
        **decoding,
    }


def _report(
    name: str, recovered: float, majority: float, measured: CellMeasurements
) -> None:
    log_progress(
        f"{name}: recovered {recovered:.4f} against majority {majority:.4f} with "
        f"{measured.queries} queries in {measured.requests} requests, "
        f"{measured.runs} runs ({measured.seconds:.0f} s)"
    )


def _scored_entry(
    name: str,
    measured: CellMeasurements,
    maps_of: MapsOf,
    settings: SecuritySettings,
    state: Path,
) -> dict[str, object]:
    """A cell attack's entry, scored as the site scores the cases it released.

    Where the site scores one slice per case (the before stage), the values decode
    into each case's map; where it scores whole volumes (``evaluate`` and
    ``train.consensus`` at a site with the default limits), into the mean
    projection, placed along the slice axis by every strategy of
    :mod:`simulations.benchmark.security.volume`.
    """
    truth = maps_of(settings.site)
    prior, prior_site = _prior(settings.site, maps_of)
    ledger = {"ledger": ledger_decisions(state)}
    if truth[0].shape[0] == 1:
        return (
            _cell_entry(
                name,
                measured,
                single_slices(truth),
                target="the middle slice of each evaluation case, as the site "
                "scores it",
                prior=None if prior is None else single_slices(prior),
                prior_site=prior_site,
            )
            | {"training_cases": _describe_site(settings.site)}
            | ledger
        )
    if prior is None:
        raise ValueError(f"{settings.site.parent}: the attacker needs another site")
    decimals = measured.limits.get("metric-decimals")
    scored = score_volume_attack(measured, truth, prior, decimals=decimals)
    recovered = float(scored.score["recovered_share"])  # type: ignore[arg-type]
    majority = float(scored.score["majority_share"])  # type: ignore[arg-type]
    _report(name, recovered, majority, measured)
    code = measured.plan.code()
    return {
        "target_map": "every slice of each evaluation case, as the site scores it "
        "(whole volumes)",
        "site": {
            "cases": measured.num_cases,
            "slices_per_case": int(truth[0].shape[0]),
            "image_size": code.size,
            "model_channels": list(measured.plan.config.model.channels),
        },
        "training_cases": _describe_site(settings.site),
        **scored.score,
        **baselines(truth, prior, prior_site),
        **_cell_costs(measured),
        **scored.details,
        **ledger,
    }


# -------------------------------------------------------------------- the attacks


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SecuritySettings:
    """One benchmark run's choices (the coordinator's and the benchmark's).

    Attributes:
        site: the attacked site (one labelled training case).
        two_labelled: the same site with two labelled training cases (the
            ``profile-two-labelled`` row), or None to skip that row.
        policy: the site's policy file, or None for the safe defaults.
        run_config: the coordinator's run config (flat).
        image_size: ``evaluate``'s image size.
        consensus_image_size: the consensus and LFTM attacks' image size.
        lftm_block: LFTM's cell side.
        profile_grid: the label grid a profile asks for.
        predictors_per_request: cells one request asks about, before any limit.
    """

    site: Path
    two_labelled: Path | None
    policy: Path | None
    run_config: dict[str, ConfigValue]
    image_size: int
    consensus_image_size: int
    lftm_block: int
    profile_grid: int
    predictors_per_request: int


def _channel(settings: SecuritySettings, site: Path, state: Path) -> SiteChannel:
    return SiteChannel(site_dir=site, state_dir=state, policy=settings.policy)


def _prior(site: Path, maps_of: MapsOf) -> tuple[list[BoolMap] | None, str]:
    other = other_site(site)
    return (None, "") if other is None else (maps_of(other), other.name)


def run_evaluate_attack(settings: SecuritySettings, state: Path) -> dict[str, object]:
    """Class 2a: single-pixel predictors, ``evaluate``'s mean Dice decoded.

    Where the site scores one slice per case (the before stage), the values decode
    into each case's map; where it scores whole volumes, into the mean projection,
    placed along the slice axis by every strategy of
    :mod:`simulations.benchmark.security.volume`.
    """
    flat = {**settings.run_config, "data.image-size": settings.image_size}
    plan = AttackPlan(
        run_config=flat,
        predictors_per_request=settings.predictors_per_request,
        whole_image=True,
    )
    measured = measure_cells(
        _channel(settings, settings.site, state),
        plan,
        ask_evaluate,
        kind=PREDICTORS,
        progress=log_progress,
    )
    maps_of = evaluate_maps_of(measured.plan.run_config, settings.policy)
    return _scored_entry("evaluate", measured, maps_of, settings, state)


def run_consensus_attack(settings: SecuritySettings, state: Path) -> dict[str, object]:
    """Class 2b: a cell's stripe models as label sources; ``label-dice.majority``."""
    flat = {**settings.run_config, "data.image-size": settings.consensus_image_size}
    plan = AttackPlan(run_config=flat, predictors_per_request=1)
    measured = measure_cells(
        _channel(settings, settings.site, state),
        plan,
        ask_consensus,
        kind=LABEL_SOURCES,
        progress=log_progress,
    )
    maps_of = consensus_maps_of(measured.plan.run_config, settings.policy)
    return _scored_entry("consensus", measured, maps_of, settings, state)


def run_lftm_attack(settings: SecuritySettings, state: Path) -> dict[str, object]:
    """Class 2b: one crafted model per cell as ``query.lftm`` candidates.

    LFTM compares a candidate's prediction with its prediction on the masked image;
    labels never enter it (the site reads its training images without labels), and
    for a model that ignores its input the two predictions agree or disagree by
    position alone. The same candidates go to a second site of the federation: equal
    scores there show the values carry nothing of either site.
    """
    flat = {**settings.run_config, "data.image-size": settings.consensus_image_size}
    plan = AttackPlan(
        run_config=flat,
        digits=1,
        block=settings.lftm_block,
        predictors_per_request=settings.predictors_per_request,
    )
    measured = measure_cells(
        _channel(settings, settings.site, state),
        plan,
        ask_lftm,
        kind=CANDIDATES,
        progress=log_progress,
    )
    comparison: dict[str, object] = {}
    other = other_site(settings.site)
    if other is not None:
        elsewhere = measure_cells(
            _channel(settings, other, state / "other"),
            dataclasses.replace(measured.plan, run_id=1, stopped=""),
            ask_lftm,
            kind=CANDIDATES,
            progress=log_progress,
        )
        comparison = {
            "other_site": other.name,
            "same_values_at_other_site": elsewhere.values == measured.values,
        }
    maps_of = training_maps_of(measured.plan.run_config, settings.policy)
    truth = single_slices(maps_of(settings.site))
    prior, prior_site = _prior(settings.site, maps_of)
    measured = dataclasses.replace(measured, num_cases=len(truth))
    counts: dict[str, int] = {}
    for value in measured.values.values():
        counts[f"{value:.6g}"] = counts.get(f"{value:.6g}", 0) + 1
    return _cell_entry(
        "lftm",
        measured,
        truth,
        target="the middle slice of each labelled training case (LFTM reads "
        "training images)",
        prior=None if prior is None else single_slices(prior),
        prior_site=prior_site,
    ) | {
        "training_cases": _describe_site(settings.site),
        "value_counts": counts,
        **comparison,
        "ledger": ledger_decisions(state),
    }


def _profile_entry(
    settings: SecuritySettings, site: Path, state: Path
) -> dict[str, object]:
    """Class 3: one ``query.profile`` at a label grid as fine as the site allows."""
    measured = measure_profile(
        _channel(settings, site, state),
        settings.run_config,
        grid=settings.profile_grid,
        progress=log_progress,
    )
    truths = labelled_volumes(site)
    shape = truths[0].shape
    guess = reconstruct_volume(measured.mean_label_map, shape)
    score = score_maps([guess] * len(truths), truths)
    other = other_site(site)
    prior = None if other is None else labelled_volumes(other)
    log_progress(
        f"profile: recovered {score.recovered_share:.4f} against majority "
        f"{score.majority_share:.4f} with {measured.requests} request(s) at grid "
        f"{measured.grid}"
    )
    return {
        "target_map": "the label volume of each labelled training case, on its own "
        "grid (the attacker is assumed to know the acquisition matrix)",
        "site": {"cases": len(truths), "volume_shape": list(shape)},
        "training_cases": _describe_site(site),
        **score.to_dict(),
        **baselines(truths, prior, "" if other is None else other.name),
        "queries": 1 if measured.grid else 0,
        "requests": measured.requests,
        "runs": 1,
        "seconds": round(measured.seconds, 2),
        "label_grid": measured.grid,
        "label_term": "left out" if measured.mean_label_map is None else "released",
        "num_labelled": measured.num_labelled,
        "epsilon": measured.epsilon,
        # The Gaussian noise on each released map value (a value lies in [0, 1]).
        "label_map_noise_sd": (
            round(noise_sd, 3)
            if (noise_sd := _label_map_noise_sd(measured)) is not None
            else None
        ),
        "refusals": list(measured.refusals),
        "ledger": ledger_decisions(state),
    }


def _label_map_noise_sd(measured: ProfileMeasurement) -> float | None:
    """The noise sd on each released map value: ``z sqrt(G^3) / n`` (None: no map).

    ``core.affinity.profile_noise``: one case moves the ``G^3`` map by at most
    ``sqrt(G^3) / n`` in L2.
    """
    if measured.mean_label_map is None or not measured.num_labelled:
        return None
    size = float(measured.mean_label_map.size)
    return measured.noise_multiplier * math.sqrt(size) / measured.num_labelled


def run_profile_attack(settings: SecuritySettings, state: Path) -> dict[str, object]:
    """Class 3 at the attacked site (one labelled training case)."""
    return _profile_entry(settings, settings.site, state)


def run_profile_two_labelled_attack(
    settings: SecuritySettings, state: Path
) -> dict[str, object]:
    """Class 3 at a site with two labelled cases: the mean of their two maps."""
    if settings.two_labelled is None:
        raise ValueError("profile-two-labelled needs the two-labelled federation")
    return _profile_entry(settings, settings.two_labelled, state)


RUNNERS: Final[dict[str, Callable[[SecuritySettings, Path], dict[str, object]]]] = {
    "evaluate": run_evaluate_attack,
    "consensus": run_consensus_attack,
    "lftm": run_lftm_attack,
    "profile": run_profile_attack,
    "profile-two-labelled": run_profile_two_labelled_attack,
}


def run_security(
    settings: SecuritySettings, attacks: tuple[str, ...]
) -> dict[str, object]:
    """Run ``attacks`` against the site; one stage's part of the document."""
    started = time.perf_counter()
    results = {}
    countdown = Countdown(len(attacks))
    for name in attacks:
        log_progress(f"== attack {name} on site {settings.site.name}")
        with tempfile.TemporaryDirectory(prefix=f"security-{name}-") as state:
            results[name] = RUNNERS[name](settings, Path(state))
        log_progress(f"== attack {name} done, attack {countdown.tick()}")
    policy = settings.policy
    return {
        "machine": describe_machine(),
        "finished": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "seconds": round(time.perf_counter() - started, 1),
        "site": settings.site.name,
        "policy": (
            "safe defaults (no policy file)"
            if policy is None
            else {
                "file": str(policy),
                "sha256": hashlib.sha256(policy.read_bytes()).hexdigest(),
                "text": policy.read_text(),
            }
        ),
        "run_config": settings.run_config,
        "attacks": results,
    }


# ------------------------------------------------------------------- command line


def parse_attacks(text: str) -> tuple[str, ...]:
    """``--attacks``: comma-separated names among :data:`ATTACKS`, in that order.

    Example:
        >>> parse_attacks("profile,evaluate")
        ('evaluate', 'profile')
    """
    names = {item.strip() for item in text.split(",") if item.strip()}
    unknown = sorted(names - set(ATTACKS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--attacks takes some of {', '.join(ATTACKS)}; got {text!r}"
        )
    return tuple(name for name in ATTACKS if name in names)


def parse_stage(text: str) -> str:
    """``--stage``: ``before``, ``after``, ``after-dp`` or ``after-<name>``.

    Example:
        >>> parse_stage("after-decimals2")
        'after-decimals2'
    """
    if STAGE_PATTERN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"--stage takes before, after, after-dp or after-<name> (lower case, "
            f"digits and '-'); got {text!r}"
        )
    return text


def is_stage(key: str) -> bool:
    """Whether a document key is a stage (not ``benchmark`` or ``definitions``)."""
    return STAGE_PATTERN.fullmatch(key) is not None


def add_security_options(command: argparse.ArgumentParser) -> None:
    """The ``security`` subcommand's own options."""
    command.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="the site's policy file (node config 'policy'); default: safe defaults",
    )
    command.add_argument(
        "--stage",
        type=parse_stage,
        default="after",
        help="where the figures go: before, after, after-dp or after-<name>",
    )
    command.add_argument("--attacks", type=parse_attacks, default=ATTACKS)
    command.add_argument("--site", default="", help="site folder name; default: target")
    command.add_argument(
        "--seed", type=int, default=0, help="synthetic federation seed"
    )
    command.add_argument(
        "--image-size", type=int, default=32, help="evaluate's image size"
    )
    command.add_argument(
        "--consensus-image-size",
        type=int,
        default=16,
        help="image size of the consensus and LFTM attacks (one request per cell)",
    )
    command.add_argument("--lftm-block", type=int, default=4, help="LFTM cell side")
    command.add_argument(
        "--profile-grid", type=int, default=64, help="affinity.label-grid asked for"
    )
    command.add_argument(
        "--predictors-per-request",
        type=int,
        default=1024,
        help="cells one evaluate or LFTM request asks about (until a limit binds)",
    )
    command.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default"
    )


def run_security_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``security`` subcommand; keep the other stages already in ``--out``.

    The ``before`` stage attacks the base federation (one labelled training case per
    site); every ``after`` stage the same sites with one unlabelled training image
    more (so a defended site's ``limits.min-cases`` does not refuse consensus, LFTM
    and profiles outright), and a profile also where the second image is labelled.
    ``--federation-dir`` replaces both.
    """
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    before = args.stage == "before"
    if args.federation_dir:
        federation = two_labelled = Path(args.federation_dir)
    else:
        federation = ensure_security_federation(
            args.cache_dir, seed=args.seed, extra_unlabelled=0 if before else 1
        )
        two_labelled = ensure_security_federation(
            args.cache_dir, seed=args.seed, extra_labelled=1
        )
    name = (
        args.site
        or read_federation_target(federation)
        or list_site_dirs(federation)[0].name
    )
    flat = read_default_run_config()
    flat.update(SECURITY_RUN_CONFIG)
    flat.update(overrides)
    settings = SecuritySettings(
        site=federation / name,
        two_labelled=two_labelled / name,
        policy=args.policy,
        run_config=flat,
        image_size=args.image_size,
        consensus_image_size=args.consensus_image_size,
        lftm_block=args.lftm_block,
        profile_grid=args.profile_grid,
        predictors_per_request=args.predictors_per_request,
    )
    stage = run_security(settings, args.attacks)
    document: dict[str, object] = {"benchmark": "security", "definitions": DEFINITIONS}
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        if previous.get("benchmark") == "security":
            document.update({k: v for k, v in previous.items() if is_stage(k)})
    document[args.stage] = merge_stage(document.get(args.stage), stage)
    return _ordered(document)


def _ordered(document: Mapping[str, object]) -> dict[str, object]:
    """The document with its stages in reading order (before, after, after-dp, ...)."""
    stages = sorted(
        (key for key in document if is_stage(key)),
        key=lambda key: (
            FIRST_STAGES.index(key) if key in FIRST_STAGES else len(FIRST_STAGES),
            key,
        ),
    )
    rest = {key: value for key, value in document.items() if not is_stage(key)}
    return rest | {key: document[key] for key in stages}


def merge_stage(previous: object, stage: dict[str, object]) -> dict[str, object]:
    """``stage``, keeping earlier attacks of ``previous`` run against the same setup.

    Rerunning one attack (``--attacks consensus``) replaces only its entry when the
    site, policy and run config are unchanged; otherwise the stage starts anew.
    """
    same = isinstance(previous, Mapping) and all(
        previous.get(key) == stage[key] for key in ("site", "policy", "run_config")
    )
    if not same:
        return stage
    assert isinstance(previous, Mapping)
    attacks = {**previous["attacks"], **stage["attacks"]}  # type: ignore[dict-item]
    return {
        **stage,
        "seconds": round(sum(float(a["seconds"]) for a in attacks.values()), 1),
        "attacks": {name: attacks[name] for name in ATTACKS if name in attacks},
    }


def _refused(row: Mapping[str, object]) -> str:
    """The table's "refused" cell: how many refusals, and what stopped the attack."""
    refusals = row.get("refusals")
    count = len(refusals) if isinstance(refusals, list) else 0
    stopped = str(row.get("stopped") or "")
    why = stopped.split(":")[0] if stopped else ""
    if row.get("label_term") == "left out":
        why = "label term left out"
    return f"{count}" + (f" ({why})" if why else "")


def _share(row: Mapping[str, object], key: str) -> str:
    value = row.get(key)
    return "-" if not isinstance(value, int | float) else f"{value:.4f}"


def format_security_table(document: Mapping[str, object]) -> str:
    """Markdown table: per stage and attack, recovered share against the baselines."""
    lines = [
        "| stage | attack | recovered share | majority share | other site's map | "
        "ceiling (own mean map) | foreground Dice | queries | requests | runs | "
        "seconds | refused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in _ordered(document):
        part = document[stage]
        if not is_stage(stage) or not isinstance(part, Mapping):
            continue
        attacks = part["attacks"]
        assert isinstance(attacks, Mapping)
        for name, row in attacks.items():
            lines.append(
                f"| {stage} | {name} | {_share(row, 'recovered_share')} | "
                f"{_share(row, 'majority_share')} | {_share(row, 'prior_share')} | "
                f"{_share(row, 'ceiling_share')} | {row['dice']:.3f} | "
                f"{row['queries']} | {row['requests']} | {row.get('runs', '-')} | "
                f"{row['seconds']:.0f} | {_refused(row)} |"
            )
    return "\n".join(lines)
