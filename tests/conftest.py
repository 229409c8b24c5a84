"""Shared fixtures: a tiny synthetic federation and the real run-config defaults."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.config import ConfigValue, SyntheticScale, read_default_run_config
from core.data.synthetic import write_federation
from core.logs import NAMESPACE

# Small enough that a whole pipeline runs in seconds on 2 CPU cores.
TINY_RUN_CONFIG: dict[str, ConfigValue] = {
    "data.image-size": 32,
    "data.max-slices-per-case": 3,
    "train.epochs": 1,
    "adapt.epochs": 1,
    "consensus.epochs": 1,
    "consensus.refine-epochs": 1,
    "semisup.iterations": 2,
    "semisup.rounds": 2,
    "semisup.local-iterations": 2,
    "semisup.passes": 2,
    "affinity.finetune-epochs": 1,
    "model.channels": "4,8",
    "model.strides": "2",
}


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread for the tests' tiny tensors, here and in the processes started.

    At 16-32 px with 4-8 channels an operation is far smaller than what a second
    intra-op thread pays to synchronise; on a busy 2-core machine the two threads wait
    on each other and a training step takes many times longer than on one thread.
    ``OMP_NUM_THREADS`` is what torch reads in the Flower processes the integration
    tests start (they inherit this environment); a value the caller set wins.
    """
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def restore_sitebridge_logging() -> Iterator[None]:
    """Each test leaves the ``sitebridge`` logger's handlers and level as it found them.

    A command's ``--log-level warning`` or a ClientApp's configuration would otherwise
    decide what every later test in the session sees.
    """
    logger = logging.getLogger(NAMESPACE)
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture(scope="session")
def pristine_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sites of :func:`federation`, generated once per session; never written to."""
    folder = tmp_path_factory.mktemp("pristine") / "federation"
    write_federation(folder, seed=0, num_sites=3, num_train_cases=2)
    return folder


# The hospital-scale federation of the tests: 3 sites (A and B MR-like, C CT-like),
# 3 training cases each (the target A keeps 2 labelled, as few as a site's policy
# releases label statistics on) and 2 evaluation cases (evaluate needs 2 too).
HOSPITAL_SEED = 3
HOSPITAL_TRAIN_CASES = 3
HOSPITAL_TARGET_LABELLED = 2
HOSPITAL_EVALUATION_CASES = 2


@pytest.fixture(scope="session")
def pristine_hospital_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small hospital-scale federation, generated once per session; never written to.

    Realistic volumes cost about half a second each (the CT site's more), so the
    generator's tests and the hospital pipeline test share this one.
    """
    folder = tmp_path_factory.mktemp("pristine-hospital") / "federation"
    write_federation(
        folder,
        seed=HOSPITAL_SEED,
        num_sites=3,
        num_train_cases=HOSPITAL_TRAIN_CASES,
        target_labelled=HOSPITAL_TARGET_LABELLED,
        scale=SyntheticScale.HOSPITAL,
        evaluation_cases=HOSPITAL_EVALUATION_CASES,
    )
    return folder


@pytest.fixture(scope="module")
def federation(
    pristine_federation: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Three synthetic sites (A, B, C) with two labelled training cases each.

    A fresh copy per module: the sites' state (ledger, accountant) is written into
    their folders, so no module sees another's. Copying is milliseconds; generating
    the volumes again for every module was seconds each.
    """
    folder = tmp_path_factory.mktemp("federation") / "federation"
    shutil.copytree(pristine_federation, folder)
    return folder


@pytest.fixture(scope="module")
def run_config(
    federation: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ConfigValue]:
    """Flat run config as Flower passes it: pyproject defaults, tiny sizes."""
    flat = read_default_run_config()
    flat.update(TINY_RUN_CONFIG)
    flat["federation.dir"] = str(federation)
    flat["federation.cache-dir"] = str(tmp_path_factory.mktemp("cache"))
    return flat


def copy_as_ct_site(site: Path, destination: Path) -> Path:
    """A copy of ``site`` whose ``dataset.json`` says CT (its intensities stay as they
    are); tests of what a CT site computes and releases use it.
    """
    shutil.copytree(site, destination)
    dataset = destination / "dataset.json"
    document = json.loads(dataset.read_text())
    document["modality"] = {"0": "CT"}
    dataset.write_text(json.dumps(document))
    return destination
