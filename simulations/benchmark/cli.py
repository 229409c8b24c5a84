"""Benchmarks: ``python -m simulations.benchmark <subcommand>``, one per benchmark.

This module owns the command line only: the parser, the options the subcommands
share, ``--set`` overrides, ``--table-from``, ``--log-level`` and the dispatch. Each
subcommand lives in its own module, which runs it, formats its table and names its
table block; the block lives in the benchmark's docs page,
``docs/<subcommand>-benchmark.md``:

- ``tgma``: :mod:`simulations.benchmark.tgma` (leave-one-site-out TGMA);
- ``privacy``: :mod:`simulations.benchmark.privacy` (membership inference with and
  without DP-SGD);
- ``scale``: :mod:`simulations.benchmark.scale` (real Flower simulations) and
  :mod:`simulations.benchmark.scale_summary` (its document and table);
- ``consensus``: :mod:`simulations.benchmark.consensus` (controlled noisy labels, the
  table) and :mod:`simulations.benchmark.consensus_pipeline` (consensus from
  source-model predictions, the run of both parts);
- ``semisup``: :mod:`simulations.benchmark.semisup` (supervised, mean teacher, UG-MCL
  and the fully supervised bound at few labelled cases, central and federated);
- ``semisup-options``: :mod:`simulations.benchmark.semisup_options` (federated
  UG-MCL with each named option against its baselines);
- ``affinity``: :mod:`simulations.benchmark.affinity` (SeqTran transfer paths against
  direct transfer on the chain federation, and ``--calibrate`` of the affinity
  weights: :mod:`simulations.benchmark.affinity_calibration`), trained and scored by
  :mod:`simulations.benchmark.affinity_transfer`;
- ``postprocess``: :mod:`simulations.benchmark.postprocess` (the largest connected
  component rule: each source's decision, and Dice and HD95 raw, post-processed and
  as decided, leave-one-site-out);
- ``confirm``: :mod:`simulations.benchmark.confirm` (``tgma``, ``tgma-mild``,
  ``consensus``, ``semisup`` and ``affinity`` re-run with their defaults on a second
  synthetic seed, beside the seed-0 figures);
- ``perf``: :mod:`simulations.benchmark.perf` (LFTM against a plain inference pass,
  training throughput and memory by slice size);
- ``security``: :mod:`simulations.benchmark.security.run` (what an adversarial
  coordinator reconstructs of a site's label maps through ``evaluate``,
  ``train.consensus``, ``query.lftm`` and ``query.profile``; before the defences,
  after them under the default policy, with DP, and under candidate settings;
  its table goes to ``docs/security-benchmark.md``).

The machine line, JSON documents and the pages' table blocks are
:mod:`simulations.benchmark.output`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from core.config import ConfigValue
from core.logs import add_log_level_option, configure_logging, log_level_of
from simulations.benchmark.affinity import (
    AFFINITY_MARKER,
    add_affinity_options,
    format_affinity_table,
    run_affinity_command,
)
from simulations.benchmark.confirm import (
    CONFIRM_MARKER,
    add_confirm_options,
    format_confirm_table,
    run_confirm_command,
)
from simulations.benchmark.consensus import CONSENSUS_MARKER, format_consensus_table
from simulations.benchmark.consensus_pipeline import (
    add_consensus_options,
    run_consensus_command,
)
from simulations.benchmark.output import (
    add_output_options,
    benchmark_page,
    read_document,
    write_document,
    write_page_table,
)
from simulations.benchmark.perf import (
    PERF_MARKER,
    add_perf_options,
    format_perf_table,
    run_perf_command,
)
from simulations.benchmark.postprocess import (
    POSTPROCESS_MARKER,
    format_postprocess_table,
    run_postprocess_command,
)
from simulations.benchmark.privacy import (
    PRIVACY_MARKER,
    add_privacy_options,
    format_privacy_table,
    run_privacy_command,
)
from simulations.benchmark.scale import add_scale_options, run_scale_command
from simulations.benchmark.scale_summary import (
    SCALE_MARKER,
    format_scale_table,
    list_failed_site_counts,
)
from simulations.benchmark.security.run import (
    SECURITY_MARKER,
    add_security_options,
    format_security_table,
    run_security_command,
)
from simulations.benchmark.semisup import (
    SEMISUP_MARKER,
    add_semisup_options,
    format_semisup_table,
    run_semisup_command,
)
from simulations.benchmark.semisup_options import (
    SEMISUP_OPTIONS_MARKER,
    add_options_options,
    format_options_table,
    run_options_command,
)
from simulations.benchmark.tgma import TGMA_MARKER, format_tgma_table, run_tgma_command


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Subcommand:
    """What :func:`main` needs of a subcommand besides its options."""

    marker: str  # the page's block: <!-- marker --> ... <!-- /marker -->
    format_table: Callable[[Mapping[str, object]], str]
    run: Callable[[argparse.Namespace, Mapping[str, ConfigValue]], dict[str, object]]


SUBCOMMANDS: Final = {
    "tgma": Subcommand(
        marker=TGMA_MARKER, format_table=format_tgma_table, run=run_tgma_command
    ),
    "privacy": Subcommand(
        marker=PRIVACY_MARKER,
        format_table=format_privacy_table,
        run=run_privacy_command,
    ),
    "scale": Subcommand(
        marker=SCALE_MARKER, format_table=format_scale_table, run=run_scale_command
    ),
    "consensus": Subcommand(
        marker=CONSENSUS_MARKER,
        format_table=format_consensus_table,
        run=run_consensus_command,
    ),
    "semisup": Subcommand(
        marker=SEMISUP_MARKER,
        format_table=format_semisup_table,
        run=run_semisup_command,
    ),
    "semisup-options": Subcommand(
        marker=SEMISUP_OPTIONS_MARKER,
        format_table=format_options_table,
        run=run_options_command,
    ),
    "affinity": Subcommand(
        marker=AFFINITY_MARKER,
        format_table=format_affinity_table,
        run=run_affinity_command,
    ),
    "perf": Subcommand(
        marker=PERF_MARKER, format_table=format_perf_table, run=run_perf_command
    ),
    "postprocess": Subcommand(
        marker=POSTPROCESS_MARKER,
        format_table=format_postprocess_table,
        run=run_postprocess_command,
    ),
    "security": Subcommand(
        marker=SECURITY_MARKER,
        format_table=format_security_table,
        run=run_security_command,
    ),
    "confirm": Subcommand(
        marker=CONFIRM_MARKER,
        format_table=format_confirm_table,
        run=lambda args, overrides: run_confirm_command(
            args,
            lambda name, options, out: _run_on_seed(
                name, options, out, args, overrides
            ),
        ),
    ),
}


def _run_on_seed(
    name: str,
    options: Sequence[str],
    out: Path,
    args: argparse.Namespace,
    overrides: Mapping[str, ConfigValue],
) -> None:
    """Run benchmark ``name`` (with ``options``) on ``args.seed``, writing ``out``."""
    settings = {**overrides, "federation.synthetic-seed": args.seed}
    argv = [name, *options, "--out", str(out), "--page", ""]
    argv += ["--cache-dir", str(args.cache_dir)]
    for key, value in settings.items():
        argv += [
            "--set",
            f"{key}={json.dumps(value) if isinstance(value, bool) else value}",
        ]
    if main(argv) != 0:
        raise RuntimeError(f"confirm: the {name} benchmark failed on seed {args.seed}")


def parse_overrides(items: Sequence[str]) -> dict[str, ConfigValue]:
    """Run-config overrides from ``--set KEY=VALUE`` items; JSON scalars parsed.

    A value that is not a JSON number, boolean or string is kept as written.

    Example:
        >>> parse_overrides(["train.epochs=10", "data.augment=false", "x=runs",
        ...                  "last-phase=transferability", "model.channels=8,16"])
        ... # doctest: +NORMALIZE_WHITESPACE
        {'train.epochs': 10, 'data.augment': False, 'x': 'runs',
         'last-phase': 'transferability', 'model.channels': '8,16'}
    """
    overrides: dict[str, ConfigValue] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        overrides[key] = (
            parsed if isinstance(parsed, bool | int | float | str) else value
        )
    return overrides


def _add_common_options(
    command: argparse.ArgumentParser, name: str, page: str | None = None
) -> None:
    """The options every subcommand but ``scale`` shares; ``name`` names its files.

    ``page`` is the docs page of its table when not ``docs/<name>-benchmark.md``.
    """
    add_output_options(command, f"benchmarks/{name}.json", page or benchmark_page(name))
    command.add_argument(
        "--federation-dir",
        type=Path,
        default=None,
        help="a federation folder; default: a synthetic one generated in --cache-dir",
    )
    command.add_argument("--cache-dir", type=Path, default=Path("data"))
    command.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override, e.g. --set train.epochs=10",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m simulations.benchmark`` parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.benchmark", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tgma = commands.add_parser("tgma", help="leave-one-site-out TGMA benchmark")
    _add_common_options(tgma, "tgma")
    privacy = commands.add_parser(
        "privacy", help="membership-inference AUC and Dice without DP and with DP-SGD"
    )
    _add_common_options(privacy, "privacy")
    add_privacy_options(privacy)
    scale = commands.add_parser(
        "scale",
        help="wall time per phase and coordinator peak memory at 4, 8, 16, 32 sites "
        "(real Flower simulations)",
    )
    add_scale_options(scale)
    consensus = commands.add_parser(
        "consensus",
        help="label consensus: majority vote, STAPLE and DeepSTAPLE on controlled "
        "noisy labels and on source-model predictions",
    )
    _add_common_options(consensus, "consensus")
    add_consensus_options(consensus)
    semisup = commands.add_parser(
        "semisup",
        help="semi-supervised segmentation at 10%% and 20%% labelled cases: "
        "supervised, mean teacher, UG-MCL and fully supervised, central and federated",
    )
    _add_common_options(semisup, "semisup")
    add_semisup_options(semisup)
    semisup_options = commands.add_parser(
        "semisup-options",
        help="federated UG-MCL with each named option (distance consistency, global "
        "teacher, FedBN) against supervised and mean teacher, paired over seeds",
    )
    _add_common_options(semisup_options, "semisup-options")
    add_options_options(semisup_options)
    affinity = commands.add_parser(
        "affinity",
        help="SeqTran transfer paths against direct transfer on the chain federation; "
        "--calibrate fits the affinity weights a and b",
    )
    _add_common_options(affinity, "affinity")
    add_affinity_options(affinity)
    perf = commands.add_parser(
        "perf",
        help="LFTM against one plain inference pass; training throughput and memory "
        "at 64, 128 and 256 px",
    )
    _add_common_options(perf, "perf")
    add_perf_options(perf)
    postprocess = commands.add_parser(
        "postprocess",
        help="keeping the largest connected component per class: each source's "
        "decision, and Dice and HD95 raw, post-processed and as decided, "
        "leave-one-site-out",
    )
    _add_common_options(postprocess, "postprocess")
    security = commands.add_parser(
        "security",
        help="label maps an adversarial coordinator reconstructs through evaluate, "
        "consensus, LFTM and profile replies (--stage before|after|after-<name>, "
        "--policy FILE)",
    )
    _add_common_options(security, "security")
    add_security_options(security)
    confirm = commands.add_parser(
        "confirm",
        help="re-run tgma, consensus, semisup and affinity with their defaults on a "
        "second synthetic seed and set their figures beside seed 0's",
    )
    _add_common_options(confirm, "confirm")
    add_confirm_options(confirm)
    add_log_level_option(parser, *commands.choices.values())
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    configure_logging(log_level_of(args))
    subcommand = SUBCOMMANDS[args.command]
    overrides = parse_overrides(args.set)
    if args.table_from is not None:
        table = subcommand.format_table(read_document(args.table_from))
        print(table)
        if args.page.is_file():  # --page "" is Path("."): print only
            write_page_table(args.page, subcommand.marker, table)
        return 0
    document = subcommand.run(args, overrides)
    write_document(args.out, document)
    table = subcommand.format_table(document)
    print(table)
    if args.page.is_file():  # --page "" is Path("."), a folder: skip
        write_page_table(args.page, subcommand.marker, table)
    return 1 if list_failed_site_counts(document) else 0


if __name__ == "__main__":
    sys.exit(main())
