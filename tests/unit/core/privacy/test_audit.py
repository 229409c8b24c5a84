from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cli import main, parse_run_config
from core.config import RunConfig, load_default_config
from core.data.dataset import SiteDataError
from core.privacy.audit import (
    AuditCases,
    MiaAttack,
    ReferenceLosses,
    audit_site,
    bootstrap_auc_interval,
    build_audit_cases,
    compute_auc,
    compute_case_losses,
    plan_reference_halves,
    read_audit_weights,
    score_membership,
)
from core.training.job import train_source_model
from core.training.networks import Arrays, build_model, get_weights, save_weights

# conftest's tiny sizes, trained long enough without augmentation to memorise the
# members.
OVERFIT: dict[str, bool | int | float | str] = {
    "data.image-size": 32,
    "data.max-slices-per-case": 3,
    "model.channels": "4,8",
    "model.strides": "2",
    "train.device": "cpu",
    "train.epochs": 40,
    "train.batch-size": 2,
    "train.learning-rate": 0.01,
    "train.augment": False,
}
RUN_CONFIG_TEXT = " ".join(
    f'{key}="{value}"' if isinstance(value, str) else f"{key}={str(value).lower()}"
    for key, value in OVERFIT.items()
)


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return load_default_config(**OVERFIT)


@pytest.fixture(scope="module")
def trained(federation: Path, config: RunConfig) -> Arrays:
    """Site B's model, trained on its two labelled cases (the members)."""
    return train_source_model(federation / "B", config).weights


def brute_force_auc(members: list[float], nonmembers: list[float]) -> float:
    pairs = list(itertools.product(members, nonmembers))
    return sum(1.0 if m > n else 0.5 if m == n else 0.0 for m, n in pairs) / len(pairs)


@pytest.mark.parametrize(
    ("members", "nonmembers", "expected"),
    [
        ([1.0, 2.0], [0.0, 0.0], 1.0),
        ([0.0], [1.0], 0.0),
        ([1.0, 1.0], [1.0, 1.0], 0.5),
        ([3.0, 2.0], [1.0, 2.0], 0.875),
        ([1.0, 2.0, 3.0], [2.0, 2.0], 0.5),
        ([0.9, 0.8, 0.3], [0.5, 0.3, 0.1], 7.5 / 9),
    ],
)
def test_auc_matches_hand_computed_cases_with_ties(
    members: list[float], nonmembers: list[float], expected: float
) -> None:
    # Execute
    actual = compute_auc(members, nonmembers)

    # Assert
    assert actual == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_the_pairwise_definition(seed: int) -> None:
    # Prepare: coarse values so that ties are frequent
    rng = np.random.default_rng(seed)
    members = rng.integers(0, 5, 13).astype(float).tolist()
    nonmembers = rng.integers(0, 5, 7).astype(float).tolist()

    # Execute
    actual = compute_auc(members, nonmembers)

    # Assert
    assert actual == pytest.approx(brute_force_auc(members, nonmembers), abs=1e-12)


def test_auc_without_a_class_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        compute_auc([], [1.0])


def test_bootstrap_interval_is_seeded_and_contains_the_estimate() -> None:
    # Prepare
    members = [0.9, 0.8, 0.75, 0.6, 0.55, 0.4, 0.3]
    nonmembers = [0.7, 0.5, 0.45, 0.35, 0.2, 0.1]
    estimate = compute_auc(members, nonmembers)

    # Execute
    first = bootstrap_auc_interval(members, nonmembers, resamples=300, seed=3)
    again = bootstrap_auc_interval(members, nonmembers, resamples=300, seed=3)
    other = bootstrap_auc_interval(members, nonmembers, resamples=300, seed=4)

    # Assert
    assert first == again
    assert first != other
    assert 0.0 <= first[0] <= estimate <= first[1] <= 1.0
    assert first[0] < first[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resamples": 0, "seed": 0}, "resamples must be >= 1"),
        ({"resamples": 10, "seed": 0, "level": 1.0}, r"level must be in \(0, 1\)"),
    ],
)
def test_bootstrap_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_auc_interval([1.0], [0.0], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("cases", "references"), [(7, 4), (10, 3), (2, 2)])
def test_reference_halves_leave_every_case_out_of_half_the_references(
    cases: int, references: int
) -> None:
    # Execute
    masks = plan_reference_halves(cases, references=references, seed=0)

    # Assert
    assert masks.shape == (references, cases)
    assert (np.sum(~masks, axis=0) >= references // 2).all()
    assert set(masks.sum(axis=1).tolist()) <= {cases // 2, cases - cases // 2}
    assert (plan_reference_halves(cases, references=references, seed=0) == masks).all()


def test_calibrated_score_subtracts_the_unseen_reference_loss() -> None:
    # Prepare: case 0 was seen by reference 0, case 1 by reference 1
    reference = ReferenceLosses(
        case_ids=("a", "b"),
        losses=np.array([[0.1, 2.0], [5.0, 0.2]]),
        trained_on=np.array([[True, False], [False, True]]),
    )
    target = np.array([1.0, 1.0])

    # Execute
    calibrated = score_membership(MiaAttack.CALIBRATED_LOSS, target, reference)
    threshold = score_membership(MiaAttack.LOSS_THRESHOLD, target, None)

    # Assert
    assert calibrated.tolist() == pytest.approx([4.0, 1.0])
    assert threshold.tolist() == [-1.0, -1.0]
    with pytest.raises(ValueError, match="calibrated-loss needs reference losses"):
        score_membership(MiaAttack.CALIBRATED_LOSS, target, None)


def test_case_losses_average_each_cases_slices(
    federation: Path, config: RunConfig
) -> None:
    # Prepare
    cases = build_audit_cases(federation / "B", config)
    model = build_model(config.model, data=config.data)
    single = dataclasses.replace(
        cases.slices.subset_cases([1]), case_ids=(cases.slices.case_ids[1],)
    )

    # Execute
    losses = compute_case_losses(model, cases.slices, device=torch.device("cpu"))
    alone = compute_case_losses(model, single, device=torch.device("cpu"), batch_size=1)

    # Assert
    assert losses.shape == (len(cases.slices.case_ids),)
    assert losses[1] == pytest.approx(alone[0], rel=1e-5)
    assert cases.num_members == 2
    assert cases.is_member.tolist() == [True, True] + [False] * 6


def test_an_overfitted_model_gives_its_members_away(
    federation: Path, config: RunConfig, trained: Arrays
) -> None:
    # Prepare: references with a shorter recipe keep the test fast
    short = dataclasses.replace(
        config, train=dataclasses.replace(config.train, epochs=10)
    )

    # Execute
    results = audit_site(
        federation / "B",
        trained,
        short,
        references=2,
        resamples=200,
        seed=0,
    )

    # Assert
    by_attack = {result.attack: result for result in results}
    assert set(by_attack) == {"loss-threshold", "calibrated-loss"}
    for result in results:
        assert result.auc > 0.5
        assert result.ci[0] <= result.auc <= result.ci[1]
        assert (result.n_members, result.n_nonmembers) == (2, 6)
    assert by_attack["calibrated-loss"].references == 2
    assert by_attack["loss-threshold"].references == 0


def copy_site(federation: Path, tmp_path: Path, remove: str) -> Path:
    site = tmp_path / "B"
    shutil.copytree(federation / "B", site)
    shutil.rmtree(site / remove)
    return site


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("labelsTs", r"B: no labelled held-out cases \(imagesTs with labelsTs\)"),
        ("labelsTr", r"B: no labelled training cases \(imagesTr with labelsTr\)"),
    ],
)
def test_a_site_without_members_or_nonmembers_is_named(
    federation: Path,
    tmp_path: Path,
    config: RunConfig,
    trained: Arrays,
    remove: str,
    message: str,
) -> None:
    # Prepare
    site = copy_site(federation, tmp_path, remove)

    # Execute / Assert
    with pytest.raises(SiteDataError, match=message):
        audit_site(site, trained, config, attacks=[MiaAttack.LOSS_THRESHOLD])


def test_weights_of_another_architecture_are_refused(
    federation: Path, tmp_path: Path, config: RunConfig
) -> None:
    # Prepare
    other = load_default_config(**{**OVERFIT, "model.channels": "8,16"})
    path = tmp_path / "other.npz"
    save_weights(get_weights(build_model(other.model, data=other.data)), path)

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"other\.npz: do not fit the configured architecture"
    ):
        read_audit_weights(path, config)
    with pytest.raises(ValueError, match="weights: do not fit the configured"):
        audit_site(
            federation / "B",
            read_audit_weights(path, other),
            config,
            attacks=[MiaAttack.LOSS_THRESHOLD],
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "model file not found"), (b"not a zip", r"not a weights file \(\.npz\)")],
)
def test_a_missing_or_broken_model_file_is_named(
    tmp_path: Path, config: RunConfig, content: bytes | None, message: str
) -> None:
    # Prepare
    path = tmp_path / "model.npz"
    if content is not None:
        path.write_bytes(content)

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"model\.npz: {message}"):
        read_audit_weights(path, config)


def test_reference_losses_of_other_cases_are_refused(
    federation: Path, config: RunConfig, trained: Arrays
) -> None:
    # Prepare
    from core.privacy.audit import attack_membership

    cases: AuditCases = build_audit_cases(federation / "B", config)
    stale = ReferenceLosses(
        case_ids=("x",), losses=np.zeros((2, 1)), trained_on=np.zeros((2, 1), bool)
    )

    # Execute / Assert
    with pytest.raises(ValueError, match="computed on other cases"):
        attack_membership(
            cases,
            trained,
            config,
            attacks=list(MiaAttack),
            reference=stale,
            resamples=10,
            seed=0,
        )


def test_run_config_text_parses_like_flower() -> None:
    # Execute
    actual = parse_run_config(RUN_CONFIG_TEXT)

    # Assert
    assert actual == OVERFIT
    with pytest.raises(ValueError, match="is not a TOML value"):
        parse_run_config("train.device=cpu")


def test_cli_audits_a_model_end_to_end(
    federation: Path,
    tmp_path: Path,
    trained: Arrays,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    model = tmp_path / "model.npz"
    save_weights(trained, model)
    out = tmp_path / "audit" / "mia.json"

    # Execute
    exit_code = main(
        [
            "audit",
            "mia",
            "--site",
            str(federation / "B"),
            "--model",
            str(model),
            "--references",
            "2",
            "--bootstrap",
            "100",
            "--run-config",
            # Short reference training: the AUC checked below needs none.
            f"{RUN_CONFIG_TEXT} train.epochs=5",
            "--json",
            str(out),
        ]
    )

    # Assert
    assert exit_code == 0
    output = capsys.readouterr().out
    assert "training reference 2/2" in output
    assert "loss-threshold" in output
    assert "calibrated-loss" in output
    document = json.loads(out.read_text())
    assert [row["attack"] for row in document["results"]] == [
        "loss-threshold",
        "calibrated-loss",
    ]
    assert document["results"][0]["n_members"] == 2
    assert document["results"][0]["auc"] > 0.5


@pytest.mark.parametrize(
    ("site", "model", "message"),
    [
        ("missing-site", "model.npz", "site folder not found"),
        ("B", "missing.npz", "missing.npz: model file not found"),
        ("B", "wrong.npz", "do not fit the configured architecture"),
    ],
)
def test_cli_reports_a_bad_site_or_model_with_exit_code_1(
    federation: Path,
    tmp_path: Path,
    trained: Arrays,
    capsys: pytest.CaptureFixture[str],
    site: str,
    model: str,
    message: str,
) -> None:
    # Prepare
    save_weights(trained, tmp_path / "model.npz")
    save_weights({"bias": np.zeros(3, np.float32)}, tmp_path / "wrong.npz")

    # Execute
    exit_code = main(
        [
            "audit",
            "mia",
            "--site",
            str(federation / site),
            "--model",
            str(tmp_path / model),
            "--attack",
            "loss-threshold",
            "--run-config",
            RUN_CONFIG_TEXT,
        ]
    )

    # Assert
    assert exit_code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    assert message in error
