"""The security benchmark: a tiny attack on a defended site, its fallbacks, decoders.

The tiny run drives site A of a small synthetic federation through
``clients.app.app`` (guard and ledger included) at 16 px with a 3-level U-Net, under
the safe default policy: every attack must stay within the limits the site states
(no request refused, every reply released), and what ``evaluate`` still gives is at
most the site's mean map (the ceiling of a map shared by all cases), never a case's
own. Under a policy that requires DP the attack is stopped by the privacy budget.
The fallbacks are checked against the refusal texts ``core.privacy.limits`` really
writes, and the whole-volume decoder on made-up volumes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core import protocol
from core.config import ConfigValue, load_default_config, read_default_run_config
from core.privacy.limits import (
    LABEL_SOURCES,
    PREDICTORS,
    CaseCounts,
    LimitError,
    charge_queries,
    check_cases,
    check_request,
    check_run_sizes,
    default_limits,
    to_limit_fields,
)
from core.privacy.policy import ACTIONS, Rule, Violation, describe_violations
from simulations.benchmark.cli import main
from simulations.benchmark.security.attacks import (
    SiteChannel,
    ask_consensus,
    crafted_models,
    measure_cells,
)
from simulations.benchmark.security.decode import (
    decode_cases,
    decode_mean_map,
    score_maps,
)
from simulations.benchmark.security.fallbacks import (
    AttackPlan,
    adapt_to_refusal,
    advertised_limits,
    coarser_cells_when_values_vanish,
    fewer_models_per_predictor,
    fewer_models_per_request,
    fewer_predictors_per_request,
    new_run_when_run_limit,
    plan_within_limits,
    sizes_within_caps,
    stop_when_action_refused,
    stop_when_budget_spent,
    stop_when_too_few_cases,
)
from simulations.benchmark.security.patterns import PixelCode
from simulations.benchmark.security.run import (
    ATTACKS,
    SECURITY_RUN_CONFIG,
    ensure_security_federation,
    format_security_table,
    parse_attacks,
    parse_stage,
)
from simulations.benchmark.security.scoring import consensus_maps_of
from simulations.benchmark.security.volume import (
    decode_volumes,
    estimate_counts,
    place_calibrated,
    place_centred,
    release_values,
)
from tests.unit.clients.messages import write_policy

# A 3-level U-Net at 16 px: its bottleneck sees the whole image, so crafted models
# can paint any pixel; seconds to craft on 2 CPU cores.
TINY_SECURITY: dict[str, ConfigValue] = {
    "model.channels": "4,8,16",
    "model.strides": "2,2",
}
DP_POLICY = Path(__file__).resolve().parents[4] / "benchmarks" / "security_policies"


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
                    "--page",
                    "",
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
    """One tiny ``after`` run against the safe defaults (consensus: see below)."""
    return _run(folder, "--attacks=evaluate,lftm,profile,profile-two-labelled")


@pytest.fixture(scope="module")
def dp_document(folder: Path, document: dict[str, object]) -> dict[str, object]:
    """The same site under a policy that requires DP (into the same document)."""
    del document  # written first: the DP stage joins it
    return _run(
        folder,
        "--attacks=evaluate,consensus,profile-two-labelled",
        "--stage=after-dp",
        f"--policy={DP_POLICY / 'dp.toml'}",
    )


def _attacks(document: dict[str, object], stage: str) -> dict[str, dict[str, object]]:
    part = document[stage]
    assert isinstance(part, dict)
    attacks = part["attacks"]
    assert isinstance(attacks, dict)
    return attacks


def _number(value: object) -> float:
    assert isinstance(value, int | float), value
    return float(value)


def _tiny_run_config() -> dict[str, ConfigValue]:
    flat = read_default_run_config()
    flat.update(SECURITY_RUN_CONFIG)
    flat.update(TINY_SECURITY)
    flat["data.image-size"] = 16
    return flat


# ------------------------------------------------- the tiny run, defended site


def test_document_holds_each_attack_with_its_figures(
    document: dict[str, object], tmp_path: Path
) -> None:
    assert document["benchmark"] == "security"
    assert "ceiling_share" in document["definitions"]  # type: ignore[operator]
    after = document["after"]
    assert isinstance(after, dict)
    assert {"machine", "finished", "seconds", "site", "policy", "attacks"} <= set(after)
    assert after["policy"] == "safe defaults (no policy file)"
    attacks = _attacks(document, "after")
    assert list(attacks) == ["evaluate", "lftm", "profile", "profile-two-labelled"]
    for entry in attacks.values():
        for key in (
            "recovered_share",
            "majority_share",
            "prior_share",
            "ceiling_share",
            "dice",
            "queries",
            "requests",
            "runs",
            "seconds",
            "refusals",
            "ledger",
            "training_cases",
        ):
            assert key in entry, key
        # Planned within the limits the site states: nothing refused.
        assert entry["refusals"] == []
        assert entry["ledger"] == {"released": entry["requests"]}
    # The page's block is regenerated from the document, never typed.
    page = tmp_path / "page.md"
    page.write_text(
        "x\n<!-- benchmark:security -->\nold\n<!-- /benchmark:security -->\n"
    )
    out = tmp_path / "copy.json"
    out.write_text(json.dumps(document))
    assert main(["security", f"--table-from={out}", f"--page={page}"]) == 0
    text = page.read_text()
    assert "old" not in text
    assert "| after | evaluate |" in text
    assert (
        text
        == "x\n<!-- benchmark:security -->\n"
        + format_security_table(document)
        + "\n<!-- /benchmark:security -->\n"
    )


def test_evaluate_stays_within_the_limits_and_gets_at_most_the_mean_map(
    document: dict[str, object],
) -> None:
    evaluate = _attacks(document, "after")["evaluate"]
    # Whole volumes: every slice of the six cases; 256 pixels and the whole image.
    assert evaluate["site"] == {
        "cases": 6,
        "slices_per_case": 10,
        "image_size": 16,
        "model_channels": [4, 8, 16],
    }
    assert evaluate["training_cases"] == {
        "labelled": 1,
        "unlabelled": 1,
        "evaluation": 6,
    }
    assert evaluate["queries"] == evaluate["units_charged"] == 16 * 16 + 1
    construction = evaluate["construction"]
    assert isinstance(construction, dict)
    assert construction["predictors_per_request"] == 48
    assert construction["models_per_request"] == 32
    assert construction["units_per_run"] == 64
    assert construction["budget"] == 5000
    # 64 units a run: 48 + 16 predictors in each of four runs, one in a fifth.
    assert evaluate["runs"] == 5
    assert evaluate["requests"] == 1 + 4 * 2 + 1
    assert evaluate["stopped"] == ""
    # Every strategy gives each case the same map: none can beat the site's own
    # mean map, and the best is the attack's figure.
    decoders = evaluate["decoders"]
    assert isinstance(decoders, dict)
    assert set(decoders) == {"centred", "prior-ranked", "prior-calibrated"}
    recovered = _number(evaluate["recovered_share"])
    assert recovered == max(decoders.values())
    assert _number(evaluate["majority_share"]) < recovered
    assert recovered <= _number(evaluate["ceiling_share"])
    per_case = evaluate["recovered_share_per_case"]
    assert isinstance(per_case, list)
    assert max(per_case) < 1.0  # no case is recovered exactly
    assert evaluate["mean_volume_from"] == "whole-image"


def test_profile_leaves_its_label_term_home_below_min_cases(
    document: dict[str, object],
) -> None:
    attacks = _attacks(document, "after")
    one = attacks["profile"]
    # Held to limits.max-label-grid as hello said: no refusal for 64.
    assert one["label_grid"] == 32
    assert one["label_term"] == "left out"
    assert one["num_labelled"] == 1
    assert one["recovered_share"] == one["majority_share"]
    assert "label term left out" in format_security_table(document)
    two = attacks["profile-two-labelled"]
    assert two["label_term"] == "released"
    assert two["num_labelled"] == 2
    assert two["label_map_noise_sd"] == 0.0
    # The mean of two maps: never more than the site's own mean map gives.
    assert _number(two["recovered_share"]) <= _number(two["ceiling_share"]) + 1e-4


def test_lftm_scores_carry_nothing_of_the_site(document: dict[str, object]) -> None:
    lftm = _attacks(document, "after")["lftm"]
    assert lftm["queries"] == 4  # 2 x 2 cells of 8 px, one candidate each
    assert lftm["value_counts"] == {"1": 4}
    assert lftm["same_values_at_other_site"] is True
    assert lftm["recovered_share"] == lftm["majority_share"]


def test_consensus_scores_whole_evaluation_volumes(
    document: dict[str, object], folder: Path, tmp_path: Path
) -> None:
    # Prepare: the tiny run crafted these models already (reused here); the run asks
    # for one slice per case, which the site's consensus scoring ignores
    del document
    site = ensure_security_federation(folder / "data", seed=0, extra_unlabelled=1)
    plan = AttackPlan(run_config=_tiny_run_config())
    models = crafted_models(plan, []).models
    channel = SiteChannel(site_dir=site / "A", state_dir=tmp_path)
    volumes = consensus_maps_of(_tiny_run_config(), None)(site / "A")
    centre = 8 * 16 + 8  # the organ's middle

    # Execute
    found, _, error = ask_consensus(channel, plan, models, [centre])

    # Assert: the pixel's whole-volume Dice (painted on every slice), rounded
    assert error is None
    assert all(volume.shape[0] > 1 for volume in volumes)
    expected = np.mean(
        [
            2.0
            * volume[:, centre // 16, centre % 16].sum()
            / (volume.shape[0] + volume.sum())
            for volume in volumes
        ]
    )
    assert found[centre] == round(float(expected), 3)


def test_a_refusing_site_is_recorded_and_the_other_stages_kept(
    document: dict[str, object], folder: Path, tmp_path: Path
) -> None:
    # Prepare: a site that answers everything but evaluate
    answered = [action for action in ACTIONS if action != protocol.EVALUATE]
    policy = write_policy(tmp_path, {"actions.answer": answered})
    out = tmp_path / "security.json"
    out.write_text(json.dumps(document))

    # Execute
    refused = _run(
        folder,
        "--attacks=evaluate",
        "--stage=after-no-evaluate",
        f"--policy={policy}",
        out=out,
    )

    # Assert
    assert refused["after"] == document["after"]
    evaluate = _attacks(refused, "after-no-evaluate")["evaluate"]
    refusals = evaluate["refusals"]
    assert isinstance(refusals, list)
    assert len(refusals) == 1
    assert refusals[0]["request"] == 2
    assert "action-not-answered" in refusals[0]["reason"]
    assert "'evaluate' is not in actions.answer" in refusals[0]["reason"]
    assert refusals[0]["fallback"] == ""
    assert str(evaluate["stopped"]).startswith("action refused: ")
    assert evaluate["queries"] == 0
    # Nothing measured: every cell takes the other site's map.
    assert evaluate["recovered_share"] == evaluate["prior_share"]
    assert evaluate["ledger"] == {"released": 1, "blocked": 1}
    assert "| after-no-evaluate | evaluate |" in format_security_table(refused)
    assert "1 (action refused)" in format_security_table(refused)


def test_a_run_cap_below_one_cells_cost_stops_the_attack(
    document: dict[str, object], folder: Path, tmp_path: Path
) -> None:
    # Prepare: a site answering one label source a run (a cell needs two)
    del document  # crafted the models this plan reuses
    site = ensure_security_federation(folder / "data", seed=0, extra_unlabelled=1)
    policy = write_policy(tmp_path, {"limits.max-label-sources-per-run": 1})
    channel = SiteChannel(site_dir=site / "A", state_dir=tmp_path, policy=policy)
    plan = AttackPlan(run_config=_tiny_run_config(), predictors_per_request=1)

    # Execute
    measured = measure_cells(
        channel, plan, ask_consensus, kind=LABEL_SOURCES, progress=print
    )

    # Assert: no new run ids without end, no request beyond hello
    assert measured.plan.stopped == "a cell costs 2 units, the site answers 1 a run"
    assert (measured.requests, measured.runs, measured.queries) == (1, 1, 0)
    assert measured.limits["max-label-sources-per-run"] == 1


def test_a_dp_site_stops_the_attack_at_its_budget(
    dp_document: dict[str, object],
) -> None:
    assert "after" in dp_document  # the stage before it is kept
    part = dp_document["after-dp"]
    assert isinstance(part, dict)
    assert part["policy"]["file"].endswith("dp.toml")  # type: ignore[index]
    attacks = _attacks(dp_document, "after-dp")
    evaluate = attacks["evaluate"]
    refusals = evaluate["refusals"]
    assert isinstance(refusals, list)
    assert refusals
    assert all("PrivacyBudgetError" in r["reason"] for r in refusals)
    assert refusals[-1]["fallback"] == ""
    assert str(evaluate["stopped"]).startswith("budget spent: ")
    # Epsilon 10 at noise 1 pays for three noised Dice values, no more.
    assert evaluate["queries"] == 3
    assert _number(evaluate["recovered_share"]) < _number(evaluate["ceiling_share"])
    consensus = attacks["consensus"]
    assert consensus["queries"] == 0
    assert "no-dp-form" in str(consensus["stopped"])
    two = attacks["profile-two-labelled"]
    assert _number(two["epsilon"]) > 0
    # sigma sqrt(32^3) / 2 on every value of the map.
    assert two["label_map_noise_sd"] == pytest.approx(math.sqrt(32**3) / 2, abs=1e-3)


def test_rerunning_one_attack_keeps_the_others_of_its_stage(
    document: dict[str, object], folder: Path, tmp_path: Path
) -> None:
    # Prepare: a copy of the tiny run's document
    out = tmp_path / "security.json"
    out.write_text(json.dumps(document))

    # Execute
    rerun = _run(folder, "--attacks=profile", out=out)

    # Assert
    attacks = _attacks(rerun, "after")
    assert list(attacks) == ["evaluate", "lftm", "profile", "profile-two-labelled"]
    assert attacks["evaluate"] == _attacks(document, "after")["evaluate"]
    assert attacks["profile"]["label_term"] == "left out"


# ------------------------------------------- fallbacks, on the real refusal texts


@pytest.fixture
def plan() -> AttackPlan:
    return AttackPlan(run_config=_tiny_run_config(), predictors_per_request=64)


def _refusal(*breaches: str) -> str:
    """A guard refusal as the coordinator receives it (anchored)."""
    violations = [Violation(Rule.LIMIT_EXCEEDED, breach) for breach in breaches]
    anchor = protocol.LedgerAnchor(3, "ab" * 32)
    return anchor.anchor_reason(describe_violations(violations))


def _predictors(count: int) -> dict[str, list[tuple[str, float]]]:
    return {f"c{k}": [("a", 0.5), ("b", 0.5)] for k in range(count)}


def test_per_request_caps_are_taken_from_the_refusal(plan: AttackPlan) -> None:
    # Both breaches of one request are met at once.
    breaches = check_request(default_limits(), models=33, predictors=_predictors(49))
    assert len(breaches) == 2
    weaker, name = adapt_to_refusal(plan, _refusal(*breaches), first_of_run=False)
    assert (weaker.models_per_request, weaker.predictors_per_request) == (32, 48)
    assert name == "fewer_models_per_request+fewer_predictors_per_request"


def test_a_per_run_cap_starts_a_new_run_unless_the_run_just_began(
    plan: AttackPlan, tmp_path: Path
) -> None:
    book = tmp_path / "queries.json"
    charge_queries(book, run_id="1", units={PREDICTORS: 63}, limits=default_limits())
    with pytest.raises(LimitError) as refused:
        charge_queries(
            book, run_id="1", units={PREDICTORS: 12}, limits=default_limits()
        )
    reason = _refusal(str(refused.value))
    assert "limits.max-predictors-per-run allows 64 per run" in reason
    weaker, name = adapt_to_refusal(plan, reason, first_of_run=False)
    assert name == new_run_when_run_limit.__name__
    assert weaker.run_id == plan.run_id + 1
    # Refused at a run's first request: a new run would be too; fewer predictors.
    weaker, name = adapt_to_refusal(plan, reason, first_of_run=True)
    assert name == fewer_predictors_per_request.__name__
    assert weaker.run_id == plan.run_id
    assert weaker.predictors_per_request == 32


def test_a_spent_query_budget_halves_the_request_then_stops(
    plan: AttackPlan, tmp_path: Path
) -> None:
    book = tmp_path / "queries.json"
    for run in range(78):
        charge_queries(
            book, run_id=str(run), units={PREDICTORS: 64}, limits=default_limits()
        )
    with pytest.raises(LimitError) as refused:
        charge_queries(
            book, run_id="78", units={PREDICTORS: 48}, limits=default_limits()
        )
    reason = str(refused.value)
    assert "limits.query-budget 5000" in reason
    assert "4992" not in reason  # what other runs used stays at the site
    weaker, name = adapt_to_refusal(plan, _refusal(reason), first_of_run=False)
    assert name == stop_when_budget_spent.__name__
    assert weaker.predictors_per_request == 32
    single = AttackPlan(run_config=plan.run_config, predictors_per_request=1)
    stopped, name = adapt_to_refusal(single, _refusal(reason), first_of_run=False)
    assert name == ""
    assert stopped.stopped.startswith("budget spent: ")


def test_a_privacy_budget_halves_the_request_then_stops(plan: AttackPlan) -> None:
    reason = (
        "PrivacyBudgetError: refused before training: the site's budget is epsilon "
        "10 at delta 1e-05; 9.010 is spent and this training (3 steps, noise 1.000, "
        "sample rate 1.000) would bring it to 13.776"
    )
    weaker, name = adapt_to_refusal(plan, reason, first_of_run=False)
    assert name == stop_when_budget_spent.__name__
    assert weaker.predictors_per_request == 32
    single = AttackPlan(run_config=plan.run_config, predictors_per_request=1)
    assert adapt_to_refusal(single, reason, first_of_run=False)[0].stopped


@pytest.mark.parametrize(
    ("fallback", "reason"),
    [
        (
            stop_when_too_few_cases,
            check_cases(
                default_limits(),
                "evaluate",
                CaseCounts(labelled=1, unlabelled=0, evaluation=1),
            )[0],
        ),
        (stop_when_action_refused, "'evaluate' is not in actions.answer of policy"),
    ],
)
def test_final_refusals_stop_the_attack_and_say_why(
    plan: AttackPlan, fallback: object, reason: str
) -> None:
    text = _refusal(reason)
    weaker, name = adapt_to_refusal(plan, text, first_of_run=False)
    assert name == ""
    assert reason in weaker.stopped
    assert callable(fallback)
    assert fallback(plan, reason) is not None


def test_no_dp_form_and_kept_weights_stop_the_attack(plan: AttackPlan) -> None:
    for rule in (Rule.NO_DP_FORM, Rule.WEIGHTS_MAY_NOT_LEAVE):
        reason = describe_violations([Violation(rule, "nothing was run")])
        weaker, name = adapt_to_refusal(plan, reason, first_of_run=False)
        assert name == ""
        assert weaker.stopped.startswith("action refused: ")


def test_capped_sizes_go_to_the_quoted_cap(plan: AttackPlan) -> None:
    wide = AttackPlan(run_config={**plan.run_config, "data.image-size": 1024})
    config = load_default_config(**wide.run_config)
    reason = check_run_sizes(config, default_limits(), "evaluate")[0]
    assert reason == "data.image-size is 1024, limits.max-image-size allows 512"
    smaller = sizes_within_caps(wide, reason)
    assert smaller is not None
    assert smaller.config.data.image_size == 512
    # Without a quoted cap: halved.
    halved = sizes_within_caps(wide, "data.image-size 1024 is too large")
    assert halved is not None
    assert halved.config.data.image_size == 512
    thinner = sizes_within_caps(plan, "model.channels is too wide")
    assert thinner is not None
    assert thinner.config.model.channels == (2, 4, 8)
    narrow = sizes_within_caps(
        plan, "model.channels has a level of 16 channels, limits.max-channels allows 8"
    )
    assert narrow is not None
    assert narrow.config.model.channels == (4, 8, 8)
    shallow = sizes_within_caps(
        plan, "model.channels has 3 levels, limits.max-levels allows 2"
    )
    assert shallow is not None
    assert shallow.config.model.channels == (4, 8)
    assert shallow.config.model.strides == (2,)
    assert sizes_within_caps(plan, "something else") is None


def test_restricted_mixtures_fall_back_to_one_model_per_coarser_cell(
    plan: AttackPlan,
) -> None:
    reason = check_request(
        default_limits(), models=2, predictors={"p": [("a", 1.5), ("b", -0.5)]}
    )[0]
    weaker = fewer_models_per_predictor(plan, reason)
    assert weaker is not None
    assert (weaker.digits, weaker.block) == (1, 1)
    wide = AttackPlan(run_config={**plan.run_config, "data.image-size": 64})
    coarse = fewer_models_per_predictor(wide, "negative or unnormalised weights")
    assert coarse is not None
    assert (coarse.digits, coarse.block) == (1, 4)
    three = AttackPlan(run_config=plan.run_config, digits=3)
    capped = fewer_models_per_predictor(
        three, "predictor 'c1' mixes 3 models, limits.max-models-per-predictor allows 2"
    )
    assert capped is not None
    assert capped.digits == 2
    assert fewer_models_per_predictor(weaker, "mixture") is None


def test_too_many_models_per_request_halves_them_without_a_cap(
    plan: AttackPlan,
) -> None:
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


# ----------------------------------------------------- planning within the limits


def _stated(**changes: int) -> dict[str, int]:
    """The limits a site's replies state, as the attacker reads them."""
    fields = {
        f"{protocol.APPLIED_POLICY_PREFIX}{key}": value
        for key, value in to_limit_fields(default_limits()).items()
    }
    limits = advertised_limits(fields)
    limits.update({key.replace("_", "-"): value for key, value in changes.items()})
    return limits


def test_the_plan_fits_the_stated_limits_before_any_request() -> None:
    wish = AttackPlan(run_config=_tiny_run_config(), whole_image=True)
    fitted = plan_within_limits(wish, _stated(), kind=PREDICTORS)
    assert fitted.predictors_per_request == 48
    assert fitted.models_per_request == 32
    assert fitted.units_per_run == 64
    assert fitted.budget == 5000
    assert (fitted.block, fitted.whole_image) == (1, True)
    # A small budget: cells coarse enough that each is paid for.
    small = plan_within_limits(wish, _stated(query_budget=64), kind=PREDICTORS)
    assert (small.block, small.whole_image) == (2, False)
    assert small.code().num_cells == 64
    # Consensus: one cell per request, two label sources a cell.
    sources = plan_within_limits(
        AttackPlan(run_config=_tiny_run_config(), predictors_per_request=1),
        _stated(),
        kind=LABEL_SOURCES,
    )
    assert (sources.predictors_per_request, sources.units_per_run) == (1, 32)
    assert plan_within_limits(wish, {}, kind=PREDICTORS) == wish


def test_parse_attacks_and_stages_name_the_choices() -> None:
    assert parse_attacks("profile, evaluate") == ("evaluate", "profile")
    with pytest.raises(argparse.ArgumentTypeError, match="--attacks takes some of"):
        parse_attacks("evaluate,gradients")
    assert set(ATTACKS) == {
        "evaluate",
        "consensus",
        "lftm",
        "profile",
        "profile-two-labelled",
    }
    assert parse_stage("after-budget64") == "after-budget64"
    with pytest.raises(argparse.ArgumentTypeError, match="--stage takes before"):
        parse_stage("during")


# ----------------------------------------------------------------- the decoders


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


def _ellipsoids(
    radii: list[tuple[float, float, float]], *, slices: int = 9, size: int = 16
) -> list[np.ndarray]:
    """Ellipsoids (z, row, column radii) centred in a ``slices`` x ``size``^2 stack."""
    z, rows, cols = np.mgrid[:slices, :size, :size].astype(float)
    centre = ((slices - 1) / 2, (size - 1) / 2, (size - 1) / 2)
    return [
        ((z - centre[0]) / rz) ** 2
        + ((rows - centre[1]) / ry) ** 2
        + ((cols - centre[2]) / rx) ** 2
        <= 1.0
        for rz, ry, rx in radii
    ]


def test_whole_volume_values_give_each_pixels_slice_count() -> None:
    # One case: the counts are its projection along the slices, exactly.
    (volume,) = _ellipsoids([(3.2, 4.5, 3.5)])
    code = PixelCode(size=16, block=1, digits=2)
    values, whole = release_values([volume], code)
    found = estimate_counts(values, whole, code, slices=9)
    assert found.source == "whole-image"
    assert found.mean_volume == pytest.approx(volume.sum())
    assert found.counts == pytest.approx(volume.sum(axis=0))
    # A symmetric organ centred in the stack is then placed back exactly.
    assert np.array_equal(place_centred(found.counts, 9), volume)
    # Rounded to 3 decimals, every count is still within half a slice.
    values, whole = release_values([volume], code, decimals=3)
    rounded = estimate_counts(values, whole, code, slices=9)
    assert np.abs(rounded.counts - volume.sum(axis=0)).max() < 0.5


def test_blocks_give_the_mean_count_of_their_pixels() -> None:
    (volume,) = _ellipsoids([(3.2, 4.5, 3.5)])
    code = PixelCode(size=16, block=4, digits=2)
    values, _whole = release_values([volume], code)
    # Without the whole image: every cell measured, their sum gives the volume.
    found = estimate_counts(values, math.nan, code, slices=9)
    assert found.source == "cell-sum"
    assert found.mean_volume == pytest.approx(volume.sum())
    blocks = volume.sum(axis=0).reshape(4, 4, 4, 4).mean(axis=(1, 3))
    assert found.counts[::4, ::4] == pytest.approx(blocks)


def test_calibration_on_the_attackers_own_maps_places_counts_like_them() -> None:
    truth = _ellipsoids([(3.2, 4.5, 3.5), (2.6, 5.0, 4.0), (3.6, 4.0, 4.0)])
    code = PixelCode(size=16, block=1, digits=2)
    values, whole = release_values(truth, code, decimals=3)
    counts = estimate_counts(values, whole, code, slices=9).counts
    # With the site's own maps as the "prior", calibration is near the ceiling.
    placed = place_calibrated(counts, counts, truth)
    ceiling = score_maps([np.mean(truth, axis=0) > 0.5] * 3, truth)
    got = score_maps([placed] * 3, truth)
    assert got.recovered_share >= ceiling.recovered_share - 0.01
    assert got.recovered_share <= ceiling.recovered_share


def test_decode_volumes_fills_unmeasured_cells_from_the_prior() -> None:
    truth = _ellipsoids([(3.2, 4.5, 3.5), (2.6, 5.0, 4.0)])
    prior = _ellipsoids([(3.0, 4.0, 4.0), (3.0, 5.0, 3.0)])
    code = PixelCode(size=16, block=1, digits=2)
    values, whole = release_values(truth, code, decimals=3)
    half = {cell: value for cell, value in values.items() if cell < 128}
    guesses = decode_volumes(half, whole, code, prior_volumes=prior, decimals=3)
    assert set(guesses.maps) == {"centred", "prior-ranked", "prior-calibrated"}
    assert guesses.measured_cells == 128
    prior_map = np.mean(prior, axis=0) > 0.5
    for guess in guesses.maps.values():
        assert guess.shape == (9, 16, 16)
        assert np.array_equal(guess[:, 8:], prior_map[:, 8:])
    with pytest.raises(ValueError, match="another site's maps"):
        decode_volumes(values, whole, code, prior_volumes=[], decimals=3)
