"""The ClientApp handlers, called directly with hand-built Messages and Contexts.

No Flower daemon runs: each test builds the ``Message`` with explicit metadata (as a
SuperNode would deliver it) and a ``Context`` whose ``node_config`` points at one site
of a tiny synthetic federation (as a deployed SuperNode's does), with the helpers of
``tests/unit/clients/messages.py``. Bad input through the whole ClientApp, guard
included, is ``test_bad_input.py``.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

from clients import records
from clients.app import adapt, app, evaluate, hello, lftm, train_source
from clients.site import resolve_site
from core import protocol
from core.config import ConfigValue, RunConfig, load_run_config
from core.data.dataset import SiteDataError, build_slice_set, index_site
from core.logs import NAMESPACE
from core.training.networks import Arrays, build_model, get_manifest
from tests.unit.clients.messages import (
    MESSAGE_ID,
    assert_site_error,
    build_candidates,
    build_context,
    build_message,
)

TARGET = "A"
SOURCES = ("B", "C")
HEAD = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "  # 2026-12-07 10:31:02,118

Handler = Callable[[Message, Context], Message]


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config(run_config: dict[str, ConfigValue]) -> RunConfig:
    return load_run_config(run_config)


@pytest.fixture(scope="module")
def source_weights(
    federation: Path, run_config: dict[str, ConfigValue]
) -> dict[str, Arrays]:
    """Weights trained by the real train.source handler at each source site."""
    trained = {}
    for name in SOURCES:
        reply = train_source(
            build_message(RecordDict(), protocol.TRAIN_SOURCE),
            build_context(run_config, {"site-dir": str(federation / name)}),
        )
        assert not reply.has_error(), reply.error.reason
        trained[name] = records.from_array_record(reply.content[protocol.WEIGHTS_KEY])
    return trained


def site_context(run_config: Mapping[str, ConfigValue], site_dir: Path) -> Context:
    return build_context(run_config, {"site-dir": str(site_dir)})


def reply_text(message: Message) -> str:
    """Every key and scalar value a reply carries, as one string."""
    parts: list[str] = []
    for key, record in message.content.items():
        parts.append(key)
        if isinstance(record, ArrayRecord):
            parts.extend(record.keys())
        else:
            parts.extend(f"{name}={value!r}" for name, value in record.items())
    return "\n".join(parts)


# ---------------------------------------------------------------------------- hello


@pytest.mark.parametrize("site", ["A", "B", "C"])
def test_hello_reports_counts_without_case_names(
    federation: Path, run_config: dict[str, ConfigValue], site: str
) -> None:
    # Prepare
    index = index_site(federation / site)
    case_ids = [
        c.case_id for c in (*index.labelled, *index.unlabelled, *index.evaluation)
    ]
    message = build_message(RecordDict(), protocol.HELLO)

    # Execute
    reply = hello(message, site_context(run_config, federation / site))

    # Assert
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == MESSAGE_ID
    parsed = protocol.HelloReply.from_fields(reply.content[protocol.REPLY_KEY])
    assert parsed == protocol.HelloReply(
        site=site,
        modality="synthetic-MR",
        labelled=2,
        unlabelled=0,
        evaluation=6,
        class_names=("background", "organ"),
    )
    assert len(case_ids) == 8
    text = reply_text(reply)
    assert not [case_id for case_id in case_ids if case_id in text]
    assert not reply.content.array_records


# --------------------------------------------------------------------- train.source


@pytest.mark.parametrize("initial", ["none", "sent"], ids=["fresh", "initial-weights"])
def test_train_source_replies_weights_matching_the_manifest(
    federation: Path,
    run_config: dict[str, ConfigValue],
    config: RunConfig,
    initial: str,
) -> None:
    # Prepare
    expected_manifest = get_manifest(build_model(config.model, data=config.data))
    content = RecordDict()
    if initial == "sent":
        model = build_model(config.model, data=config.data)
        weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        content[protocol.WEIGHTS_KEY] = records.to_array_record(weights)
    index = index_site(federation / "B")
    slices = build_slice_set(index.labelled, data=config.data, with_labels=True)
    expected_examples = slices.images.shape[0] * config.train.epochs

    # Execute
    reply = train_source(
        build_message(content, protocol.TRAIN_SOURCE),
        site_context(run_config, federation / "B"),
    )

    # Assert
    assert not reply.has_error(), reply.error.reason
    weights = records.from_array_record(reply.content[protocol.WEIGHTS_KEY])
    actual_manifest = {name: tuple(value.shape) for name, value in weights.items()}
    assert actual_manifest == expected_manifest
    assert all(np.isfinite(value).all() for value in weights.values())
    result = protocol.TrainReply.from_fields(reply.content[protocol.METRICS_KEY])
    assert result.num_examples == expected_examples == 2 * 3 * 1
    assert result.num_cases == len(index.labelled)
    assert np.isfinite(result.loss)
    assert result.seconds >= 0
    assert set(reply.content.keys()) == {protocol.METRICS_KEY, protocol.WEIGHTS_KEY}
    # B decided on its own evaluation cases whether to keep the largest component
    assert result.dice_raw is not None
    assert result.dice_postprocessed is not None
    assert result.postprocess == (result.dice_postprocessed > result.dice_raw)


# ------------------------------------------------------------------- progress lines


@pytest.fixture
def fresh_logging() -> None:
    """A process whose SiteBridge logging nothing configured yet (a new Ray worker)."""
    logger = logging.getLogger(NAMESPACE)
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)


SITE_EPOCH_LINE = re.compile(
    HEAD + r"INFO sitebridge\.site\.B: \[train B\] epoch 1/1 loss [\d.]+ "
    r"\([\d.]+ s, [\d.]+ samples/s, total [\d.]+ s\)"
)


@pytest.mark.usefixtures("fresh_logging")
def test_the_sites_progress_lines_name_the_site(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare: a copy of B, so that the guard's ledger stays out of the module's
    site = shutil.copytree(federation / "B", tmp_path / "B")

    # Execute: the whole ClientApp, as a simulation's worker runs it
    reply = app(
        build_message(RecordDict(), protocol.TRAIN_SOURCE),
        site_context(run_config, site),
    )

    # Assert: every line of the site is its logger's, at INFO, and says which site
    assert not reply.has_error(), reply.error.reason
    lines = capsys.readouterr().out.splitlines()
    assert lines
    assert all(re.match(HEAD + r"INFO sitebridge\.site\.B: \[", line) for line in lines)
    assert any(SITE_EPOCH_LINE.fullmatch(line) for line in lines), lines


@pytest.mark.usefixtures("fresh_logging")
def test_the_run_configs_log_level_quiets_the_site(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    site = shutil.copytree(federation / "B", tmp_path / "B")
    quiet = {**run_config, "output.log-level": "warning"}

    # Execute
    reply = app(
        build_message(RecordDict(), protocol.TRAIN_SOURCE), site_context(quiet, site)
    )

    # Assert
    assert not reply.has_error(), reply.error.reason
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------ query.lftm


# The template's safe defaults, except that LFTM is released per instance.
INSTANCE_POLICY = (
    (Path(__file__).resolve().parents[3] / "deploy" / "policy.template.toml")
    .read_text()
    .replace('lftm = "domain"', 'lftm = "instance"')
)


@pytest.mark.parametrize("kind", ["trained", "fresh"])
def test_lftm_replies_one_itm_value_per_case_and_no_arrays(
    federation: Path,
    run_config: dict[str, ConfigValue],
    config: RunConfig,
    source_weights: dict[str, Arrays],
    kind: str,
    tmp_path: Path,
) -> None:
    # Prepare: a target whose policy releases LFTM per instance (ITM rows)
    if kind == "trained":
        models = source_weights
    else:
        models = {
            name: {
                k: v.detach().numpy()
                for k, v in build_model(config.model, data=config.data)
                .state_dict()
                .items()
            }
            for name in SOURCES
        }
    index = index_site(federation / TARGET)
    num_cases = len(index.labelled) + len(index.unlabelled)
    message = build_message(build_candidates(models), protocol.LFTM)
    policy = tmp_path / "policy.toml"
    policy.write_text(INSTANCE_POLICY)
    context = build_context(
        run_config, {"site-dir": str(federation / TARGET), "policy": str(policy)}
    )

    # Execute
    reply = lftm(message, context)

    # Assert
    assert not reply.has_error(), reply.error.reason
    assert not reply.content.array_records
    result = protocol.LftmReply.from_fields(
        reply.content[protocol.REPLY_KEY], reply.content[protocol.METRICS_KEY]
    )
    assert result.metric == "lftm"
    assert result.release == "instance"
    assert result.sources == SOURCES
    assert result.itm_columns is not None
    for name in SOURCES:
        column = result.itm_columns[name]
        assert len(column) == num_cases
        assert all(0.0 <= value <= 1.0 for value in column)
        assert result.dtm[name] == pytest.approx(sum(column) / num_cases)
    case_ids = [c.case_id for c in (*index.labelled, *index.unlabelled)]
    assert not [case_id for case_id in case_ids if case_id in reply_text(reply)]


def test_lftm_releases_only_domain_means_under_the_default_policy(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
) -> None:
    # Prepare
    message = build_message(build_candidates(source_weights), protocol.LFTM)

    # Execute
    reply = lftm(message, site_context(run_config, federation / TARGET))

    # Assert
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content[protocol.METRICS_KEY]
    # Per source: its DTM and its row of the agreement matrix (one mean per
    # candidate), nothing per case.
    assert sorted(metrics.keys()) == sorted(
        [f"dtm.{name}" for name in SOURCES] + [f"agree.{name}" for name in SOURCES]
    )
    assert all(isinstance(metrics[f"dtm.{name}"], float) for name in SOURCES)
    result = protocol.LftmReply.from_fields(reply.content[protocol.REPLY_KEY], metrics)
    assert result.release == "domain"
    assert result.itm_columns is None
    assert result.itm_rows() is None
    agreement = result.agreement_by_name()
    assert agreement is not None
    for first in SOURCES:
        assert len(result.agreement[first]) == len(SOURCES)  # type: ignore[index]
        for second in SOURCES:
            assert agreement[first][second] == agreement[second][first]
            assert 0.0 <= agreement[first][second] <= 1.0


# ------------------------------------------------------------------------ train.adapt


@pytest.mark.parametrize(
    ("aux", "weights", "expected_models"),
    [
        ("C", (0.6, 0.4), {"model.main", "model.aux"}),
        ("", (1.0, 0.0), {"model.main"}),
    ],
    ids=["pair", "main-only"],
)
def test_adapt_replies_adapted_models(
    federation: Path,
    run_config: dict[str, ConfigValue],
    config: RunConfig,
    source_weights: dict[str, Arrays],
    aux: str,
    weights: tuple[float, float],
    expected_models: set[str],
) -> None:
    # Prepare
    request = protocol.AdaptRequest(
        main="B", aux=aux, weight_main=weights[0], weight_aux=weights[1]
    )
    message = build_message(
        build_candidates(source_weights, request.to_fields()), protocol.ADAPT
    )
    manifest = get_manifest(build_model(config.model, data=config.data))

    # Execute
    reply = adapt(message, site_context(run_config, federation / TARGET))

    # Assert
    assert not reply.has_error(), reply.error.reason
    assert set(reply.content.array_records) == expected_models
    for key in expected_models:
        adapted = records.from_array_record(reply.content[key])
        assert {k: tuple(v.shape) for k, v in adapted.items()} == manifest
    result = protocol.AdaptReply.from_fields(reply.content[protocol.METRICS_KEY])
    assert result.num_examples == 2 * 3 * config.adapt.epochs
    assert 0.0 <= result.pseudo_label_foreground <= 1.0


# --------------------------------------------------------------------------- evaluate


def test_evaluate_replies_dice_per_requested_predictor(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
) -> None:
    # Prepare
    predictors = {
        "source:B": [("B", 1.0)],
        "source:C": [("C", 1.0)],
        "uniform": [("B", 0.5), ("C", 0.5)],
    }
    request = protocol.EvaluateRequest(predictors=predictors)
    message = build_message(
        build_candidates(source_weights, request.to_fields()), protocol.EVALUATE
    )

    # Execute
    reply = evaluate(message, site_context(run_config, federation / TARGET))

    # Assert
    assert not reply.has_error(), reply.error.reason
    assert not reply.content.array_records
    result = protocol.EvaluateReply.from_fields(reply.content[protocol.METRICS_KEY])
    assert result.num_cases == len(index_site(federation / TARGET).evaluation) == 6
    assert set(result.dice) == set(predictors)
    assert set(result.hd95_mm) == set(predictors)
    assert all(0.0 <= value <= 1.0 for value in result.dice.values())
    assert {key for key in reply.content[protocol.METRICS_KEY] if "dice." in key} == {
        f"dice.{name}" for name in predictors
    }


def test_evaluate_writes_the_segmentations_at_home_and_sends_only_their_count(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
) -> None:
    # Prepare: a hostile predictor name, which must never become a path
    name = "../../escape"
    request = protocol.EvaluateRequest(
        predictors={name: [("B", 0.5), ("C", 0.5)]}, segment=name
    )
    message = build_message(
        build_candidates(source_weights, request.to_fields()), protocol.EVALUATE
    )
    site = federation / TARGET
    before = {path for path in federation.rglob("*") if path.is_file()}

    # Execute
    reply = evaluate(message, site_context(run_config, site))

    # Assert: one NIfTI per image of the site, under its state folder's run folder
    assert not reply.has_error(), reply.error.reason
    result = protocol.EvaluateReply.from_fields(reply.content[protocol.METRICS_KEY])
    index = index_site(site)
    images = (*index.training_images, *index.evaluation_images)
    assert result.segmentations == len(images)
    folder = site / ".sitebridge" / "segmentations" / "run-1"
    new = {path for path in federation.rglob("*") if path.is_file()} - before
    written = {path for path in new if path.parent == folder}
    assert {path.name for path in written} == {
        f"{case.case_id}.nii.gz" for case in images
    } | {"segmentations.json"}
    assert all(
        folder in path.parents or path.parent == folder.parent.parent for path in new
    )
    assert not (federation.parent / "escape").exists()
    # Nothing about the images travels: no arrays, no case names.
    assert not reply.content.array_records
    text = reply_text(reply)
    assert not any(case.case_id in text for case in images)


def test_error_evaluate_segment_naming_no_predictor(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
) -> None:
    # Prepare
    fields = protocol.EvaluateRequest(predictors={"p": [("B", 1.0)]}).to_fields()
    fields["segment"] = "../p"
    message = build_message(build_candidates(source_weights, fields), protocol.EVALUATE)

    # Execute
    reply = evaluate(message, site_context(run_config, federation / TARGET))

    # Assert
    assert_site_error(reply, "payload field 'segment'", "not one of the predictors")


# -------------------------------------------------------------------- post-processing


def test_evaluate_post_processes_the_named_predictors_and_sends_their_raw_figures(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
) -> None:
    # Prepare
    predictors = {"source:B": [("B", 1.0)], "uniform": [("B", 0.5), ("C", 0.5)]}
    request = protocol.EvaluateRequest(predictors=predictors, postprocess=("uniform",))
    message = build_message(
        build_candidates(source_weights, request.to_fields()), protocol.EVALUATE
    )

    # Execute
    reply = evaluate(message, site_context(run_config, federation / TARGET))

    # Assert
    assert not reply.has_error(), reply.error.reason
    result = protocol.EvaluateReply.from_fields(reply.content[protocol.METRICS_KEY])
    assert set(result.dice) == set(predictors)
    assert set(result.dice_raw) == set(result.hd95_raw_mm) == {"uniform"}
    assert 0.0 <= result.dice_raw["uniform"] <= 1.0


@pytest.mark.parametrize(
    ("postprocess", "message"),
    [
        (["tgma"], "payload field 'postprocess' names ['tgma'], which are not "),
        (["p", "p"], "payload field 'postprocess' names a predictor twice"),
    ],
    ids=["unknown-predictor", "twice"],
)
def test_error_evaluate_postprocess_naming_no_predictor(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
    postprocess: list[str],
    message: str,
) -> None:
    # Prepare: a coordinator naming a predictor the request does not hold
    fields = protocol.EvaluateRequest(predictors={"p": [("B", 1.0)]}).to_fields()
    fields["postprocess"] = postprocess
    request = build_message(build_candidates(source_weights, fields), protocol.EVALUATE)

    # Execute
    reply = evaluate(request, site_context(run_config, federation / TARGET))

    # Assert
    assert_site_error(reply, message)


# ------------------------------------------------------------------------ error paths


def corrupt_site(federation: Path, tmp_path: Path, site: str) -> tuple[Path, Path]:
    """A copy of ``site`` whose first training image is garbage bytes."""
    copy = tmp_path / site
    shutil.copytree(federation / site, copy)
    broken = sorted((copy / "imagesTr").iterdir())[0]
    broken.write_bytes(b"\x00not an image\xff" * 64)
    return copy, broken


def break_manifest(weights: Arrays, how: str) -> Arrays:
    """``weights`` with its first parameter dropped, reshaped, or an extra one added."""
    first = sorted(weights)[0]
    broken = dict(weights)
    if how == "drop":
        del broken[first]
    elif how == "reshape":
        broken[first] = np.zeros((*weights[first].shape, 2), dtype=np.float32)
    else:
        broken["model.extra.weight"] = np.zeros((3,), dtype=np.float32)
    return broken


def test_error_missing_site_folder(
    tmp_path: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Prepare
    missing = tmp_path / "no-such-site"

    # Execute
    reply = hello(
        build_message(RecordDict(), protocol.HELLO), site_context(run_config, missing)
    )

    # Assert
    assert_site_error(reply, str(missing), "not found")


@pytest.mark.parametrize(
    ("handler", "message_type", "site"),
    [
        (train_source, protocol.TRAIN_SOURCE, "B"),
        (lftm, protocol.LFTM, TARGET),
        (adapt, protocol.ADAPT, TARGET),
    ],
    ids=["train-source", "lftm", "adapt"],
)
def test_error_corrupt_image_names_the_file(
    federation: Path,
    tmp_path: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
    handler: Handler,
    message_type: str,
    site: str,
) -> None:
    # Prepare
    copy, broken = corrupt_site(federation, tmp_path, site)
    request = protocol.AdaptRequest(main="B", aux="C", weight_main=0.5, weight_aux=0.5)
    content = (
        RecordDict()
        if handler is train_source
        else build_candidates(source_weights, request.to_fields())
    )

    # Execute
    reply = handler(
        build_message(content, message_type), site_context(run_config, copy)
    )

    # Assert
    assert_site_error(reply, str(broken), "unreadable")


@pytest.mark.parametrize("how", ["drop", "reshape", "extra"])
@pytest.mark.parametrize(
    ("handler", "message_type"),
    [(lftm, protocol.LFTM), (adapt, protocol.ADAPT), (evaluate, protocol.EVALUATE)],
    ids=["lftm", "adapt", "evaluate"],
)
def test_error_weights_not_matching_the_manifest(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
    handler: Handler,
    message_type: str,
    how: str,
) -> None:
    # Prepare
    models = {"B": break_manifest(source_weights["B"], how), "C": source_weights["C"]}
    settings: dict[str, ConfigValue] = {
        **protocol.AdaptRequest(
            main="B", aux="C", weight_main=0.5, weight_aux=0.5
        ).to_fields(),
        **protocol.EvaluateRequest(predictors={"b": [("B", 1.0)]}).to_fields(),
    }
    message = build_message(build_candidates(models, settings), message_type)

    # Execute
    reply = handler(message, site_context(run_config, federation / TARGET))

    # Assert
    first = sorted(source_weights["B"])[0]
    expected = {
        "drop": (f"missing [{first!r}]",),
        "reshape": (first, "has shape"),
        "extra": ("unexpected ['model.extra.weight']",),
    }
    assert_site_error(reply, "weights do not match the model manifest", *expected[how])


def test_error_adapt_main_not_among_candidates(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
) -> None:
    # Prepare
    request = protocol.AdaptRequest(main="Z", aux="C", weight_main=0.5, weight_aux=0.5)
    message = build_message(
        build_candidates(source_weights, request.to_fields()), protocol.ADAPT
    )

    # Execute
    reply = adapt(message, site_context(run_config, federation / TARGET))

    # Assert
    assert_site_error(reply, "'Z'", "not among the candidates")


@pytest.mark.parametrize(
    "predictors",
    ["{not json", "[1, 2]", '{"b": 5}', '{"b": [["B"]]}', '{"b": [["B", "heavy"]]}'],
    ids=["not-json", "list", "not-members", "no-weight", "weight-not-number"],
)
def test_error_evaluate_malformed_predictors(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
    predictors: str,
) -> None:
    # Prepare
    message = build_message(
        build_candidates(source_weights, {"predictors": predictors}),
        protocol.EVALUATE,
    )

    # Execute
    reply = evaluate(message, site_context(run_config, federation / TARGET))

    # Assert
    assert_site_error(reply, "predictors", "malformed")


def test_error_evaluate_predictor_naming_unknown_model(
    federation: Path,
    run_config: dict[str, ConfigValue],
    source_weights: dict[str, Arrays],
) -> None:
    # Prepare
    request = protocol.EvaluateRequest(predictors={"ghost": [("Z", 1.0)]})
    message = build_message(
        build_candidates(source_weights, request.to_fields()), protocol.EVALUATE
    )

    # Execute
    reply = evaluate(message, site_context(run_config, federation / TARGET))

    # Assert
    assert_site_error(reply, "'ghost'", "unknown models", "'Z'")


def test_error_node_config_without_site(run_config: dict[str, ConfigValue]) -> None:
    # Prepare
    message = build_message(RecordDict(), protocol.HELLO)

    # Execute
    reply = hello(message, build_context(run_config, {}))

    # Assert
    assert_site_error(reply, "site-dir", "partition-id")


def test_error_lftm_without_candidates(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Prepare
    message = build_message(RecordDict(), protocol.LFTM)

    # Execute
    reply = lftm(message, site_context(run_config, federation / TARGET))

    # Assert
    assert_site_error(reply, "no candidate models")


def test_error_bad_run_config_names_the_key(
    federation: Path, run_config: dict[str, ConfigValue]
) -> None:
    # Prepare
    broken = {**run_config, "train.epochs": 0}

    # Execute
    reply = hello(
        build_message(RecordDict(), protocol.HELLO),
        site_context(broken, federation / TARGET),
    )

    # Assert
    assert_site_error(reply, "train.epochs")


# ----------------------------------------------------------------------- resolve_site


@pytest.mark.parametrize(("partition", "expected"), [(0, "A"), (1, "B"), (2, "C")])
def test_resolve_site_maps_partition_to_sorted_site_folder(
    federation: Path, config: RunConfig, partition: int, expected: str
) -> None:
    # Prepare
    context = build_context({}, {"partition-id": partition, "num-partitions": 3})

    # Execute
    site = resolve_site(context, config)

    # Assert
    sorted_sites = sorted(p for p in federation.iterdir() if (p / "imagesTr").is_dir())
    assert site.directory == sorted_sites[partition]
    assert site.name == expected


def test_resolve_site_prefers_site_dir(tmp_path: Path, config: RunConfig) -> None:
    # Prepare
    context = build_context({}, {"site-dir": str(tmp_path / "H1"), "partition-id": 0})

    # Execute
    site = resolve_site(context, config)

    # Assert
    assert (site.name, site.directory) == ("H1", tmp_path / "H1")


@pytest.mark.parametrize("partition", [3, 10, -1])
def test_resolve_site_rejects_partition_out_of_range(
    config: RunConfig, partition: int
) -> None:
    # Prepare
    context = build_context({}, {"partition-id": partition, "num-partitions": 4})

    # Execute / Assert
    with pytest.raises(SiteDataError, match=r"num-supernodes=3"):
        resolve_site(context, config)


def test_hello_in_simulation_serves_the_partition_site(
    run_config: dict[str, ConfigValue],
) -> None:
    # Prepare
    context = build_context(run_config, {"partition-id": 2, "num-partitions": 3})

    # Execute
    reply = hello(build_message(RecordDict(), protocol.HELLO), context)

    # Assert
    assert not reply.has_error(), reply.error.reason
    assert (
        protocol.HelloReply.from_fields(reply.content[protocol.REPLY_KEY]).site == "C"
    )
