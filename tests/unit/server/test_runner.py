"""The run's life cycle: phase order, last-phase, resume after a kill, dropout, report.

Runs the real phases against the real ClientApp through the FakeGrid; a grid built
with ``kill_at`` raises when the coordinator sends that message type, which is what
the ServerApp process dying mid-run looks like from the run folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core import protocol
from core.config import ConfigValue, load_run_config
from core.privacy.ledger import verify_ledger
from server.app import prepare_federation
from server.coordinator import Coordinator, PhaseError
from server.runner import (
    ATTEMPTS_FILE,
    PipelineRunner,
    ResumeError,
    open_run_store,
)
from tests.unit.server.fake_grid import FakeGrid, ServerAppKilled, build_grid

PHASE_FILES = (
    "discover",
    "plan",
    "source-training",
    "affinity",
    "transferability",
    "adaptation",
    "consensus",
    "semisup",
    "evaluation",
)
# Fields of a phase result that legitimately differ between two runs.
# The segmentations go under the Flower run id of the attempt that evaluated.
RUN_SPECIFIC = {"node_id", "seconds", "segmentations_run"}
RESUME_7: dict[str, ConfigValue] = {"resume-run": "7"}


def start_run(
    grid: FakeGrid,
    run_config: dict[str, ConfigValue],
    runs_dir: Path,
    flower_run_id: int,
    **overrides: ConfigValue,
) -> PipelineRunner:
    config = load_run_config({**run_config, **overrides})
    store = open_run_store(config, run_id=flower_run_id, runs_dir=runs_dir)
    log: list[str] = []
    coordinator = Coordinator(
        grid=grid,  # type: ignore[arg-type]
        config=config,
        store=store,
        log=log.append,
    )
    return PipelineRunner(
        coordinator,
        flower_run_id=flower_run_id,
        expected_nodes=len(grid.contexts),
        default_target="A",
    )


def comparable(value: Any) -> Any:
    """A phase result without the fields that differ between runs."""
    if isinstance(value, dict):
        return {
            key: comparable(item)
            for key, item in value.items()
            if key not in RUN_SPECIFIC
        }
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return value


def phase_results(run_dir: Path) -> dict[str, Any]:
    return {
        phase: comparable(
            json.loads((run_dir / "phases" / f"{phase}.json").read_text())
        )
        for phase in PHASE_FILES
    }


@pytest.fixture(scope="module")
def uninterrupted(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The run folder of one run that was never interrupted."""
    runs_dir = tmp_path_factory.mktemp("uninterrupted")
    start_run(build_grid(federation, run_config), run_config, runs_dir, 1).run()
    return runs_dir / "1"


# --------------------------------------------------------------------------- resume


# The message types of a kill, in the order a run sends them: fine-tuning in affinity,
# LFTM in transferability, adapt, consensus, and the first evaluate (round 0 of the
# federated semisup rounds, after the target's own refinement).
KILL_POINTS = (
    protocol.FINETUNE,
    protocol.LFTM,
    protocol.ADAPT,
    protocol.CONSENSUS,
    protocol.EVALUATE,
)
# A message type only this phase sends: once the phase is persisted, a resumed
# attempt must not send it again.
PHASE_MESSAGES = {
    "plan": protocol.FINGERPRINT,
    "source-training": protocol.TRAIN_SOURCE,
    "affinity": protocol.PROFILE,
    "transferability": protocol.LFTM,
    "adaptation": protocol.ADAPT,
    "consensus": protocol.CONSENSUS,
}


def finished_phases(run_dir: Path) -> set[str]:
    return {path.stem for path in (run_dir / "phases").glob("*.json")}


def test_resume_after_a_kill_at_every_phase_matches_the_uninterrupted_run(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    uninterrupted: Path,
) -> None:
    # Prepare: run 7 dies when it is about to send the first kill point's message
    with pytest.raises(ServerAppKilled):
        start_run(
            build_grid(federation, run_config, kill_at=KILL_POINTS[0]),
            run_config,
            tmp_path,
            7,
        ).run()
    finished = finished_phases(tmp_path / "7")
    assert "source-training" in finished
    assert "evaluation" not in finished

    # Execute: each new Flower run resumes run 7 and dies at the next kill point,
    # one phase further on; the last one (no kill) finishes it. One pass through
    # the phases covers a kill in each of them.
    flower_run_ids = range(8, 8 + len(KILL_POINTS))
    for flower_run_id, kill_at in zip(
        flower_run_ids, (*KILL_POINTS[1:], None), strict=True
    ):
        done_before = finished_phases(tmp_path / "7")
        grid = build_grid(federation, run_config, kill_at=kill_at)
        runner = start_run(grid, run_config, tmp_path, flower_run_id, **RESUME_7)
        if kill_at is None:
            report = runner.run()
        else:
            with pytest.raises(ServerAppKilled):
                runner.run()

        # Assert (each attempt): nothing finished is redone, the nodes are re-mapped
        redone = {
            phase
            for phase, message_type in PHASE_MESSAGES.items()
            if phase in done_before and grid.sent_of_type(message_type)
        }
        assert redone == set(), (kill_at, redone)
        assert not grid.sent_of_type(protocol.TRAIN_SOURCE)
        assert len(grid.sent_of_type(protocol.HELLO)) == 3
        assert finished_phases(tmp_path / "7") >= done_before
        assert not (tmp_path / str(flower_run_id)).exists()  # run 7 keeps its folder

    # Assert: the results are the uninterrupted ones
    assert phase_results(tmp_path / "7") == phase_results(uninterrupted)
    for model in (uninterrupted / "models").glob("*.npz"):
        with (
            np.load(model) as expected,
            np.load(tmp_path / "7" / "models" / model.name) as got,
        ):
            assert sorted(expected.files) == sorted(got.files)
            for name in expected.files:
                np.testing.assert_array_equal(got[name], expected[name])
    attempts = json.loads((tmp_path / "7" / ATTEMPTS_FILE).read_text())["attempts"]
    # The killed attempts never wrote; the one that finished did.
    assert [a["flower_run_id"] for a in attempts] == [flower_run_ids[-1]]
    assert "source-training" in attempts[0]["reloaded"]
    assert report["error"] is None
    assert report["evaluation"] is not None
    assert verify_ledger(tmp_path / "7" / "ledger.jsonl").ok


def test_resume_of_a_finished_run_only_says_hello(
    federation: Path,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    uninterrupted: Path,
) -> None:
    # Prepare: a copy of the finished run's folder (run 1), as it was left
    shutil.copytree(uninterrupted, tmp_path / "1")
    grid = build_grid(federation, run_config)

    # Execute
    report = start_run(grid, run_config, tmp_path, 2, **{"resume-run": "1"}).run()

    # Assert
    assert {m.metadata.message_type for m in grid.sent} == {protocol.HELLO}
    assert [a["ran"] for a in report["attempts"]] == [
        [
            "discover",
            "plan",
            "source-training",
            "affinity",
            "transferability",
            "adaptation",
            "consensus",
            "semisup",
            "evaluation",
        ],
        ["rediscover"],
    ]
    assert "## Attempts" in (tmp_path / "1" / "report.md").read_text()


def test_resume_refuses_a_changed_config_naming_each_key(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    start_run(
        build_grid(federation, run_config),
        run_config,
        tmp_path,
        1,
        **{"last-phase": "discover"},
    ).run()

    # Execute / Assert
    with pytest.raises(ResumeError) as caught:
        start_run(
            build_grid(federation, run_config),
            run_config,
            tmp_path,
            2,
            **{"resume-run": "1", "train.epochs": 9, "adapt.epochs": 4},
        )
    assert "resume-run 1: the run config differs" in str(caught.value)
    assert "train.epochs: 1 -> 9" in str(caught.value)
    assert "adapt.epochs: 1 -> 4" in str(caught.value)


def test_resume_may_change_how_the_run_is_steered(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    start_run(
        build_grid(federation, run_config),
        run_config,
        tmp_path,
        1,
        **{"last-phase": "discover"},
    ).run()

    # Execute
    runner = start_run(
        build_grid(federation, run_config),
        run_config,
        tmp_path,
        2,
        **{
            "resume-run": "1",
            "last-phase": "source-training",
            "federation.reply-timeout-s": 60.0,
            "output.log-level": "debug",
        },
    )
    runner.run()

    # Assert
    assert (tmp_path / "1" / "phases" / "source-training.json").is_file()


def test_resume_of_an_unknown_run_is_a_clear_error(
    run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    config = load_run_config({**run_config, "resume-run": "42"})
    with pytest.raises(ResumeError, match=r"resume-run 42: .*42/config.json not found"):
        open_run_store(config, run_id=43, runs_dir=tmp_path)


# ----------------------------------------------------------------- last-phase, report


@pytest.mark.pipeline
def test_last_phase_stops_early_and_still_reports(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare
    grid = build_grid(federation, run_config)

    # Execute
    report = start_run(
        grid, run_config, tmp_path, 1, **{"last-phase": "transferability"}
    ).run()

    # Assert
    assert not grid.sent_of_type(protocol.ADAPT)
    assert not grid.sent_of_type(protocol.EVALUATE)
    assert report["transferability"]["label_free"]["main"] in {"B", "C"}
    assert report["transferability"]["few_label"]["main"] in {"B", "C", "seqtran"}
    assert report["adaptation"] is None
    assert report["evaluation"] is None
    assert set(report["phase_seconds"]) == {
        "discover",
        "plan",
        "source-training",
        "affinity",
        "transferability",
    }
    assert report["coordinator"]["peak_rss_mb"] > 0
    assert set(report["coordinator"]["peak_rss_mb_after_phase"]) == set(
        report["phase_seconds"]
    )
    markdown = (tmp_path / "1" / "report.md").read_text()
    assert "## Transferability" in markdown
    assert "## Evaluation" not in markdown
    assert (tmp_path / "1" / "dtm.png").is_file()
    assert not (tmp_path / "1" / "dice.png").exists()


@pytest.mark.pipeline
def test_a_failed_phase_writes_the_report_with_the_reason(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: the target (node 11, site A) answers hello, then goes silent
    grid = build_grid(federation, run_config)
    runner = start_run(grid, run_config, tmp_path, 1)
    grid.drop = {11}
    original = grid.send_and_receive

    def hello_then_silence(messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == protocol.HELLO:
            grid.drop = set()
            replies = original(messages, timeout=timeout)
            grid.drop = {11}
            return replies
        return original(messages, timeout=timeout)

    grid.send_and_receive = hello_then_silence  # type: ignore[method-assign]

    # Execute
    with pytest.raises(PhaseError, match="transferability: target A failed"):
        runner.run()

    # Assert
    report = json.loads((tmp_path / "1" / "report.json").read_text())
    assert report["error"].startswith("transferability: target A failed: no reply")
    assert report["transferability"] is None
    assert report["attempts"][0]["outcome"].startswith("failed: transferability")
    markdown = (tmp_path / "1" / "report.md").read_text()
    assert "**The run stopped:** transferability: target A failed" in markdown


# --------------------------------------------------------------------------- dropout


def test_a_run_stopped_for_too_few_sites_names_them_and_how_to_resume(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: C's folder disappears after hello; two source models are required
    grid = build_grid(federation, run_config)
    original = grid.send_and_receive

    def break_c_after_hello(messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == protocol.TRAIN_SOURCE:
            grid.contexts[13].node_config["site-dir"] = str(tmp_path / "C-gone")
        return original(messages, timeout=timeout)

    grid.send_and_receive = break_c_after_hello  # type: ignore[method-assign]
    runner = start_run(grid, run_config, tmp_path, 5, **{"federation.min-sites": 2})

    # Execute
    with pytest.raises(PhaseError, match="source training: 1 source model"):
        runner.run()

    # Assert: C is failed (not idle), the missing-sites section names it, and the
    # report says how to finish the run once C is back
    report = json.loads((tmp_path / "5" / "report.json").read_text())
    roles = {site["name"]: site["role"] for site in report["sites"]}
    assert roles == {"A": "target", "B": "idle", "C": "failed"}
    assert report["missing"]["source-training"] == {
        "C": f"error {protocol.SITE_ERROR_CODE}: SiteDataError: <site>: "
        "site folder not found"
    }
    assert report["resume"] == (
        "flwr run . <connection> --run-config 'resume-run=\"5\"'"
    )
    markdown = (tmp_path / "5" / "report.md").read_text()
    assert "## Missing sites" in markdown
    assert "- source-training: C: error 100" in markdown
    assert "## Resume" in markdown
    assert 'resume-run="5"' in markdown
    assert (tmp_path / "5" / "phases" / "source-training.json").exists() is False


@pytest.mark.pipeline
def test_a_source_that_fails_is_left_out_and_reported(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: C's images become unreadable after it said hello
    grid = build_grid(federation, run_config)
    original = grid.send_and_receive
    broken = tmp_path / "C-broken"

    def break_c_after_hello(messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == protocol.TRAIN_SOURCE:
            grid.contexts[13].node_config["site-dir"] = str(broken)
        return original(messages, timeout=timeout)

    grid.send_and_receive = break_c_after_hello  # type: ignore[method-assign]

    # Execute
    report = start_run(
        grid, run_config, tmp_path, 1, **{"federation.min-sites": 1}
    ).run()

    # Assert: the run finishes with B alone and says who was missing and why; the
    # SeqTran candidate is B's model fine-tuned at A (one source: a direct path)
    assert report["error"] is None
    assert report["affinity"]["path"]["nodes"] == ["B", "A"]
    assert "C" in report["affinity"]["missing"]
    transfer = report["transferability"]
    assert (transfer["label_free"]["main"], transfer["label_free"]["aux"]) == (
        "B",
        None,
    )
    few = transfer["few_label"]
    assert {few["main"], few["aux"]} == {"B", "seqtran"}
    assert report["missing"]["source-training"] == {
        "C": f"error {protocol.SITE_ERROR_CODE}: SiteDataError: <site>: "
        "site folder not found"
    }
    assert set(report["evaluation"]["dice"]) == {
        "source:B",
        "source:seqtran",
        "uniform",
        "tgma",
        "tgma-main",
        "tgma-few-label",
        "tgma-few-label-main",
        "consensus:itm",
        "consensus:majority",
        "consensus:staple",
        "consensus:deepstaple",
        "semisup:target",
        "semisup:federated",
    }
    # B decided on its own evaluation cases whether to keep the largest component;
    # the target post-processed exactly what follows B and sent the raw figures
    decided = report["source_training"]["B"]["postprocess.largest-component"]
    assert decided in (0, 1)
    postprocessed = report["evaluation"].get("postprocessed", [])
    assert ("source:B" in postprocessed) == (decided == 1)
    assert ("uniform" in postprocessed) == (decided == 1)
    assert set(report["evaluation"].get("dice_raw", {})) == set(postprocessed)
    # B alone labels the consensus: the SeqTran candidate is few-label
    assert report["consensus"]["sources"] == ["B"]
    assert report["evaluation"]["groups"]["consensus:deepstaple"] == "label-free"
    assert report["evaluation"]["groups"]["tgma-few-label"] == "few-label"
    # C fails every semisup round too; A and B carry the rounds.
    for entry in report["semisup"]["federated"]["rounds"][1:]:
        assert set(entry["train"]) == {"A", "B"}
        assert "C" in entry["missing"]
    markdown = (tmp_path / "1" / "report.md").read_text()
    assert "- source-training: C: error" in markdown
    assert "site folder not found" in markdown


def test_too_few_sources_fail_the_run_with_a_clear_message(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: both sources go silent after hello; min-sites stays 2
    grid = build_grid(federation, run_config)
    original = grid.send_and_receive

    def silence_sources(messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == protocol.TRAIN_SOURCE:
            grid.drop = {12, 13}
        return original(messages, timeout=timeout)

    grid.send_and_receive = silence_sources  # type: ignore[method-assign]

    # Execute / Assert
    with pytest.raises(PhaseError) as caught:
        start_run(grid, run_config, tmp_path, 1).run()
    message = str(caught.value)
    assert message.startswith("source training: 0 source model(s) arrived, 2 needed")
    assert "'B': 'no reply within 3600 s'" in message
    assert "'C': 'no reply within 3600 s'" in message


# ------------------------------------------------------------ federation preparation


def test_deployment_config_needs_no_federation_folder(
    run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: the coordinator sees no site folder at all
    config = load_run_config(
        {
            **run_config,
            "federation.dir": str(tmp_path / "not-here"),
            "federation.expected-sites": 3,
            "federation.target-site": "A",
        }
    )

    # Execute / Assert
    assert prepare_federation(config) == (3, None)
    assert not (tmp_path / "not-here").exists()


def test_expected_sites_without_a_target_is_a_clear_error(
    run_config: dict[str, ConfigValue],
) -> None:
    config = load_run_config({**run_config, "federation.expected-sites": 3})
    with pytest.raises(ValueError, match=r"federation\.target-site must name the"):
        prepare_federation(config)


def test_simulation_config_counts_the_site_folders(
    run_config: dict[str, ConfigValue],
) -> None:
    assert prepare_federation(load_run_config(run_config)) == (3, "A")


# ---------------------------------------------------------------------- the plan


def test_a_run_that_leaves_sizes_to_the_plan_runs_at_the_planned_ones(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: image and batch size left to the plan
    grid = build_grid(federation, run_config)

    # Execute: the sites train at what the plan said, or fail on size 0
    runner = start_run(
        grid,
        run_config,
        tmp_path,
        1,
        **{
            "data.image-size": 0,
            "train.batch-size": 0,
            "last-phase": "source-training",
        },
    )
    runner.run()

    # Assert: the synthetic sites' 64 x 64 at 1.5 mm plan 64 px; every later request
    # carried the plan, and the sources trained on it
    plan = json.loads((tmp_path / "1" / "plan.json").read_text())
    assert plan["image-size"] == 64
    assert plan["applied"]["image-size"] == 64
    assert plan["applied"]["batch-size"] == plan["batch-size"] >= 2
    assert plan["target-spacing-mm"][2] == pytest.approx(3.0)
    assert runner.config.data.image_size == 64
    training = json.loads(
        (tmp_path / "1" / "phases" / "source-training.json").read_text()
    )
    assert set(training["training"]) == {"B", "C"}
    report = (tmp_path / "1" / "report.md").read_text()
    assert "## Resolution plan" in report
    assert "image size 64 px" in report


def test_a_size_left_to_a_disabled_plan_stops_the_run_naming_the_key(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    runner = start_run(
        build_grid(federation, run_config),
        run_config,
        tmp_path,
        1,
        **{"data.image-size": 0, "plan.enabled": False},
    )

    with pytest.raises(PhaseError, match=r"leaves data.image-size = 0 to the"):
        runner.run()


def test_a_run_at_the_plans_spacing_trains_on_tiles_and_scores_natively(
    federation: Path, run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: slices resampled to the plan's spacing, cut into 32 px tiles
    grid = build_grid(federation, run_config)

    # Execute: every phase that maps predictions back to an image's grid runs
    report = start_run(
        grid,
        run_config,
        tmp_path,
        1,
        **{
            "data.resample": "spacing",
            "data.spacing-mm": 0.0,
            "affinity.enabled": False,
            "semisup.enabled": False,
        },
    ).run()

    # Assert: the plan's 1.5 mm; scores on the 64 x 64 grid; labels and
    # segmentations written on each image's own grid
    plan = json.loads((tmp_path / "1" / "plan.json").read_text())
    assert plan["applied"]["spacing-mm"] == pytest.approx(1.5)
    assert plan["applied"]["resample"] == "spacing"
    dice = report["evaluation"]["dice"]
    assert all(0.0 <= value <= 1.0 for value in dice.values())
    target_state = federation / "A" / ".sitebridge"
    run = report["evaluation"]["segmentations_run"]
    written = sorted((target_state / "segmentations" / f"run-{run}").glob("*.nii.gz"))
    assert len(written) == report["evaluation"]["segmentations"] > 0
    assert list((target_state / "consensus").glob("run-*/deepstaple/*.nii.gz"))
