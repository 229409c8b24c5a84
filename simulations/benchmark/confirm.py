"""The ``confirm`` benchmark: defaults re-run on a synthetic seed nothing was tuned on.

Every default of the methods was chosen on the built-in federation's seed 0 (and the
chain federation's seed 0). ``confirm`` re-runs the ``tgma``, ``consensus``,
``semisup`` and ``affinity`` benchmarks, and ``tgma-mild`` (the tgma benchmark on the
mild-shift federation), with their defaults on another seed
(``federation.synthetic-seed``, which seeds both generators), each writing
``benchmarks/<name>-seed<k>.json``, and sets their headline figures beside the
committed seed-0 documents (``benchmarks/<name>.json``) in one table, between the
``<!-- benchmark:confirm -->`` markers of ``docs/confirm-benchmark.md``. A benchmark
whose second-seed document is missing shows as not run; ``--collect`` only gathers the
documents already written (a long benchmark can be run on its own first). The command
line is ``simulations.benchmark``; running one benchmark is its caller's callback, so
this module never imports the command line.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from core.metrics import paired_bootstrap_interval
from simulations.benchmark.output import describe_machine, log_progress, read_document

CONFIRM_MARKER: Final = "benchmark:confirm"
CONFIRMED_BENCHMARKS: Final = ("tgma", "tgma-mild", "consensus", "semisup", "affinity")
# A confirmed benchmark that is another's subcommand with other options (RECIPES).
SUBCOMMANDS: Final = {"tgma-mild": "tgma"}
# Per benchmark, the figures the table sets side by side: (label, path in its JSON).
HEADLINES: Final[dict[str, tuple[tuple[str, tuple[str, ...]], ...]]] = {
    "tgma": (
        ("mean Dice, TGMA (paper's DTM selection)", ("mean", "tgma")),
        ("mean Dice, TGMA (agreement selection)", ("mean", "tgma_agreement")),
        ("mean Dice, best single source", ("mean", "best_source")),
        ("mean Dice, uniform average", ("mean", "uniform")),
        ("mean Dice, entropy in place of LFTM", ("mean", "entropy")),
        ("mean Spearman, LFTM's DTM vs true Dice", ("mean", "spearman_lftm")),
    ),
    "tgma-mild": (
        ("mean Dice, TGMA (agreement selection)", ("mean", "tgma_agreement")),
        ("mean Dice, TGMA's adapted pair", ("mean", "tgma_agreement_pair")),
        ("mean Dice, uniform average", ("mean", "uniform")),
        ("mean Dice, best single source", ("mean", "best_source")),
        ("mean Spearman, LFTM's DTM vs true Dice", ("mean", "spearman_lftm")),
    ),
    "consensus": (
        (
            "Dice of the model trained on DeepSTAPLE",
            ("pipeline", "trained", "deepstaple"),
        ),
        ("Dice of the model trained on STAPLE", ("pipeline", "trained", "staple")),
        ("Dice of the model trained on ITM labels", ("pipeline", "trained", "itm")),
        ("label Dice, DeepSTAPLE", ("pipeline", "deepstaple")),
        ("label Dice, STAPLE", ("pipeline", "staple")),
        # Within-case AUROC of good vs wrong label sources
        # (docs/methods.md#data-parameters); the case rows are the paper's volume
        # granularity, run beside the default one (--granularities).
        ("within-case AUROC, data parameters", ("pipeline", "auroc_dp")),
        ("within-case AUROC, STAPLE sensitivities", ("pipeline", "auroc_staple")),
        (
            "case data parameters: Dice of the model trained on DeepSTAPLE",
            ("pipeline", "granularity", "case", "trained"),
        ),
        (
            "case data parameters: within-case AUROC",
            ("pipeline", "granularity", "case", "auroc_dp"),
        ),
    ),
    "semisup": (
        ("federated 20%: UG-MCL", ("federated", "0.2", "ugmcl")),
        ("federated 20%: mean teacher", ("federated", "0.2", "mean_teacher")),
        ("federated 20%: supervised", ("federated", "0.2", "supervised")),
        ("central 20%: UG-MCL", ("central", "0.2", "ugmcl")),
        ("central 20%: mean teacher", ("central", "0.2", "mean_teacher")),
        ("central 20%: supervised", ("central", "0.2", "supervised")),
    ),
    "affinity": (
        ("mean Dice, chosen transfer path", ("mean", "path")),
        (
            "mean Dice, direct from the affinity-best source",
            ("mean", "direct_affinity_best"),
        ),
        ("mean Spearman, affinity vs transfer Dice", ("mean", "spearman")),
        # The paper's two-term form on the same Dice, where the run's affinity has
        # the polarity term (docs/methods.md#polarity-term); n/a otherwise.
        (
            "paper's two-term affinity: mean Dice, chosen path",
            ("paper_form", "mean", "path"),
        ),
        (
            "paper's two-term affinity: mean Dice, direct from its affinity-best",
            ("paper_form", "mean", "direct_affinity_best"),
        ),
        (
            "paper's two-term affinity: mean Spearman",
            ("paper_form", "mean", "spearman"),
        ),
    ),
}

# TGMA's paired claims per tgma benchmark: (label, first figure, second figure) per
# target of its documents, pooled over the seeds' targets
# (docs/methods.md#agreement-selection, docs/methods.md#voter-ensemble).
TGMA_CLAIMS: Final = {
    "tgma": (
        ("agreement selection - paper's DTM selection", "tgma_agreement", "tgma"),
        ("agreement selection - best single source", "tgma_agreement", "best_source"),
        ("paper's DTM selection - best single source", "tgma", "best_source"),
    ),
    "tgma-mild": (
        ("mild: agreement selection - uniform average", "tgma_agreement", "uniform"),
        ("mild: adapted pair - uniform average", "tgma_agreement_pair", "uniform"),
        (
            "mild: agreement selection - best single source",
            "tgma_agreement",
            "best_source",
        ),
    ),
}

# Consensus's paired claims: (label, path of the first figure, path of the second) in
# each target row of the documents' pipeline part, pooled over the seeds' targets
# (docs/methods.md#data-parameters; the case rows need --granularities slice,case).
CONSENSUS_CLAIMS: Final[tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = (
    (
        "trained on DeepSTAPLE - trained on STAPLE",
        ("trained", "deepstaple"),
        ("trained", "staple"),
    ),
    (
        "trained on DeepSTAPLE with case DPs - trained on STAPLE",
        ("granularity", "case", "trained"),
        ("trained", "staple"),
    ),
    (
        "trained on DeepSTAPLE, case DPs - slice DPs",
        ("granularity", "case", "trained"),
        ("granularity", "slice", "trained"),
    ),
)

# Per benchmark, the options its committed seed-0 document was made with (as
# docs/development.md lists them), less the ones that tune: affinity's --calibrate
# fitted the defaults the confirmation keeps.
RECIPES: Final[dict[str, tuple[str, ...]]] = {
    "tgma": (),
    "tgma-mild": ("--set", "federation.synthetic-shift=mild"),
    "consensus": ("--targets", "A,C,E", "--granularities", "slice,case"),
    "semisup": ("--seeds", "0,1", "--threads", "1"),
    "affinity": ("--threads", "1"),
}

# Runs one benchmark by name with extra options, writing its document to the path.
BenchmarkRunner = Callable[[str, Sequence[str], Path], None]


def second_seed_path(out_dir: Path, name: str, seed: int) -> Path:
    """Where ``confirm`` writes benchmark ``name``'s document for ``seed``."""
    return out_dir / f"{name}-seed{seed}.json"


def headline(document: Mapping[str, object], path: Sequence[str]) -> float:
    """The number at ``path`` in a benchmark document; nan where there is none.

    Example:
        >>> headline({"mean": {"tgma": 0.75}}, ("mean", "tgma"))
        0.75
        >>> headline({"mean": {}}, ("mean", "tgma"))
        nan
    """
    value: object = document
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return math.nan
        value = value[key]
    return float(value) if isinstance(value, int | float) else math.nan


def collect_confirmation(
    benchmarks: Sequence[str], *, seed: int, out_dir: Path
) -> dict[str, object]:
    """The headline figures of each benchmark's seed-0 and second-seed documents."""
    rows: dict[str, list[dict[str, object]]] = {}
    for name in benchmarks:
        first = out_dir / f"{name}.json"
        second = second_seed_path(out_dir, name, seed)
        documents = [
            read_document(path) if path.is_file() else None for path in (first, second)
        ]
        rows[name] = [
            {
                "figure": label,
                "seed0": None if documents[0] is None else headline(documents[0], path),
                "second": None
                if documents[1] is None
                else headline(documents[1], path),
            }
            for label, path in HEADLINES[name]
        ]
    claims = [
        claim
        for name in TGMA_CLAIMS
        if name in benchmarks
        for claim in tgma_claims(out_dir, seed, name=name)
    ]
    pooled = [
        pooled_tgma_claims(out_dir, name=name)
        for name in TGMA_CLAIMS
        if name in benchmarks and len(seed_documents(out_dir, name)) > 2
    ]
    document: dict[str, object] = {
        "seed": seed,
        "benchmarks": rows,
        "tgma_claims": claims,
        "tgma_claims_all_seeds": pooled,
    }
    if "consensus" in benchmarks:
        document["consensus_claims"] = consensus_claims(out_dir, seed)
    return document


def consensus_claims(out_dir: Path, seed: int) -> list[dict[str, object]]:
    """Paired differences over every (seed, target) of the consensus documents.

    Per claim of :data:`CONSENSUS_CLAIMS`, as :func:`tgma_claims` does; a claim
    whose figures some target row lacks is left out, and all are when either
    document is missing.
    """
    documents = [
        read_document(path)
        for path in (
            out_dir / "consensus.json",
            second_seed_path(out_dir, "consensus", seed),
        )
        if path.is_file()
    ]
    rows: list[Mapping[str, object]] = []
    for document in documents:
        pipeline = document.get("pipeline")
        targets = pipeline.get("targets") if isinstance(pipeline, Mapping) else None
        if isinstance(targets, Mapping):
            rows += [row for row in targets.values() if isinstance(row, Mapping)]
    if len(documents) < 2 or not rows:
        return []
    return _paired_claims(
        [
            (
                label,
                [headline(row, first) for row in rows],
                [headline(row, second) for row in rows],
            )
            for label, first, second in CONSENSUS_CLAIMS
        ]
    )


def _paired_claims(
    figures: Sequence[tuple[str, Sequence[float], Sequence[float]]],
) -> list[dict[str, object]]:
    """Each (label, firsts, seconds) with no nan as a claim row with its interval."""
    claims: list[dict[str, object]] = []
    for label, first, second in figures:
        if any(math.isnan(value) for value in (*first, *second)):
            continue
        interval = paired_bootstrap_interval(first, second)
        claims.append(
            {
                "claim": label,
                "mean": interval.mean,
                "low": interval.low,
                "high": interval.high,
                "pairs": interval.count,
            }
        )
    return claims


def seed_documents(out_dir: Path, name: str) -> dict[int, Path]:
    """Every seed's document of benchmark ``name`` in ``out_dir``: seed -> path.

    Seed 0 is ``<name>.json``; seed k is ``<name>-seed<k>.json``.

    Example:
        >>> seed_documents(Path("/nonexistent"), "tgma")
        {}
    """
    found = (
        {0: out_dir / f"{name}.json"} if (out_dir / f"{name}.json").is_file() else {}
    )
    pattern = re.compile(rf"{re.escape(name)}-seed(\d+)\.json")
    for path in sorted(out_dir.glob(f"{name}-seed*.json")):
        matched = pattern.fullmatch(path.name)
        if matched is not None:
            found[int(matched[1])] = path
    return dict(sorted(found.items()))


def pooled_tgma_claims(out_dir: Path, *, name: str = "tgma") -> dict[str, object]:
    """:func:`tgma_claims` pooled over every seed whose document is in ``out_dir``.

    The issue's rule for a claim is at least 5 seeds with the paired interval above
    0; ``seeds`` says which were pooled.
    """
    paths = seed_documents(out_dir, name)
    rows: list[Mapping[str, object]] = []
    for path in paths.values():
        targets = read_document(path).get("targets")
        if isinstance(targets, Mapping):
            rows += [row for row in targets.values() if isinstance(row, Mapping)]
    claims: list[dict[str, object]] = []
    if len(paths) >= 2 and rows:
        for label, first, second in TGMA_CLAIMS[name]:
            if all(first in row and second in row for row in rows):
                claims += _paired_claims(
                    [
                        (
                            label,
                            [_number(row[first]) for row in rows],
                            [_number(row[second]) for row in rows],
                        )
                    ]
                )
    return {"benchmark": name, "seeds": sorted(paths), "claims": claims}


def tgma_claims(
    out_dir: Path, seed: int, *, name: str = "tgma"
) -> list[dict[str, object]]:
    """Paired differences over every (seed, target) of a tgma benchmark's documents.

    Per claim of ``TGMA_CLAIMS[name]``, the mean difference and its 95% bootstrap
    interval over the pooled targets (:func:`core.metrics.paired_bootstrap_interval`);
    empty when either document is missing or lacks the figures.
    """
    documents = [
        read_document(path)
        for path in (out_dir / f"{name}.json", second_seed_path(out_dir, name, seed))
        if path.is_file()
    ]
    rows: list[Mapping[str, object]] = []
    for document in documents:
        targets = document.get("targets")
        if isinstance(targets, Mapping):
            rows += [row for row in targets.values() if isinstance(row, Mapping)]
    claims: list[dict[str, object]] = []
    if len(documents) < 2 or not rows:
        return claims
    for label, first, second in TGMA_CLAIMS[name]:
        if not all(first in row and second in row for row in rows):
            continue
        claims += _paired_claims(
            [
                (
                    label,
                    [_number(row[first]) for row in rows],
                    [_number(row[second]) for row in rows],
                )
            ]
        )
    return claims


def run_confirm(
    benchmarks: Sequence[str],
    *,
    seed: int,
    out_dir: Path,
    run_benchmark: BenchmarkRunner | None,
) -> dict[str, object]:
    """Run each benchmark on ``seed`` (unless ``run_benchmark`` is None); collect.

    Raises:
        ValueError: an unknown benchmark name, or seed 0 (the tuning seed).
    """
    unknown = sorted(set(benchmarks) - set(CONFIRMED_BENCHMARKS))
    if unknown:
        raise ValueError(
            f"confirm: unknown benchmark(s) {', '.join(unknown)}; choose from "
            f"{', '.join(CONFIRMED_BENCHMARKS)}"
        )
    if seed == 0:
        raise ValueError("confirm: --seed 0 is the seed the defaults were tuned on")
    started = time.perf_counter()
    if run_benchmark is not None:
        for done, name in enumerate(benchmarks, 1):
            log_progress(f"confirm: {name} on seed {seed} ({done}/{len(benchmarks)})")
            run_benchmark(
                SUBCOMMANDS.get(name, name),
                RECIPES[name],
                second_seed_path(out_dir, name, seed),
            )
    document: dict[str, object] = {
        "machine": describe_machine(),
        "seconds": time.perf_counter() - started,
    }
    document.update(collect_confirmation(benchmarks, seed=seed, out_dir=out_dir))
    return document


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _cell(value: object) -> str:
    if value is None:
        return "not run"
    assert isinstance(value, float)
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def format_confirm_table(document: Mapping[str, object]) -> str:
    """Markdown table: each headline figure on seed 0 and on the second seed."""
    seed = document["seed"]
    benchmarks = document["benchmarks"]
    assert isinstance(benchmarks, Mapping)
    lines = [
        f"| benchmark | figure | seed 0 (tuned on) | seed {seed} (confirmation) |",
        "|---|---|---|---|",
    ]
    for name, rows in benchmarks.items():
        for row in rows:
            lines.append(
                f"| {name} | {row['figure']} | {_cell(row['seed0'])} | "
                f"{_cell(row['second'])} |"
            )
    for key, title in (("tgma_claims", "TGMA"), ("consensus_claims", "Consensus")):
        claims = document.get(key) or []
        assert isinstance(claims, list)
        if not claims:
            continue
        lines += [
            "",
            f"{title}, paired over the targets of seeds 0 and {seed} (95% bootstrap "
            "interval of the mean difference in Dice):",
            "",
            "| difference | mean | 95% interval | target-seeds |",
            "|---|---|---|---|",
        ]
        for claim in claims:
            lines.append(
                f"| {claim['claim']} | {claim['mean']:+.3f} | "
                f"[{claim['low']:+.3f}, {claim['high']:+.3f}] | {claim['pairs']} |"
            )
    all_seeds = document.get("tgma_claims_all_seeds") or []
    assert isinstance(all_seeds, list)
    for pooled in all_seeds:
        seeds = ", ".join(str(value) for value in pooled["seeds"])
        rule = "the 5-seed rule met" if len(pooled["seeds"]) >= 5 else "short of 5"
        lines += [
            "",
            f"{pooled['benchmark']}, paired over the targets of every seed with a "
            f"document (seeds {seeds}: {len(pooled['seeds'])} seeds, {rule}; 95% "
            "bootstrap interval of the mean difference in Dice):",
            "",
            "| difference | mean | 95% interval | target-seeds |",
            "|---|---|---|---|",
        ]
        for claim in pooled["claims"]:
            lines.append(
                f"| {claim['claim']} | {claim['mean']:+.3f} | "
                f"[{claim['low']:+.3f}, {claim['high']:+.3f}] | {claim['pairs']} |"
            )
    lines.append("")
    lines.append(
        f"Seed 0 from `benchmarks/<name>.json`, seed {seed} from "
        f"`benchmarks/<name>-seed{seed}.json`. Collected on {document['machine']}."
    )
    return "\n".join(lines)


def add_confirm_options(command: argparse.ArgumentParser) -> None:
    """The ``confirm`` subcommand's own options."""
    command.add_argument(
        "--seed",
        type=int,
        default=1,
        help="the synthetic seed to confirm on (default 1; 0 is the tuning seed)",
    )
    command.add_argument(
        "--benchmarks",
        default=",".join(CONFIRMED_BENCHMARKS),
        help="comma-separated benchmarks to re-run (default: all five)",
    )
    command.add_argument(
        "--out-dir",
        type=Path,
        default=Path("benchmarks"),
        help="where the seed-0 documents are and the second-seed ones are written",
    )
    command.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: only gather the second-seed documents already written",
    )


def run_confirm_command(
    args: argparse.Namespace, run_benchmark: BenchmarkRunner
) -> dict[str, object]:
    """Run the ``confirm`` subcommand from its parsed arguments; return the document."""
    benchmarks = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    return run_confirm(
        benchmarks,
        seed=args.seed,
        out_dir=args.out_dir,
        run_benchmark=None if args.collect else run_benchmark,
    )
