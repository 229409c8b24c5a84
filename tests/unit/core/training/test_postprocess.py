"""The largest-connected-component post-processing and the source's decision on it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import RunConfig, load_default_config
from core.data.dataset import build_slice_set, index_site
from core.data.synthetic import EVALUATION_CASES_PER_SITE
from core.privacy.limits import default_limits, whole_case_config
from core.training import postprocess
from core.training.job import build_initial_weights
from core.training.networks import Arrays
from core.training.postprocess import (
    decide_largest_component,
    keep_largest_component,
    keep_largest_per_case,
)

# --- keep_largest_component ----------------------------------------------------------


def test_each_foreground_class_keeps_its_own_largest_component() -> None:
    # Prepare: class 1 has a 3-voxel and a 1-voxel component; class 2 a 1-voxel and
    # a 2-voxel one
    volume = np.zeros((1, 4, 6), dtype=np.int64)
    volume[0, 0, 0:3] = 1
    volume[0, 3, 5] = 1
    volume[0, 2, 0] = 2
    volume[0, 0, 5] = 2
    volume[0, 1, 5] = 2

    # Execute
    kept = keep_largest_component(volume, num_classes=3)

    # Assert: the smaller components became background, the larger stayed
    expected = volume.copy()
    expected[0, 3, 5] = 0
    expected[0, 2, 0] = 0
    assert kept.tolist() == expected.tolist()
    assert kept.dtype == np.int64


def test_components_connect_across_slices_by_faces_only() -> None:
    # Prepare: voxels stacked over slices 0-2 form one 3-D component (3 voxels),
    # larger than the 2 voxels in slice 3; a voxel touching only diagonally is apart
    volume = np.zeros((4, 3, 3), dtype=np.int64)
    volume[0, 1, 1] = volume[1, 1, 1] = volume[2, 1, 1] = 1  # a column through z
    volume[3, 0, 0] = volume[3, 0, 1] = 1  # two voxels, not face-adjacent to it
    volume[1, 0, 0] = 1  # touches the column by an edge only

    # Execute
    kept = keep_largest_component(volume, num_classes=2)

    # Assert: only the column survives (slice by slice it would be 1-voxel pieces)
    expected = np.zeros_like(volume)
    expected[0:3, 1, 1] = 1
    assert kept.tolist() == expected.tolist()


def test_an_empty_class_stays_empty_and_the_input_is_not_changed() -> None:
    # Prepare
    volume = np.zeros((2, 3, 3), dtype=np.uint8)
    volume[0, 0, 0] = 2
    original = volume.copy()

    # Execute
    kept = keep_largest_component(volume, num_classes=3)

    # Assert
    assert not (kept == 1).any()
    assert kept.tolist() == original.tolist()
    assert (volume == original).all()
    assert not keep_largest_component(np.zeros((2, 2, 2), int), num_classes=2).any()


def test_keep_largest_per_case_never_joins_two_cases() -> None:
    # Prepare: case 0's slices (rows 0-1) hold one voxel each at the same place,
    # case 1's (rows 2-3) two voxels apart; stacked, case 0's voxel in row 1 would
    # touch case 1's in row 2
    predictions = torch.zeros((4, 3, 3), dtype=torch.int64)
    predictions[0, 0, 0] = predictions[1, 0, 0] = 1
    predictions[2, 0, 0] = 1
    predictions[2, 2, 2] = predictions[3, 2, 2] = 1
    case_of_slice = torch.tensor([0, 0, 1, 1])

    # Execute
    kept = keep_largest_per_case(predictions, case_of_slice, num_classes=2)

    # Assert: case 0 keeps its column; case 1 keeps its 2-voxel column only
    assert kept[:2].tolist() == predictions[:2].tolist()
    assert int(kept[2, 0, 0]) == 0
    assert int(kept[2, 2, 2]) == int(kept[3, 2, 2]) == 1
    assert int(predictions[2, 0, 0]) == 1  # the input is not changed


# --- the source's decision -----------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return load_default_config(
        **{
            "data.image-size": 16,
            "train.device": "cpu",
            "model.channels": "4,8",
            "model.strides": "2",
        }
    )


@pytest.fixture(scope="module")
def weights(config: RunConfig) -> Arrays:
    return build_initial_weights(config)


def one_hot_prediction(classes: torch.Tensor) -> torch.Tensor:
    """A softmax map that predicts exactly ``classes`` ``(N, S, S)``."""
    return torch.nn.functional.one_hot(classes, 2).permute(0, 3, 1, 2).float()


def predicting(classes: torch.Tensor):  # type: ignore[no-untyped-def]
    """A stand-in for ``predict_mixture`` whose output is ``classes``."""

    def predict(*_args: object, **_kwargs: object) -> torch.Tensor:
        return one_hot_prediction(classes)

    return predict


def evaluation_labels(site: Path, config: RunConfig) -> torch.Tensor:
    slices = build_slice_set(
        index_site(site).evaluation, data=config.data, with_labels=True
    )
    assert slices.labels is not None
    return slices.labels


def native_size(config: RunConfig) -> RunConfig:
    """``config`` at the synthetic images' own 64 px."""
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, image_size=64)
    )


def test_the_decision_is_on_when_it_strictly_raises_the_mean_dice(
    federation: Path,
    config: RunConfig,
    weights: Arrays,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: predictions that are the labels plus a stray column through a corner
    # of each case (apart from the organ), which the post-processing removes
    # At the images' own 64 px, so the labels come back to their grid exactly.
    config = native_size(config)
    labels = evaluation_labels(federation / "B", config)
    noisy = labels.clone()
    noisy[:, 0, 0] = 1
    monkeypatch.setattr(postprocess, "predict_mixture", predicting(noisy))
    lines: list[str] = []

    # Execute
    decision = decide_largest_component(
        federation / "B", weights, config, progress=lines.append
    )

    # Assert
    assert decision.enabled
    assert decision.num_cases == EVALUATION_CASES_PER_SITE
    assert decision.dice_postprocessed == pytest.approx(1.0)
    assert decision.dice_raw is not None
    assert decision.dice_raw < 1.0
    assert lines == [f"[postprocess] largest component on: {decision.reason}"]


def test_the_decision_is_off_when_the_dice_does_not_change(
    federation: Path,
    config: RunConfig,
    weights: Arrays,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: predictions equal to the labels (one component per case): a tie
    # At the images' own 64 px, so the labels come back to their grid exactly.
    config = native_size(config)
    labels = evaluation_labels(federation / "B", config)
    monkeypatch.setattr(postprocess, "predict_mixture", predicting(labels))

    # Execute
    decision = decide_largest_component(federation / "B", weights, config)

    # Assert: nnU-Net's rule wants a strict improvement
    assert not decision.enabled
    assert decision.dice_raw == decision.dice_postprocessed == pytest.approx(1.0)
    assert "not a strict improvement" in decision.reason


def test_the_real_model_decides_by_its_own_figures(
    federation: Path, config: RunConfig, weights: Arrays
) -> None:
    # Execute: the untrained seeded model, really predicted, on whole cases
    decision = decide_largest_component(
        federation / "C", weights, whole_case_config(config, default_limits())
    )

    # Assert
    assert decision.dice_raw is not None
    assert decision.dice_postprocessed is not None
    assert decision.enabled == (decision.dice_postprocessed > decision.dice_raw)
    assert decision.num_cases == EVALUATION_CASES_PER_SITE


def test_the_decision_is_off_without_labelled_evaluation_cases(
    federation: Path, config: RunConfig, weights: Arrays, tmp_path: Path
) -> None:
    # Prepare
    site = Path(shutil.copytree(federation / "B", tmp_path / "B"))
    shutil.rmtree(site / "labelsTs")
    lines: list[str] = []

    # Execute
    decision = decide_largest_component(site, weights, config, progress=lines.append)

    # Assert
    assert not decision.enabled
    assert decision.dice_raw is None
    assert decision.num_cases == 0
    assert lines == [
        "[postprocess] largest component off: 0 labelled evaluation cases "
        "(imagesTs with labelsTs) to decide on, 1 needed"
    ]


def test_the_decision_is_off_below_min_cases_and_when_switched_off(
    federation: Path, config: RunConfig, weights: Arrays
) -> None:
    # Execute
    few = decide_largest_component(
        federation / "B", weights, config, min_cases=EVALUATION_CASES_PER_SITE + 1
    )
    switched_off = decide_largest_component(
        federation / "B",
        weights,
        load_default_config(
            **{
                "data.image-size": 16,
                "model.channels": "4,8",
                "model.strides": "2",
                "postprocess.largest-component": "off",
            }
        ),
    )

    # Assert
    assert not few.enabled
    assert few.dice_raw is None
    assert f"{EVALUATION_CASES_PER_SITE + 1} needed" in few.reason
    assert not switched_off.enabled
    assert switched_off.dice_raw is None
    assert switched_off.reason == "postprocess.largest-component is 'off'"


def test_the_config_switch_names_its_key() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"postprocess\.largest-component must be one"):
        load_default_config(**{"postprocess.largest-component": "on"})
