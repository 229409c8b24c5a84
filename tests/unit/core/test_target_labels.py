"""The target's labels change nothing that a label-free result is computed from.

A label-free predictor (TGMA without a candidate that saw target labels, and the
consensus of label-free sources) may use the target's images but never its labels. So
the same target, with and without its labels, must give identical LFTM scores
(ITM/DTM), identical adapted weights, an identical image term of its task profile and
identical consensus labels. The target here is a few-label site: its first training
case (by id) is unlabelled and its second labelled, so a computation that visits
labelled cases first would see them in another order than the label-free copy does.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.affinity.profile import build_site_profile, profile_settings
from core.config import ConsensusPrior, RunConfig, load_default_config
from core.consensus.job import run_consensus
from core.training.job import build_initial_weights
from core.training.networks import Arrays
from core.transfer.job import Adaptation, adapt_target, score_candidates

SLICES = 3


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return load_default_config(
        **{
            "data.image-size": 32,
            "data.max-slices-per-case": SLICES,
            "train.device": "cpu",
            "adapt.epochs": 1,
            "consensus.epochs": 1,
            "consensus.refine-epochs": 1,
            "consensus.atlases": False,
            "model.channels": "4,8",
            "model.strides": "2",
        }
    )


@pytest.fixture(scope="module")
def candidates(config: RunConfig) -> dict[str, Arrays]:
    """Two different candidate models (initial weights of two seeds)."""
    return {
        name: build_initial_weights(
            dataclasses.replace(
                config, train=dataclasses.replace(config.train, seed=seed)
            )
        )
        for seed, name in ((1, "B"), (2, "C"))
    }


@pytest.fixture(scope="module")
def targets(
    federation: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Site A as a few-label site, without training labels, and without any label."""
    root = tmp_path_factory.mktemp("targets")
    few = Path(shutil.copytree(federation / "A", root / "few" / "A"))
    first_label = sorted((few / "labelsTr").iterdir())[0]
    first_label.unlink()  # the first case by id is unlabelled, the second labelled
    no_training = Path(shutil.copytree(few, root / "no-training-labels" / "A"))
    shutil.rmtree(no_training / "labelsTr")
    none = Path(shutil.copytree(no_training, root / "none" / "A"))
    shutil.rmtree(none / "labelsTs")
    return {"few": few, "no-training-labels": no_training, "none": none}


def test_lftm_scores_are_the_same_without_the_targets_labels(
    targets: dict[str, Path], candidates: dict[str, Arrays], config: RunConfig
) -> None:
    # Execute
    with_labels = score_candidates(targets["few"], candidates, config)
    without = score_candidates(targets["none"], candidates, config)

    # Assert
    assert with_labels.itm == without.itm
    assert with_labels.dtm == without.dtm


def test_adapted_weights_are_the_same_without_the_targets_labels(
    targets: dict[str, Path], candidates: dict[str, Arrays], config: RunConfig
) -> None:
    # Prepare
    def adapt(site: Path) -> Adaptation:
        return adapt_target(
            site, candidates, config, main="B", aux="C", weight_main=0.6, weight_aux=0.4
        )

    # Execute
    with_labels = adapt(targets["few"])
    without = adapt(targets["none"])

    # Assert
    assert with_labels.num_examples == without.num_examples
    assert with_labels.aux_weights is not None
    assert without.aux_weights is not None
    for adapted, label_free in (
        (with_labels.main_weights, without.main_weights),
        (with_labels.aux_weights, without.aux_weights),
    ):
        assert adapted.keys() == label_free.keys()
        for key in adapted:
            np.testing.assert_array_equal(adapted[key], label_free[key], err_msg=key)


def test_the_profiles_image_term_is_the_same_without_the_targets_labels(
    targets: dict[str, Path], config: RunConfig
) -> None:
    # Prepare
    settings = profile_settings(config.affinity)

    # Execute
    with_labels = build_site_profile(targets["few"], settings)
    without = build_site_profile(targets["none"], settings)

    # Assert: the label term is there only with labels; the image term is identical
    assert with_labels.num_labelled == 1
    assert without.num_labelled == 0
    assert without.mean_label_map is None
    np.testing.assert_array_equal(with_labels.image_quantiles, without.image_quantiles)
    assert with_labels.num_images == without.num_images


def _consensus_labels(
    site: Path, candidates: dict[str, Arrays], config: RunConfig
) -> dict[str, np.ndarray]:
    outcome = run_consensus(
        site,
        candidates,
        config,
        label_sources=sorted(candidates),
        start="B",
        labels_dir=None,
    )
    return {method: labels.numpy() for method, labels in outcome.fused.items()}


def test_consensus_labels_are_the_same_without_the_targets_training_labels(
    targets: dict[str, Path], candidates: dict[str, Arrays], config: RunConfig
) -> None:
    # Execute
    with_labels = _consensus_labels(targets["few"], candidates, config)
    without = _consensus_labels(targets["no-training-labels"], candidates, config)

    # Assert
    assert with_labels.keys() == without.keys()
    for method in with_labels:
        np.testing.assert_array_equal(with_labels[method], without[method], method)


def test_consensus_labels_are_the_same_without_the_targets_evaluation_labels(
    targets: dict[str, Path], candidates: dict[str, Arrays], config: RunConfig
) -> None:
    # Execute
    with_labels = _consensus_labels(targets["no-training-labels"], candidates, config)
    without = _consensus_labels(targets["none"], candidates, config)

    # Assert: every evaluation image is fused, labelled or not
    assert with_labels.keys() == without.keys()
    for method in with_labels:
        np.testing.assert_array_equal(with_labels[method], without[method], method)


@pytest.mark.parametrize("prior", [ConsensusPrior.DTM, ConsensusPrior.AGREEMENT])
def test_the_data_parameter_priors_are_the_same_without_the_targets_labels(
    targets: dict[str, Path],
    candidates: dict[str, Arrays],
    config: RunConfig,
    prior: ConsensusPrior,
) -> None:
    # Prepare: the prior's scores come from the target's images only
    settings = dataclasses.replace(
        config, consensus=dataclasses.replace(config.consensus, dp_prior=prior)
    )

    # Execute
    outcomes = [
        run_consensus(
            targets[name],
            candidates,
            settings,
            label_sources=sorted(candidates),
            start="B",
            labels_dir=None,
        )
        for name in ("few", "none")
    ]

    # Assert
    with_labels, without = outcomes
    np.testing.assert_array_equal(with_labels.data_parameters, without.data_parameters)
    for method in with_labels.fused:
        np.testing.assert_array_equal(
            with_labels.fused[method].numpy(), without.fused[method].numpy(), method
        )
