"""The security benchmark: a tiny run against a real ClientApp, its fallbacks, decoders.

The tiny run drives site A of a small synthetic federation through
``clients.app.app`` (guard and ledger included) at 16 px with a 3-level U-Net: the
evaluate attack must recover the evaluation label maps far above the majority class,
and one profile at a fine label grid the labelled case's volume exactly. A site whose
policy does not answer ``evaluate`` is recorded as a refusal, not a crash.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core import protocol
from core.config import ConfigValue, read_default_run_config
from core.policy import ACTIONS
from simulations.benchmark import main
from simulations.security_attacks import (
    SiteChannel,
    ask_consensus,
    ask_evaluate,
    crafted_models,
)
from simulations.security_benchmark import (
    ATTACKS,
    SECURITY_RUN_CONFIG,
    ensure_security_federation,
    format_security_table,
    parse_attacks,
)
from simulations.security_decode import (
    decode_cases,
    decode_mean_map,
    score_maps,
)
from simulations.security_fallbacks import (
    AttackPlan,
    adapt_to_refusal,
    coarser_cells_when_values_vanish,
    fewer_models_per_predictor,
    fewer_models_per_request,
    fewer_predictors_per_request,
    new_run_when_run_limit,
    smaller_sizes,
    stop_when_action_refused,
    stop_when_budget_spent,
    stop_when_too_few_cases,
)
from simulations.security_patterns import PixelCode
from tests.unit.clients.messages import write_policy

# A 3-level U-Net at 16 px: its bottleneck sees the whole image, so crafted models
# can paint any pixel; seconds to craft on 2 CPU cores.
TINY_SECURITY: dict[str, ConfigValue] = {
    "model.channels": "4,8,16",
    "model.strides": "2,2",
}


def _run(tmp: Path, *extra: str, out: Path | None = None) -> dict[str, object]:
    out = out or tmp / "security.json"
    threads = torch.get_num_threads()
    overrides = [f"--set={key}={value}" for key, value in TINY_SECURITY.items()]
    try:
        assert (
            main(
                [
                    "security",
                    "--cache-dir",
                    str(tmp / "data"),
                    "--out",
                    str(out),
                    "--image-size=16",
                    "--consensus-image-size=16",
                    "--lftm-block=8",
                    "--profile-grid=64",
                    "--threads=1",
                    *overrides,
                    *extra,
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    document: dict[str, object] = json.loads(out.read_text())
    return document


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def document(folder: Path) -> dict[str, object]:
    """One tiny ``before`` run: evaluate, LFTM and profile against site A."""
    return _run(folder, "--attacks=evaluate,lftm,profile")


def _attacks(document: dict[str, object], stage: str) -> dict[str, dict[str, object]]:
    part = document[stage]
    assert isinstance(part, dict)
    attacks = part["attacks"]
    assert isinstance(attacks, dict)
    return attacks


def _tiny_run_config() -> dict[str, ConfigValue]:
    flat = read_default_run_config()
    flat.update(SECURITY_RUN_CONFIG)
    flat.update(TINY_SECURITY)
    flat["data.image-size"] = 16
    return flat


# ----------------------------------------------------------------- the tiny run


def test_document_holds_each_attack_with_its_figures(
    document: dict[str, object],
) -> None:
    assert document["benchmark"] == "security"
    assert "recovered_share" in document["definitions"]  # type: ignore[operator]
    before = document["before"]
    assert isinstance(before, dict)
    assert {"machine", "seconds", "site", "policy", "run_config", "attacks"} <= set(
        before
    )
    assert before["policy"] == "safe defaults (no policy file)"
    attacks = _attacks(document, "before")
    assert list(attacks) == ["evaluate", "lftm", "profile"]
    for entry in attacks.values():
        for key in (
            "recovered_share",
            "majority_share",
            "dice",
            "queries",
            "requests",
            "seconds",
            "site",
            "target_map",
            "refusals",
            "ledger",
        ):
            assert key in entry, key
        assert entry["refusals"] == []
    table = format_security_table(document)
    assert "| before | evaluate |" in table
    assert "| before | profile |" in table


def test_evaluate_attack_reconstructs_the_evaluation_maps(
    document: dict[str, object],
) -> None:
    evaluate = _attacks(document, "before")["evaluate"]
    # 256 single-pixel predictors and the whole image, in one request after hello.
    assert evaluate["queries"] == 16 * 16 + 1
    assert evaluate["requests"] == 2
    assert evaluate["ledger"] == {"released": 2}
    assert evaluate["site"] == {
        "cases": 6,
        "slices_per_case": 1,
        "image_size": 16,
        "model_channels": [4, 8, 16],
    }
    assert evaluate["decoder"] == "per-case"
    assert evaluate["consistent"] is True
    assert evaluate["unexplained_pixels"] == 0
    recovered, majority = evaluate["recovered_share"], evaluate["majority_share"]
    assert isinstance(recovered, float)
    assert isinstance(majority, float)
    assert recovered >= 0.98 > majority + 0.03
    assert evaluate["dice"] >= 0.85  # type: ignore[operator]
    # Another site's majority map, a guess without queries, falls short of it.
    assert evaluate["prior_site"] == "B"
    assert majority <= evaluate["prior_share"] < recovered  # type: ignore[operator]


def test_profile_attack_recovers_the_labelled_case_exactly(
    document: dict[str, object],
) -> None:
    profile = _attacks(document, "before")["profile"]
    assert profile["queries"] == 1
    assert profile["requests"] == 1
    assert profile["label_grid"] == 64
    assert profile["num_labelled"] == 1
    assert profile["epsilon"] == 0.0
    assert profile["site"] == {"cases": 1, "volume_shape": [10, 64, 64]}
    assert profile["recovered_share"] == 1.0
    assert profile["prior_site"] == "B"
    assert profile["prior_share"] < 1.0  # type: ignore[operator]
    assert profile["majority_share"] < 0.99  # type: ignore[operator]


def test_lftm_scores_carry_nothing_of_the_site(document: dict[str, object]) -> None:
    lftm = _attacks(document, "before")["lftm"]
    assert lftm["queries"] == 4  # 2 x 2 cells of 8 px, one candidate each
    assert lftm["value_counts"] == {"1": 4}
    assert lftm["same_values_at_other_site"] is True
    assert lftm["recovered_share"] == lftm["majority_share"]


def test_consensus_label_dice_is_evaluates_dice_for_the_same_cell(
    document: dict[str, object], folder: Path, tmp_path: Path
) -> None:
    # Prepare: the tiny run crafted these models already (reused here)
    del document
    site = ensure_security_federation(folder / "data", seed=0) / "A"
    plan = AttackPlan(run_config=_tiny_run_config())
    models = crafted_models(plan, []).models
    channel = SiteChannel(site_dir=site, state_dir=tmp_path)
    cells = [8 * 16 + 8, 0]  # the organ's middle, and a corner

    # Execute
    evaluated, _, error = ask_evaluate(channel, plan, models, cells)
    assert error is None
    fused = {}
    for cell in cells:
        values, _, error = ask_consensus(channel, plan, models, [cell])
        assert error is None
        fused.update(values)

    # Assert
    assert evaluated[cells[0]] > 0.0
    assert evaluated[cells[1]] == 0.0
    assert fused == pytest.approx(evaluated, abs=1e-9)


def test_a_refusing_site_is_recorded_and_the_before_stage_kept(
    document: dict[str, object], folder: Path
) -> None:
    # Prepare: a site that answers everything but evaluate
    answered = [action for action in ACTIONS if action != protocol.EVALUATE]
    policy = write_policy(folder, {"actions.answer": answered})

    # Execute
    after = _run(folder, "--attacks=evaluate", "--stage=after", f"--policy={policy}")

    # Assert
    assert after["before"] == document["before"]
    evaluate = _attacks(after, "after")["evaluate"]
    refusals = evaluate["refusals"]
    assert isinstance(refusals, list)
    assert len(refusals) == 1
    assert refusals[0]["request"] == 2
    assert "action-not-answered" in refusals[0]["reason"]
    assert "'evaluate' is not in actions.answer" in refusals[0]["reason"]
    assert refusals[0]["fallback"] == ""
    assert str(evaluate["stopped"]).startswith("action refused: ")
    assert evaluate["queries"] == 0
    assert evaluate["recovered_share"] == evaluate["majority_share"]
    assert evaluate["ledger"] == {"released": 1, "blocked": 1}
    part = after["after"]
    assert isinstance(part, dict)
    assert part["policy"]["file"] == str(policy)  # type: ignore[index]


def test_rerunning_one_attack_keeps_the_others_of_its_stage(
    document: dict[str, object], folder: Path, tmp_path: Path
) -> None:
    # Prepare: a copy of the tiny run's document
    out = tmp_path / "security.json"
    out.write_text(json.dumps(document))

    # Execute
    rerun = _run(folder, "--attacks=profile", out=out)

    # Assert
    attacks = _attacks(rerun, "before")
    assert list(attacks) == ["evaluate", "lftm", "profile"]
    assert attacks["evaluate"] == _attacks(document, "before")["evaluate"]
    assert attacks["profile"]["recovered_share"] == 1.0
    assert "| before | lftm |" in format_security_table(rerun)


# ------------------------------------------------------------------- fallbacks


@pytest.fixture
def plan() -> AttackPlan:
    return AttackPlan(run_config=_tiny_run_config(), predictors_per_request=64)


@pytest.mark.parametrize(
    ("fallback", "reason"),
    [
        (stop_when_budget_spent, "query budget of 5000 spent for this site"),
        (stop_when_action_refused, "blocked by egress policy: action-not-answered"),
        (stop_when_too_few_cases, "at least 10 cases must stand behind a metric"),
    ],
)
def test_final_refusals_stop_the_attack_and_say_why(
    plan: AttackPlan, fallback: object, reason: str
) -> None:
    weaker, name = adapt_to_refusal(plan, reason, first_of_run=False)
    assert name == ""
    assert reason in weaker.stopped
    assert callable(fallback)
    assert fallback(plan, reason) is not None


def test_a_per_run_limit_starts_a_new_run_unless_the_run_just_began(
    plan: AttackPlan,
) -> None:
    reason = "limits.max-predictors-per-run: 2048 predictors per run reached"
    weaker, name = adapt_to_refusal(plan, reason, first_of_run=False)
    assert name == new_run_when_run_limit.__name__
    assert weaker.run_id == plan.run_id + 1
    assert weaker.predictors_per_request == plan.predictors_per_request
    # Refused at a run's first request: a new run would be too; fewer predictors.
    weaker, name = adapt_to_refusal(plan, reason, first_of_run=True)
    assert name == fewer_predictors_per_request.__name__
    assert weaker.run_id == plan.run_id
    assert weaker.predictors_per_request == 32


def test_capped_sizes_are_halved(plan: AttackPlan) -> None:
    wide = AttackPlan(run_config={**plan.run_config, "data.image-size": 64})
    smaller = smaller_sizes(wide, "data.image-size 64 exceeds limits.max-image-size")
    assert smaller is not None
    assert smaller.config.data.image_size == 32
    thinner = smaller_sizes(plan, "model.channels 16 exceeds limits.max-channels")
    assert thinner is not None
    assert thinner.config.model.channels == (2, 4, 8)
    assert smaller_sizes(plan, "something else") is None


def test_restricted_mixtures_fall_back_to_one_model_per_coarser_cell(
    plan: AttackPlan,
) -> None:
    weaker = fewer_models_per_predictor(
        plan, "a predictor mixes 2 models; limits.max-models-per-predictor is 1"
    )
    assert weaker is not None
    assert weaker.digits == 1
    assert weaker.block == 1
    wide = AttackPlan(run_config={**plan.run_config, "data.image-size": 64})
    coarse = fewer_models_per_predictor(wide, "negative or unnormalised weights")
    assert coarse is not None
    assert (coarse.digits, coarse.block) == (1, 4)
    sources = fewer_models_per_predictor(plan, "2 label sources, limits allow 1")
    assert sources is not None
    assert sources.digits == 1
    assert fewer_models_per_predictor(weaker, "mixture") is None


def test_too_many_models_per_request_halves_them(plan: AttackPlan) -> None:
    weaker = fewer_models_per_request(plan, "request carries 33 models, limit 8")
    assert weaker is not None
    assert weaker.models_per_request == 16
    assert fewer_models_per_request(plan, "too many predictors") is None


def test_vanished_values_make_cells_coarser(plan: AttackPlan) -> None:
    zeros = {cell: 0.0 for cell in range(256)}
    coarser = coarser_cells_when_values_vanish(plan, zeros, 0.12)
    assert coarser is not None
    assert coarser.block == 2
    assert coarser_cells_when_values_vanish(plan, {0: 0.01}, 0.12) is None
    assert coarser_cells_when_values_vanish(plan, zeros, 0.0) is None


def test_an_unknown_refusal_halves_predictors_then_stops(plan: AttackPlan) -> None:
    _weaker, name = adapt_to_refusal(plan, "no", first_of_run=False)
    assert name == fewer_predictors_per_request.__name__
    single = AttackPlan(run_config=plan.run_config, predictors_per_request=1)
    stopped, name = adapt_to_refusal(single, "no", first_of_run=False)
    assert name == ""
    assert stopped.stopped == "refused: no"


def test_parse_attacks_names_the_choices() -> None:
    assert parse_attacks("profile, evaluate") == ("evaluate", "profile")
    with pytest.raises(argparse.ArgumentTypeError, match="--attacks takes some of"):
        parse_attacks("evaluate,gradients")
    assert set(ATTACKS) == {"evaluate", "consensus", "lftm", "profile"}


# -------------------------------------------------------------- code and decoder


@pytest.mark.parametrize(("size", "block", "digits"), [(16, 1, 2), (32, 2, 3)])
def test_each_cell_is_the_only_overlap_of_its_models(
    size: int, block: int, digits: int
) -> None:
    code = PixelCode(size=size, block=block, digits=digits)
    patterns = code.patterns()
    assert code.base**digits >= code.num_cells > (code.base - 1) ** digits
    for cell in range(code.num_cells):
        overlap = np.logical_and.reduce([patterns[n] for n, _ in code.members(cell)])
        assert np.array_equal(overlap, code.cell_map(cell))
        assert sum(weight for _, weight in code.members(cell)) == pytest.approx(1.0)


def _case_maps(seed: int, counts: list[int], size: int = 16) -> list[np.ndarray]:
    """Blobs of the given pixel counts, overlapping around the image centre."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    maps = []
    for count in counts:
        centre = rng.uniform(6, 10, size=2)
        distance = np.hypot(rows - centre[0], cols - centre[1]) + rng.uniform(
            0, 1e-3, (size, size)
        )
        order = np.argsort(distance, axis=None)[:count]
        blob = np.zeros(size * size, dtype=bool)
        blob[order] = True
        maps.append(blob.reshape(size, size))
    return maps


def _mean_dice(maps: list[np.ndarray]) -> dict[int, float]:
    """What evaluate returns for each single-pixel predictor (float32 per case)."""
    counts = [int(m.sum()) for m in maps]
    return {
        pixel: float(
            np.mean(
                [
                    float(np.float32(2.0 * m.flat[pixel]) / np.float32(1 + y))
                    for m, y in zip(maps, counts, strict=True)
                ]
            )
        )
        for pixel in range(maps[0].size)
    }


def test_single_pixel_dice_decodes_into_every_cases_map() -> None:
    truth = _case_maps(0, [21, 30, 17, 26])
    decoded = decode_cases(_mean_dice(truth), num_cases=4, size=16)
    assert decoded.consistent
    assert not decoded.unexplained
    assert not decoded.ambiguous
    assert sorted(decoded.counts) == [17, 21, 26, 30]
    assert score_maps(decoded.maps, truth).recovered_share == 1.0


def test_cases_sharing_a_count_are_interchangeable() -> None:
    # Twice 1/(1+19) is 1/(1+9): the decoder must read a second 19, not a 9.
    truth = _case_maps(1, [19, 19, 25])
    decoded = decode_cases(_mean_dice(truth), num_cases=3, size=16)
    assert decoded.consistent
    assert sorted(decoded.counts) == [19, 19, 25]
    shared = int((truth[0] ^ truth[1]).sum())  # held by one of the two only
    assert decoded.ambiguous == shared
    # Each such pixel goes to neither: wrong in exactly one of the two maps.
    score = score_maps(decoded.maps, truth)
    assert shared > 0
    assert score.recovered_share == pytest.approx(1 - shared / 768)


def test_rounded_values_leave_the_mean_map() -> None:
    truth = _case_maps(2, [21, 30, 17, 26])
    rounded = {p: round(v, 3) for p, v in _mean_dice(truth).items()}
    assert not decode_cases(rounded, num_cases=4, size=16).consistent
    cells = {p: np.eye(1, 256, p, dtype=bool).reshape(16, 16) for p in rounded}
    mean = decode_mean_map(rounded, cells, size=16)
    majority = np.mean(truth, axis=0) > 0.5
    assert (mean == majority).mean() >= 0.97
    assert (
        score_maps([mean] * 4, truth).recovered_share
        > score_maps([], truth).recovered_share
    )


def test_score_maps_without_reconstruction_is_the_majority_baseline() -> None:
    truth = _case_maps(3, [20, 40])
    score = score_maps([], truth)
    assert score.recovered_share == score.majority_share == 1 - 60 / 512
    with pytest.raises(ValueError, match="no true maps"):
        score_maps([], [])
