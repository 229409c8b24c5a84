"""``query.profile`` and ``train.finetune`` through the site's real ClientApp.

Site A of the tiny federation publishes its task profile (exact, or noised with its
ε recorded when its policy requires DP) and fine-tunes a model it is sent. The wire
form of the profile, the guard's length limit for profile lists and the refusals
(budget, no weights, no labels) are checked too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from flwr.app import RecordDict

from clients import records
from clients.app import app as site_app
from clients.guard import _max_metric_values
from clients.site import resolve_setup
from core import protocol
from core.affinity.job import finetune_config, finetune_model, release_profile
from core.affinity.profile import SiteProfile, build_site_profile, profile_settings
from core.affinity.profile_noise import (
    compute_gaussian_epsilon,
    get_profile_sensitivity,
)
from core.config import ConfigValue, RunConfig, load_run_config
from core.privacy.dp import ACCOUNTANT_FILE, DpSettings, read_accountant_state
from core.privacy.ledger import Ledger
from core.training.job import build_initial_weights
from tests.unit.clients.messages import (
    DP_POLICY,
    assert_site_error,
    build_message,
    build_site_context,
    write_policy,
)

SITE: Final = "A"
DP: Final = DpSettings(
    noise_multiplier=2.0,
    target_epsilon=None,
    delta=1e-5,
    max_grad_norm=1.0,
    budget_epsilon=10.0,
)


@pytest.fixture(scope="module")
def config(run_config: dict[str, ConfigValue]) -> RunConfig:
    return load_run_config(run_config)


def ask(
    run_config: dict[str, ConfigValue],
    site_dir: Path,
    state_dir: Path,
    message_type: str,
    content: RecordDict | None = None,
    policy: dict[str, object] | None = None,
):
    state_dir.mkdir(parents=True, exist_ok=True)
    policy_path = None if policy is None else write_policy(state_dir, policy)
    context = build_site_context(run_config, site_dir, state_dir, policy=policy_path)
    return site_app(build_message(content or RecordDict(), message_type), context)


# ---------------------------------------------------------------- query.profile


def test_profile_reply_is_the_exact_profile(
    federation: Path, run_config: dict[str, ConfigValue], config: RunConfig, tmp_path
) -> None:
    # Prepare
    expected = build_site_profile(federation / SITE, profile_settings(config.affinity))

    # Execute
    reply = ask(run_config, federation / SITE, tmp_path / "state", protocol.PROFILE)

    # Assert
    assert not reply.has_error(), reply.error.reason
    assert set(reply.content.keys()) == {protocol.METRICS_KEY, protocol.REPLY_KEY}
    released = protocol.ProfileReply.from_fields(reply.content[protocol.METRICS_KEY])
    rebuilt = SiteProfile.from_dict(released.profile_values(SITE))
    # Exact to the site's release precision (limits.metric-decimals = 3).
    assert np.allclose(rebuilt.image_quantiles, expected.image_quantiles, atol=5e-4)
    assert rebuilt.mean_label_map is not None
    assert expected.mean_label_map is not None
    assert np.allclose(rebuilt.mean_label_map, expected.mean_label_map, atol=5e-4)
    assert rebuilt.mean_label_map.shape == (config.affinity.label_grid,) * 3
    assert rebuilt.noise is None
    assert not released.private
    assert (released.num_images, released.num_labelled) == (2, 2)


def test_profile_under_dp_is_noised_and_its_epsilon_accounted(
    federation: Path, run_config: dict[str, ConfigValue], config: RunConfig, tmp_path
) -> None:
    # Prepare
    exact = build_site_profile(federation / SITE, profile_settings(config.affinity))
    state = tmp_path / "state"
    noise = float(DP_POLICY["dp.noise-multiplier"])  # type: ignore[arg-type]

    # Execute
    reply = ask(
        run_config, federation / SITE, state, protocol.PROFILE, policy=DP_POLICY
    )

    # Assert
    assert not reply.has_error(), reply.error.reason
    released = protocol.ProfileReply.from_fields(reply.content[protocol.METRICS_KEY])
    assert released.private
    assert released.noise_multiplier == noise
    # Image, label map, foreground fractions, and the polarity term when weighed.
    parts = get_profile_sensitivity(exact).num_parts
    assert parts == (4 if config.affinity.polarity_weight > 0 else 3)
    expected_epsilon = compute_gaussian_epsilon(noise, delta=1e-5, num_mechanisms=parts)
    assert released.epsilon_spent == pytest.approx(expected_epsilon, rel=1e-6)
    assert released.epsilon_total == pytest.approx(expected_epsilon, rel=1e-6)
    assert not np.allclose(released.image_quantiles, exact.image_quantiles)
    # The release is in the site's accountant: one full-data Gaussian mechanism per
    # part.
    history = read_accountant_state(state / ACCOUNTANT_FILE).history
    assert history == ((noise, 1.0, parts),)
    entry = Ledger(state / "ledger.jsonl").entries()[-1]
    assert entry.message_type == protocol.PROFILE
    assert entry.epsilon_spent == pytest.approx(expected_epsilon, rel=1e-6)


def test_profile_over_budget_is_refused_and_nothing_is_spent(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path
) -> None:
    # Prepare: a budget below one release's epsilon
    state = tmp_path / "state"
    policy = {**DP_POLICY, "dp.budget-epsilon": 0.5}

    # Execute
    reply = ask(run_config, federation / SITE, state, protocol.PROFILE, policy=policy)

    # Assert
    assert_site_error(reply, "PrivacyBudgetError", "budget is epsilon 0.5")
    assert not (state / ACCOUNTANT_FILE).exists()


def test_profile_of_a_site_without_labels_has_no_label_term(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path
) -> None:
    # Prepare: site B with its labels removed
    site = tmp_path / "B"
    shutil.copytree(federation / "B", site)
    shutil.rmtree(site / "labelsTr")
    (site / "labelsTr").mkdir()

    # Execute
    reply = ask(run_config, site, tmp_path / "state", protocol.PROFILE)

    # Assert
    assert not reply.has_error(), reply.error.reason
    fields = reply.content[protocol.METRICS_KEY]
    assert "mean-label-map" not in fields
    assert "foreground-quantiles" not in fields
    released = protocol.ProfileReply.from_fields(fields)
    assert released.label_grid == 0
    assert released.num_labelled == 0


def test_guard_lets_the_declared_profile_lengths_through_and_no_more(
    federation: Path, run_config: dict[str, ConfigValue], config: RunConfig, tmp_path
) -> None:
    # Prepare: the label map holds G^3 values, far more than the site's 2 cases
    grid_values = config.affinity.label_grid**3
    context = build_site_context(run_config, federation / SITE, tmp_path / "state")
    setup = resolve_setup(context)

    # Execute
    reply = ask(run_config, federation / SITE, tmp_path / "state", protocol.PROFILE)
    limits = {
        message_type: _max_metric_values(setup, message_type)
        for message_type in (protocol.PROFILE, protocol.LFTM, protocol.FINETUNE)
    }

    # Assert
    assert not reply.has_error(), reply.error.reason
    assert len(reply.content[protocol.METRICS_KEY]["mean-label-map"]) == grid_values
    assert limits == {
        protocol.PROFILE: grid_values,
        protocol.LFTM: 2,
        protocol.FINETUNE: 2,
    }


def test_profile_carries_the_polarity_term_only_when_the_run_weighs_it(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path
) -> None:
    # Prepare: the same site asked without and with affinity.polarity-weight > 0
    weighed = {**run_config, "affinity.polarity-weight": 0.5}
    quantiles = load_run_config(weighed).affinity.polarity_quantiles

    # Execute
    paper = {**run_config, "affinity.polarity-weight": 0.0}
    plain = ask(paper, federation / SITE, tmp_path / "plain", protocol.PROFILE)
    reply = ask(weighed, federation / SITE, tmp_path / "weighed", protocol.PROFILE)

    # Assert
    assert not plain.has_error(), plain.error.reason
    assert "foreground-intensities" not in plain.content[protocol.METRICS_KEY]
    assert not reply.has_error(), reply.error.reason
    fields = reply.content[protocol.METRICS_KEY]
    assert len(fields["foreground-intensities"]) == quantiles
    assert len(fields["shell-intensities"]) == quantiles
    rebuilt = SiteProfile.from_dict(
        protocol.ProfileReply.from_fields(fields).profile_values(SITE)
    )
    assert rebuilt.foreground_intensities is not None


def test_polarity_term_stays_home_below_min_cases(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path
) -> None:
    # Prepare: site A with one more training image, unlabelled: its 3 images reach
    # the policy's limits.min-cases of 3, its 2 labelled cases do not
    site = tmp_path / "A"
    shutil.copytree(federation / SITE, site)
    first = sorted((site / "imagesTr").iterdir())[0]
    shutil.copy(first, site / "imagesTr" / first.name.replace("_0000", "9_0000"))
    weighed = {**run_config, "affinity.polarity-weight": 0.5}

    # Execute
    reply = ask(
        weighed,
        site,
        tmp_path / "state",
        protocol.PROFILE,
        policy={"limits.min-cases": 3},
    )

    # Assert: neither the label term nor the polarity term leaves
    assert not reply.has_error(), reply.error.reason
    fields = reply.content[protocol.METRICS_KEY]
    for key in ("mean-label-map", "foreground-intensities", "shell-intensities"):
        assert key not in fields
    assert fields["num-labelled"] == 2


# ----------------------------------------------------------------- train.finetune


def test_finetune_trains_the_given_model_further(
    federation: Path, run_config: dict[str, ConfigValue], config: RunConfig, tmp_path
) -> None:
    # Prepare
    start = build_initial_weights(config)
    content = RecordDict()
    content[protocol.WEIGHTS_KEY] = records.to_array_record(start)

    # Execute
    reply = ask(
        run_config, federation / SITE, tmp_path / "state", protocol.FINETUNE, content
    )

    # Assert
    assert not reply.has_error(), reply.error.reason
    weights = records.read_weights(reply.content)
    assert {k: v.shape for k, v in weights.items()} == {
        k: v.shape for k, v in start.items()
    }
    assert any(not np.array_equal(weights[k], start[k]) for k in start)
    report = protocol.TrainReply.from_fields(reply.content[protocol.METRICS_KEY])
    # finetune-epochs (1 in the tiny config) over 2 cases x 3 slices
    assert report.num_examples == config.affinity.finetune_epochs * 2 * 3
    assert np.isfinite(report.loss)


def test_finetune_without_weights_is_refused_naming_the_key(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path
) -> None:
    # Execute
    reply = ask(run_config, federation / SITE, tmp_path / "state", protocol.FINETUNE)

    # Assert
    assert_site_error(reply, "train.finetune", "'weights'", "has none")


def test_finetune_at_a_site_without_labels_names_the_folder(
    federation: Path, config: RunConfig, tmp_path
) -> None:
    # Prepare
    site = tmp_path / "C"
    shutil.copytree(federation / "C", site)
    shutil.rmtree(site / "labelsTr")
    (site / "labelsTr").mkdir()

    # Execute / Assert
    with pytest.raises(ValueError, match="no labelled training cases"):
        finetune_model(site, build_initial_weights(config), config)


def test_finetune_config_takes_the_affinity_recipe(config: RunConfig) -> None:
    # Execute
    tuned = finetune_config(config)

    # Assert
    assert tuned.train.epochs == config.affinity.finetune_epochs
    assert tuned.train.learning_rate == config.affinity.finetune_learning_rate
    assert dataclasses.replace(tuned, train=config.train) == config


def test_release_profile_with_a_fixed_rng_is_reproducible(
    federation: Path, config: RunConfig, tmp_path
) -> None:
    # Execute
    first = release_profile(
        federation / SITE, config, dp=DP, rng=np.random.default_rng(3)
    )
    second = release_profile(
        federation / SITE, config, dp=DP, rng=np.random.default_rng(3)
    )
    from_os = release_profile(federation / SITE, config, dp=DP)

    # Assert
    assert np.array_equal(first.profile.image_quantiles, second.profile.image_quantiles)
    assert not np.array_equal(
        first.profile.image_quantiles, from_os.profile.image_quantiles
    )
    assert first.privacy is not None
    parts = 4 if config.affinity.polarity_weight > 0 else 3
    assert first.privacy.accountant.history == ((2.0, 1.0, parts),)


# ---------------------------------------------------------------- the wire form


def test_profile_reply_round_trips(federation: Path, config: RunConfig) -> None:
    # Prepare
    profile = build_site_profile(federation / SITE, profile_settings(config.affinity))

    # Execute
    reply = protocol.ProfileReply.from_profile_values(profile.to_dict())
    parsed = protocol.ProfileReply.from_fields(
        json.loads(json.dumps(reply.to_fields()))
    )

    # Assert
    assert parsed == reply
    assert SiteProfile.from_dict(parsed.profile_values(SITE)).num_labelled == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"foreground-quantiles": None}, "'foreground-quantiles' is missing"),
        ({"label-grid": 0}, "must be > 0 exactly when a label term is sent"),
        ({"image-quantiles": ["a"]}, "'image-quantiles' must be a list of numbers"),
        ({"num-images": 2.5}, "'num-images' must be an integer"),
        ({"dp.delta": None}, "'dp.delta' is missing"),
    ],
)
def test_profile_reply_rejects_bad_fields(
    federation: Path, config: RunConfig, change: dict[str, object], message: str
) -> None:
    # Prepare
    profile = build_site_profile(federation / SITE, profile_settings(config.affinity))
    fields: dict[str, object] = dict(
        protocol.ProfileReply.from_profile_values(profile.to_dict()).to_fields()
    )
    for key, value in change.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        protocol.ProfileReply.from_fields(fields)
