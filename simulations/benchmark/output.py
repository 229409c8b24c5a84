"""What every benchmark leaves behind: progress lines, JSON document, docs table.

Shared by the subcommands of ``python -m simulations.benchmark``: the one-line machine
description recorded in each document, progress lines (the ``sitebridge.benchmark``
logger, shown at ``--log-level``), reading and writing the JSON
document, rewriting the table block of the benchmark's docs page
(``docs/<name>-benchmark.md``) between ``<!-- NAME -->`` and ``<!-- /NAME -->``
markers, the ``--seeds`` option (several ``train.seed`` values
for the benchmarks whose one run is too noisy to rank methods), and the fully
labelled federation leave-one-site-out benchmarks run on. It knows nothing about
any one benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from core.config import RunConfig
from core.data.dataset import list_site_dirs
from core.data.synthetic import ALL_LABELLED, ensure_builtin_federation
from core.logs import get_logger
from core.planning.fingerprint import compute_fingerprint
from core.planning.rules import apply_plan, derive_plan

LOGGER = get_logger("benchmark")


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


def log_progress(line: str) -> None:
    """Log one progress line (INFO on ``sitebridge.benchmark``; written at once)."""
    LOGGER.info("%s", line)


def read_document(path: Path) -> Mapping[str, object]:
    """Read a benchmark JSON document written by :func:`write_document`."""
    document: Mapping[str, object] = json.loads(path.read_text())
    return document


def write_document(path: Path, document: Mapping[str, object]) -> None:
    """Write ``document`` as indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def benchmark_page(name: str) -> str:
    """The docs page of benchmark ``name``, which holds its table block.

    Example:
        >>> benchmark_page("tgma")
        'docs/tgma-benchmark.md'
    """
    return f"docs/{name}-benchmark.md"


def write_page_table(page: Path, marker: str, table: str) -> None:
    """Replace the text between ``<!-- marker -->`` and ``<!-- /marker -->``.

    Raises:
        ValueError: ``page`` has no such block.
    """
    text = page.read_text()
    pattern = re.compile(
        rf"(<!-- {re.escape(marker)} -->\n).*?(<!-- /{re.escape(marker)} -->)",
        re.DOTALL,
    )
    if not pattern.search(text):
        raise ValueError(f"{page}: no <!-- {marker} --> ... <!-- /{marker} --> block")
    page.write_text(
        pattern.sub(lambda match: f"{match.group(1)}{table}\n{match.group(2)}", text)
    )


def add_output_options(command: argparse.ArgumentParser, out: str, page: str) -> None:
    """``--out``, ``--page`` and ``--table-from``: what every benchmark writes.

    Args:
        command: the subcommand's parser.
        out: the default JSON document, e.g. ``benchmarks/tgma.json``.
        page: the default docs page holding the table block, e.g.
            ``docs/tgma-benchmark.md`` (never the README: it links the pages).
    """
    command.add_argument("--out", type=Path, default=Path(out))
    command.add_argument(
        "--page",
        type=Path,
        default=Path(page),
        help=f"docs page whose table block is regenerated (default {page}; '' to "
        "only print the table)",
    )
    command.add_argument(
        "--table-from",
        type=Path,
        default=None,
        help="only regenerate the page's table from an existing benchmark JSON",
    )


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: comma-separated distinct non-negative integers (``train.seed``).

    Example:
        >>> parse_seeds("0, 1,2")
        (0, 1, 2)

    Raises:
        argparse.ArgumentTypeError: a value is not a non-negative integer, a value
            repeats, or none is given.
    """
    seeds = []
    for item in (part.strip() for part in text.split(",")):
        if not item.isdigit():
            raise argparse.ArgumentTypeError(
                f"seed {item!r} must be a non-negative integer"
            )
        seeds.append(int(item))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"repeated seed in {text!r}")
    return tuple(seeds)


def with_seed(config: RunConfig, seed: int) -> RunConfig:
    """``config`` with ``train.seed`` replaced (weights, batches, noise, dropout)."""
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, seed=seed)
    )


def leave_one_out_federation(args: argparse.Namespace, config: RunConfig) -> Path:
    """``--federation-dir``, else the built-in federation with every site labelled.

    Leave-one-site-out benchmarks need it so: every site is a source in turn, so
    every site (the default target too) keeps all its labels. Generated once in
    ``--cache-dir`` with the run config's seed, sites, cases and shift.
    """
    if args.federation_dir:
        return Path(args.federation_dir)
    return ensure_builtin_federation(
        args.cache_dir,
        seed=config.federation.synthetic_seed,
        num_sites=config.federation.synthetic_sites,
        num_train_cases=config.federation.synthetic_cases,
        target_labelled=ALL_LABELLED,
        shift=config.federation.synthetic_shift,
        scale=config.federation.synthetic_scale,
        progress=log_progress,
    )


def plan_offline(
    config: RunConfig, federation_dir: Path
) -> tuple[RunConfig, dict[str, object]]:
    """``config`` with the resolution plan of the federation's exact fingerprints.

    What the pipeline's plan phase derives from the sites' replies
    (:mod:`server.phases.plan`), computed here from the folders themselves: a
    benchmark reads every site. The plan fills only what ``config`` leaves to it.

    Returns:
        The planned config and the plan's document (``plan.json``'s form).
    """
    fingerprints = {
        path.name: compute_fingerprint(path, num_classes=config.data.num_classes)
        for path in list_site_dirs(federation_dir)
    }
    plan = derive_plan(fingerprints, plan=config.plan, strides=config.model.strides)
    for line in plan.rules:
        log_progress(f"plan: {line}")
    planned = apply_plan(
        config,
        image_size=plan.image_size,
        batch_size=plan.batch_size,
        spacing_mm=plan.in_plane_spacing_mm,
        ct_window=plan.ct_window,
    )
    return planned, plan.to_document()
