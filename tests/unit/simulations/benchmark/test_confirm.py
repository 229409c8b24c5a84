"""The confirm benchmark: second-seed documents beside the seed-0 ones."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from simulations.benchmark.confirm import (
    CONFIRMED_BENCHMARKS,
    HEADLINES,
    format_confirm_table,
    run_confirm,
    second_seed_path,
)


def write_tgma(path: Path, tgma: float) -> None:
    """A tgma document with the figures the confirmation reads."""
    mean = {key: 0.5 for _, (_, key) in HEADLINES["tgma"]}
    path.write_text(json.dumps({"mean": {**mean, "tgma": tgma}}))


def test_confirm_runs_each_benchmark_on_the_seed_and_sets_it_beside_seed_0(
    tmp_path: Path,
) -> None:
    # Prepare
    write_tgma(tmp_path / "tgma.json", 0.739)
    ran: list[tuple[str, tuple[str, ...], Path]] = []

    def run_benchmark(name: str, options: Sequence[str], out: Path) -> None:
        ran.append((name, tuple(options), out))
        write_tgma(out, 0.812)

    # Execute
    document = run_confirm(
        ["tgma"], seed=2, out_dir=tmp_path, run_benchmark=run_benchmark
    )
    table = format_confirm_table(document)

    # Assert
    assert ran == [("tgma", (), tmp_path / "tgma-seed2.json")]
    assert second_seed_path(tmp_path, "tgma", 2) == tmp_path / "tgma-seed2.json"
    assert "| tgma | mean Dice, TGMA (paper's DTM selection) | 0.739 | 0.812 |" in table
    assert "| benchmark | figure | seed 0 (tuned on) | seed 2 (confirmation) |" in table


def test_collect_shows_what_was_not_run_and_figures_a_document_lacks(
    tmp_path: Path,
) -> None:
    # Prepare: a seed-0 tgma document without the agreement column
    (tmp_path / "tgma.json").write_text(json.dumps({"mean": {"tgma": 0.7}}))

    # Execute
    document = run_confirm(
        list(CONFIRMED_BENCHMARKS), seed=1, out_dir=tmp_path, run_benchmark=None
    )
    table = format_confirm_table(document)

    # Assert
    assert (
        "| tgma | mean Dice, TGMA (paper's DTM selection) | 0.700 | not run |" in table
    )
    assert "| tgma | mean Dice, TGMA (agreement selection) | n/a | not run |" in table
    assert "| affinity | mean Dice, chosen transfer path | not run | not run |" in table


@pytest.mark.parametrize(
    ("benchmarks", "seed", "message"),
    [
        (["tgma", "scale"], 1, "confirm: unknown benchmark\\(s\\) scale; choose from"),
        (["tgma"], 0, "confirm: --seed 0 is the seed the defaults were tuned on"),
    ],
)
def test_confirm_refuses_unknown_benchmarks_and_the_tuning_seed(
    benchmarks: list[str], seed: int, message: str, tmp_path: Path
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        run_confirm(benchmarks, seed=seed, out_dir=tmp_path, run_benchmark=None)


def test_tgma_claims_pool_the_targets_of_both_seeds(tmp_path: Path) -> None:
    # Prepare: agreement beats the paper by 0.1 at every target of both seeds
    for path, base in (
        (tmp_path / "tgma.json", 0.5),
        (tmp_path / "tgma-seed1.json", 0.6),
    ):
        targets = {
            name: {"tgma": base, "tgma_agreement": base + 0.1, "best_source": base}
            for name in "ABC"
        }
        path.write_text(json.dumps({"mean": {}, "targets": targets}))

    # Execute
    document = run_confirm(["tgma"], seed=1, out_dir=tmp_path, run_benchmark=None)
    table = format_confirm_table(document)

    # Assert
    claims = {claim["claim"]: claim for claim in document["tgma_claims"]}  # type: ignore[attr-defined]
    agreement = claims["agreement selection - paper's DTM selection"]
    assert agreement["pairs"] == 6
    assert agreement["mean"] == pytest.approx(0.1)
    assert agreement["low"] == pytest.approx(0.1)
    row = "| agreement selection - paper's DTM selection | +0.100 | [+0.100, +0.100] |"
    assert f"{row} 6 |" in table


def test_tgma_mild_runs_the_tgma_benchmark_on_the_mild_federation(
    tmp_path: Path,
) -> None:
    # Prepare
    ran: list[tuple[str, tuple[str, ...], Path]] = []

    def run_benchmark(name: str, options: Sequence[str], out: Path) -> None:
        ran.append((name, tuple(options), out))
        targets = {
            name: {"tgma_agreement": 0.9, "tgma_agreement_pair": 0.88, "uniform": 0.9}
            for name in "AB"
        }
        out.write_text(json.dumps({"mean": {"uniform": 0.9}, "targets": targets}))

    # Execute
    document = run_confirm(
        ["tgma-mild"], seed=1, out_dir=tmp_path, run_benchmark=run_benchmark
    )
    table = format_confirm_table(document)

    # Assert
    assert ran == [
        (
            "tgma",
            ("--set", "federation.synthetic-shift=mild"),
            tmp_path / "tgma-mild-seed1.json",
        )
    ]
    assert "| tgma-mild | mean Dice, uniform average | not run | 0.900 |" in table
    # Claims need both seeds' documents; seed 0's is missing.
    assert document["tgma_claims"] == []


def test_consensus_claims_pool_the_pipeline_targets_of_both_seeds(
    tmp_path: Path,
) -> None:
    # Prepare: DeepSTAPLE's model 0.02 below STAPLE's at every target, 0.03 above
    # with case DPs; the seed-1 document lacks the case figures at one target.
    for path, base in (
        (tmp_path / "consensus.json", 0.8),
        (tmp_path / "consensus-seed1.json", 0.7),
    ):
        targets: dict[str, object] = {
            name: {
                "trained": {"staple": base, "deepstaple": base - 0.02},
                "granularity": {
                    "slice": {"trained": base - 0.02},
                    "case": {"trained": base + 0.03},
                },
            }
            for name in "ACE"
        }
        if base == 0.7:
            targets["E"] = {"trained": {"staple": base, "deepstaple": base - 0.02}}
        path.write_text(json.dumps({"pipeline": {"targets": targets}}))

    # Execute
    document = run_confirm(["consensus"], seed=1, out_dir=tmp_path, run_benchmark=None)
    table = format_confirm_table(document)

    # Assert: the case claims are left out, one row lacking them.
    claims = document["consensus_claims"]
    assert [claim["claim"] for claim in claims] == [  # type: ignore[attr-defined]
        "trained on DeepSTAPLE - trained on STAPLE"
    ]
    assert claims[0]["pairs"] == 6  # type: ignore[index]
    assert claims[0]["mean"] == pytest.approx(-0.02)  # type: ignore[index]
    assert "Consensus, paired over the targets of seeds 0 and 1" in table
    assert "| trained on DeepSTAPLE - trained on STAPLE | -0.020 |" in table


def test_claims_pool_every_seed_with_a_document_and_say_whether_five_were(
    tmp_path: Path,
) -> None:
    # Prepare: five seeds' documents (seed 0 and seeds 1-4), a stray name ignored
    for seed, base in enumerate((0.5, 0.6, 0.55, 0.52, 0.58)):
        name = "tgma.json" if seed == 0 else f"tgma-seed{seed}.json"
        targets = {
            site: {"tgma": base, "tgma_agreement": base + 0.1, "best_source": base}
            for site in "ABC"
        }
        (tmp_path / name).write_text(json.dumps({"mean": {}, "targets": targets}))
    (tmp_path / "tgma-seedx.json").write_text("{}")

    # Execute
    document = run_confirm(["tgma"], seed=1, out_dir=tmp_path, run_benchmark=None)
    table = format_confirm_table(document)

    # Assert
    (pooled,) = document["tgma_claims_all_seeds"]  # type: ignore[misc]
    assert pooled["seeds"] == [0, 1, 2, 3, 4]
    claims = {claim["claim"]: claim for claim in pooled["claims"]}
    assert claims["agreement selection - paper's DTM selection"]["pairs"] == 15
    assert "seeds 0, 1, 2, 3, 4: 5 seeds, the 5-seed rule met" in table
