"""The ``privacy`` benchmark: membership-inference AUC and Dice without DP and with DP.

It trains a source model without DP and with DP-SGD at several target epsilons on a
dedicated synthetic federation with more cases per site, audits each model for
membership inference (``core.privacy.audit``) on the source's own training cases versus
its held-out cases, and measures each model's Dice on the default target. DP-SGD is the
site's own (:func:`core.training.job.train_source_model` under DP: the plan recorded
before training and run exactly), and each DP model states its slice-level and its
patient-level epsilon (the latter from the slices each case contributes). This module
owns that federation, the run, its JSON document, the table between the
``<!-- benchmark:privacy -->`` markers of ``docs/privacy-benchmark.md`` and the
subcommand's own options; the command line is ``simulations.benchmark``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import torch

from core.config import ConfigValue, RunConfig, load_default_config
from core.data.dataset import index_site, list_site_dirs, read_federation_target
from core.data.synthetic import (
    EVALUATION_CASES_PER_SITE,
    GENERATOR_VERSION,
    write_federation,
)
from core.logs import Countdown
from core.privacy.audit import (
    MiaAttack,
    attack_membership,
    build_audit_cases,
    train_reference_losses,
)
from core.privacy.dp import DpSettings
from core.training.evaluation import evaluate_predictors
from core.training.job import train_source_model
from simulations.benchmark.output import describe_machine, log_progress

PRIVACY_MARKER: Final = "benchmark:privacy"
# Where the privacy benchmark looks for the TGMA benchmark's best source per target.
TGMA_DOCUMENT: Final = Path("benchmarks/tgma.json")


def ensure_privacy_federation(
    cache_dir: Path, *, seed: int, num_sites: int, members: int, nonmembers: int
) -> Path:
    """A synthetic federation whose sites hold ``members`` + ``nonmembers`` cases.

    The built-in generator (same seed and sites, so the same site styles as the TGMA
    benchmark's federation) writes ``members + nonmembers`` labelled cases per site;
    cases after the first ``members`` of each site's ``imagesTr`` then move to
    ``imagesTs``, so every site has ``members`` training cases and ``nonmembers``
    held-out cases drawn from the same distribution. Generated once per parameters.
    """
    if nonmembers < EVALUATION_CASES_PER_SITE:
        raise ValueError(
            f"nonmembers must be >= {EVALUATION_CASES_PER_SITE}, got {nonmembers}"
        )
    folder = Path(cache_dir) / (
        f"privacy-v{GENERATOR_VERSION}-seed{seed}-sites{num_sites}-"
        f"members{members}-nonmembers{nonmembers}"
    )
    if folder.exists():
        return folder
    log_progress(f"generating the privacy benchmark federation in {folder}")
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    write_federation(
        staging,
        seed=seed,
        num_sites=num_sites,
        num_train_cases=members + nonmembers - EVALUATION_CASES_PER_SITE,
        progress=log_progress,
    )
    for site in list_site_dirs(staging):
        for case in index_site(site).labelled[members:]:
            assert case.label_path is not None
            for path, folder_name in (
                (case.image_path, "imagesTs"),
                (case.label_path, "labelsTs"),
            ):
                path.rename(site / folder_name / path.name)
    log_progress(f"every site: {members} training and {nonmembers} held-out cases")
    # Another process may finish it first; its result is the same.
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def choose_source(
    target: str, sites: Sequence[str], tgma_json: Path
) -> tuple[str, str]:
    """The source site for ``target`` and why: the TGMA benchmark's best, if recorded.

    Falls back to the site after the target in name order (its nearest neighbour on
    the synthetic continuum) when ``tgma_json`` has no row for ``target``.
    """
    if tgma_json.is_file():
        targets = json.loads(tgma_json.read_text()).get("targets", {})
        single = targets.get(target, {}).get("source_only", {})
        candidates = {name: dice for name, dice in single.items() if name in sites}
        if candidates:
            best = max(candidates, key=candidates.__getitem__)
            return best, (
                f"best single source for target {target} in {tgma_json} "
                f"(Dice {candidates[best]:.3f})"
            )
    others = [name for name in sites if name != target]
    return others[0], f"nearest site to {target} on the synthetic continuum"


def run_privacy(
    config: RunConfig,
    *,
    federation_dir: Path,
    source: str | None,
    epsilons: Sequence[float],
    references: int,
    resamples: int,
    seed: int,
    tgma_json: Path,
) -> dict[str, object]:
    """Train, attack and evaluate a source model without DP and at each epsilon."""
    started = time.perf_counter()
    sites = [path.name for path in list_site_dirs(federation_dir)]
    target = read_federation_target(federation_dir) or sites[0]
    if source is None:
        source, reason = choose_source(target, sites, tgma_json)
    else:
        reason = "chosen on the command line"
    log_progress(f"source {source} ({reason}), target {target}")
    source_dir, target_dir = federation_dir / source, federation_dir / target
    cases = build_audit_cases(source_dir, config)
    # The reference models never see the audited models, so one set serves them all.
    reference = train_reference_losses(
        cases, config, references=references, seed=seed, progress=log_progress
    )
    models: list[dict[str, object]] = []
    runs: list[dict[str, object]] = []
    trained = Countdown(1 + len(epsilons))
    with tempfile.TemporaryDirectory(prefix="sitebridge-privacy-") as scratch:
        for epsilon in [None, *epsilons]:
            dp = (
                None
                if epsilon is None
                else DpSettings(
                    noise_multiplier=None,
                    target_epsilon=epsilon,
                    delta=config.privacy.delta,
                    max_grad_norm=config.privacy.max_grad_norm,
                    # Never binding: each model has its own fresh accountant.
                    budget_epsilon=10 * epsilon,
                )
            )
            name = "no DP" if epsilon is None else f"DP eps {epsilon:g}"
            training = train_source_model(
                source_dir,
                config,
                dp=dp,
                accountant_path=Path(scratch) / f"accountant-{len(models)}.json",
                progress=log_progress,
            )
            dice = evaluate_predictors(
                target_dir,
                {name: training.weights},
                {name: [(name, 1.0)]},
                config,
                with_hd95=False,
            )[name].dice
            heldout = evaluate_predictors(
                source_dir,
                {name: training.weights},
                {name: [(name, 1.0)]},
                config,
                with_hd95=False,
            )[name].dice
            private = training.privacy
            model: dict[str, object] = {
                "epsilon": epsilon,
                "epsilon_spent": None if private is None else private.epsilon_spent,
                "units_per_case": None if private is None else private.units_per_case,
                "patient_epsilon_spent": (
                    None if private is None else private.patient_epsilon_spent
                ),
                "noise_multiplier": None
                if private is None
                else private.noise_multiplier,
                "sample_rate": None if private is None else private.sample_rate,
                "steps": None if private is None else private.steps,
                "dice": dice,
                "dice_source_heldout": heldout,
                "final_loss": training.final_loss,
                "train_seconds": training.seconds,
            }
            models.append(model)
            log_progress(f"{name}: trained and evaluated, model {trained.tick()}")
            for result in attack_membership(
                cases,
                training.weights,
                config,
                attacks=list(MiaAttack),
                reference=reference,
                resamples=resamples,
                seed=seed,
            ):
                runs.append(
                    {
                        "epsilon": epsilon,
                        "epsilon_spent": model["epsilon_spent"],
                        "patient_epsilon_spent": model["patient_epsilon_spent"],
                        "dice": dice,
                        "mia_auc": result.auc,
                        "mia_auc_ci": list(result.ci),
                        "attack": result.attack,
                        "n_members": result.n_members,
                        "n_nonmembers": result.n_nonmembers,
                    }
                )
                log_progress(
                    f"{name}: Dice on {target} {dice:.3f}, {result.attack} AUC "
                    f"{result.auc:.3f} [{result.ci[0]:.3f}, {result.ci[1]:.3f}]"
                )
    return {
        "machine": describe_machine(),
        "seconds": time.perf_counter() - started,
        "settings": {
            "federation": str(federation_dir),
            "target": target,
            "source": source,
            "source_choice": reason,
            "members": cases.num_members,
            "nonmembers": len(cases.slices.case_ids) - cases.num_members,
            "slices_per_case": len(cases.slices) / len(cases.slices.case_ids),
            "references": references,
            "bootstrap_resamples": resamples,
            "seed": seed,
            "epochs": config.train.epochs,
            "batch_size": config.train.batch_size,
            "learning_rate": config.train.learning_rate,
            "augment": config.train.augment,
            "image_size": config.data.image_size,
            "channels": list(config.model.channels),
            "delta": config.privacy.delta,
            "max_grad_norm": config.privacy.max_grad_norm,
        },
        "models": models,
        "runs": runs,
    }


def _format_epsilon(value: object) -> str:
    """An epsilon for the table: two decimals, scientific once it is large."""
    if value is None:
        return "-"
    assert isinstance(value, int | float)
    if math.isinf(value):
        return "∞"
    return f"{value:.2f}" if value < 1000 else f"{value:.1e}"


def format_privacy_table(document: Mapping[str, object]) -> str:
    """Markdown table of a privacy benchmark document: one row per model.

    The patient-level column is ``-`` for documents measured before it was kept.
    """
    settings = document["settings"]
    runs = document["runs"]
    assert isinstance(settings, Mapping)
    assert isinstance(runs, Sequence)
    attacks = list(dict.fromkeys(str(run["attack"]) for run in runs))
    rows: dict[object, dict[str, object]] = {}
    for run in runs:
        row = rows.setdefault(run["epsilon"], {"run": run})
        interval = run["mia_auc_ci"]
        row[str(run["attack"])] = (
            f"{run['mia_auc']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
        )
    lines = [
        f"| model | ε target | ε spent per slice (δ = {settings['delta']:g}) | "
        f"ε per patient | Dice on {settings['target']} | "
        + " | ".join(f"{attack} AUC [95% CI]" for attack in attacks)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(attacks),
    ]
    for epsilon, row in rows.items():
        run = row["run"]
        assert isinstance(run, Mapping)
        spent = run.get("epsilon_spent")
        patient = (
            "∞"
            if epsilon is None
            else _format_epsilon(run.get("patient_epsilon_spent"))
        )
        lines.append(
            f"| {'no DP' if epsilon is None else 'DP-SGD'} | "
            f"{'-' if epsilon is None else f'{epsilon:g}'} | "
            f"{'∞' if spent is None else _format_epsilon(spent)} | {patient} | "
            f"{run['dice']:.3f} | "
            + " | ".join(str(row.get(attack, "-")) for attack in attacks)
            + " |"
        )
    lines.append("")
    lines.append(
        f"Source {settings['source']} ({settings['members']} training cases = "
        f"members, {settings['nonmembers']} held-out cases = non-members, "
        f"{settings['slices_per_case']:g} slices each: the patient-level ε is RDP "
        f"group privacy over a case's slices), {settings['epochs']} epochs; "
        f"calibrated-loss uses {settings['references']} reference models; "
        f"{settings['bootstrap_resamples']} bootstrap resamples. Measured on "
        f"{document['machine']} in {document['seconds']:.0f} s."
    )
    return "\n".join(lines)


def add_privacy_options(command: argparse.ArgumentParser) -> None:
    """Add the ``privacy`` subcommand's own options (after the shared ones)."""
    command.add_argument(
        "--members", type=int, default=32, help="training cases per site (default 32)"
    )
    command.add_argument(
        "--nonmembers",
        type=int,
        default=32,
        help="held-out cases per site (default 32)",
    )
    command.add_argument(
        "--epsilons",
        default="1,3,8",
        help="DP-SGD target epsilons, comma-separated (default 1,3,8)",
    )
    command.add_argument(
        "--source",
        default=None,
        help="source site; default: the best single source for the target in "
        "benchmarks/tgma.json",
    )
    command.add_argument("--references", type=int, default=4)
    command.add_argument("--bootstrap", type=int, default=1000)
    command.add_argument("--seed", type=int, default=0)


def run_privacy_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``privacy`` subcommand from its parsed arguments; return the document."""
    config = load_default_config(**overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    federation = args.federation_dir or ensure_privacy_federation(
        args.cache_dir,
        seed=config.federation.synthetic_seed,
        num_sites=config.federation.synthetic_sites,
        members=args.members,
        nonmembers=args.nonmembers,
    )
    return run_privacy(
        config,
        federation_dir=federation,
        source=args.source,
        epsilons=[float(value) for value in args.epsilons.split(",") if value],
        references=args.references,
        resamples=args.bootstrap,
        seed=args.seed,
        tgma_json=TGMA_DOCUMENT,
    )
