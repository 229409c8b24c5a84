from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from core.config import Norm, RunConfig, load_default_config
from core.data.dataset import SiteDataError, build_slice_set, index_site, read_case
from core.data.io import read_volume
from core.data.synthetic import EVALUATION_CASES_PER_SITE
from core.privacy.dp import (
    AccountantState,
    DpSettings,
    PrivacyBudgetError,
    dp_sgd_schedule,
    read_accountant_state,
    write_accountant_state,
)
from core.training.evaluation import (
    SEGMENTATIONS_MANIFEST,
    evaluate_predictors,
    release_evaluation,
    score_predictors,
    write_segmentations,
)
from core.training.job import (
    SourceTraining,
    build_initial_weights,
    build_model_with,
    train_source_model,
)
from core.training.networks import Arrays, build_model, get_manifest
from core.training.postprocess import keep_largest_component
from core.training.scoring import score_on_native_grid
from core.training.trainer import predict_mixture, predicted_classes
from core.transfer.job import adapt_target, score_candidates

NUM_TRAIN = 2  # labelled training cases per site of the shared federation (conftest)
SLICES = 3


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return load_default_config(
        **{
            "data.image-size": 32,
            "data.max-slices-per-case": SLICES,
            "train.epochs": 1,
            "train.device": "cpu",
            "adapt.epochs": 1,
            "model.channels": "4,8",
            "model.strides": "2",
        }
    )


@pytest.fixture(scope="module")
def trained(federation: Path, config: RunConfig) -> dict[str, SourceTraining]:
    """Source models of sites B and C, trained once from the same initial weights."""
    initial = build_initial_weights(config)
    return {
        name: train_source_model(federation / name, config, initial_weights=initial)
        for name in ("C", "B")
    }


@pytest.fixture(scope="module")
def candidates(trained: dict[str, SourceTraining]) -> dict[str, Arrays]:
    return {name: result.weights for name, result in trained.items()}


def copy_site(federation: Path, name: str, destination: Path) -> Path:
    return Path(shutil.copytree(federation / name, destination / name))


# --- train.source --------------------------------------------------------------------


def test_train_source_model_returns_weights_of_the_manifest(
    trained: dict[str, SourceTraining], config: RunConfig
) -> None:
    # Prepare
    manifest = get_manifest(build_model(config.model, data=config.data))

    # Execute
    result = trained["B"]

    # Assert
    assert {name: array.shape for name, array in result.weights.items()} == manifest
    assert all(array.dtype == np.float32 for array in result.weights.values())
    assert result.num_cases == NUM_TRAIN
    assert result.num_examples == config.train.epochs * NUM_TRAIN * SLICES
    assert math.isfinite(result.final_loss)
    assert result.device == "cpu"


def test_train_source_model_counts_samples_over_epochs(
    federation: Path, config: RunConfig
) -> None:
    # Prepare
    two_epochs = load_default_config(
        **{
            "data.image-size": 16,
            "data.max-slices-per-case": 2,
            "train.epochs": 2,
            "train.device": "cpu",
            "model.channels": "4,8",
            "model.strides": "2",
        }
    )

    # Execute
    result = train_source_model(federation / "C", two_epochs)

    # Assert
    assert result.num_examples == 2 * NUM_TRAIN * 2


def test_train_source_model_is_deterministic_from_the_same_initial_weights(
    federation: Path, config: RunConfig, trained: dict[str, SourceTraining]
) -> None:
    # Execute
    again = train_source_model(
        federation / "B", config, initial_weights=build_initial_weights(config)
    )

    # Assert
    for name, array in trained["B"].weights.items():
        np.testing.assert_array_equal(again.weights[name], array, err_msg=name)


def test_train_source_model_needs_labelled_cases(
    federation: Path, config: RunConfig, tmp_path: Path
) -> None:
    # Prepare
    site = copy_site(federation, "B", tmp_path)
    for label in (site / "labelsTr").iterdir():
        label.unlink()

    # Execute / Assert
    with pytest.raises(
        SiteDataError, match=rf"{re.escape(str(site))}: no labelled training cases"
    ):
        train_source_model(site, config)


def test_train_source_model_rejects_initial_weights_of_another_network(
    federation: Path, config: RunConfig
) -> None:
    # Prepare
    other = load_default_config(
        **{"data.image-size": 32, "model.channels": "4,16", "model.strides": "2"}
    )

    # Execute / Assert
    with pytest.raises(ValueError, match="weights do not match the model manifest"):
        train_source_model(
            federation / "B", config, initial_weights=build_initial_weights(other)
        )


DP = DpSettings(
    noise_multiplier=1.0,
    target_epsilon=None,
    delta=1e-5,
    max_grad_norm=1.0,
    budget_epsilon=1000.0,
)


def test_train_source_model_with_dp_records_epsilon_in_the_accountant(
    federation: Path, config: RunConfig, tmp_path: Path
) -> None:
    # Prepare
    accountant = tmp_path / "state" / "accountant.json"

    # Execute
    first = train_source_model(
        federation / "B", config, dp=DP, accountant_path=accountant
    )
    second = train_source_model(
        federation / "B", config, dp=DP, accountant_path=accountant
    )

    # Assert
    assert first.privacy is not None
    assert second.privacy is not None
    rate, steps = dp_sgd_schedule(
        NUM_TRAIN * SLICES,
        batch_size=config.train.batch_size,
        epochs=config.train.epochs,
    )
    assert read_accountant_state(accountant).history == ((1.0, rate, steps),) * 2
    # Each case contributes SLICES slices: the patient-level figures say so.
    assert read_accountant_state(accountant).units_per_case == (SLICES, SLICES)
    assert first.privacy.units_per_case == SLICES
    assert first.privacy.patient_epsilon_spent > first.privacy.epsilon_spent
    assert second.privacy.patient_epsilon_total == pytest.approx(
        read_accountant_state(accountant).patient_epsilon(1e-5)
    )
    assert first.privacy.epsilon_spent > 0.0
    assert first.privacy.epsilon_total == pytest.approx(first.privacy.epsilon_spent)
    assert second.privacy.epsilon_total > first.privacy.epsilon_total
    saved = read_accountant_state(accountant)
    assert len(saved.history) == 2
    assert saved.epsilon(DP.delta) == pytest.approx(second.privacy.epsilon_total)
    assert get_manifest_of(first.weights) == get_manifest(
        build_model(config.model, data=config.data)
    )


def get_manifest_of(weights: Arrays) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in weights.items()}


def test_train_source_model_without_dp_has_no_privacy_result(
    trained: dict[str, SourceTraining],
) -> None:
    # Assert
    assert trained["B"].privacy is None


def test_train_source_model_over_budget_leaves_the_accountant_unchanged(
    federation: Path, config: RunConfig, tmp_path: Path
) -> None:
    # Prepare
    accountant = tmp_path / "accountant.json"
    train_source_model(federation / "B", config, dp=DP, accountant_path=accountant)
    before = accountant.read_bytes()
    tight = DpSettings(
        noise_multiplier=1.0,
        target_epsilon=None,
        delta=1e-5,
        max_grad_norm=1.0,
        budget_epsilon=read_accountant_state(accountant).epsilon(1e-5) + 1e-3,
    )

    # Execute / Assert
    with pytest.raises(PrivacyBudgetError, match="refused before training"):
        train_source_model(
            federation / "B", config, dp=tight, accountant_path=accountant
        )
    assert accountant.read_bytes() == before


def test_train_source_model_refuses_dp_with_batch_norm(
    federation: Path, config: RunConfig
) -> None:
    # Prepare
    batch_norm = dataclasses.replace(
        config, model=dataclasses.replace(config.model, norm=Norm.BATCH)
    )

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"model\.norm 'batch' keeps running statistics"
    ):
        train_source_model(federation / "B", batch_norm, dp=DP)


# --- query.lftm ----------------------------------------------------------------------


def test_score_candidates_gives_one_row_per_case_and_one_column_per_candidate(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Execute
    lines: list[str] = []
    transferability = score_candidates(
        federation / "A", candidates, config, progress=lines.append
    )

    # Assert: one progress line per candidate, counting them with the ETA
    assert [re.sub(r" \(.*\)$", "", line).split(", ")[-1] for line in lines] == [
        "candidate 1/2",
        "candidate 2/2",
    ]
    assert re.search(r"candidate 1/2 \([\d.]+ s, eta [\d.]+ s\)$", lines[0])
    assert transferability.metric == "lftm"
    assert transferability.sources == ("B", "C")  # sorted
    assert len(transferability.itm) == NUM_TRAIN
    assert all(len(row) == 2 for row in transferability.itm)
    assert all(0.0 <= value <= 1.0 for row in transferability.itm for value in row)
    for column, name in enumerate(transferability.sources):
        mean = sum(row[column] for row in transferability.itm) / NUM_TRAIN
        assert transferability.dtm[name] == pytest.approx(mean)


def test_score_candidates_with_the_entropy_metric(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Prepare
    entropy = load_default_config(
        **{
            "data.image-size": 32,
            "data.max-slices-per-case": SLICES,
            "train.device": "cpu",
            "model.channels": "4,8",
            "model.strides": "2",
            "transfer.metric": "entropy",
        }
    )
    assert entropy.model == config.model

    # Execute
    transferability = score_candidates(federation / "A", candidates, entropy)

    # Assert
    assert transferability.metric == "entropy"
    assert len(transferability.itm) == NUM_TRAIN
    assert all(0.0 <= value <= 1.0 for row in transferability.itm for value in row)


def test_score_candidates_needs_candidates(federation: Path, config: RunConfig) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="no candidate models to score"):
        score_candidates(federation / "A", {}, config)


# --- train.adapt ---------------------------------------------------------------------


def test_adapt_target_returns_main_and_aux_weights(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Execute
    adaptation = adapt_target(
        federation / "A",
        candidates,
        config,
        main="C",
        aux="B",
        weight_main=0.6,
        weight_aux=0.4,
    )

    # Assert
    assert adaptation.aux_weights is not None
    for adapted, source in (
        (adaptation.main_weights, candidates["C"]),
        (adaptation.aux_weights, candidates["B"]),
    ):
        assert adapted.keys() == source.keys()
        assert any(not np.array_equal(adapted[n], source[n]) for n in source)
    assert adaptation.num_examples == config.adapt.epochs * NUM_TRAIN * SLICES
    assert 0.0 <= adaptation.pseudo_label_foreground <= 1.0


def test_adapt_target_without_aux(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Execute
    adaptation = adapt_target(
        federation / "A",
        candidates,
        config,
        main="B",
        aux=None,
        weight_main=1.0,
        weight_aux=0.0,
    )

    # Assert
    assert adaptation.aux_weights is None
    assert adaptation.main_weights.keys() == candidates["B"].keys()


@pytest.mark.parametrize(("main", "aux", "named"), [("D", "B", "D"), ("B", "Z", "Z")])
def test_adapt_target_rejects_a_source_that_is_not_a_candidate(
    federation: Path,
    config: RunConfig,
    candidates: dict[str, Arrays],
    main: str,
    aux: str,
    named: str,
) -> None:
    # Execute / Assert
    with pytest.raises(
        ValueError,
        match=rf"selected source '{named}' is not among the candidates \['B', 'C'\]",
    ):
        adapt_target(
            federation / "A",
            candidates,
            config,
            main=main,
            aux=aux,
            weight_main=0.5,
            weight_aux=0.5,
        )


def test_adapt_target_with_dp_charges_the_accountant_and_withholds_statistics(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Prepare
    accountant = tmp_path / "state" / "accountant.json"
    lines: list[str] = []

    # Execute
    adaptation = adapt_target(
        federation / "A",
        candidates,
        config,
        main="C",
        aux="B",
        weight_main=0.6,
        weight_aux=0.4,
        dp=DP,
        accountant_path=accountant,
        progress=lines.append,
    )

    # Assert
    slices = NUM_TRAIN * SLICES
    rate, steps = dp_sgd_schedule(
        slices, batch_size=config.adapt.batch_size, epochs=config.adapt.epochs
    )
    saved = read_accountant_state(accountant)
    assert saved.history == ((1.0, rate, steps),)
    assert saved.units_per_case == (SLICES,)
    assert adaptation.privacy is not None
    assert adaptation.privacy.accountant == saved
    assert adaptation.privacy.epsilon_total == saved.epsilon(1e-5)
    assert math.isnan(adaptation.pseudo_label_foreground)
    assert adaptation.aux_weights is not None
    assert adaptation.main_weights.keys() == candidates["C"].keys()
    assert any("per patient (3 slice(s) per case)" in line for line in lines)


def test_adapt_target_without_dp_spends_nothing(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Execute
    adaptation = adapt_target(
        federation / "A",
        candidates,
        config,
        main="B",
        aux=None,
        weight_main=1.0,
        weight_aux=0.0,
    )

    # Assert
    assert adaptation.privacy is None


def test_adapt_target_refuses_dp_with_batch_norm(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Prepare
    batch_norm = dataclasses.replace(
        config, model=dataclasses.replace(config.model, norm=Norm.BATCH)
    )
    accountant = tmp_path / "accountant.json"

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"model\.norm 'batch' keeps running statistics"
    ):
        adapt_target(
            federation / "A",
            candidates,
            batch_norm,
            main="B",
            aux=None,
            weight_main=1.0,
            weight_aux=0.0,
            dp=DP,
            accountant_path=accountant,
        )
    assert not accountant.exists()


def test_adapt_target_over_budget_is_refused_and_records_nothing(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Prepare
    accountant = tmp_path / "accountant.json"
    write_accountant_state(AccountantState(((1.0, 0.5, 100),), (1,)), accountant)
    written = accountant.read_bytes()
    tight = dataclasses.replace(
        DP, budget_epsilon=read_accountant_state(accountant).epsilon(1e-5) + 1e-3
    )

    # Execute / Assert
    with pytest.raises(PrivacyBudgetError, match="refused before training"):
        adapt_target(
            federation / "A",
            candidates,
            config,
            main="B",
            aux=None,
            weight_main=1.0,
            weight_aux=0.0,
            dp=tight,
            accountant_path=accountant,
        )
    assert accountant.read_bytes() == written


# --- evaluate ------------------------------------------------------------------------

PREDICTORS = {"B": [("B", 1.0)], "uniform": [("B", 0.5), ("C", 0.5)]}


def test_release_evaluation_without_dp_is_the_exact_means(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Execute
    released = release_evaluation(
        federation / "A", candidates, PREDICTORS, config, with_hd95=False
    )
    exact = evaluate_predictors(
        federation / "A", candidates, PREDICTORS, config, with_hd95=False
    )

    # Assert
    assert released.privacy is None
    assert released.num_cases == EVALUATION_CASES_PER_SITE
    assert released.dice == {name: scores.dice for name, scores in exact.items()}
    assert all(math.isnan(value) for value in released.hd95_mm.values())


def test_release_evaluation_with_dp_noises_the_mean_dice_at_sensitivity_1_over_n(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Prepare: sigma 0.5 over n cases: noise sd 0.5 / n on each mean Dice
    accountant = tmp_path / "accountant.json"
    dp = dataclasses.replace(DP, noise_multiplier=0.5)
    exact = evaluate_predictors(
        federation / "A", candidates, PREDICTORS, config, with_hd95=False
    )
    draws = np.random.default_rng(7).normal(
        0.0, 0.5 / EVALUATION_CASES_PER_SITE, size=len(PREDICTORS)
    )

    # Execute
    released = release_evaluation(
        federation / "A",
        candidates,
        PREDICTORS,
        config,
        dp=dp,
        accountant_path=accountant,
        rng=np.random.default_rng(7),
    )

    # Assert: each mean Dice plus its own draw, clipped to [0, 1]; HD95 withheld
    assert released.dice == pytest.approx(
        {
            name: float(np.clip(exact[name].dice + draw, 0.0, 1.0))
            for name, draw in zip(PREDICTORS, draws, strict=True)
        }
    )
    assert all(math.isnan(value) for value in released.hd95_mm.values())
    assert released.num_cases == EVALUATION_CASES_PER_SITE
    # Two Gaussian mechanisms at sample rate 1, one unit per case
    saved = read_accountant_state(accountant)
    assert saved.history == ((0.5, 1.0, 2),)
    assert saved.units_per_case == (1,)
    assert released.privacy is not None
    assert released.privacy.epsilon_spent == saved.epsilon(1e-5)
    assert released.privacy.patient_epsilon_spent == released.privacy.epsilon_spent


def test_release_evaluation_with_dp_refuses_before_anything_is_recorded(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Prepare
    accountant = tmp_path / "accountant.json"
    write_accountant_state(AccountantState(((1.0, 1.0, 1),), (1,)), accountant)
    written = accountant.read_bytes()
    tight = dataclasses.replace(DP, budget_epsilon=5.0)  # 4.73 spent, 1 more: 6.8

    # Execute / Assert: an unknown model, then a release over budget
    with pytest.raises(ValueError, match=r"predictor 'p' names unknown models"):
        release_evaluation(
            federation / "A",
            candidates,
            {"p": [("Z", 1.0)]},
            config,
            dp=DP,
            accountant_path=accountant,
        )
    with pytest.raises(PrivacyBudgetError, match="budget is epsilon 5 at delta"):
        release_evaluation(
            federation / "A",
            candidates,
            {"B": [("B", 1.0)]},
            config,
            dp=tight,
            accountant_path=accountant,
        )
    with pytest.raises(ValueError, match="no predictors to evaluate"):
        release_evaluation(
            federation / "A", candidates, {}, config, dp=DP, accountant_path=accountant
        )
    assert accountant.read_bytes() == written


def test_evaluate_predictors_scores_every_predictor(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Prepare
    predictors = {
        "B": [("B", 1.0)],
        "C": [("C", 1.0)],
        "uniform": [("B", 0.5), ("C", 0.5)],
    }
    lines: list[str] = []

    # Execute
    results = evaluate_predictors(
        federation / "A",
        candidates,
        predictors,
        config,
        with_hd95=False,
        progress=lines.append,
    )

    # Assert
    assert sorted(results) == ["B", "C", "uniform"]
    for scores in results.values():
        assert len(scores.cases) == EVALUATION_CASES_PER_SITE
        assert all(0.0 <= case.dice <= 1.0 for case in scores.cases)
        assert 0.0 <= scores.dice <= 1.0
        assert math.isnan(scores.hd95_mm)
    assert [line.split(":")[0] for line in lines] == [
        "[evaluate] B",
        "[evaluate] C",
        "[evaluate] uniform",
    ]


def test_evaluate_predictors_with_hd95(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Execute
    results = evaluate_predictors(
        federation / "B", candidates, {"B": [("B", 1.0)]}, config
    )

    # Assert
    scores = results["B"]
    assert 0.0 <= scores.dice <= 1.0
    assert all(math.isnan(case.hd95_mm) or case.hd95_mm >= 0.0 for case in scores.cases)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("B", 0.5), ("D", 0.5)], r"predictor 'p' names unknown models \['D'\]"),
        ([], r"predictor 'p' names unknown models \[\]"),
    ],
    ids=["unknown-member", "no-members"],
)
def test_evaluate_predictors_rejects_unknown_models(
    federation: Path,
    config: RunConfig,
    candidates: dict[str, Arrays],
    members: list[tuple[str, float]],
    message: str,
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        evaluate_predictors(
            federation / "A", candidates, {"p": members}, config, with_hd95=False
        )


def test_write_segmentations_writes_every_image_on_its_own_grid(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Prepare
    out_dir = tmp_path / "segmentations" / "run-7"
    index = index_site(federation / "A")
    cases = (*index.training_images, *index.evaluation_images)
    lines: list[str] = []

    # Execute
    written = write_segmentations(
        federation / "A",
        candidates,
        [("B", 0.5), ("C", 0.5)],
        config,
        out_dir,
        predictor="uniform",
        progress=lines.append,
    )

    # Assert: one volume per image, with the image's geometry and class values
    assert written == len(cases) == 2 + EVALUATION_CASES_PER_SITE
    for case in cases:
        image = read_volume(case.image_path)
        segmentation = read_volume(out_dir / f"{case.case_id}.nii.gz")
        assert segmentation.array.shape == image.array.shape
        assert segmentation.same_geometry(image)
        assert set(np.unique(segmentation.array)) <= {0, 1}
    manifest = json.loads((out_dir / SEGMENTATIONS_MANIFEST).read_text())
    assert manifest == {
        "predictor": "uniform",
        "members": [["B", 0.5], ["C", 0.5]],
        "cases": [case.case_id for case in cases],
    }
    assert lines == [f"[segment] uniform: {written} volumes written to {out_dir}"]


def test_write_segmentations_refuses_an_unknown_model_before_writing(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"predictor 'p' to segment with names unknown models \['Z'\]"
    ):
        write_segmentations(
            federation / "A",
            candidates,
            [("Z", 1.0)],
            config,
            tmp_path / "out",
            predictor="p",
        )
    assert not (tmp_path / "out").exists()


def test_evaluate_predictors_needs_evaluation_cases(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Prepare
    site = copy_site(federation, "A", tmp_path)
    shutil.rmtree(site / "labelsTs")
    shutil.rmtree(site / "imagesTs")

    # Execute / Assert
    with pytest.raises(
        SiteDataError, match=rf"{re.escape(str(site))}: no evaluation cases"
    ):
        evaluate_predictors(site, candidates, {"B": [("B", 1.0)]}, config)


# --- post-processing at the target ------------------------------------------------


def test_score_predictors_post_processes_only_the_named_predictors(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Prepare: the same predictor twice, one of them post-processed
    predictors = {"B": [("B", 1.0)], "B-lcc": [("B", 1.0)]}
    slices = build_slice_set(
        index_site(federation / "A").evaluation, data=config.data, with_labels=True
    )
    assert slices.labels is not None
    model = build_model_with("B", candidates["B"], config)
    raw = predicted_classes(
        predict_mixture([model], [1.0], slices.images, device=torch.device("cpu"))
    )
    references = [
        read_case(case, num_classes=2)
        for case in index_site(federation / "A").evaluation
    ]
    # On each image's own grid, the largest component kept there.
    expected = score_on_native_grid(
        raw,
        slices,
        references,
        config,
        postprocess=lambda volume: keep_largest_component(volume, num_classes=2),
    )

    # Execute
    scored = score_predictors(
        federation / "A", candidates, predictors, config, postprocess=["B-lcc"]
    )

    # Assert: the named one is scored post-processed, its raw scores kept beside
    assert sorted(scored.raw) == ["B-lcc"]
    assert scored.raw["B-lcc"] == scored.scores["B"]
    assert scored.scores["B-lcc"] == expected


def test_score_predictors_refuses_to_post_process_an_unknown_predictor(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"not predictors: \['Z'\]"):
        score_predictors(
            federation / "A", candidates, {"B": [("B", 1.0)]}, config, postprocess="Z"
        )


def test_release_evaluation_releases_the_raw_figures_and_charges_them_under_dp(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Prepare
    accountant = tmp_path / "accountant.json"
    dp = dataclasses.replace(DP, noise_multiplier=0.5)

    # Execute
    exact = release_evaluation(
        federation / "A", candidates, PREDICTORS, config, postprocess=["uniform"]
    )
    private = release_evaluation(
        federation / "A",
        candidates,
        PREDICTORS,
        config,
        postprocess=["uniform"],
        dp=dp,
        accountant_path=accountant,
        rng=np.random.default_rng(7),
    )

    # Assert: one more release per post-processed predictor, in the same charge
    assert sorted(exact.dice_raw) == sorted(exact.hd95_raw_mm) == ["uniform"]
    assert sorted(private.dice_raw) == ["uniform"]
    assert math.isnan(private.hd95_raw_mm["uniform"])
    assert read_accountant_state(accountant).history == ((0.5, 1.0, 3),)


def test_write_segmentations_post_processed_keep_one_component_per_volume(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays], tmp_path: Path
) -> None:
    # Prepare
    out_dir = tmp_path / "segmentations"

    # Execute
    written = write_segmentations(
        federation / "A",
        candidates,
        [("B", 0.5), ("C", 0.5)],
        config,
        out_dir,
        predictor="uniform",
        postprocess=True,
    )

    # Assert: on each image's own grid, at most one 3-D component of the class
    manifest = json.loads((out_dir / SEGMENTATIONS_MANIFEST).read_text())
    assert manifest["postprocess"] == "largest-component"
    assert written == len(manifest["cases"])
    for case_id in manifest["cases"]:
        volume = read_volume(out_dir / f"{case_id}.nii.gz").array
        assert ndimage.label(volume == 1)[1] <= 1
