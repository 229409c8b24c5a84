"""The affinity benchmark: weight fit, pyproject writer, table and a tiny run."""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path

import pytest
import torch

from core.config import ConfigValue
from core.data.synthetic_chain import ANATOMIES, APPEARANCES, write_chain_federation
from simulations.benchmark import affinity as affinity_benchmark
from simulations.benchmark.affinity import (
    AFFINITY_MARKER,
    COLUMNS,
    SPEARMAN_KEYS,
    build_affinity_config,
    format_affinity_table,
    run_affinity,
    spearman_seed_interval,
)
from simulations.benchmark.affinity_calibration import (
    PairTerms,
    fit_leave_one_out,
    fit_weights,
    mean_spearman,
    read_affinity_weights,
    read_polarity_weight,
    weights_at,
    weights_at_direction,
    write_affinity_weights,
)
from simulations.benchmark.affinity_transfer import (
    average_single_steps,
    build_recipe,
    few_label_view,
    random_path,
    read_federation_roles,
)
from simulations.benchmark.cli import main
from simulations.benchmark.tgma import spearman

# Seconds on 2 CPU cores: 9 sites x (1 or 2) cases x 3 slices, a 2-level U-Net.
TINY_AFFINITY: dict[str, ConfigValue] = {
    "data.image-size": 16,
    "data.max-slices-per-case": 3,
    "model.channels": "4,8",
    "model.strides": "2",
    "train.epochs": 1,
    "train.device": "cpu",
    "affinity.image-size": 8,
    "affinity.label-grid": 8,
}
PYPROJECT = """\
[tool.flwr.app.config.train]
epochs = 30

[tool.flwr.app.config.affinity]
label-grid = 32          # G
image-weight = 1.0       # a in d = a * H + b * (1 - R)
label-weight = 1.0       # b
polarity-weight = 0.0    # c
max-hops = 2             # longest path

[tool.other]
image-weight = 5.0
"""


def run_tiny_affinity(arguments: list[str]) -> int:
    """Run ``benchmark affinity`` at the tiny scale on one thread (then restored)."""
    overrides = [f"--set={key}={value}" for key, value in TINY_AFFINITY.items()]
    threads = torch.get_num_threads()
    try:
        return main(
            [
                "affinity",
                *arguments,
                "--set=affinity.finetune-epochs=1",
                "--threads=1",
                *overrides,
            ]
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chain federation: 1 labelled case per site, 2 at the intermediates."""
    folder = tmp_path_factory.mktemp("chain") / "federation"
    write_chain_federation(
        folder,
        seed=0,
        num_train_cases=1,
        num_intermediate_cases=2,
        num_target_cases=1,
    )
    return folder


@pytest.fixture(scope="module")
def document(
    federation: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """The document, README and pyproject of one tiny ``--calibrate`` run."""
    folder = tmp_path_factory.mktemp("affinity")
    readme = folder / "page.md"
    readme.write_text(
        f"# x\n\n<!-- {AFFINITY_MARKER} -->\nold\n<!-- /{AFFINITY_MARKER} -->\n"
    )
    pyproject = folder / "pyproject.toml"
    pyproject.write_text(PYPROJECT)
    code = run_tiny_affinity(
        [
            "--federation-dir",
            str(federation),
            "--out",
            str(folder / "affinity.json"),
            "--page",
            str(readme),
            "--calibrate",
            "--pyproject",
            str(pyproject),
            "--targets",
            "I-dark-large",
            "--seeds=0,1",
        ]
    )
    assert code == 0
    result: dict[str, object] = json.loads((folder / "affinity.json").read_text())
    result["_readme"] = readme.read_text()
    result["_pyproject"] = pyproject.read_text()
    return result


def test_tiny_run_has_the_issue_shape(document: dict[str, object]) -> None:
    # Assert: per-target and mean Dice in [0, 1], Spearman in [-1, 1].
    assert isinstance(document["machine"], str)
    targets, mean = document["targets"], document["mean"]
    assert isinstance(targets, dict)
    assert isinstance(mean, dict)
    assert list(targets) == ["T-bright-large", "I-dark-large"]
    assert set(mean) == {*COLUMNS, *SPEARMAN_KEYS}
    for row in [*targets.values(), mean]:
        assert all(0.0 <= row[key] <= 1.0 for key in COLUMNS)
        assert all(-1.0 <= row[key] <= 1.0 for key in SPEARMAN_KEYS)
    row = targets["T-bright-large"]
    chosen = row["chosen"]
    assert chosen["path"][-1] == "T-bright-large"
    assert len(chosen["random_paths"]) == 2
    assert all(len(path) == len(chosen["path"]) for path in chosen["random_paths"])
    assert chosen["paper_path"][0].startswith("L-")
    assert len(row["single_step"]) == 8
    oracle = row["single_step"][chosen["direct_oracle_best"]]["dice"]
    assert (
        row["direct_oracle_best"]
        == oracle
        == max(step["dice"] for step in row["single_step"].values())
    )
    assert set(document["targets_met"]) == {
        "path_beats_direct_affinity_best",
        "spearman_at_least_0.6",
    }


def test_tiny_run_averages_every_dice_over_the_seeds(
    document: dict[str, object],
) -> None:
    # Assert: each Dice is the mean of the two seeds' values recorded beside it.
    assert document["seeds"] == [0, 1]
    row = document["targets"]["T-bright-large"]
    per_seed = row["per_seed"]
    assert per_seed["seeds"] == [0, 1]
    for key in ("path", "random_path"):
        assert row[key] == pytest.approx(sum(per_seed[key]) / 2)
    for step in row["single_step"].values():
        assert len(step["dice_per_seed"]) == 2
        assert step["dice"] == pytest.approx(sum(step["dice_per_seed"]) / 2)
    assert len(per_seed["spearman"]) == 2
    assert "every Dice a mean over train.seed 0, 1" in str(document["_readme"])


def test_tiny_run_reports_the_seed_interval_and_the_factor_reference(
    document: dict[str, object],
) -> None:
    # Assert: the interval brackets nothing outside [-1, 1] and is recomputable from
    # the recorded per-seed Dice; the reference is the generator's levels' Spearman.
    interval = document["spearman_interval"]
    assert isinstance(interval, dict)
    assert interval["seeds"] == 2
    assert -1.0 <= interval["low"] <= interval["high"] <= 1.0
    assert spearman_seed_interval(document["targets"]) == interval
    for name, row in document["targets"].items():
        steps = row["single_step"]
        apart = [
            -sum(
                abs(source - target)
                for source, target in zip(_levels(site), _levels(name), strict=True)
            )
            for site in steps
        ]
        expected = spearman(apart, [step["dice"] for step in steps.values()])
        assert row["spearman_factor_levels"] == pytest.approx(expected)
    assert "95% interval" in str(document["_readme"])
    assert "the generator's own factor distance" in str(document["_readme"])


def _levels(site: str) -> tuple[int, int]:
    _, appearance, anatomy = site.split("-")
    return (
        [level.name for level in APPEARANCES].index(appearance),
        [level.name for level in ANATOMIES].index(anatomy),
    )


def _interval_rows(dice_per_seed: list[list[float]]) -> dict[str, object]:
    distances = [0.1 * (index + 1) for index in range(len(dice_per_seed))]
    return {
        "T": {
            "single_step": {
                f"S{index}": {"distance": distance, "dice_per_seed": dice}
                for index, (distance, dice) in enumerate(
                    zip(distances, dice_per_seed, strict=True)
                )
            }
        }
    }


def test_spearman_seed_interval_collapses_when_every_seed_agrees() -> None:
    # Arrange: Dice falls with d at every seed, so every resample gives rho = 1.
    rows = _interval_rows([[0.9, 0.9, 0.9], [0.7, 0.7, 0.7], [0.5, 0.5, 0.5]])

    # Execute
    interval = spearman_seed_interval(rows, resamples=50)

    # Assert
    assert interval == {
        "low": 1.0,
        "high": 1.0,
        "level": 0.95,
        "resamples": 50,
        "seeds": 3,
    }


def test_spearman_seed_interval_spans_seeds_that_disagree() -> None:
    # Arrange: seed 0 ranks the sources as d does, seed 1 reverses them.
    rows = _interval_rows([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.3, 0.7]])

    # Execute
    interval = spearman_seed_interval(rows, resamples=200)

    # Assert: both seeds drawn twice give -1 and +1; the interval covers both.
    assert interval is not None
    assert interval["low"] == -1.0
    assert interval["high"] == 1.0


def test_spearman_seed_interval_needs_two_seeds() -> None:
    assert spearman_seed_interval(_interval_rows([[0.9], [0.7]])) is None


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        ({}, {}, "no target rows to resample"),
        ({"T": {}}, {}, "target T: its row has no single_step sources"),
        (
            _interval_rows([[0.9, 0.8], [0.7]]),
            {},
            r"target T: every source needs the same number of seeds, got \[1, 2\]",
        ),
        (_interval_rows([[0.9, 0.8]]), {"resamples": 0}, "resamples must be >= 1"),
        (_interval_rows([[0.9, 0.8]]), {"level": 1.0}, "level in \\(0, 1\\)"),
    ],
)
def test_spearman_seed_interval_refuses_bad_input(
    rows: dict[str, object], options: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        spearman_seed_interval(rows, **options)  # type: ignore[arg-type]


def test_tiny_run_calibrates_and_writes_the_weights(
    document: dict[str, object],
) -> None:
    # Assert: the fitted weights are in pyproject and chose the paths.
    calibration, weights = document["calibration"], document["weights"]
    assert isinstance(calibration, dict)
    assert isinstance(weights, dict)
    config = tomllib.loads(str(document["_pyproject"]))["tool"]["flwr"]["app"]
    affinity = config["config"]["affinity"]
    assert affinity["image-weight"] == calibration["image_weight"]
    assert affinity["label-weight"] == calibration["label_weight"]
    assert affinity["polarity-weight"] == calibration["polarity_weight"]
    assert weights["image_weight"] == calibration["image_weight"]
    assert weights["polarity_weight"] == calibration["polarity_weight"]
    assert calibration["spearman_fitted"] >= calibration["spearman_defaults"] - 1e-12
    two_terms = calibration["two_term_fit"]
    assert calibration["spearman_fitted"] >= two_terms["spearman"] - 1e-12
    # Every source's polarity term is recorded beside the other two.
    row = document["targets"]["T-bright-large"]  # type: ignore[index]
    for step in row["single_step"].values():
        assert 0.0 <= step["polarity_term"] <= 1.0
    # With c > 0 every target is scored under the paper's two-term fit too.
    paper = document["paper_form"]
    if calibration["polarity_weight"] > 0:
        assert isinstance(paper, dict)
        assert paper["weights"] == {
            "image_weight": two_terms["image_weight"],
            "label_weight": two_terms["label_weight"],
        }
        assert row["paper_form"]["chosen"]["path"][-1] == "T-bright-large"
        assert -1.0 <= paper["mean"]["spearman"] <= 1.0
    else:
        assert paper is None
    assert set(calibration["held_out_spearman"]) == {"T-bright-large", "I-dark-large"}


def test_tiny_run_writes_the_readme_block(document: dict[str, object]) -> None:
    readme = str(document["_readme"])
    assert "old" not in readme
    assert "| T-bright-large |" in readme
    assert "| **mean** |" in readme
    assert "Calibrated a = " in readme


def test_format_affinity_table_on_a_hand_made_document() -> None:
    # Arrange
    row = {
        "path": 0.8,
        "paper_path": 0.75,
        "direct_affinity_best": 0.7,
        "direct_oracle_best": 0.85,
        "random_path": 0.5,
        "spearman": 0.9,
        "spearman_factor_levels": 0.7,
        "chosen": {"path": ["L-a", "I-b", "T"], "direct_affinity_best": "I-b"},
    }
    document = {
        "machine": "CPU (test)",
        "seconds": 12.0,
        "targets": {"T": row},
        "mean": {**row, "paper_path": math.nan},
        "targets_met": {
            "path_beats_direct_affinity_best": True,
            "spearman_at_least_0.6": True,
        },
        "weights": {"image_weight": 1.0, "label_weight": 1.0, "polarity_weight": 0.5},
        "calibration": None,
        "paper_form": {
            "weights": {"image_weight": 1.0, "label_weight": 0.0875},
            "mean": {"spearman": 0.5, "path": 0.74, "direct_affinity_best": 0.7},
            "spearman_interval": {"low": 0.4, "high": 0.6},
        },
        "spearman_interval": {
            "low": 0.25,
            "high": 0.95,
            "level": 0.95,
            "resamples": 2000,
            "seeds": 10,
        },
        "recipe": {"scratch_epochs": 30, "finetune_epochs": 15},
    }

    # Execute
    table = format_affinity_table(document)

    # Assert
    lines = table.splitlines()
    assert lines[2] == "| T | 0.800 | 0.750 | 0.700 | 0.850 | 0.500 | 0.900 |"
    assert lines[3] == "| **mean** | 0.800 | — | 0.700 | 0.850 | 0.500 | 0.900 |"
    assert "- T: chosen L-a → I-b → T; paper —; affinity-best I-b;" in table
    assert (
        "Weights a = 1.000, b = 1.000, c = 0.500 (not calibrated in this run)" in table
    )
    assert (
        "The paper's two-term form (c = 0) at a = 1.000, b = 0.087 on the same Dice: "
        "mean Spearman 0.500 (interval [0.400, 0.600]), its chosen path 0.740, "
        "direct from its affinity-best source 0.700." in table
    )
    assert (
        "Spearman over the seeds: 95% interval [0.250, 0.950] (bootstrap of the 10 "
        "train.seed values, 2000 draws, at these weights)." in table
    )
    assert (
        "levels apart, which no site publishes) ranks the same one-step Dice at "
        "Spearman 0.700 (T 0.700)." in table
    )
    assert ": met (path above direct, Spearman ≥ 0.6)" in table
    assert "Measured on CPU (test) in 12 s." in table


def test_format_affinity_table_tolerates_an_empty_document() -> None:
    table = format_affinity_table({})
    assert "| **mean** | — | — | — | — | — | — |" in table


def test_target_cases_sets_the_generated_targets_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a generated chain federation (no --federation-dir) with 2 target
    # labels; the generated sites are cut to (1, 2) cases so that it runs in seconds.
    monkeypatch.setattr(affinity_benchmark, "CHAIN_CASES", (1, 2, 1))
    out = tmp_path / "affinity.json"

    # Execute
    code = run_tiny_affinity(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "--target-cases",
            "2",
            "--targets",
            "",
            "--seeds",
            "0",
            "--out",
            str(out),
            "--page",
            "",
        ]
    )

    # Assert: the federation's folder says 1-2-2 and the target trained on 2 cases.
    assert code == 0
    document = json.loads(out.read_text())
    assert str(document["federation"]).endswith("-cases1-2-2")
    assert document["recipe"]["target_labelled_cases"] == 2
    assert document["spearman_interval"] is None  # one seed: nothing to resample


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", r"--target-cases must be in \[1, 8\] .* got 0"),
        ("9", r"--target-cases must be in \[1, 8\] .* got 9"),
        ("two", "--target-cases must be an integer, got 'two'"),
    ],
)
def test_target_cases_option_refuses_bad_counts(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["affinity", "--target-cases", value])
    assert stopped.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_weights_at_rescales_the_larger_weight_to_one() -> None:
    assert weights_at(math.pi / 4) == (1.0, 1.0)
    assert weights_at(math.atan(0.5)) == (1.0, 0.5)


def test_fit_weights_finds_a_known_image_only_answer() -> None:
    # Arrange: Dice follows the image term, ties included; any b > 0 breaks them.
    pair = PairTerms(
        image=(0.5, 0.5, 0.1, 0.9),
        label=(0.2, 0.8, 0.5, 0.1),
        dice=(0.6, 0.6, 0.9, 0.1),
    )

    # Execute
    fit = fit_weights({"T": pair})

    # Assert
    assert (fit.image_weight, fit.label_weight) == (1.0, 0.0)
    assert fit.spearman == pytest.approx(1.0)
    assert mean_spearman({"T": pair}, image_weight=1.0, label_weight=1.0) < fit.spearman


def test_fit_weights_finds_the_polarity_term_when_it_ranks_best() -> None:
    # Arrange: Dice follows the polarity term; image and label terms mislead.
    pair = PairTerms(
        image=(0.9, 0.1, 0.5, 0.3),
        label=(0.8, 0.2, 0.6, 0.1),
        dice=(0.9, 0.2, 0.6, 0.4),
        polarity=(0.0, 1.0, 0.3, 0.6),
    )

    # Execute
    fit = fit_weights({"T": pair})
    two_terms = fit_weights({"T": pair}, polarity=False)

    # Assert
    assert fit.polarity_weight == 1.0
    assert fit.spearman == pytest.approx(1.0)
    assert two_terms.polarity_weight == 0.0
    assert two_terms.spearman < 0.0
    assert (
        mean_spearman(
            {"T": pair},
            image_weight=fit.image_weight,
            label_weight=fit.label_weight,
            polarity_weight=fit.polarity_weight,
        )
        == fit.spearman
    )


def test_fit_weights_keeps_the_paper_form_unless_polarity_ranks_strictly_better() -> (
    None
):
    # Every term ranks the sources alike: the tie goes to c = 0 and a = b = 1.
    pair = PairTerms(
        image=(0.1, 0.5, 0.9),
        label=(0.2, 0.4, 0.8),
        dice=(0.9, 0.5, 0.1),
        polarity=(0.0, 0.5, 1.0),
    )
    fit = fit_weights({"T": pair})
    assert (fit.image_weight, fit.label_weight, fit.polarity_weight) == (1.0, 1.0, 0.0)


def test_weights_at_direction_nests_the_two_term_grid() -> None:
    for degrees in (0, 5, 45, 90):
        angle = math.radians(degrees)
        assert weights_at_direction(angle, 0.0) == (*weights_at(angle), 0.0)
    assert weights_at_direction(0.0, math.radians(45)) == (1.0, 0.0, 1.0)


def test_mean_spearman_refuses_a_polarity_weight_without_polarity_terms() -> None:
    pair = PairTerms(image=(0.1, 0.5), label=(0.2, 0.4), dice=(0.9, 0.5))
    with pytest.raises(ValueError, match="target T has no polarity terms"):
        mean_spearman(
            {"T": pair}, image_weight=1.0, label_weight=0.0, polarity_weight=1
        )


def test_fit_weights_prefers_the_defaults_on_a_tie() -> None:
    # Both terms rank the sources alike: every angle ties, a = b = 1 wins.
    pair = PairTerms(image=(0.1, 0.5, 0.9), label=(0.2, 0.4, 0.8), dice=(0.9, 0.5, 0.1))
    fit = fit_weights({"T": pair})
    assert (fit.image_weight, fit.label_weight, fit.spearman) == (1.0, 1.0, 1.0)


def test_fit_leave_one_out_needs_two_targets() -> None:
    pair = PairTerms(image=(0.1, 0.5, 0.9), label=(0.2, 0.4, 0.8), dice=(0.9, 0.5, 0.1))
    assert fit_leave_one_out({"T": pair}) == {}
    assert fit_leave_one_out({"T": pair, "U": pair}) == {"T": 1.0, "U": 1.0}


def test_fit_weights_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no targets to correlate"):
        fit_weights({})
    pair = PairTerms(image=(0.1, 0.5), label=(0.2, 0.4), dice=(0.9, 0.5))
    with pytest.raises(ValueError, match="at least 2 steps"):
        fit_weights({"T": pair}, steps=1)
    with pytest.raises(ValueError, match="one value per source"):
        PairTerms(image=(0.1,), label=(0.2, 0.4), dice=(0.9, 0.5))
    with pytest.raises(ValueError, match="1 polarity"):
        PairTerms(image=(0.1, 0.2), label=(0.2, 0.4), dice=(0.9, 0.5), polarity=(0.1,))


def test_write_affinity_weights_changes_only_the_two_values(tmp_path: Path) -> None:
    # Arrange
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT)

    # Execute
    write_affinity_weights(pyproject, image_weight=0.3249, label_weight=1.0)

    # Assert: comments keep their column; the other section's key is untouched.
    expected = PYPROJECT.replace(
        "image-weight = 1.0       # a", "image-weight = 0.3249    # a"
    )
    assert pyproject.read_text() == expected
    assert read_affinity_weights(pyproject) == (0.3249, 1.0)
    assert read_polarity_weight(pyproject) == 0.0

    # Execute: the polarity weight too
    write_affinity_weights(
        pyproject, image_weight=0.85, label_weight=0.0, polarity_weight=1.0
    )

    # Assert
    assert read_affinity_weights(pyproject) == (0.85, 0.0)
    assert read_polarity_weight(pyproject) == 1.0
    assert "polarity-weight = 1.0    # c\n" in pyproject.read_text()


def test_write_affinity_weights_refuses_a_missing_polarity_line(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    text = PYPROJECT.replace("polarity-weight = 0.0    # c\n", "")
    pyproject.write_text(text)
    write_affinity_weights(pyproject, image_weight=1.0, label_weight=0.5)  # no c: ok
    with pytest.raises(ValueError, match="has no polarity-weight line"):
        write_affinity_weights(
            pyproject, image_weight=1.0, label_weight=0.5, polarity_weight=0.5
        )
    assert read_polarity_weight(pyproject) == 0.0


def test_write_affinity_weights_refuses_a_missing_section(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[tool.flwr.app.config.train]\nepochs = 3\n")
    with pytest.raises(ValueError, match=r"no \[tool\.flwr\.app\.config\.affinity\]"):
        write_affinity_weights(pyproject, image_weight=1.0, label_weight=0.5)


def test_write_affinity_weights_refuses_a_missing_key(tmp_path: Path) -> None:
    # The key exists in another section only: still refused, file unchanged.
    pyproject = tmp_path / "pyproject.toml"
    text = PYPROJECT.replace("label-weight = 1.0       # b\n", "")
    pyproject.write_text(text)
    with pytest.raises(ValueError, match="has no label-weight line"):
        write_affinity_weights(pyproject, image_weight=1.0, label_weight=0.5)
    assert pyproject.read_text() == text


def test_write_affinity_weights_refuses_a_negative_weight(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT)
    with pytest.raises(ValueError, match="label-weight must be finite and >= 0"):
        write_affinity_weights(pyproject, image_weight=1.0, label_weight=-0.1)


def test_random_path_is_seeded_and_checks_hops() -> None:
    path = random_path(["A", "B", "C"], "T", hops=2, seed=3)
    assert path == random_path(["C", "B", "A"], "T", hops=2, seed=3)
    assert path[-1] == "T"
    assert len(set(path)) == 3
    with pytest.raises(ValueError, match=r"hops must be in \[1, 3\]"):
        random_path(["A", "B", "C"], "T", hops=4, seed=0)


def test_few_label_view_keeps_the_first_cases(federation: Path, tmp_path: Path) -> None:
    view = few_label_view(
        federation / "I-dark-large", tmp_path / "view", num_labelled=1
    )
    assert len(list((view / "labelsTr").iterdir())) == 1
    assert len(list((view / "labelsTs").iterdir())) == 6
    with pytest.raises(ValueError, match="already exists"):
        few_label_view(federation / "I-dark-large", view, num_labelled=1)
    with pytest.raises(ValueError, match=">= 1 labelled case"):
        few_label_view(federation / "I-dark-large", tmp_path / "v2", num_labelled=0)


def test_read_federation_roles_needs_federation_toml(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"federation\.toml: missing"):
        read_federation_roles(tmp_path)
    (tmp_path / "federation.toml").write_text('target = "T"\n')
    with pytest.raises(ValueError, match="no landmarks entry"):
        read_federation_roles(tmp_path)


def test_run_affinity_refuses_an_unknown_target(federation: Path) -> None:
    config = build_affinity_config(TINY_AFFINITY)
    with pytest.raises(ValueError, match="must be distinct sites"):
        run_affinity(config, federation_dir=federation, targets=["Nowhere"])


@pytest.mark.parametrize("seeds", [(), (1, 1)])
def test_run_affinity_refuses_bad_seeds(
    federation: Path, seeds: tuple[int, ...]
) -> None:
    config = build_affinity_config(TINY_AFFINITY)
    with pytest.raises(ValueError, match="seeds must be distinct and at least one"):
        run_affinity(config, federation_dir=federation, seeds=seeds)


def test_average_single_steps_refuses_mismatched_seeds() -> None:
    with pytest.raises(ValueError, match="no seed's one-step Dice"):
        average_single_steps([])
    first = {"A": {"zero_shot_dice": 0.1, "dice": 0.5}}
    with pytest.raises(ValueError, match="every seed must measure the same sources"):
        average_single_steps([first, {"B": {"zero_shot_dice": 0.1, "dice": 0.5}}])


def test_build_recipe_fine_tunes_with_the_run_configs_affinity_recipe() -> None:
    config = build_affinity_config(
        {"affinity.finetune-epochs": 4, "affinity.finetune-learning-rate": 1e-4}
    )
    recipe = build_recipe(config)
    assert recipe.scratch.train.epochs == 30
    assert (recipe.finetune.train.epochs, recipe.finetune.train.learning_rate) == (
        4,
        1e-4,
    )
    with pytest.raises(ValueError, match=r"affinity\.finetune-epochs must be >= 1"):
        build_affinity_config({"affinity.finetune-epochs": 0})
