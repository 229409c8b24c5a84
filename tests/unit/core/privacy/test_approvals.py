"""A site's approved app bundles: the file, kept copies, ``sitebridge site approve``.

Bundles here are small zips in the layout ``flwr build`` writes (``pyproject.toml``,
``.info/CONTENT`` and the app's files); that real builds of the same files hash the
same is pinned in ``tests/unit/clients/test_serve.py`` (it needs Flower).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import pytest

from core.cli import main
from core.privacy import approvals
from core.privacy.approvals import (
    APPROVALS_FILE,
    ApprovalError,
    approve,
    bundle_sha256,
    is_approved,
    keep_refused_bundle,
    parse_sha256,
    read_approvals,
    refused_bundle_path,
    revoke,
    summarise_bundle,
)


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def make_bundle(*, guard: str = "def egress_guard(): ...\n") -> bytes:
    """A small Flower App Bundle: pyproject, one client file and the manifest."""
    return _zip(
        {
            "pyproject.toml": '[project]\nname = "sitebridge"\nversion = "0.1.0"\n',
            "clients/guard.py": guard,
            ".info/CONTENT": "pyproject.toml,x,1\nclients/guard.py,y,2",
        }
    )


# --------------------------------------------------------------------- the file


def test_approve_list_and_revoke_round_trip(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "state" / APPROVALS_FILE
    first, second = "a" * 64, "b" * 64

    # Execute
    made, new = approve(path, first, source="sha256", note="release 0.1.0")
    again, new_again = approve(path, first.upper(), source="sha256")
    approve(path, second, source="file x.fab")
    revoked = revoke(path, first)

    # Assert: approving twice keeps the first approval; revoking removes only it
    assert new
    assert not new_again
    assert again == made
    assert revoked.note == "release 0.1.0"
    assert [a.sha256 for a in read_approvals(path)] == [second]
    assert is_approved(path, second)
    assert not is_approved(path, first)
    assert json.loads(path.read_text())["format"] == 1


def test_a_missing_file_approves_nothing(tmp_path: Path) -> None:
    assert read_approvals(tmp_path / APPROVALS_FILE) == ()
    assert not is_approved(tmp_path / APPROVALS_FILE, "a" * 64)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not JSON"),
        ('{"format": 2, "approved": []}', "not a SiteBridge approvals file"),
        ('{"format": 1, "approved": {}}', "'approved' must be a list"),
        ('{"format": 1, "approved": [3]}', "approval 1 is not an object"),
        (
            '{"format": 1, "approved": [{"sha256": "x", "approved_at": "", '
            '"source": "", "note": ""}]}',
            "approval 1: 'x' is not a SHA-256",
        ),
    ],
)
def test_a_malformed_approvals_file_is_refused_naming_it(
    tmp_path: Path, text: str, says: str
) -> None:
    # Prepare
    path = tmp_path / APPROVALS_FILE
    path.write_text(text)

    # Execute / Assert
    with pytest.raises(ApprovalError, match=re.escape(says)) as raised:
        is_approved(path, "a" * 64)
    assert str(path) in str(raised.value)


def test_revoking_what_was_never_approved_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / APPROVALS_FILE
    with pytest.raises(ApprovalError, match="is not approved") as raised:
        revoke(path, "c" * 64)
    assert str(path) in str(raised.value)


def test_parse_sha256_refuses_anything_else() -> None:
    with pytest.raises(ApprovalError, match="is not a SHA-256"):
        parse_sha256("deadbeef")


def test_summarise_bundle_reads_name_version_and_files() -> None:
    # Execute
    content = make_bundle()
    summary = summarise_bundle(content, source="x.fab")

    # Assert
    assert summary.sha256 == bundle_sha256(content)
    assert (summary.name, summary.version) == ("sitebridge", "0.1.0")
    assert summary.files == ("clients/guard.py", "pyproject.toml")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"plain bytes", "not a Flower App Bundle (File is not a zip file)"),
        (_zip({"readme.md": "hi"}), "not a Flower App Bundle (no pyproject.toml"),
    ],
)
def test_summarise_bundle_refuses_what_is_no_bundle(content: bytes, says: str) -> None:
    with pytest.raises(ApprovalError, match=re.escape(says)) as raised:
        summarise_bundle(content, source="x.fab")
    assert str(raised.value).startswith("x.fab: ")


# ------------------------------------------------------------- kept refused copies


def test_a_refused_bundle_is_kept_once_for_review(tmp_path: Path) -> None:
    # Execute
    content = make_bundle(guard="# the guard was removed\n")
    kept, said = keep_refused_bundle(tmp_path, content)
    again, _ = keep_refused_bundle(tmp_path, content)

    # Assert
    assert kept == again == refused_bundle_path(tmp_path, bundle_sha256(content))
    assert kept is not None
    assert kept.read_bytes() == content
    assert str(kept) in said


def test_kept_copies_are_capped_in_size_and_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: tiny caps
    monkeypatch.setattr(approvals, "MAX_KEPT_BUNDLE_BYTES", 600)
    monkeypatch.setattr(approvals, "MAX_KEPT_BUNDLES", 2)
    keep_refused_bundle(tmp_path, b"1")
    keep_refused_bundle(tmp_path, b"2")

    # Execute
    too_big = keep_refused_bundle(tmp_path / "other", b"x" * 601)
    too_many = keep_refused_bundle(tmp_path, b"3")

    # Assert
    assert too_big[0] is None
    assert "exceed the 600 bytes" in too_big[1]
    assert too_many[0] is None
    assert "already holds 2 refused bundles" in too_many[1]
    assert len(list((tmp_path / "bundles").glob("*.fab"))) == 2


# ------------------------------------------------------- sitebridge site approve


def test_cli_approves_a_bundle_file_and_lists_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    bundle = tmp_path / "sitebridge.sitebridge.0-1-0.abcd.fab"
    bundle.write_bytes(make_bundle())
    state = tmp_path / "state"

    # Execute
    approved = main(
        ["site", "approve", "--state-dir", str(state), str(bundle), "--note", "IT"]
    )
    approved_output = capsys.readouterr().out
    listed = main(["site", "approve", "--state-dir", str(state), "--list"])
    listed_output = capsys.readouterr().out

    # Assert
    digest = bundle_sha256(bundle.read_bytes())
    assert approved == listed == 0
    assert f"approved: bundle {digest} (sitebridge 0.1.0, 2 files)" in approved_output
    assert digest in listed_output
    assert f"file {bundle.name}" in listed_output
    assert "IT" in listed_output
    assert is_approved(state / APPROVALS_FILE, digest)


def test_cli_approves_a_refused_hash_after_review_and_revokes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the site folder's default state dir holds a refused bundle's copy
    site = tmp_path / "hospital-a"
    content = make_bundle()
    keep_refused_bundle(site / ".sitebridge", content)
    digest = bundle_sha256(content)

    # Execute
    approved = main(["site", "approve", "--site-dir", str(site), digest])
    approved_output = capsys.readouterr().out
    revoked = main(["site", "approve", "--site-dir", str(site), "--revoke", digest])
    revoked_output = capsys.readouterr().out
    listed = main(["site", "approve", "--site-dir", str(site), "--list"])

    # Assert
    assert approved == revoked == listed == 0
    assert "(sitebridge 0.1.0, 2 files)" in approved_output
    assert f"revoked bundle {digest}" in revoked_output
    assert "the site refuses every run" in capsys.readouterr().out


def test_cli_approves_a_hash_with_no_copy_at_hand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["site", "approve", "--state-dir", str(tmp_path), "e" * 64])
    assert code == 0
    assert "(no copy of it here to show)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["not-a-hash"], "'not-a-hash' is not a SHA-256 (64 hex digits) nor an"),
        (["--revoke", "f" * 64], "is not approved"),
        ([], "name a .fab file or its SHA-256"),
    ],
)
def test_cli_refusals_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    code = main(["site", "approve", "--state-dir", str(tmp_path), *argv])
    assert code == 1
    assert says in capsys.readouterr().err


def test_cli_refuses_a_file_that_is_no_bundle_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    bogus = tmp_path / "release.fab"
    bogus.write_text("not a zip")

    # Execute
    code = main(["site", "approve", "--state-dir", str(tmp_path), str(bogus)])

    # Assert
    assert code == 1
    assert f"{bogus}: not a Flower App Bundle" in capsys.readouterr().err
    assert not (tmp_path / APPROVALS_FILE).exists()


def test_cli_refuses_a_kept_copy_that_does_not_match_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: someone replaced the kept copy after the refusal
    digest = "d" * 64
    kept = refused_bundle_path(tmp_path, digest)
    kept.parent.mkdir(parents=True)
    kept.write_bytes(make_bundle())

    # Execute
    code = main(["site", "approve", "--state-dir", str(tmp_path), digest])

    # Assert
    assert code == 1
    assert f"{kept} does not hash to {digest}" in capsys.readouterr().err
