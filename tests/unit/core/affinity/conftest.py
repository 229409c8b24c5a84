"""Fixtures shared by the task-profile, profile-noise and affinity tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.affinity.profile import SiteProfile, build_site_profile, profile_settings
from core.config import load_default_config

# The paper's profile (no polarity term, whatever pyproject weighs): the polarity
# term's own tests are test_polarity.py.
SETTINGS = profile_settings(load_default_config().affinity, polarity=False)


@pytest.fixture(scope="module")
def profiles(federation: Path) -> dict[str, SiteProfile]:
    return {
        name: build_site_profile(federation / name, SETTINGS)
        for name in ("A", "B", "C")
    }


@pytest.fixture(scope="module")
def unlabelled_profile(
    federation: Path, tmp_path_factory: pytest.TempPathFactory
) -> SiteProfile:
    site = tmp_path_factory.mktemp("unlabelled") / "U"
    shutil.copytree(federation / "A", site)
    shutil.rmtree(site / "labelsTr")
    return build_site_profile(site, SETTINGS)
