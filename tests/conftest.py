"""Shared fixtures: a tiny synthetic federation and the real run-config defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigValue, read_default_run_config
from core.synthetic import write_federation

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


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic sites (A, B, C) with two labelled training cases each."""
    folder = tmp_path_factory.mktemp("federation") / "federation"
    write_federation(folder, seed=0, num_sites=3, num_train_cases=2)
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
