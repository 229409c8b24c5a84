"""The app bundles a site approved: which coordinator releases its SuperNode serves.

In a deployment the coordinator submits a Flower App Bundle (FAB, a zip of the app's
files) with ``flwr run``; the site's own ClientApp process (``clients/serve.py``) runs
a message only when the SHA-256 of that bundle is in the site's approvals file, and
then runs the SiteBridge the site installed, never the bundle's code. This module owns
that file (``<state-dir>/approved-bundles.json``), the copies of refused bundles kept
for review (``<state-dir>/bundles/<sha256>.fab``) and the hashing. Pure stdlib (no
flwr): ``sitebridge site approve`` uses it as well.

The approvals file is JSON, written whole (``core.storage``) under an exclusive lock,
so two approvals at once never lose one::

    {"format": 1, "approved": [{"sha256": "...", "approved_at": "...",
                                "source": "file sitebridge.sitebridge.0-1-0.0a1b.fab",
                                "note": "release 0.1.0, reviewed by IT"}]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import tomllib
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from core.storage import hold_exclusive_lock, write_atomically

APPROVALS_FILE: Final = "approved-bundles.json"
REFUSED_BUNDLES_DIR: Final = "bundles"
FORMAT: Final = 1
# Flower 1.39 refuses bundles above 10 MiB (FAB_MAX_SIZE); a refused bundle is kept
# up to that size, and at most this many are kept, so a coordinator sending bundle
# after bundle cannot fill the site's disk.
MAX_KEPT_BUNDLE_BYTES: Final = 10 * 1024 * 1024
MAX_KEPT_BUNDLES: Final = 20
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_CONTENT_MANIFEST: Final = ".info/CONTENT"  # every FAB's list of files and hashes


class ApprovalError(ValueError):
    """An approvals file or bundle that can't be used; the message names the file."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Approval:
    """One approved bundle: its SHA-256, when, from what, and the site's note."""

    sha256: str
    approved_at: str
    source: str  # "file <name>" or "sha256" (approved by hash, e.g. a kept copy)
    note: str = ""

    def to_json(self) -> dict[str, str]:
        """The approval as it is stored."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BundleSummary:
    """What a bundle says it is: its hash, app name and version, and its files."""

    sha256: str
    name: str
    version: str
    files: tuple[str, ...]


def bundle_sha256(content: bytes) -> str:
    """The SHA-256 (hex) of a bundle's bytes: the identity a site approves.

    Example:
        >>> bundle_sha256(b"")[:16]
        'e3b0c44298fc1c14'
    """
    return hashlib.sha256(content).hexdigest()


def parse_sha256(text: str) -> str:
    """``text`` as a SHA-256 hex digest (64 hex digits, lower case).

    Raises:
        ApprovalError: ``text`` is not one.

    Example:
        >>> parse_sha256("AB" * 32) == "ab" * 32
        True
    """
    digest = text.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise ApprovalError(
            f"{text!r} is not a SHA-256 (64 hex digits) nor an existing .fab file"
        )
    return digest


def summarise_bundle(content: bytes, *, source: str) -> BundleSummary:
    """Read a bundle's name, version and file list (never runs or unpacks it).

    Args:
        content: the bundle's bytes.
        source: where they came from, for error messages (a file name).

    Raises:
        ApprovalError: not a Flower App Bundle (no zip, or no ``pyproject.toml``
            or ``.info/CONTENT`` inside).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = tuple(sorted(archive.namelist()))
            if "pyproject.toml" not in names or _CONTENT_MANIFEST not in names:
                raise ApprovalError(
                    f"{source}: not a Flower App Bundle (no pyproject.toml or "
                    f"{_CONTENT_MANIFEST} inside)"
                )
            project = tomllib.loads(archive.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ApprovalError(f"{source}: not a Flower App Bundle ({error})") from None
    about = project.get("project", {})
    return BundleSummary(
        sha256=bundle_sha256(content),
        name=str(about.get("name", "?")),
        version=str(about.get("version", "?")),
        files=tuple(name for name in names if name != _CONTENT_MANIFEST),
    )


def _parse_approval(item: object, path: Path, number: int) -> Approval:
    if not isinstance(item, dict):
        raise ApprovalError(f"{path}: approval {number} is not an object")
    fields = {key: item.get(key) for key in ("sha256", "approved_at", "source", "note")}
    if not all(isinstance(value, str) for value in fields.values()):
        raise ApprovalError(
            f"{path}: approval {number} needs string fields sha256, approved_at, "
            "source and note"
        )
    try:
        digest = parse_sha256(str(fields["sha256"]))
    except ApprovalError as error:
        raise ApprovalError(f"{path}: approval {number}: {error}") from None
    return Approval(
        sha256=digest,
        approved_at=str(fields["approved_at"]),
        source=str(fields["source"]),
        note=str(fields["note"]),
    )


def read_approvals(path: Path) -> tuple[Approval, ...]:
    """Every approval in ``path``, oldest first; () when the file does not exist.

    Raises:
        ApprovalError: the file can't be read or is malformed (naming it).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    except OSError as error:
        raise ApprovalError(f"{path}: can't read the approvals file: {error}") from None
    try:
        document = json.loads(text)
    except ValueError as error:
        raise ApprovalError(f"{path}: not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ApprovalError(
            f"{path}: not a SiteBridge approvals file (format {FORMAT} expected)"
        )
    approved = document.get("approved")
    if not isinstance(approved, list):
        raise ApprovalError(f"{path}: 'approved' must be a list")
    return tuple(
        _parse_approval(item, path, number)
        for number, item in enumerate(approved, start=1)
    )


def is_approved(path: Path, sha256: str) -> bool:
    """Whether the bundle with ``sha256`` is approved in ``path``.

    Raises:
        ApprovalError: the approvals file is malformed (nothing is approved then).
    """
    return any(approval.sha256 == sha256 for approval in read_approvals(path))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of the approvals file."""
    with hold_exclusive_lock(path.with_name(f".{path.name}.lock")):
        yield


def _write(path: Path, approvals: tuple[Approval, ...]) -> None:
    document = {"format": FORMAT, "approved": [a.to_json() for a in approvals]}
    with write_atomically(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def approve(
    path: Path, sha256: str, *, source: str, note: str = "", time: str | None = None
) -> tuple[Approval, bool]:
    """Add the bundle ``sha256`` to the approvals in ``path``.

    Args:
        path: the approvals file (created with its folder).
        sha256: the bundle's SHA-256.
        source: what was approved (``file <name>`` or ``sha256``).
        note: the site's note (who reviewed it, which release).
        time: ISO-8601 UTC time; now when None.

    Returns:
        The approval, and whether it is new (False: it was approved already, and
        the earlier approval is returned unchanged).

    Raises:
        ApprovalError: a malformed approvals file or SHA-256.
    """
    digest = parse_sha256(sha256)
    with _locked(path):
        approvals = read_approvals(path)
        for existing in approvals:
            if existing.sha256 == digest:
                return existing, False
        approval = Approval(
            sha256=digest,
            approved_at=time or datetime.now(UTC).isoformat(),
            source=source,
            note=note,
        )
        _write(path, (*approvals, approval))
    return approval, True


def revoke(path: Path, sha256: str) -> Approval:
    """Remove the bundle ``sha256`` from the approvals in ``path``; return it.

    Raises:
        ApprovalError: it was not approved (naming the file), or a malformed file.
    """
    digest = parse_sha256(sha256)
    with _locked(path):
        approvals = read_approvals(path)
        kept = tuple(a for a in approvals if a.sha256 != digest)
        if len(kept) == len(approvals):
            raise ApprovalError(f"{path}: bundle {digest} is not approved")
        _write(path, kept)
    return next(a for a in approvals if a.sha256 == digest)


def refused_bundle_path(state_dir: Path, sha256: str) -> Path:
    """Where the copy of a refused bundle is kept for review."""
    return state_dir / REFUSED_BUNDLES_DIR / f"{parse_sha256(sha256)}.fab"


def keep_refused_bundle(state_dir: Path, content: bytes) -> tuple[Path | None, str]:
    """Keep a copy of a refused bundle under ``<state-dir>/bundles/`` for review.

    Kept once per hash, only up to :data:`MAX_KEPT_BUNDLE_BYTES` and
    :data:`MAX_KEPT_BUNDLES` copies (whatever a coordinator sends, the site's disk
    use stays bounded).

    Returns:
        The copy's path (None when not kept) and a sentence saying what happened.
    """
    digest = bundle_sha256(content)
    target = refused_bundle_path(state_dir, digest)
    if target.is_file():
        return target, f"a copy is kept at {target}"
    if len(content) > MAX_KEPT_BUNDLE_BYTES:
        return None, (
            f"not kept: {len(content)} bytes exceed the {MAX_KEPT_BUNDLE_BYTES} "
            "bytes a refused bundle may take"
        )
    folder = target.parent
    kept = list(folder.glob("*.fab")) if folder.is_dir() else []
    if len(kept) >= MAX_KEPT_BUNDLES:
        return None, (
            f"not kept: {folder} already holds {len(kept)} refused bundles (at most "
            f"{MAX_KEPT_BUNDLES}); remove the reviewed ones"
        )
    with write_atomically(target) as temporary:
        temporary.write_bytes(content)
    return target, f"a copy is kept at {target}"
