"""Benchmarks: ``python -m simulations.benchmark tgma|privacy --out benchmarks/X.json``.

Leave-one-site-out over the synthetic federation: every site is the target in turn and
the others are its sources. Per target it reports the Dice of each source alone, the
uniform average of all sources, the TGMA pipeline with LFTM, the same pipeline with the
entropy score in place of LFTM, and a target-supervised oracle (the target's own model
trained on its labels), plus the Spearman correlation between each score's DTM and the
sources' true Dice on the target. It calls the same ``core.jobs`` functions the
ClientApp calls, without Flower in between, and regenerates the README table between
the ``<!-- benchmark:tgma -->`` markers.

``privacy`` trains a source model without DP and with DP-SGD at several target
epsilons on a dedicated synthetic federation with more cases per site, audits each
model for membership inference (``core.audit``) on the source's own training cases
versus its held-out cases, and measures each model's Dice on the default target; it
regenerates the table between the ``<!-- benchmark:privacy -->`` markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from core.audit import (
    MiaAttack,
    attack_membership,
    build_audit_cases,
    train_reference_losses,
)
from core.config import RunConfig, TransferMetric, load_default_config
from core.data import index_site, list_site_dirs, read_federation_target
from core.jobs import (
    adapt_target,
    build_initial_weights,
    evaluate_predictors,
    score_candidates,
    train_source_model,
)
from core.models import Arrays
from core.privacy import DpSettings
from core.synthetic import (
    EVALUATION_CASES_PER_SITE,
    GENERATOR_VERSION,
    ensure_builtin_federation,
    write_federation,
)
from core.transferability import select_sources

README_MARKER = "benchmark:tgma"
PRIVACY_MARKER = "benchmark:privacy"


def describe_machine() -> str:
    """One line naming the CPU/GPU, core count and library versions."""
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return (
        f"{device}, {torch.get_num_threads()} torch threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def spearman(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Spearman's rho; 0 when either side is constant (no ranking information)."""
    if len(set(scores)) < 2 or len(set(truth)) < 2:
        return 0.0
    value = float(spearmanr(scores, truth).statistic)
    return 0.0 if math.isnan(value) else value


def _log(line: str) -> None:
    print(line, flush=True)


def _adapted_dice(
    site_dir: Path,
    sources: Mapping[str, Arrays],
    config: RunConfig,
    metric: TransferMetric,
) -> dict[str, object]:
    """Run selection + adaptation with ``metric`` and evaluate the adapted pair."""
    metric_config = dataclasses.replace(
        config, transfer=dataclasses.replace(config.transfer, metric=metric)
    )
    transferability = score_candidates(site_dir, sources, metric_config)
    selection = select_sources(transferability.dtm)
    adaptation = adapt_target(
        site_dir,
        sources,
        metric_config,
        main=selection.main,
        aux=selection.aux,
        weight_main=selection.weight_main,
        weight_aux=selection.weight_aux,
    )
    models: dict[str, Arrays] = {"main": adaptation.main_weights}
    pair = [("main", selection.weight_main)]
    if adaptation.aux_weights is not None:
        models["aux"] = adaptation.aux_weights
        pair.append(("aux", selection.weight_aux))
    scores = evaluate_predictors(
        site_dir,
        models,
        {"pair": pair, "main": [("main", 1.0)]},
        metric_config,
        with_hd95=False,
    )
    return {
        "dtm": transferability.dtm,
        "main": selection.main,
        "aux": selection.aux,
        "dice": scores["pair"].dice,
        "dice_main_only": scores["main"].dice,
    }


def run_tgma(config: RunConfig, *, federation_dir: Path) -> dict[str, object]:
    """Leave-one-site-out TGMA benchmark; returns the JSON document."""
    started = time.perf_counter()
    site_dirs = {path.name: path for path in list_site_dirs(federation_dir)}
    initial = build_initial_weights(config)
    models: dict[str, Arrays] = {}
    for name, path in site_dirs.items():
        result = train_source_model(path, config, initial_weights=initial)
        models[name] = result.weights
        _log(f"trained {name}: loss {result.final_loss:.3f} ({result.seconds:.1f} s)")
    targets: dict[str, dict[str, object]] = {}
    for target, path in site_dirs.items():
        sources = {name: weights for name, weights in models.items() if name != target}
        predictors = {name: [(name, 1.0)] for name in sources}
        predictors["uniform"] = [(name, 1.0 / len(sources)) for name in sources]
        baseline = evaluate_predictors(
            path,
            models,
            {**predictors, "oracle": [(target, 1.0)]},
            config,
            with_hd95=False,
        )
        source_only = {name: baseline[name].dice for name in sources}
        lftm = _adapted_dice(path, sources, config, TransferMetric.LFTM)
        entropy = _adapted_dice(path, sources, config, TransferMetric.ENTROPY)
        truth = [source_only[name] for name in sorted(sources)]
        targets[target] = {
            "source_only": source_only,
            "uniform": baseline["uniform"].dice,
            "entropy": entropy["dice"],
            "tgma": lftm["dice"],
            "tgma_main_only": lftm["dice_main_only"],
            "oracle": baseline["oracle"].dice,
            "best_source": max(source_only.values()),
            "spearman_lftm": spearman([lftm["dtm"][n] for n in sorted(sources)], truth),  # type: ignore[index]
            "spearman_entropy": spearman(
                [entropy["dtm"][n] for n in sorted(sources)], truth
            ),  # type: ignore[index]
            "dtm_lftm": lftm["dtm"],
            "dtm_entropy": entropy["dtm"],
            "selected_lftm": [lftm["main"], lftm["aux"]],
            "selected_entropy": [entropy["main"], entropy["aux"]],
        }
        row = targets[target]
        _log(
            f"target {target}: tgma {row['tgma']:.3f} entropy {row['entropy']:.3f} "
            f"uniform {row['uniform']:.3f} best source {row['best_source']:.3f} "
            f"oracle {row['oracle']:.3f}"
        )
    mean_keys = (
        "uniform",
        "entropy",
        "tgma",
        "tgma_main_only",
        "oracle",
        "best_source",
        "spearman_lftm",
        "spearman_entropy",
    )
    mean: dict[str, float] = {
        key: float(np.mean([row[key] for row in targets.values()]))  # type: ignore[misc]
        for key in mean_keys
    }
    mean["source_only"] = float(
        np.mean(
            [
                np.mean(list(row["source_only"].values()))  # type: ignore[attr-defined]
                for row in targets.values()
            ]
        )
    )
    gap = mean["oracle"] - mean["source_only"]
    mean["gap_closed"] = (mean["tgma"] - mean["source_only"]) / gap if gap > 0 else 0.0
    return {
        "machine": describe_machine(),
        "seconds": time.perf_counter() - started,
        "federation": str(federation_dir),
        "targets": targets,
        "mean": mean,
    }


def format_table(document: Mapping[str, object]) -> str:
    """Markdown summary table of a TGMA benchmark document."""
    mean = document["mean"]
    assert isinstance(mean, Mapping)
    targets = document["targets"]
    assert isinstance(targets, Mapping)
    lines = [
        "| target | mean single source | best single source | uniform | entropy | "
        "TGMA | TGMA main only | oracle | Spearman LFTM | Spearman entropy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in [*targets.items(), ("**mean**", mean)]:
        single = row["source_only"]
        single_value = (
            float(np.mean(list(single.values())))
            if isinstance(single, Mapping)
            else float(single)
        )
        lines.append(
            f"| {name} | {single_value:.3f} | {row['best_source']:.3f} | "
            f"{row['uniform']:.3f} | {row['entropy']:.3f} | {row['tgma']:.3f} | "
            f"{row['tgma_main_only']:.3f} | {row['oracle']:.3f} | "
            f"{row['spearman_lftm']:.2f} | {row['spearman_entropy']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"TGMA closes {100 * mean['gap_closed']:.0f}% of the gap between the mean "
        f"single source and the oracle. Measured on {document['machine']} in "
        f"{document['seconds']:.0f} s."
    )
    return "\n".join(lines)


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
    _log(f"generating the privacy benchmark federation in {folder}")
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    write_federation(
        staging,
        seed=seed,
        num_sites=num_sites,
        num_train_cases=members + nonmembers - EVALUATION_CASES_PER_SITE,
        progress=_log,
    )
    for site in list_site_dirs(staging):
        for case in index_site(site).labelled[members:]:
            assert case.label_path is not None
            for path, folder_name in (
                (case.image_path, "imagesTs"),
                (case.label_path, "labelsTs"),
            ):
                path.rename(site / folder_name / path.name)
    _log(f"every site: {members} training and {nonmembers} held-out cases")
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
    _log(f"source {source} ({reason}), target {target}")
    source_dir, target_dir = federation_dir / source, federation_dir / target
    cases = build_audit_cases(source_dir, config)
    # The reference models never see the audited models, so one set serves them all.
    reference = train_reference_losses(
        cases, config, references=references, seed=seed, progress=_log
    )
    models: list[dict[str, object]] = []
    runs: list[dict[str, object]] = []
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
                progress=_log,
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
                        "dice": dice,
                        "mia_auc": result.auc,
                        "mia_auc_ci": list(result.ci),
                        "attack": result.attack,
                        "n_members": result.n_members,
                        "n_nonmembers": result.n_nonmembers,
                    }
                )
                _log(
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


def format_privacy_table(document: Mapping[str, object]) -> str:
    """Markdown table of a privacy benchmark document: one row per model."""
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
        f"| model | ε target | ε spent (δ = {settings['delta']:g}) | "
        f"Dice on {settings['target']} | "
        + " | ".join(f"{attack} AUC [95% CI]" for attack in attacks)
        + " |",
        "|---|---|---|---|" + "---|" * len(attacks),
    ]
    for epsilon, row in rows.items():
        run = row["run"]
        assert isinstance(run, Mapping)
        spent = run.get("epsilon_spent")
        lines.append(
            f"| {'no DP' if epsilon is None else 'DP-SGD'} | "
            f"{'-' if epsilon is None else f'{epsilon:g}'} | "
            f"{'∞' if spent is None else f'{spent:.2f}'} | {run['dice']:.3f} | "
            + " | ".join(str(row.get(attack, "-")) for attack in attacks)
            + " |"
        )
    lines.append("")
    lines.append(
        f"Source {settings['source']} ({settings['members']} training cases = "
        f"members, {settings['nonmembers']} held-out cases = non-members, "
        f"{settings['slices_per_case']:g} slices each), {settings['epochs']} epochs; "
        f"calibrated-loss uses {settings['references']} reference models; "
        f"{settings['bootstrap_resamples']} bootstrap resamples. Measured on "
        f"{document['machine']} in {document['seconds']:.0f} s."
    )
    return "\n".join(lines)


def update_readme(readme: Path, marker: str, table: str) -> None:
    """Replace the text between ``<!-- marker -->`` and ``<!-- /marker -->``."""
    text = readme.read_text()
    pattern = re.compile(
        rf"(<!-- {re.escape(marker)} -->\n).*?(<!-- /{re.escape(marker)} -->)",
        re.DOTALL,
    )
    if not pattern.search(text):
        raise ValueError(f"{readme}: no <!-- {marker} --> ... <!-- /{marker} --> block")
    readme.write_text(
        pattern.sub(lambda match: f"{match.group(1)}{table}\n{match.group(2)}", text)
    )


def _add_common_options(command: argparse.ArgumentParser, out: str) -> None:
    command.add_argument("--out", type=Path, default=Path(out))
    command.add_argument(
        "--federation-dir",
        type=Path,
        default=None,
        help="a federation folder; default: a synthetic one generated in --cache-dir",
    )
    command.add_argument("--cache-dir", type=Path, default=Path("data"))
    command.add_argument(
        "--readme",
        type=Path,
        default=Path("README.md"),
        help="README whose table block is regenerated ('' to skip)",
    )
    command.add_argument(
        "--table-from",
        type=Path,
        default=None,
        help="only regenerate the README table from an existing benchmark JSON",
    )
    command.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override, e.g. --set train.epochs=10",
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.benchmark", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tgma = commands.add_parser("tgma", help="leave-one-site-out TGMA benchmark")
    _add_common_options(tgma, "benchmarks/tgma.json")
    privacy = commands.add_parser(
        "privacy", help="membership-inference AUC and Dice without DP and with DP-SGD"
    )
    _add_common_options(privacy, "benchmarks/privacy.json")
    privacy.add_argument(
        "--members", type=int, default=32, help="training cases per site (default 32)"
    )
    privacy.add_argument(
        "--nonmembers",
        type=int,
        default=32,
        help="held-out cases per site (default 32)",
    )
    privacy.add_argument(
        "--epsilons",
        default="1,3,8",
        help="DP-SGD target epsilons, comma-separated (default 1,3,8)",
    )
    privacy.add_argument(
        "--source",
        default=None,
        help="source site; default: the best single source for the target in "
        "benchmarks/tgma.json",
    )
    privacy.add_argument("--references", type=int, default=4)
    privacy.add_argument("--bootstrap", type=int, default=1000)
    privacy.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    marker, formatter = (
        (README_MARKER, format_table)
        if args.command == "tgma"
        else (PRIVACY_MARKER, format_privacy_table)
    )
    overrides: dict[str, bool | int | float | str] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in '0123456789-tf["' else value
    if args.table_from is not None:
        table = formatter(json.loads(args.table_from.read_text()))
        print(table)
        update_readme(args.readme, marker, table)
        return 0
    config = load_default_config(**overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.command == "tgma":
        federation = args.federation_dir or ensure_builtin_federation(
            args.cache_dir,
            seed=config.federation.synthetic_seed,
            num_sites=config.federation.synthetic_sites,
            num_train_cases=config.federation.synthetic_cases,
            progress=_log,
        )
        document = run_tgma(config, federation_dir=federation)
    else:
        federation = args.federation_dir or ensure_privacy_federation(
            args.cache_dir,
            seed=config.federation.synthetic_seed,
            num_sites=config.federation.synthetic_sites,
            members=args.members,
            nonmembers=args.nonmembers,
        )
        document = run_privacy(
            config,
            federation_dir=federation,
            source=args.source,
            epsilons=[float(value) for value in args.epsilons.split(",") if value],
            references=args.references,
            resamples=args.bootstrap,
            seed=args.seed,
            tgma_json=Path("benchmarks/tgma.json"),
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    table = formatter(document)
    print(table)
    if str(args.readme) and args.readme.exists():
        update_readme(args.readme, marker, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
