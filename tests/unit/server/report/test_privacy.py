"""The report's privacy section: per site, what reached the coordinator, the policy
applied and the epsilon spent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.privacy.egress import measure_error
from core.privacy.ledger import EGRESS, INGRESS, RELEASED, ArrayRelease, Egress, Ledger
from core.privacy.policy import default_policy, resolve_policy
from server.report import build_privacy_section, build_report, format_markdown
from server.results import (
    AffinityResult,
    DiscoverResult,
    EvaluationResult,
    FederatedSemisup,
    LabelUse,
    PairSelection,
    PairWeights,
    RunResults,
    SemisupResult,
    SemisupRound,
    SourceTrainingResult,
    TargetSemisup,
    TransferabilityResult,
)

APPLIED = resolve_policy(
    default_policy(),
    run_dp_required=True,
    run_noise_multiplier=1.5,
    run_target_epsilon=None,
    run_max_reply_mb=None,
).to_fields()

# What B's source-training reply said about DP (per slice and per patient).
B_TRAINING = {
    "dp.epsilon-spent": 0.8,
    "dp.epsilon-total": 2.4,
    "dp.delta": 1e-5,
    "dp.noise-multiplier": 1.5,
    "dp.patient-epsilon-spent": 40.0,
    "dp.patient-epsilon-total": 120.0,
    "dp.slices-per-case": 10,
}


def epsilon_of(section: dict[str, object], site: str) -> dict[str, object]:
    """A site's per-slice epsilon figures (the per-patient ones are tested apart)."""
    figures = section[site]["epsilon"]  # type: ignore[index]
    return {
        key: figures[key]  # type: ignore[index]
        for key in ("spent", "total", "delta", "noise_multiplier")
    }


def weights_egress(nbytes: int) -> Egress:
    array = ArrayRelease(
        record="weights", name="w", shape=(nbytes // 4,), dtype="float32", nbytes=nbytes
    )
    return Egress(
        arrays=(array,),
        metrics={"metrics/loss": 1},
        configs={},
        total_bytes=nbytes + 10,
        digest="0" * 64,
    )


def write_coordinator_ledger(path: Path) -> Ledger:
    ledger = Ledger(path)
    common = {"run_id": "1", "policy": {}, "epsilon_spent": 0.0, "epsilon_total": 0.0}
    ledger.append(
        message_type="train.source",
        sender="coordinator",
        direction=EGRESS,
        egress=weights_egress(400),
        decision=RELEASED,
        **common,  # type: ignore[arg-type]
    )
    for sender, egress in (
        ("B", weights_egress(400)),
        ("B", weights_egress(400)),
        ("C", measure_error("error 101: blocked by egress policy")),
    ):
        ledger.append(
            message_type="train.source",
            sender=sender,
            direction=INGRESS,
            egress=egress,
            decision=RELEASED,
            **common,  # type: ignore[arg-type]
        )
    return ledger


def trained(replies: dict[str, dict[str, Any]]) -> SourceTrainingResult:
    """A source-training result holding these sources' reply figures."""
    return SourceTrainingResult(training=replies, missing={})


def test_privacy_section_counts_what_each_site_released(tmp_path: Path) -> None:
    # Prepare
    ledger = write_coordinator_ledger(tmp_path / "ledger.jsonl")
    results = RunResults(source_training=trained({"B": B_TRAINING}))

    # Execute
    section = build_privacy_section(ledger.entries(), {"B": APPLIED}, results)

    # Assert: the coordinator's own requests are not a site's release
    assert list(section) == ["B", "C"]
    assert section["B"]["released"] == {
        "train.source": {
            "replies": 2,
            "errors": 0,
            "undelivered": 0,
            "bytes": 820,
            "arrays": 2,
            "metric_values": 2,
        }
    }
    assert section["C"]["released"]["train.source"]["errors"] == 1
    assert section["C"]["released"]["train.source"]["arrays"] == 0
    assert section["B"]["policy"]["policy.dp.required"] is True
    assert section["B"]["epsilon"] == {
        "spent": 0.8,
        "total": 2.4,
        "delta": 1e-5,
        "noise_multiplier": 1.5,
        "patient_spent": 40.0,
        "patient_total": 120.0,
        "slices_per_case": 10,
    }
    assert "policy" not in section["C"]


def test_privacy_section_adds_the_semisup_rounds_epsilon(tmp_path: Path) -> None:
    # Prepare: B trained its source model, then took part in two DP rounds
    ledger = write_coordinator_ledger(tmp_path / "ledger.jsonl")
    round_reply = {
        "dp.epsilon-spent": 0.5,
        "dp.delta": 1e-5,
        "dp.noise-multiplier": 1.5,
    }
    rounds = [
        {},
        {"B": {**round_reply, "dp.epsilon-total": 2.9}},
        {"B": {**round_reply, "dp.epsilon-total": 3.3}},
    ]
    semisup = SemisupResult(
        variant="ugmcl",
        labelled_fraction=0.2,
        start="initial",
        target=TargetSemisup(site="A", missing="error 101: refused"),
        federated=FederatedSemisup(
            sites=("B",),
            rounds=tuple(
                SemisupRound(round=number, dice={}, missing={}, train=train)
                for number, train in enumerate(rounds)
            ),
            stopped=None,
        ),
        models=(),
        label_use={},
    )
    results = RunResults(source_training=trained({"B": B_TRAINING}), semisup=semisup)

    # Execute
    section = build_privacy_section(ledger.entries(), {}, results)

    # Assert: spent sums the run's trainings; total is the site's latest figure
    assert epsilon_of(section, "B") == {
        "spent": pytest.approx(0.8 + 0.5 + 0.5),
        "total": 3.3,
        "delta": 1e-5,
        "noise_multiplier": 1.5,
    }
    assert "epsilon" not in section.get("A", {})


def test_privacy_section_adds_the_profile_and_fine_tuning_epsilon(
    tmp_path: Path,
) -> None:
    # Prepare: B trained its source model, released a noised profile, then
    # fine-tuned the path's model under DP
    ledger = write_coordinator_ledger(tmp_path / "ledger.jsonl")
    dp = {"dp.delta": 1e-5, "dp.noise-multiplier": 1.5}
    affinity = AffinityResult(
        target="A",
        missing={},
        profiles={
            "B": {**dp, "dp.epsilon-spent": 5.0, "dp.epsilon-total": 6.0},
            "A": {
                "dp.epsilon-spent": 0.0,
                "dp.epsilon-total": 0.0,
                "dp.delta": 0.0,
                "dp.noise-multiplier": 0.0,
            },
        },
        steps=({"site": "B", **dp, "dp.epsilon-spent": 0.7, "dp.epsilon-total": 7.1},),
        label_use=LabelUse(),
    )
    results = RunResults(source_training=trained({"B": B_TRAINING}), affinity=affinity)

    # Execute
    section = build_privacy_section(ledger.entries(), {}, results)

    # Assert: in run order, the fine-tuning step's total is B's latest
    assert epsilon_of(section, "B") == {
        "spent": pytest.approx(0.8 + 5.0 + 0.7),
        "total": 7.1,
        "delta": 1e-5,
        "noise_multiplier": 1.5,
    }
    assert section["A"]["epsilon"]["noise_multiplier"] == 0.0  # an exact profile


def test_report_markdown_shows_the_privacy_tables(tmp_path: Path) -> None:
    # Prepare
    ledger = write_coordinator_ledger(tmp_path / "ledger.jsonl")
    results = RunResults(
        discover=DiscoverResult(target="A", sites=(), missing={}),
        source_training=trained({"B": B_TRAINING, "C": {"dp.noise-multiplier": 0.0}}),
        transferability=TransferabilityResult(
            metric="lftm",
            release="domain",
            sources=("B",),
            itm=None,
            dtm={"B": 0.5},
            candidates={"B": LabelUse()},
            label_free=PairSelection(
                candidates=("B",),
                main="B",
                aux=None,
                weights=PairWeights(main=1.0, aux=0.0),
                label_use=LabelUse(),
            ),
            few_label=None,
        ),
        evaluation=EvaluationResult(
            site="A", num_cases=0, dice={}, hd95_mm={}, label_use={}
        ),
    )
    privacy = build_privacy_section(ledger.entries(), {"B": APPLIED}, results)
    report = build_report(
        run_id=1, config={}, results=results, phase_seconds={}, privacy=privacy
    )

    # Execute
    markdown = format_markdown(report)

    # Assert
    assert "## Privacy" in markdown
    assert "| B | train.source | 2 | 0 | 0 | 820 | 2 | 2 |" in markdown
    assert "| C | train.source | 1 | 1 |" in markdown
    assert (
        "| B | domain | True | True | 10.0 | 0.800 (δ 1e-05) | 2.400 | "
        "40.000, 120.000 (10 slices per case) |"
    ) in markdown
    assert "| C | n/a | n/a | n/a | n/a | no DP | - | - |" in markdown
    assert "per patient" in markdown
    assert report["transferability"]["release"] == "domain"
