"""The semisup benchmark on a tiny federation, its gap arithmetic and README table."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from core.config import ConfigValue
from simulations.benchmark.cli import main
from simulations.benchmark.output import read_document, write_document
from simulations.benchmark.semisup import (
    SEMISUP_MARKER,
    SEMISUP_RUN_CONFIG,
    build_semisup_config,
    format_semisup_table,
    gap_recovered,
    merge_semisup_documents,
    parse_fractions,
    parse_seeds,
    parse_settings,
    run_semisup,
)

# Seconds on 2 CPU cores: 3 sites x 2 cases x 3 slices, a 2-level U-Net at 32 px,
# 2 central steps and 2 rounds of 1 step.
TINY_SEMISUP: dict[str, ConfigValue] = {
    "data.image-size": 32,
    "data.max-slices-per-case": 3,
    "model.channels": "4,8",
    "model.strides": "2",
    "semisup.iterations": 2,
    "semisup.rounds": 2,
    "semisup.local-iterations": 1,
    "semisup.passes": 2,
    "semisup.labelled-batch": 2,
    "semisup.unlabelled-batch": 2,
    "train.device": "cpu",
}
VARIANT_KEYS = ["supervised", "mean_teacher", "ugmcl", "full"]


def _tiny_args(federation: Path, tmp_path: Path) -> list[str]:
    readme = tmp_path / "page.md"
    readme.write_text(
        f"# x\n\n<!-- {SEMISUP_MARKER} -->\nold\n<!-- /{SEMISUP_MARKER} -->\n"
    )
    overrides = [f"--set={key}={value}" for key, value in TINY_SEMISUP.items()]
    return [
        "semisup",
        "--federation-dir",
        str(federation),
        "--out",
        str(tmp_path / "semisup.json"),
        "--page",
        str(readme),
        "--threads=1",  # tiny tensors; no oversubscription when tests run in parallel
        "--seeds=0,1",
        *overrides,
    ]


@pytest.fixture(scope="module")
def document(
    federation: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """The document and README written by one tiny run of the command line."""
    folder = tmp_path_factory.mktemp("semisup")
    threads = torch.get_num_threads()
    try:
        assert main(_tiny_args(federation, folder)) == 0
    finally:
        torch.set_num_threads(threads)
    result: dict[str, object] = json.loads((folder / "semisup.json").read_text())
    result["_readme"] = (folder / "page.md").read_text()
    return result


def test_semisup_config_applies_the_scale_then_the_overrides() -> None:
    # Execute
    config = build_semisup_config({"semisup.rounds": 2})

    # Assert
    assert config.semisup.rounds == 2
    assert config.semisup.iterations == SEMISUP_RUN_CONFIG["semisup.iterations"]
    assert config.semisup.learning_rate == SEMISUP_RUN_CONFIG["semisup.learning-rate"]
    assert config.data.image_size == 32


def test_tiny_run_has_the_issue_shape_and_dice_in_range(
    document: dict[str, object],
) -> None:
    # Assert: the issue's top level, fraction -> variant -> Dice in [0, 1].
    assert isinstance(document["machine"], str)
    for setting in ("central", "federated"):
        table = document[setting]
        assert isinstance(table, dict)
        assert list(table) == ["0.1", "0.2"]
        for row in table.values():
            assert list(row) == VARIANT_KEYS
            assert all(0.0 <= value <= 1.0 for value in row.values())
        # The fully supervised bound is trained once and reported at every fraction.
        assert table["0.1"]["full"] == table["0.2"]["full"]


def test_tiny_run_records_gaps_targets_and_detail(
    document: dict[str, object],
) -> None:
    # Assert: gaps follow from the Dice values; the detail covers every site.
    gaps, central = document["gap_recovered"], document["central"]
    assert isinstance(gaps, dict)
    assert isinstance(central, dict)
    row = central["0.2"]
    expected = gap_recovered(
        supervised=row["supervised"], method=row["ugmcl"], full=row["full"]
    )
    actual = gaps["central"]["0.2"]["ugmcl"]
    assert (math.isnan(expected) and math.isnan(actual)) or actual == expected
    targets = document["targets_met"]
    assert isinstance(targets, dict)
    for setting in ("central", "federated"):
        assert set(targets[setting]) == {
            "ugmcl_recovers_60pct_of_gap",
            "ugmcl_beats_mean_teacher",
        }
    detail = document["detail"]
    assert isinstance(detail, dict)
    assert list(detail) == ["0", "1"]
    assert document["seeds"] == [0, 1]
    federated = detail["1"]["federated"]["0.1"]["ugmcl"]
    assert set(federated["sites"]) == {"A", "B", "C"}
    assert len(federated["rounds"]) == 2
    assert federated["rounds"][-1] == federated["dice"]
    assert detail["0"]["central"]["0.1"]["supervised"]["num_labelled"] == 1
    assert detail["0"]["central"]["0.1"]["full"]["num_labelled"] == 2
    assert document["central_site"] == "A"
    assert document["steps"] == {"central": 2, "rounds": 2, "local_iterations": 1}


def test_tiny_run_reports_the_mean_over_seeds_and_each_seed(
    document: dict[str, object],
) -> None:
    # Assert: every Dice is the mean of the seeds' values, listed in seed order.
    per_seed, detail = document["per_seed"], document["detail"]
    assert isinstance(per_seed, dict)
    assert isinstance(detail, dict)
    for setting in ("central", "federated"):
        table = document[setting]
        assert isinstance(table, dict)
        for fraction, row in table.items():
            for variant, mean in row.items():
                values = per_seed[setting][fraction][variant]
                expected = [
                    detail[seed][setting][fraction][variant]["dice"]
                    for seed in ("0", "1")
                ]
                assert values == expected
                assert mean == pytest.approx(sum(values) / 2)


def test_tiny_run_writes_the_readme_block(document: dict[str, object]) -> None:
    # Assert: the block holds the table, four rows, no leftover text.
    readme = document["_readme"]
    assert isinstance(readme, str)
    block = readme.split(f"<!-- {SEMISUP_MARKER} -->\n")[1]
    assert "old" not in block
    assert block.count("| central |") == 2
    assert block.count("| federated |") == 2
    assert "Measured on " in block
    assert "mean over 2 seed(s) (train.seed 0, 1:" in block


@pytest.mark.parametrize(
    ("supervised", "method", "full", "expected"),
    [
        (0.6, 0.75, 0.8, 0.75),
        (0.6, 0.8, 0.8, 1.0),
        (0.6, 0.5, 0.8, -0.5),  # worse than the baseline
        (0.8, 0.85, 0.8, math.nan),  # no gap to recover
        (0.8, 0.85, 0.7, math.nan),  # the bound below the baseline
        (0.6, math.nan, 0.8, math.nan),
    ],
)
def test_gap_recovered(
    supervised: float, method: float, full: float, expected: float
) -> None:
    # Execute
    result = gap_recovered(supervised=supervised, method=method, full=full)

    # Assert
    if math.isnan(expected):
        assert math.isnan(result)
    else:
        assert result == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.1,1.5", r"labelled fraction '1\.5' must be a number in \(0, 1\)"),
        ("1", r"labelled fraction '1' must be a number in \(0, 1\); 1 is the fully"),
        ("0", r"labelled fraction '0' must be"),
        ("ten", r"labelled fraction 'ten' must be"),
        ("0.1,0.10", r"repeated labelled fraction in '0\.1,0\.10'"),
    ],
)
def test_parse_fractions_rejects(text: str, message: str) -> None:
    # Execute / Assert
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_fractions(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", (0,)), ("3, 1,2", (3, 1, 2))],
)
def test_parse_seeds(text: str, expected: tuple[int, ...]) -> None:
    # Execute / Assert
    assert parse_seeds(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,-1", r"seed '-1' must be a non-negative integer"),
        ("0,x", r"seed 'x' must be"),
        ("", r"seed '' must be"),
        ("1,1", r"repeated seed in '1,1'"),
    ],
)
def test_parse_seeds_rejects(text: str, message: str) -> None:
    # Execute / Assert
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_seeds(text)


def test_central_only_run_trains_and_reports_the_central_setting_alone(
    federation: Path,
) -> None:
    # Execute
    lines: list[str] = []
    document = run_semisup(
        build_semisup_config(TINY_SEMISUP),
        federation_dir=federation,
        fractions=(0.2,),
        settings=("central",),
        progress=lines.append,
    )

    # Assert: no federated round ran, and the table shows central rows only.
    assert document["settings"] == ["central"]
    assert "federated" not in document
    assert set(document["central"]["0.2"]) == set(VARIANT_KEYS)
    assert set(document["targets_met"]) == {"central"}
    assert not any("federated" in line for line in lines)
    table = format_semisup_table(document)
    assert "| central | 20% |" in table
    assert "| federated |" not in table
    assert "Central: site A, 2 steps. Dice on the evaluation labels." in table
    assert "FedAvg" not in table


@pytest.mark.parametrize("text", ["central,local", "central,central", ""])
def test_parse_settings_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="each must be one of"):
        parse_settings(text)


def test_command_line_names_a_bad_fraction(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Execute / Assert: argparse exits with the message, before any work.
    with pytest.raises(SystemExit) as exit_info:
        main(["semisup", "--fractions", "0.2,2", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert "labelled fraction '2' must be a number in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    ("kwargs", "overrides", "message"),
    [
        ({"central_site": "Z"}, {}, r"sites \['Z'\] not in .*\['A', 'B', 'C'\]"),
        ({}, {"semisup.sites": "A,Y"}, r"sites \['Y'\] not in"),
        ({"fractions": (0.1, 1.0)}, {}, r"fractions must lie in \(0, 1\), got"),
        ({"fractions": ()}, {}, r"fractions must lie in \(0, 1\), got \[\]"),
        ({"seeds": ()}, {}, r"seeds must be distinct non-negative integers, got \[\]"),
        ({"seeds": (1, 1)}, {}, r"seeds must be distinct .*got \[1, 1\]"),
        ({"settings": ()}, {}, r"settings must be some of .*got \[\]"),
        ({"settings": ("local",)}, {}, r"settings must be some of .*got \['local'\]"),
    ],
)
def test_run_semisup_rejects_before_training(
    federation: Path,
    kwargs: dict[str, object],
    overrides: dict[str, ConfigValue],
    message: str,
) -> None:
    # Prepare
    lines: list[str] = []

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        run_semisup(
            build_semisup_config({**TINY_SEMISUP, **overrides}),
            federation_dir=federation,
            progress=lines.append,
            **kwargs,  # type: ignore[arg-type]
        )
    assert lines == []


HEADER = (
    "| setting | labelled | supervised | mean teacher | UG-MCL | full | "
    "gap recovered: mean teacher | gap recovered: UG-MCL |"
)


def test_format_semisup_table() -> None:
    # Prepare: a hand-made document, fractions out of order, one nan.
    document: dict[str, object] = {
        "machine": "CPU (x86_64), 2 torch threads",
        "seconds": 901.6,
        "central": {
            "0.2": {
                "supervised": 0.8,
                "mean_teacher": 0.85,
                "ugmcl": 0.86,
                "full": 0.9,
            },
            "0.1": {"supervised": 0.7, "mean_teacher": 0.72, "ugmcl": 0.8, "full": 0.9},
        },
        "federated": {
            "0.1": {"supervised": 0.6, "mean_teacher": math.nan, "ugmcl": 0.5}
        },
        "gap_recovered": {
            "central": {
                "0.1": {"mean_teacher": 0.1, "ugmcl": 0.5},
                "0.2": {"mean_teacher": 0.5, "ugmcl": 0.6},
            },
            "federated": {"0.1": {"mean_teacher": math.nan, "ugmcl": -0.25}},
        },
        "targets_met": {
            "central": {
                "ugmcl_recovers_60pct_of_gap": True,
                "ugmcl_beats_mean_teacher": True,
            },
            "federated": None,
        },
        "central_site": "A",
        "federated_sites": ["A", "B"],
        "steps": {"central": 300, "rounds": 6, "local_iterations": 50},
    }

    # Execute
    table = format_semisup_table(document)

    # Assert
    assert table.splitlines() == [
        HEADER,
        "|---|---|---|---|---|---|---|---|",
        "| central | 10% | 0.700 | 0.720 | 0.800 | 0.900 | 10% | 50% |",
        "| central | 20% | 0.800 | 0.850 | 0.860 | 0.900 | 50% | 60% |",
        "| federated | 10% | 0.600 | — | 0.500 | — | — | -25% |",
        "",
        "Central: site A, 300 steps; federated: 2 sites (A, B), 6 FedAvg rounds x 50 "
        "steps. Dice on the evaluation labels (federated: mean over the sites).",
        "Targets at 20% labels (UG-MCL recovers at least 60% of the gap and beats "
        "mean teacher): central: met (gap ≥ 60%, above mean teacher).",
        "Measured on CPU (x86_64), 2 torch threads in 902 s.",
    ]


def test_format_semisup_table_without_any_section() -> None:
    # Execute
    table = format_semisup_table({})

    # Assert
    assert table.splitlines()[2:] == ["", "Measured on an unknown machine in — s."]


@pytest.mark.parametrize(
    ("seeds", "per_seed", "expected"),
    [
        (
            [0, 1],
            {"central": {"0.2": {"ugmcl": [0.8, 0.86], "full": [0.9, 0.91]}}},
            "Dice is the mean over 2 seed(s) (train.seed 0, 1: which cases are "
            "labelled, the initial weights, the batches); each seed's Dice is in the "
            "JSON (`per_seed`); one cell's seeds differ by up to 0.060.",
        ),
        (
            [3],
            {"central": {"0.2": {"ugmcl": [0.8]}}},
            "Dice is the mean over 1 seed(s) (train.seed 3: which cases are "
            "labelled, the initial weights, the batches); each seed's Dice is in the "
            "JSON (`per_seed`).",
        ),
    ],
)
def test_format_semisup_table_names_the_seeds_and_their_spread(
    seeds: list[int], per_seed: dict[str, object], expected: str
) -> None:
    # Execute
    table = format_semisup_table({"seeds": seeds, "per_seed": per_seed})

    # Assert
    assert expected in table.splitlines()


def _write_central_run(federation: Path, path: Path, seeds: tuple[int, ...]) -> Path:
    """A tiny central-only document at ``seeds``, written as the command writes it."""
    document = run_semisup(
        build_semisup_config(TINY_SEMISUP),
        federation_dir=federation,
        fractions=(0.2,),
        seeds=seeds,
        settings=("central",),
        progress=lambda line: None,
    )
    write_document(path, {"machine": "test machine", "federation": "f", **document})
    return path


def _without_seconds(value: object) -> object:
    """``value`` with every ``seconds`` entry dropped (wall time differs per run)."""
    if isinstance(value, dict):
        return {
            key: _without_seconds(inner)
            for key, inner in value.items()
            if key != "seconds"
        }
    return value


def test_merge_joins_runs_at_different_seeds_as_one_run_would(
    federation: Path, tmp_path: Path
) -> None:
    # Prepare: seeds 0 and 1 run apart, and both in one run.
    first = _write_central_run(federation, tmp_path / "seed0.json", (0,))
    second = _write_central_run(federation, tmp_path / "seed1.json", (1,))
    together = read_document(
        _write_central_run(federation, tmp_path / "both.json", (0, 1))
    )
    readme = tmp_path / "page.md"
    readme.write_text(f"<!-- {SEMISUP_MARKER} -->\nold\n<!-- /{SEMISUP_MARKER} -->\n")

    # Execute
    code = main(
        [
            "semisup",
            "--merge",
            str(first),
            str(second),
            "--out",
            str(tmp_path / "m.json"),
            "--page",
            str(readme),
        ]
    )

    # Assert: the same means, per-seed values, gaps and detail as the joint run.
    assert code == 0
    merged = read_document(tmp_path / "m.json")
    for key in ("central", "per_seed", "gap_recovered", "targets_met"):
        assert merged[key] == together[key], key
    assert _without_seconds(merged["detail"]) == _without_seconds(together["detail"])
    assert merged["seeds"] == [0, 1]
    assert merged["steps"] == {"central": 2}
    assert merged["config"] == together["config"]
    parts = [read_document(path)["seconds"] for path in (first, second)]
    assert merged["merged_seconds"] == parts
    assert merged["seconds"] == pytest.approx(sum(parts))  # type: ignore[arg-type]
    block = readme.read_text()
    assert "mean over 2 seed(s) (train.seed 0, 1:" in block
    assert "(the sum of 2 runs merged with --merge)." in block


def _setup_document(seed: int, **changes: object) -> dict[str, object]:
    document: dict[str, object] = {
        "machine": "m",
        "federation": "f",
        "settings": ["central"],
        "fractions": ["0.2"],
        "central_site": "A",
        "federated_sites": ["A", "B"],
        "steps": {"central": 300},
        "seeds": [seed],
        "detail": {str(seed): {"central": {}}},
        "config": {"train.seed": seed, "semisup.iterations": 300},
    }
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ([_setup_document(0)], r"at least two documents, got 1"),
        (
            [_setup_document(0), {"machine": "m", "seeds": [1]}],
            r"document 1 is not a semisup benchmark document \(no federation, ",
        ),
        (
            [_setup_document(0), _setup_document(1, steps={"central": 3000})],
            r"document 1 was run with another setup than document 0 "
            r"\(differs in steps\)",
        ),
        (
            [
                _setup_document(0),
                _setup_document(
                    1, config={"train.seed": 1, "semisup.iterations": 3000}
                ),
            ],
            r"\(differs in semisup\.iterations\)",
        ),
        (
            [_setup_document(0), _setup_document(1), _setup_document(0)],
            r"seeds \[0\] are in more than one document",
        ),
    ],
)
def test_merge_rejects(documents: list[dict[str, object]], message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        merge_semisup_documents(documents)


def test_merge_refuses_overrides_it_would_ignore(tmp_path: Path) -> None:
    # Prepare
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"{seed}.json")
        write_document(paths[-1], _setup_document(seed))

    # Execute / Assert
    with pytest.raises(
        ValueError,
        match=r"--merge trains nothing, so --set "
        r"semisup\.rounds would be ignored",
    ):
        main(
            [
                "semisup",
                "--merge",
                *map(str, paths),
                "--out",
                str(tmp_path / "m.json"),
                "--set",
                "semisup.rounds=3",
            ]
        )
    assert not (tmp_path / "m.json").exists()


def test_tiny_run_reports_how_often_the_clip_bound(
    document: dict[str, object],
) -> None:
    # Prepare
    detail = document["detail"]
    assert isinstance(detail, dict)

    # Assert: every run records it, and the table says it per variant
    for runs in detail.values():
        for fractions in runs.values():
            for row in fractions.values():
                for run in row.values():
                    assert 0.0 <= run["clipped_fraction"] <= 1.0
    readme = document["_readme"]
    assert isinstance(readme, str)
    assert "the same rule for every variant) bound: central: supervised " in readme
    assert "; federated: supervised " in readme
