"""The wire format pinned: every record type's fields, key order and value types.

Written before the records' (de)serialisation became generic, so that the generic
codec provably sends what the hand-written methods sent, byte for byte.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from core import protocol
from core.protocol import (
    REPLY_SCHEMAS,
    AdaptReply,
    AdaptRequest,
    ConsensusReply,
    ConsensusRequest,
    EvaluateReply,
    EvaluateRequest,
    HelloReply,
    LedgerAnchor,
    LftmReply,
    ProfileReply,
    ReplySchema,
    SemisupReply,
    SemisupRequest,
    TrainReply,
)

DP = dict(
    epsilon_spent=0.5,
    epsilon_total=1.5,
    delta=1e-5,
    noise_multiplier=1.1,
    patient_epsilon_spent=2.5,
    patient_epsilon_total=3.5,
    slices_per_case=4,
)
INSTANCES = {
    "hello": HelloReply(
        site="A",
        modality="mr",
        labelled=3,
        unlabelled=2,
        evaluation=1,
        class_names=("bg", "liver"),
    ),
    "train": TrainReply(num_examples=12, num_cases=3, loss=0.25, seconds=1.5, **DP),
    # A source's reply carries its post-processing decision (a fine-tuning step's
    # does not, as "train" above).
    "train-source": TrainReply(
        num_examples=12,
        num_cases=3,
        loss=0.25,
        seconds=1.5,
        largest_component=1,
        dice_raw=0.75,
        dice_postprocessed=0.8125,
    ),
    "lftm-instance": LftmReply.from_itm(
        "lftm", ("B", "C"), {"B": [0.2, 0.4], "C": [0.1, 0.3]}, release="instance"
    ),
    "lftm-domain": LftmReply.from_itm(
        "lftm", ("B", "C"), {"B": [0.2, 0.4], "C": [0.1, 0.3]}, release="domain"
    ),
    "adapt-request": AdaptRequest(main="B", aux="", weight_main=0.75, weight_aux=0.25),
    "adapt": AdaptReply(
        num_examples=20, pseudo_label_foreground=0.125, seconds=2.0, **DP
    ),
    "consensus-request": ConsensusRequest(label_sources=("B", "C"), start="B"),
    "consensus": ConsensusReply(
        num_images=4,
        num_labels=40,
        num_atlases=2,
        seconds=3.0,
        data_parameter={"B": 0.1, "atlas-0": 0.2},
        staple_sensitivity={"B": 0.9},
        agreement={"B": 0.8, "C": 0.7},
        label_dice={"itm": 0.6, "staple": 0.65},
        spearman_dp=0.5,
        spearman_staple=math.nan,
    ),
    "semisup-request": SemisupRequest(
        scope="federated", round=2, rounds=3, iterations=5
    ),
    "semisup": SemisupReply(
        num_examples=30,
        num_labelled=2,
        num_unlabelled=8,
        supervised_loss=0.1,
        consistency_loss=0.2,
        cross_task_loss=0.3,
        certain_fraction=0.4,
        seconds=5.0,
        **DP,
    ),
    "profile-labels": ProfileReply(
        image_quantiles=(0.0, 0.5, 1.0),
        quantile_clip=3.0,
        label_grid=2,
        mean_label_map=tuple(i / 8 for i in range(8)),
        foreground_quantiles=(0.1, 0.2),
        num_images=5,
        num_labelled=3,
        **DP,
    ),
    "profile-polarity": ProfileReply(
        image_quantiles=(0.0, 1.0),
        quantile_clip=3.0,
        label_grid=1,
        mean_label_map=(0.5,),
        foreground_quantiles=(0.25,),
        num_images=4,
        num_labelled=2,
        foreground_intensities=(0.5, 1.5),
        shell_intensities=(-1.0, -0.5),
    ),
    "profile-nolabels": ProfileReply(
        image_quantiles=(0.0, 1.0),
        quantile_clip=3.0,
        label_grid=0,
        mean_label_map=None,
        foreground_quantiles=None,
        num_images=5,
        num_labelled=0,
    ),
    "evaluate-request": EvaluateRequest(
        predictors={"tgma": [("main", 0.7), ("aux", 0.3)], "b": [("B", 1.0)]},
        segment="tgma",
        postprocess=("tgma",),
    ),
    "evaluate": EvaluateReply(
        num_cases=6,
        segmentations=18,
        dice={"tgma": 0.8, "b": 0.7},
        hd95_mm={"tgma": 3.5, "b": math.nan},
        dice_raw={"tgma": 0.75},
        hd95_raw_mm={"tgma": 7.25},
        **DP,
    ),
    "anchor": LedgerAnchor(3, "ab" * 32),
}

# What the hand-written ``to_fields`` methods sent for each instance, in order.
PINNED = {
    "hello": (
        [
            ("site", "A"),
            ("modality", "mr"),
            ("labelled", 3),
            ("unlabelled", 2),
            ("evaluation", 1),
            ("class-names", ["bg", "liver"]),
        ],
    ),
    "train": (
        [
            ("num-examples", 12),
            ("num-cases", 3),
            ("loss", 0.25),
            ("seconds", 1.5),
            ("dp.epsilon-spent", 0.5),
            ("dp.epsilon-total", 1.5),
            ("dp.delta", 1e-05),
            ("dp.noise-multiplier", 1.1),
            ("dp.patient-epsilon-spent", 2.5),
            ("dp.patient-epsilon-total", 3.5),
            ("dp.slices-per-case", 4),
        ],
    ),
    "train-source": (
        [
            ("num-examples", 12),
            ("num-cases", 3),
            ("loss", 0.25),
            ("seconds", 1.5),
            ("dp.epsilon-spent", 0.0),
            ("dp.epsilon-total", 0.0),
            ("dp.delta", 0.0),
            ("dp.noise-multiplier", 0.0),
            ("dp.patient-epsilon-spent", 0.0),
            ("dp.patient-epsilon-total", 0.0),
            ("dp.slices-per-case", 0),
            ("postprocess.largest-component", 1),
            ("postprocess.dice-raw", 0.75),
            ("postprocess.dice", 0.8125),
        ],
    ),
    "lftm-instance": (
        [("metric", "lftm"), ("sources", ["B", "C"]), ("release", "instance")],
        [("itm.B", [0.2, 0.4]), ("itm.C", [0.1, 0.3])],
    ),
    "lftm-domain": (
        [("metric", "lftm"), ("sources", ["B", "C"]), ("release", "domain")],
        [("dtm.B", 0.30000000000000004), ("dtm.C", 0.2)],
    ),
    "adapt-request": (
        [("main", "B"), ("aux", ""), ("weight-main", 0.75), ("weight-aux", 0.25)],
    ),
    "adapt": (
        [
            ("num-examples", 20),
            ("pseudo-label-foreground", 0.125),
            ("seconds", 2.0),
            ("dp.epsilon-spent", 0.5),
            ("dp.epsilon-total", 1.5),
            ("dp.delta", 1e-05),
            ("dp.noise-multiplier", 1.1),
            ("dp.patient-epsilon-spent", 2.5),
            ("dp.patient-epsilon-total", 3.5),
            ("dp.slices-per-case", 4),
        ],
    ),
    "consensus-request": ([("label-sources", ["B", "C"]), ("start", "B")],),
    "consensus": (
        [
            ("num-images", 4),
            ("num-labels", 40),
            ("num-atlases", 2),
            ("seconds", 3.0),
            ("spearman-dp", 0.5),
            ("spearman-staple", math.nan),
            ("data-parameter.B", 0.1),
            ("data-parameter.atlas-0", 0.2),
            ("staple-sensitivity.B", 0.9),
            ("agreement.B", 0.8),
            ("agreement.C", 0.7),
            ("label-dice.itm", 0.6),
            ("label-dice.staple", 0.65),
        ],
    ),
    "semisup-request": (
        [("scope", "federated"), ("round", 2), ("rounds", 3), ("iterations", 5)],
    ),
    "semisup": (
        [
            ("num-examples", 30),
            ("num-labelled", 2),
            ("num-unlabelled", 8),
            ("supervised-loss", 0.1),
            ("consistency-loss", 0.2),
            ("cross-task-loss", 0.3),
            ("certain-fraction", 0.4),
            ("seconds", 5.0),
            ("dp.epsilon-spent", 0.5),
            ("dp.epsilon-total", 1.5),
            ("dp.delta", 1e-05),
            ("dp.noise-multiplier", 1.1),
            ("dp.patient-epsilon-spent", 2.5),
            ("dp.patient-epsilon-total", 3.5),
            ("dp.slices-per-case", 4),
        ],
    ),
    "profile-labels": (
        [
            ("image-quantiles", [0.0, 0.5, 1.0]),
            ("quantile-clip", 3.0),
            ("label-grid", 2),
            ("num-images", 5),
            ("num-labelled", 3),
            ("dp.epsilon-spent", 0.5),
            ("dp.epsilon-total", 1.5),
            ("dp.delta", 1e-05),
            ("dp.noise-multiplier", 1.1),
            ("dp.patient-epsilon-spent", 2.5),
            ("dp.patient-epsilon-total", 3.5),
            ("dp.slices-per-case", 4),
            ("mean-label-map", [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]),
            ("foreground-quantiles", [0.1, 0.2]),
        ],
    ),
    "profile-polarity": (
        [
            ("image-quantiles", [0.0, 1.0]),
            ("quantile-clip", 3.0),
            ("label-grid", 1),
            ("num-images", 4),
            ("num-labelled", 2),
            ("dp.epsilon-spent", 0.0),
            ("dp.epsilon-total", 0.0),
            ("dp.delta", 0.0),
            ("dp.noise-multiplier", 0.0),
            ("dp.patient-epsilon-spent", 0.0),
            ("dp.patient-epsilon-total", 0.0),
            ("dp.slices-per-case", 0),
            ("mean-label-map", [0.5]),
            ("foreground-quantiles", [0.25]),
            ("foreground-intensities", [0.5, 1.5]),
            ("shell-intensities", [-1.0, -0.5]),
        ],
    ),
    "profile-nolabels": (
        [
            ("image-quantiles", [0.0, 1.0]),
            ("quantile-clip", 3.0),
            ("label-grid", 0),
            ("num-images", 5),
            ("num-labelled", 0),
            ("dp.epsilon-spent", 0.0),
            ("dp.epsilon-total", 0.0),
            ("dp.delta", 0.0),
            ("dp.noise-multiplier", 0.0),
            ("dp.patient-epsilon-spent", 0.0),
            ("dp.patient-epsilon-total", 0.0),
            ("dp.slices-per-case", 0),
        ],
    ),
    "evaluate-request": (
        [
            (
                "predictors",
                '{"b": [["B", 1.0]], "tgma": [["main", 0.7], ["aux", 0.3]]}',
            ),
            ("segment", "tgma"),
            ("postprocess", ["tgma"]),
        ],
    ),
    "evaluate": (
        [
            ("num-cases", 6),
            ("segmentations", 18),
            ("dp.epsilon-spent", 0.5),
            ("dp.epsilon-total", 1.5),
            ("dp.delta", 1e-05),
            ("dp.noise-multiplier", 1.1),
            ("dp.patient-epsilon-spent", 2.5),
            ("dp.patient-epsilon-total", 3.5),
            ("dp.slices-per-case", 4),
            ("dice.tgma", 0.8),
            ("dice.b", 0.7),
            ("hd95.tgma", 3.5),
            ("hd95.b", math.nan),
            ("dice-raw.tgma", 0.75),
            ("hd95-raw.tgma", 7.25),
        ],
    ),
    "anchor": (
        [
            ("ledger.entry-index", 3),
            (
                "ledger.entry-hash",
                "abababababababababababababababababababababababababababababababab",
            ),
        ],
    ),
}

PINNED_SCHEMAS = {
    "query.hello": ReplySchema(
        settings=(
            "site",
            "modality",
            "labelled",
            "unlabelled",
            "evaluation",
            "class-names",
        ),
        metrics=(),
        weights=False,
        models=(),
    ),
    "train.source": ReplySchema(
        settings=(),
        metrics=(
            "num-examples",
            "num-cases",
            "loss",
            "seconds",
            "postprocess.largest-component",
            "postprocess.dice-raw",
            "postprocess.dice",
            "dp.epsilon-spent",
            "dp.epsilon-total",
            "dp.delta",
            "dp.noise-multiplier",
            "dp.patient-epsilon-spent",
            "dp.patient-epsilon-total",
            "dp.slices-per-case",
        ),
        weights=True,
        models=(),
    ),
    "query.lftm": ReplySchema(
        settings=("metric", "sources", "release"),
        metrics=("itm.*", "dtm.*", "agree.*"),
        weights=False,
        models=(),
    ),
    "train.adapt": ReplySchema(
        settings=(),
        metrics=(
            "num-examples",
            "pseudo-label-foreground",
            "seconds",
            "dp.epsilon-spent",
            "dp.epsilon-total",
            "dp.delta",
            "dp.noise-multiplier",
            "dp.patient-epsilon-spent",
            "dp.patient-epsilon-total",
            "dp.slices-per-case",
        ),
        weights=False,
        models=("main", "aux"),
    ),
    "train.consensus": ReplySchema(
        settings=(),
        metrics=(
            "num-images",
            "num-labels",
            "num-atlases",
            "seconds",
            "spearman-dp",
            "spearman-staple",
            "data-parameter.*",
            "staple-sensitivity.*",
            "agreement.*",
            "label-dice.*",
        ),
        weights=False,
        models=("itm", "majority", "staple", "deepstaple"),
    ),
    "train.semisup": ReplySchema(
        settings=(),
        metrics=(
            "num-examples",
            "num-labelled",
            "num-unlabelled",
            "supervised-loss",
            "consistency-loss",
            "cross-task-loss",
            "certain-fraction",
            "seconds",
            "dp.epsilon-spent",
            "dp.epsilon-total",
            "dp.delta",
            "dp.noise-multiplier",
            "dp.patient-epsilon-spent",
            "dp.patient-epsilon-total",
            "dp.slices-per-case",
        ),
        weights=True,
        models=(),
    ),
    "query.fingerprint": ReplySchema(
        settings=(),
        metrics=(
            "num-images",
            "num-labelled",
            "spacing-mm",
            "shape",
            "ct-intensities",
            "dp.epsilon-spent",
            "dp.epsilon-total",
            "dp.delta",
            "dp.noise-multiplier",
            "dp.patient-epsilon-spent",
            "dp.patient-epsilon-total",
            "dp.slices-per-case",
        ),
        weights=False,
        models=(),
    ),
    "query.profile": ReplySchema(
        settings=(),
        metrics=(
            "image-quantiles",
            "quantile-clip",
            "label-grid",
            "mean-label-map",
            "foreground-quantiles",
            "num-images",
            "num-labelled",
            "foreground-intensities",
            "shell-intensities",
            "dp.epsilon-spent",
            "dp.epsilon-total",
            "dp.delta",
            "dp.noise-multiplier",
            "dp.patient-epsilon-spent",
            "dp.patient-epsilon-total",
            "dp.slices-per-case",
        ),
        weights=False,
        models=(),
    ),
    "evaluate": ReplySchema(
        settings=(),
        metrics=(
            "num-cases",
            "dice.*",
            "hd95.*",
            "segmentations",
            "dice-raw.*",
            "hd95-raw.*",
            "dp.epsilon-spent",
            "dp.epsilon-total",
            "dp.delta",
            "dp.noise-multiplier",
            "dp.patient-epsilon-spent",
            "dp.patient-epsilon-total",
            "dp.slices-per-case",
        ),
        weights=False,
        models=(),
    ),
    "train.finetune": ReplySchema(
        settings=(),
        metrics=(
            "num-examples",
            "num-cases",
            "loss",
            "seconds",
            "postprocess.largest-component",
            "postprocess.dice-raw",
            "postprocess.dice",
            "dp.epsilon-spent",
            "dp.epsilon-total",
            "dp.delta",
            "dp.noise-multiplier",
            "dp.patient-epsilon-spent",
            "dp.patient-epsilon-total",
            "dp.slices-per-case",
        ),
        weights=True,
        models=(),
    ),
}


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_record_fields_are_pinned(name: str) -> None:
    fields = INSTANCES[name].to_fields()
    parts = fields if isinstance(fields, tuple) else (fields,)
    # repr keeps key order and tells 2 from 2.0, as the wire does.
    assert [repr(list(part.items())) for part in parts] == [
        repr(part) for part in PINNED[name]
    ]


@pytest.mark.parametrize("name", sorted(set(INSTANCES) - {"anchor"}))
def test_record_fields_parse_back_to_the_same_fields(name: str) -> None:
    record = INSTANCES[name]
    fields = record.to_fields()
    parts = fields if isinstance(fields, tuple) else (fields,)
    parsed = type(record).from_fields(*parts)  # type: ignore[attr-defined]
    assert repr(parsed.to_fields()) == repr(fields)
    assert dataclasses.fields(parsed) == dataclasses.fields(record)


def test_anchor_parses_back() -> None:
    anchor = INSTANCES["anchor"]
    assert isinstance(anchor, LedgerAnchor)
    assert LedgerAnchor.from_settings(anchor.to_fields()) == anchor


def test_reply_schemas_are_pinned() -> None:
    assert REPLY_SCHEMAS == PINNED_SCHEMAS


def test_dp_keys_share_their_prefix_and_fedavg_weighs_by_samples() -> None:
    assert all(key.startswith(protocol.DP_KEY_PREFIX) for key in protocol.DP_METRICS)
    for record in (TrainReply, AdaptReply, SemisupReply):
        assert protocol.FEDAVG_WEIGHT_KEY in protocol.record_keys(record)
