"""Attack class 8: error replies as a channel for paths and patient identifiers.

At hospitals a case's file name is often a patient identifier, and an absolute path
says how the site's disks are laid out. A coordinator that makes a site fail (a
damaged case, a bad run config) must read neither: a case is named by its index
(``case #k``), the site folder is ``<site>``, any other path ``<path>``; and the
error reply is ledgered and anchored like every other, a bad run config's too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from core import protocol
from core.config import ConfigValue
from tests.security.attacker import SiteUnderAttack, assert_site_error, reason_of
from tests.security.conftest import OpenSite

# Case names as hospitals write them: patient identifiers.
PATIENTS: Final = {"a_000": "jones-1990", "a_001": "smith-1984"}
DAMAGED: Final = "smith-1984"
# "/" starting a path (not the one after "<site>" or inside "a/b" words).
ABSOLUTE_PATH: Final = re.compile(r"(?<![\w.>])/[\w.-]")


@pytest.fixture
def hospital(site_copy: Callable[[str, str], Path]) -> Path:
    """Site A with patient-named cases, one of whose images is damaged."""
    directory = site_copy("A", "hospital")
    for path in sorted(directory.rglob("a_00[01]*")):
        for old, new in PATIENTS.items():
            if path.name.startswith(old):
                path.rename(path.with_name(new + path.name[len(old) :]))
    (directory / "imagesTr" / f"{DAMAGED}_0000.nii.gz").write_bytes(b"not a volume")
    return directory


def case_index(directory: Path, case: str) -> int:
    """The case's position among the site's case ids, as its replies number it."""
    stems = {
        re.sub(r"(_\d{4})?\.nii\.gz$", "", path.name)
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
        for path in (directory / folder).iterdir()
    }
    return sorted(stems).index(case)


@pytest.mark.parametrize("message_type", [protocol.TRAIN_SOURCE, protocol.PROFILE])
@pytest.mark.parametrize("given_as", ["folder", "symlink"])
def test_a_damaged_case_is_named_by_index_with_no_path_and_no_case_name(
    open_site: OpenSite,
    hospital: Path,
    tmp_path: Path,
    message_type: str,
    given_as: str,
) -> None:
    # Prepare: the node config names the folder itself or a link to it
    directory = hospital
    if given_as == "symlink":
        directory = tmp_path / "link-to-hospital"
        directory.symlink_to(hospital, target_is_directory=True)
    site = open_site("A", directory=directory)
    k = case_index(hospital, DAMAGED)

    # Execute
    reply = site.send(message_type)

    # Assert: the reason says which case and why, and nothing that identifies it
    assert_site_error(
        site,
        reply,
        "SiteDataError: ",
        f"<site>/imagesTr/case #{k}: truncated or unreadable image",
    )
    reason = reason_of(reply)
    for secret in (*PATIENTS.values(), str(tmp_path), str(hospital.resolve())):
        assert secret not in reason
    assert ABSOLUTE_PATH.search(reason) is None, reason


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"data.image-size": "big"},
            "ValueError: data.image-size must be an integer, got 'big'",
        ),
        ({"evil.key": 1}, "ValueError: unknown run-config keys: evil.key"),
    ],
    ids=["bad-value", "unknown-key"],
)
def test_a_bad_run_config_gets_a_ledgered_error_reply(
    open_site: OpenSite,
    handler_calls: list[str],
    bad: dict[str, ConfigValue],
    message: str,
) -> None:
    # Prepare
    site: SiteUnderAttack = open_site("A")

    # Execute
    reply = site.send(protocol.HELLO, run_overrides=bad)

    # Assert: refused with the reason, ledgered (no policy could be applied)
    entry = assert_site_error(site, reply, message)
    assert handler_calls == []
    assert entry.policy == {}
    assert ABSOLUTE_PATH.search(reason_of(reply)) is None
