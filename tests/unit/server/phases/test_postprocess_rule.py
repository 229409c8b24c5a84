"""Which evaluated models and predictors the target post-processes, and why."""

from __future__ import annotations

from server.coordinator import ADAPTED_START
from server.phases.evaluation import (
    build_predictors,
    model_postprocess,
    postprocessed_predictors,
)
from server.results import LabelUse, PairSelection, PairWeights, TransferabilityResult

FEW = LabelUse(via=("fine-tuned at A on 2 labelled cases",), cases=2)


def selection() -> TransferabilityResult:
    """Label-free pair C (main) + B; few-label pair seqtran (main) + C."""
    return TransferabilityResult(
        metric="lftm",
        release="instance",
        sources=("B", "C", "D", "seqtran"),
        itm=None,
        dtm={"B": 0.8, "C": 0.9, "D": 0.3, "seqtran": 0.95},
        candidates={"B": LabelUse(), "C": LabelUse(), "D": LabelUse(), "seqtran": FEW},
        label_free=PairSelection(
            candidates=("B", "C", "D"),
            main="C",
            aux="B",
            weights=PairWeights(main=0.6, aux=0.4),
            label_use=LabelUse(),
        ),
        few_label=PairSelection(
            candidates=("B", "C", "D", "seqtran"),
            main="seqtran",
            aux="C",
            weights=PairWeights(main=0.55, aux=0.45),
            label_use=FEW,
        ),
        selection="dtm",
    )


LATER = [
    "adapted:main",
    "adapted:aux",
    "adapted-few-label:main",
    "adapted-few-label:aux",
    "consensus:staple",
    "semisup:target",
]


def test_each_model_inherits_the_decision_of_the_source_it_was_made_from() -> None:
    # Execute: B and D decided on, C off; the SeqTran path started at D
    flags = model_postprocess(
        {"B": True, "C": False, "D": True},
        selection(),
        models=["source:B", "source:C", "source:D", "source:seqtran", *LATER],
        seqtran_from="D",
    )

    # Assert
    assert flags == {
        "source:B": True,
        "source:C": False,
        "source:D": True,
        "source:seqtran": True,  # D's model, fine-tuned along the path
        "adapted:main": False,  # C adapted
        "adapted:aux": True,  # B adapted
        "adapted-few-label:main": True,  # seqtran adapted
        "adapted-few-label:aux": False,
        "consensus:staple": False,  # trained from adapted:main (C)
        "semisup:target": False,
    }


def test_later_models_follow_the_adapted_main_and_a_fresh_student_is_off() -> None:
    # Execute: now C, the label-free main, decided on
    from_main = model_postprocess(
        {"B": False, "C": True}, selection(), models=LATER, semisup_start=ADAPTED_START
    )
    fresh = model_postprocess(
        {"B": False, "C": True}, selection(), models=LATER, semisup_start="initial"
    )

    # Assert
    assert from_main["consensus:staple"]
    assert from_main["semisup:target"]
    assert not fresh["semisup:target"]
    assert fresh["consensus:staple"]


def test_a_predictor_is_post_processed_when_its_on_models_carry_most_weight() -> None:
    # Prepare: the predictors a run compares, B and D on
    predictors = build_predictors(
        selection(),
        adapted=LATER[:4],
        later_models=["consensus:staple"],
        ensemble_min_voters=0,
    )
    flags = model_postprocess(
        {"B": True, "C": False, "D": True},
        selection(),
        models=["source:B", "source:C", "source:D", "source:seqtran", *LATER],
        seqtran_from="D",
    )

    # Execute
    chosen = postprocessed_predictors(predictors, flags)

    # Assert: uniform of B, C, D is 2/3 on; tgma (C 0.6 off, B 0.4 on) is off;
    # tgma-few-label (seqtran 0.55 on) is on
    assert set(chosen) == {
        "source:B",
        "source:D",
        "source:seqtran",
        "uniform",
        "tgma-few-label",
        "tgma-few-label-main",
    }


def test_an_even_split_and_an_unknown_model_are_off() -> None:
    # Execute
    chosen = postprocessed_predictors(
        {"even": [("B", 0.5), ("C", 0.5)], "stranger": [("Z", 1.0)]},
        {"B": True, "C": False},
    )

    # Assert
    assert chosen == ()
