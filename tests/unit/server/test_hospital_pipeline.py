"""The whole pipeline on the hospital-scale synthetic federation (small settings).

Three sites of realistic, anisotropic volumes (A and B MR-like, C CT-like in HU,
tests/conftest.py), each resized to ``data.image-size`` slices as every site is today.
Runs every phase through the FakeGrid and the real ClientApp.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from core.config import (
    PIPELINE_PHASES,
    ConfigValue,
    load_run_config,
    read_default_run_config,
)
from core.data.dataset import build_slice_set, index_site
from server.coordinator import Coordinator
from server.runner import PipelineRunner, open_run_store
from tests.conftest import TINY_RUN_CONFIG
from tests.unit.server.fake_grid import build_grid

HOSPITAL_RUN_CONFIG: dict[str, ConfigValue] = {
    **TINY_RUN_CONFIG,
    "data.image-size": 64,
    "semisup.rounds": 1,
}


@pytest.fixture
def hospital_run_config(
    pristine_hospital_federation: Path, tmp_path: Path
) -> dict[str, ConfigValue]:
    """Run config on a private copy of the session's hospital-scale federation."""
    federation = tmp_path / "federation"
    shutil.copytree(pristine_hospital_federation, federation)
    flat = read_default_run_config()
    flat.update(HOSPITAL_RUN_CONFIG)
    flat["federation.dir"] = str(federation)
    flat["federation.cache-dir"] = str(tmp_path / "cache")
    return flat


def test_the_ct_site_loads_through_the_dataset_code(
    pristine_hospital_federation: Path,
) -> None:
    # Prepare
    index = index_site(pristine_hospital_federation / "C")
    data = load_run_config({**read_default_run_config(), **HOSPITAL_RUN_CONFIG}).data

    # Execute
    slices = build_slice_set(index.labelled, data=data, with_labels=True)

    # Assert: z-scored per volume (air included), resized, labels kept
    assert index.modality == "CT"
    assert slices.images.shape[1:] == (1, 64, 64)
    assert bool(torch.isfinite(slices.images).all())
    assert float(slices.images.min()) < -0.5
    assert slices.labels is not None
    assert int(slices.labels.sum()) > 0
    # The slice spacing is the CT's, the in-plane one its 512 pixels resized to 64.
    spacing = slices.spacing_mm[0]
    assert spacing[0] > 2.4
    assert spacing[1] == pytest.approx(spacing[2])
    assert 5.5 < spacing[1] < 7.5


def test_the_ct_site_loads_in_a_ct_window(pristine_hospital_federation: Path) -> None:
    # Prepare: the window a plan derives from the site's organ HU (clip, mean, sd)
    index = index_site(pristine_hospital_federation / "C")
    data = load_run_config(
        {
            **read_default_run_config(),
            **HOSPITAL_RUN_CONFIG,
            "data.normalisation": "ct",
            "data.ct-window": "-15,114,68,23",
        }
    ).data

    # Execute
    slices = build_slice_set(index.labelled, data=data, with_labels=False)

    # Assert: air and bone clipped to the window's ends, the organ around 0
    low, high = (-15 - 68) / 23, (114 - 68) / 23
    assert float(slices.images.min()) == pytest.approx(low, abs=0.05)
    assert float(slices.images.max()) == pytest.approx(high, abs=0.05)


@pytest.mark.pipeline
@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_on_the_hospital_scale_federation(
    hospital_run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Every phase, at 64 px whole slices: about 100 s of CPU (HD95 on the native
    # 256 px grid of every predictor of every evaluation), so outside the CI suite;
    # the run at the plan's resolution below covers the mandatory phases there.
    # Prepare
    federation = Path(str(hospital_run_config["federation.dir"]))
    grid = build_grid(federation, hospital_run_config)
    config = load_run_config(hospital_run_config)
    runs_dir = tmp_path / "runs"
    store = open_run_store(config, run_id=1, runs_dir=runs_dir)
    log: list[str] = []
    runner = PipelineRunner(
        Coordinator(grid=grid, config=config, store=store, log=log.append),  # type: ignore[arg-type]
        flower_run_id=1,
        expected_nodes=len(grid.contexts),
        default_target="A",
    )

    # Execute
    report = runner.run()

    # Assert: every phase ran with every site (the CT site C a source), and every
    # predictor has a finite Dice on the target A
    assert report["error"] is None
    assert set(report["phase_seconds"]) == set(PIPELINE_PHASES)
    sites = {site["name"]: site for site in report["sites"]}
    assert sites["A"]["role"] == "target"
    assert {sites["B"]["role"], sites["C"]["role"]} == {"source"}
    assert report["affinity"]["missing"] == {}
    assert report["affinity"]["path"]["nodes"][-1] == "A"
    dice = report["evaluation"]["dice"]
    assert {
        "source:B",
        "source:C",
        "source:seqtran",
        "tgma",
        "tgma-few-label",
        "consensus:staple",
        "semisup:target",
        "semisup:federated",
    } <= set(dice)
    assert all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in dice.values())
    assert (runs_dir / "1" / "report.md").is_file()
    # The plan knows the CT site by its dataset.json and windows it on its organ's HU
    plan = json.loads((runs_dir / "1" / "plan.json").read_text())
    assert plan["normalisation"] == {"CT": "ct", "MR": "zscore"}
    clip_low, clip_high, mean, _ = plan["ct-window"]
    assert -100 < clip_low < mean < clip_high < 300
    assert 40 < mean < 110
    assert plan["target-spacing-mm"][2] > 3 * plan["target-spacing-mm"][0]


def test_the_mandatory_phases_run_at_the_plans_resolution(
    hospital_run_config: dict[str, ConfigValue], tmp_path: Path
) -> None:
    # Prepare: slices resampled to the plan's in-plane spacing, cut into 64 px tiles
    flat = {
        **hospital_run_config,
        "data.resample": "spacing",
        "data.spacing-mm": 0.0,
        "affinity.enabled": False,
        "consensus.enabled": False,
        "semisup.enabled": False,
        # The sources' decisions would predict every evaluation slice of the CT
        # site (512 px at 0.76 mm: 361 tiles each); tests/unit/core/training has them.
        "postprocess.largest-component": "off",
        "output.target-segmentations": "",
    }
    federation = Path(str(flat["federation.dir"]))
    # The MR sites only: at 0.6 mm the CT site's 512 px slices become 648 px (361
    # tiles each), most of the cost; its window has its own tests above.
    shutil.rmtree(federation / "C")
    grid = build_grid(federation, flat)
    config = load_run_config(flat)
    runs_dir = tmp_path / "runs"
    store = open_run_store(config, run_id=1, runs_dir=runs_dir)
    runner = PipelineRunner(
        Coordinator(grid=grid, config=config, store=store, log=lambda _line: None),  # type: ignore[arg-type]
        flower_run_id=1,
        expected_nodes=len(grid.contexts),
        default_target="A",
    )

    # Execute
    report = runner.run()

    # Assert: the plan's sub-millimetre spacing was used and every predictor was
    # scored on the native grid
    plan = json.loads((runs_dir / "1" / "plan.json").read_text())
    assert plan["applied"]["resample"] == "spacing"
    assert 0.4 < plan["applied"]["spacing-mm"] < 0.9
    assert runner.config.data.spacing_mm == plan["applied"]["spacing-mm"]
    dice = report["evaluation"]["dice"]
    assert {"source:B", "tgma", "uniform"} <= set(dice)
    assert all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in dice.values())
    assert report["evaluation"]["num_cases"] == 2
