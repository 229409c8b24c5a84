"""The semisup-options benchmark on a tiny federation: arms, summary, table, merge."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from simulations.benchmark.cli import main
from simulations.benchmark.semisup_options import (
    ARMS,
    SEMISUP_OPTIONS_MARKER,
    arm_config,
    format_options_table,
    last_rounds_mean,
    merge_options_documents,
    parse_arms,
    summarise_options,
)
from tests.unit.simulations.benchmark.test_semisup import TINY_SEMISUP

# The baselines and the personalised arm: the others train the same way (the CI
# suite is near its time budget; the options themselves are tested in core/semisup).
TINY_ARMS = ("supervised", "mean-teacher", "ugmcl+local-norm")


def _args(federation: Path, folder: Path, seed: int) -> list[str]:
    page = folder / "page.md"
    page.write_text(
        f"# x\n\n<!-- {SEMISUP_OPTIONS_MARKER} -->\nold\n"
        f"<!-- /{SEMISUP_OPTIONS_MARKER} -->\n"
    )
    overrides = [
        f"--set={key}={value}"
        for key, value in TINY_SEMISUP.items()
        if key != "semisup.iterations"
    ]
    return [
        "semisup-options",
        "--federation-dir",
        str(federation),
        "--out",
        str(folder / f"seed{seed}.json"),
        "--page",
        str(page),
        "--threads=1",
        f"--seeds={seed}",
        "--last-rounds=1",
        f"--arms={','.join(TINY_ARMS)}",
        *overrides,
    ]


@pytest.fixture(scope="module")
def documents(
    federation: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, object]]:
    """Seed 0 and seed 1 documents of one tiny run each (:data:`TINY_ARMS`)."""
    folder = tmp_path_factory.mktemp("options")
    threads = torch.get_num_threads()
    found = []
    try:
        for seed in (0, 1):
            assert main(_args(federation, folder, seed)) == 0
            document = json.loads((folder / f"seed{seed}.json").read_text())
            document["_page"] = (folder / "page.md").read_text()
            found.append(document)
    finally:
        torch.set_num_threads(threads)
    return found


def test_every_arm_reports_dice_sites_and_the_clip_fraction(
    documents: list[dict[str, object]],
) -> None:
    # Prepare
    document = documents[0]
    arms = document["arms"]
    assert isinstance(arms, dict)

    # Assert
    assert list(arms) == list(TINY_ARMS)
    for name, entry in arms.items():
        assert 0.0 <= entry["last_mean"] <= 1.0
        assert set(entry["sites"]) == {"A", "B", "C"}
        assert 0.0 <= entry["clipped_fraction"] <= 1.0
        assert entry["personalised"] == (name == "ugmcl+local-norm")
    detail = document["detail"]["0"]  # type: ignore[index]
    for run in detail.values():
        assert len(run["rounds"]) == 2
        assert set(run["site_clipped"]) == {"A", "B", "C"}
        assert all(len(values) == 2 for values in run["site_rounds"].values())


def test_paired_differences_are_against_both_baselines(
    documents: list[dict[str, object]],
) -> None:
    # Prepare
    paired = documents[0]["paired"]
    arms = documents[0]["arms"]
    assert isinstance(paired, dict)
    assert isinstance(arms, dict)

    # Assert
    assert set(paired) == {"ugmcl+local-norm"}
    for arm, against in paired.items():
        for baseline, entry in against.items():
            expected = arms[arm]["last_mean"] - arms[baseline]["last_mean"]
            assert entry["mean"] == pytest.approx(expected)
            assert entry["low"] <= entry["mean"] <= entry["high"]
            assert entry["seed_site"]["count"] == 3


def test_the_page_block_is_the_table(documents: list[dict[str, object]]) -> None:
    # Prepare
    page = documents[1]["_page"]
    assert isinstance(page, str)

    # Assert
    assert "| ugmcl+local-norm (personalised) |" in page
    assert "Δ supervised [95% CI]" in page
    assert "old" not in page


def test_merge_joins_the_seeds_as_one_run_would(
    documents: list[dict[str, object]],
) -> None:
    # Execute
    merged = merge_options_documents(documents)

    # Assert
    assert merged["seeds"] == [0, 1]
    arms = merged["arms"]
    assert isinstance(arms, dict)
    for name, entry in arms.items():
        per_seed = [
            document["arms"][name]["last_mean"]  # type: ignore[index]
            for document in documents
        ]
        assert entry["per_seed"] == per_seed
        assert entry["last_mean"] == pytest.approx(sum(per_seed) / 2)
    assert "the sum of 2 runs" in format_options_table(merged)


def test_merge_joins_arms_run_apart(documents: list[dict[str, object]]) -> None:
    # Prepare: seed 0's document split into two, by arm
    def only(arms: tuple[str, ...]) -> dict[str, object]:
        detail = documents[0]["detail"]
        assert isinstance(detail, dict)
        return {
            **documents[0],
            "detail": {"0": {arm: detail["0"][arm] for arm in arms}},
        }

    # Execute
    merged = merge_options_documents([only(TINY_ARMS[:2]), only(TINY_ARMS[2:])])

    # Assert
    assert merged["arm_names"] == list(TINY_ARMS)
    assert merged["arms"] == documents[0]["arms"]
    assert merged["paired"] == documents[0]["paired"]


def test_merge_rejects_another_setup(documents: list[dict[str, object]]) -> None:
    with pytest.raises(ValueError, match="differs in last_rounds"):
        merge_options_documents([documents[0], {**documents[1], "last_rounds": 3}])


def test_merge_rejects_a_seed_without_every_arm(
    documents: list[dict[str, object]],
) -> None:
    # Prepare: seed 1 with the supervised arm alone
    detail = documents[1]["detail"]
    assert isinstance(detail, dict)
    partial = {
        **documents[1],
        "detail": {"1": {"supervised": detail["1"]["supervised"]}},
    }

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"missing: seed 1: mean-teacher, ugmcl\+local-norm$"
    ):
        merge_options_documents([documents[0], partial])


def test_merge_refuses_an_arm_run_twice_at_a_seed(
    documents: list[dict[str, object]],
) -> None:
    with pytest.raises(ValueError, match=r"seed 0: arms \['mean-teacher'"):
        merge_options_documents([documents[0], documents[0]])


def test_merge_needs_two_documents_of_this_benchmark() -> None:
    with pytest.raises(ValueError, match="at least two"):
        merge_options_documents([{}])
    with pytest.raises(ValueError, match="not a semisup-options document"):
        merge_options_documents([{}, {}])


def test_parse_arms_keeps_the_run_order_and_rejects_unknown_names() -> None:
    assert parse_arms("ugmcl+local-norm,supervised") == (
        "supervised",
        "ugmcl+local-norm",
    )
    with pytest.raises(argparse.ArgumentTypeError, match="each must be one of"):
        parse_arms("ugmcl,fixmatch")
    with pytest.raises(argparse.ArgumentTypeError, match="once"):
        parse_arms("ugmcl,ugmcl")


def test_arm_config_sets_the_arms_keys_and_refuses_a_clashing_override() -> None:
    # Execute
    config = arm_config({}, "ugmcl+global-teacher", fraction=0.2, seed=3)

    # Assert
    assert config.semisup.teacher.value == "global"
    assert config.semisup.labelled_fraction == 0.2
    assert config.train.seed == 3
    with pytest.raises(ValueError, match="what arm 'ugmcl\\+local-norm' sets"):
        arm_config(
            {"semisup.local-norm": False}, "ugmcl+local-norm", fraction=0.2, seed=0
        )


def test_last_rounds_mean() -> None:
    assert last_rounds_mean([0.2, 0.4, 0.6], 5) == pytest.approx(0.4)
    assert last_rounds_mean([], 5) != last_rounds_mean([], 5)  # nan


def _fake_run(dice: float) -> dict[str, object]:
    return {
        "last_mean": dice,
        "site_last_mean": {"A": dice, "B": dice},
        "clipped_fraction": 0.5,
    }


def test_a_personalised_ugmcl_arm_is_compared_with_personalised_baselines() -> None:
    # Prepare: FedBN adds 0.1 to every variant; UG-MCL adds 0.02 to supervised
    base = {"supervised": 0.5, "mean-teacher": 0.55, "ugmcl": 0.52}
    dice = {
        **base,
        **{f"{arm}+local-norm": value + 0.1 for arm, value in base.items()},
    }
    arms = [arm for arm in ARMS if arm in dice]
    detail = {
        seed: {arm: _fake_run(value + shift) for arm, value in dice.items()}
        for seed, shift in (("0", 0.0), ("1", 0.01))
    }

    # Execute
    summary = summarise_options(detail, arms=arms, last=5)
    table = format_options_table({**summary, "site_names": ["A", "B"], "seeds": [0, 1]})

    # Assert
    paired = summary["paired"]
    assert isinstance(paired, dict)
    fedbn = paired["ugmcl+local-norm"]
    assert set(fedbn) == {
        "supervised",
        "mean-teacher",
        "supervised+local-norm",
        "mean-teacher+local-norm",
    }
    assert fedbn["supervised"]["mean"] == pytest.approx(0.12)
    assert fedbn["supervised+local-norm"]["mean"] == pytest.approx(0.02)
    assert set(paired["supervised+local-norm"]) == {"supervised", "mean-teacher"}
    row = next(line for line in table.splitlines() if "| ugmcl+local-norm" in line)
    assert "0.020 [0.020, 0.020] (personalised)" in row
