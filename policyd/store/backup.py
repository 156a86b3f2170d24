"""Online backup: a consistent, standalone copy of the database while the daemon writes to it.

SQLite's backup API copies the whole database in one step, inside one read transaction: the
copy is the database as of one commit, and in WAL mode that read never blocks the daemon's
writer. (A copy in several steps would start over each time another connection writes, which
under policy load is all the time.) The copy is written beside its destination, switched to
rollback-journal mode (it then stands alone: no -wal or -shm file, readable from read-only
media), checked, synced, and renamed over the destination, so DEST is only ever a whole
backup. The live database is never written: it is opened read-only.
"""
from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

# Files beside a database that belong to it (its WAL, shared memory, rollback journal).
SIDE_FILES = ("-wal", "-shm", "-journal")


class BackupError(RuntimeError):
    """The backup was refused or failed; the message says why, in one line."""


def backup(source: Path, dest: Path, *, busy_timeout: float = 5.0) -> Path:
    """Copy the database at source to dest (a file, or a directory to put a dated file in);
    returns the file written."""
    source = source.expanduser().resolve()
    if not source.is_file():
        raise BackupError(f"database {source} does not exist")
    target = _target(source, dest.expanduser())
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        _copy(source, tmp, busy_timeout)
        _install(tmp, target)
    finally:
        for path in (tmp, *_side_files(tmp)):
            path.unlink(missing_ok=True)
    return target


def _target(source: Path, dest: Path) -> Path:
    """The file to write, refused when it is the live database or one of its files."""
    if dest.is_dir():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = dest / f"{source.stem}-{stamp}{source.suffix}"
    target = dest.resolve()  # through symlinks: a link to the live file is the live file
    if not target.parent.is_dir():
        raise BackupError(f"directory {target.parent} does not exist")
    live = {source, *_side_files(source)}
    if target in live or (target.exists() and os.path.samefile(target, source)):
        raise BackupError(f"{target} is the live database: give another destination")
    return target


def _side_files(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in SIDE_FILES]


def _copy(source: Path, tmp: Path, busy_timeout: float) -> None:
    """Back source up into the new file tmp, standalone and checked."""
    # The copy holds what the database holds (password hashes, secrets): no wider access.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, source.stat().st_mode & 0o777)
    os.close(fd)
    live = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True, timeout=busy_timeout)
    try:
        copy = sqlite3.connect(tmp, isolation_level=None)
        try:
            live.backup(copy, pages=-1)  # one step: one read transaction, one snapshot
            copy.execute("PRAGMA journal_mode=DELETE")  # the source's WAL flag came along
            result = [row[0] for row in copy.execute("PRAGMA integrity_check")]
            if result != ["ok"]:
                raise BackupError(f"the copy failed its integrity check: {result[0]}")
        finally:
            copy.close()
    finally:
        live.close()


def _install(tmp: Path, target: Path) -> None:
    """Sync tmp and rename it over target, then sync the directory (the rename)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    # A WAL or hot journal left beside an older file of that name would be applied to the new
    # one the next time it is opened: it belongs to the file being replaced, so it goes too.
    for path in _side_files(target):
        path.unlink(missing_ok=True)
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
