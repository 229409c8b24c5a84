"""The phases' typed results: their JSON form, read back, and refused when wrong."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core import protocol
from server.results import (
    AdaptationResult,
    AdaptedPair,
    AffinityResult,
    ConsensusResult,
    DiscoveredSite,
    DiscoverResult,
    EvaluationResult,
    FederatedSemisup,
    LabelUse,
    PairSelection,
    PairWeights,
    PhaseResult,
    ResultError,
    RunResults,
    SemisupResult,
    SemisupRound,
    SourceTrainingResult,
    TargetSemisup,
    TransferabilityResult,
    TransferPathRecord,
)
from server.store import RunStore

FINE_TUNED = LabelUse(
    via=("SeqTran candidate fine-tuned at A on 2 labelled cases",), cases=2
)

HELLO = protocol.HelloReply(
    site="A",
    modality="MR",
    labelled=2,
    unlabelled=3,
    evaluation=4,
    class_names=("organ",),
).to_fields()
RESULTS: list[PhaseResult] = [
    DiscoverResult(
        sites=(DiscoveredSite(name="A", node_id=11, hello=HELLO),),
        target="A",
        missing={"13": "no reply within 3600 s"},
    ),
    SourceTrainingResult(
        training={"B": {"num-examples": 8, "loss": 0.5}}, missing={"D": "refused"}
    ),
    AffinityResult(
        target="A",
        profiles={"B": {"dp.epsilon-spent": 0.0}},
        missing={},
        path=TransferPathRecord(nodes=("B", "C", "A"), cost=0.7, path_length=0.4),
        steps=({"site": "C", "loss": 0.2}, {"site": "A", "num-cases": 2}),
        model="seqtran",
        label_use=FINE_TUNED,
        matrices={"sites": ["B", "C", "A"], "label_term": True},
    ),
    TransferabilityResult(
        metric="lftm",
        release="instance",
        sources=("B", "C", "seqtran"),
        itm=((0.5, 0.25, 0.5), (0.75, 0.5, 0.5)),
        dtm={"B": 0.625, "C": 0.375, "seqtran": 0.5},
        candidates={"B": LabelUse(), "C": LabelUse(), "seqtran": FINE_TUNED},
        label_free=PairSelection(
            candidates=("B", "C"),
            main="B",
            aux="C",
            weights=PairWeights(main=0.625, aux=0.375),
            label_use=LabelUse(),
        ),
        few_label=PairSelection(
            candidates=("B", "C", "seqtran"),
            main="B",
            aux="seqtran",
            weights=PairWeights(main=0.55, aux=0.45),
            label_use=FINE_TUNED,
            voters=("B", "seqtran"),
        ),
        selection="agreement",
        agreement=((1.0, 0.2, 0.8), (0.2, 1.0, 0.1), (0.8, 0.1, 1.0)),
    ),
    AdaptationResult(
        site="A",
        label_free=AdaptedPair(
            prefix="adapted",
            models=("aux", "main"),
            label_use=LabelUse(),
            reply={"num-examples": 12},
        ),
        few_label=AdaptedPair(
            prefix="adapted-few-label",
            models=("aux", "main"),
            label_use=FINE_TUNED,
            reply={"num-examples": 12},
        ),
    ),
    ConsensusResult(
        models=("deepstaple", "staple"),
        label_use=LabelUse(),
        sources=("B", "C"),
        outcome={"num_images": 6, "label_dice": {"staple": 0.8}},
    ),
    SemisupResult(
        variant="ugmcl",
        labelled_fraction=0.2,
        start="initial",
        target=TargetSemisup(site="A", reply={"num-labelled": 2}),
        federated=FederatedSemisup(
            sites=("A", "B"),
            rounds=(SemisupRound(round=0, dice={"A": 0.5}, missing={}, train={}),),
            stopped=None,
        ),
        models=("federated", "target"),
        label_use={
            "federated": LabelUse(),
            "target": LabelUse(
                via=("UG-MCL refined at A on 2 labelled cases",), cases=2
            ),
        },
    ),
    EvaluationResult(
        site="A",
        num_cases=6,
        dice={"tgma": 0.9, "tgma-few-label": 0.92},
        hd95_mm={"tgma": 3.5, "tgma-few-label": 3.0},
        label_use={"tgma": LabelUse(), "tgma-few-label": FINE_TUNED},
        privacy={"dp.epsilon-spent": 0.0},
    ),
]


@pytest.mark.parametrize("result", RESULTS, ids=lambda result: result.PHASE)
def test_a_result_reads_back_from_its_json_form(result: PhaseResult) -> None:
    # Prepare
    document = json.loads(json.dumps(result.to_document()))

    # Execute
    read = type(result).from_document(document)

    # Assert
    assert read == result


@pytest.mark.parametrize("result", RESULTS, ids=lambda result: result.PHASE)
def test_the_store_saves_and_reloads_each_phase_by_its_name(
    result: PhaseResult, tmp_path: Path
) -> None:
    # Prepare
    store = RunStore(tmp_path / "run")

    # Execute
    path = store.save_result(result)

    # Assert
    assert path == tmp_path / "run" / "phases" / f"{result.PHASE}.json"
    assert store.load_result(type(result)) == result


def test_flattened_figures_sit_beside_the_fields_and_come_back_apart() -> None:
    # Prepare
    site = DiscoveredSite(name="A", node_id=11, hello=HELLO)

    # Execute
    document = site.to_document()

    # Assert: the hello reply's wire fields are spread over the site's object
    assert document == {"name": "A", "node_id": 11, **HELLO}
    assert DiscoveredSite.from_document(document).hello == HELLO
    assert site.reply.labelled == 2


def test_fields_at_their_default_can_be_left_out() -> None:
    # Prepare
    skipped = ConsensusResult(
        models=(), label_use=LabelUse(), skipped="error 101: refused"
    )

    # Execute
    document = skipped.to_document()

    # Assert: a skipped consensus is written without sources or figures
    assert document == {
        "models": [],
        "label_use": {"via": [], "cases": 0, "atlases": 0},
        "skipped": "error 101: refused",
    }
    assert ConsensusResult.from_document(document) == skipped


def test_a_nulled_figure_reads_back_as_nan(tmp_path: Path) -> None:
    # Prepare: an undefined HD95 is stored as null (strict JSON)
    store = RunStore(tmp_path / "run")
    store.save_result(
        EvaluationResult(
            site="A",
            num_cases=1,
            dice={"x": 0.5},
            hd95_mm={"x": math.nan},
            label_use={"x": LabelUse()},
        )
    )

    # Execute
    read = store.load_result(EvaluationResult)

    # Assert
    assert store.load_phase("evaluation") == {
        "site": "A",
        "num_cases": 1,
        "dice": {"x": 0.5},
        "hd95_mm": {"x": None},
        "label_use": {"x": {"via": [], "cases": 0, "atlases": 0}},
    }
    assert read is not None
    assert math.isnan(read.hd95_mm["x"])


def test_an_unfinished_phase_loads_as_none(tmp_path: Path) -> None:
    # Execute
    results = RunStore(tmp_path / "run").load_results()

    # Assert
    assert results == RunResults()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"metric": "lftm"}, "missing key 'release'"),
        (
            {
                **RESULTS[3].to_document(),
                "label_free": {**RESULTS[3].to_document()["label_free"], "main": 3},
            },
            "transferability.json: label_free: main: expected str, got 3",
        ),
        (
            {**RESULTS[3].to_document(), "sources": "B"},
            "sources: expected a list, got 'B'",
        ),
        (
            {
                **RESULTS[3].to_document(),
                "few_label": {
                    **RESULTS[3].to_document()["few_label"],
                    "weights": {"main": "x", "aux": 0.0},
                },
            },
            "few_label: weights: main: expected float, got 'x'",
        ),
        (
            {
                **RESULTS[3].to_document(),
                "candidates": {"B": {"via": "fine-tuned", "cases": 2}},
            },
            "candidates.B: via: expected a list, got 'fine-tuned'",
        ),
    ],
)
def test_a_result_file_that_does_not_fit_is_refused_naming_file_and_key(
    document: dict[str, object], message: str, tmp_path: Path
) -> None:
    # Prepare
    store = RunStore(tmp_path / "run")
    store.write_json("phases/transferability.json", document)

    # Execute / Assert
    with pytest.raises(ResultError, match=r"transferability\.json") as raised:
        store.load_result(TransferabilityResult)
    assert message in str(raised.value)


# A result file written before label provenance, as each phase wrote it then.
OLD_FILES = [
    (AffinityResult, "label_use"),
    (TransferabilityResult, "candidates"),
    (AdaptationResult, "label_free"),
    (ConsensusResult, "label_use"),
    (SemisupResult, "label_use"),
    (EvaluationResult, "label_use"),
]


@pytest.mark.parametrize(
    ("kind", "key"), OLD_FILES, ids=[kind.PHASE for kind, _ in OLD_FILES]
)
def test_a_result_from_before_label_provenance_is_refused_not_read_as_label_free(
    kind: type[PhaseResult], key: str, tmp_path: Path
) -> None:
    # Prepare: this phase's sample without its provenance fields
    (sample,) = [result for result in RESULTS if isinstance(result, kind)]
    document = {
        name: value
        for name, value in sample.to_document().items()
        if name not in ("label_use", "candidates", "label_free", "few_label")
    }
    store = RunStore(tmp_path / "run")
    store.write_json(f"phases/{kind.PHASE}.json", document)

    # Execute / Assert
    with pytest.raises(ResultError) as raised:
        store.load_result(kind)
    assert str(raised.value) == (
        f"{tmp_path / 'run' / 'phases' / kind.PHASE}.json: missing key {key!r}: the "
        "file was written by a SiteBridge from before label provenance, so it cannot "
        "say which models used the target's labels; start a new run"
    )
