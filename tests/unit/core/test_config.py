from __future__ import annotations

import re

import pytest

from core.config import (
    Attention,
    ConfigValue,
    LandmarkRule,
    Norm,
    RunConfig,
    SliceAxis,
    TransferMetric,
    load_default_config,
    load_run_config,
    read_default_run_config,
    to_flat,
)


def test_load_default_config_reads_pyproject_defaults() -> None:
    # Execute
    config = load_default_config()

    # Assert
    assert isinstance(config, RunConfig)
    assert config.data.image_size == 64
    assert config.data.slice_axis is SliceAxis.Z
    assert config.model.channels == (16, 32, 64, 128)
    assert config.model.strides == (2, 2, 2)
    assert config.model.norm is Norm.INSTANCE
    assert config.train.learning_rate == pytest.approx(0.001)
    assert config.transfer.metric is TransferMetric.LFTM
    assert config.transfer.attention is Attention.PROBABILITY
    assert config.federation.dir == ""


def test_load_default_config_applies_overrides() -> None:
    # Execute
    config = load_default_config(
        **{"data.image-size": 32, "model.channels": "4,8", "model.strides": "2"}
    )

    # Assert
    assert config.data.image_size == 32
    assert config.model.channels == (4, 8)
    assert config.model.strides == (2,)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"data.image-size": 32, "model.channels": "4,8", "model.strides": "2"},
        {"transfer.metric": "entropy", "transfer.attention": "gradcam"},
        {"train.device": "cuda:1", "train.amp": False, "model.norm": "batch"},
        {"federation.dir": "/data/fed", "train.learning-rate": 3},
        {"data.ct-window": "-100,240.5,40,80", "data.normalisation": "ct"},
    ],
)
def test_to_flat_then_load_is_identity(overrides: dict[str, ConfigValue]) -> None:
    # Prepare
    config = load_default_config(**overrides)

    # Execute
    flat = to_flat(config)
    reloaded = load_run_config(flat)

    # Assert
    assert reloaded == config
    assert to_flat(reloaded) == flat


def test_to_flat_of_defaults_equals_pyproject_table() -> None:
    # Prepare
    defaults = read_default_run_config()

    # Execute
    flat = to_flat(load_run_config(defaults))

    # Assert
    assert flat == defaults


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.epochs", 0),
        ("train.batch-size", -1),
        ("train.learning-rate", 0),
        ("train.learning-rate", -1e-3),
        ("train.device", "tpu"),
        ("train.device", "gpu"),
        ("data.image-size", 30),
        ("data.image-size", 8),
        ("data.num-classes", 1),
        ("data.max-slices-per-case", -1),
        ("data.slice-axis", "w"),
        ("model.strides", "2,2"),
        ("model.strides", "2,2,2,2"),
        ("model.channels", "16"),
        ("model.channels", "16,0,64,128"),
        ("model.channels", "16,32,sixty-four,128"),
        ("model.channels", "16;32;64;128"),
        ("model.num-res-units", -1),
        ("model.dropout", 1.0),
        ("model.dropout", -0.1),
        ("model.norm", "layer"),
        ("transfer.threshold", 1.0),
        ("transfer.threshold", 0.0),
        ("transfer.dilation-fraction", 0.6),
        ("transfer.dilation-fraction", -0.1),
        ("transfer.smoothing-sigma-px", -1.0),
        ("transfer.metric", "rotation"),
        ("transfer.attention", "saliency"),
        ("federation.min-sites", 0),
        ("federation.expected-sites", -1),
        ("last-phase", "training"),
        ("resume-run", "run-7"),
        ("resume-run", True),
        ("federation.synthetic-sites", 2),
        ("federation.synthetic-cases", 1),
        ("federation.synthetic-target-labelled", -1),
        ("federation.wait-nodes-s", 0.0),
        ("federation.reply-timeout-s", -1.0),
        ("adapt.epochs", -1),
        ("adapt.batch-size", 0),
        ("adapt.learning-rate", 0.0),
        ("consensus.epochs", 0),
        ("consensus.batch-size", 0),
        ("consensus.learning-rate", 0.0),
        ("consensus.dp-learning-rate", -0.1),
        ("consensus.refine-epochs", 0),
        ("consensus.refine-learning-rate", float("nan")),
        ("consensus.out-of-line", "yes"),
        ("consensus.label-sources", "few-label"),
        ("consensus.granularity", "volume"),
        ("consensus.dp-prior", "itm"),
        ("semisup.variant", "fixmatch"),
        ("semisup.iterations", 0),
        ("semisup.rounds", -1),
        ("semisup.local-iterations", 0),
        ("semisup.labelled-fraction", 0.0),
        ("semisup.labelled-fraction", 1.5),
        ("semisup.labelled-batch", 0),
        ("semisup.unlabelled-batch", -1),
        ("semisup.learning-rate", 0.0),
        ("semisup.ema-decay", 1.0),
        ("semisup.passes", 0),
        ("semisup.consistency", -0.1),
        ("semisup.consistency-rampup", -1),
        ("semisup.sdf-k", 0.0),
        ("semisup.sdf-weight", float("nan")),
        ("semisup.max-grad-norm", -1.0),
        ("transfer.ensemble-min-voters", 1),
        ("transfer.ensemble-min-voters", -1),
        ("federation.synthetic-shift", "extreme"),
        ("federation.synthetic-scale", "huge"),
        ("affinity.image-size", 1),
        ("affinity.quantiles", 1),
        ("affinity.label-grid", 0),
        ("affinity.foreground-quantiles", 0),
        ("affinity.pca-variance", 0.0),
        ("affinity.pca-variance", 1.5),
        ("affinity.quantile-clip", 0.0),
        ("affinity.image-weight", -0.5),
        ("affinity.label-weight", float("inf")),
        ("affinity.max-hops", 0),
        ("affinity.communities", 0),
        ("affinity.communities", 2.0),
        ("affinity.landmarks", "centroids"),
        ("affinity.one-factor-edges", "yes"),
        ("semisup.dropout", 1.0),
        ("semisup.sites", "A,A"),
        ("semisup.shared-head", "no"),
        ("semisup.distance-consistency", "yes"),
        ("semisup.distance-consistency", 1),
        ("semisup.teacher", "shared"),
        ("semisup.clip-scope", "heads"),
        ("semisup.local-norm", "on"),
        ("privacy.noise-multiplier", -1.0),
        ("privacy.target-epsilon", -0.5),
        ("privacy.target-epsilon", float("inf")),
        ("privacy.delta", 0.0),
        ("privacy.delta", 1.0),
        ("privacy.max-grad-norm", 0.0),
        ("privacy.max-reply-mb", -1.0),
        ("privacy.dp", "yes"),
        # Wrong types.
        ("train.epochs", "3"),
        ("train.epochs", 3.0),
        ("train.epochs", True),
        ("data.image-size", False),
        ("train.learning-rate", "0.01"),
        ("train.learning-rate", True),
        ("train.amp", 1),
        ("train.augment", "yes"),
        ("federation.dir", 5),
        ("output.runs-dir", False),
        ("output.log-level", "loud"),
    ],
)
def test_validation_error_names_the_toml_key(key: str, value: ConfigValue) -> None:
    # Prepare
    flat = read_default_run_config()
    flat[key] = value

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"^{re.escape(key)} must be"):
        load_run_config(flat)


@pytest.mark.parametrize(
    ("key", "value", "rule", "shown"),
    [
        ("model.strides", "2,2", "3 values", "(2, 2)"),
        ("transfer.metric", "rotation", "one of 'lftm', 'entropy'", "'rotation'"),
        (
            "affinity.landmarks",
            "centroids",
            "one of 'case-fraction', 'communities'",
            "'centroids'",
        ),
        ("affinity.communities", 0, ">= 1", "0"),
        ("data.image-size", 20, "0 (from the plan) or a multiple of 8", "20"),
        (
            "data.ct-window",
            "200,-100,40,50",
            "clip-low < clip-high",
            "'200,-100,40,50'",
        ),
        ("data.ct-window", "1,2,3", "four finite numbers", "'1,2,3'"),
        ("data.ct-window", "1,2,x,4", "comma-separated numbers", "'1,2,x,4'"),
        ("data.normalisation", "minmax", "one of 'auto', 'zscore', 'ct'", "'minmax'"),
        ("semisup.teacher", "shared", "one of 'local', 'global'", "'shared'"),
        ("semisup.clip-scope", "head", "one of 'model', 'parts'", "'head'"),
        ("semisup.local-norm", "on", "true or false", "'on'"),
        ("semisup.distance-consistency", 1, "true or false", "1"),
        ("plan.max-image-size", 100, "a multiple of 8, >= 16", "100"),
        ("plan.pixels-per-batch", 10, ">= 512", "10"),
        ("model.channels", "16,x", "comma-separated integers", "'16,x'"),
        ("train.epochs", "3", "an integer", "'3'"),
        ("train.epochs", True, "an integer", "True"),
        ("train.learning-rate", "fast", "a number", "'fast'"),
        ("train.amp", "true", "true or false", "'true'"),
        ("federation.dir", 3, "a string", "3"),
    ],
)
def test_validation_message_states_the_rule_and_value(
    key: str, value: ConfigValue, rule: str, shown: str
) -> None:
    # Prepare
    flat = read_default_run_config()
    flat[key] = value

    # Execute / Assert
    with pytest.raises(
        ValueError, match=rf"{re.escape(rule)}.*got {re.escape(shown)}$"
    ):
        load_run_config(flat)


@pytest.mark.parametrize(
    ("overrides", "group", "field", "expected"),
    [
        (
            {"model.channels": " 4, 8 ", "model.strides": "2"},
            "model",
            "channels",
            (4, 8),
        ),
        ({"train.learning-rate": 1}, "train", "learning_rate", 1.0),
        ({"train.device": "cuda:0"}, "train", "device", "cuda:0"),
        ({"adapt.epochs": 0}, "adapt", "epochs", 0),
        ({"transfer.dilation-fraction": 0.0}, "transfer", "dilation_fraction", 0.0),
        ({"data.image-size": 16}, "data", "image_size", 16),
    ],
)
def test_edge_values_are_accepted(
    overrides: dict[str, ConfigValue], group: str, field: str, expected: object
) -> None:
    # Execute
    config = load_default_config(**overrides)

    # Assert
    actual = getattr(getattr(config, group), field)
    assert actual == expected
    assert type(actual) is type(expected)


@pytest.mark.parametrize("key", ["train.epochs", "transfer.metric", "federation.dir"])
def test_missing_key_is_an_error_naming_it(key: str) -> None:
    # Prepare
    flat = read_default_run_config()
    del flat[key]

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"^{re.escape(key)} is missing"):
        load_run_config(flat)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"train.epoch": 3}, "train.epoch"),
        ({"unknown.key": "x"}, "unknown.key"),
        ({"zeta.b": 1, "alpha.a": 2}, "alpha.a, zeta.b"),
    ],
)
def test_unknown_key_is_an_error_naming_it(
    extra: dict[str, ConfigValue], named: str
) -> None:
    # Prepare
    flat = read_default_run_config()
    flat.update(extra)

    # Execute / Assert
    with pytest.raises(
        ValueError, match=rf"unknown run-config keys: {re.escape(named)}"
    ):
        load_run_config(flat)


def test_device_with_non_integer_cuda_index_is_rejected() -> None:
    # Prepare
    flat = read_default_run_config()
    flat["train.device"] = "cuda:x"

    # Execute / Assert
    with pytest.raises(ValueError, match=r"^train\.device must be"):
        load_run_config(flat)


def test_image_size_incompatible_with_strides_is_rejected() -> None:
    # Prepare: four stride-2 levels need a multiple of 16; 24 only divides by 8.
    flat = read_default_run_config()
    flat.update(
        {
            "data.image-size": 24,
            "model.channels": "4,8,16,32,64",
            "model.strides": "2,2,2,2",
        }
    )

    # Execute / Assert
    with pytest.raises(ValueError, match=r"data\.image-size|model\.strides"):
        load_run_config(flat)


def test_pipeline_keys_are_top_level_and_accept_an_unquoted_run_id() -> None:
    # Prepare
    flat = read_default_run_config()
    flat.update({"resume-run": 18103597986389260942 % 2**63, "last-phase": "discover"})

    # Execute
    config = load_run_config(flat)

    # Assert
    assert config.pipeline.resume_run == str(18103597986389260942 % 2**63)
    assert config.pipeline.last_phase == "discover"
    assert to_flat(config)["resume-run"] == config.pipeline.resume_run


def test_semisup_sites_parse_as_names_and_flatten_back() -> None:
    # Prepare
    flat = read_default_run_config()
    flat["semisup.sites"] = " A, B ,C"

    # Execute
    config = load_run_config(flat)

    # Assert
    assert config.semisup.sites == ("A", "B", "C")
    assert to_flat(config)["semisup.sites"] == "A,B,C"
    assert load_default_config().semisup.sites == ()


def test_affinity_weights_may_not_both_be_zero() -> None:
    # Prepare
    flat = read_default_run_config()
    flat["affinity.image-weight"] = 0.0
    flat["affinity.label-weight"] = 0.0

    # Execute / Assert
    with pytest.raises(
        ValueError,
        match=r"^affinity.image-weight must be positive when affinity.label-weight",
    ):
        load_run_config(flat)


def test_affinity_landmark_keys_default_to_the_case_fraction_search() -> None:
    # Execute
    affinity = load_default_config().affinity

    # Assert
    assert affinity.landmarks is LandmarkRule.CASE_FRACTION
    assert affinity.communities == 2
    assert affinity.one_factor_edges is False


@pytest.mark.parametrize(
    ("landmarks", "min_hops", "max_hops", "message"),
    [
        (
            "communities",
            3,
            3,
            r"^affinity.min-hops must be <= 2 when affinity.landmarks is "
            r"'communities' \(its paths have exactly 2 hops\), got 3$",
        ),
        (
            "communities",
            1,
            1,
            r"^affinity.max-hops must be >= 2 when affinity.landmarks is "
            r"'communities' \(its paths have exactly 2 hops\), got 1$",
        ),
        ("communities", 1, 3, None),
        ("case-fraction", 3, 3, None),
        ("case-fraction", 1, 1, None),
    ],
)
def test_communities_landmarks_need_hop_bounds_that_allow_two(
    landmarks: str, min_hops: int, max_hops: int, message: str | None
) -> None:
    # Prepare
    flat = read_default_run_config()
    flat["affinity.landmarks"] = landmarks
    flat["affinity.min-hops"] = min_hops
    flat["affinity.max-hops"] = max_hops

    # Execute / Assert
    if message is None:
        assert load_run_config(flat).affinity.landmarks == landmarks
        return
    with pytest.raises(ValueError, match=message):
        load_run_config(flat)


def test_the_semisup_options_default_to_todays_form() -> None:
    # Execute
    semisup = load_default_config().semisup

    # Assert: the paper's form stays the default until an option wins (docs)
    assert semisup.distance_consistency is False
    assert semisup.teacher.value == "local"
    assert semisup.local_norm is False
    assert semisup.clip_scope.value == "model"
