"""The ``security`` benchmark: what an adversarial coordinator reconstructs at a site.

Issue 20, item 8, reconstruction classes 2 and 3: against one site of a tiny
synthetic federation, through the site's real ClientApp (guard, ledger and handlers
included; :mod:`simulations.security_attacks`), run each attack and measure the share
of pixels of the site's label maps it recovers, against predicting the majority class
everywhere (and against a guess without queries: another site's majority map),
with the queries and requests it used:

- ``evaluate`` (class 2a): single-pixel predictors on the evaluation cases;
- ``consensus`` (class 2b): the same cells as ``train.consensus`` label sources;
- ``lftm`` (class 2b): crafted cell models as ``query.lftm`` candidates;
- ``profile`` (class 3): one ``query.profile`` with a fine ``affinity.label-grid``.

The site runs with its policy: the safe defaults, or ``--policy FILE`` (passed as the
node config's ``policy``). ``--stage`` names where the figures go in the document
(``before`` for the current code, ``after`` for a defended one); the other stage
already in ``--out`` is kept, so before and after sit side by side. Each attack
class gets a fresh site state folder (ledger, accountant), so one class's spending
does not starve the next. This module owns the options, the federation, the scoring
against the true maps (the attacker never sees them), the JSON document and its
table; the command line is ``simulations.benchmark``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import numpy as np
import torch

from core.config import ConfigValue, load_run_config, read_default_run_config
from core.data import (
    build_slice_set,
    index_site,
    list_site_dirs,
    read_case,
    read_federation_target,
)
from core.ledger import Ledger
from core.synthetic import GENERATOR_VERSION, write_federation
from simulations.benchmark_output import describe_machine, print_progress
from simulations.security_attacks import (
    CellMeasurements,
    SiteChannel,
    ask_consensus,
    ask_evaluate,
    measure_cells,
)
from simulations.security_decode import (
    BoolMap,
    decode_cases,
    decode_mean_map,
    score_maps,
)
from simulations.security_fallbacks import AttackPlan
from simulations.security_queries import (
    ask_lftm,
    measure_profile,
    reconstruct_volume,
)

SECURITY_MARKER: Final = "benchmark:security"
STAGES: Final = ("before", "after")
ATTACKS: Final = ("evaluate", "consensus", "lftm", "profile")
# What the document's figures mean (written into it, for whoever reads the JSON).
DEFINITIONS: Final = {
    "recovered_share": "share of the target maps' pixels whose class the attacker's "
    "reconstruction gets right (reconstructed maps matched to true ones by the best "
    "assignment: the site never names its cases)",
    "majority_share": "the same share for predicting the majority class (background) "
    "everywhere: what an attacker gets without the site",
    "prior_share": "the same share for predicting, for every case, the pixelwise "
    "majority of another site's maps: a guess from labels the coordinator might hold",
    "dice": "mean foreground Dice of the matched reconstructed and true maps",
    "queries": "predictors (evaluate), label-source sets (consensus), candidates "
    "(lftm) or profiles the site computed and answered",
    "requests": "messages sent to the site, query.hello and refused ones included",
    "seconds": "wall time of the attack, offline crafting of its models included",
    "offline": "crafting the attacker's pattern models (done before any request)",
}
# What the coordinator chooses for every attack: one slice per case (the middle one),
# so a case's Dice is a single map's; the cheapest consensus job; the CPU.
SECURITY_RUN_CONFIG: Final[dict[str, ConfigValue]] = {
    "data.max-slices-per-case": 1,
    "train.device": "cpu",
    "consensus.epochs": 1,
    "consensus.refine-epochs": 1,
    "consensus.baselines": False,
    "consensus.atlases": False,
}


def ensure_security_federation(cache_dir: Path, *, seed: int) -> Path:
    """Three synthetic sites with one labelled training case each (and 6 evaluation).

    One labelled case is the issue's class-3 setting (a profile over one case);
    the six evaluation cases are what ``evaluate`` and ``consensus`` average over.
    """
    folder = Path(cache_dir) / f"security-v{GENERATOR_VERSION}-seed{seed}"
    if not folder.exists():
        print_progress(f"generating the security benchmark federation in {folder}")
        write_federation(folder, seed=seed, num_sites=3, num_train_cases=1)
    return folder


# ----------------------------------------------------------------------- scoring


def evaluation_maps(site: Path, run_config: Mapping[str, ConfigValue]) -> list[BoolMap]:
    """The site's evaluation label maps as the site scores them (one per slice)."""
    config = load_run_config(run_config)
    slices = build_slice_set(
        index_site(site).evaluation, data=config.data, with_labels=True
    )
    assert slices.labels is not None
    return list(slices.labels.numpy() > 0)


def training_maps(site: Path, run_config: Mapping[str, ConfigValue]) -> list[BoolMap]:
    """The site's labelled training maps as its LFTM slices are cut (one per slice)."""
    config = load_run_config(run_config)
    slices = build_slice_set(
        index_site(site).labelled, data=config.data, with_labels=True
    )
    assert slices.labels is not None
    return list(slices.labels.numpy() > 0)


def labelled_volumes(
    site: Path, _run_config: Mapping[str, ConfigValue]
) -> list[BoolMap]:
    """The foreground of each labelled training case, on its own grid."""
    index = index_site(site)
    volumes = []
    for case in index.labelled:
        label = read_case(case, num_classes=len(index.class_names)).label
        assert label is not None  # a labelled case
        volumes.append(label > 0)
    return volumes


def reconstruct_cells(
    measured: CellMeasurements,
) -> tuple[list[BoolMap], dict[str, object]]:
    """The attacker's maps from a cell attack: exact per case when the values decode.

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


def ledger_decisions(state_dir: Path) -> dict[str, int]:
    """How many site ledger entries carry each decision (``released``, ``blocked``)."""
    counts: dict[str, int] = {}
    for entry in Ledger(state_dir / "ledger.jsonl").entries():
        decision = entry.decision.split(":")[0]
        counts[decision] = counts.get(decision, 0) + 1
    return counts


def other_site_prior(
    site: Path,
    truth: list[BoolMap],
    maps_of: Callable[[Path, Mapping[str, ConfigValue]], list[BoolMap]],
    run_config: Mapping[str, ConfigValue],
) -> dict[str, object]:
    """What a guess without any query scores: another site's majority map.

    A coordinator holding labels of its own (or of another site) could predict
    their pixelwise majority for every case; on anatomy that varies little this
    already beats the majority class, so it is the fairer floor for a defence.
    """
    others = [path for path in list_site_dirs(site.parent) if path != site]
    if not others:
        return {}
    prior = np.mean(maps_of(others[0], run_config), axis=0) > 0.5
    score = score_maps([prior] * len(truth), truth)
    return {
        "prior_site": others[0].name,
        "prior_share": round(score.recovered_share, 4),
        "prior_dice": round(score.dice, 4),
    }


def _cell_entry(
    name: str,
    measured: CellMeasurements,
    truth: list[BoolMap],
    *,
    target: str,
    prior: Mapping[str, object],
) -> dict[str, object]:
    maps, decoding = reconstruct_cells(measured)
    score = score_maps(maps, truth)
    plan, code = measured.plan, measured.plan.code()
    values = list(measured.values.values())
    print_progress(
        f"{name}: recovered {score.recovered_share:.4f} against majority "
        f"{score.majority_share:.4f} with {measured.queries} queries in "
        f"{measured.requests} requests ({measured.seconds:.0f} s)"
    )
    return {
        "target_map": target,
        "site": {
            "cases": measured.num_cases,
            "slices_per_case": plan.config.data.max_slices_per_case,
            "image_size": code.size,
            "model_channels": list(plan.config.model.channels),
        },
        **score.to_dict(),
        **prior,
        "queries": measured.queries,
        "requests": measured.requests,
        "seconds": round(measured.seconds, 2),
        "offline": measured.crafting,
        "construction": {
            "block": code.block,
            "models_per_predictor": code.digits,
            "base": code.base,
            "cells": code.num_cells,
            "predictors_per_request": plan.predictors_per_request,
            "models_per_request": plan.models_per_request,
            "final_run_id": plan.run_id,
        },
        "distinct_values": len({round(v, 12) for v in values}),
        "all_foreground_dice": (
            None if math.isnan(measured.all_foreground) else measured.all_foreground
        ),
        **decoding,
        "refusals": list(measured.refusals),
        "stopped": measured.plan.stopped,
    }


# -------------------------------------------------------------------- the attacks


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SecuritySettings:
    """One benchmark run's choices (the coordinator's and the benchmark's)."""

    site: Path
    policy: Path | None
    run_config: dict[str, ConfigValue]
    image_size: int
    consensus_image_size: int
    lftm_block: int
    profile_grid: int
    predictors_per_request: int


def run_evaluate_attack(settings: SecuritySettings, state: Path) -> dict[str, object]:
    """Class 2a: single-pixel predictors, ``evaluate``'s mean Dice decoded."""
    flat = {**settings.run_config, "data.image-size": settings.image_size}
    channel = SiteChannel(
        site_dir=settings.site, state_dir=state, policy=settings.policy
    )
    plan = AttackPlan(
        run_config=flat, predictors_per_request=settings.predictors_per_request
    )
    measured = measure_cells(channel, plan, ask_evaluate, progress=print_progress)
    final = measured.plan.run_config
    truth = evaluation_maps(settings.site, final)
    return _cell_entry(
        "evaluate",
        measured,
        truth,
        target="the middle slice of each evaluation case, as the site scores it",
        prior=other_site_prior(settings.site, truth, evaluation_maps, final),
    ) | {"ledger": ledger_decisions(state)}


def run_consensus_attack(settings: SecuritySettings, state: Path) -> dict[str, object]:
    """Class 2b: a cell's stripe models as label sources; ``label-dice.majority``."""
    flat = {**settings.run_config, "data.image-size": settings.consensus_image_size}
    channel = SiteChannel(
        site_dir=settings.site, state_dir=state, policy=settings.policy
    )
    plan = AttackPlan(run_config=flat, predictors_per_request=1)
    measured = measure_cells(channel, plan, ask_consensus, progress=print_progress)
    final = measured.plan.run_config
    truth = evaluation_maps(settings.site, final)
    return _cell_entry(
        "consensus",
        measured,
        truth,
        target="the middle slice of each evaluation case, as the site scores it",
        prior=other_site_prior(settings.site, truth, evaluation_maps, final),
    ) | {"ledger": ledger_decisions(state)}


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
    channel = SiteChannel(
        site_dir=settings.site, state_dir=state, policy=settings.policy
    )
    measured = measure_cells(channel, plan, ask_lftm, progress=print_progress)
    others = [p for p in list_site_dirs(settings.site.parent) if p != settings.site]
    comparison: dict[str, object] = {}
    if others:
        other = SiteChannel(
            site_dir=others[0], state_dir=state / "other", policy=settings.policy
        )
        elsewhere = measure_cells(
            other, measured.plan, ask_lftm, progress=print_progress
        )
        comparison = {
            "other_site": others[0].name,
            "same_values_at_other_site": elsewhere.values == measured.values,
        }
    final = measured.plan.run_config
    truth = training_maps(settings.site, final)
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
        prior=other_site_prior(settings.site, truth, training_maps, final),
    ) | {"value_counts": counts, **comparison, "ledger": ledger_decisions(state)}


def run_profile_attack(settings: SecuritySettings, state: Path) -> dict[str, object]:
    """Class 3: one ``query.profile`` at a label grid as fine as the case."""
    channel = SiteChannel(
        site_dir=settings.site, state_dir=state, policy=settings.policy
    )
    measured = measure_profile(
        channel,
        settings.run_config,
        grid=settings.profile_grid,
        progress=print_progress,
    )
    truths = labelled_volumes(settings.site, settings.run_config)
    shape = truths[0].shape
    guess = reconstruct_volume(measured.mean_label_map, shape)
    score = score_maps([guess] * len(truths), truths)
    prior = other_site_prior(
        settings.site, truths, labelled_volumes, settings.run_config
    )
    print_progress(
        f"profile: recovered {score.recovered_share:.4f} against majority "
        f"{score.majority_share:.4f} with {measured.requests} request(s) at grid "
        f"{measured.grid}"
    )
    return {
        "target_map": "the label volume of each labelled training case, on its own "
        "grid (the attacker is assumed to know the acquisition matrix)",
        "site": {"cases": len(truths), "volume_shape": list(shape)},
        **score.to_dict(),
        **prior,
        "queries": 1 if measured.grid else 0,
        "requests": measured.requests,
        "seconds": round(measured.seconds, 2),
        "label_grid": measured.grid,
        "num_labelled": measured.num_labelled,
        "epsilon": measured.epsilon,
        "refusals": list(measured.refusals),
        "ledger": ledger_decisions(state),
    }


RUNNERS: Final[dict[str, Callable[[SecuritySettings, Path], dict[str, object]]]] = {
    "evaluate": run_evaluate_attack,
    "consensus": run_consensus_attack,
    "lftm": run_lftm_attack,
    "profile": run_profile_attack,
}


def run_security(
    settings: SecuritySettings, attacks: tuple[str, ...]
) -> dict[str, object]:
    """Run ``attacks`` against the site; one stage's part of the document."""
    started = time.perf_counter()
    results = {}
    for name in attacks:
        print_progress(f"== attack {name} on site {settings.site.name}")
        with tempfile.TemporaryDirectory(prefix=f"security-{name}-") as state:
            results[name] = RUNNERS[name](settings, Path(state))
    policy = settings.policy
    return {
        "machine": describe_machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "site": settings.site.name,
        "policy": (
            "safe defaults (no policy file)"
            if policy is None
            else {
                "file": str(policy),
                "sha256": hashlib.sha256(policy.read_bytes()).hexdigest(),
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


def add_security_options(command: argparse.ArgumentParser) -> None:
    """The ``security`` subcommand's own options."""
    command.set_defaults(readme=Path(""))  # no README block unless --readme names one
    command.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="the site's policy file (node config 'policy'); default: safe defaults",
    )
    command.add_argument("--stage", choices=STAGES, default="before")
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
        help="cells one evaluate or LFTM request asks about (until a refusal)",
    )
    command.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default"
    )


def run_security_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``security`` subcommand; keep the other stage already in ``--out``."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    federation = args.federation_dir or ensure_security_federation(
        args.cache_dir, seed=args.seed
    )
    federation = Path(federation)
    site = federation / (
        args.site
        or read_federation_target(federation)
        or list_site_dirs(federation)[0].name
    )
    flat = read_default_run_config()
    flat.update(SECURITY_RUN_CONFIG)
    flat.update(overrides)
    settings = SecuritySettings(
        site=site,
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
            document.update({k: v for k, v in previous.items() if k in STAGES})
    document[args.stage] = merge_stage(document.get(args.stage), stage)
    return document


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


def format_security_table(document: Mapping[str, object]) -> str:
    """Markdown table: per stage and attack, recovered share against the majority."""
    lines = [
        "| stage | attack | recovered share | majority share | other site's map | "
        "foreground Dice | queries | requests | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        part = document.get(stage)
        if not isinstance(part, Mapping):
            continue
        attacks = part["attacks"]
        assert isinstance(attacks, Mapping)
        for name, row in attacks.items():
            prior = row.get("prior_share")
            lines.append(
                f"| {stage} | {name} | {row['recovered_share']:.4f} | "
                f"{row['majority_share']:.4f} | "
                f"{'-' if prior is None else format(prior, '.4f')} | "
                f"{row['dice']:.3f} | {row['queries']} | {row['requests']} | "
                f"{row['seconds']:.0f} |"
            )
    return "\n".join(lines)
