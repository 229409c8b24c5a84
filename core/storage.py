"""How SiteBridge writes a file: whole, or not at all.

Owns :func:`write_atomically`, the one way a site's files (privacy accountant, model
weights, images) are replaced, so a failure part-way (a full disk, an interrupted
process) never leaves a half-written file behind, and :func:`hold_exclusive_lock`, the
one way a read-check-write of such a file (a budget check and its recorded spend) is
kept from racing another process. The ledger, which is appended to rather than
replaced, keeps the same promise in ``core.privacy.ledger``. Stdlib only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def write_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; then move it over ``path``.

    The temporary name ends with ``path``'s name (so writers that pick a format by
    suffix still do) and starts with a dot. On success the temporary file is flushed
    to disk and renamed over ``path`` in one step, so a reader sees either the old
    file or the complete new one; on any failure it is removed and ``path`` is left
    as it was. Creates ``path``'s parent folders.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "state.json"
        >>> with write_atomically(target) as temporary:
        ...     _ = temporary.write_text("{}")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('{}', ['state.json'])
        >>> import shutil; shutil.rmtree(target.parent)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{secrets.token_hex(4)}.tmp.{path.name}")
    try:
        yield temporary
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every file system syncs folders
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@contextlib.contextmanager
def hold_exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` for the ``with`` block.

    Every process (and every thread: each call opens its own file description) that
    wraps its read-check-write of one state file in this lock, with the same lock
    path, runs that section alone, so two requests arriving at once can't both pass a
    budget check that only one of them fits. The lock file is created (with its
    folders) and never removed; the lock is released when the block ends, also on an
    exception, and by the operating system if the process dies.

    Example:
        >>> import tempfile
        >>> lock = Path(tempfile.mkdtemp()) / "budget.lock"
        >>> with hold_exclusive_lock(lock):
        ...     held = lock.exists()
        >>> held
        True
        >>> import shutil; shutil.rmtree(lock.parent)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
