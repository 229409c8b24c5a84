"""The ``train.consensus`` job at the target site, on a tiny synthetic federation.

Site A is the target; tiny source models trained once at B and C label its images.
Atlas registration uses fast settings here (see ``fast_registration``): its accuracy
is tested in ``test_registration.py``; this module only needs its labels to exist.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import (
    ConfigValue,
    ConsensusGranularity,
    ConsensusPrior,
    RunConfig,
    load_run_config,
)
from core.consensus import job as consensus_job
from core.consensus.deepstaple import prior_data_parameters
from core.consensus.job import (
    ConsensusOutcome,
    _fuse_weighted,
    build_noisy_label_set,
    run_consensus,
)
from core.consensus.registration import RegistrationSettings, index_atlases
from core.data.dataset import (
    SiteDataError,
    index_site,
    label_slices,
    label_volume_from_slices,
)
from core.data.io import read_volume
from core.protocol import CONSENSUS_METHODS
from core.training.job import build_initial_weights, train_source_model
from core.training.networks import Arrays

TARGET = "A"
SOURCES = ("B", "C")
NUM_TRAINING = 2
NUM_EVALUATION = 6
SLICES = 3  # TINY_RUN_CONFIG's data.max-slices-per-case
SIZE = 32  # TINY_RUN_CONFIG's data.image-size


# ------------------------------------------------------------------------- fixtures


def without_baselines(config: RunConfig, *, atlases: bool = True) -> RunConfig:
    """``config`` training only on the DeepSTAPLE consensus (the cheap variant)."""
    return dataclasses.replace(
        config,
        consensus=dataclasses.replace(
            config.consensus, baselines=False, atlases=atlases
        ),
    )


@pytest.fixture(scope="module")
def config(run_config: dict[str, ConfigValue]) -> RunConfig:
    return load_run_config({**run_config, "train.device": "cpu"})


@pytest.fixture(scope="module")
def candidates(federation: Path, config: RunConfig) -> dict[str, Arrays]:
    """Source models of B and C, trained once from the same initial weights."""
    initial = build_initial_weights(config)
    return {
        name: train_source_model(
            federation / name, config, initial_weights=initial
        ).weights
        for name in SOURCES
    }


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("consensus") / "labels"


@pytest.fixture(scope="module")
def outcome(
    federation: Path,
    config: RunConfig,
    candidates: dict[str, Arrays],
    labels_dir: Path,
) -> ConsensusOutcome:
    """The job at A with B and C as label sources; B is refined."""
    return run_consensus(
        federation / TARGET,
        candidates,
        config,
        label_sources=SOURCES,
        start="B",
        labels_dir=labels_dir,
    )


@pytest.fixture(scope="module")
def fast_registration() -> Iterator[None]:
    """Register with few iterations: the defaults take ~3 s per pair on 2 cores."""
    fast = RegistrationSettings(
        affine_iterations=10,
        bspline_iterations=2,
        shrink_factors=(2,),
        smoothing_sigmas_voxels=(1.0,),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(consensus_job, "RegistrationSettings", lambda: fast)
        yield


@pytest.fixture(scope="module")
def atlas_site(federation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of A holding B's two labelled cases as atlases."""
    site = Path(
        shutil.copytree(federation / TARGET, tmp_path_factory.mktemp("atlas") / "A")
    )
    for case in index_site(federation / "B").labelled:
        assert case.label_path is not None
        images = site / "atlases" / "imagesTr"
        labels = site / "atlases" / "labelsTr"
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        shutil.copy(case.image_path, images / f"{case.case_id}_0000.nii.gz")
        shutil.copy(case.label_path, labels / f"{case.case_id}.nii.gz")
    return site


@pytest.fixture(scope="module")
def atlas_progress() -> list[str]:
    """The progress lines of :func:`atlas_outcome`'s run."""
    return []


@pytest.fixture(scope="module")
def atlas_outcome(
    atlas_site: Path,
    config: RunConfig,
    candidates: dict[str, Arrays],
    fast_registration: None,
    atlas_progress: list[str],
) -> ConsensusOutcome:
    return run_consensus(
        atlas_site,
        candidates,
        without_baselines(config),
        label_sources=SOURCES,
        start="B",
        labels_dir=None,
        progress=atlas_progress.append,
    )


# ------------------------------------------------------------------ run_consensus


def test_every_method_trains_a_model_of_the_sources_manifest(
    outcome: ConsensusOutcome, candidates: dict[str, Arrays]
) -> None:
    # Prepare
    expected = {name: array.shape for name, array in candidates["B"].items()}

    # Execute
    manifests = {
        method: {name: array.shape for name, array in weights.items()}
        for method, weights in outcome.models.items()
    }

    # Assert
    assert tuple(outcome.models) == CONSENSUS_METHODS
    assert all(manifest == expected for manifest in manifests.values())
    assert all(
        np.isfinite(array).all()
        for weights in outcome.models.values()
        for array in weights.values()
    )
    # ... and the start model was trained further, not handed back
    refined = outcome.models["deepstaple"]
    assert any(
        not np.array_equal(refined[name], candidates["B"][name]) for name in refined
    )


def test_fused_labels_cover_every_image_with_valid_classes(
    outcome: ConsensusOutcome, config: RunConfig
) -> None:
    # Prepare
    num_images = NUM_TRAINING + NUM_EVALUATION

    # Execute
    fused = outcome.fused

    # Assert
    assert tuple(fused) == CONSENSUS_METHODS
    for labels in fused.values():
        assert labels.shape == (num_images * SLICES, SIZE, SIZE)
        assert labels.dtype == torch.int64
        assert 0 <= int(labels.min()) <= int(labels.max()) < config.data.num_classes
    assert outcome.num_images == num_images == 8
    assert outcome.num_atlases == 0
    assert outcome.data_parameters.shape == (len(SOURCES), num_images * SLICES)


def test_reply_figures_name_sources_and_methods_within_range(
    outcome: ConsensusOutcome,
) -> None:
    # Prepare
    informative = int((~np.isnan(outcome.data_parameters[0])).sum())

    # Execute
    per_source = (
        outcome.data_parameter,
        outcome.staple_sensitivity,
        outcome.agreement,
    )

    # Assert
    assert all(tuple(values) == SOURCES for values in per_source)
    assert all(math.isfinite(value) for value in outcome.data_parameter.values())
    assert all(0.0 <= value <= 1.0 for value in outcome.staple_sensitivity.values())
    assert all(0.0 <= value <= 1.0 for value in outcome.agreement.values())
    assert tuple(outcome.label_dice) == CONSENSUS_METHODS
    assert all(0.0 <= value <= 1.0 for value in outcome.label_dice.values())
    for rho in (outcome.spearman_dp, outcome.spearman_staple):
        assert math.isnan(rho) or -1.0 <= rho <= 1.0
    for area in (outcome.auroc_dp, outcome.auroc_staple):
        assert math.isnan(area) or 0.0 <= area <= 1.0
    assert outcome.num_labels == informative * len(SOURCES) > 0
    assert outcome.seconds > 0


def test_consensus_labels_are_written_on_each_images_grid(
    outcome: ConsensusOutcome,
    federation: Path,
    config: RunConfig,
    labels_dir: Path,
) -> None:
    # Prepare
    training = index_site(federation / TARGET).labelled

    # Execute
    written = sorted(
        path.relative_to(labels_dir).as_posix() for path in labels_dir.rglob("*.*")
    )

    # Assert
    assert outcome.labels_dir == labels_dir
    assert written == sorted(
        f"{method}/{case.case_id}.nii.gz"
        for method in CONSENSUS_METHODS
        for case in training
    )
    for number, case in enumerate(training):
        image = read_volume(case.image_path)
        rows = slice(number * SLICES, (number + 1) * SLICES)  # training cases first
        for method in CONSENSUS_METHODS:
            label = read_volume(labels_dir / method / f"{case.case_id}.nii.gz")
            assert label.geometry_differences(image) == []
            assert label.size == image.size
            assert label.spacing_mm == image.spacing_mm
            assert label.origin_mm == image.origin_mm
            assert label.direction == image.direction
            assert set(np.unique(label.array).tolist()) <= {0, 1}
            # Cut again, the written label gives back the fused slices.
            actual = label_slices(label.array.astype(np.int64), data=config.data)
            assert torch.equal(actual, outcome.fused[method][rows])


def test_without_baselines_only_deepstaple_is_trained(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Prepare
    settings = without_baselines(config)

    # Execute
    result = run_consensus(
        federation / TARGET,
        candidates,
        settings,
        label_sources=SOURCES,
        start="C",
        labels_dir=None,
    )

    # Assert
    assert tuple(result.models) == ("deepstaple",)
    assert tuple(result.fused) == CONSENSUS_METHODS
    assert tuple(result.label_dice) == CONSENSUS_METHODS
    assert result.labels_dir is None


def test_case_granularity_gives_each_case_and_source_one_parameter(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Prepare
    settings = without_baselines(config, atlases=False)
    settings = dataclasses.replace(
        settings,
        consensus=dataclasses.replace(
            settings.consensus, granularity=ConsensusGranularity.CASE
        ),
    )

    # Execute
    result = run_consensus(
        federation / TARGET,
        candidates,
        settings,
        label_sources=SOURCES,
        start="C",
        labels_dir=None,
    )

    # Assert: on every image, each source's trained slices hold one value.
    raw = result.data_parameters
    trained = ~np.isnan(raw[0])
    assert trained.any()
    for case in range(result.num_images):
        rows = np.flatnonzero(trained & (np.arange(raw.shape[1]) // SLICES == case))
        for values in raw[:, rows]:
            assert len(np.unique(values)) <= 1
    assert len(np.unique(raw[:, trained])) > 1


# ------------------------------------------------------------------ priors


@pytest.mark.parametrize(
    ("prior", "granularity"),
    [
        (ConsensusPrior.NONE, ConsensusGranularity.SLICE),
        (ConsensusPrior.DTM, ConsensusGranularity.SLICE),
        (ConsensusPrior.DTM, ConsensusGranularity.CASE),
        (ConsensusPrior.AGREEMENT, ConsensusGranularity.SLICE),
    ],
)
def test_the_prior_sets_where_each_sources_data_parameters_start(
    federation: Path,
    config: RunConfig,
    candidates: dict[str, Arrays],
    monkeypatch: pytest.MonkeyPatch,
    prior: ConsensusPrior,
    granularity: ConsensusGranularity,
) -> None:
    # Prepare: record what DeepSTAPLE is started from.
    settings = without_baselines(config, atlases=False)
    settings = dataclasses.replace(
        settings,
        consensus=dataclasses.replace(
            settings.consensus, dp_prior=prior, granularity=granularity
        ),
    )
    noisy = build_noisy_label_set(
        federation / TARGET, candidates, settings, with_atlases=False
    )
    # The tiny sources score alike (both near 1), so spread the scores out to see
    # each source get its own start; the computed ones are checked below.
    computed = noisy.dtm if prior is ConsensusPrior.DTM else noisy.agreement
    noisy = dataclasses.replace(noisy, dtm=(0.8, 0.3), agreement=(0.3, 0.8))
    seen: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
    real = consensus_job.train_deepstaple

    def spy(*args: object, **kwargs: object) -> object:
        seen.append((kwargs["initial_data_parameters"], kwargs["parameter_index"]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(consensus_job, "train_deepstaple", spy)

    # Execute
    raw = consensus_job._learn_data_parameters(noisy, settings, lambda _: None)

    # Assert: "none" starts flat as before; a prior starts every parameter of a
    # source at its centred log-odds score, computed from the target's images.
    assert len(seen) == 1
    initial, index = seen[0]
    assert np.isfinite(raw).any()
    if prior is ConsensusPrior.NONE:
        assert initial is None
        return
    assert initial is not None
    assert len(computed) == len(SOURCES)
    assert all(0.0 <= score <= 1.0 for score in computed)
    if prior is ConsensusPrior.AGREEMENT:
        assert max(computed) == pytest.approx(1.0)  # TGMA's main agrees with itself
    scores = noisy.dtm if prior is ConsensusPrior.DTM else noisy.agreement
    expected = prior_data_parameters(scores)
    assert expected[0] != expected[1]
    per_instance = initial if index is None else initial[index]
    per_source = per_instance.reshape(len(SOURCES), -1)
    for values, value in zip(per_source, expected, strict=True):
        torch.testing.assert_close(values, torch.full_like(values, float(value)))


def test_a_prior_without_its_scores_is_refused_naming_the_key(
    federation: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Prepare: a label set built without the prior's scores
    noisy = build_noisy_label_set(
        federation / TARGET, candidates, config, with_atlases=False
    )
    bare = dataclasses.replace(noisy, dtm=())

    # Execute / Assert
    with pytest.raises(ValueError, match=r"consensus.dp-prior = 'dtm' needs one"):
        bare.prior_scores(ConsensusPrior.DTM)
    assert bare.prior_scores(ConsensusPrior.NONE) is None


# ------------------------------------------------------------------------ atlases


def test_registration_counts_the_images_with_their_eta(
    atlas_outcome: ConsensusOutcome, atlas_progress: list[str]
) -> None:
    # Assert: one line per target image, done/total with the image's time and ETA
    registered = [line for line in atlas_progress if "atlas(es) onto image" in line]
    assert len(registered) == atlas_outcome.num_images
    assert registered[0].startswith(
        "[consensus] registered 2 atlas(es) onto image 1/8 ("
    )
    assert re.search(r"image 1/8 \([\d.]+ s, eta [\d.]+ s\)$", registered[0])
    assert re.search(r"image 8/8 \([\d.]+ s, total [\d.]+ s\)$", registered[-1])


def test_atlases_add_one_noisy_label_each(
    atlas_outcome: ConsensusOutcome, atlas_site: Path
) -> None:
    # Prepare
    expected = (*SOURCES, "atlas-1", "atlas-2")

    # Execute
    sources = tuple(atlas_outcome.data_parameter)

    # Assert
    assert len(index_atlases(atlas_site)) == 2
    assert sources == expected
    assert tuple(atlas_outcome.staple_sensitivity) == expected
    assert tuple(atlas_outcome.agreement) == expected
    assert atlas_outcome.num_atlases == 2
    assert atlas_outcome.num_images == 8
    assert atlas_outcome.data_parameters.shape == (4, 8 * SLICES)
    informative = int((~np.isnan(atlas_outcome.data_parameters[0])).sum())
    assert atlas_outcome.num_labels == informative * 4
    assert tuple(atlas_outcome.models) == ("deepstaple",)


def test_atlases_are_ignored_when_consensus_atlases_is_false(
    atlas_site: Path, config: RunConfig, candidates: dict[str, Arrays]
) -> None:
    # Prepare
    settings = without_baselines(config, atlases=False)

    # Execute
    result = run_consensus(
        atlas_site,
        candidates,
        settings,
        label_sources=SOURCES,
        start="B",
        labels_dir=None,
    )

    # Assert
    assert tuple(result.data_parameter) == SOURCES
    assert result.num_atlases == 0
    assert result.data_parameters.shape == (2, 8 * SLICES)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("sent", "label_sources", "start", "message"),
    [
        (
            ("B", "C"),
            ("B", "C"),
            "adapted:main",
            "models ['adapted:main'] are named in the request but were not sent "
            "(sent: ['B', 'C'])",
        ),
        (
            ("B",),
            ("B", "C"),
            "B",
            "models ['C'] are named in the request but were not sent (sent: ['B'])",
        ),
        (
            (),
            ("B",),
            "B",
            "models ['B'] are named in the request but were not sent (sent: [])",
        ),
        (
            ("B",),
            (),
            "B",
            "no candidate models to label the target's images with",
        ),
        (
            ("atlas-1", "C"),
            ("atlas-1", "C"),
            "C",
            "label sources ['atlas-1'] use the prefix 'atlas-', which names the "
            "site's atlases",
        ),
    ],
    ids=[
        "start-not-sent",
        "label-source-not-sent",
        "nothing-sent",
        "no-sources",
        "source-named-like-an-atlas",
    ],
)
def test_error_models_named_but_not_sent(
    federation: Path,
    config: RunConfig,
    candidates: dict[str, Arrays],
    tmp_path: Path,
    sent: tuple[str, ...],
    label_sources: tuple[str, ...],
    start: str,
    message: str,
) -> None:
    # Prepare: any valid weights, as every case fails before a model runs
    models = dict.fromkeys(sent, candidates["C"])

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(message)):
        run_consensus(
            federation / TARGET,
            models,
            config,
            label_sources=label_sources,
            start=start,
            labels_dir=tmp_path / "labels",
        )
    assert not (tmp_path / "labels").exists()


def test_error_site_without_training_images_names_the_folder(
    federation: Path,
    config: RunConfig,
    candidates: dict[str, Arrays],
    tmp_path: Path,
) -> None:
    # Prepare: only the evaluation images are left
    site = Path(shutil.copytree(federation / TARGET, tmp_path / "A"))
    for folder in ("imagesTr", "labelsTr"):
        for path in (site / folder).iterdir():
            path.unlink()

    # Execute / Assert
    with pytest.raises(
        SiteDataError,
        match=re.escape(f"{site}: no training images (imagesTr)"),
    ):
        run_consensus(
            site,
            candidates,
            config,
            label_sources=SOURCES,
            start="B",
            labels_dir=tmp_path / "labels",
        )
    assert not (tmp_path / "labels").exists()


@pytest.mark.parametrize(
    ("count", "message"),
    [
        (2, "a volume of shape (10, 20, 30) gives 3 slices along z, got 2"),
        (4, "a volume of shape (10, 20, 30) gives 3 slices along z, got 4"),
    ],
    ids=["too-few", "too-many"],
)
def test_error_label_volume_from_wrong_slice_count(
    config: RunConfig, count: int, message: str
) -> None:
    # Prepare
    slices = torch.zeros((count, SIZE, SIZE), dtype=torch.int64)

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(message)):
        label_volume_from_slices(slices, (10, 20, 30), data=config.data)


# ------------------------------------------------------------ fusion, hand-checked


# Three sources over four pixels: with weights 0.6/0.2/0.2 (raw log 3, 0, 0) source 0
# wins unless both others agree; with equal weights two agreeing sources win.
MULTI_CLASS = np.array([[[0, 1, 2, 2]], [[1, 1, 2, 0]], [[1, 2, 0, 0]]])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ((math.log(3.0), 0.0, 0.0), [[0, 1, 2, 2]]),
        ((0.0, 0.0, 0.0), [[1, 1, 2, 0]]),
        ((5.0, 5.0, 5.0), [[1, 1, 2, 0]]),  # only differences of raw values count
    ],
    ids=["source-0-heavy", "equal", "equal-shifted"],
)
def test_fuse_weighted_multi_class_votes_by_softmax_weight(
    raw: tuple[float, float, float], expected: list[list[int]]
) -> None:
    # Prepare
    data_parameters = np.array(raw, dtype=np.float32)

    # Execute
    result = _fuse_weighted(MULTI_CLASS, data_parameters, num_classes=3)

    # Assert
    assert result.dtype == np.int64
    assert result.tolist() == expected


# Source 0 says [0, 1, 1]; sources 1 and 2 outvote it where they agree (pixel 0).
BINARY = np.array([[[0, 1, 1]], [[1, 0, 1]], [[1, 0, 0]]])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # softmax 0.36/0.32/0.32: the largest parameter does not win alone
        ((1.0, 0.9, 0.9), [[1, 0, 1]]),
        # softmax 0.91/0.05/0.05: now source 0 decides every pixel
        ((3.0, 0.0, 0.0), [[0, 1, 1]]),
        # softmax 0.05/0.91/0.05
        ((0.0, 3.0, 0.0), [[1, 0, 1]]),
    ],
    ids=["close", "source-0-dominates", "source-1-dominates"],
)
def test_fuse_weighted_binary_is_decided_by_softmax_of_raw_parameters(
    raw: tuple[float, float, float], expected: list[list[int]]
) -> None:
    # Prepare
    data_parameters = np.array(raw, dtype=np.float32)

    # Execute
    result = _fuse_weighted(BINARY, data_parameters, num_classes=2)

    # Assert
    assert result.dtype == np.int64
    assert result.tolist() == expected
